"""Booting a target's disk image (dist/<t>/disk-<arch>.img) in qemu-system,
as a board boots it: the `boot --disk` task and the disk boot tests.

  UEFI (amd64, arm64)   OVMF / AAVMF firmware boots the disk's ESP
                        (systemd-boot and its loader entry), q35 / virt.
  Raspberry Pi 3        qemu -M raspi3b has no GPU firmware to read config.txt,
                        so the kernel, device tree, initramfs and cmdline.txt
                        are read out of the image's FAT partition (mtools) and
                        given to qemu; the image is the SD card.  The console
                        (ttyS1, the mini UART) is qemu's second serial port.

The disk is opened with snapshot=on: a boot never changes the image in dist/.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .qemu import Qemu
from .run import Log, output, run

FIRMWARE = {
    "amd64": ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd", "ovmf"),
    "arm64": ("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd", "qemu-efi-aarch64"),
}
UEFI_MACHINES = {
    "amd64": ["qemu-system-x86_64", "-machine", "q35"],
    "arm64": ["qemu-system-aarch64", "-machine", "virt", "-cpu", "cortex-a57"],
}
# Boards qemu models, by the device tree the target ships: (machine argv, memory MiB,
# console serial index, extra kernel parameters for qemu only).  QEMU 7.2's raspi0 does
# not model the BCM2835 power-management block: Debian's linux-image-rpi faults in
# bcm2835_power_probe (kernel panic at ~2 s) unless that driver's init is skipped.
PI_MACHINES = {
    "bcm2837-rpi-3-b.dtb": (["qemu-system-aarch64", "-machine", "raspi3b"], 1024, 1, ""),
    "bcm2835-rpi-zero-w.dtb": (["qemu-system-arm", "-machine", "raspi0"], 512, 1,
                               "initcall_blacklist=bcm2835_pm_driver_init"),
}


def partitions(image: Path) -> list[dict]:
    """sfdisk's view of the image's partition table."""
    return json.loads(output(["sfdisk", "--json", str(image)]))["partitiontable"]["partitions"]


def fat_offset(image: Path) -> int:
    """Byte offset of the first (boot / EFI system) partition."""
    return partitions(image)[0]["start"] * 512


def fat_read(image: Path, name: str, dest: Path, log: Log) -> Path:
    """Copy one file out of the image's FAT partition (mtools, no mount)."""
    run(["mcopy", "-n", "-i", f"{image}@@{fat_offset(image)}", f"::/{name}", dest], log,
        env={"MTOOLS_SKIP_CHECK": "1"})
    return dest


def pi_machine(image: Path, dtbs, work: Path, log: Log, log_path: Path | None = None) -> Qemu:
    """qemu's model of the first board of dtbs that it has, booting the SD card image."""
    dtb = next((d for d in dtbs if d in PI_MACHINES), None)
    if dtb is None:
        raise FileNotFoundError(f"qemu models none of these boards: {', '.join(dtbs)} "
                                f"(known: {', '.join(PI_MACHINES)})")
    machine, memory, serial, qemu_only = PI_MACHINES[dtb]
    work.mkdir(parents=True, exist_ok=True)
    config = fat_read(image, "config.txt", work / "config.txt", log).read_text()
    settings = dict(line.split("=", 1) for line in config.splitlines() if "=" in line and not line.startswith("#"))
    initrd = next(line.split()[1] for line in config.splitlines() if line.startswith("initramfs "))
    kernel = fat_read(image, settings["kernel"], work / "kernel.img", log)
    initramfs = fat_read(image, initrd, work / "initramfs.img", log)
    dtb_file = fat_read(image, dtb, work / dtb, log)
    append = fat_read(image, "cmdline.txt", work / "cmdline.txt", log).read_text().strip()
    append = f"{append} {qemu_only}".strip()
    return Qemu(kernel, initramfs, append, arch="arm64", memory=memory, smp=None, machine=machine,
                serial_index=serial, log_path=log_path,
                extra=["-dtb", str(dtb_file), "-drive", f"if=sd,format=raw,snapshot=on,file={image}"])


def uefi_machine(image: Path, arch: str, work: Path, log_path: Path | None = None, memory: int = 1024) -> Qemu:
    """OVMF/AAVMF booting the image as the only disk (virtio-blk)."""
    code, vars_template, package = FIRMWARE[arch]
    if not Path(code).exists():
        raise FileNotFoundError(f"{code} is missing: install the host package '{package}'")
    work.mkdir(parents=True, exist_ok=True)
    variables = work / f"efivars-{arch}.fd"
    shutil.copyfile(vars_template, variables)  # a fresh NVRAM per boot
    return Qemu(None, arch=arch, memory=memory, machine=UEFI_MACHINES[arch], log_path=log_path, extra=[
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={variables}",
        "-drive", f"file={image},format=raw,if=none,id=disk,snapshot=on",
        "-device", "virtio-blk-pci,drive=disk"])


def disk_machine(dist: Path, target, arch: str, work: Path, log: Log, log_path: Path | None = None) -> Qemu:
    image = dist / f"disk-{arch}.img"
    if not image.exists():
        raise FileNotFoundError(f"{image} is missing: run `doit disk:{target.name}` first")
    if target.rpi_dtbs:
        return pi_machine(image, target.rpi_dtbs, work, log, log_path)
    return uefi_machine(image, arch, work, log_path)
