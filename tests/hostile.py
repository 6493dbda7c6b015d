"""Harness for the hostile-input tests: a build run the way a careless or
malicious user would run it, and the checks every such case makes.

A case asserts the exit status and the one line that says what is wrong
(`Outcome.line`: exactly one line holds the fragments, and no traceback
anywhere), and runs inside `untouched_host`, which fails the test if the
run left a mount, left a process that works on the test's directories, or
changed the sentinel directory: a stand-in for the build host's own files,
outside every tree, that hostile symlinks point at.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from conftest import mounts
from hypersolid.cache import describe_tree

SENTINEL_FILES = {
    "hostname": "the host's own hostname\n",
    "shadow": "host-user:$6$host-secret:19000:0:99999:7:::\n",
    "home/keep": "a file in a host directory\n",
}


@dataclass
class Outcome:
    status: int
    output: str  # stdout and stderr, in order

    def line(self, *fragments: str) -> str:
        """The single line that holds every fragment; no traceback anywhere."""
        assert "Traceback" not in self.output, self.output
        hits = [ln for ln in self.output.splitlines() if all(f in ln for f in fragments)]
        assert len(hits) == 1, f"want one line with {fragments}, got {hits}:\n{self.output}"
        return hits[0]


class Host:
    """What a run must leave as it found it."""

    def __init__(self, tmp: Path, watched: list[Path]):
        self.sentinel = tmp / "host-sentinel"
        for rel, text in SENTINEL_FILES.items():
            path = self.sentinel / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        os.chmod(self.sentinel / "home", 0o751)
        self.watched = [str(Path(p).resolve()) for p in watched] + [str(self.sentinel)]
        self._mounts = mounts()
        self._sentinel = self.snapshot()

    def snapshot(self) -> dict:
        st = os.lstat(self.sentinel)
        return {".": [st.st_mode, st.st_uid, st.st_gid], **describe_tree(self.sentinel)}

    def processes(self) -> list[str]:
        """Processes (not this one) whose command line, cwd or root names a
        watched directory: a build's leftovers, whoever their parent is now."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if int(pid) == os.getpid():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                places = [cmd, os.readlink(f"/proc/{pid}/cwd"), os.readlink(f"/proc/{pid}/root")]
            except OSError:
                continue  # gone meanwhile, or a kernel thread
            if any(w in p for p in places for w in self.watched):
                found.append(f"{pid}: {cmd.strip()}")
        return found

    def check(self, settle: float = 10.0) -> None:
        deadline = time.monotonic() + settle
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.2)  # a killed namespace takes a moment to be reaped
        assert self.processes() == [], "processes left behind"
        assert mounts() == self._mounts, "mounts left behind"
        assert self.snapshot() == self._sentinel, "the host's files were changed"


@contextmanager
def untouched_host(tmp: Path, *watched: Path) -> Iterator[Host]:
    """Yield a Host (its `sentinel` is the directory to aim links at); on
    leaving the block, check that nothing was left or changed."""
    host = Host(tmp, list(watched))
    yield host
    host.check()


def outcome(result) -> Outcome:
    """An Outcome from conftest's DoitResult or test_cli's Result."""
    if hasattr(result, "returncode"):
        return Outcome(result.returncode, result.output)
    return Outcome(result.status, result.out + result.err)
