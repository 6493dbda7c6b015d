"""Run commands inside a target tree: systemd-nspawn, or a chroot in a private
mount and PID namespace when nspawn is unavailable.

Neither leaves a mount or a process on the host: both are argv prefixes
for the runner, which starts them in a PID and mount namespace of their
own (nspawn adds its own; the fallback's proc/sys/dev mounts die with the
runner's), killed as a whole on a signal, a timeout or doit's death.
Foreign-architecture binaries run through the host's binfmt_misc qemu-user
handlers (registered with the F flag, so nothing is copied into the tree).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

from . import intree
from .run import Log, output, run

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
# Debian architecture -> qemu-user name (binfmt handler qemu-<name>).
QEMU_USER = {"arm64": "aarch64", "armhf": "arm", "armel": "arm", "i386": "i386", "amd64": "x86_64"}
# Host architectures that run another one's binaries natively (not every
# arm64 CPU runs 32-bit ARM code, so armhf/armel on arm64 stay emulated).
NATIVE_ALSO = {"amd64": {"i386"}}

NSPAWN_RUNTIME = Path("/run/systemd/nspawn")
# The container's host name: fixed, since a tool that records it (the
# machine name hs-<pid> otherwise) would make two builds differ.
HOSTNAME = "hypersolid"
CONTAINER_ENV = {
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
    "LC_ALL": "C.UTF-8",
    "LANG": "C.UTF-8",
    "LANGUAGE": "C",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
}


def backend() -> str:
    """'nspawn' or 'chroot'; HYPERSOLID_CONTAINER forces one."""
    forced = os.environ.get("HYPERSOLID_CONTAINER")
    if forced in ("nspawn", "chroot"):
        return forced
    return "nspawn" if shutil.which("systemd-nspawn") else "chroot"


def _ensure_nspawn_runtime(log: Log) -> None:
    """nspawn needs a writable /run/systemd/nspawn; on this kind of host (PID 1
    is not systemd) it is a tmpfs we mount once and leave for later builds
    (from a stage's private mount namespace it lasts as long as that).
    Host setup, like binfmt_misc."""
    if os.path.ismount(NSPAWN_RUNTIME):
        return
    NSPAWN_RUNTIME.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", NSPAWN_RUNTIME], log, contain=False)


@lru_cache(maxsize=None)
def host_arch() -> str:
    return output(["dpkg", "--print-architecture"]).strip()


def emulated(arch: str) -> bool:
    """Whether the tree's binaries run under qemu-user on this host."""
    host = host_arch()
    return arch != host and arch not in NATIVE_ALSO.get(host, ())


def ensure_binfmt(arch: str, log: Log) -> None:
    """Make sure the kernel hands `arch` binaries to qemu-user: check the
    binfmt_misc handler, register it through binfmt-support when it is only
    missing, and otherwise stop saying what to install.  The handler needs
    the F flag (interpreter opened at registration), because nothing is
    copied into the tree."""
    if not emulated(arch):
        return
    name = f"qemu-{QEMU_USER[arch]}"
    entry = BINFMT_DIR / name
    if not (BINFMT_DIR / "status").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT_DIR], log, check=False, contain=False)
    if not entry.exists() and shutil.which("update-binfmts") and Path(f"/usr/share/binfmts/{name}").exists():
        log.note(f"# registering the binfmt_misc handler {name} for {arch}")
        run(["update-binfmts", "--enable", name], log, check=False, contain=False)
    install = "apt-get install qemu-user-static binfmt-support (or ./setup.sh --no-build)"
    if not entry.exists():
        raise log.fail(f"{arch} binaries cannot run on this {host_arch()} host: no binfmt_misc handler "
                       f"{entry}; {install}")
    lines = entry.read_text().splitlines()
    if lines[0] != "enabled":
        raise log.fail(f"binfmt_misc handler {entry} is disabled: update-binfmts --enable {name}")
    flags = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("flags:")), "")
    if "F" not in flags:
        raise log.fail(f"binfmt_misc handler {entry} lacks the F flag (flags: {flags or 'none'}), so the "
                       f"interpreter would have to be inside the tree; use qemu-user-static's handlers: {install}")


def command(tree: Path, argv: Sequence[str], log: Log, env: Mapping[str, str] | None = None,
            console: str | None = None) -> list[str]:
    """The command line that runs argv with tree as its root: a sandbox
    prefix for the runner.  console: nspawn's --console mode (None: its
    default; attach passes interactive or pipe so a terminal or piped stdin
    reaches the shell)."""
    full_env = {**CONTAINER_ENV, **(env or {})}
    tree = Path(tree).resolve()
    if backend() == "nspawn":
        _ensure_nspawn_runtime(log)
        cmd = ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "--as-pid2",
               "--resolv-conf=off", "--timezone=off", "--link-journal=no",
               f"--machine=hs-{os.getpid()}", f"--hostname={HOSTNAME}", "-D", str(tree)]
        cmd += [f"--console={console}"] if console else []
        cmd += [f"--setenv={k}={v}" for k, v in full_env.items()]
        return cmd + ["--", *argv]
    setup = (f'hostname {HOSTNAME} && mount -t proc proc "$0/proc" && mount -t sysfs sysfs "$0/sys" && '
             'mount --rbind /dev "$0/dev" && exec chroot "$0" "$@"')
    # The runner's own PID and mount namespaces hold these mounts; a UTS
    # namespace of its own for the fixed host name.
    return ["unshare", "--uts", "sh", "-c", setup, str(tree), "/usr/bin/env", "-i",
            *[f"{k}={v}" for k, v in full_env.items()], *argv]


def run_in(tree: Path, argv: Sequence[str], log: Log, arch: str, env: Mapping[str, str] | None = None,
           check: bool = True, timeout: float | None = None, console: str = "log",
           nspawn_console: str | None = None) -> subprocess.CompletedProcess:
    """Run argv (a path inside the tree, whose binaries are for `arch`) with
    tree as its root, through the runner (output to the log, killed with
    everything under it on a signal or past `timeout`)."""
    ensure_binfmt(arch, log)
    return run(command(tree, argv, log, env, nspawn_console), log, check=check, timeout=timeout,
               console=console)


def install_script(tree: Path, name: str, text: str) -> str:
    """Put a build script into the tree's /.hypersolid (not /tmp: nspawn
    mounts a tmpfs there), made afresh each time; returns its path inside
    the tree."""
    with intree.Root(tree) as root:
        root.fresh_dir(".hypersolid")  # whatever was there (a link, a package's) goes
        root.write_text(f".hypersolid/{name}", text, 0o755)
    return f"/.hypersolid/{name}"
