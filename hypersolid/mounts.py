"""Writable views of cached trees, for stages that run `isolated`.

A stage with `isolated = True` builds in a forked child inside a private
mount namespace (run.isolated), so the overlay mounted here over a cache
entry vanishes with that child however it ends: error, Ctrl-C or SIGKILL.
A build can never leave a mount behind on the host, and the cached tree
below the overlay is never written to.
"""
from __future__ import annotations

from pathlib import Path

from .cache import remove_tree
from .run import Log, run


def writable_view(lower: Path, work: Path, log: Log) -> Path:
    """A writable tree over `lower` (a cache entry): an overlay whose upper
    dir is in `work`, or a full copy where overlayfs is unavailable."""
    tree = work / "merged"
    for d in ("upper", "work", "merged"):
        (work / d).mkdir(parents=True)
    mounted = run(["mount", "-t", "overlay", "overlay", "-o",
                   f"lowerdir={lower},upperdir={work / 'upper'},workdir={work / 'work'}", tree],
                  log, check=False, contain=False).returncode == 0
    if not mounted:
        log.note("# overlayfs unavailable, copying the tree instead")
        run(["cp", "-a", "--reflink=auto", f"{lower}/.", tree], log)
    return tree


def release_view(work: Path, log: Log) -> None:
    """Undo writable_view (the namespace would, but the work dir must go)."""
    tree = work / "merged"
    if run(["mountpoint", "-q", tree], log, check=False, contain=False).returncode == 0:
        run(["umount", tree], log, contain=False)
    remove_tree(work)
