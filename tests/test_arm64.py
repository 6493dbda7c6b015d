"""A foreign architecture for real: an arm64 tree bootstrapped from the mirror
and configured under qemu-user (binfmt_misc), then packed natively.

Kept small (Priority: required + netbase, no kernel) so the emulated
configure stays short; what must hold is which stages run under emulation
and when.
"""
from __future__ import annotations

import re
import subprocess

import pytest

from conftest import TestProject, mounts, needs_root_and_tools, tiny_target

pytestmark = [pytest.mark.integration, pytest.mark.foreign]

EM_AARCH64 = 183  # ELF e_machine


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_cache) -> TestProject:
    needs_root_and_tools()
    p = TestProject(tmp_path_factory.mktemp("arm64"), shared_cache)
    arm64 = tiny_target().replace("architectures: [amd64]", "architectures: [arm64]")
    p.target("small64", arm64)
    p.target("twin64", arm64.replace("hostname: tiny", "hostname: twin"))
    p.write("targets/small64/rootfs/etc/motd", "arm64\n")
    before = mounts()
    p.doit("bootfiles:small64")
    assert mounts() == before
    return p


def elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF"
    return int.from_bytes(data[18:20], "little")


def test_tree_is_arm64_and_configured_under_emulation(project):
    dist = project.root / "dist/small64"
    packages = [line.split("\t") for line in (dist / "packages-arm64.tsv").read_text().splitlines()]
    assert {arch for _, _, arch in packages} <= {"arm64", "all"}
    assert ["dpkg"] == [name for name, _, arch in packages if name == "dpkg" and arch == "arm64"]
    dpkg = subprocess.run(["unsquashfs", "-cat", str(dist / "system-arm64.img"), "usr/bin/dpkg"],
                          check=True, stdout=subprocess.PIPE).stdout
    assert elf_machine(dpkg) == EM_AARCH64
    # Configured: every package is "install ok installed" (configure checks it),
    # including those whose postinst ran arm64 binaries.
    assert {"base-files", "base-passwd", "dpkg", "netbase"} <= {name for name, _, _ in packages}


def test_overlay_edit_runs_no_emulated_stage(project):
    (project.root / "targets/small64/rootfs/etc/motd").write_text("arm64, edited\n")
    result = project.doit("bootfiles:small64")
    assert result.executed == {"rootfs:small64", "squashfs:small64", "sbom:small64", "bootfiles:small64"}
    squashfs_log = (project.root / "build/small64/arm64/logs/squashfs.log").read_text()
    assert "systemd-nspawn" not in squashfs_log  # no hooks: nothing ran in the container
    image = project.root / "dist/small64/system-arm64.img"
    assert subprocess.run(["unsquashfs", "-cat", str(image), "etc/motd"], check=True,
                          stdout=subprocess.PIPE, text=True).stdout == "arm64, edited\n"


def test_second_target_with_same_arm64_packages_reuses_the_configured_tree(project):
    result = project.doit("bootfiles:twin64")
    assert project.key("configure", "twin64", "arm64") == project.key("configure", "small64", "arm64")
    assert re.search(r"configure:twin64\s+[\d.]+s\s+cache hit", result.output)
    log = (project.root / "build/twin64/arm64/logs/configure.log").read_text()
    assert "cache hit" in log and "systemd-nspawn" not in log


def test_multi_architecture_target_gets_a_chain_per_arch_and_one_overlay(project):
    both = tiny_target().replace("architectures: [amd64]", "architectures: [amd64, arm64]")
    project.target("both", both.replace("hostname: tiny", "hostname: both"))
    result = project.doit("bootfiles:both-amd64", "bootfiles:both-arm64")
    for stage in ("bootstrap", "configure", "squashfs", "bootfiles"):
        assert {f"{stage}:both-amd64", f"{stage}:both-arm64"} <= result.executed
    assert "rootfs:both" in result.executed  # arch-independent: built once for both
    assert not [t for t in result.executed if t.startswith("rootfs:both-")]
    dist = project.root / "dist/both"
    for arch in ("amd64", "arm64"):
        assert (dist / f"system-{arch}.img").stat().st_size > 1 << 20
        assert f"\t{arch}\n" in (dist / f"packages-{arch}.tsv").read_text()
    # Same package sets as small64 (arm64) and any amd64 tiny target: configure is shared.
    assert project.key("configure", "both", "arm64") == project.key("configure", "small64", "arm64")
