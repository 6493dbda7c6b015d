"""The image's apt sources: exactly the target's image_sources, nothing of the build.

multistrap leaves its own sources.list.d/multistrap-*.list (the build's
mirror and section sources) and copies the keyring package's keyrings into
trusted.gpg.d; the build's proxy settings live in apt.conf.d.  The squashfs
stage removes all of that and writes one deb822 file, so what the booted
system's apt uses is a setting, separate from where the build downloads.
"""
from __future__ import annotations

from . import intree
from .config import AptSource

SOURCES_FILE = "etc/apt/sources.list.d/hypersolid.sources"
# Build-time apt state in /etc/apt, removed whatever the sections said.
BUILD_SOURCES = ("etc/apt/sources.list", "etc/apt/sources.list.d/*", "etc/apt/keyrings/hypersolid-build.gpg")


def deb822(sources: tuple[AptSource, ...], has_file=lambda path: True) -> str:
    """The .sources text; `has_file(path)` says whether the image holds a
    keyring (the default entries name the Debian keyring only if it does)."""
    if not sources:
        return ""
    blocks = []
    for s in sources:
        lines = ["Types: deb", f"URIs: {' '.join(s.uris)}", f"Suites: {' '.join(s.suites)}"]
        if s.components:
            lines.append(f"Components: {' '.join(s.components)}")
        if s.signed_by and (not s.signed_by_if_present or has_file(s.signed_by)):
            lines.append(f"Signed-By: {s.signed_by}")
        blocks.append("\n".join(lines) + "\n")
    return "# The image's apt sources: image_sources in target.yaml (written by hypersolid)\n" + "\n".join(blocks)


class SourcesError(Exception):
    pass


def install(root: intree.Root, sources: tuple[AptSource, ...]) -> list[str]:
    """Replace the tree's apt sources with `sources` (none: no file at all);
    returns what was removed."""
    missing = [s.signed_by for s in sources
               if s.signed_by and not s.signed_by_if_present and not root.exists(s.signed_by.lstrip("/"))]
    if missing:
        raise SourcesError(f"image_sources: signed_by {missing[0]} is not in the image "
                           "(install the keyring package or put the keyring in the overlay)")
    gone = [g for pattern in BUILD_SOURCES for g in root.remove_matching(pattern)]
    gone += _multistrap_keyrings(root)
    root.makedirs("etc/apt/sources.list.d")
    text = deb822(sources, lambda path: root.exists(path.lstrip("/")))
    if text:
        root.write_text(SOURCES_FILE, text)
    return gone


def _multistrap_keyrings(root: intree.Root) -> list[str]:
    """trusted.gpg.d/*.gpg that are multistrap's copies of usr/share/keyrings
    files (no package owns them; the keyring package's own files stay)."""
    gone = []
    if not root.is_dir("etc/apt/trusted.gpg.d") or not root.is_dir("usr/share/keyrings"):
        return gone
    for name in root.listdir("etc/apt/trusted.gpg.d"):
        copy, original = f"etc/apt/trusted.gpg.d/{name}", f"usr/share/keyrings/{name}"
        if (name.endswith(".gpg") and not root.is_link(copy) and root.exists(original)
                and not root.is_link(original) and root.read_bytes(copy) == root.read_bytes(original)):
            root.unlink(copy)
            gone.append(copy)
    return gone
