"""A package nothing else depends on, added to a built target: the
configured base is reused, and the image has the bytes a cold build of the
new set makes in a cache of its own (layers.py: the layers are a property
of the package set, never of what the cache holds)."""
from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TestProject, needs_root_and_tools, tiny_target
from hypersolid import lockfile

pytestmark = pytest.mark.integration

BEFORE = tiny_target()
AFTER = tiny_target(packages="netbase, ed")  # ed needs only libc6: a top package


def configure_log(p: TestProject) -> str:
    return (p.root / "build/t/amd64/logs/configure.log").read_text()


def test_a_top_package_added_builds_the_bytes_of_a_cold_build(tmp_path, shared_cache):
    needs_root_and_tools()
    incremental = TestProject(tmp_path / "incremental", shared_cache)
    incremental.target("t", BEFORE)
    incremental.doit("squashfs:t")
    bootstrap = incremental.key("bootstrap", "t")
    incremental.target("t", AFTER)
    incremental.doit("squashfs:t")
    assert incremental.key("bootstrap", "t") == bootstrap
    log = configure_log(incremental)
    assert "# the configured base is unchanged: reusing" in log, log
    assert "Setting up ed " in log and "Setting up base-files " not in log
    lock = incremental.root / "build/t/amd64/resolved.lock"
    assert "ed" in {e.package for e in lockfile.read(lock) if e.top}

    # The same set cold: a cache of its own (the .debs linked in, not
    # downloaded again) and the same lock (the mirror may move meanwhile).
    fresh = tmp_path / "fresh-cache"
    fresh.mkdir()
    subprocess.run(["cp", "-al", str(shared_cache / "debs"), str(fresh / "debs")], check=True)
    cold = TestProject(tmp_path / "cold", fresh)
    cold.target("t", AFTER + "lock: packages-{arch}.lock\n")
    cold.write("targets/t/packages-amd64.lock", lock.read_text())
    cold.doit("squashfs:t")
    assert "# configured the base" in configure_log(cold)
    for stage in ("bootstrap", "configure", "squashfs"):
        assert cold.key(stage, "t") == incremental.key(stage, "t"), stage
    assert filecmp.cmp(incremental.entry("squashfs", "t") / "system-amd64.img",
                       cold.entry("squashfs", "t") / "system-amd64.img", shallow=False)

    # clean --cache drops the base memo with the target's entries (its key file names it).
    base = cold.cache / "configure-base" / (cold.root / "build/t/amd64/configure-base.key").read_text().strip()
    configured = cold.entry("configure", "t")
    assert base.is_dir() and configured.is_dir()
    subprocess.run([str(Path(sys.executable).with_name("hypersolid")), "clean", "--cache", "t"], cwd=cold.root,
                   env={**os.environ, "HYPERSOLID_CACHE": str(fresh)}, check=True, capture_output=True)
    assert not base.exists() and not configured.exists()
