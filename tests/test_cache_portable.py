"""End to end, on a real tiny build: a damaged cache entry never reaches
dist/ (it is removed with one warning and rebuilt), and the cache moves
between machines as one export file that an unprivileged CI step can copy."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, TestProject, needs_root_and_tools, tiny_target
from hypersolid.cachecmd import used_entries
from hypersolid.config import Project

pytestmark = pytest.mark.integration

IMAGE = "dist/tiny/system-amd64.img"


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_cache) -> TestProject:
    needs_root_and_tools()
    p = TestProject(tmp_path_factory.mktemp("portable"), shared_cache)
    p.target("tiny", tiny_target())
    p.write("targets/tiny/rootfs/etc/motd", "portable\n")
    p.doit("bootfiles:tiny")
    return p


def hypersolid(project: TestProject, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYPERSOLID_CACHE": str(cache or project.cache), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "hypersolid.cli", "-C", str(project.root), *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def outcomes(output: str) -> dict[str, str]:
    """The stage timings table: task -> ok / cache hit / FAILED."""
    return {m[1]: m[2] for m in re.finditer(r"^  (\S+)\s+[\d.]+s  (.+)$", output, re.M)}


def warnings(output: str) -> list[str]:
    return [line for line in output.splitlines() if "warning:" in line]


def test_a_damaged_system_image_in_the_cache_is_rebuilt_not_shipped(project):
    project.doit("bootfiles:tiny")
    good = (project.root / IMAGE).read_bytes()
    cached = project.entry("squashfs", "tiny") / "system-amd64.img"
    good_cached = cached.read_bytes()  # dist/'s copy is stamped with the build id
    with open(cached, "r+b") as f:  # 4 KiB overwritten in the middle of the image
        f.seek(len(good_cached) // 2)
        f.write(b"\xa5" * 4096)
    noop = project.doit("bootfiles:tiny")  # the no-op build reads no entry: it cannot notice
    assert noop.executed == set() and warnings(noop.output) == []
    (project.root / IMAGE).unlink()  # the next build copies the image to dist/ again
    result = project.doit("bootfiles:tiny")
    key = project.key("squashfs", "tiny")
    assert warnings(result.output) == [
        f"hypersolid: warning: cache entry squashfs/{key} is corrupt (system-amd64.img's content differs "
        "from its record): removed, rebuilding it"]
    assert (project.root / IMAGE).read_bytes() == good
    assert cached.read_bytes() == good_cached
    assert project.doit("bootfiles:tiny").executed == set()


def test_a_file_deleted_from_a_cached_configure_tree_is_rebuilt_before_an_image_is_made_of_it(project):
    project.doit("bootfiles:tiny")
    good = (project.root / IMAGE).read_bytes()
    tree = project.entry("configure", "tiny") / "tree"
    (tree / "usr/bin/dpkg").unlink()
    shutil.rmtree(project.entry("squashfs", "tiny"))  # so the image is made again from that tree
    (project.root / IMAGE).unlink()
    result = project.doit("bootfiles:tiny")
    key = project.key("configure", "tiny")
    assert warnings(result.output) == [
        f"hypersolid: warning: cache entry configure/{key} is corrupt (tree/ differs from its record (a file "
        "changed, was added or removed, or a mode or owner changed)): removed, rebuilding it"]
    assert (tree / "usr/bin/dpkg").is_file()
    assert (project.root / IMAGE).read_bytes() == good
    assert hypersolid(project, "cache", "verify").returncode == 0


def test_cache_verify_removes_a_bad_entry_and_exits_1(project):
    project.doit("bootfiles:tiny")
    path = project.entry("configure", "tiny")
    key = project.key("configure", "tiny")
    (path / "packages.tsv").write_text("tampered\n")
    first = hypersolid(project, "cache", "verify")
    assert first.returncode == 1, first.stdout
    assert f"configure/{key}: packages.tsv" in first.stdout and not path.exists()
    assert hypersolid(project, "cache", "verify").returncode == 0
    project.doit("bootfiles:tiny")  # rebuilt for the tests after this one
    assert hypersolid(project, "cache", "verify", "--all").returncode == 0


@pytest.fixture
def share():
    """A directory an unprivileged user can reach (pytest's are root-only)."""
    d = Path(tempfile.mkdtemp(prefix="hypersolid-share-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d)


def test_export_copied_by_a_non_root_user_and_imported_elsewhere_rebuilds_nothing(project, tmp_path, share):
    project.doit("bootfiles:tiny")
    archive = share / "cache.tar"
    exported = hypersolid(project, "cache", "export", str(archive), "tiny")
    assert exported.returncode == 0, exported.stdout
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    assert all(m.isfile() and m.mode == 0o644 or m.isdir() and m.mode == 0o755 for m in members)
    assert {"oci-layout", "index.json"} <= {m.name for m in members}

    # What a CI cache step does: an unprivileged copy of the one file.
    copy = share / "restored.tar"
    subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cp", str(archive), str(copy)],
                   check=True)
    assert copy.stat().st_uid == 65534

    clone = TestProject(tmp_path / "elsewhere", tmp_path / "empty-cache")
    shutil.copytree(project.root / "targets", clone.root / "targets", dirs_exist_ok=True)
    shutil.copytree(project.root / "rootfs", clone.root / "rootfs", dirs_exist_ok=True)
    # Pinned to the versions the exporter resolved, as a CI job pins with a lock file: so
    # no resolve task asks the mirror (which may have moved on) and only bootfiles may run.
    shutil.copy(project.root / "build/tiny/amd64/resolved.lock", clone.root / "targets/tiny/packages-amd64.lock")
    with open(clone.root / "targets/tiny/target.yaml", "a") as f:
        f.write("lock: packages-{arch}.lock\n")
    imported = hypersolid(clone, "cache", "import", str(copy))
    assert imported.returncode == 0, imported.stdout
    entries = sorted(clone.cache.glob("*/*/manifest.json"))
    used = used_entries(Project(project.root), ["tiny"])
    assert [(p.parent.parent.name, p.parent.name) for p in entries] == sorted(used) and len(used) >= 4

    result = clone.doit("bootfiles:tiny")
    ran = {task for task, outcome in outcomes(result.output).items() if outcome != "cache hit"}
    assert ran == {"bootfiles:tiny"}, result.output
    assert outcomes(result.output)["squashfs:tiny"] == "cache hit"
    assert sorted(clone.cache.glob("*/*/manifest.json")) == entries  # nothing built
    assert (clone.root / IMAGE).read_bytes() == (project.root / IMAGE).read_bytes()
    again = hypersolid(clone, "cache", "import", str(copy))
    assert f"0 entries imported, {len(used)} already here" in again.stdout
