"""`hypersolid diff A B`: what differs between two builds.

A and B are both dist directories (dist/<target>/) or both system images
(system-<arch>.img, a squashfs).  The report has three groups per
architecture: packages (added, removed, changed version), files in the
image (added, removed, changed: size, mode, owner, link target, content)
and boot files (each dist file changed or not).  File mtimes are left out
on purpose: every mtime is clamped to the build's SOURCE_DATE_EPOCH, so one
changed package would otherwise report every file; an image whose bytes
differ only there still shows as "system-<arch>.img changed".

The images are mounted read-only (loop devices, in a private mount
namespace; extracted with unsquashfs into a temporary directory under the
cache's tmp/ where no loop device can be had) and walked with lstat; only
the regular files present in both with the same size are hashed.  Two
images with identical bytes are not opened at all.
"""
from __future__ import annotations

import functools
import json
import os
import re
import stat
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cache import digest_file, remove_tree
from .run import BuildError, Log, isolated, run

IDENTICAL, DIFFERENT, USAGE = 0, 1, 2
STATUS_FILE = "var/lib/dpkg/status"


class UsageError(Exception):
    """Bad paths: one line, exit status 2."""


@dataclass(frozen=True)
class Entry:
    """One path of an image as the diff compares it."""

    kind: str          # file, dir, link, char, block, fifo, socket
    mode: int          # permission bits (with setuid/setgid/sticky)
    owner: str         # "uid:gid"
    size: int          # bytes of a regular file, else 0
    target: str = ""   # a link's target
    rdev: int = 0      # a device node's number


@dataclass
class Change:
    what: str          # added, removed, changed (boot files: also unchanged)
    name: str          # package name, image path or dist file name
    old: str = ""
    new: str = ""
    differs: dict = field(default_factory=dict)  # files: attribute -> [old, new]


@dataclass
class ArchDiff:
    arch: str
    packages: list[Change] = field(default_factory=list)
    files: list[Change] = field(default_factory=list)
    boot: list[Change] = field(default_factory=list)
    note: str = ""     # e.g. "only in B"

    @property
    def identical(self) -> bool:
        return not (self.packages or self.files or self.note
                    or any(c.what != "unchanged" for c in self.boot))


# --- comparison logic -------------------------------------------------------------

def diff_packages(old: dict[str, str], new: dict[str, str]) -> list[Change]:
    """Packages by name -> "version arch"; sorted by name."""
    out = []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if a is None:
            out.append(Change("added", name, new=b))
        elif b is None:
            out.append(Change("removed", name, old=a))
        elif a != b:
            out.append(Change("changed", name, old=a, new=b))
    return out


def diff_entries(old: dict[str, Entry], new: dict[str, Entry],
                 same_content) -> list[Change]:
    """Paths -> Entry; same_content(path) says whether a regular file
    present in both with the same size has the same bytes."""
    out = []
    for path in sorted(old.keys() | new.keys()):
        a, b = old.get(path), new.get(path)
        if a is None:
            out.append(Change("added", path, new=describe(b)))
        elif b is None:
            out.append(Change("removed", path, old=describe(a)))
        else:
            differs = {}
            if a.kind != b.kind:
                differs["type"] = [a.kind, b.kind]
            for attr in ("size", "mode", "owner", "target", "rdev"):
                if getattr(a, attr) != getattr(b, attr):
                    x, y = getattr(a, attr), getattr(b, attr)
                    differs[attr] = [f"{x:04o}", f"{y:04o}"] if attr == "mode" else [x, y]
            if a.kind == b.kind == "file" and a.size == b.size and not same_content(path):
                differs["content"] = ["", ""]
            if differs:
                out.append(Change("changed", path, differs=differs))
    return out


def describe(e: Entry) -> str:
    extra = {"file": f", {e.size} bytes", "link": f" -> {e.target}"}.get(e.kind, "")
    return f"{e.kind} {e.mode:04o} {e.owner}{extra}"


_KINDS = ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "link"), (stat.S_ISCHR, "char"),
          (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"))


def walk(root: Path) -> dict[str, Entry]:
    """Every path under an extracted image ("/etc/hostname" style) with its Entry."""
    out = {"/": _entry(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            out["/" + os.path.relpath(path, root)] = _entry(path)
    return out


def _entry(path) -> Entry:
    st = os.lstat(path)
    kind = next(k for test, k in _KINDS if test(st.st_mode))
    return Entry(kind, stat.S_IMODE(st.st_mode), f"{st.st_uid}:{st.st_gid}",
                 st.st_size if kind == "file" else 0,
                 os.readlink(path) if kind == "link" else "",
                 st.st_rdev if kind in ("char", "block") else 0)


def status_packages(text: str) -> dict[str, str]:
    """Installed packages of a dpkg status file: name -> "version arch"."""
    out = {}
    for para in re.split(r"\n\s*\n", text):
        fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", para, re.M))
        if fields.get("Status") == "install ok installed" and "Package" in fields:
            out[fields["Package"]] = f"{fields.get('Version', '')} {fields.get('Architecture', '')}".strip()
    return out


def tsv_packages(path: Path) -> dict[str, str]:
    """packages-<arch>.tsv: name, version, architecture per line."""
    out = {}
    for line in path.read_text().splitlines():
        name, version, arch = (line.split("\t") + ["", ""])[:3]
        if name:
            out[name] = f"{version} {arch}".strip()
    return out


# --- images -----------------------------------------------------------------------------

def open_image(image: Path, dest: Path, log: Log) -> None:
    """The image at dest: mounted read-only (a loop device; in the caller's
    private mount namespace), else extracted whole (no loop device, as in
    some containers).  Owners and modes as in the image either way (root
    needed, as for builds); no xattrs."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        run(["mount", "-t", "squashfs", "-o", "loop,ro,nodev,nosuid", image, dest], log, contain=False)
    except BuildError:
        run(["unsquashfs", "-f", "-d", dest, "-no-progress", "-quiet", "-no-xattrs", image], log, contain=False)


def diff_images(a: Path, b: Path, arch: str, work: Path, log: Log,
                packages: tuple[dict, dict] | None = None) -> ArchDiff:
    """Packages (from the images' dpkg status unless given) and files.  The
    images are mounted in a forked child's private mount namespace: the
    mounts (and their loop devices) go with it however it ends."""
    if _same_bytes(a, b):
        return ArchDiff(arch, packages=diff_packages(*packages) if packages else [])
    return isolated(_diff_opened, a, b, arch, work, log, packages)


def _diff_opened(a: Path, b: Path, arch: str, work: Path, log: Log, packages) -> ArchDiff:
    result = ArchDiff(arch)
    roots = work / f"{arch}-a", work / f"{arch}-b"
    for image, root in zip((a, b), roots):
        open_image(image, root, log)
    if packages is None:
        packages = tuple(status_packages(_read(r / STATUS_FILE)) for r in roots)
    result.packages = diff_packages(*packages)

    def same_content(path: str) -> bool:
        rel = path.lstrip("/")
        return digest_file(roots[0] / rel) == digest_file(roots[1] / rel)

    result.files = diff_entries(walk(roots[0]), walk(roots[1]), same_content)
    return result


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    return _digest(a.resolve()) == _digest(b.resolve())


@functools.lru_cache(maxsize=None)
def _digest(path: Path) -> str:
    """A dist image is compared twice (as the image, as a boot file): hashed once."""
    return digest_file(path)


# --- dist directories ---------------------------------------------------------------------

def dist_arches(dist: Path) -> set[str]:
    """The architectures a dist directory holds (from its build-/packages-/system- files)."""
    found = set()
    for f in dist.iterdir():
        m = re.fullmatch(r"(?:build|packages|system|kernel|initramfs)-(.+)\.(?:json|tsv|img|cpio|lock)", f.name)
        if m and not f.name.endswith(".cdx.json"):
            found.add(m.group(1))
    return found


def boot_files(dist: Path, arch: str) -> list[str]:
    return [n for n in (f"kernel-{arch}.img", f"initramfs-{arch}.img", f"system-{arch}.img", f"system-{arch}.cpio")
            if (dist / n).is_file()]


def image_of(dist: Path, arch: str, work: Path, side: str, log: Log) -> Path | None:
    """The squashfs of a dist dir: system-<arch>.img, or the one inside system-<arch>.cpio."""
    img = dist / f"system-{arch}.img"
    if img.is_file():
        return img
    cpio = dist / f"system-{arch}.cpio"
    if not cpio.is_file():
        return None
    out = work / f"cpio-{side}"
    out.mkdir(parents=True, exist_ok=True)
    run(["cpio", "--quiet", "-i", "-D", out, "-F", cpio, img.name], log, contain=False)
    return out / img.name


def _kernel_version(dist: Path, arch: str) -> str:
    try:
        return json.loads((dist / f"build-{arch}.json").read_text()).get("kernel_version", "")
    except (OSError, ValueError):
        return ""


def diff_dists(a: Path, b: Path, work: Path, log: Log) -> list[ArchDiff]:
    out = []
    arches_a, arches_b = dist_arches(a), dist_arches(b)
    for arch in sorted(arches_a | arches_b):
        if arch not in arches_b or arch not in arches_a:
            out.append(ArchDiff(arch, note=f"only in {'A' if arch in arches_a else 'B'}"))
            continue
        pkgs = None
        if (a / f"packages-{arch}.tsv").is_file() and (b / f"packages-{arch}.tsv").is_file():
            pkgs = (tsv_packages(a / f"packages-{arch}.tsv"), tsv_packages(b / f"packages-{arch}.tsv"))
        img_a, img_b = image_of(a, arch, work, "a", log), image_of(b, arch, work, "b", log)
        if img_a and img_b:
            result = diff_images(img_a, img_b, arch, work, log, pkgs)
        else:
            result = ArchDiff(arch, packages=diff_packages(*pkgs) if pkgs else [])
        for name in sorted(set(boot_files(a, arch)) | set(boot_files(b, arch))):
            fa, fb = a / name, b / name
            if not fb.is_file():
                result.boot.append(Change("removed", name))
            elif not fa.is_file():
                result.boot.append(Change("added", name))
            else:
                change = Change("unchanged" if _same_bytes(fa, fb) else "changed", name)
                if name.startswith("kernel-"):
                    change.old, change.new = _kernel_version(a, arch), _kernel_version(b, arch)
                result.boot.append(change)
        out.append(result)
    return out


# --- the command ------------------------------------------------------------------------

def _image_arch(path: Path) -> str:
    m = re.fullmatch(r"system-(.+)\.img", path.name)
    return m.group(1) if m else "image"


def check_paths(a: str, b: str) -> tuple[Path, Path, str]:
    """Both dist directories ("dist") or both images ("image"); else UsageError."""
    pa, pb = Path(a), Path(b)
    for p in (pa, pb):
        if not p.exists():
            raise UsageError(f"{p}: no such file or directory")
    if pa.is_dir() and pb.is_dir():
        for p in (pa, pb):
            if not dist_arches(p):
                raise UsageError(f"{p}: not a dist directory (no build-, packages- or system-<arch> files)")
        return pa, pb, "dist"
    if pa.is_file() and pb.is_file():
        for p in (pa, pb):
            with open(p, "rb") as f:
                if f.read(4) != b"hsqs":
                    raise UsageError(f"{p}: not a squashfs image")
        return pa, pb, "image"
    raise UsageError(f"{a} and {b}: give two dist directories or two image files")


def temp_root() -> Path | None:
    """The cache's tmp/ (same filesystem as the builds, sized for trees), else the system's."""
    cache = os.environ.get("HYPERSOLID_CACHE")
    if not cache:
        d = Path.cwd()
        for c in [d, *d.parents]:
            if (c / "dodo.py").is_file() and (c / "cache").is_dir():
                cache = str(c / "cache")
                break
    if cache:
        tmp = Path(cache) / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp
    return None


def compare(a: str, b: str) -> list[ArchDiff]:
    pa, pb, kind = check_paths(a, b)
    # diff.<pid>.<random>: the cache's sweep removes it if this process is killed.
    work = Path(tempfile.mkdtemp(prefix=f"diff.{os.getpid()}.", dir=temp_root()))
    try:
        log = Log(work / "diff.log", "diff")
        try:
            if kind == "dist":
                return diff_dists(pa, pb, work, log)
            return [diff_images(pa, pb, _image_arch(pa), work, log)]
        except BuildError as err:  # the log goes with the work dir: its tail is in the message
            raise UsageError(f"{err.message}: {' '.join(map(str, err.command or []))}"
                             f" ({'; '.join(l for l in _tail(log) if l)})") from None
    finally:
        remove_tree(work)


def _tail(log: Log) -> list[str]:
    return [line for line in _read(log.path).splitlines()[-3:] if not line.startswith("#")]


def format_text(diffs: list[ArchDiff]) -> str:
    """One line per change under a header per group; a summary line last."""
    lines = []
    for d in diffs:
        if d.note:
            lines.append(f"architecture {d.arch}: {d.note}")
        if d.packages:
            lines.append(f"packages ({d.arch}):")
            for c in d.packages:
                lines.append({"added": f"  + {c.name} {c.new}", "removed": f"  - {c.name} {c.old}",
                              "changed": f"  ~ {c.name} {c.old} -> {c.new}"}[c.what])
        if d.files:
            lines.append(f"files ({d.arch}):")
            for c in d.files:
                if c.what == "added":
                    lines.append(f"  + {c.name}  ({c.new})")
                elif c.what == "removed":
                    lines.append(f"  - {c.name}  ({c.old})")
                else:
                    parts = [k if k == "content" else f"{k} {v[0]} -> {v[1]}" for k, v in c.differs.items()]
                    lines.append(f"  ~ {c.name}  {', '.join(parts)}")
        if d.boot:
            lines.append(f"boot files ({d.arch}):")
            for c in d.boot:
                versions = f" ({c.old} -> {c.new})" if c.old != c.new else ""
                lines.append(f"  {_MARK[c.what]} {c.name} {c.what}{versions}")
    counts = [f"{sum(len(getattr(d, g)) for d in diffs)} {g}" for g in ("packages", "files")]
    boot = sum(1 for d in diffs for c in d.boot if c.what != "unchanged")
    if all(d.identical for d in diffs):
        lines.append("identical")
    else:
        lines.append(f"different: {', '.join(counts)}, {boot} boot files")
    return "\n".join(lines)


_MARK = {"added": "+", "removed": "-", "changed": "~", "unchanged": "="}


def as_json(diffs: list[ArchDiff]) -> str:
    return json.dumps({"identical": all(d.identical for d in diffs),
                       "architectures": {d.arch: {k: v for k, v in asdict(d).items() if k != "arch"}
                                         for d in diffs}}, indent=1, sort_keys=True)


def main(a: str, b: str, machine: bool) -> int:
    """The verb: prints the report, returns the exit status (UsageError is the caller's)."""
    diffs = compare(a, b)
    print(as_json(diffs) if machine else format_text(diffs))
    return IDENTICAL if all(d.identical for d in diffs) else DIFFERENT
