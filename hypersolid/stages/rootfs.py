"""rootfs: the merged overlay tree — generic rootfs/, then each extended
target's rootfs/, then the target's own; a later layer's file wins."""
from __future__ import annotations

import os
from pathlib import Path

from ..run import Log, run
from . import Stage, Unit, register

# Packages add system users while they are configured; an overlaid copy of
# these files would silently drop them.  Users come from target.yaml.
FORBIDDEN = ("etc/passwd", "etc/group", "etc/shadow", "etc/gshadow")


def copy_overlay(src: Path, dest: Path, log: Log) -> None:
    """Lay tree src over dest.  As root, copies are owned by root whoever owns
    the checkout; replaced files are unlinked first, never written through."""
    run(["cp", "-rT", "--no-dereference", "--remove-destination", "--preserve=mode,timestamps,links",
         src, dest], log)


def overlay_entries(unit: Unit) -> tuple[list[Path], dict[str, Path], dict[str, int], dict[str, str]]:
    """Existing layer dirs, then regular files, dir modes and symlinks by
    'layer-relative path' keys (layer dir relative to the project)."""
    layers = [d for d in unit.project.overlay_dirs(unit.target) if d.is_dir()]
    files: dict[str, Path] = {}
    dirs: dict[str, int] = {}
    links: dict[str, str] = {}
    for layer in layers:
        base = os.path.relpath(layer, unit.project.root)
        for dirpath, dirnames, filenames in os.walk(layer):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                path = Path(dirpath, name)
                key = f"{base}/{path.relative_to(layer)}"
                if path.is_symlink():
                    links[key] = os.readlink(path)
                elif path.is_dir():
                    dirs[key] = path.stat().st_mode & 0o7777
                elif path.is_file():
                    files[key] = path
    return layers, files, dirs, links


@register
class Rootfs(Stage):
    name = "rootfs"
    per_arch = False
    doc = "merged rootfs overlay (generic + extended targets + target)"

    def computed(self, unit: Unit) -> dict:
        layers, _, dirs, links = overlay_entries(unit)
        return {"layers": [os.path.relpath(d, unit.project.root) for d in layers],
                "dirs": dirs, "links": links}

    def input_files(self, unit: Unit) -> dict[str, Path]:
        return overlay_entries(unit)[1]

    def build(self, unit: Unit, out: Path, log: Log) -> None:
        layers = overlay_entries(unit)[0]
        for layer in layers:
            for name in FORBIDDEN:
                if os.path.lexists(layer / name):
                    raise log.fail(f"{os.path.relpath(layer / name, unit.project.root)}: overlaying {name} is not "
                                   "allowed: packages add system users during configure; declare users in "
                                   "target.yaml `users:` instead")
        tree = out / "tree"
        tree.mkdir()
        for layer in layers:
            copy_overlay(layer, tree, log)
