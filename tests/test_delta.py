"""delta.py: a tree made from links to a cached tree plus an overlay's upper
dir is exactly what the overlay showed, and the cached tree is untouched.
Real overlay mounts (root), in a private mount namespace."""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from hypersolid import delta
from hypersolid.run import Log, isolated

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="overlay mounts need root")


def snapshot(root: Path) -> dict:
    """Everything an image keeps of a tree: per path type, mode, owner,
    mtime, content or target or device, xattrs (overlayfs' own aside)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in ["", *dirs, *files]:
            path = os.path.join(dirpath, name) if name else dirpath
            if not name and dirpath != os.fspath(root):
                continue  # each directory once, from its parent
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    what = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(path)
            else:
                what = st.st_rdev
            xattrs = {n: os.getxattr(path, n, follow_symlinks=False)
                      for n in os.listxattr(path, follow_symlinks=False) if not n.startswith(delta.PRIVATE)}
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, what, xattrs)
    return out


def make_lower(lower: Path) -> None:
    for d in ("etc/keep", "etc/gone/deep", "usr/lib/opaque", "usr/lib/was-dir", "var/lib"):
        (lower / d).mkdir(parents=True)
    (lower / "etc/appended").write_text("first line\n")
    (lower / "etc/keep/untouched").write_text("never changes\n")
    (lower / "etc/removed").write_text("to be removed\n")
    (lower / "etc/gone/deep/file").write_text("x\n")
    (lower / "usr/lib/opaque/old").write_text("old\n")
    (lower / "usr/lib/was-dir/inside").write_text("y\n")
    (lower / "var/lib/was-file").write_text("z\n")
    (lower / "var/lib/chmodded").write_text("mode\n")
    (lower / "var/lib/renamed").write_text("moved\n")
    (lower / "var/lib/linked").write_text("linked\n")
    (lower / "etc/alternative").symlink_to("/usr/bin/one")
    os.setxattr(lower / "etc/keep", "user.tag", b"dir")
    os.setxattr(lower / "var/lib", "user.dropped", b"1")
    os.setxattr(lower / "var/lib/chmodded", "security.capability",
                bytes.fromhex("0100000200200000000000000000000000000000"))  # cap_net_raw+ep


def change(merged: Path) -> None:
    """What a package install does, and a little more."""
    with open(merged / "etc/appended", "a") as f:  # in place: must not reach the lower dir
        f.write("second line\n")
    (merged / "etc/new").write_text("new file\n")
    (merged / "usr/share/new/sub").mkdir(parents=True)
    (merged / "usr/share/new/sub/file").write_text("deep new\n")
    (merged / "etc/removed").unlink()
    subprocess.run(["rm", "-rf", merged / "etc/gone"], check=True)
    subprocess.run(["rm", "-rf", merged / "usr/lib/opaque"], check=True)
    (merged / "usr/lib/opaque").mkdir()
    (merged / "usr/lib/opaque/fresh").write_text("fresh\n")
    subprocess.run(["rm", "-rf", merged / "usr/lib/was-dir"], check=True)
    (merged / "usr/lib/was-dir").write_text("now a file\n")
    (merged / "var/lib/was-file").unlink()
    (merged / "var/lib/was-file").mkdir()
    (merged / "var/lib/was-file/child").write_text("child\n")
    os.chmod(merged / "var/lib/chmodded", 0o700)
    os.chown(merged / "var/lib/chmodded", 1000, 1000)
    os.chmod(merged / "etc/keep", 0o750)
    os.removexattr(merged / "var/lib", "user.dropped")
    os.setxattr(merged / "etc", "user.added", b"2")
    os.rename(merged / "var/lib/renamed", merged / "var/lib/renamed-to")
    os.link(merged / "var/lib/linked", merged / "var/lib/linked-too")
    (merged / "etc/alternative").unlink()
    (merged / "etc/alternative").symlink_to("/usr/bin/two")
    os.mkfifo(merged / "var/lib/fifo")
    os.utime(merged / "usr/lib", ns=(1, 123_000_000_000))


def build(tmp: Path) -> tuple[dict, dict, dict, Path]:
    """(the lower before, the merged view, the lower after, the made tree)."""
    lower, work, tree = tmp / "lower", tmp / "work", tmp / "tree"
    make_lower(lower)
    before = snapshot(lower)
    log = Log(tmp / "delta.log", "configure:t/amd64")

    def in_overlay():
        merged = delta.overlay(lower, work, log)
        assert merged is not None, (tmp / "delta.log").read_text()
        change(merged)
        shown = snapshot(merged)
        subprocess.run(["umount", merged], check=True)
        return shown

    shown = isolated(in_overlay)
    delta.link_tree(lower, tree, log)
    delta.apply(work / "upper", tree)
    return before, shown, snapshot(lower), tree


def test_the_tree_is_what_the_overlay_showed(tmp_path):
    _, shown, _, tree = build(tmp_path)
    assert snapshot(tree) == shown


def test_the_cached_tree_below_is_never_written(tmp_path):
    before, _, after, tree = build(tmp_path)
    assert after == before
    assert (tmp_path / "lower/etc/appended").read_text() == "first line\n"
    assert (tree / "etc/appended").read_text() == "first line\nsecond line\n"


def test_unchanged_files_are_shared_not_copied(tmp_path):
    _, _, _, tree = build(tmp_path)
    lower = tmp_path / "lower"
    assert os.stat(tree / "etc/keep/untouched").st_ino == os.stat(lower / "etc/keep/untouched").st_ino
    assert os.stat(tree / "etc/appended").st_ino != os.stat(lower / "etc/appended").st_ino
    assert os.stat(tree / "etc/keep").st_ino != os.stat(lower / "etc/keep").st_ino  # directories are its own


def test_overlayfs_marks_do_not_reach_the_tree(tmp_path):
    _, _, _, tree = build(tmp_path)
    for dirpath, dirs, files in os.walk(tree):
        for name in ["", *dirs, *files]:
            path = os.path.join(dirpath, name)
            assert not [n for n in os.listxattr(path, follow_symlinks=False) if n.startswith(delta.PRIVATE)], path
            st = os.lstat(path)
            assert not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0), f"a whiteout left at {path}"
