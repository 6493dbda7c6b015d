"""Run commands inside a target tree: systemd-nspawn, or a chroot in a private
mount and PID namespace when nspawn is unavailable.

Neither leaves a mount on the host: nspawn's mounts live in its own
namespace, and the fallback's proc/sys/dev mounts die with `unshare`'s
namespace however the process ends.  Foreign-architecture binaries run
through the host's binfmt_misc qemu-user handlers (registered with the F
flag, so nothing is copied into the tree).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

from .run import Log, run

NSPAWN_RUNTIME = Path("/run/systemd/nspawn")
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


def _ensure_nspawn_runtime() -> None:
    """nspawn needs a writable /run/systemd/nspawn; on this kind of host (PID 1
    is not systemd) it is a tmpfs we mount once and leave for later builds."""
    if os.path.ismount(NSPAWN_RUNTIME):
        return
    NSPAWN_RUNTIME.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(NSPAWN_RUNTIME)], check=True)


def run_in(tree: Path, argv: Sequence[str], log: Log, env: Mapping[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """Run argv (a path inside the tree) with tree as its root."""
    full_env = {**CONTAINER_ENV, **(env or {})}
    tree = Path(tree).resolve()
    if backend() == "nspawn":
        _ensure_nspawn_runtime()
        cmd = ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "--as-pid2",
               "--resolv-conf=off", "--timezone=off", "--link-journal=no",
               f"--machine=hs-{os.getpid()}", "-D", str(tree)]
        cmd += [f"--setenv={k}={v}" for k, v in full_env.items()]
        cmd += ["--", *argv]
    else:
        setup = ('mount -t proc proc "$0/proc" && mount -t sysfs sysfs "$0/sys" && '
                 'mount --rbind /dev "$0/dev" && exec chroot "$0" "$@"')
        cmd = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
               "sh", "-c", setup, str(tree), "/usr/bin/env", "-i",
               *[f"{k}={v}" for k, v in full_env.items()], *argv]
    return run(cmd, log, check=check)


def install_script(tree: Path, name: str, text: str) -> str:
    """Put a build script into the tree's /.hypersolid (not /tmp: nspawn
    mounts a tmpfs there); returns its path inside the tree."""
    d = Path(tree) / ".hypersolid"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(text)
    (d / name).chmod(0o755)
    return f"/.hypersolid/{name}"
