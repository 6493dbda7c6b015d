"""The bootstrap's own unpack writes the tree multistrap's unpack wrote.

Fast tests for the pieces of multistrap's bookkeeping it reproduces, and
one integration test that unpacks the same .debs both ways and compares
the trees (content, modes, owners, the dpkg database, and every mtime the
image keeps: squashfs clamps mtimes to SOURCE_DATE_EPOCH, so only those
before it can differ in the image).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import TestProject, needs_root_and_tools, tiny_target
from hypersolid import lockfile, unpack
from hypersolid.cache import describe_tree
from hypersolid.debproxy import fetch_debs
from hypersolid.run import Log, run
from hypersolid.stages.bootstrap import LOCAL_CONF, local_repository, multistrap_ini, serving


def test_the_list_file_has_no_leading_dot_and_the_root_as_slash_dot():
    listing = b"./\n./usr/\n./usr/bin/\n./usr/bin/less\n./usr/share/doc/less/\n"
    assert unpack.list_lines(listing) == b"/.\n/usr\n/usr/bin\n/usr/bin/less\n/usr/share/doc/less\n"


def test_control_fields_skip_continuation_lines():
    text = b"Package: less\nVersion: 590-2\nDescription: pager\n Package: not-this\n"
    assert unpack.control_fields(text) == {"Package": "less", "Version": "590-2", "Description": "pager"}


def test_a_conffile_sum_is_md5_of_the_unpacked_file_and_empty_when_missing(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/less").write_text("x\n")
    assert unpack.conffile_md5(tmp_path, "/etc/less") == "401b30e3b8b5d629635a5c613cdb7919"
    assert unpack.conffile_md5(tmp_path, "/etc/gone") == ""
    # dpkg's flag words name no file, as md5sum found none for them
    assert unpack.conffile_md5(tmp_path, "/etc/less remove-on-upgrade") == "401b30e3b8b5d629635a5c613cdb7919"


def test_lib64_becomes_a_relative_link_and_an_absolute_one_is_removed(tmp_path):
    (tmp_path / "lib").mkdir()
    unpack.guard_lib64(tmp_path)
    assert os.readlink(tmp_path / "lib64") == "./lib"
    (tmp_path / "lib64").unlink()
    os.symlink("/lib", tmp_path / "lib64")
    unpack.guard_lib64(tmp_path)
    assert not os.path.lexists(tmp_path / "lib64")
    (tmp_path / "lib64").mkdir()
    unpack.guard_lib64(tmp_path)
    assert (tmp_path / "lib64").is_dir() and not (tmp_path / "lib64").is_symlink()


@pytest.mark.integration
def test_the_bootstrap_tree_is_the_tree_multistraps_own_unpack_makes(tmp_path_factory, shared_cache):
    needs_root_and_tools()
    project = TestProject(tmp_path_factory.mktemp("unpack"), shared_cache)
    # less: conffiles, maintainer scripts, directories shared with other packages
    project.target("tiny", tiny_target("netbase, less"))
    # a post-bootstrap hook: the bootstrap unpacks the whole set, top packages too (layers.py)
    project.write("targets/tiny/hooks/post-bootstrap.d/10-nothing", "#!/bin/sh\n", 0o755)
    project.doit("bootstrap:tiny")
    ours = project.entry("bootstrap", "tiny") / "tree"
    entries = lockfile.read(project.root / "build/tiny/amd64/resolved.lock")
    assert "less" in {e.package for e in lockfile.read(ours.parent / "packages.lock")}
    work = tmp_path_factory.mktemp("multistrap")
    log = Log(work / "log", "test")
    debs = fetch_debs(shared_cache / "debs", entries, upstream_proxy=None, log=log, stats={})
    local_repository(work / "repo", debs, "amd64", log)
    theirs = work / "tree"
    insecure = theirs / "etc/apt/apt.conf.d" / LOCAL_CONF
    insecure.parent.mkdir(parents=True)
    insecure.write_text('Acquire::AllowInsecureRepositories "true";\n')
    with serving(work / "repo") as url:
        ini = multistrap_ini("amd64", theirs, url, [e.package for e in entries]).replace("unpack=false", "unpack=true")
        (work / "ms.ini").write_text(ini)
        run(["multistrap", "-f", work / "ms.ini"], log, env={"no_proxy": "127.0.0.1"}, cwd=work)
    # what the stage removes after either unpack
    insecure.unlink()
    for leftover in [*(theirs / "etc/apt/sources.list.d").glob("multistrap-*.list"),
                     *(theirs / "var/cache/apt").glob("*.bin")]:
        leftover.unlink()
    a, b = describe_tree(theirs), describe_tree(ours)
    assert a.keys() - b.keys() == set() and b.keys() - a.keys() == set()
    assert [k for k in a if a[k] != b[k]] == []
    assert (theirs / "var/lib/dpkg/status").read_bytes() == (ours / "var/lib/dpkg/status").read_bytes()
    sde = int((project.entry("bootstrap", "tiny") / "source-date-epoch").read_text())
    kept = [k for k in a if min(os.lstat(theirs / k).st_mtime, os.lstat(ours / k).st_mtime) < sde
            and os.lstat(theirs / k).st_mtime_ns != os.lstat(ours / k).st_mtime_ns]
    assert kept == []
