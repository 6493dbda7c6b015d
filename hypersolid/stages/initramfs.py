"""initramfs: the target's kernel and an initramfs holding hypersolid's boot
script (boot=hypersolid), made once per change of its inputs.

mkinitramfs runs in the container over an overlay of the configured tree,
not natively: the initramfs must hold the target's kernel modules, klibc,
udev and util-linux at the target's versions and for the target's
architecture, and only the configured tree has them (built natively, the
host's binaries would slip in).  Configure diverts update-initramfs, so this
is the only place an initramfs is generated.  The configured tree is only
read: configure never re-runs for a boot script edit.

The stage is keyed on the configured tree, which changes with any package;
the initramfs mostly does not.  So each build records what went into it
(initramfs_inputs.py) and memoises its outputs in
`<cache>/initramfs-content/<digest of those inputs>/`; a later build whose
recorded inputs are unchanged (same settings, boot script, epoch, kernel,
hooks, copied files) links them instead of running mkinitramfs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .. import epoch, initramfs_inputs
from ..cache import digest_json
from ..config import INITRAMFS_COMPRESSORS
from ..container import run_in
from ..mounts import release_view, writable_view
from ..run import Log
from . import Stage, Unit, register

BOOT_FILES = Path(__file__).resolve().parents[1] / "initramfs"
MEMO = "initramfs-content"
OUTPUTS = ("initramfs.img", "kernel.img", "kernel.json")
WORK_FILES = "/.hypersolid/mkinitramfs"  # TMPDIR of mkinitramfs -k, in the tree


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
    helpers = ("hypersolid.container", "hypersolid.epoch", "hypersolid.mounts", "hypersolid.initramfs_inputs")
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
        lower = unit.output("configure") / "tree"
        t = unit.target
        kver = kernel_version(lower)
        if kver is None:
            raise log.fail(f"no kernel in the configured tree (boot/vmlinuz-* with lib/modules/*): "
                           f"the target's packages for {unit.arch} name no installable linux-image-*")
        if not (lower / "usr/sbin/mkinitramfs").exists():
            raise log.fail("mkinitramfs is missing from the tree: add the package 'initramfs-tools'")
        tool = "lzma" if t.initramfs_compression == "lzma" else t.initramfs_compression
        if not any((lower / d / tool).exists() for d in ("usr/bin", "bin")):
            raise log.fail(f"initramfs compression {t.initramfs_compression} needs {tool} in the tree: add the "
                           f"package '{INITRAMFS_COMPRESSORS[t.initramfs_compression]}' (or set "
                           "initramfs: {compression: gzip})")
        sde = epoch.source_date_epoch(unit)
        # Everything but the configured tree: settings, code, boot script and hook, epoch.
        static = digest_json({**{k: v for k, v in self.manifest(unit).items() if k != "upstream"},
                              "epoch": sde})
        found = initramfs_inputs.find(unit.cache, MEMO, static, lower, sde)
        if found is not None:
            log.note(f"# what the initramfs is made of is unchanged: reusing {found[0]}")
            for name in OUTPUTS:
                link_or_copy(found[0] / name, out / name)
            return
        work = out / ".work"
        tree = writable_view(lower, work, log)
        conf = tree / "etc/initramfs-tools"
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
        kept = tree / WORK_FILES.lstrip("/")
        kept.mkdir()
        # mkinitramfs clamps mtimes to SOURCE_DATE_EPOCH, sorts and uses cpio --reproducible.
        # -k keeps its work directory: the list of what went in.
        run_in(tree, ["mkinitramfs", "-k", "-o", "/.hypersolid/initramfs.img", kver], log, unit.arch,
               env={**epoch.env(sde), "TMPDIR": WORK_FILES})
        destdirs = list(kept.glob("mkinitramfs_*"))
        if len(destdirs) != 1:
            raise log.fail(f"mkinitramfs -k left {len(destdirs)} work directories in {WORK_FILES} (expected one)")
        tools = [f"usr/bin/{tool}"] + (["usr/bin/xz"] if tool == "lzma" else [])  # lzma: a link to xz
        deps = initramfs_inputs.record(destdirs[0], lower, kver, tools, static)
        shutil.copyfile(tree / ".hypersolid/initramfs.img", out / "initramfs.img")
        shutil.copyfile(tree / "boot" / f"vmlinuz-{kver}", out / "kernel.img")
        (out / "kernel.json").write_text(json.dumps({"version": kver}) + "\n")
        release_view(work, log)
        content = initramfs_inputs.digest(deps, lower, sde)
        if unit.cache.lookup(MEMO, content) is None:
            with unit.cache.publish(MEMO, content, {"stage": MEMO, "target": t.name, "arch": unit.arch}) as memo:
                for name in OUTPUTS:
                    link_or_copy(out / name, memo / name)
                (memo / "deps.json").write_text(json.dumps(deps, indent=1) + "\n")
        log.note(f"# recorded what went in: {len(deps['files'])} files, memo {unit.cache.entry(MEMO, content)}")


def link_or_copy(src: Path, dest: Path) -> None:
    """A hard link between cache entries (same bytes, no space), else a copy."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
