"""The disk stage (flashable images), booting them, and `hypersolid flash`.

Fast tests: the layout arithmetic, the sfdisk script, the config checks and
the flash refusals that need no built image.  Integration tests build
qemu-amd64 and rpi3 once per session (rpi3 is slow cold: ~7 min under
qemu-user) and share them: layout per board, same bytes twice, one boot
per image.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TestProject, checkout_copy, needs_root_and_tools, tiny_target
from hypersolid import flash
from hypersolid.config import ConfigError, Project
from hypersolid.diskboot import disk_machine, partitions
from hypersolid.run import Log
from hypersolid.stages.disk import GPT_ESP, GPT_LINUX, layout, pi_cmdline, sfdisk_script

MiB = 1 << 20
BUILD = "0b1d5e9c-1a2b-4c3d-8e9f-001122334455"


def shipped(name: str):
    return Project(REPO).load(name)


# --- layout, fast ----------------------------------------------------------------

def test_pi_layout_is_mbr_boot_then_system_with_a_power_of_two_size():
    parts, total = layout(shipped("rpi3"), 300 * MiB)
    assert [(p.label, p.fs, p.type) for p in parts] == [("RPIBOOT", "vfat", "c"), ("hs-system", "ext4", "83")]
    assert parts[0].start == 1 and parts[1].start == 1 + parts[0].size
    assert parts[1].size == 2 * 300 + 64  # room for the next image beside this one
    assert total == 1024 and total & (total - 1) == 0


def test_uefi_layout_is_esp_then_system_and_leaves_the_gpt_backup_room():
    parts, total = layout(shipped("qemu-amd64"), 200 * MiB)
    assert [(p.label, p.type) for p in parts] == [("ESP", GPT_ESP), ("hs-system", GPT_LINUX)]
    assert total == parts[-1].start + parts[-1].size + 1


def test_storage_rest_fills_the_given_size(tmp_path):
    t = write_target(tmp_path, "disk: {size: 2G, storage_size: rest}\n")
    parts, total = layout(t, 100 * MiB)
    assert total == 2048 and parts[-1].label == "hs-storage"
    assert parts[-1].start + parts[-1].size == 2047


def test_a_disk_size_too_small_names_the_setting(tmp_path):
    with pytest.raises(ValueError, match=r"disk.size 300M is smaller"):
        layout(write_target(tmp_path, "disk: {size: 300M}\n"), 100 * MiB)


def test_storage_rest_with_a_minimal_size_is_a_config_error_at_its_line(tmp_path):
    with pytest.raises(ConfigError, match=r"target.yaml:\d+: disk.storage_size: rest needs a total size"):
        write_target(tmp_path, "disk:\n  storage_size: rest\n")


def test_a_bad_disk_size_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"disk.boot_size: .*a size such as 256M"):
        write_target(tmp_path, "disk: {boot_size: 256MB}\n")


def test_sfdisk_script_has_fixed_ids_from_the_build():
    parts, _ = layout(shipped("qemu-amd64"), 200 * MiB)
    script = sfdisk_script(parts, BUILD, pi=False)
    assert script == sfdisk_script(parts, BUILD, pi=False)
    assert "label: gpt" in script and script.count("uuid=") == 2 and 'name="hs-system"' in script
    assert sfdisk_script(parts, "1" * 8 + BUILD[8:], pi=False) != script


def test_pi_cmdline_names_the_storage_partition_only_when_there_is_one():
    line = "console=tty0 console=ttyS1,115200 boot=hypersolid root=LABEL=hs-system\n"
    assert "pstorage" not in pi_cmdline(line, False)
    assert pi_cmdline(line, True).split()[-1] == "pstorage=LABEL=hs-storage"


def write_target(tmp_path: Path, extra: str):
    p = TestProject(tmp_path / "p", tmp_path / "cache")
    p.target("t", tiny_target(extra=extra))
    return Project(p.root).load("t")


# --- flash refusals, fast (read-only checks of the host's devices) --------------

def test_flash_refuses_a_regular_file(tmp_path):
    f = tmp_path / "not-a-disk.img"
    f.write_bytes(b"\0" * 4096)
    with pytest.raises(flash.Refused, match="is not a block device"):
        flash.check(f)


def test_flash_refuses_a_missing_device(tmp_path):
    with pytest.raises(flash.Refused, match="No such file"):
        flash.check(tmp_path / "sdz")


def host_root_device() -> Path | None:
    st = os.stat("/")
    node = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    dev = Path("/dev") / node.resolve().name if node.exists() else None
    return dev if dev and dev.exists() else None


def test_flash_refuses_the_mounted_disk_of_the_running_system():
    dev = host_root_device()
    if dev is None:
        pytest.skip("/ is not on a block device with a node in /dev here")
    with pytest.raises(flash.Refused, match="is mounted on|holds the running system|is a partition"):
        flash.check(dev)
    assert flash.whole_disks(os.stat("/").st_dev) <= flash.running_system_disks()


def test_flash_refuses_a_partition():
    parts = [p for p in Path("/sys/class/block").iterdir() if (p / "partition").exists()
             and (Path("/dev") / p.name).exists()]
    if not parts:
        pytest.skip("no partition device on this machine (its disk is unpartitioned)")
    with pytest.raises(flash.Refused, match="is a partition of|is mounted|running system"):
        flash.check(Path("/dev") / parts[0].name)


def test_flash_confirmation_shows_model_and_size_and_needs_yes():
    dev = flash.Device(Path("/dev/sdz"), "sdz", "Card Reader", 32 * 10**9)
    asked = []
    assert not flash.confirm(dev, Path("disk-arm64.img"), lambda q: asked.append(q) or "y")
    assert "Card Reader" in asked[0] and "32.0 GB" in asked[0]
    assert flash.confirm(dev, Path("disk-arm64.img"), lambda q: "yes")


# --- built images ------------------------------------------------------------------

@pytest.fixture(scope="session")
def disk_project(tmp_path_factory, shared_cache) -> TestProject:
    needs_root_and_tools()
    p = TestProject(checkout_copy(tmp_path_factory.mktemp("disk-checkout")), shared_cache)
    p.doit("disk:qemu-amd64")
    return p


@pytest.fixture(scope="session")
def rpi3_project(disk_project) -> TestProject:
    disk_project.doit("disk:rpi3", timeout=3600)
    return disk_project


def fat_files(image: Path) -> dict[str, int]:
    """Path -> size of every file on the image's first (FAT) partition."""
    start = partitions(image)[0]["start"] * 512
    out = subprocess.run(["mdir", "-/", "-a", "-b", "-i", f"{image}@@{start}", "::/"], check=True,
                         env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}, stdout=subprocess.PIPE, text=True).stdout
    return {line.strip().removeprefix("::/"): 0 for line in out.splitlines() if line.strip()}


def fat_text(image: Path, name: str) -> str:
    start = partitions(image)[0]["start"] * 512
    return subprocess.run(["mtype", "-i", f"{image}@@{start}", f"::/{name}"], check=True, text=True,
                          env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}, stdout=subprocess.PIPE).stdout


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@pytest.mark.integration
def test_uefi_disk_layout_holds_systemd_boot_kernel_and_entry(disk_project):
    img = disk_project.root / "dist/qemu-amd64/disk-amd64.img"
    table = json.loads(subprocess.run(["sfdisk", "--json", img], check=True, stdout=subprocess.PIPE).stdout)
    table = table["partitiontable"]
    assert table["label"] == "gpt"
    assert [(p["type"], p["name"]) for p in table["partitions"]] == [(GPT_ESP, "ESP"), (GPT_LINUX, "hs-system")]
    files = fat_files(img)
    for f in ("EFI/BOOT/BOOTX64.EFI", "loader/loader.conf", "loader/entries/hypersolid.conf",
              "hypersolid/kernel-amd64.img", "hypersolid/initramfs-amd64.img"):
        assert f in files, sorted(files)
    entry = fat_text(img, "loader/entries/hypersolid.conf")
    assert re.search(r"^options console=tty0 console=ttyS0 root=LABEL=hs-system", entry, re.M), entry
    assert "boot=" not in entry  # the initramfs defaults to the hypersolid script
    assert (img.with_suffix(".bmap")).read_text().startswith("<?xml")


def rebuilt_the_same(project: TestProject, target: str, arch: str) -> None:
    dist = project.root / "dist" / target
    first = {n: digest(dist / n) for n in (f"disk-{arch}.img", f"disk-{arch}.bmap")}
    for n in first:
        (dist / n).unlink()
    result = project.doit(f"disk:{target}")
    assert f"disk:{target}" in result.executed
    assert {n: digest(dist / n) for n in first} == first


@pytest.mark.integration
def test_disk_image_is_the_same_bytes_when_built_again(disk_project):
    rebuilt_the_same(disk_project, "qemu-amd64", "amd64")


@pytest.mark.integration
@pytest.mark.foreign
def test_pi_sd_card_image_is_the_same_bytes_when_built_again(rpi3_project):
    rebuilt_the_same(rpi3_project, "rpi3", "arm64")


@pytest.mark.integration
@pytest.mark.foreign
@pytest.mark.parametrize("target,arch", [("rpi3", "arm64"), ("rpi4", "arm64"), ("rpi-zero-w", "armel")])
def test_pi_disk_layout_has_everything_config_txt_names(rpi3_project, target, arch):
    if target != "rpi3":
        rpi3_project.doit(f"disk:{target}", timeout=3600)
    img = rpi3_project.root / f"dist/{target}/disk-{arch}.img"
    table = json.loads(subprocess.run(["sfdisk", "--json", img], check=True, stdout=subprocess.PIPE).stdout)
    table = table["partitiontable"]
    assert table["label"] == "dos" and [p["type"] for p in table["partitions"]] == ["c", "83"]
    assert table["partitions"][0].get("bootable")
    size = img.stat().st_size
    assert size & (size - 1) == 0, f"{size} is not a power of two (QEMU's SD model needs one)"
    files = fat_files(img)
    assert sorted(files) == sorted(p.name for p in (rpi3_project.root / f"dist/{target}/boot").iterdir())
    config = fat_text(img, "config.txt")
    named = re.findall(r"^(?:kernel|device_tree)=(\S+)", config, re.M) + \
        re.findall(r"^initramfs (\S+)", config, re.M)
    assert len(named) == 3 and all(n in files for n in named), (named, sorted(files))
    assert "bootcode.bin" in files and Project(REPO).load(target).rpi_dtbs[0] in files
    blkid = subprocess.run(["blkid", "-p", "-O", str(table["partitions"][1]["start"] * 512), "-s", "LABEL",
                            "-o", "value", img], stdout=subprocess.PIPE, text=True).stdout.strip()
    assert blkid == "hs-system"


@pytest.mark.integration
@pytest.mark.boot
def test_uefi_disk_boots_with_ovmf_to_a_login_prompt_on_an_overlay_root(disk_project, tmp_path):
    t = Project(disk_project.root).load("qemu-amd64")
    log = Log(tmp_path / "boot.log", "test")
    with disk_machine(disk_project.root / "dist/qemu-amd64", t, "amd64", tmp_path, log,
                      log_path=tmp_path / "console.log") as vm:
        vm.expect(r"hypersolid: / is overlay of \S*/system-amd64.img", timeout=400)
        vm.expect(r"login:", timeout=600)
    assert "Running /scripts/local-top" not in vm.output  # the hypersolid script, not `local`


@pytest.mark.integration
@pytest.mark.boot
@pytest.mark.foreign
def test_rpi3_sd_card_boots_in_qemu_raspi3b_to_multi_user_on_an_overlay_root(rpi3_project, tmp_path):
    t = Project(rpi3_project.root).load("rpi3")
    log = Log(tmp_path / "boot.log", "test")
    with disk_machine(rpi3_project.root / "dist/rpi3", t, "arm64", tmp_path, log,
                      log_path=tmp_path / "console.log") as vm:
        vm.expect(r"hypersolid: / is overlay of \S*/system-arm64.img", timeout=600)
        vm.expect(r"Multi-User System|login:", timeout=900)


@pytest.mark.integration
def test_flash_writes_the_image_to_a_loop_device_byte_for_byte(disk_project, tmp_path):
    img = disk_project.root / "dist/qemu-amd64/disk-amd64.img"
    backing = tmp_path / "stick.img"
    subprocess.run(["truncate", "-s", str(img.stat().st_size), backing], check=True)
    attach = subprocess.run(["losetup", "-f", "--show", backing], stdout=subprocess.PIPE, text=True)
    if attach.returncode != 0:
        pytest.skip(f"no loop device can be attached here: {attach.stdout}")
    dev = attach.stdout.strip()
    try:
        assert flash.check(Path(dev)).size == img.stat().st_size
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-m", "hypersolid.cli", "-C", str(disk_project.root), "flash",
                               "qemu-amd64", dev, "--yes"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        assert proc.returncode == 0, proc.stdout
        subprocess.run(["cmp", img, dev], check=True)
        refused = subprocess.run([sys.executable, "-m", "hypersolid.cli", "-C", str(disk_project.root), "flash",
                                  "qemu-amd64", str(backing), "--yes"], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        assert refused.returncode == 2 and "not a block device" in refused.stdout
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture(scope="session")
def arm64_project(disk_project) -> TestProject:
    disk_project.doit("disk:qemu-arm64", timeout=3600)
    return disk_project


@pytest.mark.integration
@pytest.mark.boot
@pytest.mark.foreign
def test_arm64_uefi_disk_boots_with_aavmf_to_a_login_prompt_on_an_overlay_root(arm64_project, tmp_path):
    t = Project(arm64_project.root).load("qemu-arm64")
    log = Log(tmp_path / "boot.log", "test")
    entry = fat_text(arm64_project.root / "dist/qemu-arm64/disk-arm64.img", "loader/entries/hypersolid.conf")
    assert "console=tty0 console=ttyAMA0" in entry
    with disk_machine(arm64_project.root / "dist/qemu-arm64", t, "arm64", tmp_path, log,
                      log_path=tmp_path / "console.log") as vm:
        vm.expect(r"hypersolid: / is overlay of \S*/system-arm64.img", timeout=900)
        vm.expect(r"login:", timeout=900)


@pytest.mark.integration
@pytest.mark.boot
@pytest.mark.foreign
def test_rpi_zero_w_sd_card_boots_in_qemu_raspi0_to_an_overlay_root(rpi3_project, tmp_path):
    rpi3_project.doit("disk:rpi-zero-w", timeout=3600)
    t = Project(rpi3_project.root).load("rpi-zero-w")
    log = Log(tmp_path / "boot.log", "test")
    with disk_machine(rpi3_project.root / "dist/rpi-zero-w", t, "armel", tmp_path, log,
                      log_path=tmp_path / "console.log") as vm:
        assert "initcall_blacklist=bcm2835_pm_driver_init" in vm.append  # qemu only, not on the card
        vm.expect(r"hypersolid: / is overlay of \S*/system-armel.img", timeout=600)
        vm.expect(r"Multi-User System|login:", timeout=1200)
