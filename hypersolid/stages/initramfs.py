"""initramfs: the target's kernel and an initramfs holding hypersolid's boot
script (boot=hypersolid), made once per change of its inputs.

mkinitramfs runs in the container over an overlay of the configured tree,
not natively: the initramfs must hold the target's kernel modules, klibc,
udev and util-linux at the target's versions and for the target's
architecture, and only the configured tree has them (built natively, the
host's binaries would slip in).  Configure diverts update-initramfs, so this
is the only place an initramfs is generated.  The configured tree is only
read: configure never re-runs for a boot script edit.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .. import epoch
from ..config import INITRAMFS_COMPRESSORS
from ..container import run_in
from ..mounts import release_view, writable_view
from ..run import Log
from . import Stage, Unit, register

BOOT_FILES = Path(__file__).resolve().parents[1] / "initramfs"


def kernel_version(tree: Path) -> str | None:
    """The newest kernel that has both an image and modules in the tree."""
    versions = [p.name[len("vmlinuz-"):] for p in (tree / "boot").glob("vmlinuz-*")]
    versions = [v for v in versions if (tree / "lib/modules" / v).is_dir()]
    natural = lambda v: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", v)]  # noqa: E731
    return max(versions, key=natural) if versions else None


def initramfs_conf(modules: str, compression: str) -> str:
    """BOOT=hypersolid makes the boot script the default (initramfs-tools' init
    reads conf.d after clearing BOOT and before the command line, where
    boot=... still wins), so a loader entry needs no boot= parameter."""
    return ("# Written by hypersolid (target.yaml initramfs:)\n"
            f"MODULES={modules}\nCOMPRESS={compression}\nBUSYBOX=auto\nBOOT=hypersolid\n")


@register
class Initramfs(Stage):
    name = "initramfs"
    upstream = ("configure",)
    helpers = ("hypersolid.container", "hypersolid.epoch", "hypersolid.mounts")
    doc = "kernel + initramfs (mkinitramfs in the container, hypersolid boot script as default)"
    reads = ("initramfs_compression", "initramfs_modules", "initramfs_extra_modules")
    isolated = True  # the overlay over the configured tree

    def applies(self, unit: Unit) -> bool:
        return unit.target.has_kernel(unit.arch)

    def computed(self, unit: Unit) -> dict:
        return {"arch": unit.arch}

    def input_files(self, unit: Unit) -> dict[str, Path]:
        return {"boot-script": BOOT_FILES / "hypersolid", "hook": BOOT_FILES / "hook"}

    def build(self, unit: Unit, out: Path, log: Log) -> None:
        work = out / ".work"
        tree = writable_view(unit.output("configure") / "tree", work, log)
        t = unit.target
        kver = kernel_version(tree)
        if kver is None:
            raise log.fail(f"no kernel in the configured tree (boot/vmlinuz-* with lib/modules/*): "
                           f"the target's packages for {unit.arch} name no installable linux-image-*")
        conf = tree / "etc/initramfs-tools"
        if not (tree / "usr/sbin/mkinitramfs").exists():
            raise log.fail("mkinitramfs is missing from the tree: add the package 'initramfs-tools'")
        tool = "lzma" if t.initramfs_compression == "lzma" else t.initramfs_compression
        if not any((tree / d / tool).exists() for d in ("usr/bin", "bin")):
            raise log.fail(f"initramfs compression {t.initramfs_compression} needs {tool} in the tree: add the "
                           f"package '{INITRAMFS_COMPRESSORS[t.initramfs_compression]}' (or set "
                           "initramfs: {compression: gzip})")
        for d in ("scripts", "hooks", "conf.d"):
            (conf / d).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(BOOT_FILES / "hypersolid", conf / "scripts/hypersolid")
        os.chmod(conf / "scripts/hypersolid", 0o644)
        shutil.copyfile(BOOT_FILES / "hook", conf / "hooks/hypersolid")
        os.chmod(conf / "hooks/hypersolid", 0o755)
        (conf / "conf.d/hypersolid").write_text(initramfs_conf(t.initramfs_modules, t.initramfs_compression))
        if t.initramfs_extra_modules:
            with open(conf / "modules", "a") as f:
                f.write("".join(m + "\n" for m in t.initramfs_extra_modules))
        (tree / ".hypersolid").mkdir(exist_ok=True)
        # mkinitramfs clamps mtimes to SOURCE_DATE_EPOCH, sorts and uses cpio --reproducible.
        run_in(tree, ["mkinitramfs", "-o", "/.hypersolid/initramfs.img", kver], log, unit.arch,
               env=epoch.unit_env(unit))
        shutil.copyfile(tree / ".hypersolid/initramfs.img", out / "initramfs.img")
        shutil.copyfile(tree / "boot" / f"vmlinuz-{kver}", out / "kernel.img")
        (out / "kernel.json").write_text(json.dumps({"version": kver}) + "\n")
        release_view(work, log)
