"""The one runner every subprocess goes through.

Output goes to the stage's log file, never to the console, so doit's own
lines stay readable; a failure raises BuildError naming the stage, the exact
command (pasteable) and the log, with the log's tail.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

# A fixed, minimal environment: builds must not depend on the caller's locale
# or leak its variables into the image.
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}


class BuildError(Exception):
    """A stage failed: what, where, and where to read more."""

    def __init__(self, stage: str, message: str, command: Sequence[str] | None = None,
                 log: Path | None = None):
        self.stage, self.message, self.command, self.log = stage, message, command, log
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [f"{self.stage}: {self.message}"]
        if self.command:
            lines.append(f"  command: {shlex.join(self.command)}")
        if self.log:
            lines.append(f"  log: {self.log}")
            tail = _tail(self.log)
            if tail:
                lines.append("  last lines of the log:")
                lines += [f"    {line}" for line in tail]
        return "\n".join(lines)


class HookError(BuildError):
    """A user hook failed or cannot run: the user's script, not hypersolid,
    is what to look at (the command line exits 3 for these)."""


def _tail(log: Path, count: int = 15) -> list[str]:
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 8192))
            return f.read().decode(errors="replace").splitlines()[-count:]
    except OSError:
        return []


class Log:
    """A stage's log file: commands and their output, appended in order."""

    def __init__(self, path: Path, stage: str, append: bool = False):
        self.path, self.stage = Path(path), stage
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            self.path.write_text(f"# {stage} started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")

    def note(self, text: str) -> None:
        with open(self.path, "a") as f:
            f.write(text.rstrip("\n") + "\n")

    def fail(self, message: str, command: Sequence[str] | None = None,
             error: type[BuildError] = BuildError) -> BuildError:
        self.note(f"# FAILED: {message}")
        return error(self.stage, message, command, self.path)


def run(argv: Sequence[str], log: Log, *, env: Mapping[str, str] | None = None,
        cwd: Path | None = None, input: bytes | None = None, check: bool = True,
        capture: bool = False) -> subprocess.CompletedProcess:
    """Run argv with output appended to `log`; raise BuildError on failure.

    With capture=True stdout is returned (stderr still goes to the log).
    """
    argv = [os.fspath(a) for a in argv]
    full_env = {**BASE_ENV, **(env or {})}
    log.note(f"$ {shlex.join(argv)}")
    start = time.monotonic()
    with open(log.path, "ab") as out:
        try:
            proc = subprocess.run(argv, env=full_env, cwd=cwd, input=input,
                                  stdin=None if input is not None else subprocess.DEVNULL,
                                  stdout=subprocess.PIPE if capture else out, stderr=out)
        except FileNotFoundError:
            raise log.fail(f"{argv[0]} is not installed (see README: setup)", argv) from None
    log.note(f"# exit {proc.returncode} after {time.monotonic() - start:.1f}s")
    if check and proc.returncode != 0:
        raise log.fail(f"command exited with status {proc.returncode}", argv)
    return proc


def output(argv: Sequence[str], log: Log | None = None) -> str:
    """Stdout of a quick query command (versions, listings)."""
    if log is not None:
        return run(argv, log, capture=True).stdout.decode()
    return subprocess.run([os.fspath(a) for a in argv], env=BASE_ENV, check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout.decode()


def tee(argv: Sequence[str], log: Log, *, env: Mapping[str, str] | None = None,
        cwd: Path | None = None) -> int:
    """Run argv with its output both on the console and in the log (user
    hooks such as deploy: the user watches them, the log keeps them)."""
    argv = [os.fspath(a) for a in argv]
    log.note(f"$ {shlex.join(argv)}")
    start = time.monotonic()
    with open(log.path, "ab") as out:
        proc = subprocess.Popen(argv, env={**BASE_ENV, **(env or {})}, cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in proc.stdout:
            out.write(line)
            out.flush()
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
        status = proc.wait()
    log.note(f"# exit {status} after {time.monotonic() - start:.1f}s")
    return status


def attached(argv: Sequence[str], log: Log) -> int:
    """Run argv on the caller's terminal (an interactive VM or shell); the
    command and its status still go to the log."""
    argv = [os.fspath(a) for a in argv]
    log.note(f"$ {shlex.join(argv)}")
    status = subprocess.run(argv).returncode
    log.note(f"# exit {status}")
    return status
