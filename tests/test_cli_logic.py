"""The hypersolid command's logic that needs no build: target specs, hook
order, workspace hooks, build ids."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from hypersolid import buildid, cli, hooks
from hypersolid.config import hook_order
from hypersolid.run import HookError, Log


@pytest.fixture
def workspace(tmp_path) -> Path:
    (tmp_path / "dodo.py").write_text("")
    for name, text in (("base", "abstract: true\n"), ("rpi4", "extends: [base]\n" + textwrap.dedent("""\
            architectures: [arm64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections: [{name: debian, packages: [netbase]}]
            """))):
        (tmp_path / "targets" / name).mkdir(parents=True)
        (tmp_path / "targets" / name / "target.yaml").write_text(text)
    return tmp_path


def test_a_target_is_given_by_name_or_by_directory_with_or_without_slash(workspace, monkeypatch):
    monkeypatch.chdir(workspace / "targets")               # the workspace is found upwards
    for spec in ("rpi4", "rpi4/", "./rpi4", str(workspace / "targets/rpi4/")):
        project, target = cli.resolve(spec, None)
        assert target.name == "rpi4" and project.root == workspace
    monkeypatch.chdir("/")
    assert cli.resolve("rpi4", str(workspace))[1].name == "rpi4"


def test_unknown_abstract_or_misplaced_targets_are_usage_errors(workspace, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(workspace)
    elsewhere = tmp_path_factory.mktemp("loose")
    (elsewhere / "target.yaml").write_text("")
    for spec, message in (("nope", "no such target 'nope'"), ("base", "abstract"),
                          (str(elsewhere), "targets/<name>/ in a hypersolid workspace"),
                          ("targets/none/", "no target.yaml")):
        with pytest.raises(cli.Failure) as err:
            cli.resolve(spec, None)
        assert err.value.status == cli.USAGE and message in str(err.value)
    monkeypatch.chdir(tmp_path_factory.mktemp("empty"))
    with pytest.raises(cli.Failure, match="no hypersolid workspace"):
        cli.resolve("rpi4", None)


def test_hooks_run_in_numeric_order_then_unnumbered():
    names = ["20-b", "9-a", "100-c", "zz", "10-a", "10-0"]
    assert sorted(names, key=hook_order) == ["9-a", "10-0", "10-a", "20-b", "100-c", "zz"]


def test_workspace_hook_missing_skipped_failing_and_not_executable(tmp_path, capsys):
    log = Log(tmp_path / "hook.log", "hook")
    assert hooks.run_workspace_hook(tmp_path, "deploy", {}, log) is False
    assert "no .hooks/deploy hook, skipped" in capsys.readouterr().out
    hook = tmp_path / ".hooks/deploy"
    hook.parent.mkdir()
    hook.write_text("#!/bin/sh\necho \"to $HYPERSOLID_TARGET as $SOME_CALLER_VAR\"\nexit 3\n")
    hook.chmod(0o644)
    with pytest.raises(HookError, match=r"\.hooks/deploy is not executable"):
        hooks.run_workspace_hook(tmp_path, "deploy", {}, log)
    hook.chmod(0o755)
    os.environ["SOME_CALLER_VAR"] = "ci"                     # the caller's environment reaches it
    try:
        with pytest.raises(HookError, match="failed with exit status 3"):
            hooks.run_workspace_hook(tmp_path, "deploy", {"HYPERSOLID_TARGET": "rpi4"}, log)
    finally:
        del os.environ["SOME_CALLER_VAR"]
    assert "to rpi4 as ci" in capsys.readouterr().out
    assert "to rpi4 as ci" in log.path.read_text()


def test_a_given_build_id_is_checked(monkeypatch):
    monkeypatch.setenv(buildid.ENV, "2f1c-build.7")
    assert buildid.given() == "2f1c-build.7"
    for bad in ("two words", "a\\nb", "-leading-dash", "x" * 129):
        monkeypatch.setenv(buildid.ENV, bad)
        with pytest.raises(Exception, match="HYPERSOLID_UUID"):
            buildid.given()
    monkeypatch.setenv(buildid.ENV, "")
    assert buildid.given() is None


def test_stamp_banner_names_target_arch_and_id():
    files = buildid.stamp_files("abc", "rpi4", "arm64")
    assert files["build"] == "abc\n"
    assert files["issue"].startswith("hypersolid rpi4 (arm64) build abc\n")
