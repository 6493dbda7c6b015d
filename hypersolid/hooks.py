"""User hooks.

Stage hooks live in a target (``hooks/<kind>.d/NN-name``, collected from
every layer it extends, run in numeric order) and belong to exactly one
stage, whose input they are:

    post-bootstrap  bootstrap   on the host, against the unpacked tree
    pre-configure   configure   in the container, before dpkg --configure -a
    post-configure  squashfs    in the container, after overlay and settings
    post-build      bootfiles   on the host, with the dist directory

Workspace hooks are single executables in ``.hooks/`` at the project root,
run by the `hypersolid` command (pre-build, post-build, codesigning, deploy).

A hook that is not executable or exits non-zero raises HookError, which
names the hook and its exit status; the command line exits 3 for it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from . import epoch, intree
from .container import run_in
from .run import CommandTimeout, HookError, Log, run

STAGE_OF = {"post-bootstrap": "bootstrap", "pre-configure": "configure",
            "post-configure": "squashfs", "post-build": "bootfiles"}
WORKSPACE_HOOKS = ("pre-build", "post-build", "codesigning", "deploy")
WORKSPACE_DIR = ".hooks"


def input_files(unit, kind: str) -> dict[str, Path]:
    """The hooks of one kind as stage inputs (name -> file)."""
    return {f"{kind}.d/{h.name}": h for h in unit.target.hook_files(kind)}


def _rel(unit, path: Path) -> str:
    return os.path.relpath(path, unit.project.root)


def checked(unit, kind: str, log: Log) -> list[Path]:
    """The hooks of one kind, refusing a non-executable one before any work."""
    hooks = unit.target.hook_files(kind)
    for hook in hooks:
        if not os.access(hook, os.X_OK):
            raise log.fail(f"hook {_rel(unit, hook)} is not executable (chmod +x it)", error=HookError)
    return hooks


def base_env(unit, kind: str) -> dict[str, str]:
    """What every stage hook gets; SOURCE_DATE_EPOCH from the bootstrap
    entry (a post-bootstrap hook gets it from bootstrap itself, whose entry
    is not published yet)."""
    sde = {} if kind == "post-bootstrap" else epoch.unit_env(unit)
    return {"HYPERSOLID_TARGET": unit.target.name, "HYPERSOLID_ARCH": unit.arch or "",
            "HYPERSOLID_HOOK": kind, **sde}


def _timed(unit, hook: Path, log: Log, start) -> int:
    """Run one hook within the target's hook_timeout: past it, the hook is
    killed with everything it started (its container too) and the stage
    fails naming the hook and the limit."""
    limit = unit.target.hook_timeout
    try:
        return start(limit).returncode
    except CommandTimeout:
        raise log.fail(f"hook {_rel(unit, hook)} did not finish within hook_timeout ({limit} s) and was "
                       "killed", error=HookError) from None


def run_on_host(unit, kind: str, log: Log, env: Mapping[str, str]) -> None:
    """Run host-side stage hooks in order (cwd: the project root)."""
    for hook in checked(unit, kind, log):
        log.note(f"# {kind} hook {hook.name}")
        status = _timed(unit, hook, log, lambda limit: run(
            [hook], log, env={**base_env(unit, kind), **env}, cwd=unit.project.root, check=False,
            timeout=limit))
        if status != 0:
            raise log.fail(f"hook {_rel(unit, hook)} failed with exit status {status}", [str(hook)],
                           error=HookError)


def run_in_tree(unit, kind: str, tree: Path, log: Log, env: Mapping[str, str] | None = None) -> None:
    """Run container-side stage hooks in order, each in its own container
    run, so a failure names exactly the hook and its status."""
    hooks = checked(unit, kind, log)
    if not hooks:
        return
    inside = Path(".hypersolid/hooks") / kind
    with intree.Root(tree) as root:
        root.fresh_dir(".hypersolid")  # a pre-existing one (a link, a package's) goes
        root.makedirs(str(inside))
        for hook in hooks:
            root.copy_file(hook, str(inside / hook.name))
            log.note(f"# copied {hook} to /{inside / hook.name}")
    for hook in hooks:
        log.note(f"# {kind} hook {hook.name}")
        argv = [f"/{inside}/{hook.name}"]
        status = _timed(unit, hook, log, lambda limit: run_in(
            tree, argv, log, unit.arch, env={**base_env(unit, kind), **(env or {})}, check=False,
            timeout=limit))
        if status != 0:
            raise log.fail(f"hook {_rel(unit, hook)} failed with exit status {status}", argv,
                           error=HookError)
    with intree.Root(tree) as root:
        root.remove(".hypersolid/hooks")


def run_workspace_hook(root: Path, name: str, env: Mapping[str, str], log: Log) -> bool:
    """Run .hooks/<name> with the caller's environment plus `env`, output on
    the console and in the log.  False (and a notice) when there is none."""
    hook = Path(root) / WORKSPACE_DIR / name
    shown = f"{WORKSPACE_DIR}/{name}"
    if not hook.exists():
        print(f"hypersolid: no {shown} hook, skipped", flush=True)
        log.note(f"# no {shown}, skipped")
        return False
    if not os.access(hook, os.X_OK):
        raise log.fail(f"hook {shown} is not executable (chmod +x it)", error=HookError)
    print(f"hypersolid: running {shown}", flush=True)
    status = run([hook], log, env={**os.environ, **env}, cwd=root, check=False, console="tee").returncode
    if status != 0:
        raise log.fail(f"hook {shown} failed with exit status {status}", [str(hook)], error=HookError)
    return True
