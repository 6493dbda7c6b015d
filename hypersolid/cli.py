"""The `hypersolid` command: the original tool's verbs over the doit graph.

Every build is a run of the workspace's dodo.py task graph, in this process,
exactly what `doit bootfiles:<target>` does; the command adds what doit has
no word for: target paths, the workspace hooks in .hooks/, a shell in the
configured tree, and cleaning one target.  See docs/cli.md.

Exit status: 0 success, 1 a build stage failed, 2 bad usage or target,
3 a hook failed, 128+N stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from . import __version__, hooks, lock, lockfile, report
from .cache import Cache, remove_tree
from .cachecmd import add_cache_verb, run_cache
from .config import ConfigError, Project, Target
from .container import emulated, ensure_binfmt, run_in
from .mounts import writable_view
from .run import BuildError, HookError, Log, install_signal_handlers, interrupted_status, isolated, run, set_build_umask
from .stages import STAGES, Unit, build_id, default_cache_dir, planned_keys

OK, FAILED, USAGE, HOOK_FAILED = 0, 1, 2, 3


class Failure(Exception):
    """Ends the command: one message, one exit status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


# --- the workspace and its targets ------------------------------------------

def find_workspace(start: Path) -> Path:
    """The nearest directory at or above start with dodo.py and targets/."""
    for d in [start, *start.parents]:
        if (d / "dodo.py").is_file() and (d / "targets").is_dir():
            return d
    raise Failure(f"no hypersolid workspace (dodo.py and targets/) at or above {start}; "
                  "use -C DIR or run from the checkout", USAGE)


def resolve(spec: str, workspace: str | None) -> tuple[Project, Target]:
    """A target given by name (`rpi4`) or by directory (`targets/rpi4/`)."""
    if "/" in spec or spec in (".", ".."):
        try:
            d = Path(spec).resolve()
        except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
            raise Failure(f"{spec}: {err}", USAGE) from None
        if not (d / "target.yaml").is_file():
            raise Failure(f"{spec}: no target.yaml in {d}", USAGE)
        if d.parent.name != "targets" or not (d.parent.parent / "dodo.py").is_file():
            raise Failure(f"{spec}: a target directory is targets/<name>/ in a hypersolid workspace", USAGE)
        root, name = d.parent.parent, d.name
    else:
        root = Path(workspace).resolve() if workspace else find_workspace(Path.cwd())
        name = spec
    project = Project(root)
    try:
        target = project.load(name)
    except ConfigError as err:
        raise Failure(f"bad target: {err}", USAGE) from None
    if target.abstract:
        raise Failure(f"target {name} is abstract (a base for other targets); buildable: "
                      f"{', '.join(buildable_names(project))}", USAGE)
    return project, target


def buildable_names(project: Project) -> list[str]:
    """The targets that load and are not abstract (bad ones are left out)."""
    return [t.name for t in project.buildable()]


def check_remote() -> None:
    """A bad HYPERSOLID_REMOTE_CACHE* value: one line and exit 2, before any build."""
    from . import remote
    try:
        remote.config_from_env()
    except remote.RemoteConfigError as err:
        raise Failure(str(err), USAGE) from None


def cache_of(project: Project) -> Cache:
    return Cache(default_cache_dir(project))


def subtask(target: Target, arch: str) -> str:
    from .tasks import subtask_name
    return subtask_name(target, arch)


def dist_dir(project: Project, target: Target) -> Path:
    return project.root / "dist" / target.name


def log_for(project: Project, target: Target, what: str) -> Log:
    return Log(project.root / "build" / target.name / "logs" / f"{what}.log", what)


# --- doit ---------------------------------------------------------------------

def run_doit(project: Project, tasks: list[str], out=None) -> None:
    """Run tasks of the workspace's dodo.py, as `doit` would; a failure
    becomes one message naming the stage, the command and the log."""
    from doit.cmd_base import DodoTaskLoader
    from doit.doit_cmd import DoitMain
    report.FAILURES.clear()
    here = os.getcwd()
    try:
        main = DoitMain(DodoTaskLoader(), extra_config={"GLOBAL": {"outfile": out or sys.stdout}})
        status = main.run(["run", "-f", str(project.root / "dodo.py"), *tasks])
    finally:
        os.chdir(here)  # doit changes into the workspace
    if status == 0:
        return
    if not report.FAILURES:
        raise Failure(f"doit {' '.join(tasks)} exited with status {status} (see above)", FAILED)
    task, error, fail = report.FAILURES[0]
    if error is None:
        raise Failure(f"{task} failed: {fail.get_msg().strip().splitlines()[-1]}", FAILED)
    parts = [f"stage {task} failed: {error.message}"]
    if error.command:
        parts.append(f"command: {shlex.join(error.command)}")
    if error.log:
        parts.append(f"log: {os.path.relpath(error.log)}")
    raise Failure("; ".join(parts), HOOK_FAILED if isinstance(error, HookError) else FAILED)


# --- workspace hooks ------------------------------------------------------------

def built_id(project: Project, target: Target) -> str:
    """The build id recorded in dist/ (one build: the same for every arch)."""
    ids = {}
    for arch in target.architectures:
        info = dist_dir(project, target) / f"build-{arch}.json"
        try:
            ids[arch] = json.loads(info.read_text())["build_id"]
        except (OSError, ValueError, KeyError):
            raise Failure(f"{target.name} is not built for {arch} (no {os.path.relpath(info)}); "
                          f"run: hypersolid build {target.name}", USAGE) from None
    if len(set(ids.values())) > 1:
        raise Failure(f"dist/{target.name} holds files of different builds ({ids}); "
                      f"run: hypersolid build {target.name}", USAGE)
    return next(iter(ids.values()))


def hook_env(project: Project, target: Target, build: str) -> dict[str, str]:
    return {"HYPERSOLID_TARGET": target.name,
            "HYPERSOLID_ARCHITECTURES": " ".join(target.architectures),
            "HYPERSOLID_DIST": str(dist_dir(project, target)),
            "HYPERSOLID_BUILD_ID": build,
            "HYPERSOLID_WORKSPACE": str(project.root),
            "HYPERSOLID_TARGET_DIR": str(target.file.parent)}


def workspace_hook(project: Project, target: Target, name: str, build: str) -> None:
    log = log_for(project, target, f"hook-{name}")
    try:
        hooks.run_workspace_hook(project.root, name, hook_env(project, target, build), log)
    except HookError as err:
        raise Failure(f"{err.message}; command: {shlex.join(err.command or [])}; "
                      f"log: {os.path.relpath(log.path)}", HOOK_FAILED) from None


# --- verbs --------------------------------------------------------------------------

def hold_checkout(project: Project) -> None:
    """The checkout's build lock, before any hook or stage runs."""
    try:
        lock.acquire(project.root / "build")
    except lock.Busy as err:
        raise Failure(str(err), FAILED) from None


def build(project: Project, target: Target) -> None:
    start = time.monotonic()
    hold_checkout(project)
    resolve_first(project, target)
    try:
        planned = build_id(project, target, cache_of(project))
    except BuildError as err:
        raise Failure(str(err), USAGE) from None
    workspace_hook(project, target, "pre-build", planned)
    run_doit(project, [f"bootfiles:{subtask(target, a)}" for a in target.architectures] + disk_tasks(project, target))
    build = built_id(project, target)
    workspace_hook(project, target, "post-build", build)
    dist = dist_dir(project, target)
    print(f"hypersolid: {target.name} built in {time.monotonic() - start:.1f}s, build id {build}; "
          f"outputs in {os.path.relpath(dist)}/:")
    for f in sorted(dist.iterdir()):
        if f.name.startswith("."):
            continue
        size = f.stat().st_size if f.is_file() else sum(p.stat().st_size for p in f.rglob("*") if p.is_file())
        print(f"  {f.name + ('/' if f.is_dir() else ''):<28} {size / 1e6:10.1f} MB")


def disk_tasks(project: Project, target: Target) -> list[str]:
    """disk:<target> too when target.yaml says disk: {build: true}."""
    if not target.disk_build:
        return []
    from .stages import STAGES, Unit
    return [f"disk:{subtask(target, a)}" for a in target.architectures
            if STAGES["disk"].applies(Unit(project, target, a, cache_of(project)))]
def lock_versions(project: Project, target: Target) -> None:
    """Write TARGET's lock file(s) from a fresh resolution of its mirror."""
    from . import versions
    for arch in target.architectures:
        try:
            path, named, count, changed = versions.write_lock(Unit(project, target, arch, cache_of(project)))
        except BuildError as err:
            raise Failure(str(err), FAILED) from None
        print(f"hypersolid: wrote {os.path.relpath(path)} ({count} packages, {changed} lines changed)")
        if not named:
            print(f"  add `lock: packages-{{arch}}.lock` to {os.path.relpath(target.file)} to build from it")


def outdated(project: Project, target: Target) -> int:
    """The packages of the last build the mirror has newer versions of; 1 if any."""
    from . import versions
    found = checked = 0
    for arch in target.architectures:
        unit = Unit(project, target, arch, cache_of(project))
        last = versions.last_build_lock(unit)
        if last is None:
            raise Failure(f"no build of {target.name}/{arch} yet (no dist/{target.name}/packages-{arch}.lock): "
                          f"build it first", USAGE)
        try:
            entries = lockfile.read(last)
        except lockfile.LockError as err:
            raise Failure(str(err), USAGE) from None
        try:
            newer = versions.outdated(unit, entries)
        except BuildError as err:
            raise Failure(str(err), FAILED) from None
        for old, new, security in newer:
            print(f"{old.package}:{old.architecture} {old.version} -> {new.version}"
                  + ("  (security)" if security else ""))
        found += len(newer)
        checked += len(entries)
    if found:
        print(f"hypersolid: {found} package(s) of the last build of {target.name} have newer versions; "
              f"`hypersolid build --refresh {target.name}` picks them up", file=sys.stderr)
    else:
        print(f"hypersolid: the {checked} packages of the last build of {target.name} are the mirror's newest",
              file=sys.stderr)
    return FAILED if found else OK


def resolve_first(project: Project, target: Target) -> None:
    """The resolve tasks, quietly, before the build id is planned: the id is
    a digest of the bootstrap key, which holds the resolved versions (a
    no-op within index_max_age)."""
    import io
    tasks = [f"resolve:{subtask(target, a)}" for a in target.architectures
             if STAGES["resolve"].applies(Unit(project, target, a, cache_of(project)))]
    if tasks:
        run_doit(project, tasks, out=io.StringIO())


def sign(project: Project, target: Target) -> None:
    workspace_hook(project, target, "codesigning", built_id(project, target))


def deploy(project: Project, target: Target) -> None:
    workspace_hook(project, target, "deploy", built_id(project, target))


def build_deploy(project: Project, target: Target) -> None:
    build(project, target)
    sign(project, target)
    deploy(project, target)


def attach(project: Project, target: Target, arch: str | None) -> int:
    """A shell in the configured tree, through an overlay in a private mount
    namespace: what the shell changes is gone when it exits."""
    if arch is None:
        arch = target.architectures[0]
    elif arch not in target.architectures:
        raise Failure(f"{target.name} has no architecture {arch} (it has: {', '.join(target.architectures)})", USAGE)
    hold_checkout(project)
    run_doit(project, [f"configure:{subtask(target, arch)}"], out=sys.stderr)  # stdout is the shell's
    unit = Unit(project, target, arch, cache_of(project))
    log = log_for(project, target, "attach")
    try:
        tree = unit.output("configure") / "tree"
        ensure_binfmt(arch, log)
    except BuildError as err:
        raise Failure(str(err), FAILED) from None
    shell = "/bin/bash" if (tree / "bin/bash").exists() else "/bin/sh"
    interactive = sys.stdin.isatty()
    env = {"TERM": os.environ.get("TERM", "vt100")}
    work = unit.build_dir / "attach" / str(os.getpid())
    remove_tree(work)
    if interactive:
        print(f"hypersolid: shell in the configured tree of {target.name}/{arch}"
              f"{' (emulated)' if emulated(arch) else ''}; changes are discarded on exit", flush=True)
    try:
        return isolated(_shell, tree, work, shell, arch, env, "interactive" if interactive else "pipe", log,
                        foreground=True)
    finally:
        remove_tree(work)


def _shell(tree: Path, work: Path, shell: str, arch: str, env: dict, console: str, log: Log) -> int:
    """In attach's private mount namespace: the shell on an overlay of the tree."""
    merged = writable_view(tree, work, log)
    return run_in(merged, [shell], log, arch, env, check=False, console="terminal",
                  nspawn_console=console).returncode


def clean(project: Project, target: Target, with_cache: bool) -> None:
    dist = dist_dir(project, target)
    if dist.exists():
        remove_tree(dist)
        print(f"hypersolid: removed {os.path.relpath(dist)}/")
    else:
        print(f"hypersolid: {os.path.relpath(dist)}/ does not exist")
    if with_cache:
        clean_cache(project, target)


def entries_of(project: Project, target: Target, cache: Cache) -> set[tuple[str, str]]:
    """(stage, key) of a target's cache entries: those its last build
    recorded in build/<target>/ (the memos too: configure-base.key,
    sbom-content.key) and those its current inputs would use; ("apt",
    digest): its resolver's apt state."""
    from .gc import APT, apt_states
    from .stages.configure import BASE
    from .stages.sbom import MEMO
    found = set()
    for key_file in (project.root / "build" / target.name).rglob("*.key"):
        found.add((key_file.stem, key_file.read_text().strip()))
    for arch in target.architectures:
        found |= set(planned_keys(Unit(project, target, arch, cache)).items())
    found |= {(APT, state.name) for state in apt_states(project, cache, [target])}
    return {(s, k) for s, k in found if s in (BASE, MEMO, APT) or (s in STAGES and STAGES[s].cached)}


def clean_cache(project: Project, target: Target) -> None:
    """Drop the target's entries, except those another target uses too."""
    cache = cache_of(project)
    mine = entries_of(project, target, cache)
    shared: dict[tuple[str, str], list[str]] = {}
    for name in project.target_names():
        if name == target.name:
            continue
        try:
            other = project.load(name)
        except ConfigError:
            continue
        if other.abstract:
            continue
        for entry in entries_of(project, other, cache) & mine:
            shared.setdefault(entry, []).append(name)
    dropped = 0
    with lock.own_cache(cache.root):  # no build is using them meanwhile
        for stage, key in sorted(mine - set(shared)):
            entry = cache.entry(stage, key)
            if entry.is_dir():
                doomed = cache.tmp / f"drop-{stage}-{key[:12]}.{os.getpid()}"  # gone at once, removed after
                cache.tmp.mkdir(parents=True, exist_ok=True)
                os.rename(entry, doomed)
                remove_tree(doomed)
                dropped += 1
    for key_file in (project.root / "build" / target.name).rglob("*.key"):
        key_file.unlink()  # doit re-runs those stages next time
        key_file.with_suffix(".manifest.json").unlink(missing_ok=True)
    kept = sorted(f"{stage} (also {', '.join(names)})" for (stage, key), names in shared.items()
                  if cache.entry(stage, key).is_dir())
    print(f"hypersolid: dropped {dropped} cache entr{'y' if dropped == 1 else 'ies'} of {target.name}"
          + (f"; kept shared: {'; '.join(kept)}" if kept else ""))


# --- list -----------------------------------------------------------------------

def listing(project: Project) -> dict:
    """What a CI matrix fans out from: each buildable target and architecture
    with its doit task names and every cached stage's planned key (known
    before anything is built, see stages.planned_keys; final once the
    package set is: a `lock:` file, or this checkout's last resolution)."""
    from .stages.bootstrap import lock_path
    from .tasks import ORDER
    cache = cache_of(project)
    found = project.buildable()
    targets, matrix = [], []
    for target in found:
        arches = []
        for arch in target.architectures:
            unit = Unit(project, target, arch, cache)
            sub = subtask(target, arch)
            tasks = {}
            for name in ORDER:
                stage = STAGES[name]
                owner = unit if stage.per_arch else unit.without_arch()
                if stage.applies(owner):
                    tasks[name] = f"{name}:{subtask(target, arch if stage.per_arch else None)}"
            keys = planned_keys(unit)
            doit = [tasks["bootfiles"]] + ([tasks["disk"]] if target.disk_build and "disk" in tasks else [])
            arches.append({"arch": arch, "subtask": sub, "tasks": tasks, "keys": keys,
                           "cached": {s: cache.entry(s, k).is_dir() for s, k in keys.items()},
                           "resolved": lock_path(unit).exists(), "doit": doit})
            matrix.append({"target": target.name, "arch": arch, "doit": " ".join(doit),
                           "dist": f"dist/{target.name}"})
        targets.append({"name": target.name, "architectures": arches, "dist": f"dist/{target.name}"})
    return {"workspace": str(project.root), "cache": str(cache.root), "targets": targets, "matrix": matrix,
            "errors": {name: str(err) for name, err in found.errors.items()}}


def list_targets(workspace: str | None, as_json: bool) -> int:
    root = Path(workspace).resolve() if workspace else find_workspace(Path.cwd())
    data = listing(Project(root))
    if as_json:
        print(json.dumps(data, indent=1))
        return OK
    rows = [("TARGET", "ARCH", "DOIT TASKS", "CACHED")]
    for t in data["targets"]:
        for a in t["architectures"]:
            done = sum(a["cached"].values())
            rows.append((t["name"], a["arch"], " ".join(a["doit"]),
                         f"{done}/{len(a['cached'])}" + ("" if a["resolved"] else " (not resolved yet: keys from bootstrap on will change)")))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
    for name, err in data["errors"].items():
        print(f"bad target {name}: {err}")
    return OK


# --- command line ---------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hypersolid", description="Build immutable Debian systems; every build runs the "
        "doit task graph of the workspace (dodo.py).",
        epilog="exit status: 0 ok, 1 a build stage failed, 2 bad usage or target, 3 a hook failed. "
               "TARGET is a name (rpi4) or a directory (targets/rpi4/). See docs/cli.md.")
    p.add_argument("--version", action="version", version=f"hypersolid {__version__}")
    p.add_argument("-C", "--workspace", metavar="DIR",
                   help="the checkout holding dodo.py and targets/ (default: found from the current directory)")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, text in (
            ("build", "build every stage of TARGET for all its architectures (doit bootfiles:TARGET)"),
            ("sign", "run the .hooks/codesigning hook on the built TARGET"),
            ("deploy", "run the .hooks/deploy hook on the built TARGET"),
            ("build-deploy", "build, sign and deploy TARGET"),
            ("update", "the same as build-deploy"),
            ("attach", "a shell in TARGET's configured tree (container; emulated if foreign); "
                       "changes are discarded"),
            ("clean", "remove dist/TARGET/; with --cache also TARGET's cache entries"),
            ("lock", "write TARGET's lock file (packages-<arch>.lock) from a fresh resolution of its mirror"),
            ("outdated", "list the packages of TARGET's last build that have newer versions on the mirror "
                         "(security first); exit 1 if any")):
        v = verbs.add_parser(name, help=text, description=text)
        v.add_argument("target", metavar="TARGET")
        if name == "attach":
            v.add_argument("--arch", help="which architecture's tree (default: the target's first)")
        if name in ("build", "build-deploy", "update", "attach"):
            v.add_argument("--no-wait", action="store_true",
                           help="fail at once if another build runs in this checkout (default: wait)")
        if name in ("build", "build-deploy", "update"):
            v.add_argument("--refresh", action="store_true",
                           help="ask the mirror for new package versions now, whatever index_max_age says")
            v.add_argument("-j", "--jobs", type=int, metavar="N",
                           help="stages run at once (default: the CPUs, 2 to 4; 1: one after another)")
            v.add_argument("-q", "--quiet", action="store_true",
                           help="no live progress lines of running stages (HYPERSOLID_QUIET=1)")
        if name == "clean":
            v.add_argument("--cache", action="store_true",
                           help="also drop the target's cache entries (not those other targets share)")
    f = verbs.add_parser("flash", help="write TARGET's disk image to DEVICE (bmaptool; docs/bare-metal.md)",
                         description="write dist/TARGET/disk-ARCH.img to the whole disk DEVICE with bmaptool")
    f.add_argument("target", metavar="TARGET")
    f.add_argument("device", metavar="DEVICE", help="a whole disk: /dev/sdX, /dev/mmcblkN")
    f.add_argument("--arch", help="which architecture's image (default: the target's first)")
    f.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    add_diff_verb(verbs)
    add_cache_verb(verbs)
    text = "the buildable targets, their architectures, doit tasks and planned cache keys (a CI matrix)"
    v = verbs.add_parser("list", help=text, description=text)
    v.add_argument("--json", action="store_true", help="as JSON (docs/ci.md): targets, keys, and a `matrix` list")
    return p


def flash(project: Project, target: Target, device: str, arch: str | None, yes: bool) -> None:
    """Checks (flash.check), confirmation, then bmaptool copy."""
    from . import flash as flashing
    arch = arch or target.architectures[0]
    image = dist_dir(project, target) / f"disk-{arch}.img"
    if not image.exists() or not image.with_suffix(".bmap").exists():
        raise Failure(f"{os.path.relpath(image)} (or its .bmap) is missing: run `doit disk:{subtask(target, arch)}` "
                      "first", USAGE)
    try:
        dev = flashing.check(Path(device))
    except flashing.Refused as err:
        raise Failure(f"refused: {err}", USAGE) from None
    if not yes and not flashing.confirm(dev, image):
        raise Failure("not confirmed; nothing written", USAGE)
    log = log_for(project, target, "flash")
    try:
        run(flashing.flash_argv(image, dev.path), log, console="terminal")
    except BuildError as err:
        raise Failure(str(err), FAILED) from None
    print(f"hypersolid: wrote {image.name} to {dev.path} ({dev.model})")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    install_signal_handlers()
    set_build_umask()
    if args.verb == "diff":
        return run_diff(args)
    if args.verb == "cache":
        return run_cache(args, cache_workspace(args.workspace))
    if args.verb == "list":
        try:
            return list_targets(args.workspace, args.json)
        except Failure as err:
            print(f"hypersolid: list: {err}", file=sys.stderr)
            return err.status
    if getattr(args, "no_wait", False):
        os.environ[lock.NO_WAIT] = "1"
    if getattr(args, "jobs", None):
        os.environ["HYPERSOLID_JOBS"] = str(args.jobs)
    if getattr(args, "quiet", False):
        os.environ["HYPERSOLID_QUIET"] = "1"
    if getattr(args, "refresh", False):
        from .resolve import REFRESH_ENV
        os.environ[REFRESH_ENV] = "1"
    try:
        if args.verb in ("build", "build-deploy", "update", "attach"):
            check_remote()
        project, target = resolve(args.target, args.workspace)
        if args.verb == "build":
            build(project, target)
        elif args.verb == "sign":
            sign(project, target)
        elif args.verb == "deploy":
            deploy(project, target)
        elif args.verb in ("build-deploy", "update"):
            build_deploy(project, target)
        elif args.verb == "attach":
            return attach(project, target, args.arch)
        elif args.verb == "clean":
            clean(project, target, args.cache)
        elif args.verb == "flash":
            flash(project, target, args.device, args.arch, args.yes)
        elif args.verb == "lock":
            lock_versions(project, target)
        elif args.verb == "outdated":
            return outdated(project, target)
    except Failure as err:
        print(f"hypersolid: {args.verb} {args.target}: {err}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt as err:  # SIGINT, SIGTERM or SIGHUP (run.Interrupted)
        print(f"hypersolid: {args.verb} {args.target}: {err or 'interrupted'}; the running stage was "
              "stopped and kept nothing half-built", file=sys.stderr)
        return interrupted_status(err)
    return OK


# --- diff ------------------------------------------------------------------------------

def add_diff_verb(verbs) -> None:
    text = "what differs between two builds: packages, image files, boot files (exit 0 identical, 1 different)"
    v = verbs.add_parser("diff", help=text, description=text)
    v.add_argument("a", metavar="A", help="a dist directory (dist/T/) or a system image (system-<arch>.img)")
    v.add_argument("b", metavar="B", help="the same kind as A")
    v.add_argument("--json", action="store_true", help="the same report as JSON")


def cache_workspace(given: str | None) -> Path | None:
    """The workspace for `hypersolid cache` (None: none here; HYPERSOLID_CACHE may still name a cache)."""
    if given:
        return Path(given).resolve()
    try:
        return find_workspace(Path.cwd())
    except Failure:
        return None


def run_diff(args) -> int:
    from . import diff
    try:
        return diff.main(args.a, args.b, args.json)
    except diff.UsageError as err:
        print(f"hypersolid: diff: {err}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt as err:
        print(f"hypersolid: diff: {err or 'interrupted'}", file=sys.stderr)
        return interrupted_status(err)


if __name__ == "__main__":
    sys.exit(main())
