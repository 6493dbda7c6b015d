"""The stage contract and the one routine that runs any stage.

A stage declares what it depends on (settings, input files, upstream
stages) and how to build its output into an empty directory.  `execute`
turns that into a key, reuses the cache entry when there is one, and
otherwise builds, publishes atomically and records the key in a small key
file, which is what doit tasks depend on downstream: a stage that re-runs
and yields the same key leaves everything after it alone.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..cache import Cache, digest_file, digest_json
from ..config import Project, Target
from ..run import BuildError, Log


def default_cache_dir(project: Project) -> Path:
    return Path(os.environ.get("HYPERSOLID_CACHE") or project.root / "cache")


@dataclass(frozen=True)
class Unit:
    """One target built for one architecture (arch None: arch-independent)."""

    project: Project
    target: Target
    arch: str | None
    cache: Cache

    @property
    def build_dir(self) -> Path:
        d = self.project.root / "build" / self.target.name
        return d / self.arch if self.arch else d

    @property
    def dist_dir(self) -> Path:
        """Where a target's deliverables go; shared by its architectures."""
        return self.project.root / "dist" / self.target.name

    def key_file(self, stage: str) -> Path:
        owner = self if STAGES[stage].per_arch or self.arch is None else self.without_arch()
        return owner.build_dir / f"{stage}.key"

    def log_path(self, stage: str) -> Path:
        return self.build_dir / "logs" / f"{stage}.log"

    def without_arch(self) -> "Unit":
        return Unit(self.project, self.target, None, self.cache)

    def key(self, stage: str) -> str:
        return self.key_file(stage).read_text().strip()

    def output(self, stage: str) -> Path:
        """The cache entry an upstream stage last produced for this unit."""
        key_file = self.key_file(stage)
        try:
            key = key_file.read_text().strip()
        except FileNotFoundError:
            raise BuildError(stage, f"{key_file} is missing: run `doit {stage}:{self.target.name}` first") from None
        entry = self.cache.lookup(stage, key)
        if entry is None:
            raise BuildError(stage, f"cache entry {key} is gone from {self.cache.root} "
                             f"(cache cleaned?); run `doit forget {stage}` and build again")
        return entry


class Stage:
    """Subclasses set name/upstream/per_arch and implement the methods."""

    name = ""
    upstream: tuple[str, ...] = ()
    per_arch = True
    doc = ""
    # Other modules whose code shapes this stage's output (part of its key).
    helpers: tuple[str, ...] = ()
    # False: the stage writes its own outputs (dist/), nothing goes to the cache.
    cached = True

    def applies(self, unit: Unit) -> bool:
        """Whether this unit has this stage at all (no kernel: no initramfs)."""
        return True

    def upstream_of(self, unit: Unit) -> tuple[str, ...]:
        return self.upstream

    def outputs(self, unit: Unit) -> list[Path]:
        """Files an uncached stage writes (doit targets: deleting one re-runs it)."""
        return []

    def settings(self, unit: Unit) -> dict:
        """The non-file inputs (JSON-able), e.g. package lists."""
        return {}

    def input_files(self, unit: Unit) -> dict[str, Path]:
        """Input files by a stable name (path relative to the project)."""
        return {}

    def build(self, unit: Unit, out: Path, log: Log) -> None:
        raise NotImplementedError

    def code_version(self) -> str:
        modules = [type(self).__module__, *self.helpers]
        return digest_json([digest_file(sys.modules[m].__file__) for m in modules])

    def static_inputs(self, unit: Unit) -> dict:
        """What doit's config_changed compares: settings + code version."""
        return {"settings": self.settings(unit), "code": self.code_version()}

    def manifest(self, unit: Unit, upstream_keys: dict[str, str] | None = None) -> dict:
        """What the key is a digest of; upstream keys are read from the key
        files unless given (planned_keys computes them before any build)."""
        keys = upstream_keys if upstream_keys is not None else {s: unit.key(s) for s in self.upstream_of(unit)}
        return {
            "stage": self.name,
            **self.static_inputs(unit),
            "files": {name: _file_identity(path) for name, path in sorted(self.input_files(unit).items())},
            "upstream": {s: keys[s] for s in self.upstream_of(unit)},
        }


def planned_keys(unit: Unit) -> dict[str, str]:
    """The key every cached stage of this unit will have, computed from the
    inputs alone (a key is a digest of inputs and upstream keys, never of
    outputs), so it is known before anything is built."""
    keys: dict[str, str] = {}

    def key(name: str) -> str:
        if name not in keys:
            stage = STAGES[name]
            owner = unit if stage.per_arch else unit.without_arch()
            upstream = {s: key(s) for s in stage.upstream_of(owner)}
            keys[name] = digest_json(stage.manifest(owner, upstream))
        return keys[name]

    for name, stage in STAGES.items():
        if stage.cached and stage.applies(unit if stage.per_arch else unit.without_arch()):
            key(name)
    return keys


def _file_identity(path: Path) -> list:
    st = os.lstat(path)
    if os.path.islink(path):
        return ["link", os.readlink(path)]
    return [oct(st.st_mode & 0o777), digest_file(path)]


def execute(stage_name: str, unit: Unit) -> dict:
    """Bring one stage of one unit up to date; doit's python-action."""
    stage = STAGES[stage_name]
    log = Log(unit.log_path(stage_name), f"{stage_name}:{unit.target.name}" + (f"/{unit.arch}" if unit.arch else ""))
    manifest = stage.manifest(unit)
    key = digest_json(manifest)
    log.note(f"# key {key}")
    key_file = unit.key_file(stage_name)
    hit = unit.cache.lookup(stage_name, key) if stage.cached else None
    start = time.monotonic()
    if not stage.cached:
        _log_why(log, key_file.with_suffix(".manifest.json"), manifest)
        stage.build(unit, None, log)  # writes its outputs itself, each atomically
        log.note(f"# built in {time.monotonic() - start:.1f}s")
    elif hit is None:
        _log_why(log, key_file.with_suffix(".manifest.json"), manifest)
        with unit.cache.publish(stage_name, key, manifest) as out:
            stage.build(unit, out, log)
        log.note(f"# built in {time.monotonic() - start:.1f}s, published as {unit.cache.entry(stage_name, key)}")
    else:
        log.note(f"# cache hit: {hit}")
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.with_suffix(".manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp = key_file.with_name(key_file.name + ".tmp")
    tmp.write_text(key + "\n")
    os.replace(tmp, key_file)  # written last: downstream tasks depend on it
    return {"key": key, "cache_hit": hit is not None}


def _log_why(log: Log, previous: Path, manifest: dict) -> None:
    """Note in the log which inputs differ from the last build of this unit."""
    try:
        old = json.loads(previous.read_text())
    except (OSError, ValueError):
        log.note("# cache miss: no earlier build of this unit")
        return
    changed = [k for k in sorted({*old, *manifest}) if old.get(k) != manifest.get(k)]
    for k in ("settings", "files", "upstream"):
        if k in changed and isinstance(manifest.get(k), dict):
            sub = {**old.get(k, {}), **manifest[k]}
            changed += [f"{k}.{n}" for n in sorted(sub) if old.get(k, {}).get(n) != manifest[k].get(n)]
    log.note(f"# cache miss: changed since last build: {', '.join(changed) or 'nothing (entry was removed)'}")


STAGES: dict[str, Stage] = {}


def register(stage_cls: type[Stage]) -> type[Stage]:
    STAGES[stage_cls.name] = stage_cls()
    return stage_cls


def _load_all() -> None:
    from . import bootfiles, bootstrap, configure, initramfs, rootfs, squashfs  # noqa: F401  (register themselves)


_load_all()
