"""One build at a time per checkout.

doit keeps no lock on its database and writes it when a run ends, so two
runs in one checkout would each overwrite the other's records.  A run that
writes it takes an flock on build/lock first (released by the kernel when
the process ends, however it ends); a second run waits, saying for whom,
or with HYPERSOLID_NO_WAIT=1 (`hypersolid build --no-wait`) fails at once.
Checkouts sharing one HYPERSOLID_CACHE need no lock: entries are published
atomically.
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
