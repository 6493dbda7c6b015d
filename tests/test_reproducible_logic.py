"""The fast half of reproducibility: what the caller's session must not leak
into a build (umask, the container's host name).  No root, no network."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

from conftest import REPO, TestProject, tiny_target
from hypersolid import container
from hypersolid.run import Log


def test_doit_creates_files_with_the_build_umask_whatever_the_callers(tmp_path):
    project = TestProject(tmp_path / "p", tmp_path / "cache")
    project.target("tiny", tiny_target())
    old = os.umask(0o077)
    try:
        project.doit("list")
    finally:
        os.umask(old)
    assert stat.S_IMODE((project.root / "build/doit.sqlite3").stat().st_mode) == 0o644


def test_the_hypersolid_command_sets_the_build_umask(tmp_path):
    code = ("import os, sys; from hypersolid import cli, run; "
            "cli.resolve = lambda *a: sys.exit(os.umask(0) == run.BUILD_UMASK and 7 or 8); "
            "cli.main(['build', 'x'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, preexec_fn=lambda: os.umask(0o077),
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 7


def test_the_container_has_a_fixed_host_name(tmp_path, monkeypatch):
    log = Log(tmp_path / "log", "test")
    monkeypatch.setattr(container, "_ensure_nspawn_runtime", lambda log: None)
    monkeypatch.setenv("HYPERSOLID_CONTAINER", "nspawn")
    nspawn = container.command(tmp_path, ["/bin/true"], log)
    assert f"--hostname={container.HOSTNAME}" in nspawn
    monkeypatch.setenv("HYPERSOLID_CONTAINER", "chroot")
    chroot = container.command(tmp_path, ["/bin/true"], log)
    assert chroot[:2] == ["unshare", "--uts"]
    assert f"hostname {container.HOSTNAME} &&" in chroot[chroot.index("-c") + 1]
