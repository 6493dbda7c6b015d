"""Booting a target's dist/ files in qemu-system: the `boot` task and the boot
tests go through here, so the tests boot exactly what a user boots.

Two layouts, as on real machines:
  3-file    kernel + initramfs + system-<arch>.cpio.  qemu takes a single
            initrd, so the archives are concatenated, each starting on a
            4-byte boundary (the kernel looks for a following archive only
            there).  GRUB's `initrd a b` and similar loaders do this themselves.
  root=     kernel + initramfs, and a disk whose ext4 partition holds
            system-<arch>.img (used when the target builds no cpio).
An optional ext4 disk becomes the persistent storage layer (pstorage=).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from .qemu import Qemu
from .run import Log, run

STORAGE_LABEL = "hs-storage"
SYSTEM_LABEL = "hs-system"


def concatenate_initrds(parts: Sequence[Path], dest: Path) -> Path:
    """Write parts one after another into dest, each 4-byte aligned."""
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as out:
        for part in parts:
            out.write(b"\0" * (-out.tell() % 4))
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    os.replace(tmp, dest)
    return dest


def system_disk(image: Path, dest: Path, log: Log) -> Path:
    """A disk with an MBR and one ext4 partition (label hs-system, at 1 MiB)
    holding the image under its own name: what root= points at."""
    size_mb = image.stat().st_size // (1 << 20) + 64
    staging = dest.with_name(dest.name + ".d")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        os.link(image, staging / image.name)
    except OSError:  # another file system
        shutil.copy(image, staging)
    dest.unlink(missing_ok=True)
    run(["truncate", "-s", f"{size_mb + 1}M", dest], log)
    run(["sfdisk", "-q", dest], log, input=b"start=2048, type=83\n")
    run(["mkfs.ext4", "-q", "-F", "-L", SYSTEM_LABEL, "-E", "offset=1048576", "-d", staging, dest,
         f"{size_mb}M"], log)
    shutil.rmtree(staging)
    return dest


def storage_disk(dest: Path, log: Log, files_from: Path | None = None, size: str = "256M",
                 uuid: str | None = None) -> Path:
    """A whole-disk ext4 file system for pstorage=, optionally pre-filled."""
    cmd = ["mkfs.ext4", "-q", "-F", "-L", STORAGE_LABEL]
    if uuid:
        cmd += ["-U", uuid]
    if files_from:
        cmd += ["-d", files_from]
    run([*cmd, dest, size], log)
    return dest


def machine(dist: Path, arch: str, work: Path, log: Log, *, storage: Path | None = None,
            append: str = "", extra_initrds: Sequence[Path] = (), use_root_disk: bool | None = None,
            log_path: Path | None = None, memory: int = 1024) -> Qemu:
    """A Qemu (not started) booting dist's files for arch.  The 3-file layout
    when system-<arch>.cpio exists (unless use_root_disk), else root=."""
    kernel, initramfs = dist / f"kernel-{arch}.img", dist / f"initramfs-{arch}.img"
    cpio, image = dist / f"system-{arch}.cpio", dist / f"system-{arch}.img"
    for needed in (kernel, initramfs):
        if not needed.exists():
            raise FileNotFoundError(f"{needed} is missing: build the target's bootfiles first "
                                    f"(does the target install a linux-image-* package?)")
    if use_root_disk is None:
        use_root_disk = not cpio.exists()
    work.mkdir(parents=True, exist_ok=True)
    disks, args = [], []
    if use_root_disk:
        disks.append(system_disk(image, work / f"system-disk-{arch}.img", log))
        args.append(f"root=LABEL={SYSTEM_LABEL}")
        initrd = concatenate_initrds([initramfs, *extra_initrds], work / f"initrd-{arch}.img") \
            if extra_initrds else initramfs
    else:
        initrd = concatenate_initrds([initramfs, cpio, *extra_initrds], work / f"initrd-{arch}.img")
    if storage is not None:
        disks.append(storage)
        args.append(f"pstorage=/dev/vd{'ab'[len(disks) - 1]}")
    vm = Qemu(kernel, initrd, disks=disks, arch=arch, memory=memory, log_path=log_path)
    # No boot=: the initramfs defaults to the hypersolid script (BOOT= in its conf.d).
    vm.append = " ".join([f"console={vm.console}", *args, append]).strip()
    return vm
