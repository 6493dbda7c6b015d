"""The native merged-/usr conversion (usrmerge.py): what convert-usrmerge
leaves, without its cp per file under qemu-user."""
from __future__ import annotations

import os
import shutil

import pytest

from conftest import TestProject, needs_root_and_tools, tiny_target
from hypersolid import usrmerge
from hypersolid.cache import describe_tree
from hypersolid.container import run_in
from hypersolid.run import Log


def unmerged(root):
    for d in ("bin", "sbin", "lib/x86_64-linux-gnu", "lib64", "usr/bin", "usr/sbin", "usr/lib/x86_64-linux-gnu"):
        (root / d).mkdir(parents=True)
    (root / "bin/ls").write_text("ls")
    (root / "bin/gunzip").write_text("gz")
    os.link(root / "bin/gunzip", root / "bin/uncompress")
    os.symlink("ls", root / "bin/dir")
    (root / "sbin/tool").write_text("t")
    os.chmod(root / "sbin/tool", 0o4755)
    (root / "lib/x86_64-linux-gnu/libc.so.6").write_text("libc")
    (root / "usr/lib/x86_64-linux-gnu/libz.so.1").write_text("z")
    os.symlink("/lib/x86_64-linux-gnu/libc.so.6", root / "lib64/ld.so")
    (root / "usr/bin/same").symlink_to("/bin/ls")
    (root / "bin/same").symlink_to("ls")
    return root


def test_every_entry_moves_under_usr_and_the_directories_become_relative_links(tmp_path):
    root = unmerged(tmp_path)
    assert usrmerge.merge(root) == ["bin", "sbin", "lib", "lib64"]
    for d in ("bin", "sbin", "lib", "lib64"):
        assert os.readlink(root / d) == f"usr/{d}"
    assert (root / "usr/bin/ls").read_text() == "ls"
    assert (root / "usr/lib/x86_64-linux-gnu/libc.so.6").read_text() == "libc"
    assert (root / "usr/lib/x86_64-linux-gnu/libz.so.1").read_text() == "z"  # directories merged
    assert os.readlink(root / "usr/bin/dir") == "ls" and os.readlink(root / "usr/bin/same") == "/bin/ls"
    assert os.readlink(root / "usr/lib64/ld.so") == "/lib/x86_64-linux-gnu/libc.so.6"
    assert os.stat(root / "usr/sbin/tool").st_mode & 0o7777 == 0o4755
    # cp makes a new inode per name: hard links between merged names end
    assert os.stat(root / "usr/bin/gunzip").st_ino != os.stat(root / "usr/bin/uncompress").st_ino
    assert (root / "usr/bin/uncompress").read_text() == "gz"
    assert usrmerge.merge(root) == []  # merged already


def test_a_directory_that_is_already_a_link_is_left_alone(tmp_path):
    root = unmerged(tmp_path)
    shutil.rmtree(root / "lib64")
    os.symlink("./lib", root / "lib64")  # multistrap's guard
    assert usrmerge.merge(root) == ["bin", "sbin", "lib"]
    assert os.readlink(root / "lib64") == "./lib" and not (root / "usr/lib64").exists()


@pytest.mark.parametrize("conflict", ["file in both", "broken link"])
def test_a_case_for_convert_usrmerge_leaves_the_tree_untouched(tmp_path, conflict):
    root = unmerged(tmp_path)
    if conflict == "file in both":
        (root / "usr/sbin/tool").write_text("other")
    else:
        os.symlink("missing", root / "bin/gone")
        os.symlink("missing-too", root / "usr/bin/gone")
    before = describe_tree(root)
    with pytest.raises(usrmerge.NotSimple):
        usrmerge.merge(root)
    assert describe_tree(root) == before


def test_a_usr_directory_that_is_a_link_out_of_the_tree_is_refused(tmp_path):
    outside = tmp_path / "host-bin"
    outside.mkdir()
    root = unmerged(tmp_path / "tree")
    shutil.rmtree(root / "usr/bin")
    os.symlink(str(outside), root / "usr/bin")
    before = describe_tree(root)
    with pytest.raises(usrmerge.NotSimple):
        usrmerge.merge(root)
    assert describe_tree(root) == before and list(outside.iterdir()) == []


@pytest.mark.integration
def test_the_native_merge_leaves_a_bootstrap_tree_as_convert_usrmerge_does(tmp_path_factory, shared_cache):
    needs_root_and_tools()
    project = TestProject(tmp_path_factory.mktemp("usrmerge"), shared_cache)
    # bc brings libreadline8 into the base: a base of its own, configured here (not a memo)
    project.target("tiny", tiny_target("netbase, usrmerge, bc"))
    project.doit("configure:tiny")
    log = (project.root / "build/tiny/amd64/logs/configure.log").read_text()
    assert "# merged /usr natively: bin sbin lib lib64" in log
    work = tmp_path_factory.mktemp("trees")
    ours, theirs = work / "ours", work / "theirs"
    for copy in (ours, theirs):
        shutil.copytree(project.entry("bootstrap", "tiny") / "tree", copy, symlinks=True)
    usrmerge.merge(ours)
    run_in(theirs, ["/usr/lib/usrmerge/convert-usrmerge"], Log(work / "convert.log", "test"), "amd64")
    assert "successfully converted" in (work / "convert.log").read_text()
    a, b = describe_tree(ours), describe_tree(theirs)
    assert {k: v for k, v in a.items() if a.get(k) != b.get(k)} == {}
    assert set(a) == set(b)
    configured = project.entry("configure", "tiny") / "tree"
    assert os.readlink(configured / "bin") == "usr/bin"
    assert "/usr/bin/sh" in (configured / "etc/shells").read_text().split()
