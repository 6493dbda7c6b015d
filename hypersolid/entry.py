"""A cache entry as data that can be checked, packed and moved.

An entry (`<cache>/<stage>/<key>/`, see cache.py) is its manifest.json,
whose canonical JSON less "contents" hashes to the key, plus top-level
items: trees (directories) and files.  At publish the manifest records the
items' "contents" (a digest per item), so `verify` can tell an intact entry
from one a disk, a user or a crashed copy changed.  Names starting with "."
at the top level (the last-use stamp `.used`) are not content.

`pack` and `unpack` turn an entry into the blobs of one OCI image manifest
and back (docs/cache.md): the config is manifest.json, each tree a sorted
pax tar with owners, xattrs and ACLs through zstd, each file as it is.  The
export archive and the remote cache are both made of these.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator

from .cache import CHUNK, Cache, canonical, describe_tree, digest_file, digest_json, remove_tree
from .run import Log, piped

MANIFEST = "manifest.json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.hypersolid.entry.v1+json"
TREE_TYPE = "application/vnd.hypersolid.tree.v1.tar+zstd"
FILE_TYPE = "application/octet-stream"
TITLE = "org.opencontainers.image.title"
STAGE_ANNOTATION, KEY_ANNOTATION = "dev.hypersolid.stage", "dev.hypersolid.key"
ZSTD_LEVEL = 3  # fixed: packing an entry twice gives the same bytes

# What a tree's tar keeps: everything an image needs (owners by number,
# xattrs of every namespace so security.capability survives, ACLs, device
# nodes, setuid, hard links), nothing that differs between two packings
# (atime, ctime, the packer's pid in pax header names).
TAR_FORMAT = ["--format=pax", "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
              "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"]
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")  # an item name unpack accepts
KEY = re.compile(r"[0-9a-f]{32}")
STAGE = re.compile(r"[a-z][a-z0-9-]*")


class Corrupt(Exception):
    """An entry, blob or archive does not match its record (one line)."""


def items(entry_dir: Path) -> list[str]:
    """The entry's content items, sorted: not manifest.json, not dot names."""
    return sorted(n for n in os.listdir(entry_dir) if n != MANIFEST and not n.startswith("."))


def contents(entry_dir: Path, only: str | None = None) -> dict:
    """The record of every content item (or of the one named `only`): a
    tree by the digest of its sorted listing (path, type, mode, owner,
    content digest or link target or device number, and the same of its
    root), a file by digest and size."""
    out = {}
    for name in items(entry_dir) if only is None else [n for n in items(entry_dir) if n == only]:
        path = Path(entry_dir) / name
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            root = [stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]
            out[name] = {"type": "tree", "digest": digest_json([root, describe_tree(path)])}
        elif stat.S_ISREG(st.st_mode):
            out[name] = {"type": "file", "digest": digest_file(path), "size": st.st_size}
        else:
            out[name] = {"type": "other", "mode": st.st_mode}
    return out


def key_of(manifest: dict) -> str:
    """The key a manifest stands for: its digest without the contents record."""
    return digest_json({k: v for k, v in manifest.items() if k != "contents"})


def read_manifest(entry_dir: Path) -> dict:
    try:
        manifest = json.loads((Path(entry_dir) / MANIFEST).read_text())
    except FileNotFoundError:
        raise Corrupt(f"{MANIFEST} is missing") from None
    except (OSError, ValueError) as err:
        raise Corrupt(f"{MANIFEST} cannot be read: {err}") from None
    if not isinstance(manifest, dict):
        raise Corrupt(f"{MANIFEST} is not a JSON object")
    return manifest


def verify(stage: str, key: str, entry_dir: Path, only: str | None = None) -> list[str]:
    """What is wrong with the entry (empty: nothing); with `only`, with its
    manifest and that one item.  An entry published before manifests
    recorded their contents can only have its key checked."""
    try:
        manifest = read_manifest(entry_dir)
    except Corrupt as err:
        return [str(err)]
    problems = []
    if manifest.get("stage") != stage:
        problems.append(f"{MANIFEST} is for stage {manifest.get('stage')!r}")
    if key_of(manifest) != key:
        problems.append(f"{MANIFEST} hashes to {key_of(manifest)}, not to its key")
    recorded = manifest.get("contents")
    if problems or recorded is None:
        return problems
    if only is not None:
        recorded = {only: recorded[only]} if only in recorded else {}
    return compare(recorded, contents(entry_dir, only))


def compare(recorded: dict, actual: dict) -> list[str]:
    """How actual contents differ from the record, one phrase per item."""
    problems = []
    for name in sorted(recorded.keys() | actual.keys()):
        want, have = recorded.get(name), actual.get(name)
        if have is None:
            problems.append(f"{name} is missing")
        elif want is None:
            problems.append(f"{name} is not in the record")
        elif want.get("type") != have["type"]:
            problems.append(f"{name} is a {have['type']}, recorded as a {want.get('type')}")
        elif have["type"] == "tree" and want.get("digest") != have["digest"]:
            problems.append(f"{name}/ differs from its record (a file changed, was added or removed, "
                            "or a mode or owner changed)")
        elif have["type"] == "file" and want.get("size") != have["size"]:
            problems.append(f"{name} has {have['size']} bytes, recorded {want.get('size')}")
        elif have != want:
            problems.append(f"{name}'s content differs from its record")
    return problems


# What this process verified, (stage, key, item or None for all): a stage
# consuming an entry checks it once per build run, not once per consumer.
_verified: set[tuple[str, str, str | None]] = set()
# What this build run published, across doit's worker processes (a stage
# and its consumers often run in different ones): a marker per entry in a
# directory named like a work directory (name.pid.hex, the main process's
# pid), so the cache's sweep removes it when a killed run left it.
_published: Path | None = None


def start_run(tmp: Path) -> None:
    """In the main process, before doit forks its workers; the directory
    goes when this process exits."""
    global _published
    import atexit

    _published = Path(tmp) / f"published.{os.getpid()}.{secrets.token_hex(3)}"
    atexit.register(end_run)


def end_run() -> None:
    """Remove this run's markers: in the process that started the run only
    (its name carries that pid), never in a forked worker."""
    if _published is not None and _published.name.split(".")[1] == str(os.getpid()):
        remove_tree(_published)


def _mark(stage: str, key: str) -> Path | None:
    return _published / f"{stage}-{key}" if _published is not None else None


def checked(stage: str, key: str, entry_dir: Path, only: str | None = None) -> list[str]:
    """verify, remembered for this process when the entry is good; an entry
    this run published is not hashed again (its record was made from it
    moments ago)."""
    if (stage, key, None) in _verified or (stage, key, only) in _verified:
        return []
    mark = _mark(stage, key)
    if mark is not None and mark.exists():
        _verified.add((stage, key, None))
        return []
    problems = verify(stage, key, entry_dir, only)
    if not problems:
        _verified.add((stage, key, only))
    return problems


def remember(stage: str, key: str) -> None:
    """This process just published the entry (and recorded its contents):
    its consumers in the same build need not hash it again."""
    _verified.add((stage, key, None))
    mark = _mark(stage, key)
    if mark is not None:
        try:
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.touch()
        except OSError:  # only a saving lost
            pass


def discard(cache: Cache, stage: str, key: str) -> None:
    """Remove an entry: renamed out of the way first, so it never looks half there."""
    entry = cache.entry(stage, key)
    cache.tmp.mkdir(parents=True, exist_ok=True)
    doomed = cache.tmp / f"{stage}-{key[:12]}.{os.getpid()}.{secrets.token_hex(3)}"
    try:
        os.rename(entry, doomed)
    except FileNotFoundError:
        return
    for done in [v for v in _verified if v[:2] == (stage, key)]:
        _verified.discard(done)
    mark = _mark(stage, key)
    if mark is not None:
        mark.unlink(missing_ok=True)
    remove_tree(doomed)


def warn(message: str) -> None:
    print(f"hypersolid: warning: {message}", file=sys.stderr, flush=True)


# --- OCI blobs -------------------------------------------------------------------

@dataclass(frozen=True)
class Blob:
    """One blob of an entry's OCI manifest, with the file that holds it."""

    digest: str  # "sha256:<hex>"
    size: int
    media_type: str
    title: str
    path: Path

    def descriptor(self) -> dict:
        d = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.media_type != CONFIG_TYPE:
            d["annotations"] = {TITLE: self.title}
        return d


def _log(cache: Cache) -> Log:
    """A log for pack/unpack's tar when the caller gives none; its name
    carries the pid, so the cache's sweep removes it once this process is gone."""
    cache.tmp.mkdir(parents=True, exist_ok=True)
    return Log(cache.tmp / f"entry-log.{os.getpid()}.{secrets.token_hex(3)}", "cache")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def pack_tree(tree: Path, blobdir: Path, log: Log) -> tuple[str, int, Path]:
    """tree as a zstd-compressed sorted pax tar in blobdir/sha256/<hex>,
    hashed while it streams: (digest, size, path)."""
    where = Path(blobdir) / "sha256"
    where.mkdir(parents=True, exist_ok=True)
    tmp = where / f".pack.{os.getpid()}.{secrets.token_hex(3)}"
    h, size = hashlib.sha256(), 0
    argv = ["tar", "--create", "--file=-", "--directory", tree, "--sort=name", *TAR_FORMAT,
            f"--use-compress-program=zstd -q -T0 -{ZSTD_LEVEL}", "."]
    try:
        with piped(argv, log) as stream, open(tmp, "wb") as out:
            while chunk := stream.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
                out.write(chunk)
        final = where / h.hexdigest()
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return "sha256:" + h.hexdigest(), size, final


def pack(cache: Cache, stage: str, key: str, blobdir: Path, log: Log | None = None) -> tuple[bytes, list[Blob]]:
    """The entry's OCI image manifest and its blobs, config first (push
    them all, then the manifest).  Trees are packed into blobdir; files and
    manifest.json are referenced where they are, in the entry."""
    entry = cache.lookup(stage, key)
    if entry is None:
        raise Corrupt(f"{stage}/{key} is not in the cache")
    config = entry / MANIFEST
    if key_of(read_manifest(entry)) != key:
        raise Corrupt(f"{stage}/{key}: {MANIFEST} does not hash to its key")
    log = log or _log(cache)
    blobs = [Blob(_sha256_file(config), config.stat().st_size, CONFIG_TYPE, MANIFEST, config)]
    for name in items(entry):
        path = entry / name
        if path.is_dir() and not path.is_symlink():
            digest, size, blob = pack_tree(path, blobdir, log)
            blobs.append(Blob(digest, size, TREE_TYPE, name, blob))
        elif path.is_file() and not path.is_symlink():
            blobs.append(Blob(_sha256_file(path), path.stat().st_size, FILE_TYPE, name, path))
        else:
            raise Corrupt(f"{stage}/{key}: {name} is neither a file nor a directory")
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": blobs[0].descriptor(),
        "layers": [b.descriptor() for b in blobs[1:]],
        "annotations": {STAGE_ANNOTATION: stage, KEY_ANNOTATION: key},
    }
    return canonical(manifest), blobs


OpenBlob = Callable[[dict], ContextManager[Iterable[bytes]]]


def checked_chunks(chunks: Iterable[bytes], descriptor: dict, what: str) -> Iterator[bytes]:
    """The chunks, hashed and counted as they pass; Corrupt at the end (or
    as soon as there are too many bytes) unless they match the descriptor."""
    h, size, want = hashlib.sha256(), 0, descriptor["size"]
    for chunk in chunks:
        size += len(chunk)
        if size > want:
            raise Corrupt(f"{what}: more than its {want} bytes")
        h.update(chunk)
        yield chunk
    if size != want:
        raise Corrupt(f"{what}: {size} bytes, expected {want}")
    if "sha256:" + h.hexdigest() != descriptor["digest"]:
        raise Corrupt(f"{what}: sha256 is {h.hexdigest()}, expected {descriptor['digest']}")


def parse_manifest(stage: str, key: str, manifest_bytes: bytes) -> dict:
    """The OCI manifest of stage/key, checked for the shape pack gives it."""
    try:
        manifest = json.loads(manifest_bytes)
        config, layers = manifest["config"], manifest["layers"]
        descriptors = [config, *layers]
        for d in descriptors:
            if not (isinstance(d["digest"], str) and re.fullmatch(r"sha256:[0-9a-f]{64}", d["digest"])
                    and isinstance(d["size"], int) and d["size"] >= 0):
                raise ValueError(f"bad descriptor {d!r}")
    except (ValueError, KeyError, TypeError) as err:
        raise Corrupt(f"{stage}/{key}: not an entry's OCI manifest ({err})") from None
    annotations = manifest.get("annotations") or {}
    if annotations.get(STAGE_ANNOTATION, stage) != stage or annotations.get(KEY_ANNOTATION, key) != key:
        raise Corrupt(f"{stage}/{key}: the manifest is annotated as "
                      f"{annotations.get(STAGE_ANNOTATION)}/{annotations.get(KEY_ANNOTATION)}")
    if config.get("mediaType") != CONFIG_TYPE:
        raise Corrupt(f"{stage}/{key}: config media type {config.get('mediaType')!r}, expected {CONFIG_TYPE}")
    titles = []
    for layer in layers:
        title = (layer.get("annotations") or {}).get(TITLE, "")
        if not NAME.fullmatch(title) or title == MANIFEST or layer.get("mediaType") not in (TREE_TYPE, FILE_TYPE):
            raise Corrupt(f"{stage}/{key}: a layer named {title!r} of type {layer.get('mediaType')!r}")
        titles.append(title)
    if len(set(titles)) != len(titles):
        raise Corrupt(f"{stage}/{key}: two layers have the same name")
    return manifest


def unpack(cache: Cache, stage: str, key: str, manifest_bytes: bytes, open_blob: OpenBlob,
           log: Log | None = None) -> Path:
    """Publish stage/key from its OCI manifest and blobs, each blob hashed as
    it streams, the config against the key and the unpacked items against
    the config's contents record.  Anything wrong raises Corrupt (a tar
    that cannot unpack a tree: BuildError, naming its log) and publishes
    nothing."""
    if not STAGE.fullmatch(stage) or not KEY.fullmatch(key):
        raise Corrupt(f"{stage}/{key}: not a stage and key")
    manifest = parse_manifest(stage, key, manifest_bytes)
    with open_blob(manifest["config"]) as chunks:
        config_bytes = b"".join(checked_chunks(chunks, manifest["config"], f"{stage}/{key}: {MANIFEST}"))
    try:
        config = json.loads(config_bytes)
        if not isinstance(config, dict):
            raise ValueError("not an object")
    except ValueError as err:
        raise Corrupt(f"{stage}/{key}: {MANIFEST} is not valid JSON ({err})") from None
    if config.get("stage") != stage or key_of(config) != key:
        raise Corrupt(f"{stage}/{key}: {MANIFEST} does not hash to the key (it hashes to {key_of(config)})")
    existing = cache.lookup(stage, key)
    if existing is not None:
        return existing
    log = log or _log(cache)
    with cache.publish(stage, key, config) as work:
        for layer in manifest["layers"]:
            title = layer["annotations"][TITLE]
            what = f"{stage}/{key}: {title}"
            with open_blob(layer) as chunks:
                checked = checked_chunks(chunks, layer, what)
                if layer["mediaType"] == FILE_TYPE:
                    with open(work / title, "wb") as out:
                        for chunk in checked:
                            out.write(chunk)
                else:
                    _unpack_tree(checked, work / title, log)
        recorded = config.get("contents")
        if recorded is not None:
            problems = compare(recorded, contents(work))
            if problems:
                raise Corrupt(f"{stage}/{key}: {'; '.join(problems)}")
    return cache.entry(stage, key)


def _unpack_tree(chunks: Iterable[bytes], dest: Path, log: Log) -> None:
    """Extract a tree's tar+zstd as it streams, owners and modes as packed."""
    dest.mkdir()
    argv = ["tar", "--extract", "--file=-", "--directory", dest, "--numeric-owner", "--same-owner",
            "--preserve-permissions", "--xattrs", "--xattrs-include=*", "--acls",
            "--use-compress-program=zstd -q -d"]
    # A Corrupt from the chunks (bad digest) propagates out of piped, which
    # kills tar; the publish block then removes what it extracted.
    with piped(argv, log, write=True) as stream:
        for chunk in chunks:
            stream.write(chunk)


@contextmanager
def file_chunks(path: Path) -> Iterator[Iterator[bytes]]:
    """An open_blob helper: a file's bytes in chunks."""
    with open(path, "rb") as f:
        yield iter(lambda: f.read(CHUNK), b"")
