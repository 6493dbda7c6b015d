"""SOURCE_DATE_EPOCH: the one time a build stamps into its outputs.

Two builds of the same packages must give the same bytes, so the time in
mtimes, squashfs and cpio headers and the tools' own stamps comes from the
inputs, never from the clock: the newest date among the installed
packages' changelogs (the first entry's trailer, ` -- Name <mail>  Date`),
or the target's `source_date_epoch:` setting.

bootstrap computes it once, after multistrap, into `source-date-epoch` of
its cache entry (so the target setting is in the bootstrap key, and through
it in every later key); later stages read it back with
`source_date_epoch(unit)` and export it to every tool, hook and maintainer
script they run (`env`).
"""
from __future__ import annotations

import gzip
import os
import re
import stat
import zlib
from email.utils import parsedate_to_datetime
from pathlib import Path

FILE = "source-date-epoch"
VAR = "SOURCE_DATE_EPOCH"
DOC_DIR = "usr/share/doc"
# The first entry's trailer is near the top; a changelog is not read whole.
READ_LIMIT = 256 << 10
TRAILER = re.compile(rb"^ -- .*?>  (.+?)\s*$", re.M)


def changelog_date(path: Path) -> int | None:
    """The date of the first entry of a gzipped Debian changelog, or None
    (missing, a symlink, not gzip, no trailer, an unparseable date)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with gzip.open(os.fdopen(fd, "rb", closefd=False)) as f:
            head = f.read(READ_LIMIT)
    except (OSError, EOFError, zlib.error):
        return None
    finally:
        os.close(fd)
    match = TRAILER.search(head)
    if match is None:
        return None
    try:
        return int(parsedate_to_datetime(match.group(1).decode("ascii", "replace")).timestamp())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def from_tree(tree: Path) -> int:
    """The newest first-entry date among usr/share/doc/*/changelog.Debian.gz
    (and changelog.Debian.<arch>.gz, a binNMU's, which is newer).

    Symlinked doc directories and changelogs are skipped, not followed: they
    point at another package's directory, which is read itself (and an
    absolute link would lead onto the build host).  ValueError if no
    changelog has a date."""
    doc = Path(tree) / DOC_DIR
    dates = []
    if doc.is_dir() and not doc.is_symlink():
        with os.scandir(doc) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    dates += [d for d in map(changelog_date, _changelogs(Path(entry.path))) if d is not None]
    if not dates:
        raise ValueError(f"no dated changelog in /{DOC_DIR}/*/changelog.Debian.gz of the tree")
    return max(dates)


def _changelogs(directory: Path) -> list[Path]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [directory / n for n in names if n.startswith("changelog.Debian") and n.endswith(".gz")]


def write(unit, tree: Path, out: Path, log) -> int:
    """bootstrap's part: the target's source_date_epoch, else the tree's
    newest changelog date, into out/source-date-epoch."""
    value = unit.target.source_date_epoch
    if value is None:
        try:
            value = from_tree(tree)
        except ValueError as err:
            raise log.fail(f"{err}: set source_date_epoch: in the target") from None
        log.note(f"# {VAR}={value} (newest changelog date of the installed packages)")
    else:
        log.note(f"# {VAR}={value} (the target's source_date_epoch)")
    (out / FILE).write_text(f"{value}\n")
    return value


def source_date_epoch(unit) -> int:
    """This build's epoch, as bootstrap recorded it."""
    return int(unit.output("bootstrap", FILE).read_text())


def env(value: int) -> dict[str, str]:
    """The environment that carries the epoch to a tool, hook or script."""
    return {VAR: str(value)}


def unit_env(unit) -> dict[str, str]:
    return env(source_date_epoch(unit))
