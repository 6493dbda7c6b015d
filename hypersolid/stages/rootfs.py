"""rootfs: the merged overlay tree — generic rootfs/, then each extended
target's rootfs/, then the target's own; a later layer's file wins."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .. import intree
from ..run import Log
from . import Stage, Unit, register

# Packages add system users while they are configured; an overlaid copy of
# these files would silently drop them.  Users come from target.yaml.
FORBIDDEN = ("etc/passwd", "etc/group", "etc/shadow", "etc/gshadow")


# Top-level directories that bookworm's merged /usr turns into links into
# usr/ (usrmerge's list).  The rootfs merge files their entries under usr/.
MERGED_USR = ("bin", "sbin", "lib", "lib32", "lib64", "libx32", "libo32")
# Build scripts and hooks go to /.hypersolid in the tree; no overlay may hold it.
RESERVED = ".hypersolid"
# Beside a rootfs entry's tree/: which layer file each merged path came from.
ORIGINS = "origins.json"


class OverlayError(Exception):
    pass


def merged_usr_path(rel: str) -> str:
    """Where rel lands in a merged-usr tree: bin/x -> usr/bin/x."""
    return f"usr/{rel}" if rel.partition("/")[0] in MERGED_USR else rel


def overlay_walk(src: Path, merged_usr: bool = False):
    """(path in the layer, path in the tree, lstat) of every entry below
    src, parents before children; the tree path is merged-usr mapped when
    asked (only real directories are mapped: a top-level link stays)."""
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            rel = path.relative_to(src).as_posix()
            top = rel.partition("/")[0]
            if merged_usr and top in MERGED_USR and (src / top).is_dir() and not (src / top).is_symlink():
                rel = merged_usr_path(rel)
            yield path, rel, st


def _origins(src: Path):
    """The layer path each tree path came from, for error messages."""
    try:
        return json.loads((Path(src).parent / ORIGINS).read_text()).get
    except (OSError, ValueError):
        return lambda rel, default: default


def copy_overlay(src: Path, dest: Path, log: Log, merged_usr: bool = False, shown=None) -> dict[str, str]:
    """Lay tree src over tree dest.  Each entry's parent is resolved inside
    dest (intree: the tree's own links, such as lib -> usr/lib or var/run ->
    /run, are followed within the tree, never onto the host).  The overlay's
    symlinks are made as symlinks; files replace files and links (unlinked,
    never written through), keep their mode and mtime and are owned by root.
    A file or link where dest has a directory, or a directory where dest has
    a file, is one error line naming the overlay path (`shown(layer path,
    tree path)`; by default the layer path the rootfs stage recorded).
    Returns {tree path: layer path} of what was copied."""
    if shown is None:
        origin = _origins(src)
        shown = lambda path, rel: origin(rel, f"rootfs overlay {rel}")  # noqa: E731
    copied: dict[str, str] = {}
    dir_times: list[tuple[str, tuple[int, int]]] = []
    with intree.Root(dest) as root:
        for path, rel, st in overlay_walk(Path(src), merged_usr):
            try:
                there = root.stat(rel)  # the tree's entry, its links followed in the tree
                if stat.S_ISDIR(st.st_mode):
                    if there is not None and not stat.S_ISDIR(there.st_mode):
                        raise OverlayError(f"a directory where the image has a file ({root.resolve(rel)})")
                    where = root.makedirs(rel)
                    root.chmod(where, st.st_mode & 0o7777)
                    dir_times.append((where, (st.st_atime_ns, st.st_mtime_ns)))
                elif there is not None and stat.S_ISDIR(there.st_mode):
                    raise OverlayError(f"a {'symlink' if stat.S_ISLNK(st.st_mode) else 'file'} where the "
                                       f"image has a directory ({root.resolve(rel) or '/'})")
                elif stat.S_ISLNK(st.st_mode):
                    where = root.symlink(os.readlink(path), rel)
                    root.lchown(where, 0, 0)
                    root.utime(where, (st.st_atime_ns, st.st_mtime_ns))
                elif stat.S_ISREG(st.st_mode):
                    root.copy_file(path, rel)
                else:
                    raise OverlayError("not a file, directory or symlink")
            except OverlayError as err:
                raise log.fail(f"{shown(path, rel)}: {err}") from None
            except OSError as err:
                raise log.fail(f"{shown(path, rel)}: cannot copy into the image: "
                               f"{err.strerror or err}") from None
            copied[rel] = str(path)
        for where, times in reversed(dir_times):  # after their contents changed
            root.utime(where, times)
    log.note(f"# copied {len(copied)} overlay entries from {src}")
    return copied


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
    helpers = ("hypersolid.intree",)
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
            if os.path.lexists(layer / RESERVED):
                raise log.fail(f"{os.path.relpath(layer / RESERVED, unit.project.root)}: {RESERVED} is reserved "
                               "for the build's own scripts and hooks; an overlay must not hold it")
        tree = out / "tree"
        tree.mkdir()
        origins: dict[str, str] = {}
        shown = lambda path, rel: os.path.relpath(path, unit.project.root)  # noqa: E731
        for layer in layers:
            copied = copy_overlay(layer, tree, log, merged_usr=True, shown=shown)
            origins.update({rel: shown(path, rel) for rel, path in copied.items()})
        (out / ORIGINS).write_text(json.dumps(origins, indent=0, sort_keys=True) + "\n")
