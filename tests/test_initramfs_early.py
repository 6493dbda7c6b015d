"""The early initramfs, fast: when configure starts one beside itself, and
what it does to its copy of the bootstrap tree (hypersolid/stages/initramfs.py).
The real-tree counterpart, bytes compared with an initramfs made after
configure, is in tests/test_initramfs_cutoff.py."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from hypersolid import initramfs_inputs as ii
from hypersolid.cache import Cache
from hypersolid.config import Project, clear_caches
from hypersolid.run import BuildError, Isolated, Log
from hypersolid.stages import Unit, initramfs

KVER = "6.1.0-9-amd64"
TARGET = """\
architectures: [amd64]
suite: bookworm
mirror: http://deb.debian.org/debian
sections:
  - name: debian
    packages: [linux-image-amd64, initramfs-tools, zstd]
hostname: one
"""


def put(root: Path, rel: str, text: str = "x", mode: int = 0o644) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def bootstrap_tree(root: Path, owners: dict[str, bool]) -> Path:
    """An unpacked tree with a kernel, mkinitramfs and zstd; `owners`:
    packages installing an initramfs-tools hook, and whether each has a postinst."""
    put(root, f"boot/vmlinuz-{KVER}", "kernel")
    put(root, f"lib/modules/{KVER}/kernel/fs/squashfs.ko", "module")
    put(root, "usr/sbin/mkinitramfs", "#!/bin/sh\n", 0o755)
    put(root, "usr/bin/zstd", "zstd", 0o755)
    status = ""
    for name, postinst in owners.items():
        put(root, f"var/lib/dpkg/info/{name}.list", f"/usr/share/initramfs-tools/hooks/{name}\n")
        if postinst:
            put(root, f"var/lib/dpkg/info/{name}.postinst", "#!/bin/sh\n", 0o755)
        status += f"Package: {name}\nStatus: install ok unpacked\nVersion: 1.0\n\n"
    put(root, "var/lib/dpkg/status", status)
    return root


@pytest.fixture
def unit(tmp_path, monkeypatch) -> Unit:
    monkeypatch.setenv(initramfs.EARLY_ENV, "1")  # the tree is amd64, like this host
    project = Project(tmp_path / "project")
    put(project.root, "targets/t/target.yaml", TARGET)
    clear_caches()
    return Unit(project, project.load("t"), "amd64", Cache(tmp_path / "cache"))


def test_a_hook_owner_with_a_postinst_nobody_read_keeps_the_initramfs_after_configure(unit, tmp_path):
    tree = bootstrap_tree(tmp_path / "tree", {"udev": True, "dropbear-initramfs": True})
    log = Log(tmp_path / "configure.log", "configure")
    assert initramfs.start_early(unit, tree, tmp_path / "early", log) is None
    assert "the postinst of dropbear-initramfs may make what it holds" in log.path.read_text()
    assert not (tmp_path / "early").exists()


def test_a_target_with_a_pre_configure_hook_keeps_the_initramfs_after_configure(unit, tmp_path):
    """A hook may write anything, also a file a hook of initramfs-tools copies if it exists."""
    put(unit.project.root, "targets/t/hooks/pre-configure.d/10-crypttab", "#!/bin/sh\n", 0o755)
    clear_caches()
    unit = Unit(unit.project, unit.project.load("t"), "amd64", unit.cache)
    tree = bootstrap_tree(tmp_path / "tree", {"udev": True})
    log = Log(tmp_path / "configure.log", "configure")
    assert initramfs.start_early(unit, tree, tmp_path / "early", log) is None
    assert "a pre-configure hook may change" in log.path.read_text()


def test_a_serial_build_makes_no_early_initramfs(unit, tmp_path, monkeypatch):
    tree = bootstrap_tree(tmp_path / "tree", {"udev": True})
    log = Log(tmp_path / "log", "configure")
    monkeypatch.setenv("HYPERSOLID_JOBS", "2")
    with pytest.raises(BuildError, match="bootstrap"):  # it goes on: to the epoch of a bootstrap never built here
        initramfs.start_early(unit, tree, tmp_path / "early", log)
    monkeypatch.setenv("HYPERSOLID_JOBS", "1")
    assert initramfs.start_early(unit, tree, tmp_path / "early", log) is None


def test_by_default_only_an_emulated_build_makes_an_early_initramfs(unit, tmp_path, monkeypatch):
    """Natively mkinitramfs takes seconds beside squashfs: a copy of the tree would cost what it saves."""
    from hypersolid import container
    tree = bootstrap_tree(tmp_path / "tree", {"udev": True})
    log = Log(tmp_path / "log", "configure")
    monkeypatch.delenv(initramfs.EARLY_ENV)
    monkeypatch.setattr(container, "emulated", lambda arch: False)
    assert initramfs.start_early(unit, tree, tmp_path / "early", log) is None
    monkeypatch.setattr(container, "emulated", lambda arch: True)
    with pytest.raises(BuildError, match="bootstrap"):  # it goes on: to the epoch of a bootstrap never built here
        initramfs.start_early(unit, tree, tmp_path / "early", log)
    monkeypatch.setenv(initramfs.EARLY_ENV, "0")
    assert initramfs.start_early(unit, tree, tmp_path / "early", log) is None


def test_a_tree_without_mkinitramfs_is_left_to_the_stage_that_says_so(unit, tmp_path):
    tree = bootstrap_tree(tmp_path / "tree", {"udev": True})
    (tree / "usr/sbin/mkinitramfs").unlink()
    assert initramfs.start_early(unit, tree, tmp_path / "early", Log(tmp_path / "log", "configure")) is None


def test_every_audited_owner_says_why_its_postinst_is_harmless():
    assert all(len(reason) > 10 for reason in initramfs.AUDITED.values())


def test_unpacked_packages_count_as_installed_only_for_an_unconfigured_tree(tmp_path):
    tree = bootstrap_tree(tmp_path / "tree", {"udev": False})
    assert ii.package_versions(tree, ["udev"]) == {"udev": None}
    assert ii.package_versions(tree, ["udev"], unpacked=True) == {"udev": "1.0"}


def test_biarch_cleanup_drops_an_unowned_lib64_link_and_keeps_an_owned_one(tmp_path):
    """usrmerge's postinst on a first install: multistrap's `lib64 -> ./lib`
    goes on arm64, libc6's /lib64 stays on amd64."""
    arm = tmp_path / "arm"
    (arm / "usr/lib").mkdir(parents=True)
    (arm / "lib").symlink_to("usr/lib")
    (arm / "lib64").symlink_to("./lib")
    (arm / "usr/lib64").mkdir()
    put(arm, "var/lib/dpkg/info/libc6.list", "/lib\n/usr/lib\n")
    initramfs._cleanup_biarch(arm)
    assert not os.path.lexists(arm / "lib64") and not (arm / "usr/lib64").exists()

    amd = tmp_path / "amd"
    (amd / "usr/lib64").mkdir(parents=True)
    (amd / "lib64").symlink_to("usr/lib64")
    put(amd, "usr/lib64/ld-linux-x86-64.so.2", "loader")
    put(amd, "var/lib/dpkg/info/libc6.list", "/lib64\n/usr/lib64\n/usr/lib64/ld-linux-x86-64.so.2\n")
    initramfs._cleanup_biarch(amd)
    assert (amd / "lib64").is_symlink() and (amd / "usr/lib64/ld-linux-x86-64.so.2").exists()


def test_biarch_cleanup_leaves_a_dangling_link_and_a_real_directory_as_the_postinst_does(tmp_path):
    (tmp_path / "lib32").symlink_to("./nowhere")
    (tmp_path / "libx32").mkdir()
    (tmp_path / "var/lib/dpkg/info").mkdir(parents=True)
    initramfs._cleanup_biarch(tmp_path)
    assert (tmp_path / "lib32").is_symlink() and (tmp_path / "libx32").is_dir()


def slow_value(seconds: float) -> str:
    time.sleep(seconds)
    return "made"


def failing() -> None:
    raise BuildError("early", "no kernel")


def test_an_isolated_child_works_while_the_parent_does_and_hands_back_its_result():
    started = time.monotonic()
    child = Isolated(slow_value, 0.5)
    assert time.monotonic() - started < 0.4  # not waited for yet
    assert child.wait() == "made"
    with pytest.raises(BuildError, match="no kernel"):
        Isolated(failing).wait()


def test_killing_an_isolated_child_stops_it_and_reaps_it():
    child = Isolated(slow_value, 60)
    child.kill()
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)
    with pytest.raises(ProcessLookupError):
        os.kill(child.pid, signal.SIG_DFL)
