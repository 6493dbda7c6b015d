"""`hypersolid cache gc`: keep the cache under a size, least recently used first.

What it counts and may remove, each item with its last use:
- stage entries `<cache>/<stage>/<key>/`, the sbom memo `sbom-content/<digest>/`
  included: the mtime of their `.used` stamp (cache.mark_used: every hit,
  every use by a running stage, every publish), else when published;
- the .debs in `<cache>/debs/`: their atime, which the bootstrap (fetch_debs)
  and the deb proxy set when they take one;
- the resolver's apt state `<cache>/apt/<digest>/`: its `.used` stamp
  (resolve.resolve).
What a target's last build in this workspace used (its key files under
build/, the .debs of those bootstrap entries' package locks, the apt state of
the targets' sources) is removed last, and never for --max-age alone: it is
what the next build (or a no-op) needs.  Anything else in the cache (tmp/,
unknown directories) is counted in the size but left alone.

Removal is atomic per entry (renamed into tmp/ first, then deleted), under
the cache's exclusive lock (lock.own_cache), so no running build loses an
entry it found.
"""
from __future__ import annotations

import os
import re
import secrets
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cache import Cache, last_used, remove_tree, sweep_leftovers

DEBS, APT, TMP = "debs", "apt", "tmp"
DIGEST = re.compile(r"[0-9a-f]{32}")
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?", re.I)


class GcError(Exception):
    """Bad arguments (one line)."""


def parse_size(text: str) -> int:
    """'10G' -> bytes; K, M, G, T are powers of 1024 (like du -h), 'B' / 'iB'
    optional, a plain number is bytes."""
    m = SIZE.fullmatch(text.strip())
    if not m:
        raise GcError(f"--max-size {text!r} is not a size: a number with K, M, G or T (500M, 10G, 1.5T) or bytes")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def parse_days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = -1.0
    if not days >= 0 or days == float("inf"):
        raise GcError(f"--max-age {text!r} is not a number of days (like 30 or 0.5)")
    return days


def human(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= UNITS[unit]:
            return f"{n / UNITS[unit]:.1f}{unit}"
    return f"{n}B"


@dataclass
class Item:
    """One removable thing: an entry, a .deb, an apt state directory."""
    kind: str  # the stage (or "sbom-content"), "debs" or "apt"
    path: Path
    size: int  # bytes on disk: its own, plus the hard-linked files scan counted with it
    used: float  # last use, seconds since the epoch
    kept: bool = False  # a target's last build in this workspace used it
    # Its files with more links (a configure entry shares the base memo's):
    # (device, inode) -> (links in this item, links in the cache, bytes).
    shared: dict = field(default_factory=dict)
    own: int | None = None  # bytes only this item holds (None: all of size)
    freed: int = 0  # set by plan: what removing it frees

    def freeing(self, links_left: dict) -> int:
        """The bytes by which removing it shrinks the cache, given the links of
        shared files that earlier removals left (updated): a file shared with
        something that stays frees nothing."""
        freed = self.size if self.own is None else self.own
        for inode, (here, links, size) in self.shared.items():
            left = links_left.get(inode, links) - here
            links_left[inode] = left
            if left <= 0:
                freed += size
        return freed


def disk_usage(path: Path, seen: set, shared: dict | None = None) -> tuple[int, int]:
    """(bytes on disk under path (a file or a tree) with each inode counted
    once in `seen`, of them the bytes of inodes with one link).  Inodes with
    more links go into `shared` as Item.shared has them."""
    total = own = 0
    stack = [str(path)]
    while stack:
        p = stack.pop()
        try:
            st = os.lstat(p)
        except OSError:
            continue
        size = st.st_blocks * 512
        inode = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) and shared is not None:
            here = shared.get(inode, (0, st.st_nlink, size))
            shared[inode] = (here[0] + 1, st.st_nlink, size)
        elif not stat.S_ISDIR(st.st_mode) or inode not in seen:
            own += size
        if inode not in seen:
            seen.add(inode)
            total += size
        if stat.S_ISDIR(st.st_mode):  # lstat: a link to a directory is not followed
            try:
                stack += [os.path.join(p, n) for n in os.listdir(p)]
            except OSError:
                pass
    return total, own


def scan(cache: Cache, kept: set[Path] = frozenset()) -> tuple[list[Item], int]:
    """(the items gc manages, bytes of everything else in the cache).  A
    file hard-linked into several items is counted once: with a kept item
    if one holds it (the bytes the last build needs), else the first."""
    found: list[tuple[str, Path, float]] = []
    others: list[Path] = []
    root = cache.root
    if not root.is_dir():
        return [], 0
    for top in sorted(root.iterdir()):
        name = top.name
        if name == DEBS and top.is_dir():
            for dirpath, _dirs, files in os.walk(top):
                for f in files:
                    path = Path(dirpath) / f
                    if not f.endswith(".deb"):
                        others.append(path)
                        continue
                    try:
                        found.append((DEBS, path, os.lstat(path).st_atime))
                    except OSError:
                        continue
        elif top.is_dir() and not top.is_symlink() and name != TMP and not name.startswith("."):
            for entry in sorted(top.iterdir()):
                if DIGEST.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                    found.append((name, entry, last_used(entry)))
                else:
                    others.append(entry)
        else:
            others.append(top)
    seen: set = set()
    outside: dict = {}
    other = sum(disk_usage(path, seen, outside)[0] for path in others)
    items = []
    for kind, path, used in sorted(found, key=lambda f: f[1] not in kept):  # stable: kept first
        shared: dict = {}
        size, own = disk_usage(path, seen, shared)
        items.append(Item(kind, path, size, used, path in kept, shared, own))
    # A file's links in the cache, not st_nlink: a link outside it (a .deb
    # also in another cache) does not make the cache any bigger.
    links: dict = {inode: here for inode, (here, _, _) in outside.items()}
    for item in items:
        for inode, (here, _, _) in item.shared.items():
            links[inode] = links.get(inode, 0) + here
    for item in items:
        item.shared = {inode: (here, links[inode], size) for inode, (here, _, size) in item.shared.items()}
    return sorted(items, key=lambda i: (str(i.path.parent), str(i.path))), other


def plan(items: list[Item], max_size: int | None, max_age: float | None, now: float) -> list[Item]:
    """What to remove: anything not kept unused for more than max_age days,
    then least recently used first (kept items last) until the rest fits
    max_size.  `items`' total is what must fit (plus nothing else: the caller
    subtracts unmanaged bytes from the bound).  Each doomed item's `freed`
    is what removing it (after the ones before it) frees."""
    total = sum(i.size for i in items)
    doomed, links_left = [], {}
    for item in sorted(items, key=lambda i: (i.kept, i.used, str(i.path))):
        too_old = max_age is not None and not item.kept and now - item.used > max_age * 86400
        if too_old or (max_size is not None and total > max_size):
            item.freed = item.freeing(links_left)
            doomed.append(item)
            total -= item.freed
    return doomed


def remove(cache: Cache, item: Item) -> None:
    """Gone at once (a rename into tmp/, or unlink for a file), deleted after;
    a killed gc leaves a tmp dir that Cache.collect_garbage sweeps (pid)."""
    if item.kind == DEBS:
        item.path.unlink(missing_ok=True)
        return
    cache.tmp.mkdir(parents=True, exist_ok=True)
    doomed = cache.tmp / f"gc-{item.kind}-{item.path.name[:12]}.{os.getpid()}.{secrets.token_hex(3)}"
    try:
        os.rename(item.path, doomed)
    except FileNotFoundError:
        return
    remove_tree(doomed)


def last_build_items(project, cache: Cache) -> set[Path]:
    """What the workspace's last builds used: the entries its key files under
    build/ name (sbom-content.key: the sbom's memo), the .debs in their
    bootstrap entries' package locks, and the apt state of each buildable
    target's sources."""
    from . import lockfile
    from .debproxy import store_path
    kept: set[Path] = set()
    build = project.root / "build"
    for key_file in [*build.glob("*/*.key"), *build.glob("*/*/*.key")]:
        try:
            key = key_file.read_text().strip()
        except OSError:
            continue
        if not DIGEST.fullmatch(key):
            continue
        entry = cache.entry(key_file.stem, key)
        if not entry.is_dir():
            continue
        kept.add(entry)
        if key_file.stem in ("bootstrap", "configure"):  # the base's .debs, and the top's
            try:
                entries = lockfile.read(entry / "packages.lock")
            except (OSError, lockfile.LockError):
                continue
            kept |= {store_path(cache.root / DEBS, e.url) for e in entries if not e.url.startswith("file:")}
    kept |= apt_states(project, cache)
    return kept


def apt_states(project, cache: Cache, targets=None) -> set[Path]:
    """The resolver's apt state directories of targets (default: all buildable)."""
    from . import resolve as apt
    from .stages.resolve import sections_for
    out = set()
    for target in project.buildable() if targets is None else targets:
        for arch in target.architectures:
            try:
                out.add(apt.state_dir(cache.root, sections_for(target, arch), arch, apt.keyring_of(target)))
            except OSError:
                continue
    return out


def gc(project, cache: Cache, max_size: int | None, max_age: float | None, *, dry_run: bool = False,
       wait: bool = True, out=print) -> tuple[int, int]:
    """Collect; print each removal and the sizes. Returns (bytes before, after)."""
    from .lock import own_cache
    if max_size is None and max_age is None:
        raise GcError("give --max-size SIZE and/or --max-age DAYS")
    if not cache.root.is_dir():
        out(f"hypersolid: cache gc: {cache.root} does not exist; nothing to do")
        return 0, 0
    with own_cache(cache.root, wait=wait):
        if not dry_run:
            cache.collect_garbage()
            for dirpath, _dirs, _files in os.walk(cache.root / DEBS):
                sweep_leftovers(Path(dirpath))
        items, other = scan(cache, last_build_items(project, cache))
        before = other + sum(i.size for i in items)
        doomed = plan(items, None if max_size is None else max(0, max_size - other), max_age, time.time())
        now, verb = time.time(), "would remove" if dry_run else "removed"
        for item in doomed:
            if item.kind != DEBS:
                out(f"{verb} {os.path.relpath(item.path, cache.root)}  {human(item.freed)}, last used "
                    f"{(now - item.used) / 86400:.1f} days ago{' (last build)' if item.kept else ''}")
            if not dry_run:
                remove(cache, item)
        for kept in (False, True):  # .debs: one line each for the others and the last builds'
            debs = [i for i in doomed if i.kind == DEBS and i.kept == kept]
            if debs:
                ages = sorted({f"{(now - i.used) / 86400:.1f}" for i in debs}, key=float)
                out(f"{verb} {len(debs)} .debs{' of the last builds' if kept else ''} from {DEBS}/  "
                    f"{human(sum(i.freed for i in debs))}, last used {'-'.join(dict.fromkeys([ages[0], ages[-1]]))} "
                    "days ago")
        after = before - sum(i.freed for i in doomed)
    gone = {id(i) for i in doomed}
    left = [i for i in items if id(i) not in gone]
    out(f"hypersolid: cache gc: {cache.root}: {human(before)} before, {human(after)} after "
        f"({len(doomed)} removed, {len(left)} kept, {sum(i.kept for i in left)} of them the last builds'"
        + (f"; {human(other)} not managed: tmp/ and unknown files" if other else "") + ")"
        + (" (dry run)" if dry_run else ""))
    if max_size is not None and after > max_size:
        out(f"hypersolid: cache gc: still {human(after)} > {human(max_size)}: what is left is not gc's to remove")
    return before, after


# --- `hypersolid cache gc` (hooked into the cache verb by cachecmd.py) -----------

def add_gc_action(actions) -> None:
    text = "remove least recently used entries (and .debs, apt state) until the cache fits SIZE"
    p = actions.add_parser("gc", help=text, description=text + "; what a target's last build in this workspace "
                           "used goes last, and never for --max-age alone (docs/cli.md)")
    p.add_argument("--max-size", metavar="SIZE", help="the bound: 500M, 10G, 1.5T (powers of 1024) or bytes")
    p.add_argument("--max-age", metavar="DAYS", help="also remove what was not used for more than DAYS days")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    p.add_argument("--no-wait", action="store_true",
                   help="fail at once if builds use the cache (default: wait for them to end)")


def run_gc(args, project, cache: Cache) -> int:
    """0 done (1: still above the bound), 2 bad arguments or builds running with --no-wait."""
    from .lock import Busy
    try:
        max_size = None if args.max_size is None else parse_size(args.max_size)
        max_age = None if args.max_age is None else parse_days(args.max_age)
        if project is None:
            raise GcError("gc needs a workspace (-C DIR): its build/ says what the last builds used")
        _, after = gc(project, cache, max_size, max_age, dry_run=args.dry_run, wait=not args.no_wait)
    except (GcError, Busy) as err:
        print(f"hypersolid: cache gc: {err}", file=sys.stderr)
        return 2
    return 1 if max_size is not None and after > max_size and not args.dry_run else 0
