"""Hostile runs: signals to doit or hypersolid alone, kill -9, hooks that hang,
two builds in one checkout, a removed cache, leftovers of killed builds, a
cache that is a file, read-only or full.  Every case checks the exit status,
the one line that says what happened, and that nothing is left on the host
(tests/hostile.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TestProject, needs_root_and_tools, tiny_target
from hostile import Outcome, outcome, untouched_host
from hypersolid.cache import remove_tree

pytestmark = pytest.mark.integration

SLEEPER = "#!/bin/sh\nsleep 300\n"
SCRIPT = Path(sys.executable).with_name("hypersolid")


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_cache) -> TestProject:
    needs_root_and_tools()
    p = TestProject(tmp_path_factory.mktemp("hostile-run"), shared_cache)
    p.target("tiny", tiny_target())
    p.doit("bootfiles:tiny")
    return p


def env_for(project: TestProject, **extra: str) -> dict:
    return {**os.environ, "HYPERSOLID_CACHE": str(project.cache), "PYTHONPATH": str(REPO), **extra}


def start(project: TestProject, argv: list[str], **extra: str) -> subprocess.Popen:
    """A build in the background, in its own session: signals reach only the
    pid we name, as with `kill PID` from another terminal."""
    return subprocess.Popen(argv, cwd=project.root, env=env_for(project, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def doit_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "doit", *args]


def wait_for_log(project: TestProject, stage: str, text: str, proc: subprocess.Popen, timeout=300) -> None:
    log = project.root / f"build/tiny/amd64/logs/{stage}.log"
    deadline = time.monotonic() + timeout
    while text not in (log.read_text(errors="replace") if log.exists() else ""):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"{text!r} never appeared in {log}"
        time.sleep(0.2)
    time.sleep(1.5)  # let the hook's container come up


def finish(proc: subprocess.Popen, timeout=60) -> Outcome:
    out, _ = proc.communicate(timeout=timeout)
    return Outcome(proc.returncode, out)


def tmp_dirs(project: TestProject) -> set[str]:
    tmp = project.cache / "tmp"
    return {p.name for p in tmp.iterdir()} if tmp.is_dir() else set()


HOOKS = {"configure": "targets/tiny/hooks/pre-configure.d/50-sleep",
         "squashfs": "targets/tiny/hooks/post-configure.d/50-sleep"}


@pytest.mark.parametrize("sig,stage,command", [
    (signal.SIGTERM, "squashfs", "doit"),
    (signal.SIGINT, "squashfs", "doit"),
    (signal.SIGHUP, "configure", "doit"),
    (signal.SIGTERM, "configure", "hypersolid"),
    (signal.SIGINT, "squashfs", "hypersolid"),
])
def test_a_stop_signal_to_the_main_process_alone_stops_everything_under_it(project, tmp_path, sig, stage, command):
    """The container, the hook and the isolated child go; the work dir goes;
    the exit status is 128+N with one line and no traceback."""
    before = tmp_dirs(project)
    with untouched_host(tmp_path, project.root, project.cache):
        with project.temporary(HOOKS[stage], SLEEPER, mode=0o755):
            argv = doit_argv(f"{stage}:tiny") if command == "doit" else [str(SCRIPT), "build", "tiny"]
            # An earlier case's log names the hook too: the signal would come before this run's stage.
            (project.root / f"build/tiny/amd64/logs/{stage}.log").unlink(missing_ok=True)
            proc = start(project, argv)
            wait_for_log(project, stage, "50-sleep", proc)
            proc.send_signal(sig)
            result = finish(proc)
    assert result.status == 128 + sig, result.output
    result.line(f"interrupted by {signal.Signals(sig).name}")
    assert tmp_dirs(project) <= before


@pytest.mark.parametrize("stage", ["configure", "squashfs"])
def test_kill_9_of_doit_alone_leaves_no_orphan_and_no_entry(project, tmp_path, stage):
    """No cleanup code runs: the kernel takes the children down (PDEATHSIG,
    PID namespaces); the next run sweeps the work dir and succeeds."""
    entries = set((project.cache / stage).iterdir())
    with untouched_host(tmp_path, project.root, project.cache):
        with project.temporary(HOOKS[stage], SLEEPER, mode=0o755):
            proc = start(project, doit_argv(f"{stage}:tiny"))
            wait_for_log(project, stage, "50-sleep", proc)
            proc.kill()
            finish(proc)
    assert set((project.cache / stage).iterdir()) == entries
    project.doit("bootfiles:tiny")


def test_a_hook_past_hook_timeout_is_killed_with_its_container(project, tmp_path):
    project.target("tiny", tiny_target(extra="hook_timeout: 3\n"))
    try:
        with untouched_host(tmp_path, project.root, project.cache):
            with project.temporary(HOOKS["squashfs"], SLEEPER, mode=0o755):
                start_time = time.monotonic()
                result = outcome(project.doit("squashfs:tiny", check=False))
        assert result.status == 1
        assert time.monotonic() - start_time < 120
        result.line("post-configure.d/50-sleep did not finish within hook_timeout (3 s)")
    finally:
        project.target("tiny", tiny_target())


def test_the_chroot_backend_is_used_by_isolated_stages_too(project, tmp_path):
    hook = "#!/bin/sh\necho \"container=${container:-none}\" > /etc/hs-container\n"
    with project.temporary(HOOKS["squashfs"], hook, mode=0o755):
        project.doit("squashfs:tiny", env={"HYPERSOLID_CONTAINER": "chroot"})
        image = project.entry("squashfs", "tiny") / "system-amd64.img"
        inside = subprocess.run(["unsquashfs", "-cat", image, "etc/hs-container"], check=True,
                                stdout=subprocess.PIPE, text=True).stdout
    assert inside == "container=none\n"  # nspawn would have said systemd-nspawn
    log = (project.root / "build/tiny/amd64/logs/squashfs.log").read_text()
    assert "systemd-nspawn" not in log and "chroot" in log


def test_a_second_build_in_the_checkout_waits_or_fails_fast_with_no_wait(project, tmp_path):
    with untouched_host(tmp_path, project.root, project.cache):
        with project.temporary(HOOKS["squashfs"], SLEEPER, mode=0o755):
            first = start(project, doit_argv("squashfs:tiny"))
            wait_for_log(project, "squashfs", "50-sleep", first)
            fast = outcome(project.doit("squashfs:tiny", check=False, env={"HYPERSOLID_NO_WAIT": "1"}))
            cli = subprocess.run([str(SCRIPT), "build", "--no-wait", "tiny"], cwd=project.root, text=True,
                                 env=env_for(project), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            waiting = start(project, doit_argv("squashfs:tiny"))
            time.sleep(3)
            assert waiting.poll() is None  # still waiting for the first
            first.send_signal(signal.SIGTERM)
            finish(first)
        second = finish(waiting, timeout=600)
    assert fast.status == 1
    fast.line(f"another build runs in this checkout (pid {first.pid})")
    assert cli.returncode == 1
    Outcome(cli.returncode, cli.stdout).line(f"another build runs in this checkout (pid {first.pid})")
    assert second.status == 0, second.output
    second.line(f"waiting for the build in this checkout (pid {first.pid})")


def test_two_checkouts_sharing_one_cache_build_at_once(project, tmp_path):
    others = [TestProject(tmp_path / f"checkout-{i}", project.cache) for i in (1, 2)]
    for other in others:
        other.target("tiny", tiny_target())
        other.write("targets/tiny/rootfs/etc/motd", f"{other.root.name}\n")
    procs = [start(other, doit_argv("squashfs:tiny")) for other in others]
    results = [finish(p, timeout=900) for p in procs]
    assert [r.status for r in results] == [0, 0], [r.output for r in results]


def test_a_removed_cache_rebuilds_by_itself(project, tmp_path):
    """Every entry removed (the downloads kept, to spare the mirror): doit
    rebuilds what is gone in one run, no `doit forget`."""
    own = TestProject(tmp_path / "own", tmp_path / "cache")
    own.target("tiny", tiny_target())
    (tmp_path / "cache").mkdir()
    os.symlink(project.cache / "debs", tmp_path / "cache/debs")
    own.doit("squashfs:tiny")
    for stage in ("rootfs", "bootstrap", "configure", "squashfs"):
        remove_tree(tmp_path / "cache" / stage)
    again = own.doit("squashfs:tiny")
    assert {"rootfs:tiny", "bootstrap:tiny", "configure:tiny", "squashfs:tiny"} <= again.executed
    assert own.doit("squashfs:tiny").executed == set()


def test_leftovers_of_a_killed_bootfiles_are_swept_by_the_next(project):
    dead = subprocess.Popen(["true"])
    dead.wait()
    dist = project.root / "dist/tiny"
    (dist / f".system-amd64.tmp-{dead.pid}-abc123").mkdir()
    (dist / f".system-amd64.tmp-{dead.pid}-abc123/system-amd64.img").write_bytes(b"x" * 4096)
    (dist / f".initramfs-amd64.img.tmp-{dead.pid}").write_bytes(b"half")
    (dist / "packages-amd64.tsv").unlink()  # makes bootfiles run
    project.doit("bootfiles:tiny")
    assert sorted(p.name for p in dist.iterdir() if p.name.startswith(".")) == []


def test_a_cache_that_is_a_file_is_one_line(project, tmp_path):
    (tmp_path / "file").write_text("not a directory\n")
    with untouched_host(tmp_path, project.root):
        result = outcome(project.doit("squashfs:tiny", check=False, env={"HYPERSOLID_CACHE": str(tmp_path / "file")}))
    assert result.status != 0
    result.line(f"cache {tmp_path / 'file'}", "is not a directory")


def test_a_read_only_cache_is_one_line(project, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", ro, ro], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", ro], check=True)
        result = outcome(project.doit("squashfs:tiny", check=False, env={"HYPERSOLID_CACHE": str(ro)}))
    finally:
        subprocess.run(["umount", ro], check=True)
    assert result.status != 0
    result.line(f"cache {ro}", "is not writable")


def test_a_full_cache_fails_the_stage_in_one_line_and_publishes_nothing(project, tmp_path):
    """A tmpfs just big enough for the downloads and apt's lists: the unpacked tree does not fit."""
    full = tmp_path / "full"
    full.mkdir()
    # the downloads and apt's state (the resolve task's lists) fit, the unpacked tree does not
    debs = int(subprocess.run(["du", "-smc", project.cache / "debs", project.cache / "apt"], check=True,
                              stdout=subprocess.PIPE, text=True).stdout.splitlines()[-1].split()[0])
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={debs + 40}m", "tmpfs", full], check=True)
    try:
        subprocess.run(["cp", "-a", project.cache / "debs", full / "debs"], check=True)
        subprocess.run(["cp", "-a", project.cache / "apt", full / "apt"], check=True)
        own = TestProject(tmp_path / "own", full)
        own.target("tiny", tiny_target())
        with untouched_host(tmp_path, own.root, full):
            result = outcome(own.doit("bootstrap:tiny", check=False))
        assert result.status == 1
        result.line("bootstrap:tiny", "no space left on device", "MB free")
        assert not (full / "bootstrap").exists() or list((full / "bootstrap").iterdir()) == []
        assert list((full / "tmp").iterdir()) == []
    finally:
        subprocess.run(["umount", full], check=True)
