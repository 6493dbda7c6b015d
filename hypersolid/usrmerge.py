"""The merged-/usr conversion of an unpacked tree, done natively.

multistrap unpacks /bin, /sbin and /lib as real directories; the usrmerge
package's postinst then runs convert-usrmerge, a Perl script that spawns a
cp, mv or rm per file.  Under qemu-user that is the largest maintainer
script of a configure: 21.4 s of the 67.7 s `dpkg --configure -a` took on
qemu-arm64 (measured per postinst).  This module leaves the tree as
convert-usrmerge leaves it, before the configure stage's container runs:
every entry of /bin, /sbin, /lib, /lib32, /lib64, /libo32 and /libx32 moved
to the same name under /usr (directories merged, a file with other hard
links copied, as cp makes a new inode), then each such directory replaced
by a relative link (`bin -> usr/bin`).  A directory that is already a link
is left alone (multistrap's `lib64 -> ./lib`; the postinst's biarch cleanup
removes it as before).  The postinst then finds the system merged.

Only the cases convert-usrmerge settles without a question are handled: a
name under /usr that is absent, or a directory to merge into, or a link
that says the same.  Anything else (a file in both places, a broken link,
...) is found by a dry run first and leaves the tree untouched, so the
package's own conversion runs and reports it as it always did.
"""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from .intree import Root

DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libo32", "libx32")


class NotSimple(Exception):
    """A case convert-usrmerge has to judge: the tree is left to it."""


def _real_dir(root: Root, rel: str) -> bool:
    """A directory itself, not a link to one (lstat: nothing followed)."""
    st = root.lstat(rel)
    return st is not None and stat.S_ISDIR(st.st_mode)


def _same_link(root: Root, rel: str) -> bool:
    """Both /rel and /usr/rel are links naming the same file, by the rules
    convert-usrmerge accepts (identical text, or one relative to the other,
    or the / link pointing at the /usr one)."""
    l1, l2 = root.readlink(rel), root.readlink(f"usr/{rel}")
    base = "/" + os.path.dirname(rel)
    return l1 == l2 or f"{base}/{l1}" == l2 or l1 == f"/usr{base}/{l2}" or l1 == f"/usr/{rel}"


def _plan(root: Root, rel: str, moves: list[str]) -> None:
    """Add the moves that convert rel (an entry of a merged directory)."""
    src, dst = root.lstat(rel), root.lstat(f"usr/{rel}")
    if dst is None:
        moves.append(rel)
        return
    if stat.S_ISLNK(src.st_mode) or stat.S_ISLNK(dst.st_mode):
        if not (root.exists(rel) and root.exists(f"usr/{rel}")):
            raise NotSimple(f"/{rel}: a broken link")
        if stat.S_ISLNK(src.st_mode) and stat.S_ISLNK(dst.st_mode) and _same_link(root, rel):
            return  # the /usr one stays, the / one goes with its directory
        if stat.S_ISLNK(src.st_mode) and root.readlink(rel) == f"/usr/{rel}":
            return
        raise NotSimple(f"both /{rel} and /usr/{rel} exist")
    if stat.S_ISDIR(src.st_mode) and stat.S_ISDIR(dst.st_mode):
        for name in sorted(root.listdir(rel)):
            _plan(root, f"{rel}/{name}", moves)
        return
    raise NotSimple(f"both /{rel} and /usr/{rel} exist")


def merge(tree: Path) -> list[str]:
    """Convert tree to merged /usr; returns the directories converted (none
    if it already is, or if a case needs convert-usrmerge: then nothing
    was changed)."""
    tree = Path(tree)
    with Root(tree) as root:
        dirs = [d for d in DIRS if _real_dir(root, d)]
        if not dirs:
            return []
        if not _real_dir(root, "usr"):  # a link would lead the plain paths below out of the tree
            raise NotSimple("/usr is not a directory")
        moves: list[str] = []
        for d in dirs:
            if root.lstat(f"usr/{d}") is not None and not _real_dir(root, f"usr/{d}"):
                raise NotSimple(f"/usr/{d} is not a directory")
            for name in sorted(root.listdir(d)):
                _plan(root, f"{d}/{name}", moves)
    # The plan holds: carry it out.  Plain paths from here: the dry run
    # went only through real directories (lstat), so no parent is a link.
    for d in dirs:
        if not (tree / "usr" / d).exists():
            os.mkdir(tree / "usr" / d, 0o755)  # convert-usrmerge: mkdir under umask 022
            os.chmod(tree / "usr" / d, 0o755)
    for rel in moves:
        src, dst = tree / rel, tree / "usr" / rel
        st = os.lstat(src)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            _copy(src, dst, st)  # cp --preserve=all: a new inode, not one more link
            os.unlink(src)
        else:
            os.rename(src, dst)
    for d in dirs:
        for top, _, files in os.walk(tree / d):  # convert-usrmerge's safety check
            for name in files:
                if not os.path.islink(os.path.join(top, name)):
                    raise NotSimple(f"{os.path.join(top, name)} is still there after the merge")
        shutil.rmtree(tree / d)
        os.symlink(f"usr/{d}", tree / d)
    return dirs


def _copy(src: Path, dst: Path, st: os.stat_result) -> None:
    """What `cp --no-dereference --preserve=all` keeps: content, mode,
    owner, times and extended attributes (security.capability too)."""
    shutil.copyfile(src, dst)
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(src, follow_symlinks=False):
        os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
