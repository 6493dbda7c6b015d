"""The initramfs as a function of what it contains (issue #15): a package
the initramfs does not read leaves it alone, one that adds a hook rebuilds
it.  A small kernel target, built three times in one project: as is, with
`less`, then with `busybox` (whose hook BUSYBOX=auto picks up)."""
from __future__ import annotations

import re
import subprocess

import pytest

from conftest import TestProject, checkout_copy, needs_root_and_tools, tiny_target

pytestmark = pytest.mark.integration

NAME = "cutoff"
EXTRA = "initramfs: {compression: gzip, modules: list}\n"
REUSED = "# what the initramfs is made of is unchanged: reusing "


def target(packages: str) -> str:
    return tiny_target(packages=f"linux-image-amd64, initramfs-tools{packages}", extra=EXTRA)


def stage_seconds(output: str) -> float:
    return float(re.search(rf"^  initramfs:{NAME}\s+([\d.]+)s", output, re.M).group(1))


def members(image) -> set[str]:
    listing = subprocess.run(f"gzip -dc '{image}' | cpio -t --quiet", shell=True, check=True,
                             stdout=subprocess.PIPE, text=True).stdout
    return set(listing.split())


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_cache):
    needs_root_and_tools()
    p = TestProject(checkout_copy(tmp_path_factory.mktemp("cutoff")), shared_cache)
    p.target(NAME, target(""))
    first = p.doit(f"initramfs:{NAME}")
    p.first_seconds = stage_seconds(first.output)
    return p


def log(p: TestProject) -> str:
    return (p.root / f"build/{NAME}/amd64/logs/initramfs.log").read_text()


def image(p: TestProject) -> bytes:
    return (p.entry("initramfs", NAME) / "initramfs.img").read_bytes()


def test_adding_less_reuses_the_initramfs_byte_for_byte_in_seconds(project):
    before, configured = image(project), project.key("configure", NAME)
    project.target(NAME, target(", less"))
    result = project.doit(f"initramfs:{NAME}")
    assert f"initramfs:{NAME}" in result.executed and project.key("configure", NAME) != configured
    assert REUSED in log(project)
    assert image(project) == before
    seconds = stage_seconds(result.output)
    print(f"initramfs stage: {project.first_seconds:.1f} s built, {seconds:.1f} s with less added")
    assert seconds < min(10, project.first_seconds / 2)


def test_adding_busybox_rebuilds_the_initramfs_with_busybox_in_it(project):
    before = image(project)
    assert "usr/bin/busybox" not in members(project.entry("initramfs", NAME) / "initramfs.img")
    project.target(NAME, target(", less, busybox"))
    project.doit(f"initramfs:{NAME}")
    assert REUSED not in log(project)
    assert image(project) != before
    assert "usr/bin/busybox" in members(project.entry("initramfs", NAME) / "initramfs.img")
