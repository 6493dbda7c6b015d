"""`hypersolid flash TARGET DEVICE`: write dist/<t>/disk-<arch>.img to a whole
disk with bmaptool (only the used blocks, each checked against the .bmap).

The checks come first, and each refusal is one line: the device must be a
block device, a whole disk (not a partition), with nothing of it mounted or
used as swap, and not the disk the running system lives on.  Everything is
read from /sys and /proc: nothing is opened for writing before the user
confirmed (or gave --yes).
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path


class Refused(Exception):
    """The device must not be written; the message says why."""


@dataclass(frozen=True)
class Device:
    path: Path
    name: str        # sysfs name: sdb, mmcblk0, loop3
    model: str
    size: int        # bytes


def _sys(devnum: int) -> Path:
    return Path(f"/sys/dev/block/{os.major(devnum)}:{os.minor(devnum)}").resolve()


def whole_disks(devnum: int) -> set[str]:
    """The whole disks under a block device: itself or its parent for a
    partition, and the disks below a device-mapper/md device (its slaves)."""
    node = _sys(devnum)
    if not node.exists():
        return set()
    return _disks_of(node)


def _disks_of(node: Path) -> set[str]:
    if (node / "partition").exists():
        node = node.parent
    slaves = list((node / "slaves").iterdir()) if (node / "slaves").is_dir() else []
    if not slaves:
        return {node.name}
    return set().union(*(_disks_of(s.resolve()) for s in slaves))


def _mounted_devnums() -> list[tuple[int, str]]:
    """(device number, mount point or 'swap') of every mounted block device."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        major, minor = fields[2].split(":")
        found.append((os.makedev(int(major), int(minor)), fields[4].replace("\\040", " ")))
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        path = line.split()[0]
        try:
            found.append((os.stat(path).st_rdev, "swap"))
        except OSError:
            continue
    return found


def running_system_disks() -> set[str]:
    """The disks holding /, /usr and /boot of the running system."""
    disks = set()
    for place in ("/", "/usr", "/boot"):
        try:
            disks |= whole_disks(os.stat(place).st_dev)
        except OSError:
            continue
    return disks


def check(path: Path) -> Device:
    """The device to write, or Refused naming why not."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise Refused(f"{path}: {err.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise Refused(f"{path} is not a block device (give a whole disk such as /dev/sdX or /dev/mmcblk0)")
    node = _sys(st.st_rdev)
    if (node / "partition").exists():
        raise Refused(f"{path} is a partition of /dev/{node.parent.name}: give the whole disk "
                      f"/dev/{node.parent.name} (the image has its own partition table)")
    name = node.name
    for devnum, where in _mounted_devnums():
        if name in whole_disks(devnum):
            raise Refused(f"{path} is in use: /dev/{_sys(devnum).name} is mounted on {where}; unmount it first")
    if name in running_system_disks():
        raise Refused(f"{path} holds the running system (/, /usr or /boot): refusing to overwrite it")
    model = next((p.read_text().strip() for p in (node / "device/model", node / "device/name",
                                                   node / "loop/backing_file") if p.exists()), "unknown model")
    return Device(path, name, model, int((node / "size").read_text()) * 512)


def confirm(device: Device, image: Path, answer=input) -> bool:
    reply = answer(f"hypersolid: write {image.name} to {device.path} ({device.model}, "
                   f"{device.size / 1e9:.1f} GB)? Everything on it is lost. Type yes: ")
    return reply.strip().lower() == "yes"


def flash_argv(image: Path, device: Path) -> list[str]:
    return ["bmaptool", "copy", "--bmap", str(image.with_suffix(".bmap")), str(image), str(device)]
