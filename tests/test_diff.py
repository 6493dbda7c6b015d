"""`hypersolid diff`: the comparison on real squashfs images made here with
mksquashfs from small hand-made trees (no build), and on two built images."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hypersolid import diff
from tests.conftest import REPO, TestProject, needs_root_and_tools, tiny_target

STATUS = """\
Package: base-files
Status: install ok installed
Architecture: amd64
Version: 12.4

Package: netbase
Status: install ok installed
Architecture: all
Version: 6.4

Package: gone
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0
"""


def needs_squashfs_and_root() -> None:
    if shutil.which("mksquashfs") is None or shutil.which("unsquashfs") is None:
        pytest.fail("squashfs-tools missing (run ./setup.sh --no-build)")
    if os.geteuid() != 0:
        pytest.skip("extracting images with their owners needs root")


def tree(root: Path, status: str = STATUS) -> Path:
    """A small system tree: a dpkg status, a few files, a link, a directory."""
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(status)
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("one\n")
    (root / "etc/motd").write_text("hello\n")
    (root / "etc/shadow").write_text("root:*:1:0:99999:7:::\n")
    (root / "etc/shadow").chmod(0o640)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_text("#!/bin/sh\n")
    (root / "usr/bin/tool").chmod(0o755)
    os.symlink("/usr/share/zoneinfo/UTC", root / "etc/localtime")
    return root


def squash(src: Path, image: Path) -> Path:
    subprocess.run(["mksquashfs", src, image, "-noappend", "-no-progress", "-quiet", "-comp", "gzip"],
                   check=True, stdout=subprocess.DEVNULL)
    return image


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hypersolid.cli", "diff", *map(str, args)], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)


@pytest.fixture
def images(tmp_path):
    """A: the base tree; B: one package changed, one added, one removed; files
    changed in content only, in size, in mode, in owner, in link target;
    one file added, one removed."""
    needs_squashfs_and_root()
    a = tree(tmp_path / "a")
    b = tree(tmp_path / "b", STATUS.replace("Version: 12.4", "Version: 12.4+deb12u1")
             .replace("Package: netbase", "Package: zstd"))
    (b / "etc/hostname").write_text("two\n")              # same size, other bytes
    (b / "etc/motd").write_text("hello world\n")          # size
    (b / "usr/bin/tool").chmod(0o700)                      # mode
    os.chown(b / "etc/shadow", 0, 42)                      # owner
    os.remove(b / "etc/localtime")
    os.symlink("/usr/share/zoneinfo/Europe/Berlin", b / "etc/localtime")  # link target
    (b / "etc/new").write_text("x")                        # added
    (a / "usr/bin/old").write_text("old\n")               # removed
    return squash(a, tmp_path / "system-amd64.img"), squash(b, tmp_path / "b-system-amd64.img")


def test_identical_images_report_nothing(images, tmp_path):
    a, _ = images
    copy = tmp_path / "copy.img"
    shutil.copy(a, copy)
    [d] = diff.compare(str(a), str(copy))
    assert d.identical and not d.files and not d.packages


def test_images_differing_report_each_package_and_file_change(images):
    a, b = images
    [d] = diff.compare(str(a), str(b))
    assert d.arch == "amd64"
    assert [(c.what, c.name, c.old, c.new) for c in d.packages] == [
        ("changed", "base-files", "12.4 amd64", "12.4+deb12u1 amd64"),
        ("removed", "netbase", "6.4 all", ""),
        ("added", "zstd", "", "6.4 all"),
    ]
    files = {c.name: c for c in d.files}
    assert files["/etc/hostname"].differs == {"content": ["", ""]}
    assert files["/etc/motd"].differs == {"size": [6, 12]}
    assert files["/usr/bin/tool"].differs == {"mode": ["0755", "0700"]}
    assert files["/etc/shadow"].differs == {"owner": ["0:0", "0:42"]}
    assert files["/etc/localtime"].differs == {"target": ["/usr/share/zoneinfo/UTC",
                                                          "/usr/share/zoneinfo/Europe/Berlin"]}
    assert files["/etc/new"].what == "added" and files["/etc/new"].new == "file 0644 0:0, 1 bytes"
    assert files["/usr/bin/old"].what == "removed" and files["/usr/bin/old"].old == "file 0644 0:0, 4 bytes"
    assert files["/var/lib/dpkg/status"].what == "changed"
    assert set(files) == {"/etc/hostname", "/etc/motd", "/usr/bin/tool", "/etc/shadow", "/etc/localtime",
                          "/etc/new", "/usr/bin/old", "/var/lib/dpkg/status"}


def test_cli_prints_one_line_per_change_and_exits_1(images):
    a, b = images
    r = cli(a, b)
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert "packages (amd64):" in lines and "files (amd64):" in lines
    assert "  ~ base-files 12.4 amd64 -> 12.4+deb12u1 amd64" in lines
    assert "  ~ /usr/bin/tool  mode 0755 -> 0700" in lines
    assert "  + /etc/new  (file 0644 0:0, 1 bytes)" in lines
    assert lines[-1] == "different: 3 packages, 8 files, 0 boot files"


def test_cli_json_gives_the_same_report(images):
    a, b = images
    r = cli(a, b, "--json")
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)
    assert report["identical"] is False
    amd64 = report["architectures"]["amd64"]
    assert {c["name"] for c in amd64["packages"]} == {"base-files", "netbase", "zstd"}
    assert len(amd64["files"]) == 8


def test_cli_same_image_exits_0(images):
    a, _ = images
    r = cli(a, a)
    assert (r.returncode, r.stdout.strip()) == (0, "identical"), r.stderr


@pytest.mark.parametrize("args, message", [
    (("missing.img", "missing.img"), "missing.img: no such file or directory"),
    (("dir", "file"), "give two dist directories or two image files"),
    (("file", "file"), "file: not a squashfs image"),
    (("dir", "dir"), "dir: not a dist directory"),
])
def test_bad_paths_are_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("not an image")
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout == "" and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def dist(root: Path, image: Path, packages: str, kernel: bytes) -> Path:
    root.mkdir()
    shutil.copy(image, root / "system-amd64.img")
    (root / "packages-amd64.tsv").write_text(packages)
    (root / "kernel-amd64.img").write_bytes(kernel)
    (root / "initramfs-amd64.img").write_bytes(b"initramfs")
    (root / "build-amd64.json").write_text(json.dumps({"kernel_version": kernel.decode()}))
    return root


def test_dist_dirs_report_packages_from_the_tsv_and_boot_files(images, tmp_path):
    a, b = images
    da = dist(tmp_path / "da", a, "base-files\t12.4\tamd64\n", b"6.1.0-26")
    db = dist(tmp_path / "db", b, "base-files\t12.5\tamd64\n", b"6.1.0-27")
    [d] = diff.compare(str(da), str(db))
    assert [(c.name, c.old, c.new) for c in d.packages] == [("base-files", "12.4 amd64", "12.5 amd64")]
    assert [(c.name, c.what) for c in d.boot] == [("initramfs-amd64.img", "unchanged"),
                                                  ("kernel-amd64.img", "changed"),
                                                  ("system-amd64.img", "changed")]
    assert "  ~ kernel-amd64.img changed (6.1.0-26 -> 6.1.0-27)" in diff.format_text([d]).splitlines()
    assert len(d.files) == 8


def test_dist_dirs_per_architecture(images, tmp_path):
    a, _ = images
    da = dist(tmp_path / "da", a, "base-files\t12.4\tamd64\n", b"k")
    db = dist(tmp_path / "db", a, "base-files\t12.4\tamd64\n", b"k")
    (db / "packages-arm64.tsv").write_text("base-files\t12.4\tarm64\n")
    d = diff.compare(str(da), str(db))
    assert [(x.arch, x.identical, x.note) for x in d] == [("amd64", True, ""), ("arm64", False, "only in B")]


@pytest.mark.integration
def test_two_built_images_differ_by_exactly_one_package_and_one_overlay_file(tmp_path, shared_cache):
    """Two tiny targets (no kernel) built with the shared cache: B adds one
    package and one overlay file; the diff names exactly those."""
    needs_root_and_tools()
    p = TestProject(tmp_path, shared_cache)
    p.target("one", tiny_target("netbase"))
    p.target("two", tiny_target("netbase, less"))
    p.write("targets/two/rootfs/etc/extra.conf", "extra\n")
    p.doit("bootfiles:one", "bootfiles:two")
    one, two = p.root / "dist/one", p.root / "dist/two"

    r = cli(one, two, "--json", cwd=p.root)
    assert r.returncode == 1, r.stderr
    amd64 = json.loads(r.stdout)["architectures"]["amd64"]
    assert [(c["what"], c["name"]) for c in amd64["packages"]] == [("added", "less")]
    added = {c["name"] for c in amd64["files"] if c["what"] == "added"}
    assert {"/etc/extra.conf", "/usr/bin/less"} <= added
    # Every other change is the package's own files, dpkg's and the
    # alternatives' records of it, the ld.so cache, or the build id.
    less_files = set(subprocess.run(["unsquashfs", "-cat", two / "system-amd64.img", "var/lib/dpkg/info/less.list"],
                                    check=True, capture_output=True, text=True).stdout.split())
    bookkeeping = ("/var/lib/dpkg/info/less.", "/var/lib/dpkg/alternatives/", "/etc/alternatives/",
                   "/.hypersolid/")
    others = {c["name"] for c in amd64["files"]} - less_files - {"/etc/extra.conf"}
    others = {n for n in others if not n.startswith(bookkeeping)}
    assert others <= {"/var/lib/dpkg/status", "/var/lib/dpkg/status-old", "/var/lib/dpkg/available",
                      "/var/cache/ldconfig/aux-cache"}, others

    for same in (one, two / "system-amd64.img"):
        r = cli(same, same, cwd=p.root)
        assert (r.returncode, r.stdout.splitlines()[-1]) == (0, "identical"), r.stdout + r.stderr
