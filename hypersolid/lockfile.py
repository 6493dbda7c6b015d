"""Package lock files: the exact .debs a tree was (or is to be) made of.

    # hypersolid package lock: <target> <arch>
    # package<TAB>version<TAB>architecture<TAB>sha256<TAB>filename<TAB>source
    base-files<TAB>12.4+deb12u5<TAB>amd64<TAB><sha256><TAB>pool/main/b/...deb<TAB>http://deb.debian.org/debian

UTF-8 text; `#` lines are comments (the first two are written by `write`);
one line per package, sorted, six tab-separated fields.  `filename` is the
pool path as the Packages index gives it, `source` the archive URL it came
from, so a lock names each .deb completely (URL = source/filename) and
the sha256 proves it.  A seventh field, `top`, marks the packages nothing
else in the set depends on (layers.py): the configure stage installs them
onto the configured base.  A lock without it (older ones) is built flat.
The configure stage writes the whole set into its cache entry
(packages.lock), bootfiles copies it to dist/<t>/packages-<arch>.lock, and
a target's `lock:` setting pins a build to one.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .cache import temp_name

HEADER = "# package\tversion\tarchitecture\tsha256\tfilename\tsource\t[top]"
FIELDS = ("package", "version", "architecture", "sha256", "filename", "source")
TOP = "top"
SHA256 = re.compile(r"[0-9a-f]{64}")
NAME = re.compile(r"[a-z0-9][a-z0-9+.-]*")
VERSION = re.compile(r"[A-Za-z0-9.+~:-]+")


class LockError(Exception):
    """A bad lock file: `FILE:LINE: what is wrong` (like config.ConfigError)."""

    def __init__(self, file: Path | str, line: int, message: str):
        self.file, self.line, self.message = Path(file), line, message
        super().__init__(f"{file}:{line}: {message}")


@dataclass(frozen=True, order=True)
class LockEntry:
    package: str
    version: str
    architecture: str
    sha256: str
    filename: str
    source: str
    layer: str = ""  # TOP: installed onto the configured base (layers.py)

    @property
    def url(self) -> str:
        return f"{self.source.rstrip('/')}/{self.filename}"

    @property
    def top(self) -> bool:
        return self.layer == TOP

    def line(self) -> str:
        return "\t".join([*(getattr(self, f) for f in FIELDS), *([self.layer] if self.layer else [])])


def dumps(entries: Iterable[LockEntry], target: str = "", arch: str = "") -> str:
    title = f"# hypersolid package lock: {target} {arch}".rstrip()
    return "\n".join([title, HEADER, *(e.line() for e in sorted(set(entries)))]) + "\n"


def write(path: Path, entries: Iterable[LockEntry], target: str = "", arch: str = "") -> None:
    """Atomically (temp name + rename), sorted; target/arch go in the title."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        tmp.write_text(dumps(entries, target, arch), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def loads(text: str, name: str | Path = "<lock>") -> list[LockEntry]:
    out: list[LockEntry] = []
    seen: dict[tuple[str, str], int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) not in (len(FIELDS), len(FIELDS) + 1):
            raise LockError(name, n, f"expected {len(FIELDS)} tab-separated fields "
                            f"({' '.join(FIELDS)}) and optionally `{TOP}`, found {len(fields)}")
        if len(fields) > len(FIELDS) and fields[-1] != TOP:
            raise LockError(name, n, f"field 7: {fields[-1]!r} is not `{TOP}` (the only mark a package can have)")
        e = LockEntry(*fields)
        for field, pattern in (("package", NAME), ("version", VERSION), ("architecture", NAME)):
            if not pattern.fullmatch(getattr(e, field)):
                raise LockError(name, n, f"{field}: {getattr(e, field)!r} is not a valid Debian {field}")
        if not SHA256.fullmatch(e.sha256):
            raise LockError(name, n, f"sha256: {e.sha256!r} is not 64 lower-case hex digits")
        if not e.filename.endswith(".deb") or e.filename.startswith("/") or ".." in e.filename.split("/"):
            raise LockError(name, n, f"filename: {e.filename!r} is not a relative pool path of a .deb")
        if not re.fullmatch(r"(https?|file)://\S+", e.source):
            raise LockError(name, n, f"source: {e.source!r} is not an archive URL")
        k = (e.package, e.architecture)
        if k in seen:
            raise LockError(name, n, f"{e.package}:{e.architecture} is locked twice (line {seen[k]} too)")
        seen[k] = n
        out.append(e)
    return sorted(out)


def read(path: Path) -> list[LockEntry]:
    """The entries of a lock file, sorted; LockError on any bad line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LockError(path, 1, f"not UTF-8 text ({err.reason})") from None
    except OSError as err:
        raise LockError(path, 0, f"cannot read: {err.strerror}") from None
    return loads(text, path)
