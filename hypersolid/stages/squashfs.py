"""squashfs: the configured tree + overlay + settings + post-configure hooks,
packed with mksquashfs into system-<arch>.img (bootfiles wraps it in a cpio
when the target wants one).

Everything cheap to change lives here, so an overlay edit costs a tree copy
and a compression run, never a configure.  The cached configured tree is
copied, not modified.
"""
from __future__ import annotations

from pathlib import Path

from .. import accounts, aptsources, epoch, hooks, intree
from ..dpkg import host_version, write_package_manifest
from ..mounts import release_view, writable_view
from ..run import Log, run
from . import Stage, Unit, register
from .rootfs import _origins, copy_overlay

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
    "var/cache/ldconfig/aux-cache",  # ldconfig's cache of file times and inodes: differs per build
    "etc/apt/apt.conf.d/*proxy*", "usr/sbin/policy-rc.d", "root/.bash_history",
)

# Where the running system finds the build id.  The cached image holds only
# these links; bootfiles appends /.hypersolid/ with the id to the dist copy,
# so a new id never needs a new image (see buildid.py).
BUILD_ID_LINKS = {
    "etc/hypersolid_build": "/.hypersolid/build",
    "etc/issue.d/hypersolid.issue": "/.hypersolid/issue",  # the login banner (agetty)
    "etc/motd.d/hypersolid": "/.hypersolid/motd",          # after login (pam_motd)
}


# The host library each compressor uses: mksquashfs' output bytes depend on
# its version (part of the key, so a host upgrade does not hide behind a hit).
COMPRESSOR_LIBRARY = {"zstd": "libzstd1", "xz": "liblzma5", "gzip": "zlib1g", "lz4": "liblz4-1",
                      "lzo": "liblzo2-2"}


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
    helpers = ("hypersolid.accounts", "hypersolid.aptsources", "hypersolid.container", "hypersolid.dpkg",
               "hypersolid.epoch", "hypersolid.hooks", "hypersolid.intree", "hypersolid.mounts")
    upstream = ("configure", "rootfs")
    doc = "system image: configured tree + overlay + users/services/hooks, packed by mksquashfs"
    reads = ("hostname", "timezone", "users", "root_password", "services_enable", "services_disable",
             "compression", "compression_level", "image_sources")
    uses = ("hook_timeout",)
    isolated = True  # the overlay over the configured tree

    def computed(self, unit: Unit) -> dict:
        library = COMPRESSOR_LIBRARY[unit.target.compression]
        return {"arch": unit.arch, "squashfs_tools": host_version("squashfs-tools"),
                "compressor_library": [library, host_version(library)],
                "build_id_links": BUILD_ID_LINKS}

    def input_files(self, unit: Unit) -> dict[str, Path]:
        return hooks.input_files(unit, "post-configure")

    def build(self, unit: Unit, out: Path, log: Log) -> None:
        work = out / ".work"
        tree = writable_view(unit.output("configure") / "tree", work, log)
        copy_overlay(unit.without_arch().output("rootfs") / "tree", tree, log)
        self._settings(unit, tree, log)
        hooks.run_in_tree(unit, "post-configure", tree, log)
        write_package_manifest(tree, out / "packages.tsv")
        with intree.Root(tree) as root:  # links in the tree followed inside it, never onto the host
            for pattern in LEFTOVERS:
                for gone in root.remove_matching(pattern):
                    log.note(f"# removed /{gone}")
            # After the hooks: the image's apt sources are exactly image_sources.
            try:
                for gone in aptsources.install(root, unit.target.image_sources):
                    log.note(f"# removed /{gone}")
            except aptsources.SourcesError as err:
                raise log.fail(str(err)) from None
            log.note(f"# /{aptsources.SOURCES_FILE}:\n" + aptsources.deb822(
                unit.target.image_sources, lambda p: root.exists(p.lstrip("/"))))
            root.makedirs("boot")
            root.write_text("etc/machine-id", "", mode=0o444)
            for link, dest in BUILD_ID_LINKS.items():
                root.symlink(dest, link)
        tree.chmod(0o755)

        image = out / image_name(unit.arch)
        t = unit.target
        # SOURCE_DATE_EPOCH: mksquashfs 4.5.1 clamps every mtime and stamps
        # the superblock with it (and is -reproducible by default).
        run(["mksquashfs", tree, image, "-noappend", "-no-progress", "-quiet",
             *mksquashfs_args(t.compression, t.compression_level)], log, env=epoch.unit_env(unit))
        size = image.stat().st_size
        if size < MIN_IMAGE_BYTES:
            raise log.fail(f"mksquashfs wrote only {size} bytes to {image.name} (disk full?)")
        release_view(work, log)

    def _settings(self, unit: Unit, tree: Path, log: Log) -> None:
        """Hostname, hosts, timezone, users and services, written in the tree
        as the image resolves paths (intree): a link from an overlay or a
        package is written through inside the tree and stays a link."""
        t = unit.target
        origin = _origins(unit.without_arch().output("rootfs") / "tree")

        def fail(rel: str, what: str):
            return log.fail(f"{origin(rel, rel)}: {what}")

        with intree.Root(tree) as root:
            try:
                rel = "etc/hostname"
                root.write_text(rel, t.hostname + "\n")
                rel = "etc/hosts"
                if not root.exists(rel) or t.hostname not in root.read_text(rel).split():
                    root.write_text(rel, f"127.0.0.1\tlocalhost\n127.0.1.1\t{t.hostname}\n"
                                    "::1\tlocalhost ip6-localhost ip6-loopback\n")
                zone = f"usr/share/zoneinfo/{t.timezone}"
                if t.timezone not in ("Etc/UTC", "UTC") and not root.exists(zone):
                    raise log.fail(f"timezone {t.timezone}: no {zone} in the image "
                                   "(add the package 'tzdata')")
                rel = "etc/localtime"
                root.symlink(f"/usr/share/zoneinfo/{t.timezone}", rel)
                rel = "etc/timezone"
                root.write_text(rel, t.timezone + "\n")
            except OSError as err:
                raise fail(rel, f"cannot write {rel} in the image: {err.strerror or err}") from None
        try:
            accounts.apply(tree, t.users, t.root_password)
        except accounts.AccountError as err:
            raise log.fail(str(err)) from None
        for verb, units in (("enable", t.services_enable), ("disable", t.services_disable)):
            if units:
                run(["systemctl", f"--root={tree}", verb, *units], log, env=epoch.unit_env(unit))
