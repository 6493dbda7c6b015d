"""Stage work that needs mounts runs in a child in a private mount namespace.

The child's mounts (the overlay over a cached tree, mostly) vanish with its
namespace however it ends: error, Ctrl-C or SIGKILL.  So a build can never
leave a mount behind on the host, and the cached tree below the overlay is
never written to.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .run import BuildError, HookError, Log, run

PACKAGE_PARENT = Path(__file__).resolve().parents[1]


def build_isolated(stage_name: str, unit, out: Path, log: Log) -> None:
    """Run STAGES[stage_name].assemble(unit, out, log) in the child."""
    args = {"stage": stage_name, "root": str(unit.project.root), "target": unit.target.name,
            "arch": unit.arch, "cache": str(unit.cache.root), "out": str(out), "log": log.stage}
    error = out / ".error"
    try:
        run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c",
             "from hypersolid.isolate import main; main()", json.dumps(args)],
            log, env={"PYTHONPATH": str(PACKAGE_PARENT)})
    except BuildError:
        if error.exists():  # the child's own, precise error
            e = json.loads(error.read_text())
            kind = HookError if e["hook"] else BuildError
            raise kind(log.stage, e["message"], e["command"], log.path) from None
        raise


def writable_view(lower: Path, work: Path, log: Log) -> Path:
    """A writable tree over `lower` (a cache entry): an overlay whose upper
    dir is in `work`, or a full copy where overlayfs is unavailable."""
    tree = work / "merged"
    for d in ("upper", "work", "merged"):
        (work / d).mkdir(parents=True)
    mounted = run(["mount", "-t", "overlay", "overlay", "-o",
                   f"lowerdir={lower},upperdir={work / 'upper'},workdir={work / 'work'}", tree],
                  log, check=False).returncode == 0
    if not mounted:
        log.note("# overlayfs unavailable, copying the tree instead")
        run(["cp", "-a", "--reflink=auto", f"{lower}/.", tree], log)
    return tree


def release_view(work: Path, log: Log) -> None:
    """Undo writable_view (the namespace would, but the work dir must go)."""
    from .cache import remove_tree
    tree = work / "merged"
    if run(["mountpoint", "-q", tree], log, check=False).returncode == 0:
        run(["umount", tree], log)
    remove_tree(work)


def main() -> None:
    """Child entry point (argument: JSON from build_isolated)."""
    from .cache import Cache
    from .config import Project
    from .stages import STAGES, Unit

    args = json.loads(sys.argv[1])
    project = Project(args["root"])
    unit = Unit(project, project.load(args["target"]), args["arch"], Cache(args["cache"]))
    log = Log(unit.log_path(args["stage"]), args["log"], append=True)
    out = Path(args["out"])
    try:
        STAGES[args["stage"]].assemble(unit, out, log)
    except BuildError as err:
        (out / ".error").write_text(json.dumps({"message": err.message, "command": err.command,
                                                "hook": isinstance(err, HookError)}))
        sys.exit(3)
