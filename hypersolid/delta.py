"""A tree made from a cached tree plus a few changes, without copying it.

configure installs the top packages (layers.py) onto the configured base,
a cache memo of ~650 MB: copying it was most of a package-added build's
configure.  Instead the install runs in an overlay whose lower dir is the
memo (`overlay`), and the result is the memo hard-linked (`link_tree`:
directories new, files shared) with the overlay's upper dir moved onto it
(`apply`): what the install wrote replaces the links, what it removed goes.
Nothing the memo shares is ever written (the install writes the upper dir,
`apply` renames and unlinks), so the memo stays as it was and the tree is
what the overlay showed.

The overlay runs with redirect_dir, metacopy and index off, so its upper dir
holds only whole files, plain directories, whiteouts and opaque markers.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .cache import remove_tree
from .run import Log, run

PRIVATE = "trusted.overlay."  # overlayfs' own xattrs: never part of the tree
OPAQUE = PRIVATE + "opaque"
OPTIONS = "redirect_dir=off,metacopy=off,index=off"


def overlay(lower: Path, work: Path, log: Log) -> Path | None:
    """A writable overlay over `lower` with its upper dir at work/upper (in a
    private mount namespace: run.isolated), or None without overlayfs."""
    tree = work / "merged"
    for d in ("upper", "work", "merged"):
        (work / d).mkdir(parents=True)
    options = f"lowerdir={lower},upperdir={work / 'upper'},workdir={work / 'work'},{OPTIONS}"
    # volatile: no sync of the whole file system at umount (mounts.writable_view).
    if any(run(["mount", "-t", "overlay", "overlay", "-o", o, tree], log, check=False,
               contain=False).returncode == 0 for o in (f"{options},volatile", options)):
        return tree
    remove_tree(work)
    return None


def link_tree(src: Path, dest: Path, log: Log) -> None:
    """dest: src's directories made anew, its other entries hard-linked; a
    full copy where links cannot be made (another file system)."""
    if run(["cp", "-a", "-l", src, dest], log, check=False).returncode != 0:
        remove_tree(dest)
        log.note(f"# cannot hard-link {src}: copying it")
        run(["cp", "-a", "--reflink=auto", src, dest], log)


def apply(upper: Path, tree: Path) -> None:
    """Make `tree` (the overlay's lower dir, or links to it) what the
    overlay showed, by moving the upper dir's entries into it.  The upper
    dir is used up."""
    _apply_dir(os.fspath(upper), os.fspath(tree), os.lstat(upper))


def _apply_dir(up: str, dest: str, st: os.stat_result) -> None:
    with os.scandir(up) as it:
        children = sorted(it, key=lambda e: e.name)
    for child in children:
        target = os.path.join(dest, child.name)
        cst = child.stat(follow_symlinks=False)
        if stat.S_ISCHR(cst.st_mode) and cst.st_rdev == 0:  # a whiteout: removed in the overlay
            _remove(target)
        elif stat.S_ISDIR(cst.st_mode):
            # Opaque: made anew in the overlay, nothing of the lower one shows.
            if _xattr(child.path, OPAQUE) == b"y" or not _is_dir(target):
                _remove(target)
                os.mkdir(target)
            _apply_dir(child.path, target, cst)
        else:  # a whole file, link, device, fifo or socket: it replaces the lower one
            _strip(child.path)
            if _is_dir(target):
                _remove(target)
            os.rename(child.path, target)
    # Last: moving children in changed its times.
    os.chown(dest, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(dest, stat.S_IMODE(st.st_mode))
    want = {n: os.getxattr(up, n, follow_symlinks=False) for n in os.listxattr(up, follow_symlinks=False)
            if not n.startswith(PRIVATE)}
    for name in os.listxattr(dest, follow_symlinks=False):
        if name not in want:
            os.removexattr(dest, name, follow_symlinks=False)
    for name, value in want.items():
        os.setxattr(dest, name, value, follow_symlinks=False)
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        remove_tree(Path(path))
    else:
        os.unlink(path)


def _xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def _strip(path: str) -> None:
    """Drop overlayfs' own xattrs (origin, metacopy) from a moved entry."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno == errno.ENOTSUP:
            return
        raise
    for name in names:
        if name.startswith(PRIVATE):
            os.removexattr(path, name, follow_symlinks=False)
