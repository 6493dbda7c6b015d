"""Hostile target files, through the real commands: `hypersolid build` (the
installed console script) and plain `doit`, on a throwaway project.

Every case is bad at load time, so nothing is built: no root, no network,
and each run takes a fraction of a second.  Each asserts the exit status,
that exactly one line names the file, line and key (and no traceback), and
that the host is untouched (tests/hostile.py).  The one case that builds
is marked integration.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TestProject, needs_root_and_tools, tiny_target
from hostile import outcome, untouched_host
from hypersolid.config import Project
from hypersolid.stages import STAGES, Unit
from hypersolid.cache import Cache

SCRIPT = Path(sys.executable).with_name("hypersolid")
GOOD = tiny_target()


class Hostile(TestProject):
    __test__ = False

    def hypersolid(self, *args: str):
        env = {k: v for k, v in os.environ.items() if k != "HYPERSOLID_UUID"}
        env.update({"HYPERSOLID_CACHE": str(self.cache),
                    "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")})
        proc = subprocess.run([str(SCRIPT), *args], cwd=self.root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=600)
        return outcome(type("R", (), {"returncode": proc.returncode, "output": proc.stdout})())

    def run_doit(self, *args: str):
        return outcome(self.doit(*args, check=False, timeout=600))

    def raw(self, name: str, data: bytes) -> Path:
        path = self.root / "targets" / name / "target.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


@pytest.fixture
def project(tmp_path) -> Hostile:
    assert SCRIPT.exists(), f"{SCRIPT} is missing: ./setup.sh installs the console script"
    p = Hostile(tmp_path / "proj", tmp_path / "cache")
    p.target("tiny", GOOD)
    return p


def cycle(p: Hostile) -> None:
    p.target("a", "extends: [b]\nhostname: a\n")
    p.target("b", "abstract: false\nextends: [a]\n")


# --- one broken target does not block the others --------------------------------

def test_a_cycle_in_another_target_leaves_the_good_target_in_the_task_list(project, tmp_path):
    cycle(project)
    with untouched_host(tmp_path, project.root):
        listed = project.run_doit("list")
        built = project.run_doit("rootfs:tiny")   # the one stage that needs no root or mirror
    assert listed.status == 0, listed.output
    names = [line.split()[0] for line in listed.output.splitlines() if line.strip()]
    assert {"rootfs:tiny", "bootstrap:tiny", "squashfs:tiny", "bootfiles:tiny"} <= set(names)
    assert "Traceback" not in listed.output
    assert built.status == 0, built.output
    assert ".  rootfs:tiny" in built.output.splitlines()
    # one warning line per bad target, said once per run (not per task generator)
    built.line("hypersolid: warning: not building a", "targets/b/target.yaml:2: extends")
    built.line("hypersolid: warning: not building b", "targets/a/target.yaml:1: extends")
    assert built.output.count("hypersolid: warning:") == 2


def test_a_bad_base_is_one_warning_for_all_its_children(project, tmp_path):
    project.target("base", "abstract: true\nhostname: -bad-\n")
    for child in ("c1", "c2", "c3"):
        project.target(child, "extends: [base]\narchitectures: [amd64]\n")
    with untouched_host(tmp_path, project.root):
        result = project.run_doit("rootfs:tiny")
    assert result.status == 0, result.output
    line = result.line("targets/base/target.yaml:2: hostname")
    assert line.startswith("hypersolid: warning: not building base, c1, c2, c3 (bad target: ")


def test_a_cycle_in_the_built_target_is_one_line_and_status_2(project, tmp_path):
    cycle(project)
    with untouched_host(tmp_path, project.root):
        by_doit = project.run_doit("squashfs:a")
        by_name = project.hypersolid("build", "a")
        by_dir = project.hypersolid("build", "targets/b/")
    assert by_doit.status == 2
    by_doit.line("bad target: targets/b/target.yaml:2: extends: inheritance cycle: a -> b -> a")
    assert "squashfs:tiny" not in by_doit.output                     # nothing else ran
    assert by_name.status == 2
    assert by_name.line("targets/b/target.yaml:2", "extends") == (
        "hypersolid: build a: bad target: targets/b/target.yaml:2: extends: inheritance cycle: a -> b -> a")
    assert by_dir.status == 2
    by_dir.line("hypersolid: build targets/b/: bad target: targets/a/target.yaml:1: extends: "
                "inheritance cycle: b -> a -> b")


# --- bad values and malformed files ------------------------------------------------
# (name, the bytes of targets/t/target.yaml, line, fragment after "file:line: ")

PASSWORD_BASE = GOOD.encode()
CASES = [
    ("root-password-colon", PASSWORD_BASE + b'root_password: "$6$salt$hash:0:99999:7:::"\n', 9,
     "root_password: '$6$salt$hash:0:99999:7:::' is not a crypt(3) hash"),
    ("root-password-newline", PASSWORD_BASE + b'root_password: "$6$salt$hash\\nmallory::0:0:::::"\n', 9,
     "root_password: '$6$salt$hash\\nmallory::0:0:::::' is not a crypt(3) hash"),
    ("user-password-colon", PASSWORD_BASE + b"users:\n  - name: alice\n    password: '$y$j9T$s:alt$hash'\n", 11,
     "users[0].password: '$y$j9T$s:alt$hash' is not a crypt(3) hash"),
    ("user-password-newline", PASSWORD_BASE + b"users:\n  - name: alice\n    password: |\n"
     b"      $6$salt$hash\n      mallory::0:0:::::\n", 11, "users[0].password: '$6$salt$hash\\nmallory"),
    ("not-utf-8", b"architectures: [amd64]\n# caf\xe9\n", 2, "not UTF-8 text (byte 0xe9 at column 6)"),
    ("alias-bomb", PASSWORD_BASE + b"kernel_cmdline: &a [x, x, x, x, x, x, x, x, x]\n"
     b"description: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n", 10, "invalid YAML: alias *a:"),
    ("huge-integer", PASSWORD_BASE + b"squashfs: {level: " + b"7" * 10000 + b"}\n", 9,
     "squashfs.level: '777"),
    ("tab-indented", b"architectures:\n\t- amd64\n", 2, "invalid YAML: found character '\\t'"),
    ("empty-file", b"", 1, "architectures: required to build this target"),
    ("top-level-list", b"- architectures: [amd64]\n", 1, "expected a mapping, got a list"),
    ("deeply-nested", PASSWORD_BASE + b"kernel_cmdline: " + b"[" * 200000 + b"\n", 9,
     "invalid YAML: [ and { nested more than 64 deep"),
]


@pytest.mark.parametrize("data, line, fragment", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_a_bad_target_file_is_one_line_and_status_2(project, tmp_path, data, line, fragment):
    project.raw("t", data)
    with untouched_host(tmp_path, project.root):
        built = project.hypersolid("build", "t")
        by_doit = project.run_doit("bootfiles:t")
    where = f"targets/t/target.yaml:{line}: {fragment}"
    assert built.status == 2, built.output
    assert built.line(where).startswith("hypersolid: build t: bad target: targets/t/target.yaml:")
    assert by_doit.status == 2, by_doit.output
    assert by_doit.line(where).startswith("bad target: targets/t/target.yaml:")


def test_a_python_tag_is_refused_and_never_run(project, tmp_path):
    with untouched_host(tmp_path, project.root) as host:
        pwned = host.sentinel / "home/pwned"
        project.raw("t", PASSWORD_BASE + f"description: !!python/object/apply:os.system ['touch {pwned}']\n"
                    .encode())
        project.raw("u", f"!!python/object/apply:os.system ['touch {pwned}']\n".encode())
        built = project.hypersolid("build", "t")
        other = project.hypersolid("build", "u")
        by_doit = project.run_doit("list")
    assert built.status == 2 and other.status == 2 and by_doit.status == 0
    built.line("targets/t/target.yaml:9: description: YAML tag '!!python/object/apply:os.system' is not allowed")
    other.line("targets/u/target.yaml:1: YAML tag '!!python/object/apply:os.system' is not allowed")
    assert not pwned.exists()


def test_a_target_yaml_that_is_a_directory_is_one_line(project, tmp_path):
    (project.root / "targets/t/target.yaml").mkdir(parents=True)
    with untouched_host(tmp_path, project.root):
        built = project.hypersolid("build", "t")
        by_doit = project.run_doit("squashfs:t")
    assert built.status == 2 and by_doit.status == 2
    built.line("targets/t/target.yaml:1: cannot read target: targets/t/target.yaml is a directory")
    by_doit.line("bad target: targets/t/target.yaml:1: cannot read target")


def test_a_target_yaml_linked_to_a_host_file_is_refused(project, tmp_path):
    with untouched_host(tmp_path, project.root) as host:
        link = project.root / "targets/t/target.yaml"
        link.parent.mkdir(parents=True)
        link.symlink_to(host.sentinel / "shadow")   # host-user:$6$...: read as YAML it would even parse
        built = project.hypersolid("build", "t")
        by_doit = project.run_doit("squashfs:t")
    assert built.status == 2 and by_doit.status == 2
    line = built.line("targets/t/target.yaml:1: target.yaml resolves to")
    assert "outside targets/" in line and "host-secret" not in built.output + by_doit.output
    by_doit.line("bad target: targets/t/target.yaml:1: target.yaml resolves to")


def test_a_target_directory_that_is_a_symlink_loop_is_one_line(project, tmp_path):
    (project.root / "targets/loop").symlink_to("loop")
    with untouched_host(tmp_path, project.root):
        by_dir = project.hypersolid("build", "targets/loop/")
        listed = project.run_doit("list")
    assert by_dir.status == 2
    by_dir.line("hypersolid: build targets/loop/: targets/loop/: Symlink loop from")
    assert listed.status == 0 and "bootfiles:tiny" in listed.output and "Traceback" not in listed.output


# --- services: the last layer's word, down to the stage's settings ---------------------

def test_a_child_re_enables_a_unit_its_parent_disabled(project):
    project.target("parent", tiny_target(extra="abstract: true\nservices:\n  enable: [cron]\n"
                                               "  disable: [ssh, getty@tty1]\n"))
    project.target("child", "extends: [parent]\nservices: {enable: [ssh.service], disable: [cron]}\n")
    target = Project(project.root).load("child")
    unit = Unit(Project(project.root), target, "amd64", Cache(project.cache))
    settings = STAGES["squashfs"].settings(unit)
    assert settings["services_enable"] == ["ssh.service"]
    assert settings["services_disable"] == ["getty@tty1", "cron"]


@pytest.mark.integration
def test_hypersolid_builds_the_good_target_beside_a_cycle(tmp_path, shared_cache):
    """The issue's case: a cycle in targets/a made `hypersolid build tiny` exit 1."""
    needs_root_and_tools()
    p = Hostile(tmp_path / "proj", shared_cache)
    p.target("tiny", GOOD)
    cycle(p)
    with untouched_host(tmp_path, p.root):
        built = p.hypersolid("build", "tiny")
    assert built.status == 0, built.output
    built.line("hypersolid: warning: not building a", "targets/b/target.yaml:2: extends")
    built.line("hypersolid: warning: not building b", "targets/a/target.yaml:1: extends")
    assert "outputs in dist/tiny/:" in built.output
