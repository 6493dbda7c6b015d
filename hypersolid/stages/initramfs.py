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

A cold build usually finds such a memo already: configure starts an early
initramfs (start_early) from a copy of the bootstrap tree, given what
configure does that mkinitramfs sees (merged /usr, the biarch cleanup,
initramfs-tools' modules file, ldconfig, depmod), and runs it beside
`dpkg --configure`.  Its record is checked over the configured tree like
any other, so a difference only costs the build after configure.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

from .. import epoch, initramfs_inputs, unpack, usrmerge
from ..cache import digest_json, remove_tree
from ..config import INITRAMFS_COMPRESSORS
from ..container import run_in
from ..mounts import release_view, writable_view
from ..run import Log, run
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


def missing(tree: Path, kver: str | None, arch: str, compression: str) -> str | None:
    """What the tree lacks for mkinitramfs, as the build's error (None: nothing)."""
    if kver is None:
        return (f"no kernel in the configured tree (boot/vmlinuz-* with lib/modules/*): "
                f"the target's packages for {arch} name no installable linux-image-*")
    if not (tree / "usr/sbin/mkinitramfs").exists():
        return "mkinitramfs is missing from the tree: add the package 'initramfs-tools'"
    tool = compressor(compression)
    if not any((tree / d / tool).exists() for d in ("usr/bin", "bin")):
        return (f"initramfs compression {compression} needs {tool} in the tree: add the "
                f"package '{INITRAMFS_COMPRESSORS[compression]}' (or set initramfs: {{compression: gzip}})")
    return None


def compressor(compression: str) -> str:
    return "lzma" if compression == "lzma" else compression


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
        kver = kernel_version(lower)
        problem = missing(lower, kver, unit.arch, unit.target.initramfs_compression)
        if problem:
            raise log.fail(problem)
        sde = epoch.source_date_epoch(unit)
        static = self.static(unit, sde)
        found = initramfs_inputs.find(unit.cache, MEMO, static, lower, sde)
        if found is not None:
            log.note(f"# what the initramfs is made of is unchanged: reusing {found[0]}")
            for name in OUTPUTS:
                link_or_copy(found[0] / name, out / name)
            return
        make(unit, lower, kver, static, sde, out, log)

    def static(self, unit: Unit, sde: int) -> str:
        """Everything but the configured tree: settings, code, boot script and hook, epoch."""
        manifest = self.manifest(unit, {s: "" for s in self.upstream_of(unit)})
        return digest_json({**{k: v for k, v in manifest.items() if k != "upstream"}, "epoch": sde})


def make(unit: Unit, lower: Path, kver: str, static: str, sde: int, out: Path, log: Log,
         unpacked: bool = False) -> None:
    """mkinitramfs over a writable view of `lower` (in a private mount
    namespace): the outputs into `out`, and the memo of what went in.
    unpacked: `lower` is a tree whose packages are unpacked, not configured
    (start_early), so their versions count as installed ones in the memo's key."""
    t = unit.target
    tool = compressor(t.initramfs_compression)
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
    content = initramfs_inputs.digest(deps, lower, sde, unpacked=unpacked)
    # Not part of the digest: what start_early compares before it makes another.
    deps["versions"] = hook_versions(lower, deps["packages"], kver, unpacked)
    if unit.cache.lookup(MEMO, content) is None:
        with unit.cache.publish(MEMO, content, {"stage": MEMO, "target": t.name, "arch": unit.arch}) as memo:
            for name in OUTPUTS:
                link_or_copy(out / name, memo / name)
            (memo / "deps.json").write_text(json.dumps(deps, indent=1) + "\n")
    log.note(f"# recorded what went in: {len(deps['files'])} files, memo {unit.cache.entry(MEMO, content)}")


# Early initramfs: made from the bootstrap tree while configure runs.
#
# The packages owning initramfs-tools' hooks, scripts and configuration whose
# postinst was read and found to make nothing an initramfs is made of except
# what `_prepare_early` does too (a package not named here, with a postinst,
# keeps the initramfs after configure: its postinst might write a file a hook
# copies only if it exists, which no record can see missing).
AUDITED = {
    "initramfs-tools-core": "writes /etc/initramfs-tools/modules from the template when missing (done here too)",
    "initramfs-tools": "runs update-initramfs, which configure diverts",
    "klibc-utils": "replaces its doc directory by a link",
    "kmod": "writes /etc/modules and rc links (the initramfs reads neither)",
    "udev": "updates hwdb.bin (not copied by the udev hook) and would start udev",
    "dmsetup": "activates the update-initramfs trigger",
}


# auto (the default): for an emulated architecture only.  Natively mkinitramfs
# takes seconds and runs beside squashfs anyway, so the extra copy of the
# tree would cost what the overlap saves; 1: natively too; 0: never.
EARLY_ENV = "HYPERSOLID_EARLY_INITRAMFS"


class NoEarly(Exception):
    """Why the early child made no initramfs (a note, never a failure)."""


def unaudited(tree: Path) -> list[str]:
    """The packages owning initramfs-tools files that have a postinst not in AUDITED."""
    info = tree / "var/lib/dpkg/info"
    owners, _ = initramfs_inputs.config_owners(tree)
    return [o for o in owners if o not in AUDITED and (any(info.glob(f"{o}.postinst"))
                                                       or any(info.glob(f"{o}:*.postinst")))]


def start_early(unit: Unit, bootstrap: Path, work: Path, log: Log, top: list[Path] = ()) -> "Isolated | None":
    """Start making the initramfs from the bootstrap tree and the top
    packages' .debs (`top`, layers.py) in an isolated child, so it runs
    beside `dpkg --configure` (the two longest stages of an emulated build,
    each on one core).  The child publishes the memo the initramfs stage
    then finds over the configured tree (the early cutoff's check,
    unchanged): what it records must be the same there, or the stage builds
    as before.  None (with the reason in the log) when this cannot pay off
    or cannot be trusted."""
    from ..container import emulated
    from ..run import Isolated
    from . import STAGES, real_target, view
    stage = STAGES["initramfs"]
    whole = dataclasses.replace(unit, target=real_target(unit.target))
    wanted = os.environ.get(EARLY_ENV, "auto")
    if not stage.applies(whole) or os.environ.get("HYPERSOLID_JOBS") == "1" or wanted == "0" or \
            (wanted != "1" and not emulated(unit.arch)):
        return None
    unit = view(stage, whole)
    t = unit.target
    kver = kernel_version(bootstrap)
    if kver is None or (not top and missing(bootstrap, kver, unit.arch, t.initramfs_compression)):
        return None  # the initramfs stage says what is missing (the child checks it with the top packages)
    if t.hook_files("pre-configure"):
        log.note("# initramfs after configure: a pre-configure hook may change what it is made of")
        return None
    owners, _ = initramfs_inputs.config_owners(bootstrap)
    unknown = unaudited(bootstrap)
    if unknown:
        log.note(f"# initramfs after configure: the postinst of {', '.join(unknown)} may make what it holds")
        return None
    sde = epoch.source_date_epoch(unit)
    static = stage.static(unit, sde)
    versions = hook_versions(bootstrap, owners, kver, unpacked=True)
    if any(deps.get("versions") == versions for _, deps in initramfs_inputs.records(unit.cache, MEMO, static)):
        log.note("# initramfs after configure: an earlier one of the same kernel and hook packages likely fits")
        return None
    early_log = Log(unit.log_path("initramfs-early"), f"initramfs-early:{t.name}/{unit.arch}")
    log.note(f"# making the initramfs from the bootstrap tree meanwhile: {early_log.path}")
    return Isolated(_early, unit, bootstrap, [Path(p) for p in top], work, kver, static, sde, early_log)


def hook_versions(tree: Path, owners: list[str], kver: str, unpacked: bool) -> dict:
    """The versions of the kernel package and of the packages owning hooks."""
    return initramfs_inputs.package_versions(tree, [*owners, f"linux-image-{kver}"], unpacked)


def _early(unit: Unit, bootstrap: Path, top: list[Path], work: Path, kver: str, static: str, sde: int,
           log: Log) -> None:
    """The isolated child of start_early: a copy of the bootstrap tree with
    the top packages unpacked as the bootstrap unpacks (a flat build's tree
    before configure), made what configure makes of it for mkinitramfs,
    then `make` over it."""
    try:
        tree = work / "tree"
        work.mkdir()
        run(["cp", "-a", bootstrap, tree], log)
        if top:
            unpack.unpack_more(tree, top, log)
            problem = missing(tree, kver, unit.arch, unit.target.initramfs_compression)
            if problem:
                raise NoEarly(problem)
            unknown = unaudited(tree)
            if unknown:
                raise NoEarly(f"the postinst of {', '.join(unknown)} may make what it holds")
        _prepare_early(tree, kver, unit.arch, sde, log)
        make(unit, tree, kver, static, sde, work / "out", log, unpacked=True)
    finally:
        remove_tree(work)


def _prepare_early(tree: Path, kver: str, arch: str, sde: int, log: Log) -> None:
    """What configure does that mkinitramfs sees: merged /usr (usrmerge.py,
    as configure does it), initramfs-tools-core's modules file, the
    library cache (libc-bin's trigger) and the kernel's module index (its
    postinst's depmod)."""
    if (tree / "var/lib/dpkg/info/usrmerge.list").exists():
        usrmerge.merge(tree)  # NotSimple: no early initramfs (configure leaves it to the postinst)
        _cleanup_biarch(tree)
    modules, template = tree / "etc/initramfs-tools/modules", tree / "usr/share/initramfs-tools/modules"
    if template.is_file() and not modules.exists() and not modules.is_symlink() and modules.parent.is_dir():
        modules.write_text("".join(line for line in template.read_text().splitlines(keepends=True)
                                   if not line.startswith("###")))
        os.chmod(modules, 0o644)
    system_map = f"/boot/System.map-{kver}"
    depmod = f"depmod -a -F {system_map} {kver}" if (tree / system_map.lstrip("/")).exists() else f"depmod -a {kver}"
    run_in(tree, ["/bin/sh", "-c", f"ldconfig && {depmod}"], log, arch, env=epoch.env(sde))


def _cleanup_biarch(tree: Path) -> None:
    """What usrmerge's postinst does after the conversion (cleanup_biarch_dirs
    on a first install): a biarch directory or link no package owns goes
    (multistrap's `lib64 -> ./lib` on arm64), and its empty /usr twin too;
    mkinitramfs links each lib* of the root into the initramfs."""
    owned = set()
    for path in (tree / "var/lib/dpkg/info").glob("*.list"):
        owned.update(path.read_text(errors="replace").splitlines())
    for name in ("lib64", "lib32", "libo32", "libx32"):
        top = tree / name
        if not top.exists() or f"/{name}" in owned:  # [ -e ] follows the link, as the postinst's test
            continue
        if top.is_dir() and not top.is_symlink():
            continue  # rm without -r fails there, and the postinst with it
        top.unlink()
        twin = tree / "usr" / name
        if twin.is_dir() and not twin.is_symlink() and f"/usr/{name}" not in owned and not any(twin.iterdir()):
            twin.rmdir()


def link_or_copy(src: Path, dest: Path) -> None:
    """A hard link between cache entries (same bytes, no space), else a copy."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
