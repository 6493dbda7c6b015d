"""The initramfs' early cutoff, fast: what a record names and when its
digest over a tree changes (hypersolid/initramfs_inputs.py).  The slow,
real-tree counterpart is tests/test_initramfs_cutoff.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

from hypersolid import initramfs_inputs as ii
from hypersolid.cache import Cache

KVER = "6.1.0-9-amd64"
SDE = 1_700_000_000
MEMO = "initramfs-content"


def put(root: Path, rel: str, text: str = "x", mode: int = 0o644, mtime: int = SDE - 100) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    os.utime(path, (mtime, mtime))
    return path


def make_tree(root: Path) -> Path:
    """A usr-merged tree with a kernel, initramfs-tools and a few hooks."""
    for d in ("bin", "sbin", "lib"):
        (root / "usr" / d).mkdir(parents=True, exist_ok=True)
        (root / d).symlink_to(f"usr/{d}")
    put(root, f"boot/vmlinuz-{KVER}", "kernel")
    put(root, f"usr/lib/modules/{KVER}/kernel/fs/squashfs.ko", "squashfs module")
    put(root, f"usr/lib/modules/{KVER}/modules.dep", "kernel/fs/squashfs.ko:\n")
    put(root, "usr/share/initramfs-tools/hooks/udev", "#!/bin/sh\n", 0o755)
    put(root, "usr/share/initramfs-tools/init", "#!/bin/sh\n", 0o755)
    put(root, "etc/initramfs-tools/initramfs.conf", "MODULES=most\n")
    put(root, "etc/modprobe.d/local.conf", "options x y=1\n")
    put(root, "usr/bin/cp", "cp binary", 0o755)
    put(root, "usr/bin/cpio", "cpio binary", 0o755)
    put(root, "usr/sbin/mkinitramfs", "#!/bin/sh\n", 0o755)
    put(root, "etc/ld.so.cache", "cache of every library")
    put(root, "var/lib/dpkg/status", "Package: udev\nStatus: install ok installed\nVersion: 252.1\n\n"
                                     "Package: less\nStatus: install ok installed\nVersion: 590\n")
    put(root, "var/lib/dpkg/info/udev.list", "/usr/share/initramfs-tools\n/usr/share/initramfs-tools/hooks/udev\n")
    put(root, "var/lib/dpkg/info/less.list", "/usr/bin/less\n")
    put(root, "var/lib/dpkg/info/cryptsetup-initramfs.list",
        "/etc\n/etc/cryptsetup-initramfs\n/etc/cryptsetup-initramfs/conf-hook\n"
        "/usr/share/initramfs-tools/hooks/cryptroot\n")
    put(root, "etc/cryptsetup-initramfs/conf-hook", "#KEYFILE_PATTERN=\n")
    put(root, "etc/less/lesskey", "a setting of a package the initramfs does not read")
    return root


def make_destdir(root: Path) -> Path:
    """What mkinitramfs -k leaves: copies of tree files, generated files, links."""
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    put(root, "usr/bin/cp", "cp binary", 0o755)
    put(root, f"usr/lib/modules/{KVER}/kernel/fs/squashfs.ko", "squashfs module")
    put(root, "conf/arch.conf", "DPKG_ARCH=amd64\n")
    put(root, "etc/ld.so.cache", "cache of the copied libraries")
    return root


def recorded(tmp_path: Path) -> tuple[Path, dict]:
    tree = make_tree(tmp_path / "tree")
    deps = ii.record(make_destdir(tmp_path / "dest"), tree, KVER, ["usr/bin/zstd"], "static")
    return tree, deps


def test_record_names_the_copied_files_the_kernel_and_the_tools_but_not_generated_ones(tmp_path):
    _, deps = recorded(tmp_path)
    assert {"usr/bin/cp", "bin", f"usr/lib/modules/{KVER}/kernel/fs/squashfs.ko", "conf/arch.conf",
            f"boot/vmlinuz-{KVER}", "usr/sbin/mkinitramfs", "usr/bin/zstd"} <= set(deps["files"])
    assert "etc/ld.so.cache" not in deps["files"] and "usr/bin" not in deps["files"]
    assert f"usr/lib/modules/{KVER}" in deps["listed"] and "usr/share/initramfs-tools" in deps["whole"]
    assert deps["packages"] == ["cryptsetup-initramfs", "udev"]  # own a hook; less does not
    # The hook owners' files under /etc, not their directories (/etc is everyone's).
    assert "etc/cryptsetup-initramfs/conf-hook" in deps["whole"]
    assert "etc" not in deps["whole"] and "etc/cryptsetup-initramfs" not in deps["whole"]


def test_a_package_that_adds_nothing_the_initramfs_reads_keeps_the_digest(tmp_path):
    tree, deps = recorded(tmp_path)
    before = ii.digest(deps, tree, SDE)
    put(tree, "usr/bin/less", "less binary", 0o755)
    put(tree, "usr/share/doc/less/copyright", "GPL")
    put(tree, "etc/less/lesskey", "edited by a pre-configure hook")
    put(tree, "etc/ld.so.cache", "a new library is in it")  # rebuilt from the initramfs' own libraries
    with open(tree / "var/lib/dpkg/status", "a") as f:
        f.write("\nPackage: zstd\nStatus: install ok installed\nVersion: 1.5\n")
    assert ii.digest(deps, tree, SDE) == before


def test_a_new_hook_a_changed_copied_file_or_a_new_modprobe_conf_changes_the_digest(tmp_path):
    tree, deps = recorded(tmp_path)
    before = ii.digest(deps, tree, SDE)
    changes = [
        lambda: put(tree, "usr/share/initramfs-tools/hooks/zz-busybox", "#!/bin/sh\n", 0o755),
        lambda: put(tree, "usr/bin/cp", "cp binary, new version", 0o755),
        lambda: (tree / "usr/bin/cp").chmod(0o4755),
        lambda: put(tree, "etc/modprobe.d/blacklist.conf", "blacklist x\n"),
        lambda: put(tree, f"usr/lib/modules/{KVER}/updates/dkms/extra.ko", "dkms"),
        lambda: put(tree, "usr/lib/firmware/new.bin", "firmware"),
        lambda: put(tree, "etc/initramfs-tools/conf.d/x", "BUSYBOX=y\n"),
        lambda: put(tree, f"boot/vmlinuz-{KVER}", "rebuilt kernel"),
        lambda: put(tree, "usr/bin/cpio", "another cpio", 0o755),
        lambda: put(tree, "etc/fstab", "/dev/sda1 / ext4 defaults 0 1\n"),
        lambda: put(tree, "etc/cryptsetup-initramfs/conf-hook", "KEYFILE_PATTERN=/etc/keys/*.key\n"),
        lambda: put(tree, "var/lib/dpkg/status", "Package: udev\nStatus: install ok installed\nVersion: 252.2\n"),
    ]
    seen = {before}
    for change in changes:
        change()
        now = ii.digest(deps, tree, SDE)
        assert now not in seen, f"change {len(seen)} left the digest alone"
        seen.add(now)


def test_an_mtime_counts_only_up_to_the_epoch_mkinitramfs_clamps_to(tmp_path):
    tree, deps = recorded(tmp_path)
    before = ii.digest(deps, tree, SDE)
    os.utime(tree / "usr/bin/cp", (SDE + 50, SDE + 50))
    clamped = ii.digest(deps, tree, SDE)
    os.utime(tree / "usr/bin/cp", (SDE + 99, SDE + 99))
    assert ii.digest(deps, tree, SDE) == clamped != before


def test_a_file_of_the_merged_initramfs_is_found_in_an_unmerged_tree(tmp_path):
    tree = tmp_path / "tree"
    put(tree, "bin/cp", "cp binary", 0o755)
    put(tree, f"lib/modules/{KVER}/kernel/a.ko.xz", "compressed")
    state = ii.TreeState(tree, SDE)
    try:
        assert state.file("usr/bin/cp")[0] == "bin/cp"
        assert state.file(f"usr/lib/modules/{KVER}/kernel/a.ko")[0] == f"lib/modules/{KVER}/kernel/a.ko.xz"
        assert state.listing(f"usr/lib/modules/{KVER}") == {"kernel": "dir", "kernel/a.ko.xz": "entry"}
        assert state.file("usr/bin/missing") is None
    finally:
        state.close()


def test_an_absolute_link_is_resolved_inside_the_tree_never_on_the_host(tmp_path):
    tree = tmp_path / "tree"
    put(tree, "etc/passwd", "the tree's own")
    (tree / "usr").mkdir()
    (tree / "usr/etc").symlink_to("/etc")
    state = ii.TreeState(tree, SDE)
    try:
        cand, entry = state.file("usr/etc/passwd")
        assert entry[0] == "file" and entry[-1] == ii.digest_file(tree / "etc/passwd")
    finally:
        state.close()


def memoise(cache: Cache, deps: dict, tree: Path) -> str:
    key = ii.digest(deps, tree, SDE)
    with cache.publish(MEMO, key, {"stage": MEMO}) as work:
        (work / "initramfs.img").write_text("image")
        (work / "deps.json").write_text(json.dumps(deps))
    return key


def test_find_reuses_a_memo_whose_inputs_are_unchanged_and_only_that(tmp_path):
    tree, deps = recorded(tmp_path)
    cache = Cache(tmp_path / "cache")
    assert ii.find(cache, MEMO, "static", tree, SDE) is None  # nothing memoised yet
    key = memoise(cache, deps, tree)
    put(tree, "usr/bin/less", "less binary", 0o755)
    assert ii.find(cache, MEMO, "static", tree, SDE) == (cache.entry(MEMO, key), key)
    assert ii.find(cache, MEMO, "other settings", tree, SDE) is None
    put(tree, "usr/share/initramfs-tools/hooks/zz-busybox", "#!/bin/sh\n", 0o755)
    assert ii.find(cache, MEMO, "static", tree, SDE) is None


def test_find_skips_a_memo_without_a_readable_record(tmp_path):
    tree, deps = recorded(tmp_path)
    cache = Cache(tmp_path / "cache")
    key = memoise(cache, deps, tree)
    (cache.entry(MEMO, key) / "deps.json").write_text("{not json")
    (cache.root / MEMO / "stray").mkdir()
    assert ii.find(cache, MEMO, "static", tree, SDE) is None
