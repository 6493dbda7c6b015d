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
    options = f"lowerdir={lower},upperdir={work / 'upper'},workdir={work / 'work'}"
    # volatile (Linux 5.10): no sync of the whole upper file system at umount,
    # which wrote back every dirty page of the build (0.7 s after a configure);
    # the upper dir is thrown away anyway.
    mounted = any(run(["mount", "-t", "overlay", "overlay", "-o", o, tree], log, check=False,
                      contain=False).returncode == 0 for o in (f"{options},volatile", options))
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
