"""The `hypersolid cache` verb: check, export and import cache entries.

    hypersolid cache verify [--all]
    hypersolid cache export FILE [TARGET...]
    hypersolid cache import FILE
    hypersolid cache gc [--max-size SIZE] [--max-age DAYS]   (gc.py)

The export file is one uncompressed tar of an OCI image layout (see
docs/cache.md): `oci-layout`, `index.json` naming one image manifest per
entry (`org.opencontainers.image.ref.name` = `<stage>/<key>`), and
`blobs/sha256/<hex>`, all ordinary 0644 members, so an unprivileged CI cache
step can save and restore the one file.  Entries keep their owners, modes,
device nodes and xattrs inside their tree blobs, which only root unpacks.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import secrets
import sys
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import entry, lock
from .cache import CHUNK, Cache, CacheError, canonical, remove_tree, temp_name
from .config import Project
from .gc import add_gc_action, run_gc
from .run import BuildError, Log, interrupted_status
from .stages import STAGES, default_cache_dir

OK, BAD, USAGE = 0, 1, 2
LAYOUT = {"imageLayoutVersion": "1.0.0"}
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


class Failure(Exception):
    """Ends the command with one line and a status."""

    def __init__(self, message: str, status: int = USAGE):
        super().__init__(message)
        self.status = status


def add_cache_verb(verbs) -> None:
    text = "check, export and import cache entries (docs/cache.md)"
    v = verbs.add_parser("cache", help=text, description=text)
    sub = v.add_subparsers(dest="cache_verb", metavar="ACTION", required=True)
    check = sub.add_parser("verify", help="check entries against their manifests; remove bad ones (exit 1 if any)",
                           description="check the entries this workspace's targets' last builds used (or all) "
                           "against their manifests' records; remove the bad ones; exit 1 if any was bad")
    check.add_argument("--all", action="store_true", help="every entry in the cache, not only those of the "
                       "last builds here")
    export = sub.add_parser("export", help="write the entries of TARGETs' last builds to one archive FILE",
                            description="write the entries the targets' last builds in this workspace used "
                            "(default: every target) to FILE, one tar of an OCI image layout")
    export.add_argument("file", metavar="FILE")
    export.add_argument("targets", metavar="TARGET", nargs="*")
    restore = sub.add_parser("import", help="add the entries of an archive FILE to the cache",
                             description="add the entries of FILE (from `hypersolid cache export`) to the "
                             "cache, each checked against its digests and key")
    restore.add_argument("file", metavar="FILE")
    add_gc_action(sub)


def run_cache(args: argparse.Namespace, workspace: Path | None) -> int:
    """The verb's entry point (cli.main)."""
    action = args.cache_verb
    try:
        project = Project(workspace) if workspace else None
        if project is None and not os.environ.get("HYPERSOLID_CACHE"):
            raise Failure("no workspace here (use -C DIR) and no HYPERSOLID_CACHE: which cache?")
        cache = Cache(default_cache_dir(project) if project else os.environ["HYPERSOLID_CACHE"])
        cache.check()
        if action == "gc":
            return run_gc(args, project, cache)
        if action == "import":
            lock.share_cache(cache.root)  # it publishes: no gc meanwhile
        if action == "verify":
            return verify(project, cache, args.all)
        if action == "export":
            if project is None:
                raise Failure("export needs a workspace (its build/ says which entries the targets used)")
            return export(project, cache, Path(args.file), args.targets)
        if os.geteuid() != 0:
            raise Failure("import unpacks trees with their owners, device nodes and capabilities: run it as root")
        return import_(cache, Path(args.file))
    except (Failure, CacheError, BuildError) as err:
        print(f"hypersolid: cache {action}: {err}", file=sys.stderr)
        return err.status if isinstance(err, Failure) else BAD
    except OSError as err:  # the archive's directory is missing, the disk is full, ...
        print(f"hypersolid: cache {action}: {err.strerror}: {err.filename}", file=sys.stderr)
        return BAD
    except KeyboardInterrupt as err:
        print(f"hypersolid: cache {action}: {err or 'interrupted'}", file=sys.stderr)
        return interrupted_status(err)


# --- which entries ---------------------------------------------------------------

def cached_stages() -> list[str]:
    return [name for name, stage in STAGES.items() if stage.cached]


def used_entries(project: Project, targets: list[str] | None = None) -> list[tuple[str, str]]:
    """(stage, key) of every cached stage the targets' last builds in this
    workspace recorded in their key files (build/<t>/[<arch>/]<stage>.key);
    default: every target with a build/ directory."""
    build = project.root / "build"
    if targets:
        names = [t.rstrip("/").removeprefix("targets/") for t in targets]
        for name in names:
            if not (project.targets_dir / name / "target.yaml").is_file():
                raise Failure(f"{name}: no such target (no targets/{name}/target.yaml)")
            if not (build / name).is_dir():
                raise Failure(f"{name} has not been built in this workspace (no build/{name}/)")
    else:
        names = [n for n in project.target_names() if (build / n).is_dir()]
    stages = set(cached_stages())
    found = set()
    for name in names:
        for key_file in (build / name).rglob("*.key"):
            if key_file.stem in stages:
                key = key_file.read_text().strip()
                if entry.KEY.fullmatch(key):
                    found.add((key_file.stem, key))
    order = {s: i for i, s in enumerate(STAGES)}
    return sorted(found, key=lambda e: (order[e[0]], e[1]))


def all_entries(cache: Cache) -> list[tuple[str, str]]:
    out = []
    for stage in cached_stages():
        d = cache.root / stage
        if d.is_dir():
            out += [(stage, p.name) for p in sorted(d.iterdir()) if entry.KEY.fullmatch(p.name) and p.is_dir()]
    return out


def _entries(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


# --- verify -----------------------------------------------------------------------

def verify(project: Project | None, cache: Cache, every: bool) -> int:
    if not every and project is None:
        raise Failure("no workspace: use --all to check every entry of HYPERSOLID_CACHE")
    refs = all_entries(cache) if every else used_entries(project)
    start, checked, bad, absent, unrecorded = time.monotonic(), 0, 0, 0, 0
    for stage, key in refs:
        path = cache.lookup(stage, key)
        if path is None:
            absent += 1
            continue
        checked += 1
        problems = entry.verify(stage, key, path)
        if problems:
            bad += 1
            entry.discard(cache, stage, key)
            print(f"hypersolid: cache verify: {stage}/{key}: {'; '.join(problems)}: removed")
        elif "contents" not in entry.read_manifest(path):
            unrecorded += 1
    gone = f", {absent} recorded here but not in the cache" if absent else ""
    old = f", {unrecorded} from before contents records (only their keys checked)" if unrecorded else ""
    print(f"hypersolid: cache verify: {_entries(checked)} checked, {bad} bad{gone}{old} "
          f"({time.monotonic() - start:.1f}s)")
    return BAD if bad else OK


# --- export -----------------------------------------------------------------------

def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_member(name, len(data)), io.BytesIO(data))


def _member(name: str, size: int, directory: bool = False) -> tarfile.TarInfo:
    """An ordinary member anyone can read: owned by 0, mode 0644 (0755 for
    a directory), time 0."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.uid, info.gid, info.uname, info.gname = size, 0, 0, 0, "", ""
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    return info


def export(project: Project, cache: Cache, file: Path, targets: list[str]) -> int:
    refs = used_entries(project, targets)
    if not refs:
        raise Failure("no entries to export: build first (no key files under build/)")
    start, bad, missing = time.monotonic(), 0, []
    log = Log(project.root / "build" / "logs" / "cache-export.log", "cache export")
    blobdir = cache.tmp / f"export.{os.getpid()}.{secrets.token_hex(3)}"  # swept if this process dies
    tmp = temp_name(file.resolve())
    manifests, written = [], set()
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, "oci-layout", canonical(LAYOUT))
            tar.addfile(_member("blobs", 0, directory=True))
            tar.addfile(_member("blobs/sha256", 0, directory=True))
            for stage, key in refs:
                path = cache.lookup(stage, key)
                if path is None:
                    missing.append(f"{stage}/{key}")
                    continue
                problems = entry.verify(stage, key, path)
                if problems:  # never ship a damaged entry: the next build here rebuilds it
                    bad += 1
                    entry.discard(cache, stage, key)
                    entry.warn(f"cache entry {stage}/{key} is corrupt ({'; '.join(problems)}): removed, "
                               "not exported")
                    continue
                manifest, blobs = entry.pack(cache, stage, key, blobdir, log)
                for blob in blobs:
                    hexdigest = blob.digest.removeprefix("sha256:")
                    if hexdigest not in written:
                        with open(blob.path, "rb") as f:
                            tar.addfile(_member(f"blobs/sha256/{hexdigest}", blob.size), f)
                        written.add(hexdigest)
                    if blob.path.is_relative_to(blobdir):
                        blob.path.unlink()  # packed tree: in the archive now
                hexdigest = hashlib.sha256(manifest).hexdigest()
                if hexdigest not in written:
                    _add_bytes(tar, f"blobs/sha256/{hexdigest}", manifest)
                    written.add(hexdigest)
                manifests.append({"mediaType": entry.MANIFEST_TYPE, "digest": f"sha256:{hexdigest}",
                                  "size": len(manifest),
                                  "annotations": {REF_NAME: f"{stage}/{key}", entry.STAGE_ANNOTATION: stage,
                                                  entry.KEY_ANNOTATION: key}})
            index = {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": manifests}
            _add_bytes(tar, "index.json", canonical(index))
        os.chmod(tmp, 0o644)
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        remove_tree(blobdir)
    if missing:
        entry.warn(f"not in the cache, so not exported: {', '.join(missing)}")
    print(f"hypersolid: cache export: wrote {file} ({_entries(len(manifests))}, "
          f"{file.stat().st_size / 1e6:.1f} MB) in {time.monotonic() - start:.1f}s")
    return BAD if bad else OK


# --- import -----------------------------------------------------------------------

def import_(cache: Cache, file: Path) -> int:
    start, imported, present, bad = time.monotonic(), 0, 0, 0
    log = Log(cache.tmp / f"import-log.{os.getpid()}.{secrets.token_hex(3)}", "cache import")
    try:
        tar = tarfile.open(file, "r:")
    except FileNotFoundError:
        raise Failure(f"{file}: no such file") from None
    except (OSError, tarfile.TarError) as err:
        raise Failure(f"{file}: not a readable tar archive ({err})") from None
    with tar:
        try:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
        except (OSError, tarfile.TarError, EOFError) as err:
            raise Failure(f"{file}: damaged archive ({err})", BAD) from None

        @contextmanager
        def open_blob(descriptor: dict) -> Iterator[Iterator[bytes]]:
            m = re.fullmatch(r"sha256:([0-9a-f]{64})", str(descriptor.get("digest")))
            member = members.get(f"blobs/sha256/{m.group(1)}") if m else None
            if member is None:
                raise entry.Corrupt(f"blob {descriptor.get('digest')} is not in {file.name}")
            f = tar.extractfile(member)
            yield iter(lambda: f.read(CHUNK), b"")

        def read(name: str) -> bytes:
            if name not in members:
                raise Failure(f"{file}: no {name}: not an archive of `hypersolid cache export`")
            return tar.extractfile(members[name]).read()

        try:
            if json.loads(read("oci-layout")).get("imageLayoutVersion") != "1.0.0":
                raise Failure(f"{file}: unknown OCI layout version")
            index = json.loads(read("index.json"))
            descriptors = index["manifests"]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise Failure(f"{file}: bad index.json or oci-layout ({err})") from None
        for d in descriptors:
            annotations = d.get("annotations") or {}
            stage = annotations.get(entry.STAGE_ANNOTATION, "")
            key = annotations.get(entry.KEY_ANNOTATION, "")
            try:
                if stage not in cached_stages() or not entry.KEY.fullmatch(key):
                    raise entry.Corrupt(f"index.json names {stage!r}/{key!r}, not a stage's entry")
                if cache.lookup(stage, key) is not None:
                    present += 1
                    continue
                with open_blob(d) as chunks:
                    manifest = b"".join(entry.checked_chunks(chunks, d, f"{stage}/{key}: its OCI manifest"))
                entry.unpack(cache, stage, key, manifest, open_blob, log)
                imported += 1
            except (entry.Corrupt, BuildError) as err:
                bad += 1
                entry.warn(f"not imported: {err}")
            except (OSError, tarfile.TarError, EOFError) as err:
                bad += 1
                entry.warn(f"not imported: {stage}/{key}: {file} cannot be read ({err})")
    already = f", {present} already here" if present else ""
    failed = f", {bad} bad (not imported)" if bad else ""
    print(f"hypersolid: cache import: {_entries(imported)} imported{already}{failed} "
          f"in {time.monotonic() - start:.1f}s")
    return BAD if bad else OK
