"""pack -> unpack of a tree with what an image holds and a naive copy loses:
a device node, a setuid file, a hard link, a security.capability xattr, an
ACL, another owner.  Compared by describe_tree plus getfattr and getfacl.
Needs root (mknod, chown, security.* xattrs), no network."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hypersolid import entry
from hypersolid.cache import Cache, describe_tree, digest_json

MANIFEST = {"stage": "bootstrap", "settings": {"round": "trip"}}
KEY = digest_json(MANIFEST)


@pytest.fixture
def tools():
    if os.geteuid() != 0:
        pytest.skip("device nodes, owners and security.* xattrs need root")
    missing = [t for t in ("setcap", "setfacl", "getfattr", "getfacl") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"host tools missing: {', '.join(missing)} (run ./setup.sh --no-build)")


def sh(*argv: str, cwd: Path | None = None) -> str:
    return subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.PIPE, text=True).stdout


def build_tree(tree: Path) -> None:
    (tree / "dev").mkdir(parents=True)
    os.mknod(tree / "dev/null", 0o20666, os.makedev(1, 3))
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/su").write_bytes(b"\x7fELF setuid")
    os.chmod(tree / "usr/bin/su", 0o4755)
    os.link(tree / "usr/bin/su", tree / "usr/bin/su-again")
    (tree / "usr/bin/ping").write_bytes(b"\x7fELF ping")
    sh("setcap", "cap_net_raw+ep", str(tree / "usr/bin/ping"))
    (tree / "srv").mkdir()
    (tree / "srv/shared").write_text("acl\n")
    sh("setfacl", "-m", "u:1234:rw,g:4321:r", str(tree / "srv/shared"))
    sh("setfacl", "-d", "-m", "u:1234:rwx", str(tree / "srv"))
    (tree / "home/alice").mkdir(parents=True)
    os.chown(tree / "home/alice", 1000, 1000)
    os.chmod(tree / "home/alice", 0o700)
    os.symlink("../usr/bin/su", tree / "home/link")
    (tree / "var/empty").mkdir(parents=True)
    os.chmod(tree / "var/empty", 0o1777)


def attributes(tree: Path) -> tuple[str, str]:
    """getfattr and getfacl of everything, by path relative to the tree."""
    return (sh("getfattr", "--absolute-names", "-d", "-m", "-", "-R", "-P", ".", cwd=tree),
            sh("getfacl", "-R", "-P", ".", cwd=tree))


def test_a_tree_survives_pack_and_unpack_with_nodes_setuid_links_caps_and_acls(tools, tmp_path):
    cache = Cache(tmp_path / "cache")
    with cache.publish("bootstrap", KEY, MANIFEST) as work:
        build_tree(work / "tree")
    before = cache.entry("bootstrap", KEY) / "tree"
    assert "security.capability" in attributes(before)[0] and "user:1234:rw-" in attributes(before)[1]

    manifest, blobs = entry.pack(cache, "bootstrap", KEY, tmp_path / "blobs")
    assert entry.pack(cache, "bootstrap", KEY, tmp_path / "blobs2")[0] == manifest
    by = {b.digest: b.path for b in blobs}
    other = Cache(tmp_path / "other")
    after = entry.unpack(other, "bootstrap", KEY, manifest, lambda d: entry.file_chunks(by[d["digest"]])) / "tree"

    assert describe_tree(after) == describe_tree(before)
    assert attributes(after) == attributes(before)
    assert os.stat(after / "usr/bin/su").st_ino == os.stat(after / "usr/bin/su-again").st_ino
    assert os.stat(after / "dev/null").st_rdev == os.makedev(1, 3)
    assert entry.verify("bootstrap", KEY, after.parent) == []
