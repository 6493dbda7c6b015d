"""intree: every path resolved with the tree as /, never onto the host; and
copy_overlay, which lays an overlay over a tree through it."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from hypersolid import intree
from hypersolid.cache import describe_tree
from hypersolid.run import BuildError, Log
from hypersolid.stages.rootfs import copy_overlay, merged_usr_path

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


@pytest.fixture(params=["openat2", "walk"])
def walk(request) -> bool:
    """Each test runs with openat2 and with the component walk."""
    return request.param == "walk"


@pytest.fixture
def host(tmp_path) -> Path:
    """A stand-in for the build host's files, outside the tree."""
    d = tmp_path / "host"
    (d / "dir").mkdir(parents=True)
    (d / "file").write_text("host file\n")
    (d / "dir/keep").write_text("host dir\n")
    return d


@pytest.fixture
def tree(tmp_path, host) -> Path:
    """A tree with the hostile links: absolute, relative ../.., loop,
    dangling, and a merged-usr layout."""
    t = tmp_path / "a/b/tree"
    for d in ("etc", "usr/lib/systemd/system", "usr/bin", "run", "var", "home", "etc/skel/.config"):
        (t / d).mkdir(parents=True, exist_ok=True)
    (t / "lib").symlink_to("usr/lib")
    (t / "bin").symlink_to("usr/bin")
    (t / "var/run").symlink_to("/run")
    (t / "etc/abs").symlink_to(host / "file")
    (t / "etc/absdir").symlink_to(host / "dir")
    (t / "etc/rel").symlink_to("../" * 12 + str(host / "file").lstrip("/"))
    (t / "etc/reldir").symlink_to("../" * 12 + str(host / "dir").lstrip("/"))
    (t / "etc/loop1").symlink_to("loop2")
    (t / "etc/loop2").symlink_to("loop1")
    (t / "etc/nodir").symlink_to("/missing/deeper")
    (t / "etc/dangling").symlink_to("/etc/target-file")
    (t / "etc/skel/.bashrc").write_text("# bashrc\n")
    (t / "etc/skel/.config/app").write_text("x=1\n")
    (t / "etc/skel/.link").symlink_to(host / "file")
    return t


@pytest.fixture
def root(tree, walk):
    with intree.Root(tree, walk=walk) as r:
        yield r


@pytest.fixture(autouse=True)
def untouched(host):
    before = describe_tree(host)
    yield
    assert describe_tree(host) == before, "a file outside the tree was changed"


def test_openat2_is_used_on_this_kernel(tree):
    with intree.Root(tree) as r:
        r.resolve("etc/abs")
    assert intree._have_openat2 is True


def test_absolute_and_relative_links_resolve_inside(root, host):
    inside = str(host).lstrip("/")
    assert root.resolve("etc/abs") == f"{inside}/file"
    assert root.resolve("etc/rel") == f"{inside}/file"
    assert root.resolve("lib/systemd/system/x.service") == "usr/lib/systemd/system/x.service"
    assert root.resolve("var/run/x.pid") == "run/x.pid"
    assert root.resolve("../../../etc") == "etc"
    assert not root.exists("etc/abs")  # the host file is not seen


def test_writes_through_links_land_inside(root, tree, host):
    inside = str(host).lstrip("/")
    assert root.write_text("etc/abs", "a\n") == f"{inside}/file"
    assert root.write_text("etc/rel", "b\n") == f"{inside}/file"
    assert (tree / inside / "file").read_text() == "b\n"
    assert root.write_text("etc/reldir/new", "c\n") == f"{inside}/dir/new"
    assert root.write_text("etc/dangling", "d\n") == "etc/target-file"
    assert (tree / "etc/target-file").read_text() == "d\n"
    for link in ("etc/abs", "etc/rel", "etc/reldir", "etc/dangling"):
        assert (tree / link).is_symlink(), link  # links stay links
    assert root.read_text("etc/rel") == "b\n"


def test_a_link_to_a_missing_dir_is_created_inside(root, tree):
    assert root.write_text("etc/nodir/f", "x") == "missing/deeper/f"
    assert (tree / "missing/deeper/f").read_text() == "x"
    assert root.makedirs("etc/absdir/sub") .endswith("host/dir/sub")


def test_a_link_loop_is_eloop(root):
    for call in (lambda: root.write_text("etc/loop1", "x"), lambda: root.makedirs("etc/loop1/x"),
                 lambda: root.read_text("etc/loop1/x")):
        with pytest.raises(OSError) as err:
            call()
        assert err.value.errno == errno.ELOOP


def test_replacing_ops_do_not_follow_the_last_link(root, tree, host):
    root.symlink("/somewhere", "etc/abs")
    assert os.readlink(tree / "etc/abs") == "/somewhere"
    root.unlink("etc/rel")
    assert not os.path.lexists(tree / "etc/rel")
    root.remove("etc/absdir")  # rm -rf of a link to a directory: the link only
    assert not os.path.lexists(tree / "etc/absdir")
    src = tree.parent / "src"
    src.write_text("new\n")
    os.chmod(src, 0o750)
    root.copy_file(src, "etc/reldir")  # replaces the link, does not write through it
    assert (tree / "etc/reldir").read_text() == "new\n"
    assert stat.S_IMODE((tree / "etc/reldir").lstat().st_mode) == 0o750
    with pytest.raises(IsADirectoryError):
        root.copy_file(src, "etc")


def test_chmod_does_not_follow(root, tree):
    with pytest.raises(OSError) as err:
        root.chmod("etc/abs", 0o777)
    assert err.value.errno == errno.ELOOP
    root.chmod("lib/..", 0o700)  # lib -> usr/lib, so lib/.. is usr, not the root
    assert stat.S_IMODE((tree / "usr").stat().st_mode) == 0o700


@needs_root
def test_chown_does_not_follow(root, tree, host):
    root.lchown("etc/abs", 1234, 1234)
    assert (tree / "etc/abs").lstat().st_uid == 1234
    (tree / "home/u").mkdir()
    (tree / "home/u/out").symlink_to(host / "dir")
    root.chown_tree("home/u", 1000, 1000)
    assert (tree / "home/u").stat().st_uid == 1000
    assert (tree / "home/u/out").lstat().st_uid == 1000
    assert (host / "dir").stat().st_uid == os.geteuid()


def test_write_is_atomic_and_keeps_the_owner(root, tree):
    (tree / "etc/passwd").write_text("old\n")
    os.chown(tree / "etc/passwd", os.geteuid(), os.getegid())
    root.write_text("etc/passwd", "new\n", 0o640)
    assert (tree / "etc/passwd").read_text() == "new\n"
    assert stat.S_IMODE((tree / "etc/passwd").stat().st_mode) == 0o640
    assert not [p for p in os.listdir(tree / "etc") if ".hs-" in p]


def test_copy_tree_keeps_links_and_stays_inside(root, tree, host):
    (tree / "home/alice").symlink_to(host / "dir")
    home = root.makedirs("home/alice")
    assert home == str(host / "dir").lstrip("/")
    root.copy_tree("etc/skel", home)
    assert (tree / home / ".bashrc").read_text() == "# bashrc\n"
    assert (tree / home / ".config/app").read_text() == "x=1\n"
    assert os.readlink(tree / home / ".link") == str(host / "file")


def test_fresh_dir_replaces_a_link(root, tree, host):
    (tree / ".hypersolid").symlink_to(host / "dir")
    root.fresh_dir(".hypersolid")
    assert (tree / ".hypersolid").is_dir() and not (tree / ".hypersolid").is_symlink()
    assert os.listdir(tree / ".hypersolid") == []


# -- copy_overlay ------------------------------------------------------------

@pytest.fixture
def log(tmp_path) -> Log:
    return Log(tmp_path / "log", "test")


def test_copy_overlay_follows_tree_links_and_keeps_its_own(tree, tmp_path, host, log):
    ov = tmp_path / "overlay"
    (ov / "lib/systemd/system").mkdir(parents=True)
    (ov / "lib/systemd/system/x.service").write_text("[Unit]\n")
    os.utime(ov / "lib/systemd/system/x.service", (1000000, 1000000))
    (ov / "bin").mkdir()
    (ov / "bin/tool").write_text("#!/bin/sh\n")
    os.chmod(ov / "bin/tool", 0o755)
    (ov / "var/run").mkdir(parents=True)
    (ov / "var/run/x").write_text("x")
    (ov / "etc").mkdir()
    (ov / "etc/hostname").symlink_to(host / "file")
    (ov / "etc/abs").write_text("replaced\n")  # a file over the tree's link: replaces it
    copy_overlay(ov, tree, log)
    unit = tree / "usr/lib/systemd/system/x.service"
    assert unit.read_text() == "[Unit]\n" and unit.stat().st_mtime == 1000000
    assert stat.S_IMODE((tree / "usr/bin/tool").stat().st_mode) == 0o755
    assert (tree / "run/x").read_text() == "x"
    assert (tree / "lib").is_symlink() and (tree / "var/run").is_symlink()
    assert os.readlink(tree / "etc/hostname") == str(host / "file")
    assert not (tree / "etc/abs").is_symlink()
    if os.geteuid() == 0:
        assert unit.stat().st_uid == 0


@pytest.mark.parametrize("make, fragment", [
    (lambda ov: (ov / "etc").mkdir() or (ov / "etc/skel").write_text("x"), "a file where the image has a directory"),
    (lambda ov: (ov / "etc/hosts").mkdir(parents=True) or (ov / "etc/abs").mkdir(), "a directory where the image has a file"),
    (lambda ov: (ov / "lib").write_text("x"), "a file where the image has a directory (usr/lib)"),
])
def test_copy_overlay_conflicts_are_one_line(tree, tmp_path, log, make, fragment):
    (tree / "etc/hosts").write_text("x")
    ov = tmp_path / "overlay"
    ov.mkdir()
    make(ov)
    with pytest.raises(BuildError) as err:
        copy_overlay(ov, tree, log, shown=lambda path, rel: f"OV/{rel}")
    assert fragment in err.value.message and "OV/" in err.value.message
    assert "\n" not in err.value.message


def test_merged_usr_paths():
    assert merged_usr_path("lib/systemd/system/x") == "usr/lib/systemd/system/x"
    assert merged_usr_path("sbin/x") == "usr/sbin/x"
    assert merged_usr_path("lib64") == "usr/lib64"
    assert merged_usr_path("library/x") == "library/x"
    assert merged_usr_path("etc/x") == "etc/x"


def test_resolve_takes_what_is_missing_as_written(root):
    assert root.resolve("etc/nodir/x/../y") == "missing/deeper/y"
    assert root.resolve("nothing/here/..") == "nothing"
    assert root.resolve("etc/abs/../../..") == str(Path(*Path(root.resolve("etc/abs")).parts[:-3]))
    assert root.resolve("/") == "" and root.resolve("lib/../..") == ""


def test_two_layers_naming_one_file_via_lib_and_usr_lib_merge_as_one(tmp_path, log):
    dest = tmp_path / "merged"
    dest.mkdir()
    for n, rel in enumerate(("lib/systemd/system/x.service", "usr/lib/systemd/system/x.service")):
        layer = tmp_path / f"layer{n}"
        (layer / rel).parent.mkdir(parents=True)
        (layer / rel).write_text(f"layer {n}\n")
        copy_overlay(layer, dest, log, merged_usr=True)
    assert (dest / "usr/lib/systemd/system/x.service").read_text() == "layer 1\n"
    assert sorted(os.listdir(dest)) == ["usr"]


def test_install_script_replaces_a_hypersolid_link(tree, host):
    from hypersolid.container import install_script
    (tree / ".hypersolid").symlink_to(host / "dir")
    assert install_script(tree, "prepare", "#!/bin/sh\n") == "/.hypersolid/prepare"
    assert not (tree / ".hypersolid").is_symlink()
    assert stat.S_IMODE((tree / ".hypersolid/prepare").stat().st_mode) == 0o755
