"""Boot the shipped default target (qemu-amd64) in qemu-system-x86_64 under TCG.

The VM boots exactly the files in dist/qemu-amd64/.  To look inside a
diskless machine whose root account is locked, a probe is handed in the way
a user hands per-machine files to a diskless machine: a seed archive
appended to the initrd (/hypersolid-seed, copied into the tmpfs layer by the
boot script).  The probe is a oneshot unit printing `HSP key=value` lines on
the console; the image itself is not changed.
"""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TestProject, mounts
from hypersolid.boot import machine, storage_disk
from hypersolid.qemu import Qemu, QemuError
from hypersolid.run import Log

pytestmark = [pytest.mark.integration, pytest.mark.boot]

ARCH = "amd64"
PROBE = r"""#!/bin/sh
# hypersolid boot-test probe: facts about the running system, on the console.
say() { echo "HSP $1=$2"; }
# Started by multi-user.target without holding it up: wait until it is reached.
for i in $(seq 300); do
    systemctl is-active -q multi-user.target && break
    sleep 1
done
echo HS-PROBE-BEGIN
say multi_user "$(systemctl is-active multi-user.target)"
say failed_units "$(systemctl list-units --failed --no-legend --plain | cut -d' ' -f1 | tr '\n' ' ')"
say root "$(findmnt -n -o FSTYPE,OPTIONS /)"
for m in rootfs tmpfs storage system; do
    say "mnt_$m" "$(findmnt -n -o FSTYPE,SOURCE,OPTIONS /mnt/$m || echo none)"
done
say loop "$(losetup -n -O BACK-FILE | tr -s ' ')"
echo "written at boot" > /hs-probe-written
say upper_copy "$(cat /mnt/tmpfs/upper/hs-probe-written 2>/dev/null || echo missing)"
say host_keys "$(ls /etc/ssh/ssh_host_*_key 2>/dev/null | wc -l)"
say machine_id "$(cat /etc/machine-id)"
say build_id "$(cat /etc/hypersolid_build)"
say marker "$(cat /etc/hs-storage-marker 2>/dev/null || echo none)"
if [ -e /etc/hs-probe-persist ]; then
    echo "kept across boots" > /etc/hs-persisted
    pstorage persist /etc/hs-persisted >/dev/null 2>&1 && say persist ok || say persist failed
    say storage_state "$(findmnt -n -o OPTIONS /mnt/storage | cut -d, -f1)"
fi
echo HS-PROBE-END
[ -e /etc/hs-probe-poweroff ] && systemctl --no-block poweroff
exit 0
"""
PROBE_UNIT = """\
[Unit]
Description=hypersolid boot-test probe
After=hypersolid-firstboot.service
[Service]
Type=simple
StandardOutput=journal+console
ExecStart=/usr/local/sbin/hs-probe
[Install]
WantedBy=multi-user.target
"""


def seed_archive(tmp: Path, *flags: str) -> Path:
    """An initrd archive holding /hypersolid-seed with the probe (and flag files)."""
    root = tmp / "seed-root"
    shutil.rmtree(root, ignore_errors=True)
    seed = root / "hypersolid-seed"
    (seed / "usr/local/sbin").mkdir(parents=True)
    (seed / "usr/local/sbin/hs-probe").write_text(PROBE)
    (seed / "usr/local/sbin/hs-probe").chmod(0o755)
    units = seed / "etc/systemd/system"
    (units / "multi-user.target.wants").mkdir(parents=True)
    (units / "hs-probe.service").write_text(PROBE_UNIT)
    (units / "multi-user.target.wants/hs-probe.service").symlink_to("../hs-probe.service")
    for flag in flags:
        (seed / "etc" / flag).write_text("")
    for d in [root, *root.rglob("*")]:
        if d.is_dir() and not d.is_symlink():
            d.chmod(0o755)
    archive = tmp / "seed.cpio"
    names = subprocess.run(["find", "."], cwd=root, check=True, stdout=subprocess.PIPE).stdout
    with open(archive, "wb") as out:
        subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=root,
                       input=names, stdout=out, check=True)
    return archive


def probe(vm: Qemu, timeout: int = 600) -> dict[str, str]:
    """The probe's facts, once it has run."""
    block = vm.expect(r"(?s)HS-PROBE-BEGIN(.*?)HS-PROBE-END", timeout).group(1)
    # journal+console lines: "hs-probe[123]: HSP key=value"
    return {k: " ".join(v.split()) for k, v in re.findall(r"HSP (\w+)=(.*)$", block, re.M)}


def boot(project: TestProject, tmp: Path, name: str, **kw) -> Qemu:
    log = Log(tmp / f"{name}.build.log", f"boot-test {name}")
    return machine(project.root / "dist/qemu-amd64", ARCH, tmp / "work", log,
                   log_path=tmp / f"{name}.console.log", **kw)


def debugfs_cat(disk: Path, path: str) -> str:
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(disk)], check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout


@pytest.fixture(scope="module")
def built(default_project) -> TestProject:
    for tool in ("qemu-system-x86_64", "mkfs.ext4", "sfdisk", "debugfs"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (run ./setup.sh --no-build)")
    return default_project


def test_diskless_three_file_boot_reaches_multi_user_on_a_tmpfs_overlay(built, tmp_path):
    before = mounts()
    with boot(built, tmp_path, "diskless", extra_initrds=[seed_archive(tmp_path)]) as vm:
        vm.expect(r"hypersolid: / is overlay of /system-amd64\.img", 300)
        facts = probe(vm)
        vm.expect(r"qemu-amd64 login: ", 300, anywhere=True)
        # The login banner names the build (agetty shows /etc/issue.d/).
        banner = vm.expect(r"hypersolid qemu-amd64 \(amd64\) build (\S+)\s+qemu-amd64 login: ",
                           5, anywhere=True).group(1)
        # Root has no usable password in the image: an empty one is refused.
        vm.sendline("root")
        vm.expect(r"Password: ", 60)
        vm.sendline("")
        vm.expect(r"Login incorrect", 60)
    assert facts["multi_user"] == "active"
    assert facts["failed_units"] == ""
    assert facts["root"].startswith("overlay ")
    options = dict(o.partition("=")[::2] for o in facts["root"].split()[1].split(","))
    assert options["lowerdir"] == "/hypersolid/rootfs"          # squashfs only, no storage
    assert options["upperdir"] == "/hypersolid/tmpfs/upper"
    assert facts["mnt_rootfs"].startswith("squashfs /dev/loop")
    assert facts["mnt_tmpfs"].startswith("tmpfs tmpfs")
    assert facts["mnt_storage"] == "none" and facts["mnt_system"] == "none"
    assert facts["loop"] == "/system-amd64.img (deleted)"       # the image came in the initrd
    assert facts["upper_copy"] == "written at boot"             # writes land in the tmpfs
    assert int(facts["host_keys"]) >= 3                         # made by the first-boot unit
    assert re.fullmatch(r"[0-9a-f]{32}", facts["machine_id"])
    build_id = json.loads((built.root / "dist/qemu-amd64/build-amd64.json").read_text())["build_id"]
    assert facts["build_id"] == banner == build_id
    assert mounts() == before


def test_pstorage_disk_is_a_layer_under_tmpfs_and_keeps_keys_and_persisted_files(built, tmp_path):
    files = tmp_path / "storage-files"
    (files / "etc").mkdir(parents=True)
    (files / "etc/hs-storage-marker").write_text("placed before boot\n")
    log = Log(tmp_path / "disk.log", "boot-test disk")
    disk = storage_disk(tmp_path / "storage.ext4", log, files_from=files, size="64M")
    seed = seed_archive(tmp_path, "hs-probe-persist", "hs-probe-poweroff")
    with boot(built, tmp_path, "pstorage", storage=disk, extra_initrds=[seed]) as vm:
        vm.expect(r"hypersolid: / is overlay of /system-amd64\.img \+ storage /dev/vda", 300)
        facts = probe(vm)
        assert vm.wait_exit(180) == 0                           # the probe powered off
    assert facts["marker"] == "placed before boot"
    assert "lowerdir=/hypersolid/storage:/hypersolid/rootfs" in facts["root"]
    assert facts["mnt_storage"].startswith("ext4 /dev/vda ro")  # helper mounts in the new root
    assert facts["mnt_rootfs"].startswith("squashfs /dev/loop")
    assert facts["mnt_tmpfs"].startswith("tmpfs tmpfs")
    assert facts["persist"] == "ok" and facts["storage_state"] == "ro"
    # What the running system stored is in the ext4 after shutdown.
    assert debugfs_cat(disk, "/etc/hs-persisted") == "kept across boots\n"
    assert debugfs_cat(disk, "/etc/machine-id").strip() == facts["machine_id"]
    assert "PRIVATE KEY" in debugfs_cat(disk, "/etc/ssh/ssh_host_ed25519_key")


def test_boot_from_image_file_on_root_partition(built, tmp_path):
    seed = seed_archive(tmp_path, "hs-probe-poweroff")
    with boot(built, tmp_path, "rootdisk", use_root_disk=True, extra_initrds=[seed]) as vm:
        vm.expect(r"hypersolid: / is overlay of /hypersolid/system/system-amd64\.img", 300)
        facts = probe(vm)
        assert vm.wait_exit(180) == 0
    assert facts["mnt_system"].startswith("ext4 /dev/vda1 ro")
    assert facts["loop"] == "/mnt/system/system-amd64.img"
    assert facts["mnt_rootfs"].startswith("squashfs /dev/loop")


def test_missing_image_drops_to_a_rescue_shell_saying_why_and_hangs_fail_in_bounded_time(built, tmp_path):
    dist = built.root / "dist/qemu-amd64"
    with Qemu(dist / "kernel-amd64.img", dist / "initramfs-amd64.img",
              "console=ttyS0 boot=hypersolid", log_path=tmp_path / "rescue.log") as vm:
        vm.expect(r"hypersolid: no /system-amd64\.img in the initramfs and no root= partition", 300)
        vm.expect(r"\(initramfs\) ", 60)
        vm.sendline("echo RESCUE-$((6*7))")
        vm.expect(r"RESCUE-42", 30)
        # A boot that never gets where a test waits fails in bounded time,
        # with the console attached, and the VM is gone afterwards.
        with pytest.raises(QemuError) as hung:
            vm.expect(r"this never appears", timeout=3)
        pid = vm.proc.pid
    assert "console tail:" in str(hung.value) and "RESCUE-42" in str(hung.value)
    assert not Path(f"/proc/{pid}").exists()


def test_boot_script_edit_rebuilds_only_initramfs_and_bootfiles(built):
    script = built.root / "hypersolid/initramfs/hypersolid"
    original = script.read_text()
    initramfs = built.root / "dist/qemu-amd64/initramfs-amd64.img"
    before = initramfs.read_bytes()
    try:
        script.write_text(original + "# edited by a test\n")
        result = built.doit("bootfiles:qemu-amd64")
        assert result.executed == {"initramfs:qemu-amd64", "bootfiles:qemu-amd64"}
        assert initramfs.read_bytes() != before
    finally:
        script.write_text(original)
    result = built.doit("bootfiles:qemu-amd64")  # back: a cache hit, dist restored
    assert "configure:qemu-amd64" not in result.executed
    assert initramfs.read_bytes() == before


def test_boot_task_gives_a_console_and_quits_on_ctrl_a_x(built, tmp_path):
    """`doit boot:<target>` as a user runs it, typed at through a pipe."""
    env = {**os.environ, "HYPERSOLID_CACHE": str(built.cache),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    disk = tmp_path / "storage.ext4"
    proc = subprocess.Popen([sys.executable, "-m", "doit", "boot:qemu-amd64", "--storage", str(disk)],
                            cwd=built.root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    seen, deadline = b"", time.monotonic() + 600
    try:
        while b"qemu-amd64 login: " not in seen:
            assert time.monotonic() < deadline, seen[-3000:].decode(errors="replace")
            if select.select([proc.stdout], [], [], 1)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, f"exited early:\n{seen[-3000:].decode(errors='replace')}"
                seen += chunk
        proc.stdin.write(b"\x01x")  # qemu's monitor escape: quit
        proc.stdin.flush()
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    text = (seen + rest).decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "pstorage=/dev/vda" in text and "+ storage /dev/vda" in text
    assert disk.exists()  # created for the user


@pytest.fixture(scope="module")
def arm64_built(built) -> TestProject:
    """The shipped qemu-arm64 target: configure and mkinitramfs under qemu-user."""
    if shutil.which("qemu-system-aarch64") is None:
        pytest.fail("qemu-system-aarch64 is missing (run ./setup.sh --no-build)")
    built.doit("bootfiles:qemu-arm64")
    return built


@pytest.mark.foreign
def test_arm64_initramfs_is_made_beside_configure_under_emulation(arm64_built):
    """The emulated build's initramfs came from the early one (the image booted next)."""
    logs = arm64_built.root / "build/qemu-arm64/arm64/logs"
    configure = (logs / "configure.log").read_text()
    if "# cache hit" in configure:
        pytest.skip("configure came from a cache reused from an earlier run (HYPERSOLID_TEST_CACHE)")
    assert "# the early initramfs is made; the initramfs stage checks it against this tree" in configure
    assert "# what the initramfs is made of is unchanged: reusing " in (logs / "initramfs.log").read_text()


@pytest.mark.foreign
def test_arm64_vm_boots_to_multi_user_on_the_overlay(arm64_built, tmp_path):
    log = Log(tmp_path / "arm64.build.log", "boot-test arm64")
    seed = seed_archive(tmp_path, "hs-probe-poweroff")
    vm = machine(arm64_built.root / "dist/qemu-arm64", "arm64", tmp_path / "work", log,
                 extra_initrds=[seed], log_path=tmp_path / "arm64.console.log")
    assert vm.command()[0] == "qemu-system-aarch64" and "console=ttyAMA0" in vm.append
    with vm:
        vm.expect(r"hypersolid: / is overlay of /system-arm64\.img", 600)
        facts = probe(vm, timeout=900)
        assert vm.wait_exit(300) == 0
    assert facts["multi_user"] == "active" and facts["failed_units"] == ""
    assert facts["root"].startswith("overlay ") and "upperdir=/hypersolid/tmpfs/upper" in facts["root"]
    assert facts["mnt_rootfs"].startswith("squashfs /dev/loop")
    assert facts["mnt_tmpfs"].startswith("tmpfs tmpfs")
    assert facts["upper_copy"] == "written at boot"
    assert int(facts["host_keys"]) >= 3
