"""The CI recipes in docs/ci/ and `hypersolid list --json` they fan out from:
every `hypersolid ...` line parses with the real command-line parser, every
`doit ...` line names real doit commands or tasks of this checkout, and the
GitLab generator writes a child pipeline of such jobs."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from hypersolid import cli
from hypersolid.config import Project
from hypersolid.stages import Unit, planned_keys

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "docs/ci").glob("*.yml"))
SHELL_KEYS = ("run", "script", "before_script", "after_script")
DOIT_COMMANDS = {"run", "list", "info", "clean", "forget", "ignore", "dumpdb", "strace", "tabcompletion",
                 "auto", "help", "reset-dep"}
COMMAND = re.compile(r"(?:^|(?<=[\s;&|(/]))(hypersolid|doit)[ \t]+([^;&|<>\n]*)")


def env(tmp_path) -> dict:
    return {**os.environ, "HYPERSOLID_CACHE": str(tmp_path / "cache"),
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def listing(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("list")
    out = subprocess.run([sys.executable, "-m", "hypersolid.cli", "-C", str(REPO), "list", "--json"],
                         env=env(tmp), check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def task_names(tmp_path_factory) -> set[str]:
    """Every task and subtask `doit list --all` shows in this checkout."""
    tmp = tmp_path_factory.mktemp("tasks")
    out = subprocess.run([sys.executable, "-m", "doit", "list", "--all", "-q"], cwd=REPO, env=env(tmp),
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def shell_texts(node) -> list[str]:
    """The shell of every run:/script: in a parsed workflow or pipeline."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in SHELL_KEYS:
                found += [v] if isinstance(v, str) else [s for s in v if isinstance(s, str)]
            else:
                found += shell_texts(v)
    elif isinstance(node, list):
        for v in node:
            found += shell_texts(v)
    return found


def commands(text: str, matrix: list[dict]) -> list[tuple[str, list[str]]]:
    """(program, argv) of each hypersolid/doit command in shell text, once per
    matrix row when it uses the row's values (${{ matrix.x }}, $HS_DOIT)."""
    text = re.sub(r"<<'(\w+)'\n.*?\n *\1\b", "", text, flags=re.S)  # a here-document is not shell
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    out = []
    for program, rest in COMMAND.findall(text):
        for row in matrix:
            line = re.sub(r"\$\{\{\s*matrix\.(\w+)\s*\}\}", lambda m: row[m.group(1)], rest)
            line = line.replace("$HS_DOIT", row["doit"])
            line = re.sub(r"\$\{\{[^}]*\}\}|\$\{?\w+\}?", "x", line)
            out.append((program, shlex.split(line)))
    return out


def check_commands(found, task_names: set[str]) -> None:
    for program, argv in found:
        if program == "hypersolid":
            try:
                cli.parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"`hypersolid {shlex.join(argv)}` does not parse")
        else:
            words = [a for a in argv if not a.startswith("-")]
            if words and words[0] in DOIT_COMMANDS:
                words = words[1:]
            unknown = [w for w in words if w not in task_names]
            assert not unknown, f"`doit {shlex.join(argv)}`: no such task {unknown}"


def test_there_are_both_recipes():
    assert [p.name for p in RECIPES] == ["github-actions.yml", "gitlab-ci.yml"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_command_in_a_recipe_exists(recipe, listing, task_names):
    data = yaml.safe_load(recipe.read_text())
    found = [c for text in shell_texts(data) for c in commands(text, listing["matrix"])]
    programs = {p for p, _ in found}
    assert programs == {"hypersolid", "doit"}
    assert ("hypersolid", ["list", "--json"]) in found
    assert any(p == "hypersolid" and argv[:2] == ["cache", "export"] for p, argv in found)
    check_commands(found, task_names)


def test_github_matrix_comes_from_the_list_and_untrusted_runs_read_only():
    data = yaml.safe_load((REPO / "docs/ci/github-actions.yml").read_text())
    jobs = data["jobs"]
    assert jobs["build"]["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    assert "--privileged" in jobs["build"]["container"]["options"]
    assert "github.ref_protected" in data["env"]["HYPERSOLID_REMOTE_CACHE_MODE"]
    assert data["env"]["HYPERSOLID_REMOTE_CACHE"].startswith("oci://ghcr.io/")
    uploads = [s for s in jobs["build"]["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    assert uploads and uploads[0]["with"]["path"] == "${{ matrix.dist }}"


def test_gitlab_generator_writes_one_job_per_target_and_arch(tmp_path, listing, task_names):
    """Runs the plan job's generator on the real list and checks the child pipeline."""
    data = yaml.safe_load((REPO / "docs/ci/gitlab-ci.yml").read_text())
    script = "\n".join(data["plan"]["script"])
    generator = textwrap.dedent(re.search(r"<<'PY'\n(.*?)\n *PY\b", script, re.S).group(1))
    (tmp_path / "list.json").write_text(json.dumps(listing))
    subprocess.run([sys.executable, "-c", generator], cwd=tmp_path, check=True,
                   env={**os.environ, "HYPERSOLID_REMOTE_CACHE_MODE": "read"})
    child = yaml.safe_load((tmp_path / "build-pipeline.yml").read_text())
    assert len(child) == len(listing["matrix"]) > 1
    for job in child.values():
        assert job["variables"]["HYPERSOLID_REMOTE_CACHE_MODE"] == "read"
        row = {"doit": job["variables"]["HS_DOIT"]}
        check_commands([c for s in job["script"] for c in commands(s, [row])], task_names)
        assert job["artifacts"]["paths"][0].startswith("dist/")
    assert data["workflow"]["rules"][0]["variables"]["HYPERSOLID_REMOTE_CACHE_MODE"] == "readwrite"
    assert "PROTECTED" in data["workflow"]["rules"][0]["if"]


def test_list_json_has_every_target_arch_its_tasks_and_planned_keys(tmp_path, listing, task_names):
    project = Project(REPO)
    names = [t.name for t in project.buildable()]
    assert [t["name"] for t in listing["targets"]] == names
    rows = {(m["target"], m["arch"]) for m in listing["matrix"]}
    assert rows == {(t.name, a) for t in project.buildable() for a in t.architectures}
    for t in listing["targets"]:
        target = project.load(t["name"])
        for a in t["architectures"]:
            unit = Unit(project, target, a["arch"], cli.Cache(tmp_path / "cache"))
            assert a["keys"] == planned_keys(unit)
            assert set(a["tasks"].values()) <= task_names
            assert not any(a["cached"].values())  # an empty cache


def test_plain_list_is_a_table(tmp_path):
    out = subprocess.run([sys.executable, "-m", "hypersolid.cli", "-C", str(REPO), "list"], env=env(tmp_path),
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    assert out.splitlines()[0].split()[:3] == ["TARGET", "ARCH", "DOIT"]
    assert re.search(r"^qemu-amd64 +amd64 +bootfiles:qemu-amd64 ", out, re.M)
