"""The initramfs as a function of what it contains (issue #15): a package
the initramfs does not read leaves it alone, one that adds a hook rebuilds
it.  A small kernel target, built three times in one project: as is, with
`less`, then with `busybox` (whose hook BUSYBOX=auto picks up).  The cold
build makes its initramfs from the bootstrap tree beside configure (the
early initramfs): the same bytes as one made after configure."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import TestProject, checkout_copy, needs_root_and_tools, tiny_target

pytestmark = pytest.mark.integration

NAME = "cutoff"
EXTRA = "initramfs: {compression: gzip, modules: list}\n"
REUSED = "# what the initramfs is made of is unchanged: reusing "
EARLY = "# the early initramfs is made; the initramfs stage checks it against this tree"
MEMO = "initramfs-content"
# amd64 like this host: the early initramfs is made for emulated builds unless asked for.
EARLY_ON = {"HYPERSOLID_EARLY_INITRAMFS": "1"}


def target(packages: str) -> str:
    return tiny_target(packages=f"linux-image-amd64, initramfs-tools{packages}", extra=EXTRA)


def stage_seconds(output: str) -> float:
    return float(re.search(rf"^  initramfs:{NAME}\s+([\d.]+)s", output, re.M).group(1))


def members(image) -> set[str]:
    listing = subprocess.run(f"gzip -dc '{image}' | cpio -t --quiet", shell=True, check=True,
                             stdout=subprocess.PIPE, text=True).stdout
    return set(listing.split())


def configure_log(p: TestProject) -> str:
    return (p.root / f"build/{NAME}/amd64/logs/configure.log").read_text()


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_cache):
    needs_root_and_tools()
    p = TestProject(checkout_copy(tmp_path_factory.mktemp("cutoff")), shared_cache)
    p.target(NAME, target(""))
    # A memo of an earlier run with the same settings and kernel would make
    # configure skip the early initramfs ("likely fits"): this run starts without.
    shutil.rmtree(shared_cache / MEMO, ignore_errors=True)
    p.doit(f"initramfs:{NAME}", env=EARLY_ON)
    if EARLY not in configure_log(p):  # a cache reused from an earlier run (HYPERSOLID_TEST_CACHE)
        for stage in ("configure", "initramfs"):
            shutil.rmtree(p.entry(stage, NAME))
        shutil.rmtree(shared_cache / MEMO, ignore_errors=True)
        p.doit(f"initramfs:{NAME}", env=EARLY_ON)
    return p


def log(p: TestProject) -> str:
    return (p.root / f"build/{NAME}/amd64/logs/initramfs.log").read_text()


def image(p: TestProject) -> bytes:
    return (p.entry("initramfs", NAME) / "initramfs.img").read_bytes()


def test_cold_build_makes_the_initramfs_beside_configure_with_the_bytes_made_after_it(project):
    assert EARLY in configure_log(project)
    assert REUSED in log(project)  # the early memo passed the check over the configured tree
    early = image(project)
    # The same stage again without any memo: mkinitramfs over the configured tree.
    shutil.rmtree(project.cache / MEMO)
    shutil.rmtree(project.entry("initramfs", NAME))
    result = project.doit(f"initramfs:{NAME}", env=EARLY_ON)
    assert f"initramfs:{NAME}" in result.executed and REUSED not in log(project)
    assert image(project) == early


def test_adding_less_reuses_the_initramfs_byte_for_byte_in_seconds(project):
    before, configured = image(project), project.key("configure", NAME)
    project.target(NAME, target(", less"))
    result = project.doit(f"initramfs:{NAME}", env=EARLY_ON)
    assert f"initramfs:{NAME}" in result.executed and project.key("configure", NAME) != configured
    assert REUSED in log(project)
    assert "an earlier one of the same kernel and hook packages likely fits" in configure_log(project)  # no early one
    assert image(project) == before
    seconds = stage_seconds(result.output)
    print(f"initramfs stage: {seconds:.1f} s with less added")
    assert seconds < 10


def test_adding_busybox_rebuilds_the_initramfs_with_busybox_in_it(project):
    before = image(project)
    assert "usr/bin/busybox" not in members(project.entry("initramfs", NAME) / "initramfs.img")
    project.target(NAME, target(", less, busybox"))
    project.doit(f"initramfs:{NAME}", env=EARLY_ON)
    # mkinitramfs ran again: beside configure (busybox's hook is a new input), or after it
    assert EARLY in configure_log(project) or REUSED not in log(project)
    assert image(project) != before
    assert "usr/bin/busybox" in members(project.entry("initramfs", NAME) / "initramfs.img")
