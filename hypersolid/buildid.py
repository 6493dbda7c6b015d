"""The build id: which build a running system, an image or a dist/ is.

Given as HYPERSOLID_UUID, or else derived from the planned keys of the
target's squashfs and initramfs stages on every architecture, so an
unchanged build keeps its id and any change to what boots gets a new one
(stages.build_id computes it).

A per-build id must not cost a new image: the cached squashfs only holds
links (/etc/hypersolid_build, the login banner) to /.hypersolid/, and
bootfiles appends that small directory to its copy of the image with
mksquashfs' append mode (milliseconds; the cache entry is untouched).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .cache import remove_tree
from .run import BuildError, Log, run

ENV = "HYPERSOLID_UUID"
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}")
STAMP_DIR = ".hypersolid"


def given() -> str | None:
    """HYPERSOLID_UUID, checked: it ends up in file names' company and banners."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    if not ID_PATTERN.fullmatch(value):
        raise BuildError("build id", f"{ENV}={value!r} is not usable: letters, digits and . _ : + - "
                         "only, at most 128 characters (a UUID is fine)")
    return value


def stamp_files(build: str, target: str, arch: str) -> dict[str, str]:
    """The contents of /.hypersolid/ in a dist image."""
    line = f"hypersolid {target} ({arch}) build {build}"
    return {"build": build + "\n", "issue": line + "\n\n", "motd": line + "\n"}


def stamp_image(image: Path, build: str, target: str, arch: str, log: Log, env: dict[str, str]) -> None:
    """Append /.hypersolid/ to a squashfs image (a copy, never a cache entry).
    env carries SOURCE_DATE_EPOCH: the superblock's time and the stamp files'
    mtimes are set from it, not from the clock."""
    src = image.parent / f".stamp-{arch}-{os.getpid()}"
    remove_tree(src)
    (src / STAMP_DIR).mkdir(parents=True)
    try:
        for name, text in stamp_files(build, target, arch).items():
            (src / STAMP_DIR / name).write_text(text)
            (src / STAMP_DIR / name).chmod(0o644)
        # -root-mode: appending resets the root directory's mode otherwise;
        # -no-recovery: no recovery file in $HOME.
        run(["mksquashfs", src / STAMP_DIR, image, "-keep-as-directory", "-root-mode", "755",
             "-no-recovery", "-no-progress", "-quiet"], log, env=env)
    finally:
        remove_tree(src)
