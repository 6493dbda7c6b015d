"""The stage engine's rules (stages.execute, planned_keys, TargetView) on fake
stages: cache hit, early cutoff on an equal key, atomic publish, a kill
mid-build, undeclared settings.  No root or network, except the isolated
stage's own mount namespace (root)."""
from __future__ import annotations

import ast
import inspect
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import hypersolid.stages as engine
from hypersolid.cache import Cache
from hypersolid.config import Project, Target
from hypersolid.run import BuildError
from hypersolid.stages import IDENTITY, Stage, Unit, UndeclaredSetting, execute, planned_keys

TARGET = """\
architectures: [amd64, arm64]
suite: bookworm
mirror: http://deb.debian.org/debian
sections:
  - name: debian
    packages: [netbase]
    arch_packages: {{arm64: [only-arm]}}
hostname: {hostname}
timezone: {timezone}
"""


class Source(Stage):
    """Writes the hostname it reads; counts its builds."""

    name = "fake-source"
    reads = ("hostname",)
    builds: list[str] = []
    sleep = 0.0
    fail = False

    def build(self, unit, out, log):
        type(self).builds.append(unit.arch)
        (out / "half-written").write_text("x")
        if self.sleep:
            time.sleep(self.sleep)
        if self.fail:
            raise log.fail("this build fails on purpose")
        (out / "value").write_text(unit.target.hostname)


class Sink(Stage):
    """Reads its upstream's output."""

    name = "fake-sink"
    upstream = ("fake-source",)
    builds: list[str] = []

    def build(self, unit, out, log):
        type(self).builds.append(unit.arch)
        (out / "copy").write_text((unit.output("fake-source") / "value").read_text())


class Snoop(Stage):
    """Reads a target field it did not declare."""

    name = "fake-snoop"

    def build(self, unit, out, log):
        (out / "tz").write_text(unit.target.timezone)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "STAGES", {s.name: s for s in (Source(), Sink(), Snoop())})
    Source.builds, Sink.builds, Source.sleep, Source.fail = [], [], 0.0, False
    p = Project(tmp_path / "project")
    write_target(p)
    return p


def write_target(project: Project, hostname="one", timezone="Etc/UTC") -> None:
    from hypersolid.config import clear_caches
    path = project.root / "targets/t/target.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TARGET.format(hostname=hostname, timezone=timezone))
    clear_caches()


def unit(project: Project, arch="amd64") -> Unit:
    return Unit(project, project.load("t"), arch, Cache(project.root / "cache"))


def test_first_run_builds_and_publishes_a_second_is_a_cache_hit(project):
    first = execute("fake-source", unit(project))
    assert not first["cache_hit"] and Source.builds == ["amd64"]
    entry = unit(project).output("fake-source")
    assert (entry / "value").read_text() == "one" and (entry / "manifest.json").is_file()
    again = execute("fake-source", unit(project))
    assert again == {"key": first["key"], "cache_hit": True} and Source.builds == ["amd64"]


def test_an_input_outside_the_key_keeps_the_key_so_downstream_stays_put(project):
    execute("fake-source", unit(project))
    execute("fake-sink", unit(project))
    key_file = unit(project).key_file("fake-source")
    before = key_file.read_bytes()
    write_target(project, timezone="Europe/Berlin")  # not read by fake-source
    assert execute("fake-source", unit(project))["cache_hit"]
    assert key_file.read_bytes() == before  # early cutoff: doit sees an unchanged file_dep
    assert execute("fake-sink", unit(project))["cache_hit"] and Sink.builds == ["amd64"]


def test_a_declared_setting_changes_the_key_and_every_key_after_it(project):
    old = planned_keys(unit(project))
    write_target(project, hostname="two")
    new = planned_keys(unit(project))
    assert new["fake-source"] != old["fake-source"] and new["fake-sink"] != old["fake-sink"]
    assert new["fake-snoop"] == old["fake-snoop"]


def test_planned_keys_are_the_keys_execute_records(project):
    planned = planned_keys(unit(project))
    assert execute("fake-source", unit(project))["key"] == planned["fake-source"]
    assert execute("fake-sink", unit(project))["key"] == planned["fake-sink"]


def test_a_failed_build_publishes_nothing_and_leaves_no_work_dir(project):
    Source.fail = True
    with pytest.raises(BuildError, match="fails on purpose"):
        execute("fake-source", unit(project))
    cache = project.root / "cache"
    assert not (cache / "fake-source").exists() or not list((cache / "fake-source").iterdir())
    assert list((cache / "tmp").iterdir()) == []
    assert not unit(project).has_entry("fake-source")


def test_a_build_killed_mid_way_publishes_nothing_and_its_work_dir_is_swept(project):
    Source.sleep = 30
    pid = os.fork()
    if pid == 0:
        try:
            execute("fake-source", unit(project))
        finally:
            os._exit(0)
    tmp = project.root / "cache/tmp"
    deadline = time.monotonic() + 10
    while not (tmp.is_dir() and any(w.joinpath("half-written").exists() for w in tmp.iterdir())):
        assert time.monotonic() < deadline, "the build never started"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert not (project.root / "cache/fake-source").exists()
    assert not unit(project).has_entry("fake-source")
    Cache(project.root / "cache").collect_garbage()
    assert list(tmp.iterdir()) == []


def test_a_removed_entry_is_missing_so_the_task_is_not_up_to_date(project):
    execute("fake-source", unit(project))
    assert unit(project).has_entry("fake-source")
    from hypersolid.cache import remove_tree
    remove_tree(project.root / "cache")
    assert not unit(project).has_entry("fake-source")  # tasks' entry_present: rebuild by itself
    assert not execute("fake-source", unit(project))["cache_hit"]


def test_reading_a_field_outside_the_key_fails_the_stage(project):
    with pytest.raises(UndeclaredSetting, match=r"target\.timezone.*Snoop\.reads"):
        execute("fake-snoop", unit(project))
    assert not (project.root / "cache/fake-snoop").exists()


def test_each_architecture_sees_and_keys_only_its_own_arch_packages(project):
    amd64, arm64 = (Source().settings(unit(project, a)) for a in ("amd64", "arm64"))
    Source.reads = ("hostname", "sections")
    try:
        amd, arm = (engine.view(Source(), unit(project, a)).target.sections[0] for a in ("amd64", "arm64"))
        assert amd.packages_for("amd64") == ("netbase",)
        assert arm.packages_for("arm64") == ("netbase", "only-arm")
        assert Source().settings(unit(project, "amd64"))["sections"][0]["arch_packages"] == []
    finally:
        Source.reads = ("hostname",)
    assert amd64 == arm64 == {"hostname": "one"}


@pytest.mark.skipif(os.geteuid() != 0, reason="a private mount namespace needs root")
def test_an_isolated_stage_builds_in_its_own_mount_namespace(project, tmp_path):
    point = tmp_path / "mountpoint"
    point.mkdir()

    class Mounting(Stage):
        name = "fake-mounting"
        isolated = True

        def build(self, unit, out, log):
            from hypersolid.run import run
            (out / "ns").write_text(os.readlink("/proc/self/ns/mnt"))
            (out / "pid").write_text(str(os.getpid()))
            run(["mount", "-t", "tmpfs", "tmpfs", point], log, contain=False)

    engine.STAGES["fake-mounting"] = Mounting()
    execute("fake-mounting", unit(project))
    entry = unit(project).output("fake-mounting")
    assert (entry / "ns").read_text() != os.readlink("/proc/self/ns/mnt")
    assert int((entry / "pid").read_text()) != os.getpid()
    assert str(point) not in Path("/proc/mounts").read_text()  # gone with the child


def _target_reads(module) -> set[str]:
    """Attribute names read off `unit.target`, `target` or `t` in a module."""
    names = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.Attribute):
            base = node.value
            if (isinstance(base, ast.Name) and base.id in ("t", "target")) or \
                    (isinstance(base, ast.Attribute) and base.attr == "target"):
                names.add(node.attr)
    return names


@pytest.mark.parametrize("name", ["rootfs", "resolve", "bootstrap", "configure", "squashfs", "initramfs", "bootfiles"])
def test_every_target_field_a_real_stage_reads_is_declared(name):
    """The static half of the TargetView guard: reads in the stage's module."""
    import sys
    stage = engine.STAGES[name]
    module = sys.modules[type(stage).__module__]
    fields = set(Target.__dataclass_fields__) | {"hook_files", "has_kernel", "packages_for"}
    read = _target_reads(module) & fields
    assert read <= IDENTITY | set(stage.reads) | set(stage.uses)
    assert set(stage.reads) | set(stage.uses) <= set(Target.__dataclass_fields__)


def test_a_missing_host_package_is_a_version_not_a_traceback():
    from hypersolid.dpkg import host_version
    assert host_version("hypersolid-no-such-package") == "not installed"


@pytest.mark.parametrize("package", ["multistrap", "apt-utils", "squashfs-tools", "apt", "libzstd1", "dpkg"])
def test_host_versions_read_from_dpkg_status_are_what_dpkg_query_says(package):
    from hypersolid.dpkg import host_version
    said = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True).stdout
    assert host_version(package) == (said.strip() or "not installed")
