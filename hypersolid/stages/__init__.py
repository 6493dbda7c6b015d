"""The stage contract and the one routine that runs any stage.

A stage declares what it depends on (the target fields it reads, other
computed inputs, input files, upstream stages) and how to build its output
into an empty directory.  `execute` turns that into a key, reuses the cache
entry when there is one, and otherwise builds, publishes atomically and
records the key in a small key file, which is what doit tasks depend on
downstream: a stage that re-runs and yields the same key leaves everything
after it alone.

The target fields in a key are the fields the build can see: the build gets
a `TargetView` that refuses any other field, so a setting cannot be used
without being part of the key (a stale cache hit is impossible by
construction, not by care).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .. import buildid
from ..cache import Cache, digest_file, digest_json
from ..config import Project, Target
from ..entry import checked, discard, remember, warn
from ..run import BuildError, Log, isolated, tail_of


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

    def recorded_key(self, stage: str) -> str:
        key_file = self.key_file(stage)
        try:
            return key_file.read_text().strip()
        except FileNotFoundError:
            raise BuildError(stage, f"{key_file} is missing: run `doit {stage}:{self.target.name}` first") from None

    def output(self, stage: str, item: str | None = None) -> Path:
        """The cache entry an upstream stage last produced for this unit (or
        the item of it, when a build reads just one small file), verified
        against its manifest's record once per process (entry.py).  Not in
        the local cache: fetched from the remote cache (a file item alone,
        so bootstrap's epoch does not bring its tree along), else built here
        again (the remote's copy was bad, or the remote went away)."""
        key = self.recorded_key(stage)
        entry = self.cache.lookup(stage, key)
        remote = remote_cache()
        if entry is None:
            if remote is None:  # the task's entry check makes doit rebuild it first; this is a race
                raise BuildError(stage, f"cache entry {key} is gone from {self.cache.root} "
                                 "(removed while this build ran?); build again")
            if item is not None:
                path = remote.fetch_file(self.cache, stage, key, item)
                if path is not None:
                    return path  # checked against the entry's record, which hashes to the key
            entry = remote.fetch(self.cache, stage, key) or self._rebuild(stage, key, item)
        problems = checked(stage, key, entry, item)
        if problems:
            # Never let a damaged entry into an image or dist/: drop it and
            # fetch it again, else build it here with the inputs its key file recorded.
            warn(f"cache entry {stage}/{key} is corrupt ({'; '.join(problems)}): removed, "
                 f"{'fetching or ' if remote else ''}rebuilding it")
            discard(self.cache, stage, key)
            entry = (remote.fetch(self.cache, stage, key) if remote else None) or self._rebuild(stage, key, item)
            still = checked(stage, key, entry, item)
            if still:
                raise BuildError(stage, f"cache entry {stage}/{key} was corrupt and is again after its rebuild "
                                 f"({'; '.join(still)}); build again")
        return entry if item is None else entry / item

    def _rebuild(self, stage: str, key: str, item: str | None) -> Path:
        """Build stage/key here again (never a remote hit: that copy failed)."""
        remote = remote_cache()
        if remote is not None:
            remote.forget(stage, key)
        owner = self if STAGES[stage].per_arch or self.arch is None else self.without_arch()
        rebuilt = execute(stage, dataclasses.replace(owner, target=real_target(owner.target)))["key"]
        if rebuilt != key:  # its inputs changed since this build planned on its key
            raise BuildError(stage, f"cache entry {stage}/{key} was corrupt or could not be fetched; rebuilt "
                             f"from the current inputs it is {stage}/{rebuilt}: build again")
        entry = self.cache.lookup(stage, key)
        if entry is None:
            raise BuildError(stage, f"cache entry {stage}/{key} is gone after its rebuild; build again")
        return entry

    def has_entry(self, stage: str) -> bool:
        """Whether the entry the stage last recorded is still in the cache,
        or in the remote cache (asked only when the local one lacks it)."""
        try:
            key = self.key_file(stage).read_text().strip()
        except OSError:
            return False
        if self.cache.lookup(stage, key) is not None:
            return True
        remote = remote_cache()
        return remote is not None and remote.has(stage, key)


def remote_cache():
    """The configured remote cache (remote.py), or None."""
    from .. import remote
    return remote.get()


# What every stage may read of a target without declaring it: which target
# this is (name, files, layers, its hooks and architectures) and the shape
# of the graph (whether there is a kernel), which the upstream keys carry.
IDENTITY = frozenset({"name", "file", "layers", "architectures", "hook_files", "has_kernel"})


class UndeclaredSetting(BuildError):
    """A stage's build read a target field its key does not include."""


class TargetView:
    """A target as one stage's build sees it: its declared fields only."""

    def __init__(self, target: Target, stage: "Stage", arch: str | None):
        self._target, self._stage, self._arch = target, stage, arch
        self._allowed = IDENTITY | set(stage.reads) | set(stage.uses)

    def __getattr__(self, name: str):
        if name not in self._allowed:
            raise UndeclaredSetting(self._stage.name, f"the build read target.{name}, which is not in the stage's "
                                    f"key: add it to {type(self._stage).__name__}.reads (or .uses if it cannot "
                                    "change the output)")
        value = getattr(self._target, name)
        if name == "sections" and self._arch:
            # One architecture's view: another's arch_packages are not this unit's input.
            value = tuple(dataclasses.replace(s, arch_packages=tuple(p for p in s.arch_packages if p[0] == self._arch))
                          for s in value)
        return value


def real_target(target) -> Target:
    """The target behind a view: for the engine's own work (planned keys are
    digests of every stage's declared inputs), never for a stage's build."""
    return target._target if isinstance(target, TargetView) else target


def view(stage: "Stage", unit: "Unit") -> "Unit":
    """The unit as the stage's build sees it."""
    return dataclasses.replace(unit, target=TargetView(real_target(unit.target), stage, unit.arch))


def _plain(value):
    """A target field as JSON-able data (dataclasses and tuples to dicts and lists)."""
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class Stage:
    """Subclasses set name/upstream/per_arch/reads and implement the methods."""

    name = ""
    upstream: tuple[str, ...] = ()
    per_arch = True
    doc = ""
    # Target fields the build reads: each is in the key.
    reads: tuple[str, ...] = ()
    # Target fields the build uses that cannot change its output (a proxy,
    # a time limit): readable, but not in the key.
    uses: tuple[str, ...] = ()
    # Other modules whose code shapes this stage's output (part of its key).
    helpers: tuple[str, ...] = ()
    # False: the stage writes its own outputs (dist/), nothing goes to the cache.
    cached = True
    # True: build() runs in a forked child in a private mount namespace
    # (it mounts; see mounts.py).
    isolated = False

    def applies(self, unit: Unit) -> bool:
        """Whether this unit has this stage at all (no kernel: no initramfs)."""
        return True

    def upstream_of(self, unit: Unit) -> tuple[str, ...]:
        return self.upstream

    def outputs(self, unit: Unit) -> list[Path]:
        """Files an uncached stage writes (doit targets: deleting one re-runs it)."""
        return []

    def settings(self, unit: Unit) -> dict:
        """The non-file inputs: the declared target fields, exactly as the
        build sees them, and `computed`."""
        seen = view(self, unit).target
        return {**{f: _plain(getattr(seen, f)) for f in self.reads}, **self.computed(unit)}

    def computed(self, unit: Unit) -> dict:
        """Inputs that are not target fields (JSON-able): the architecture,
        tool versions, generated scripts, an overlay's listing."""
        return {}

    def input_files(self, unit: Unit) -> dict[str, Path]:
        """Input files by a stable name (path relative to the project)."""
        return {}

    def watched(self, unit: Unit) -> list[Path]:
        """Files doit must watch besides input_files, whose content enters
        the key through `computed` (bootstrap: the lock, by its entries)."""
        return []

    def fresh(self, unit: Unit) -> list:
        """Extra doit uptodate checks (all must hold for the task to be
        skipped), e.g. resolve's age limit."""
        return []

    def build(self, unit: Unit, out: Path, log: Log) -> None:
        raise NotImplementedError

    def reused(self, unit: Unit, manifest: dict) -> None:
        """Called when the entry is found instead of built (here or in the
        remote cache): a stage whose build stands on a memo records it here
        too, as its build does."""

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
    unit = dataclasses.replace(unit, target=real_target(unit.target))
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


def build_id(project: Project, target, cache: Cache) -> str:
    """HYPERSOLID_UUID, else a UUID-shaped digest of what will boot: the
    planned keys of squashfs and initramfs on every architecture, so an
    unchanged build keeps its id and any change to what boots gets a new
    one (see buildid.py)."""
    value = buildid.given()
    if value:
        return value
    target = real_target(target)
    parts = []
    for arch in target.architectures:
        keys = planned_keys(Unit(project, target, arch, cache))
        parts.append([arch, keys["squashfs"], keys.get("initramfs")])
    return str(uuid.UUID(hex=digest_json(parts)))


def _file_identity(path: Path) -> list:
    st = os.lstat(path)
    if os.path.islink(path):
        return ["link", os.readlink(path)]
    return [oct(st.st_mode & 0o777), digest_file(path)]


def _build(stage: Stage, unit: Unit, out: Path | None, log: Log) -> None:
    """stage.build with its declared view of the target, in a private mount
    namespace if the stage is isolated; a full disk is one line naming the
    place and its free space."""
    viewed = view(stage, unit)
    try:
        if stage.isolated:
            isolated(stage.build, viewed, out, log)
        else:
            stage.build(viewed, out, log)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise log.fail(no_space(err.filename or out or unit.dist_dir)) from None
    except BuildError as err:
        tail = "\n".join(tail_of(err.log, 40)) if err.log else ""
        # the kernel's words, or apt's when it checks before downloading (multistrap's download step)
        full = "No space left on device" in tail or "You don't have enough free space in" in tail
        if full and "no space" not in err.message:
            raise type(err)(err.stage, f"{err.message}; {no_space(out or unit.dist_dir)}", err.command,
                            err.log) from None
        raise


def no_space(path) -> str:
    """'no space left on device: /x (12.3 MB free)'."""
    place = Path(path)
    while not place.exists() and place != place.parent:
        place = place.parent
    free = shutil.disk_usage(place).free
    return f"no space left on device writing {path} ({free / 1e6:.1f} MB free there)"


def execute(stage_name: str, unit: Unit) -> dict:
    """Bring one stage of one unit up to date; doit's python-action."""
    stage = STAGES[stage_name]
    log = Log(unit.log_path(stage_name), f"{stage_name}:{unit.target.name}" + (f"/{unit.arch}" if unit.arch else ""))
    manifest = stage.manifest(unit)
    key = digest_json(manifest)
    log.note(f"# key {key}")
    key_file = unit.key_file(stage_name)
    hit = unit.cache.lookup(stage_name, key) if stage.cached else None
    remote = remote_cache() if stage.cached else None
    start = time.monotonic()
    if not stage.cached:
        _log_why(log, key_file.with_suffix(".manifest.json"), manifest)
        _build(stage, unit, None, log)  # writes its outputs itself, each atomically
        log.note(f"# built in {time.monotonic() - start:.1f}s")
    elif hit is None and remote is not None and remote.has(stage_name, key):
        # Fetched later, by a stage that runs and needs the contents (Unit.output).
        log.note(f"# remote cache hit: {remote.config.url} {stage_name}:{key}")
        hit = "remote"
    elif hit is None:
        _log_why(log, key_file.with_suffix(".manifest.json"), manifest)
        if stage.isolated:  # checked here, so the forked build inherits the memo
            for upstream in stage.upstream_of(unit):
                unit.output(upstream)
        with unit.cache.publish(stage_name, key, manifest) as out:
            _build(stage, unit, out, log)
        remember(stage_name, key)
        log.note(f"# built in {time.monotonic() - start:.1f}s, published as {unit.cache.entry(stage_name, key)}")
    else:
        log.note(f"# cache hit: {hit}")
    if hit is not None:
        stage.reused(unit, manifest)
    if remote is not None and hit != "remote" and remote.push(unit.cache, stage_name, key):
        log.note(f"# pushed to {remote.config.url}")
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
    from . import bootfiles, bootstrap, configure, initramfs, resolve, rootfs, sbom, squashfs  # noqa: F401  (register themselves)
    from . import disk  # noqa: F401  (after bootfiles: it reads dist/)


_load_all()
