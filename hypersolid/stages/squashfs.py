"""squashfs: the configured tree + overlay + settings + post-configure hooks,
packed with mksquashfs.

Everything cheap to change lives here, so an overlay edit costs a tree copy
and a compression run, never a configure.  The cached configured tree is
copied, not modified.
"""
from __future__ import annotations

import os
from pathlib import Path

from .. import accounts
from ..container import run_in
from ..dpkg import host_version, write_package_manifest
from ..isolate import build_isolated, release_view, writable_view
from ..run import Log, run
from . import Stage, Unit, register
from .rootfs import copy_overlay

MIN_IMAGE_BYTES = 1 << 20

# Removed before packing: build leftovers, caches rebuilt on the device, and
# per-machine secrets and identities (SSH host keys are generated at first
# boot by hypersolid-firstboot.service; an empty machine-id makes systemd
# generate one).
LEFTOVERS = (
    "etc/ssh/ssh_host_*", "var/lib/dbus/machine-id", "usr/bin/qemu-*-static",
    "var/lib/systemd/random-seed", "var/lib/systemd/credential.secret",
    "boot/*", ".hypersolid", "tmp/*", "var/tmp/*",
    "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/cache/debconf/*-old",
    "var/lib/apt/lists/*_*", "var/log/dpkg.log", "var/log/alternatives.log",
    "var/log/apt/*", "var/log/bootstrap.log",
    "etc/apt/apt.conf.d/*proxy*", "usr/sbin/policy-rc.d", "root/.bash_history",
)

HOOK_RUNNER = r"""#!/bin/sh
set -u
for hook in /.hypersolid/post-configure/*; do
    [ -e "$hook" ] || continue
    echo "hypersolid: post-configure hook ${hook##*/}"
    status=0; "$hook" || status=$?
    if [ "$status" -ne 0 ]; then
        echo "hypersolid: hook post-configure.d/${hook##*/} failed with status $status"; exit 97
    fi
done
"""


def image_name(arch: str, ext: str = "img") -> str:
    return f"system-{arch}.{ext}"


def mksquashfs_args(compression: str, level: int | None) -> list[str]:
    """Compressor options; a level applies to zstd, gzip and lzo (xz and lz4 have none).

    zstd defaults to level 3, not mksquashfs' 15: measured here on a 630 MB
    tree, 2.4 s instead of over 30 s, still smaller than lz4."""
    args = ["-comp", compression]
    if level is None and compression == "zstd":
        level = 3
    if level is not None and compression in ("zstd", "gzip", "lzo"):
        args += ["-Xcompression-level", str(level)]
    return args


@register
class Squashfs(Stage):
    name = "squashfs"
    helpers = ("hypersolid.accounts", "hypersolid.container", "hypersolid.dpkg",
               "hypersolid.isolate")
    upstream = ("configure", "rootfs")
    doc = "system image: configured tree + overlay + users/services/hooks, packed by mksquashfs"

    def settings(self, unit: Unit) -> dict:
        t = unit.target
        return {
            "arch": unit.arch, "hostname": t.hostname, "timezone": t.timezone,
            "users": [[u.name, list(u.groups), u.sudo, u.password, u.shell] for u in t.users],
            "root_password": t.root_password,
            "services": {"enable": list(t.services_enable), "disable": list(t.services_disable)},
            "compression": [t.compression, t.compression_level], "image": t.image,
            "squashfs_tools": host_version("squashfs-tools"), "hook_runner": HOOK_RUNNER,
        }

    def input_files(self, unit: Unit) -> dict[str, Path]:
        return {f"post-configure.d/{h.name}": h for h in unit.target.hook_files("post-configure")}

    def build(self, unit: Unit, out: Path, log: Log) -> None:
        build_isolated(self.name, unit, out, log)

    def assemble(self, unit: Unit, out: Path, log: Log) -> None:
        """Runs in build_isolated's private mount namespace."""
        work = out / ".work"
        tree = writable_view(unit.output("configure") / "tree", work, log)
        copy_overlay(unit.without_arch().output("rootfs") / "tree", tree, log)
        self._settings(unit, tree, log)
        self._hooks(unit, tree, log)
        write_package_manifest(tree, out / "packages.tsv")
        run(["sh", "-c", 'cd "$0" && rm -rf -- ' + " ".join(LEFTOVERS), tree], log)
        (tree / "boot").mkdir(exist_ok=True)
        (tree / "etc/machine-id").write_text("")

        image = out / image_name(unit.arch)
        t = unit.target
        run(["mksquashfs", tree, image, "-noappend", "-no-progress", "-quiet",
             *mksquashfs_args(t.compression, t.compression_level)], log)
        size = image.stat().st_size
        if size < MIN_IMAGE_BYTES:
            raise log.fail(f"mksquashfs wrote only {size} bytes to {image.name} (disk full?)")
        if t.image in ("cpio", "both"):
            cpio = out / image_name(unit.arch, "cpio")
            run(["sh", "-c", f'cd "$0" && echo {image.name} | cpio --quiet -o -H newc > "$1"',
                 out, cpio], log)
            if t.image == "cpio":
                image.unlink()
        release_view(work, log)

    def _settings(self, unit: Unit, tree: Path, log: Log) -> None:
        t = unit.target
        (tree / "etc/hostname").write_text(t.hostname + "\n")
        hosts = tree / "etc/hosts"
        if not hosts.exists() or t.hostname not in hosts.read_text().split():
            hosts.write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{t.hostname}\n"
                             "::1\tlocalhost ip6-localhost ip6-loopback\n")
        zone = tree / "usr/share/zoneinfo" / t.timezone
        if t.timezone not in ("Etc/UTC", "UTC") and not zone.exists():
            raise log.fail(f"timezone {t.timezone}: no {zone.relative_to(tree)} in the image "
                           "(add the package 'tzdata')")
        localtime = tree / "etc/localtime"
        if localtime.is_symlink() or localtime.exists():
            localtime.unlink()
        localtime.symlink_to(f"/usr/share/zoneinfo/{t.timezone}")
        (tree / "etc/timezone").write_text(t.timezone + "\n")
        try:
            accounts.apply(tree, t.users, t.root_password)
        except accounts.AccountError as err:
            raise log.fail(str(err)) from None
        for verb, units in (("enable", t.services_enable), ("disable", t.services_disable)):
            if units:
                run(["systemctl", f"--root={tree}", verb, *units], log)

    def _hooks(self, unit: Unit, tree: Path, log: Log) -> None:
        hooks = unit.target.hook_files("post-configure")
        if not hooks:
            return
        d = tree / ".hypersolid/post-configure"
        d.mkdir(parents=True)
        for hook in hooks:
            if not os.access(hook, os.X_OK):
                raise log.fail(f"hook {os.path.relpath(hook, unit.project.root)} is not executable (chmod +x it)")
            run(["cp", "-p", hook, d / hook.name], log)
        runner = d.parent / "run-post-configure"
        runner.write_text(HOOK_RUNNER)
        runner.chmod(0o755)
        run_in(tree, ["/.hypersolid/run-post-configure"], log, unit.arch)

