"""doit task generators: one task per stage, one subtask per target (and
architecture).  Stages are chained through key files (file_dep), so a stage
re-runs only when its own inputs changed, and settings enter through
settings_changed.  dodo.py re-exports what is here."""
from __future__ import annotations

import errno
import multiprocessing
import multiprocessing.util
import os
import sys
from functools import lru_cache
from pathlib import Path

from doit.exceptions import InvalidDodoFile, TaskError, TaskFailed
from doit.tools import config_changed

from . import buildid, entry, lock, remote
from .cache import Cache, CacheError, digest_json
from .checker import XxhashChecker
from .config import Project, Target
from .report import BAD_TARGET, LOG, PROGRESS, TimingReporter, install_excepthook
from .boot import STORAGE_LABEL, machine, storage_disk
from .diskboot import PI_MACHINES, disk_machine
from .qemu import MACHINES
from .run import (BuildError, Log, install_signal_handlers, install_worker_signal_handlers, run,
                  set_build_umask, stage_running)
from .stages import STAGES, Unit, default_cache_dir, execute, no_space

ORDER = ("rootfs", "resolve", "bootstrap", "configure", "squashfs", "initramfs", "sbom", "bootfiles", "disk")
DEP_FILE = "build/doit.sqlite3"


@lru_cache(maxsize=None)
def _project(root: str) -> Project:
    return Project(Path(root))


def _buildable() -> list[Target]:
    """The targets that load; the others are _bad_targets' subtasks."""
    return _project(os.getcwd()).buildable()


def _bad_targets(stage_name: str):
    """A subtask per target that does not load, whose action fails with its
    error line.  Not InvalidDodoFile: one broken target would stop every
    build and `doit list`.  Not left out either: `doit squashfs:bad` would
    then only say it is no task.  The action returns a TaskError, so doit
    exits 2 ("error", not 1 "failed"), the status `hypersolid` gives a bad
    target; a run that does not reach the subtask warns once instead
    (report.warn_bad_targets)."""
    for name, err in _project(os.getcwd()).buildable().errors.items():
        yield {"name": name, "doc": f"bad target: {err}",
               "actions": [(_bad_target, [str(err)])],
               "uptodate": [False], "meta": {BAD_TARGET: str(err)}, "verbosity": 1}


def _bad_target(error: str) -> TaskError:
    return TaskError(f"bad target: {error}")


def subtask_name(target: Target, arch: str | None) -> str:
    """`rpi4` for a single-architecture target, `multi-arm64` otherwise."""
    if arch is None or len(target.architectures) == 1:
        return target.name
    return f"{target.name}-{arch}"


@lru_cache(maxsize=None)
def _cache(root: str) -> Cache:
    """The cache, checked, held shared for this run (no gc removes an entry
    under a running build: lock.share_cache) and swept once of work dirs
    left by killed builds."""
    try:
        cache = Cache(default_cache_dir(_project(root)))
        cache.check()
    except CacheError as err:
        raise InvalidDodoFile(str(err)) from None
    lock.share_cache(cache.root)
    cache.collect_garbage()
    entry.start_run(cache.tmp)  # entries this run publishes are not hashed again by their consumers
    try:
        shared = remote.get()  # a bad HYPERSOLID_REMOTE_CACHE* value: one line at load, not a traceback mid-build
        if shared is not None:
            shared.run_dir = cache.tmp  # its warnings once per run, whatever process meets the failure
    except remote.RemoteConfigError as err:
        raise InvalidDodoFile(str(err)) from None
    return cache


def units(stage_name: str) -> list[Unit]:
    project = _project(os.getcwd())
    cache = _cache(os.getcwd())
    out = []
    for target in _buildable():
        arches = target.architectures if STAGES[stage_name].per_arch else (None,)
        out += [u for u in (Unit(project, target, arch, cache) for arch in arches)
                if STAGES[stage_name].applies(u)]
    return out


class StageFailed(TaskFailed):
    """doit's failure, still carrying the BuildError (the hypersolid command
    turns it into its one-line message and exit code)."""

    def __init__(self, error: BuildError):
        super().__init__(str(error))
        self.error = error

    def __reduce__(self):  # crosses from a doit worker process to the main one
        return (type(self), (self.error,))


def progress_file(unit: Unit, stage_name: str) -> Path:
    """Where the stage's Log.progress writes (report.py shows it)."""
    return unit.log_path(stage_name).with_suffix(".progress")


def run_stage(stage_name: str, unit: Unit):
    """The python-action: a BuildError, or an OSError outside any stage's
    build (the key file or log on a full disk), becomes a clean doit failure."""
    try:
        with stage_running():
            return execute(stage_name, unit)
    except BuildError as err:
        return StageFailed(err)
    except OSError as err:
        where = f"{stage_name}:{subtask_name(unit.target, unit.arch)}"
        message = no_space(err.filename or unit.build_dir) if err.errno == errno.ENOSPC else \
            f"{err.strerror}: {err.filename}"
        return StageFailed(BuildError(where, message))
    finally:
        progress_file(unit, stage_name).unlink(missing_ok=True)


def entry_present(stage_name: str, unit: Unit):
    """uptodate: the entry the stage last recorded is still in the cache (or
    the remote cache: a hit there is not downloaded until a stage that runs
    needs it), so a removed cache (or entry) rebuilds by itself instead of
    doit believing the key file."""
    return lambda: unit.has_entry(stage_name)


class settings_changed(config_changed):
    """doit's config_changed over a stage's static inputs, computed when doit
    checks the task instead of when it loads the graph: bootfiles' settings
    hold the build id, a digest of every input of the target, which `doit
    list` or a build of another target should not pay for."""

    def __init__(self, stage, unit: Unit):
        super().__init__({})
        self.stage, self.unit = stage, unit

    def _calc_digest(self):
        self.config = self.stage.static_inputs(self.unit)
        return super()._calc_digest()


def _tasks(stage_name: str):
    stage = STAGES[stage_name]
    try:
        buildid.given()  # checked at load: one line, not a traceback from inside doit's checks
    except BuildError as err:
        raise InvalidDodoFile(str(err)) from None
    yield {"name": None, "doc": stage.doc}
    for unit in units(stage_name):
        root = unit.project.root
        rel = lambda p: os.path.relpath(p, root)  # noqa: E731 - relative keys keep checkouts movable
        yield {
            "name": subtask_name(unit.target, unit.arch),
            "doc": f"{stage.doc} [{unit.target.name}{'/' + unit.arch if unit.arch else ''}]",
            "actions": [(run_stage, [stage_name, unit])],
            "file_dep": sorted(rel(p) for p in [*stage.input_files(unit).values(), *stage.watched(unit)])
                        + [rel(unit.key_file(s)) for s in stage.upstream_of(unit)],
            "targets": [rel(unit.key_file(stage_name))] + [rel(p) for p in stage.outputs(unit)],
            "uptodate": [settings_changed(stage, unit)] + ([entry_present(stage_name, unit)] if stage.cached else [])
                        + stage.fresh(unit),
            "clean": True,
            "verbosity": 1,
            "meta": {PROGRESS: str(progress_file(unit, stage_name)), LOG: str(unit.log_path(stage_name))},
        }
    yield from _bad_targets(stage_name)


def task_rootfs():
    yield from _tasks("rootfs")


def task_resolve():
    yield from _tasks("resolve")


def task_bootstrap():
    yield from _tasks("bootstrap")


def task_configure():
    yield from _tasks("configure")


def task_squashfs():
    yield from _tasks("squashfs")


def task_initramfs():
    yield from _tasks("initramfs")


def task_sbom():
    yield from _tasks("sbom")


def task_bootfiles():
    yield from _tasks("bootfiles")


def task_disk():
    yield from _tasks("disk")


def boot_vm(unit: Unit, storage: str = "", disk: bool = False):
    """The boot task's action: the target's dist/ files in qemu, on this terminal."""
    log = Log(unit.log_path("boot"), f"boot:{unit.target.name}/{unit.arch}")
    if disk:
        return boot_disk(unit, log)
    if unit.arch not in MACHINES:
        return TaskFailed(f"qemu has no generic machine for {unit.arch}: boot the SD card image with --disk")
    disk = Path(storage) if storage else None
    try:
        if disk is not None and not disk.exists():
            storage_disk(disk, log)
            print(f"hypersolid: created {disk} (empty ext4, label {STORAGE_LABEL}) as persistent storage")
        vm = machine(unit.dist_dir, unit.arch, unit.build_dir / "boot", log, storage=disk,
                     append=" ".join(unit.target.kernel_cmdline))
    except (BuildError, FileNotFoundError) as err:
        return TaskFailed(str(err))
    vm.extra += ["-nic", "user,model=virtio-net-pci"]
    layout = "root= disk" if "root=" in vm.append else "3-file"
    print(f"hypersolid: booting {os.path.relpath(unit.dist_dir)} ({layout}, TCG); Ctrl-A X quits.\n"
          f"  kernel command line: {vm.append}", flush=True)
    status = run(vm.command(interactive=True), log, console="terminal", check=False).returncode
    if status != 0:
        return TaskFailed(f"qemu exited with status {status} (log: {log.path})")
    return None


def _disk_current(unit: Unit) -> bool:
    """Whether dist/ holds the disk image of the current inputs (its key file
    matches and its outputs exist): what doit would check for disk:T."""
    stage = STAGES["disk"]
    try:
        recorded = unit.key_file("disk").read_text().strip()
    except OSError:
        return False
    return recorded == digest_json(stage.manifest(unit)) and all(p.exists() for p in stage.outputs(unit))


def boot_disk(unit: Unit, log: Log):
    """`boot:<target> --disk`: the disk image as a board's firmware boots it.
    The image is made here when it is missing or stale, not as a task_dep of
    every boot: doit cannot make a dependency depend on an option, and the
    3-file boot should not wait for (or fill dist/ with) a disk image."""
    if not STAGES["disk"].applies(unit):
        return TaskFailed(f"{unit.target.name} has no disk image (needs a kernel, image: img or both)")
    if not _disk_current(unit):
        failed = run_stage("disk", unit)
        if isinstance(failed, TaskFailed):
            return failed
    try:
        vm = disk_machine(unit.dist_dir, unit.target, unit.arch, unit.build_dir / "boot", log)
    except (BuildError, FileNotFoundError) as err:
        return TaskFailed(str(err))
    print(f"hypersolid: booting {os.path.relpath(unit.dist_dir)}/disk-{unit.arch}.img (TCG); Ctrl-A X quits.",
          flush=True)
    status = run(vm.command(interactive=True), log, console="terminal", check=False).returncode
    return TaskFailed(f"qemu exited with status {status} (log: {log.path})") if status else None


def task_boot():
    """Not a default task: `doit boot:<target> [--storage disk.ext4]`."""
    yield {"name": None, "doc": "boot dist/<target>/ in qemu-system (TCG, serial console)"}
    for unit in units("initramfs"):
        pi_model = any(d in PI_MACHINES for d in unit.target.rpi_dtbs)
        if unit.arch not in MACHINES and not pi_model:  # no qemu machine for it here (armel/armhf)
            continue
        name = subtask_name(unit.target, unit.arch)
        yield {
            "name": name,
            "doc": f"boot {unit.target.name}/{unit.arch} in qemu; --storage FILE adds a "
                   "persistent-storage disk (created if missing)",
            "actions": [(boot_vm, [unit])],
            "task_dep": [f"bootfiles:{name}"],
            "params": [{"name": "storage", "long": "storage", "short": "s", "default": "",
                        "help": "ext4 disk image used as pstorage= (created empty if missing)"},
                       {"name": "disk", "long": "disk", "type": bool, "default": False,
                        "help": "boot dist/<target>/disk-<arch>.img through its firmware instead"}],
            "uptodate": [False],
            "verbosity": 2,
        }


JOBS_ENV = "HYPERSOLID_JOBS"


def jobs(argv: list[str]) -> int:
    """How many stages run at once: HYPERSOLID_JOBS, else the CPUs (2 to 4).
    The stages of one target are mostly a chain; what runs side by side is
    squashfs with initramfs (and sbom), and the architectures of a
    multi-arch target.  A run that boots is serial: qemu needs the
    terminal's stdin, which doit's worker processes do not get."""
    if any(a.split(":", 1)[0] == "boot" for a in argv if not a.startswith("-")):
        return 1
    value = os.environ.get(JOBS_ENV, "")
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise InvalidDodoFile(f"{JOBS_ENV}={value!r}: not a number of jobs") from None
    return max(2, min(4, os.cpu_count() or 1))


class _Workers:
    """multiprocessing keeps after-fork hooks by weak reference to an object."""


_WORKERS = _Workers()


def parallel(count: int) -> dict:
    """doit's options for `count` jobs: worker processes, not threads (a
    stage forks isolated children and starts commands with preexec_fn,
    neither safe beside other threads); 1 job is doit's in-process runner."""
    if count <= 1:
        return {"num_process": 0}
    if multiprocessing.get_start_method(allow_none=True) is None:
        multiprocessing.set_start_method("fork")  # doit's workers use the tasks already loaded
    parent = os.getpid()
    multiprocessing.util.register_after_fork(_WORKERS, lambda _: install_worker_signal_handlers(parent))
    return {"num_process": count, "par_type": "process"}


def doit_config(default_target: str) -> dict:
    """DOIT_CONFIG for dodo.py.  Also makes this process a hypersolid build:
    stop signals become one clean interruption (exit 128+N, one line), a
    run that writes doit's database takes the checkout's lock first, and
    independent stages run side by side (jobs)."""
    Path("build").mkdir(exist_ok=True)  # doit needs the database's directory
    install_signal_handlers()
    set_build_umask()
    install_excepthook()
    if lock.writes_database(sys.argv[1:]):
        try:
            lock.acquire(Path("build"))
        except lock.Busy as err:
            print(f"hypersolid: {err}", file=sys.stderr)
            sys.exit(1)
    return {
        "dep_file": DEP_FILE,
        "backend": "sqlite3",
        "check_file_uptodate": XxhashChecker,
        "reporter": TimingReporter,
        "default_tasks": [f"bootfiles:{default_target}"],
        "subtasks": True,  # `doit list` shows one line per target
        **parallel(jobs(sys.argv[1:])),
    }
