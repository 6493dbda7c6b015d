"""bootfiles: the deliverables of a target in dist/<target>/.

    kernel-<arch>.img  initramfs-<arch>.img       (targets with a kernel)
    system-<arch>.img  and/or system-<arch>.cpio  (target.yaml `image:`; the
                                                   image with the build id appended)
    packages-<arch>.tsv                           (name, version, architecture)
    packages-<arch>.lock                          (the exact .debs: see lockfile.py)
    sbom-<arch>.cdx.json  sbom-<arch>.spdx.json   (CycloneDX 1.6, SPDX 2.3: see sbom.py)
    build-<arch>.json                             (target, build id, keys)
    boot/                                         (Raspberry Pi targets: the boot
                                                   partition, see raspberrypi.py)

Not cached: these are copies of cache entries, which already hold them once.
doit re-runs this stage when an upstream key changed or a dist file is
missing; each file is copied to a temporary name and renamed, so dist/ never
holds a half-written file.  Copies, not hard links: a hook that signs or
edits a file in dist/ must not reach into the cache.  The post-build hooks
run last, on the host, with the dist directory.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .. import buildid, epoch, hooks, raspberrypi
from ..cache import digest_file, remove_tree, sweep_leftovers, temp_name
from ..run import Log, run
from . import Stage, Unit, build_id, register
from .squashfs import image_name


@contextmanager
def _replacing(dest: Path) -> Iterator[Path]:
    """A temporary sibling of dest to write; renamed over dest when the block
    succeeds, removed when it fails (a full disk leaves nothing behind)."""
    tmp = temp_name(dest)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        remove_tree(tmp)
        raise


def newc(src: Path, dest: Path, mtime: int) -> None:
    """dest: a newc cpio archive of the one file src under its own name, mode
    0644, owner 0:0 and `mtime` (the header's fields, all fixed, so two
    builds give the same bytes): the bytes of `cpio --reproducible -R 0:0
    -o -H newc` (tests compare them), with the data copied in the kernel
    (copy_file_range) instead of through cpio's 512-byte blocks (0.7 s for
    a 200 MB image)."""
    def header(name: bytes, mode: int, mtime: int, size: int) -> bytes:
        fields = (0, mode, 0, 0, 1, mtime, size, 0, 0, 0, 0, len(name) + 1, 0)
        head = b"070701" + b"".join(b"%08X" % f for f in fields) + name + b"\0"
        return head + b"\0" * (-len(head) % 4)
    size = os.path.getsize(src)
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        fout.write(header(os.path.basename(src).encode(), 0o100644, mtime, size))
        fout.flush()
        left = size
        while left:
            done = os.copy_file_range(fin.fileno(), fout.fileno(), left)
            if done == 0:
                raise OSError(f"{src} shrank while being archived")
            left -= done
        pad, trailer = -size % 4, header(b"TRAILER!!!", 0, 0, 0)
        end = fout.seek(0, os.SEEK_END) + pad + len(trailer)
        fout.write(b"\0" * pad + trailer + b"\0" * (-end % 512))  # cpio's 512-byte blocks


def _upstream(unit: Unit) -> tuple[str, ...]:
    kernel = ("initramfs",) if unit.target.has_kernel(unit.arch) else ()
    return ("bootstrap", "configure", "squashfs", *kernel, "sbom")


@register
class Bootfiles(Stage):
    name = "bootfiles"
    cached = False
    helpers = ("hypersolid.buildid", "hypersolid.epoch", "hypersolid.hooks", "hypersolid.raspberrypi")
    doc = "dist/<target>/: kernel, initramfs, system image, package manifest, build info"
    reads = ("image", "rpi_dtbs", "rpi_consoles", "rpi_config_txt", "kernel_cmdline")
    uses = ("hook_timeout",)

    def upstream_of(self, unit: Unit) -> tuple[str, ...]:
        return _upstream(unit)

    def files(self, unit: Unit) -> dict[str, tuple[str, str]]:
        """dist name -> (stage, file in that stage's cache entry); the system
        image files are made from the squashfs entry's image."""
        a, image = unit.arch, unit.target.image
        files = {}
        if unit.target.has_kernel(a):
            files[f"kernel-{a}.img"] = ("initramfs", "kernel.img")
            files[f"initramfs-{a}.img"] = ("initramfs", "initramfs.img")
        for ext, wanted in (("img", ("img", "both")), ("cpio", ("cpio", "both"))):
            if image in wanted:
                files[image_name(a, ext)] = ("squashfs", image_name(a))
        files[f"packages-{a}.tsv"] = ("squashfs", "packages.tsv")
        files[f"packages-{a}.lock"] = ("configure", "packages.lock")
        files[f"sbom-{a}.cdx.json"] = ("sbom", "sbom.cdx.json")
        files[f"sbom-{a}.spdx.json"] = ("sbom", "sbom.spdx.json")
        return files

    def computed(self, unit: Unit) -> dict:
        return {"arch": unit.arch, "files": {k: list(v) for k, v in self.files(unit).items()},
                "build_id": build_id(unit.project, unit.target, unit.cache)}

    def input_files(self, unit: Unit) -> dict[str, Path]:
        return hooks.input_files(unit, "post-build")

    def pi_boot_dir(self, unit: Unit) -> Path | None:
        """dist/<target>/boot for a Raspberry Pi target with a kernel (boot-<arch>
        if the target has several architectures)."""
        t = unit.target
        if not t.rpi_dtbs or not t.has_kernel(unit.arch):
            return None
        return unit.dist_dir / ("boot" if len(t.architectures) == 1 else f"boot-{unit.arch}")

    def outputs(self, unit: Unit) -> list[Path]:
        boot = self.pi_boot_dir(unit)
        pi = [boot / "config.txt", boot / "cmdline.txt"] if boot else []
        return [unit.dist_dir / n for n in [*self.files(unit), f"build-{unit.arch}.json"]] + pi

    def build(self, unit: Unit, out: None, log: Log) -> None:
        hooks.checked(unit, "post-build", log)
        dist = unit.dist_dir
        dist.mkdir(parents=True, exist_ok=True)
        for leftover in sweep_leftovers(dist):
            log.note(f"# removed {leftover.name}, left by a build that was killed")
        a, build = unit.arch, build_id(unit.project, unit.target, unit.cache)
        files = self.files(unit)
        for name, (stage, src) in files.items():
            if not name.startswith("system-"):
                with _replacing(dist / name) as tmp:
                    run(["cp", "--reflink=auto", unit.output(stage, src), tmp], log)
        self._system(unit, build, files, log)
        for stale in (f"kernel-{a}.img", f"initramfs-{a}.img", image_name(a), image_name(a, "cpio")):
            if stale not in files and (dist / stale).exists():
                log.note(f"# removing {stale}: this build no longer produces it")
                (dist / stale).unlink()
        info = {
            "target": unit.target.name, "arch": a, "build_id": build,
            "build_id_from": buildid.ENV if buildid.given() else "inputs",
            "package_set": unit.key("bootstrap"), "configured": unit.key("configure"),
            "image": unit.key("squashfs"),
            "files": {n: {"size": (dist / n).stat().st_size, "xxh3_128": digest_file(dist / n)}
                      for n in sorted(files)},
        }
        if unit.target.has_kernel(a):
            info["initramfs"] = unit.key("initramfs")
            info["kernel_version"] = json.loads(
                (unit.output("initramfs") / "kernel.json").read_text())["version"]
        boot = self.pi_boot_dir(unit)
        if boot:
            self._pi_boot(unit, boot, log)
        with _replacing(dist / f"build-{a}.json") as tmp:
            tmp.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        hooks.run_on_host(unit, "post-build", log, {"HYPERSOLID_DIST": str(dist.resolve()),
                                                    "HYPERSOLID_BUILD_ID": build})

    def _system(self, unit: Unit, build: str, files: dict, log: Log) -> None:
        """The cached image, copied and stamped with the build id, then moved
        into dist as .img and/or wrapped in a newc cpio (the boot script finds
        it in the initramfs by name)."""
        a, dist = unit.arch, unit.dist_dir
        wanted = [n for n in files if n.startswith("system-")]
        if not wanted:
            return
        work = temp_name(dist / f"system-{a}")
        remove_tree(work)
        work.mkdir()
        try:
            img = work / image_name(a)
            run(["cp", "--reflink=auto", unit.output("squashfs") / image_name(a), img], log)
            sde = epoch.unit_env(unit)
            buildid.stamp_image(img, build, unit.target.name, a, log, sde)
            if image_name(a, "cpio") in wanted:
                img.chmod(0o644)
                os.utime(img, (int(sde[epoch.VAR]),) * 2)
                newc(img, work / image_name(a, "cpio"), int(sde[epoch.VAR]))
                os.replace(work / image_name(a, "cpio"), dist / image_name(a, "cpio"))
            if image_name(a) in wanted:
                os.replace(img, dist / image_name(a))
        finally:
            remove_tree(work)

    def _pi_boot(self, unit: Unit, boot: Path, log: Log) -> None:
        """Built beside, then swapped in: the old boot/ stays whole until then."""
        a = unit.arch
        new = temp_name(boot)
        remove_tree(new)
        new.mkdir()
        kver = json.loads((unit.output("initramfs") / "kernel.json").read_text())["version"]
        raspberrypi.write_boot_dir(unit.target, a, unit.output("configure") / "tree", kver,
                                   unit.dist_dir / f"kernel-{a}.img", unit.dist_dir / f"initramfs-{a}.img",
                                   new, log)
        old = temp_name(boot, "old")
        if boot.exists():
            os.rename(boot, old)
        os.rename(new, boot)
        remove_tree(old)
