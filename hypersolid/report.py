"""Console reporter: doit's own lines ('.  task' ran, '-- task' up to date),
then a summary with how long each executed stage took."""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path

from doit.reporter import ConsoleReporter

from . import progress
from .run import Interrupted, interrupted_status

# Task meta keys (tasks._tasks): where a stage's progress file and log are.
PROGRESS, LOG = "hypersolid_progress", "hypersolid_log"

# (task name, BuildError or None, doit's failure) of this process's runs:
# the hypersolid command reads it after running doit in-process.
FAILURES: list[tuple] = []

# The meta key of a bad target's subtasks (tasks._bad_targets): its error line.
BAD_TARGET = "hypersolid_bad_target"


def warn_bad_targets(tasks: dict, selected: list[str] | None, stream=None) -> list[str]:
    """One warning line on stderr per bad target the run does not reach (the
    subtasks a run reaches fail with the error themselves): a broken target
    is said once, and does not stop the others."""
    reached, todo = set(), list(selected or ())
    while todo:
        name = todo.pop()
        if name in reached or name not in tasks:
            continue
        reached.add(name)
        todo += [*tasks[name].task_dep, *tasks[name].setup_tasks]
    bad: dict[str, set[str]] = {}  # error line -> targets (a bad base's children share it)
    said: set[str] = set()          # errors a reached subtask fails with
    for name, task in tasks.items():
        error = (getattr(task, "meta", None) or {}).get(BAD_TARGET)
        if error:
            bad.setdefault(error, set()).add(name.split(":", 1)[-1])
            if name in reached:
                said.add(error)
    lines = [f"hypersolid: warning: not building {', '.join(sorted(targets))} (bad target: {error})"
             for error, targets in bad.items() if error not in said]
    for line in lines:
        print(line, file=stream or sys.stderr, flush=True)
    return lines


def install_excepthook() -> None:
    """An interruption that reaches the top of plain `doit` (doit lets
    KeyboardInterrupt through, after saving its database and printing the
    timings) is one line and exit 128+N, not a 50-line traceback."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if not issubclass(kind, KeyboardInterrupt):
            return previous(kind, value, tb)
        sys.stdout.flush()
        what = value if isinstance(value, Interrupted) else "interrupted"
        print(f"hypersolid: {what}; the running stage was stopped and kept nothing half-built",
              file=sys.stderr, flush=True)
        from .entry import end_run  # os._exit runs no atexit handler
        end_run()
        os._exit(interrupted_status(value))

    sys.excepthook = hook


def stop_workers(grace: float = 60.0) -> None:
    """doit's worker processes still running when the run ends: only on an
    interruption or an error (a finished run has joined them).  Each is told
    to stop (SIGTERM: its stage removes what it half-built) and waited for,
    so the build is over when this process says so; one that does not end
    within `grace` is killed, and the next run sweeps its work dir."""
    workers = multiprocessing.active_children()
    for proc in workers:
        proc.terminate()
    deadline = time.monotonic() + grace
    for proc in workers:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()


class TimingReporter(ConsoleReporter):
    desc = "doit's console output plus hypersolid stage timings"

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self._started: dict[str, float] = {}
        self.timings: list[tuple[str, float, str]] = []
        self.uptodate = 0
        self._run_start = time.monotonic()
        self.display: progress.Display | None = None

    def write(self, text):
        if self.display is None:
            return super().write(text)
        self.display.write(text, self.outstream)

    def initialize(self, tasks, selected_tasks):
        super().initialize(tasks, selected_tasks)
        # On stderr, unless the run's output is captured (`hypersolid build`'s
        # quiet resolve run): then there, or every warning would be said twice.
        captured = self.outstream not in (sys.stdout, sys.__stdout__)
        warn_bad_targets(tasks, selected_tasks, self.outstream if captured else None)

    def execute_task(self, task):
        self._started[task.name] = time.monotonic()
        super().execute_task(task)
        meta = getattr(task, "meta", None) or {}
        if PROGRESS in meta:
            if self.display is None:  # first stage: after doit forked its workers
                self.outstream.flush()
                self.display = progress.display_for(self.outstream)
                if self.display is not None:
                    self.display.start_thread()
            if self.display is not None:
                self.display.start(task.name, Path(meta[PROGRESS]), Path(meta[LOG]))

    def _finish(self, task, outcome):
        if self.display is not None:
            self.display.stop(task.name)
        start = self._started.pop(task.name, None)
        if start is not None and task.actions:
            values = getattr(task, "values", None) or {}
            if outcome == "ok" and values.get("cache_hit"):
                outcome = "cache hit"
            self.timings.append((task.name, time.monotonic() - start, outcome))

    def add_success(self, task):
        self._finish(task, "ok")
        super().add_success(task)

    def add_failure(self, task, fail):
        self._finish(task, "FAILED")
        FAILURES.append((task.name, getattr(fail, "error", None), fail))
        super().add_failure(task, fail)

    def skip_uptodate(self, task):
        if task.actions and not task.name.startswith("_"):
            self.uptodate += 1
        super().skip_uptodate(task)

    def complete_run(self):
        if self.display is not None:
            self.display.close()
            self.display = None
        stop_workers()
        super().complete_run()
        total = time.monotonic() - self._run_start
        if not self.timings:
            self.write(f"hypersolid: nothing to do, {self.uptodate} stage(s) up to date ({total:.1f}s)\n")
            return
        self.write("hypersolid: stage timings\n")
        for name, seconds, outcome in self.timings:
            self.write(f"  {name:<40} {seconds:8.1f}s  {outcome}\n")
        self.write(f"hypersolid: {len(self.timings)} stage(s) executed, {self.uptodate} up to date, "
                   f"{total:.1f}s in all\n")
