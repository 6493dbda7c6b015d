"""Raspberry Pi boot partitions (dist/<target>/boot/) from Debian's packages."""
from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest

from hypersolid.config import Project
from hypersolid.raspberrypi import cmdline_txt, config_txt

REPO = Path(__file__).resolve().parents[1]


def test_config_txt_names_the_kernel_initramfs_and_device_tree():
    rpi4 = Project(REPO).load("rpi4")
    text = config_txt(rpi4, "arm64", "kernel-arm64.img", "initramfs-arm64.img")
    lines = text.splitlines()
    assert "arm_64bit=1" in lines and "upstream_kernel=1" in lines and "enable_uart=1" in lines
    assert "kernel=kernel-arm64.img" in lines
    assert "initramfs initramfs-arm64.img followkernel" in lines
    assert "device_tree=bcm2711-rpi-4-b.dtb" in lines


def test_config_txt_for_32_bit_has_no_arm_64bit():
    zero = Project(REPO).load("rpi-zero-w")
    text = config_txt(zero, "armel", "kernel-armel.img", "initramfs-armel.img")
    assert "arm_64bit" not in text and "device_tree=bcm2835-rpi-zero-w.dtb" in text


def test_cmdline_txt_boots_hypersolid_from_the_system_partition():
    params = cmdline_txt(Project(REPO).load("rpi3")).split()
    assert params[:2] == ["console=tty0", "console=ttyS1,115200"]
    assert "boot=hypersolid" in params and "root=LABEL=hs-system" in params
    assert "cma=64M" in params  # from the target's kernel_cmdline


def arm64_kernel(data: bytes) -> bool:
    """An arm64 Image has "ARM\\x64" at offset 56 (gzip-wrapped on some kernels)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data[56:60] == b"ARM\x64"


@pytest.mark.integration
@pytest.mark.foreign
def test_rpi4_boot_partition_has_everything_its_config_names(default_project):
    default_project.doit("bootfiles:rpi4")
    dist = default_project.root / "dist/rpi4"
    boot = dist / "boot"
    config = (boot / "config.txt").read_text()
    cmdline = (boot / "cmdline.txt").read_text()
    named = re.findall(r"^kernel=(\S+)$", config, re.M) + re.findall(r"^initramfs (\S+)", config, re.M)
    named += re.findall(r"^device_tree=(\S+)$", config, re.M)
    assert len(named) == 3
    for name in named:
        assert (boot / name).is_file(), name
    assert (boot / "bcm2711-rpi-4-b.dtb").read_bytes()[:4] == b"\xd0\x0d\xfe\xed"  # FDT magic
    for firmware in ("start4.elf", "fixup4.dat"):  # what a Pi 4's boot ROM loads
        assert (boot / firmware).stat().st_size > 0
    assert arm64_kernel((boot / "kernel-arm64.img").read_bytes())
    assert (boot / "kernel-arm64.img").read_bytes() == (dist / "kernel-arm64.img").read_bytes()
    assert "boot=hypersolid" in cmdline and "root=LABEL=hs-system" in cmdline
    assert (dist / "system-arm64.img").stat().st_size > 1 << 20
    packages = (dist / "packages-arm64.tsv").read_text()
    for pkg in ("raspi-firmware", "firmware-brcm80211", "linux-image-arm64", "wpasupplicant"):
        assert re.search(rf"^{pkg}\t", packages, re.M), pkg
