"""Two clean builds of one target give the same bytes (issue #13).

The builds differ in everything the issue names: cache directory, checkout
path, start time (the second starts when the first has ended, minutes
later), TZ, the caller's locale and its umask.  Both are cold: each has a
fresh cache of its own, so nothing is shared but the Debian archive.
"""
from __future__ import annotations

import filecmp
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TestProject, checkout_copy, needs_root_and_tools, tiny_target

pytestmark = pytest.mark.integration

# A small target with a kernel: the kernel, initramfs-tools and what they pull in.
TARGET = tiny_target(packages="linux-image-amd64, initramfs-tools", extra="""\
    image: both
    initramfs: {compression: gzip}
    """)
OUTPUTS = ("kernel-amd64.img", "initramfs-amd64.img", "system-amd64.img", "system-amd64.cpio")
# One hook of each kind records the SOURCE_DATE_EPOCH it was given.
HOOKS = {
    "post-bootstrap": 'echo "$SOURCE_DATE_EPOCH" > "$HYPERSOLID_TREE/etc/hs-sde-post-bootstrap"',
    "pre-configure": 'echo "$SOURCE_DATE_EPOCH" > /etc/hs-sde-pre-configure',
    "post-configure": 'echo "$SOURCE_DATE_EPOCH" > /etc/hs-sde-post-configure',
    "post-build": 'echo "$SOURCE_DATE_EPOCH" > "$HYPERSOLID_DIST/hs-sde-post-build"',
}
CALLERS = [  # (TZ, LANG, umask) of each build's caller
    ("UTC", "C.UTF-8", 0o022),
    ("America/Los_Angeles", "de_DE.UTF-8", 0o027),
]


def build(root: Path, tz: str, lang: str, umask: int) -> tuple[TestProject, float]:
    project = TestProject(checkout_copy(root / "checkout"), root / "cache")
    project.target("repro", TARGET)
    for kind, line in HOOKS.items():
        project.write(f"targets/repro/hooks/{kind}.d/10-sde", f"#!/bin/sh\nset -eu\n{line}\n", 0o755)
    env = {"TZ": tz, "LANG": lang, "LC_ALL": lang, "HYPERSOLID_UUID": ""}
    old = os.umask(umask)  # the doit process inherits it
    start = time.monotonic()
    try:
        project.doit("bootfiles:repro", env=env, timeout=3600)
    finally:
        os.umask(old)
    return project, time.monotonic() - start


def test_two_cold_builds_in_different_places_and_times_give_identical_outputs(tmp_path):
    needs_root_and_tools()
    first, first_seconds = build(tmp_path / "one", *CALLERS[0])
    second, second_seconds = build(tmp_path / "elsewhere/two", *CALLERS[1])
    print(f"cold builds: {first_seconds:.0f} s and {second_seconds:.0f} s")
    a, b = first.root / "dist/repro", second.root / "dist/repro"
    # The precondition: the same package versions (a mirror update between the builds breaks it).
    assert (a / "packages-amd64.tsv").read_text() == (b / "packages-amd64.tsv").read_text(), \
        "the mirror served other package versions to the second build: not comparable, run again"
    differ = [n for n in OUTPUTS if not filecmp.cmp(a / n, b / n, shallow=False)]
    assert differ == [], f"outputs differ between the two builds: {', '.join(differ)} ({a} vs {b})"
    # Same inputs, same build id: it is derived from the keys, not from paths or times.
    assert (a / "build-amd64.json").read_text() == (b / "build-amd64.json").read_text()
    epochs = {int((p.entry("bootstrap", "repro") / "source-date-epoch").read_text()) for p in (first, second)}
    assert len(epochs) == 1 and 1_600_000_000 < min(epochs) < time.time()
    # Every hook got that epoch.
    image = a / "system-amd64.img"
    seen = {kind: subprocess.run(["unsquashfs", "-cat", image, f"etc/hs-sde-{kind}"], check=True,
                                 stdout=subprocess.PIPE, text=True).stdout for kind in list(HOOKS)[:3]}
    seen["post-build"] = (a / "hs-sde-post-build").read_text()
    assert seen == {kind: f"{min(epochs)}\n" for kind in HOOKS}
