"""`hypersolid lock` and `hypersolid outdated`: a target's package versions
against a fresh resolution of its mirror (stages/resolve.py)."""
from __future__ import annotations

import subprocess
from pathlib import Path

from . import lockfile
from .lockfile import LockEntry
from .run import Log
from .stages import Unit
from .stages.resolve import resolve_now, sections_for


def newer(a: str, b: str) -> bool:
    """Whether Debian version a is newer than b (dpkg's own comparison)."""
    return subprocess.run(["dpkg", "--compare-versions", a, "gt", b]).returncode == 0


def fresh(unit: Unit, what: str) -> list[LockEntry]:
    """What the mirror would install now, whatever the window or the target's lock."""
    log = Log(unit.build_dir / "logs" / f"{what}.log", f"{what}:{unit.target.name}/{unit.arch}")
    return resolve_now(unit, log)


def lock_files(unit: Unit) -> tuple[Path, bool]:
    """The target's lock file for this architecture, and whether target.yaml names it."""
    named = unit.target.lock_file(unit.arch)
    return (named, True) if named else (unit.target.file.parent / f"packages-{unit.arch}.lock", False)


def write_lock(unit: Unit) -> tuple[Path, bool, int, int]:
    """Refresh the unit's lock file: (path, named by target.yaml, packages, changed lines)."""
    entries = fresh(unit, "lock")
    path, named = lock_files(unit)
    try:
        old = set(lockfile.read(path)) if path.exists() else set()
    except lockfile.LockError:
        old = set()
    lockfile.write(path, entries, unit.target.name, unit.arch)
    return path, named, len(entries), len(old ^ set(entries))


def outdated(unit: Unit, last: list[LockEntry]) -> list[tuple[LockEntry, LockEntry, bool]]:
    """(built, newer on the mirror, is a security update) of each package of
    the last build that the mirror now has in a newer version; security first."""
    security = {s["source"].rstrip("/") for s in sections_for(unit.target, unit.arch)
                if s["name"] == "security" or s["suite"].endswith("-security")}
    now = {(e.package, e.architecture): e for e in fresh(unit, "outdated")}
    out = []
    for e in last:
        n = now.get((e.package, e.architecture))
        if n is not None and n.version != e.version and newer(n.version, e.version):
            out.append((e, n, n.source.rstrip("/") in security))
    return sorted(out, key=lambda t: (not t[2], t[0].package))


def last_build_lock(unit: Unit) -> Path | None:
    """The lock of the last build: dist/<t>/packages-<arch>.lock, else (a
    build that stopped before bootfiles) the last configure's cache entry."""
    dist = unit.dist_dir / f"packages-{unit.arch}.lock"
    if dist.exists():
        return dist
    if unit.has_entry("configure"):
        return unit.output("configure", "packages.lock")
    return None

