"""What an initramfs is made of, as paths of the configured tree: the
dependencies the initramfs stage records after each mkinitramfs run, and
the digest of their current state that lets a later build reuse the result
(early cutoff: adding `less` changes the configured tree, not one of these).

The record of one run (`deps.json` beside the memoised outputs):
- `files`: every file and link mkinitramfs put into the initramfs, by its
  path in the tree (read from its kept work directory, `mkinitramfs -k`),
  plus the kernel image and the tools whose output is in the bytes without
  being copied (mkinitramfs, cpio, ldconfig, ldd, the compressor);
- `whole`: what mkinitramfs and the hooks read as a whole (initramfs-tools'
  hooks, scripts and configuration, `ld.so.conf*`, the `fstab` and
  `crypttab` the fsck and resume hooks read): every entry's content;
- `listed`: directories copied by glob (modprobe.d, udev rules, .link files,
  klibc, firmware, the kernel's modules): the names, since a new file there
  is a new input and the content of a copied one is in `files`;
- `packages`: the packages owning a hook, script or configuration file of
  initramfs-tools, at their installed version (a hook may read data of its
  own package that it does not copy, such as a microcode bundle); the files
  those packages install under /etc are in `whole` (a hook's settings).

A file's state is its type, mode, owner, content and its mtime clamped to
SOURCE_DATE_EPOCH (cpio stores mtimes, and mkinitramfs clamps only the ones
after the epoch).  Paths are resolved in the tree (links followed inside
it, never onto the host).
"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from .cache import Cache, digest_file, digest_json
from .intree import Root

WHOLE = ("usr/share/initramfs-tools", "etc/initramfs-tools", "etc/ld.so.conf", "etc/ld.so.conf.d",
         "etc/fstab", "etc/fstab.d", "etc/crypttab")
LISTED = ("etc/modprobe.d", "usr/lib/modprobe.d", "etc/udev/rules.d", "usr/lib/udev/rules.d",
          "usr/lib/systemd/network", "etc/systemd/network", "usr/lib/klibc/bin", "usr/lib/firmware",
          "usr/lib/modules/{kver}")
TOOLS = ("usr/sbin/mkinitramfs", "usr/bin/cpio", "usr/sbin/ldconfig", "usr/bin/ldd")
# Made by mkinitramfs from other inputs (ldconfig -r over the copied libraries,
# a link to /proc/mounts):
# the tree's own copy is not what goes in.
GENERATED = frozenset({"etc/ld.so.cache", "etc/mtab"})
# Whose owners are the `packages` of a record.
CONFIG_PREFIXES = ("/usr/share/initramfs-tools/", "/etc/initramfs-tools/")
MERGED = re.compile(r"usr/((?:s?bin|lib[^/]*)/.+)")
# A memo whose static inputs match is checked by digesting its record over
# the tree (~0.1 s each); beyond this many, the stage builds.
MAX_CANDIDATES = 8


def candidates(rel: str) -> list[str]:
    """Tree paths a file of the initramfs may come from: the same path, the
    unmerged one (the initramfs is always usr-merged), and for a module the
    compressed file mkinitramfs decompressed."""
    out = [rel]
    m = MERGED.fullmatch(rel)
    if m:
        out.append(m.group(1))
    if rel.endswith(".ko"):
        out += [p + ext for p in list(out) for ext in (".xz", ".zst", ".gz")]
    return out


def entry_state(path: str, sde: int) -> list | None:
    """One entry as cpio stores it (None: missing); path holds no links but
    maybe the last component."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    owner = [stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, min(int(st.st_mtime), sde)]
    if stat.S_ISREG(st.st_mode):
        return ["file", *owner, digest_file(path)]
    if stat.S_ISLNK(st.st_mode):
        return ["link", *owner, os.readlink(path)]
    if stat.S_ISDIR(st.st_mode):
        return ["dir", *owner]
    return ["special", *owner, st.st_mode, st.st_rdev]


class TreeState:
    """States of paths of one tree, resolved inside it."""

    def __init__(self, tree: Path, sde: int):
        self.root, self.sde = Root(tree), sde
        self._dirs: dict[str, str] = {}

    def close(self) -> None:
        self.root.close()

    def real(self, rel: str) -> str:
        """rel's host path: its directories resolved in the tree, the last
        component as it is (a link stays a link)."""
        head, _, name = rel.strip("/").rpartition("/")
        if head not in self._dirs:
            self._dirs[head] = os.path.join(self.root.path, self.root.resolve(head)) if head else self.root.path
        return os.path.join(self._dirs[head], name)

    def file(self, rel: str) -> list | None:
        """The first of rel's candidates that exists, with its state."""
        for cand in candidates(rel):
            state = entry_state(self.real(cand), self.sde)
            if state is not None:
                return [cand, state]
        return None

    def _walk(self, rel: str, listing: bool):
        tops = [self.real(c) for c in candidates(rel)]
        top = next((t for t in tops if os.path.lexists(t)), tops[0])
        if not os.path.isdir(top) or os.path.islink(top):
            return entry_state(top, self.sde) if not listing else None
        out, strip = {}, len(top.rstrip("/")) + 1
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                path = f"{dirpath}/{name}"
                key = path[strip:]
                if listing:
                    out[key] = "dir" if name in dirnames and not os.path.islink(path) else "entry"
                else:
                    out[key] = entry_state(path, self.sde)
        return out

    def whole(self, rel: str):
        """Every entry under rel with its content (or rel's own state)."""
        return self._walk(rel, listing=False)

    def listing(self, rel: str):
        """The names under rel (None: not a directory)."""
        return self._walk(rel, listing=True)


def package_versions(tree: Path, names, unpacked: bool = False) -> dict[str, str | None]:
    """Installed version of each package (None: not installed); unpacked:
    an unpacked package counts as installed (a tree not yet configured)."""
    states = (" installed", " unpacked") if unpacked else (" installed",)
    wanted, found = set(names), {}
    try:
        text = (Path(tree) / "var/lib/dpkg/status").read_text(errors="replace")
    except OSError:
        text = ""
    for stanza in text.split("\n\n"):
        fields = dict(re.findall(r"^([\w-]+): ?(.*)$", stanza, re.M))
        if fields.get("Package") in wanted and fields.get("Status", "").endswith(states):
            found[fields["Package"]] = fields.get("Version")
    return {n: found.get(n) for n in sorted(wanted)}


def config_owners(tree: Path) -> tuple[list[str], list[str]]:
    """The packages that install a hook, script or configuration file of
    initramfs-tools (from the dpkg file lists), and the files those packages
    install under /etc: a hook's own settings (cryptsetup's conf-hook), which
    a pre-configure hook may have edited."""
    info = Path(tree) / "var/lib/dpkg/info"
    owners, etc = set(), set()
    try:
        lists = sorted(info.glob("*.list"))
    except OSError:
        return [], []
    for path in lists:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        if any(line.startswith(CONFIG_PREFIXES) for line in lines):
            owners.add(path.name[:-len(".list")].split(":")[0])
            etc.update(line.lstrip("/") for line in lines if line.startswith("/etc/"))
    # Files and links only: a directory such as /etc/udev is every package's.
    state = TreeState(tree, 0)
    try:
        files = [rel for rel in etc if (entry_state(state.real(rel), 0) or ["gone"])[0] not in ("dir", "gone")]
    finally:
        state.close()
    return sorted(owners), sorted(files)


def record(destdir: Path, tree: Path, kver: str, tools: list[str], static: str) -> dict:
    """The dependency record of one mkinitramfs run, from its kept work
    directory (what went in) and the tree it ran over."""
    copied = []
    for dirpath, dirnames, filenames in os.walk(destdir):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = os.path.relpath(os.path.join(dirpath, name), destdir)
            if rel not in GENERATED:
                copied.append(rel)
    owners, owned_etc = config_owners(tree)
    return {"static": static, "kver": kver,
            "files": sorted({*copied, f"boot/vmlinuz-{kver}", *TOOLS, *tools}),
            "whole": sorted({*WHOLE, *owned_etc}), "listed": [d.format(kver=kver) for d in LISTED],
            "packages": owners}


def digest(deps: dict, tree: Path, sde: int, unpacked: bool = False) -> str:
    """The digest of what the record names, in the tree as it is now
    (unpacked: see package_versions)."""
    state = TreeState(tree, sde)
    try:
        return digest_json({
            "static": deps["static"], "kver": deps["kver"],
            "files": {rel: state.file(rel) for rel in deps["files"]},
            "whole": {rel: state.whole(rel) for rel in deps["whole"]},
            "listed": {rel: state.listing(rel) for rel in deps["listed"]},
            "packages": package_versions(tree, deps["packages"], unpacked),
        })
    finally:
        state.close()


def records(cache: Cache, memo: str, static: str):
    """(entry, record) of each memo with this static part, newest first;
    entries without a readable record are skipped."""
    try:
        entries = sorted(((e.stat().st_mtime, e) for e in (cache.root / memo).iterdir()), reverse=True)
    except OSError:
        return
    for _, entry in entries:
        try:
            deps = json.loads((entry / "deps.json").read_text())
        except (OSError, ValueError):
            continue
        if deps.get("static") == static:
            yield entry, deps


def find(cache: Cache, memo: str, static: str, tree: Path, sde: int) -> tuple[Path, str] | None:
    """A memoised initramfs whose recorded inputs are all unchanged in the
    tree: (its entry, its key), newest first; None if there is none."""
    tried = 0
    for entry, deps in records(cache, memo, static):
        if digest(deps, tree, sde) == entry.name and cache.lookup(memo, entry.name) is not None:
            return entry, entry.name
        tried += 1
        if tried >= MAX_CANDIDATES:
            break
    return None
