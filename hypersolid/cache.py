"""Content-addressed store of stage outputs, and the hashing that keys it.

An entry is ``<cache>/<stage>/<key>/`` where key is the xxh3-128 of the
stage's manifest (its settings, input file digests, upstream keys and code
version).  Entries are built under ``<cache>/tmp/`` and renamed into place
once complete, so a crash or Ctrl-C never leaves one that looks valid.

Every lookup that finds an entry, and every publish, records the entry's
last use as the mtime of its stamp file ``.used`` (one utime), which is
what `hypersolid cache gc` orders by.  Names starting with "." at an
entry's top level are bookkeeping, not content.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import xxhash

CHUNK = 1 << 20
USED = ".used"  # an entry's last-use stamp (its mtime)


def digest_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def digest_file(path: Path | str, size: int | None = None) -> str:
    """size (when known, e.g. from a stat): a small file is hashed in one read."""
    with open(path, "rb") as f:
        if size is not None and size < CHUNK:
            return xxhash.xxh3_128_hexdigest(f.read())
        h = xxhash.xxh3_128()
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def digest_json(obj) -> str:
    return digest_bytes(canonical(obj))


def describe_tree(root: Path) -> dict[str, list]:
    """Every entry under root with what matters for an image: type, mode,
    owner and content (file digest or link target).  Paths are relative.
    (One scandir per directory and relative paths built as it descends:
    entries are verified with this, so its speed is a build's.)"""
    out: dict[str, list] = {}

    def walk(directory: str, prefix: str) -> None:
        try:
            with os.scandir(directory) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError:  # as os.walk: an unreadable directory lists nothing
            return
        subdirs = []
        for child in children:
            st = child.stat(follow_symlinks=False)
            rel = prefix + child.name
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                entry = ["link", os.readlink(child.path)]
            elif stat.S_ISDIR(st.st_mode):
                entry = ["dir", mode]
                subdirs.append((child.path, rel + "/"))
            elif stat.S_ISREG(st.st_mode):
                entry = ["file", mode, digest_file(child.path, st.st_size)]
            else:
                entry = ["special", st.st_mode, st.st_rdev]
            out[rel] = entry + [st.st_uid, st.st_gid]
        for path, sub in subdirs:
            walk(path, sub)

    walk(os.fspath(root), "")
    return out


class CacheError(Exception):
    """The cache directory cannot be used (one line, no traceback)."""


class Cache:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.tmp = self.root / "tmp"

    def check(self) -> None:
        """The cache must be (or become) a writable directory."""
        where = f"cache {self.root} (HYPERSOLID_CACHE or ./cache)"
        if self.root.exists() and not self.root.is_dir():
            raise CacheError(f"{where} is not a directory")
        try:
            # Root-only when new: entries hold setuid binaries and the images' shadow files.
            self.root.mkdir(parents=True, mode=0o700)
        except FileExistsError:
            pass
        except OSError as err:
            raise CacheError(f"{where} cannot be created: {err.strerror}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise CacheError(f"{where} is not writable (read-only file system?)")

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> Path | None:
        """The entry if it is there, recording this as its last use."""
        path = self.entry(stage, key)
        return path if mark_used(path) else None

    @contextmanager
    def publish(self, stage: str, key: str, manifest: dict) -> Iterator[Path]:
        """Yield an empty work directory; on success it becomes the entry,
        its manifest.json recording the digests of what it holds (entry.py).

        Anything that escapes the block (including KeyboardInterrupt) removes
        the half-built directory instead.
        """
        self.tmp.mkdir(parents=True, exist_ok=True)
        work = self.tmp / f"{stage}-{key[:12]}.{os.getpid()}.{secrets.token_hex(3)}"
        work.mkdir()
        try:
            yield work
            if "contents" not in manifest:  # given: an unpack that checked what it unpacked
                from .entry import contents  # entry.py builds on this module
                manifest = {**manifest, "contents": contents(work)}
            (work / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
            final = self.entry(stage, key)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(work, final)
            except OSError:
                if not final.is_dir():  # anything but "someone published it first"
                    raise
                remove_tree(work)
            mark_used(final)  # publishing is a use
        except BaseException:
            remove_tree(work)
            raise

    def collect_garbage(self) -> None:
        """Remove work directories of builds whose process is gone (killed)."""
        if not self.tmp.is_dir():
            return
        for work in self.tmp.iterdir():
            try:
                pid = int(work.name.split(".")[1])
            except (IndexError, ValueError):
                continue
            if pid != os.getpid() and not alive(pid):
                remove_tree(work)


def mark_used(entry: Path) -> bool:
    """Stamp now as the entry directory's last use: one utime of entry/.used
    (created the first time).  False if there is no such entry; a cache that
    cannot be written (read-only) still counts as found."""
    stamp = os.path.join(entry, USED)
    try:
        os.utime(stamp)
        return True
    except FileNotFoundError:
        pass
    except OSError:
        return os.path.isdir(entry)
    try:
        os.close(os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return os.path.isdir(entry)


def last_used(entry: Path) -> float:
    """When an entry was last used: its stamp, else when it was published."""
    for name in (USED, "manifest.json", "."):
        try:
            return os.stat(os.path.join(entry, name)).st_mtime
        except OSError:
            continue
    return 0.0


def mark_file_used(path: Path) -> None:
    """A cached file's (a .deb's) last use is its atime, set explicitly: its
    mtime stays, which the deb proxy's verified memo compares."""
    try:
        st = os.stat(path)
        os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))
    except OSError:
        pass


# A temporary name that carries its writer's pid: `.<name>.tmp-<pid>` (or
# .old-<pid>, optionally -<hex>), so a sweep knows when its writer is gone.
LEFTOVER = re.compile(r"\..+\.(tmp|old)-(\d+)(-[0-9a-f]+)?")


def alive(pid: int) -> bool:
    """Whether a writer still runs: a zombie (killed, not yet reaped) does not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """A sibling of path to write before an atomic rename (see LEFTOVER)."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(3)}")


def sweep_leftovers(directory: Path) -> list[Path]:
    """Remove temporary files and dirs of dead writers in directory (not
    recursive): what a kill or a full disk left in dist/ or cache/debs."""
    swept = []
    try:
        names = os.listdir(directory)
    except OSError:
        return swept
    for name in names:
        m = LEFTOVER.fullmatch(name)
        if m and int(m.group(2)) != os.getpid() and not alive(int(m.group(2))):
            remove_tree(Path(directory) / name)
            swept.append(Path(directory) / name)
    return swept


def remove_tree(path: Path) -> None:
    """rmtree that also copes with read-only directories in built trees."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        os.unlink(path)
        return

    def onerror(func, p, exc):
        parent = os.path.dirname(p)
        os.chmod(parent, 0o755)
        func(p)

    shutil.rmtree(path, onerror=onerror)
