"""resolve: what the mirror serves now for the target's package set.

An uncached stage: it writes build/<t>/<arch>/resolved.lock (see
lockfile.py), and only when its content changes, so the bootstrap, which
has that file among its inputs (and so its digest in its key), re-runs
exactly when the mirror's answer changed.  doit runs it when the last
resolution (resolved.time) is older than index_max_age, with `hypersolid
build --refresh`, or when the sources changed; within that window a no-op
build asks no mirror.  A target with `lock:` has no resolve task.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .. import lockfile
from .. import resolve as apt
from ..config import Target
from ..dpkg import host_version
from ..run import BuildError, Log
from . import Stage, Unit, real_target, register

KEYRING = "debian-archive-keyring"
RESOLVED = "resolved.lock"  # in build/<t>/<arch>/: this stage's output
RESOLVED_TIME = "resolved.time"  # when it last asked the mirror (Unix time)


def sections_for(target: Target, arch: str) -> list[dict]:
    """The target's sections for one architecture, plus the security archive
    (unless the target defines a section named `security` itself)."""
    out = [{"name": s.name, "packages": list(s.packages_for(arch)), "suite": s.suite,
            "components": list(s.components), "source": s.source, "recommends": s.recommends}
           for s in target.sections]
    if target.security_mirror and not any(s.name == "security" for s in target.sections):
        components = list(dict.fromkeys(c for s in target.sections if s.source == target.mirror
                                        for c in s.components)) or ["main"]
        out.append({"name": "security", "packages": [], "suite": f"{target.suite}-security",
                    "components": components, "source": target.security_mirror, "recommends": False})
    return out


def source_urls(target: Target, arch: str) -> list[str]:
    """The archive URLs the target's apt fetches from: all DebProxy forwards to."""
    return list(dict.fromkeys([target.mirror, *(s["source"] for s in sections_for(target, arch))]))


@register
class Resolve(Stage):
    """See the module docstring."""

    name = "resolve"
    cached = False
    doc = "the exact package versions the mirror serves now (apt), at most once per index_max_age"
    reads = ("suite", "mirror", "security_mirror", "sections", "apt_keyring")
    uses = ("apt_proxy", "index_max_age", "lock")
    helpers = ("hypersolid.resolve", "hypersolid.layers", "hypersolid.lockfile")

    def applies(self, unit: Unit) -> bool:
        return unit.arch is not None and real_target(unit.target).lock is None

    def computed(self, unit: Unit) -> dict:
        return {"arch": unit.arch, "apt": host_version("apt")}

    def outputs(self, unit: Unit) -> list[Path]:
        return [unit.build_dir / RESOLVED]

    def fresh(self, unit: Unit) -> list:
        """doit uptodate: the last resolution is young enough."""
        stamp, target = unit.build_dir / RESOLVED_TIME, real_target(unit.target)

        def check() -> bool:
            try:
                return apt.is_fresh(stamp, apt.max_age(target))
            except BuildError:
                return False  # a bad HYPERSOLID_INDEX_MAX_AGE: the build says so in one line
        return [check]

    def build(self, unit: Unit, out: None, log: Log) -> None:
        dest, stamp = unit.build_dir / RESOLVED, unit.build_dir / RESOLVED_TIME
        apt.max_age(unit.target)  # a bad HYPERSOLID_INDEX_MAX_AGE is this stage's error line
        started = time.time()
        try:
            entries = resolve_now(unit, log)
        except BuildError as err:
            if not dest.exists() or os.environ.get(apt.REFRESH_ENV):
                raise
            try:
                asked = float(stamp.read_text())
            except (OSError, ValueError):
                asked = dest.stat().st_mtime
            made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(asked))
            print(f"hypersolid: warning: {unit.target.name}/{unit.arch}: cannot check the mirror ({err.message}); "
                  f"building with the last resolution ({made})", file=sys.stderr)
            return
        text = lockfile.dumps(entries, unit.target.name, unit.arch)
        if not dest.exists() or dest.read_text() != text:
            log.note(f"# the mirror's answer changed: writing {dest}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            lockfile.write(dest, entries, unit.target.name, unit.arch)
        stamp.write_text(f"{started:.0f}\n")


def resolve_now(unit: Unit, log: Log) -> list[lockfile.LockEntry]:
    """A fresh resolution of the unit's package set against the mirror."""
    target = unit.target
    sections = sections_for(target, unit.arch)
    names = [*(p for s in sections for p in s["packages"]), KEYRING]
    return apt.resolve(unit.cache.root, sections, names, unit.arch, apt.keyring_of(target), target.apt_proxy, log)
