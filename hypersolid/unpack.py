"""Unpack downloaded .debs into a tree exactly as multistrap's unpack does.

multistrap (unpack=true) spends most of a bootstrap in forks, not in
unpacking: for each .deb it runs `dpkg -f` seven times, `dpkg -X`,
`dpkg -e`, mktemp, an md5sum pipeline per conffile and rm (measured on
qemu-amd64, 159 packages: 6.5 s "calculating obsolete packages" and about
0.08 s per package before any data is written, in 35 s).  This module runs
the same two commands that write the tree, `dpkg-deb -X` and `dpkg-deb -e`,
in the same order (sorted archive file names), and writes the same dpkg
database: the `-X` listing as info/<pkg>.list, the control scripts as
info/<pkg>.<name>, the control stanza with `Status: install ok unpacked` and
the conffiles' MD5 sums (taken right after the package's own unpack, as
multistrap does) appended to status and available.  Only the data
extraction stays sequential (a later package's file or directory
metadata wins, as with multistrap); the control parts, which land in
per-package names, are extracted in parallel beforehand.

multistrap still resolves the set and downloads it (unpack=false); see
docs/build-graph.md, "Performance".
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .run import Log, run

ARCHIVES = "var/cache/apt/archives"
DPKG = "var/lib/dpkg"


def list_lines(listing: bytes) -> bytes:
    """`dpkg-deb -X`'s listing as multistrap writes it to info/<pkg>.list:
    no leading '.', the root as '/.', no trailing '/'."""
    out = []
    for line in listing.decode("utf-8", "surrogateescape").split("\n"):
        if not line:
            continue
        if line.startswith("."):
            line = line[1:]
        if line == "/":
            line = "/."
        elif line.endswith("/"):
            line = line[:-1]
        out.append(line + "\n")
    return "".join(out).encode("utf-8", "surrogateescape")


def control_fields(text: bytes) -> dict[str, str]:
    """The top-level fields of a control file (continuation lines skipped)."""
    fields = {}
    for line in text.decode("utf-8", "replace").splitlines():
        if line and not line[0].isspace() and ":" in line:
            name, value = line.split(":", 1)
            fields[name.strip()] = value.strip()
    return fields


def conffile_md5(tree: Path, line: str) -> str:
    """What multistrap's `md5sum ./$line | cut -d" " -f1` gives: the sum of
    each word of the line that names a readable file, one per line (a
    missing conffile gives '')."""
    sums = []
    for word in line.split():
        path = tree / word.lstrip("/") if word.startswith("/") else tree / word
        try:
            with open(path, "rb") as f:
                sums.append(hashlib.file_digest(f, "md5").hexdigest())
        except OSError:
            continue
    return "\n".join(sums)


def unpack(tree: Path, log: Log, jobs: int | None = None) -> list[str]:
    """Unpack every .deb in tree/var/cache/apt/archives into tree; returns
    the package names in unpack order.  The .debs are removed afterwards
    (multistrap's cleanup)."""
    tree = Path(tree)
    archives = sorted(p.name for p in (tree / ARCHIVES).iterdir() if p.name.endswith(".deb"))
    info = tree / DPKG / "info"
    info.mkdir(parents=True, exist_ok=True)
    # beside the tree (same file system, for the renames), not in it
    staging = Path(tempfile.mkdtemp(prefix=".control.", dir=tree.parent))

    def control(index: int) -> Path:
        dest = staging / str(index)
        run(["dpkg-deb", "-e", tree / ARCHIVES / archives[index], dest], log, contain=False)
        return dest

    names: list[str] = []
    seen: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2)
    try:
        controls = [pool.submit(control, i) for i in range(len(archives))]
        for index, deb in enumerate(archives):
            (tree / "tmp").mkdir(exist_ok=True)  # multistrap's mkdir -p ./tmp, once per package
            log.note(f"I: Extracting {deb}")  # multistrap's line; the progress counts them (bootstrap)
            listing = run(["dpkg-deb", "-X", tree / ARCHIVES / deb, tree], log, contain=False,
                          capture=True).stdout
            parts = controls[index].result()
            stanza = (parts / "control").read_bytes()
            pkg = control_fields(stanza).get("Package", "")
            if not pkg:
                raise log.fail(f"{deb} has no Package field")
            if pkg in seen:
                raise log.fail(f"two archives of {pkg}: {seen[pkg]} and {deb}")
            seen[pkg] = deb
            with open(info / f"{pkg}.list", "ab") as f:
                f.write(list_lines(listing))
            for part in sorted(os.listdir(parts)):
                if part != "control" and "." not in part:
                    os.replace(parts / part, info / f"{pkg}.{part}")
            kept = b"".join(ln for ln in stanza.splitlines(keepends=True) if ln != b"\n")
            with open(tree / DPKG / "available", "ab") as f:
                f.write(kept + b"\n")
            record = kept + b"Status: install ok unpacked\n"
            conffiles = info / f"{pkg}.conffiles"
            if conffiles.is_file():
                record += b"Conffiles:\n"
                for line in conffiles.read_text().splitlines():
                    record += f" {line} {conffile_md5(tree, line)}\n".encode()
            with open(tree / DPKG / "status", "ab") as f:
                f.write(record + b"\n")
            guard_lib64(tree)
            names.append(pkg)
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C or a failure: no more extractions
        shutil.rmtree(staging, ignore_errors=True)
    (tree / "usr/share/man/man1").mkdir(parents=True, exist_ok=True)
    # multistrap tidies apt's lists, caches and its sources list after
    # unpacking (here it did so before), and removed a mktemp directory in
    # tmp after each package: those directories' mtimes are the build's,
    # as they were, not a package's stamp.
    for touched in ("tmp", "var/lib/apt/lists", "var/cache/apt", "etc/apt/sources.list.d"):
        if (tree / touched).is_dir():
            os.utime(tree / touched)
    for deb in archives:
        (tree / ARCHIVES / deb).unlink()
    return names


def unpack_more(tree: Path, debs: list[Path], log: Log) -> list[str]:
    """Unpack these .debs into an unpacked tree as the bootstrap would have
    (copies into its archives first: `unpack` removes them afterwards)."""
    archives = Path(tree) / ARCHIVES
    archives.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        shutil.copyfile(deb, archives / Path(deb).name)
    return unpack(tree, log)


def guard_lib64(tree: Path) -> None:
    """multistrap's guard against libc6's absolute lib64 link: a lib64 that
    is neither a directory nor a link becomes `lib64 -> ./lib`, a link to
    /lib is removed."""
    lib64 = tree / "lib64"
    if lib64.is_file():  # perl's -f: a link to a file too
        lib64.unlink()
    if lib64.is_symlink():
        if os.readlink(lib64) == "/lib":
            lib64.unlink()
    elif not lib64.is_dir():
        os.symlink("./lib", lib64)
