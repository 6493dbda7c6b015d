"""Shared helpers: throwaway projects driven through the real `doit` CLI."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from hypersolid.config import clear_caches

REPO = Path(__file__).resolve().parents[1]
MIRROR = os.environ.get("HYPERSOLID_TEST_MIRROR", "http://deb.debian.org/debian")


@dataclass
class DoitResult:
    returncode: int
    output: str

    @property
    def executed(self) -> set[str]:
        return set(re.findall(r"^\.  (\S+)$", self.output, re.M))

    @property
    def uptodate(self) -> set[str]:
        return set(re.findall(r"^-- (\S+)$", self.output, re.M))


class TestProject:
    """A project directory with its own targets, using the repo's package."""

    __test__ = False

    def __init__(self, root: Path, cache: Path):
        self.root, self.cache = root, cache
        (root / "targets").mkdir(parents=True, exist_ok=True)
        (root / "rootfs").mkdir(exist_ok=True)
        shutil.copy(REPO / "dodo.py", root / "dodo.py")

    def write(self, rel: str, text: str, mode: int | None = None) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        if mode is not None:
            path.chmod(mode)
        return path

    @contextmanager
    def temporary(self, rel: str, text: str, mode: int | None = None):
        """A file that exists only inside the with-block (hooks that break things)."""
        path = self.write(rel, text, mode)
        try:
            yield path
        finally:
            path.unlink()

    def target(self, name: str, text: str) -> Path:
        return self.write(f"targets/{name}/target.yaml", text)

    def doit(self, *args: str, check: bool = True, timeout: int = 1800, env: dict | None = None) -> DoitResult:
        env = {**os.environ, "HYPERSOLID_CACHE": str(self.cache),
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
        proc = subprocess.run([sys.executable, "-m", "doit", *args], cwd=self.root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        result = DoitResult(proc.returncode, proc.stdout)
        if check and proc.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}")
        return result

    def key(self, stage: str, target: str, arch: str | None = "amd64") -> str:
        d = self.root / "build" / target
        d = d / arch if arch and stage != "rootfs" else d
        return (d / f"{stage}.key").read_text().strip()

    def entry(self, stage: str, target: str, arch: str | None = "amd64") -> Path:
        return self.cache / stage / self.key(stage, target, arch)


def tiny_target(packages: str = "netbase", extra: str = "") -> str:
    """A small buildable target: Priority: required packages plus a few."""
    return textwrap.dedent(f"""\
        architectures: [amd64]
        suite: bookworm
        mirror: {MIRROR}
        security_mirror: null
        sections:
          - name: debian
            packages: [{packages}]
        hostname: tiny
        """) + textwrap.dedent(extra)


def needs_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("integration tests build real trees and need root")
    missing = [t for t in ("multistrap", "mksquashfs", "unsquashfs", "systemd-nspawn")
               if shutil.which(t) is None]
    if missing:
        pytest.fail(f"host tools missing: {', '.join(missing)} (run ./setup.sh --no-build)")


# What tests and the bench copy and then edit: targets, overlays, the boot
# script.  (Not the code or docs, which a developer may edit during a run.)
GUARDED = ("targets", "rootfs", "hypersolid/initramfs", "dodo.py")


def tracked_files() -> dict[str, bytes]:
    """Content (or link target) of the GUARDED files git tracks in this checkout."""
    try:
        names = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--", *GUARDED], check=True,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}  # not a git checkout (an unpacked tarball): nothing to compare
    out = {}
    for name in filter(None, names.decode().split("\0")):
        path = REPO / name
        try:
            out[name] = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        except OSError:
            out[name] = b"(missing)"
    return out


@pytest.fixture(scope="session", autouse=True)
def checkout_untouched():
    """No test writes into the tracked checkout: tests edit copies
    (checkout_copy, TestProject).  A stray edit once got committed
    (targets/qemu-amd64/rootfs/etc/motd); this fails the run instead."""
    before = tracked_files()
    yield
    after = tracked_files()
    changed = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
    assert not changed, (f"the test run changed tracked files of the checkout: {', '.join(changed)} "
                         "(a test or bench must edit a copy)")


@pytest.fixture(autouse=True)
def fresh_target_caches():
    """Parsed targets are memoised per process; tests write and edit targets."""
    clear_caches()
    yield
    clear_caches()


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for the whole run, so downloaded .debs and trees are shared."""
    return Path(os.environ.get("HYPERSOLID_TEST_CACHE") or tmp_path_factory.mktemp("cache"))


def checkout_copy(dest: Path) -> Path:
    """A copy of this checkout's targets, overlay and package: tests may edit
    it (e.g. the boot script) without touching the repository."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("targets", "rootfs", "hypersolid"):
        shutil.copytree(REPO / d, dest / d, symlinks=True, ignore=skip, dirs_exist_ok=True)
    return dest


@pytest.fixture(scope="session")
def default_project(tmp_path_factory, shared_cache) -> TestProject:
    """The shipped default target (qemu-amd64), built up to dist/."""
    needs_root_and_tools()
    p = TestProject(checkout_copy(tmp_path_factory.mktemp("checkout")), shared_cache)
    p.doit("bootfiles:qemu-amd64")
    return p


# Host setup a build may make once and leave (docs/build-graph.md): binfmt_misc
# for qemu-user and the tmpfs nspawn needs.  Everything else must be undone.
HOST_SETUP_MOUNTS = ("/proc/sys/fs/binfmt_misc", "/run/systemd/nspawn")


def mounts() -> list[str]:
    """The host's mounts, less the host setup a first build may add."""
    return [m for m in Path("/proc/mounts").read_text().splitlines()
            if m.split()[1] not in HOST_SETUP_MOUNTS]
