"""Live progress of the running stages, below doit's own lines.

A stage's work runs in commands, isolated children and (in parallel runs)
doit's worker processes, so it reports through a small JSON file beside
its log (`Log.progress`: logs/<stage>.progress, replaced atomically, at most
twice a second).  The reporter of the main doit process starts a thread
that polls the files of the running stages and shows, for each stage
running longer than AFTER seconds, its name, elapsed time and what the file
says (packages downloaded n/N and MB, packages configured n/N):
- on a terminal: one line per running stage, redrawn in place; doit's lines
  are written above it, and the block is erased when the run ends;
- otherwise (a CI log): plain lines, at most every INTERVAL seconds
  (HYPERSOLID_PROGRESS_INTERVAL, default 10).
A stage sets done/total/what/bytes itself (bootstrap: packages downloaded),
or names a marker its log's lines start with (count: dpkg's "Setting up ")
and the reporter counts them: that works whatever runs the commands
(nspawn, chroot, qemu-user), since all their output goes to the log.
HYPERSOLID_QUIET=1 (`hypersolid build --quiet`) turns it off.

The thread writes with os.write on the console's descriptor and takes no
lock a forked child could need, and every error here is swallowed: progress
must never break or slow a build.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

QUIET_ENV = "HYPERSOLID_QUIET"
INTERVAL_ENV = "HYPERSOLID_PROGRESS_INTERVAL"
AFTER = 3.0       # seconds a stage runs before it shows
INTERVAL = 10.0   # seconds between plain lines (not a terminal)
REFRESH = 1.0     # seconds between redraws on a terminal
MIN_WRITE = 0.5   # seconds between two writes of one progress file


def quiet() -> bool:
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


def interval() -> float:
    try:
        return max(0.1, float(os.environ.get(INTERVAL_ENV, "") or INTERVAL))
    except ValueError:
        return INTERVAL


def write(path: Path, fields: dict) -> None:
    """The stage side: replace the progress file (never raises)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(fields))
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass


def read(path: Path, since: float) -> dict:
    """The progress file, if this run's stage wrote it (mtime >= since)."""
    try:
        if os.stat(path).st_mtime < since:
            return {}  # left by an earlier, killed run
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


class LineCounter:
    """Lines starting with a marker in a growing log (dpkg's "Setting up "),
    read incrementally."""

    def __init__(self, path: Path):
        self.path, self.offset, self.count, self.rest = path, 0, 0, b""

    def update(self, marker: str) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(1 << 20)
        except OSError:
            return self.count
        self.offset += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        needle = marker.encode()
        self.count += sum(1 for line in lines if line.startswith(needle))
        return self.count


def elapsed(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds}s" if seconds < 60 else f"{seconds // 60}m{seconds % 60:02d}s"


def detail(info: dict, counted: int | None = None) -> str:
    """'packages downloaded 85/143 (42.1 MB); unpacked 12/143' from a progress
    file: done/total (what, bytes) set by the stage, and a count of marker
    lines in its log (count, count_what, count_total) done by the reader."""
    parts = []
    if isinstance(info.get("total"), int) and isinstance(info.get("done"), int):
        text = f"{info.get('what', 'done')} {min(info['done'], info['total'])}/{info['total']}"
        if isinstance(info.get("bytes"), int):
            text += f" ({info['bytes'] / 1e6:.1f} MB)"
        parts.append(text)
    if counted is not None and isinstance(info.get("count_total"), int):
        parts.append(f"{info.get('count_what', 'done')} {min(counted, info['count_total'])}/{info['count_total']}")
    if isinstance(info.get("phase"), str):
        parts.append(info["phase"])
    return "; ".join(parts)


def line(name: str, seconds: float, info: dict, counted: int | None = None) -> str:
    more = detail(info, counted)
    return f"{name} {elapsed(seconds)}" + (f", {more}" if more else "")


class _Running:
    def __init__(self, started: float, wall: float, progress: Path | None, log: Path | None):
        self.started, self.wall, self.progress = started, wall, progress
        self.counter = LineCounter(log) if log else None


class Display:
    """The running stages on one console descriptor (see the module doc).
    tick() does one poll; start_thread() runs it periodically."""

    def __init__(self, fd: int, tty: bool, every: float = INTERVAL, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, width: Callable[[], int] | None = None):
        self.fd, self.tty, self.every, self.clock, self.wall = fd, tty, every, clock, wall
        self.width = width or self._terminal_width
        self.after = min(AFTER, every)
        self.running: dict[str, _Running] = {}
        self.lock = threading.Lock()
        self.shown: list[str] = []      # the lines on the terminal now
        self.last_plain = clock()       # when plain lines were last printed
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _terminal_width(self) -> int:
        try:
            return os.get_terminal_size(self.fd).columns or 80  # 0: a pty nobody sized
        except OSError:
            return 80

    def start(self, name: str, progress: Path | None, log: Path | None) -> None:
        with self.lock:
            self.running[name] = _Running(self.clock(), self.wall() - 1.0, progress, log)

    def stop(self, name: str) -> None:
        with self.lock:
            self.running.pop(name, None)

    def lines(self) -> list[str]:
        now, out = self.clock(), []
        for name, r in list(self.running.items()):
            if now - r.started < self.after:
                continue
            info = read(r.progress, r.wall) if r.progress else {}
            counted = None
            if isinstance(info.get("count"), str) and r.counter:
                counted = r.counter.update(info["count"])
            out.append(line(name, now - r.started, info, counted))
        return out

    def tick(self) -> None:
        try:
            with self.lock:
                lines = self.lines()
                if self.tty:
                    self._draw(lines)
                elif lines and self.clock() - self.last_plain >= self.every:
                    self.last_plain = self.clock()
                    self._out("".join(f"hypersolid: running {text}\n" for text in lines))
        except Exception:  # noqa: BLE001 - progress never breaks a build
            pass

    def write(self, text: str, stream) -> None:
        """doit's own output: above the block on a terminal, in order otherwise."""
        with self.lock:
            shown = self.shown
            if shown:
                self._draw([])
            stream.write(text)
            stream.flush()
            if shown:
                self._draw(shown)

    def _draw(self, lines: list[str]) -> None:
        width = max(20, self.width()) - 1  # never wrap: the cursor-up count must hold
        text = f"\x1b[{len(self.shown)}A\x1b[J" if self.shown else ""
        text += "".join(f"  {ln}"[:width] + "\n" for ln in lines)
        if text:
            self._out(text)
        self.shown = lines

    def _out(self, text: str) -> None:
        data = text.encode(errors="replace")
        while data:
            data = data[os.write(self.fd, data):]

    def start_thread(self) -> None:
        period = REFRESH if self.tty else min(REFRESH, self.every)
        self._thread = threading.Thread(target=self._loop, args=(period,), name="hypersolid-progress", daemon=True)
        self._thread.start()

    def _loop(self, period: float) -> None:
        while not self._done.wait(period):
            self.tick()

    def close(self) -> None:
        """Stop the thread and erase the block: the console is clean after."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            with self.lock:
                if self.tty and self.shown:
                    self._draw([])
        except Exception:  # noqa: BLE001
            pass


def display_for(stream) -> Display | None:
    """A display on the stream's descriptor, or None (quiet, no descriptor)."""
    if quiet():
        return None
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None  # a captured run (StringIO)
    return Display(fd, os.isatty(fd), interval())
