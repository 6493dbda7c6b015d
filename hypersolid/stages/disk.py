"""disk: dist/<target>/disk-<arch>.img, a whole disk to flash, and its .bmap.

    Raspberry Pi targets   MBR: FAT32 RPIBOOT (dist/<t>/boot/), ext4 hs-system
                           (system-<arch>.img), optional ext4 hs-storage
    other targets (UEFI)   GPT: ESP (systemd-boot from the target's
                           systemd-boot-efi, kernel, initramfs, loader entry),
                           ext4 hs-system, optional ext4 hs-storage

No loop devices and no mounts (they need privileges most containers lack):
each file system is made in a file of its own (mkfs.vfat -C + mtools,
mkfs.ext4 -d), sfdisk partitions the image file, dd puts each file system
in place.  The bytes depend on the inputs only: the disk, partition and file
system ids derive from the build id, and every time stamp is the build's
SOURCE_DATE_EPOCH (epoch.py), so two builds of the same inputs give the same
image (and the same .bmap).

Not cached: it reads dist/ (what post-build hooks signed is what goes on
the disk) and writes its two files there, each renamed into place.
"""
from __future__ import annotations

import gzip
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..boot import STORAGE_LABEL, SYSTEM_LABEL
from ..cache import remove_tree, temp_name
from ..config import size_mib
from ..epoch import source_date_epoch
from ..run import Log, run
from . import Stage, Unit, build_id, register

MiB = 1 << 20
PI_BOOT_LABEL = "RPIBOOT"
ESP_LABEL = "ESP"
GPT_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
GPT_LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
EFI = {"amd64": ("systemd-bootx64.efi", "BOOTX64.EFI", "console=tty0 console=ttyS0"),
       "arm64": ("systemd-bootaa64.efi", "BOOTAA64.EFI", "console=tty0 console=ttyAMA0")}
SYSTEMD_BOOT_DIR = "usr/lib/systemd/boot/efi"


def disk_name(arch: str) -> str:
    return f"disk-{arch}.img"


def is_pi(target) -> bool:
    return bool(target.rpi_dtbs)


@dataclass(frozen=True)
class Partition:
    label: str
    fs: str          # vfat | ext4
    start: int       # MiB
    size: int        # MiB
    type: str        # MBR type code or GPT type GUID


def layout(target, system_bytes: int) -> tuple[list[Partition], int]:
    """The partitions and the total size (MiB) for a system image of that size.
    Raises ValueError with the setting to change when it does not fit."""
    pi = is_pi(target)
    boot = size_mib(target.disk_boot_size)
    image = -(-system_bytes // MiB)
    # auto: room for the next image beside the current one (update = copy + rename)
    system = 2 * image + 64 if target.disk_system_size == "auto" else size_mib(target.disk_system_size)
    if system < image + 8:
        raise ValueError(f"disk.system_size {target.disk_system_size} is too small for the {image} MiB "
                         "system image (needs it + 8 MiB)")
    tail = 0 if pi else 1  # GPT's backup header lives in the last MiB
    parts = [Partition(PI_BOOT_LABEL if pi else ESP_LABEL, "vfat", 1, boot, "c" if pi else GPT_ESP),
             Partition(SYSTEM_LABEL, "ext4", 1 + boot, system, "83" if pi else GPT_LINUX)]
    used = 1 + boot + system
    storage = target.disk_storage_size
    if storage not in ("none", "rest"):
        used += size_mib(storage)
    if target.disk_size == "minimal":
        total = used + tail
        if target.disk_power_of_two:
            total = 1 << (total - 1).bit_length()
    else:
        total = size_mib(target.disk_size)
        if target.disk_power_of_two and total & (total - 1):
            raise ValueError(f"disk.size {target.disk_size} is not a power of two (disk.power_of_two)")
        if total < used + tail + (16 if storage == "rest" else 0):
            raise ValueError(f"disk.size {target.disk_size} is smaller than the {used + tail} MiB the "
                             "partitions need")
    if storage == "rest":
        parts.append(Partition(STORAGE_LABEL, "ext4", used, total - tail - used, parts[1].type))
    elif storage != "none":
        parts.append(Partition(STORAGE_LABEL, "ext4", used - size_mib(storage), size_mib(storage), parts[1].type))
    return parts, total


def ids(build: str, name: str) -> uuid.UUID:
    """A stable UUID per build and purpose (no random ids on the disk)."""
    return uuid.uuid5(uuid.UUID(build), name)


def sfdisk_script(parts: list[Partition], build: str, pi: bool) -> str:
    lines = ["label: dos", f"label-id: 0x{ids(build, 'disk').hex[:8]}"] if pi else \
        ["label: gpt", f"label-id: {ids(build, 'disk')}", "first-lba: 2048"]
    lines.append("unit: sectors")
    for p in parts:
        line = f"start={p.start * 2048}, size={p.size * 2048}, type={p.type}"
        if pi:
            line += ", bootable" if p.fs == "vfat" else ""
        else:
            line += f', uuid={ids(build, "part-" + p.label)}, name="{p.label}"'
        lines.append(line)
    return "\n".join(lines) + "\n"


def pi_cmdline(text: str, storage: bool) -> str:
    """cmdline.txt as on the card: with the storage partition, pstorage= names it."""
    params = text.split()
    if storage and not any(p.startswith("pstorage=") for p in params):
        params.append(f"pstorage=LABEL={STORAGE_LABEL}")
    return " ".join(params) + "\n"


def loader_entry(target, arch: str, storage: bool) -> str:
    params = [EFI[arch][2], f"root=LABEL={SYSTEM_LABEL}", *target.kernel_cmdline]
    if storage and not any(p.startswith("pstorage=") for p in target.kernel_cmdline):
        params.append(f"pstorage=LABEL={STORAGE_LABEL}")
    return (f"title hypersolid {target.name}\n"
            f"linux /hypersolid/kernel-{arch}.img\n"
            f"initrd /hypersolid/initramfs-{arch}.img\n"
            f"options {' '.join(params)}\n")


def _uefi_kernel(src: Path, dest: Path) -> None:
    """The kernel as the UEFI loader needs it: a PE image.  Debian's arm64
    vmlinuz is a gzip'd Image (GRUB and qemu unpack it; systemd-boot does not)."""
    with open(src, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if gz:
        with gzip.open(src, "rb") as f, open(dest, "wb") as out:
            shutil.copyfileobj(f, out, MiB)
    else:
        shutil.copyfile(src, dest)


def _stamp(tree: Path, when: int) -> None:
    for path in [tree, *tree.rglob("*")]:
        os.utime(path, (when, when), follow_symlinks=False)


def make_vfat(dest: Path, part: Partition, files: Path, build: str, log: Log, env: dict) -> None:
    """A FAT32 file system in a file, filled with mtools (no mount)."""
    # --invariant first: it also sets a fixed volume id, which -i then replaces
    run(["mkfs.vfat", "-C", "-F", "32", "-n", part.label, "--invariant", "-i", ids(build, "vfat").hex[:8],
         dest, str(part.size * 1024)], log, env=env)
    names = sorted(p.name for p in files.iterdir())
    if names:
        run(["mcopy", "-Q", "-m", "-s", "-i", dest, *[files / n for n in names], "::/"], log, env=env)


def make_ext4(dest: Path, part: Partition, files: Path | None, build: str, log: Log, env: dict) -> None:
    """An ext4 file system in a file.  mke2fs -d copies each file's ctime,
    which no tool can set: debugfs sets them to the epoch afterwards."""
    fs_id = ids(build, "fs-" + part.label)
    cmd = ["mkfs.ext4", "-q", "-F", "-L", part.label, "-U", str(fs_id), "-m", "0",
           "-E", f"hash_seed={ids(build, 'hash-' + part.label)},root_owner=0:0"]
    if files is not None:
        cmd += ["-i", "1048576", "-d", files]  # a few big files: few inodes
    run([*cmd, dest, f"{part.size}M"], log, env=env)
    if files is not None:
        when = env["E2FSPROGS_FAKE_TIME"]
        script = "".join(f"sif /{p.relative_to(files)} {field} @{when}\n"
                         for p in sorted(files.rglob("*")) for field in ("ctime", "mtime", "atime", "crtime"))
        run(["debugfs", "-w", "-f", "-", dest], log, env=env, input=script.encode())


@register
class Disk(Stage):
    name = "disk"
    upstream = ("configure", "bootfiles")
    cached = False
    helpers = ("hypersolid.boot",)
    doc = "dist/<target>/disk-<arch>.img + .bmap: a whole disk to flash (Pi SD card or UEFI)"
    reads = ("rpi_dtbs", "kernel_cmdline", "disk_size", "disk_boot_size", "disk_system_size",
             "disk_storage_size", "disk_power_of_two")

    def applies(self, unit: Unit) -> bool:
        t = unit.target
        return t.has_kernel(unit.arch) and t.image in ("img", "both") and (is_pi(t) or unit.arch in EFI)

    def computed(self, unit: Unit) -> dict:
        # The epoch is bootstrap's (epoch.py), inside the configure key already.
        return {"arch": unit.arch, "build_id": build_id(unit.project, unit.target, unit.cache)}

    def outputs(self, unit: Unit) -> list[Path]:
        img = unit.dist_dir / disk_name(unit.arch)
        return [img, img.with_suffix(".bmap")]

    def build(self, unit: Unit, out: None, log: Log) -> None:
        t, a, dist = unit.target, unit.arch, unit.dist_dir
        pi, build = is_pi(t), build_id(unit.project, unit.target, unit.cache)
        when = max(source_date_epoch(unit), 315532800)  # FAT has no time before 1980
        env = {"E2FSPROGS_FAKE_TIME": str(when), "SOURCE_DATE_EPOCH": str(when), "MTOOLS_SKIP_CHECK": "1"}
        system = dist / f"system-{a}.img"
        try:
            parts, total = layout(t, system.stat().st_size)
        except ValueError as err:
            raise log.fail(f"{t.file}: {err}") from None
        storage = any(p.label == STORAGE_LABEL for p in parts)
        work = temp_name(dist / f"disk-{a}")
        remove_tree(work)
        (work / "boot").mkdir(parents=True)
        (work / "system").mkdir()
        try:
            if pi:
                boot = dist / ("boot" if len(t.architectures) == 1 else f"boot-{a}")
                shutil.copytree(boot, work / "boot", dirs_exist_ok=True)
                cmdline = work / "boot/cmdline.txt"
                cmdline.write_text(pi_cmdline(cmdline.read_text(), storage))
            else:
                self._esp(unit, work / "boot", storage, log)
            _stamp(work / "boot", when)
            os.link(system, work / "system" / system.name)
            img = work / disk_name(a)
            run(["truncate", "-s", f"{total}M", img], log)
            run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", img], log,
                input=sfdisk_script(parts, build, pi).encode())
            for p in parts:
                fs = work / f"{p.label}.fs"
                if p.fs == "vfat":
                    make_vfat(fs, p, work / "boot", build, log, env)
                else:
                    make_ext4(fs, p, work / "system" if p.label == SYSTEM_LABEL else None, build, log, env)
                run(["dd", f"if={fs}", f"of={img}", "bs=1M", f"seek={p.start}", "conv=notrunc,sparse",
                     "status=none"], log)
                fs.unlink()
            bmap = work / "disk.bmap"
            run(["bmaptool", "-q", "create", "-o", bmap, img], log)
            os.replace(bmap, dist / f"disk-{a}.bmap")
            os.replace(img, dist / disk_name(a))
            log.note(f"# {disk_name(a)}: {total} MiB, " + ", ".join(f"{p.label} {p.size} MiB" for p in parts))
        finally:
            remove_tree(work)

    def _esp(self, unit: Unit, dest: Path, storage: bool, log: Log) -> None:
        """systemd-boot as the removable-media loader, the kernel, the
        initramfs and one loader entry."""
        a, dist = unit.arch, unit.dist_dir
        loader, fallback, _ = EFI[a]
        efi = unit.output("configure") / "tree" / SYSTEMD_BOOT_DIR / loader
        if not efi.is_file():
            raise log.fail(f"no /{SYSTEMD_BOOT_DIR}/{loader} in the configured tree: add the package "
                           "'systemd-boot-efi' to the target (the UEFI disk's boot loader)")
        for d in ("EFI/BOOT", "EFI/systemd", "loader/entries", "hypersolid"):
            (dest / d).mkdir(parents=True)
        shutil.copyfile(efi, dest / "EFI/BOOT" / fallback)
        shutil.copyfile(efi, dest / "EFI/systemd" / loader)
        (dest / "loader/loader.conf").write_text("default hypersolid.conf\ntimeout 0\n")
        (dest / "loader/entries/hypersolid.conf").write_text(loader_entry(unit.target, a, storage))
        _uefi_kernel(dist / f"kernel-{a}.img", dest / "hypersolid" / f"kernel-{a}.img")
        shutil.copyfile(dist / f"initramfs-{a}.img", dest / "hypersolid" / f"initramfs-{a}.img")
