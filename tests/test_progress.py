"""Live progress (hypersolid/progress.py): the lines a CI log and a terminal
get, from real progress files and logs, on a fake clock."""
from __future__ import annotations

import os
import re
import shutil
import time
import uuid

import pytest

from conftest import TestProject, needs_root_and_tools, tiny_target
from hypersolid import progress
from hypersolid.run import Log


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def read_all(fd: int) -> str:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1 << 16).decode()
    except BlockingIOError:
        return ""


def plain_display(clock, every=10.0):
    r, w = os.pipe()
    return progress.Display(w, tty=False, every=every, clock=clock), r


def test_plain_lines_name_the_stage_its_time_and_packages_n_of_n(tmp_path):
    clock = Clock()
    display, out = plain_display(clock)
    log = Log(tmp_path / "logs/bootstrap.log", "bootstrap:t/amd64")
    display.start("bootstrap:t", log.path.with_suffix(".progress"), log.path)
    log.progress(force=True, what="packages downloaded", done=85, total=143, bytes=42_100_000)
    clock.now += 12
    display.tick()
    assert read_all(out) == "hypersolid: running bootstrap:t 12s, packages downloaded 85/143 (42.1 MB)\n"


def test_plain_lines_come_at_most_every_interval(tmp_path):
    clock = Clock()
    display, out = plain_display(clock)
    display.start("squashfs:t", None, None)
    printed = []
    for _ in range(35):  # 35 s, ticked every second
        clock.now += 1
        display.tick()
        printed += read_all(out).splitlines()
    assert printed == ["hypersolid: running squashfs:t 10s", "hypersolid: running squashfs:t 20s",
                       "hypersolid: running squashfs:t 30s"]


def test_a_short_stage_shows_nothing_and_a_finished_one_stops_showing(tmp_path):
    clock = Clock()
    display, out = plain_display(clock, every=1.0)
    display.start("rootfs:t", None, None)
    clock.now += 0.5
    display.tick()
    display.stop("rootfs:t")
    clock.now += 5
    display.tick()
    assert read_all(out) == ""


def test_configured_packages_are_counted_from_the_log(tmp_path):
    """dpkg's own lines, whatever container ran it: n/N from "Setting up"."""
    clock = Clock()
    display, out = plain_display(clock, every=5.0)
    log = Log(tmp_path / "logs/configure.log", "configure:t/amd64")
    display.start("configure:t", log.path.with_suffix(".progress"), log.path)
    log.progress(force=True, count="Setting up ", count_what="packages configured", count_total=4)
    with open(log.path, "a") as f:  # as dpkg writes it: the last line not finished yet
        f.write("Setting up base-passwd (3.6.1) ...\nSetting up base-files (12.4) ...\nUnpacking x\nSetting up bash")
    clock.now += 5
    display.tick()
    assert read_all(out) == "hypersolid: running configure:t 5s, packages configured 2/4\n"  # 3rd line unfinished
    with open(log.path, "a") as f:
        f.write(" (5.2) ...\nSetting up dash (0.5) ...\nSetting up hostname (3.23) ...\n")
    clock.now += 5
    display.tick()
    assert read_all(out) == "hypersolid: running configure:t 10s, packages configured 4/4\n"


def test_a_progress_file_of_an_earlier_run_is_ignored(tmp_path):
    stale = tmp_path / "bootstrap.progress"
    progress.write(stale, {"what": "packages downloaded", "done": 1, "total": 2})
    os.utime(stale, (1, 1))
    clock = Clock()
    display, out = plain_display(clock)
    display.start("bootstrap:t", stale, None)
    clock.now += 10
    display.tick()
    assert read_all(out) == "hypersolid: running bootstrap:t 10s\n"


def test_parallel_stages_get_one_line_each_redrawn_in_place_on_a_terminal(tmp_path):
    clock = Clock()
    r, w = os.pipe()
    display = progress.Display(w, tty=True, clock=clock, width=lambda: 40)
    display.start("squashfs:qemu-amd64", None, None)
    display.start("initramfs:qemu-amd64", None, None)
    clock.now += 4
    display.tick()
    first = read_all(r)
    assert first == "  squashfs:qemu-amd64 4s\n  initramfs:qemu-amd64 4s\n"
    clock.now += 1
    display.tick()
    assert read_all(r) == "\x1b[2A\x1b[J  squashfs:qemu-amd64 5s\n  initramfs:qemu-amd64 5s\n"


def test_doit_lines_go_above_the_block_and_the_block_is_gone_after(tmp_path):
    clock = Clock()
    r, w = os.pipe()
    display = progress.Display(w, tty=True, clock=clock, width=lambda: 30)
    display.start("configure:a-very-long-target-name-indeed", None, None)
    clock.now += 61
    display.tick()
    assert read_all(r) == "  configure:a-very-long-targe\n"  # cut below the width: never wraps

    class Stream:
        def write(self, text):
            os.write(w, text.encode())

        def flush(self):
            pass

    display.write(".  squashfs:t\n", Stream())
    assert read_all(r) == "\x1b[1A\x1b[J.  squashfs:t\n  configure:a-very-long-targe\n"
    display.close()
    assert read_all(r) == "\x1b[1A\x1b[J"


def test_quiet_turns_it_off(monkeypatch, tmp_path):
    with open(tmp_path / "out", "w") as stream:
        assert progress.display_for(stream) is not None
        monkeypatch.setenv(progress.QUIET_ENV, "1")
        assert progress.display_for(stream) is None


def test_the_reporter_shows_a_running_stage_unless_quiet(monkeypatch, tmp_path):
    """doit's reporter, its own lines intact, with the progress line of a
    stage it was told started (plain: the output is a file)."""
    from doit.task import Task
    from hypersolid.report import LOG, PROGRESS, TimingReporter
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.2")
    log = tmp_path / "logs/squashfs.log"
    for quiet in ("0", "1"):
        monkeypatch.setenv(progress.QUIET_ENV, quiet)
        with open(tmp_path / f"out-{quiet}", "w+") as out:
            reporter = TimingReporter(out, {})
            task = Task("squashfs:t", [(lambda: None, [])],
                        meta={PROGRESS: str(log.with_suffix(".progress")), LOG: str(log)})
            monkeypatch.setattr(progress, "AFTER", 0.1)
            reporter.execute_task(task)
            time.sleep(1.5)
            reporter.add_success(task)
            reporter.complete_run()
            out.seek(0)
            text = out.read()
        assert text.startswith(".  squashfs:t\n") and "hypersolid: stage timings" in text
        assert ("hypersolid: running squashfs:t 0s" in text) == (quiet == "0"), text


def test_elapsed_times_read_as_minutes_past_a_minute():
    assert [progress.elapsed(s) for s in (0, 59.9, 60, 125)] == ["0s", "59s", "1m00s", "2m05s"]
    assert re.fullmatch(r"\S+ \d+s", progress.line("x:y", 3, {}))


@pytest.mark.integration
def test_a_real_bootstrap_prints_packages_downloaded_n_of_n_in_a_log(tmp_path, shared_cache):
    """Not a terminal (a pipe, as in CI), with a 1 s interval: the bootstrap's
    plain progress lines name the stage and its packages n/N, and doit's own
    lines are still there for the tests that parse them."""
    needs_root_and_tools()
    project = TestProject(tmp_path / "project", shared_cache)
    project.target("tiny", tiny_target())
    # A post-bootstrap hook with this run's own text: a bootstrap that really runs.
    project.write("targets/tiny/hooks/post-bootstrap.d/10-mark", f"#!/bin/sh\n# {uuid.uuid4()}\n", mode=0o755)
    try:
        result = project.doit("bootstrap:tiny", env={progress.INTERVAL_ENV: "1"})
        assert "bootstrap:tiny" in result.executed
        counts = re.findall(r"^hypersolid: running bootstrap:tiny \d+s, packages downloaded (\d+)/(\d+) "
                            r"\(\d+\.\d MB\)", result.output, re.M)
        assert counts, result.output
        assert all(0 < int(n) <= int(total) for n, total in counts)
        assert not (project.root / "build/tiny/amd64/logs/bootstrap.progress").exists()
    finally:
        shutil.rmtree(project.entry("bootstrap", "tiny"), ignore_errors=True)


def test_stages_run_side_by_side_by_default_and_serially_when_asked(monkeypatch):
    from doit.exceptions import InvalidDodoFile
    from hypersolid import tasks
    monkeypatch.delenv(tasks.JOBS_ENV, raising=False)
    assert 2 <= tasks.jobs(["bootfiles:qemu-amd64"]) <= 4
    monkeypatch.setenv(tasks.JOBS_ENV, "3")
    assert tasks.jobs([]) == 3
    assert tasks.jobs(["boot:qemu-amd64", "--storage", "x"]) == 1  # qemu needs the terminal's stdin
    assert tasks.parallel(1) == {"num_process": 0}                 # doit's in-process runner
    assert tasks.parallel(3) == {"num_process": 3, "par_type": "process"}
    monkeypatch.setenv(tasks.JOBS_ENV, "many")
    with pytest.raises(InvalidDodoFile, match="HYPERSOLID_JOBS='many'"):
        tasks.jobs([])


def test_a_stage_failure_crosses_from_a_worker_process_intact():
    import pickle
    from hypersolid.run import BuildError, Interrupted
    from hypersolid.tasks import StageFailed
    failed = pickle.loads(pickle.dumps(StageFailed(BuildError("squashfs:t", "mksquashfs failed", ["mksquashfs"]))))
    assert failed.error.message == "mksquashfs failed" and "squashfs:t: mksquashfs failed" in failed.get_msg()
    assert Interrupted("interrupted by SIGTERM").status == 143  # as doit rebuilds a worker's interruption


def test_debsbom_warnings_go_to_the_stage_log_not_the_console(tmp_path, capfd):
    """They would land in the middle of the progress block (every build warns
    "no supplier for linux@...")."""
    import logging
    from hypersolid.stages.sbom import warnings_to
    log = Log(tmp_path / "logs/sbom.log", "sbom:t/amd64")
    with warnings_to(log):
        logging.getLogger("debsbom.generate.cdx").warning("no supplier for linux@6.1")
    assert "# debsbom WARNING: no supplier for linux@6.1" in log.path.read_text()
    out, err = capfd.readouterr()
    assert "no supplier" not in out + err
