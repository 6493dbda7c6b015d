"""One build at a time per checkout.

doit keeps no lock on its database and writes it when a run ends, so two
runs in one checkout would each overwrite the other's records.  A run that
writes it takes an flock on build/lock first (released by the kernel when
the process ends, however it ends); a second run waits, saying for whom,
or with HYPERSOLID_NO_WAIT=1 (`hypersolid build --no-wait`) fails at once.
Checkouts sharing one HYPERSOLID_CACHE need no lock against each other
(entries are published atomically), only against removing entries: see
share_cache below.
"""
from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

NO_WAIT = "HYPERSOLID_NO_WAIT"
# doit commands that only read the database.
READ_ONLY = {"list", "info", "help", "dumpdb", "tabcompletion"}
# doit options that take a value (so the value is not the command).
WITH_VALUE = {"-f", "--file", "-d", "--dir", "--db-file", "--backend", "--check_file_uptodate",
              "-n", "--process", "-P", "--parallel-type", "--reporter", "-o", "--output-file",
              "-v", "--verbosity", "--seek-file", "--codec-cls", "-k", "--pdb"}

_held: int | None = None


class Busy(Exception):
    """Another build holds the checkout and we were told not to wait."""


def writes_database(args: list[str]) -> bool:
    """Whether a doit command line (without the program) may write the database."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            return arg not in READ_ONLY
    return True  # plain `doit`: run the default tasks


def acquire(build_dir: Path) -> None:
    """Hold build_dir/lock for the rest of this process (re-entrant)."""
    global _held
    if _held is not None:
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(build_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        if os.environ.get(NO_WAIT, "") not in ("", "0"):
            os.close(fd)
            raise Busy(f"another build runs in this checkout (pid {holder}); not waiting ({NO_WAIT})") from None
        print(f"hypersolid: waiting for the build in this checkout (pid {holder})", file=sys.stderr, flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held = fd


# --- the cache: builds share it, gc owns it ------------------------------------
#
# Entries are published atomically, so builds sharing a cache need no lock
# against each other.  Removing entries is another matter: a running build
# may be about to read (or be reading, as an overlay's lower layer) any entry
# it found.  So every build holds <cache>/.lock shared for its whole run, and
# whatever removes entries (`hypersolid cache gc`, `clean --cache`) takes it
# exclusively: it waits for running builds, and builds started meanwhile wait
# for it (flock: released by the kernel however the holder ends).

CACHE_LOCK = ".lock"
_cache_held: dict[str, int] = {}


def _open_cache_lock(cache_root: Path) -> int:
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    return os.open(Path(cache_root) / CACHE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def holders(path: Path) -> list[int]:
    """The pids /proc/locks names for flocks on path (those that took them)."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:
        f = line.split()
        if "->" in f:  # a waiter, not a holder
            continue
        if len(f) >= 6 and f[1] == "FLOCK" and f[5] == want:
            pids.append(int(f[4]))
    return sorted(set(pids) - {os.getpid()})


def share_cache(cache_root: Path) -> None:
    """Hold the cache shared for the rest of this process (a build); waits,
    saying so, while a gc has it."""
    key = str(cache_root)
    if key in _cache_held:
        return
    fd = _open_cache_lock(cache_root)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"hypersolid: waiting for the cache gc of {cache_root} (pid "
              f"{', '.join(map(str, holders(Path(cache_root) / CACHE_LOCK))) or 'unknown'})",
              file=sys.stderr, flush=True)
        fcntl.flock(fd, fcntl.LOCK_SH)
    _cache_held[key] = fd


class own_cache:
    """`with own_cache(root):` no build uses the cache meanwhile (see above).
    wait=False: raise Busy at once if builds hold it."""

    def __init__(self, cache_root: Path, wait: bool = True):
        self.root, self.wait, self.fd = Path(cache_root), wait, None

    def __enter__(self) -> "own_cache":
        # This process's own shared hold (a build before, in one process) is converted, not deadlocked on.
        shared = _cache_held.get(str(self.root))
        fd = shared if shared is not None else _open_cache_lock(self.root)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pids = ", ".join(map(str, holders(self.root / CACHE_LOCK))) or "unknown"
            if not self.wait:
                if shared is None:
                    os.close(fd)
                raise Busy(f"builds use the cache {self.root} (pid {pids}); not waiting") from None
            print(f"hypersolid: waiting for the builds using the cache {self.root} (pid {pids})",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd == _cache_held.get(str(self.root)):
            fcntl.flock(self.fd, fcntl.LOCK_SH)
        else:
            os.close(self.fd)
