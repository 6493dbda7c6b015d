"""The `hypersolid` command, run as the installed console script on a small
real target: every verb, stage hooks across two inherited targets,
workspace hooks and their environment, the build id, exit codes.

The module has its own cache (seeded with the shared downloads): `clean
--cache` drops entries, which must not pull the rug from other modules.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import TestProject, mounts, needs_root_and_tools, tiny_target
from hypersolid.cache import describe_tree, digest_json

pytestmark = pytest.mark.integration

SCRIPT = Path(sys.executable).with_name("hypersolid")
ENV_RECORDER = """\
#!/bin/sh
# Records what a workspace hook gets.
env | grep '^HYPERSOLID_' | sort > "$HYPERSOLID_WORKSPACE/{name}.env"
"""
STAGE_RECORDER = """\
#!/bin/sh
echo "$HYPERSOLID_HOOK $(basename "$0") $HYPERSOLID_ARCH" >> {where}/etc/hs-hooks
"""


@dataclass
class Result:
    status: int
    out: str
    err: str

    @property
    def executed(self) -> set[str]:
        return set(re.findall(r"^\.  (\S+)$", self.out, re.M))


class Workspace(TestProject):
    __test__ = False

    def hypersolid(self, *args: str, stdin: str | None = None, env: dict | None = None,
                   cwd: Path | None = None) -> Result:
        full = {k: v for k, v in os.environ.items() if k != "HYPERSOLID_UUID"}
        full.update({"HYPERSOLID_CACHE": str(self.cache), **(env or {})})
        proc = subprocess.run([str(SCRIPT), *args], cwd=cwd or self.root, env=full, input=stdin,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=1800)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def env_file(self, name: str) -> dict[str, str]:
        lines = (self.root / f"{name}.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines)

    def build_info(self, target: str = "child") -> dict:
        return json.loads((self.root / f"dist/{target}/build-amd64.json").read_text())


def cat_image(image: Path, path: str) -> str:
    return subprocess.run(["unsquashfs", "-cat", str(image), path], check=True,
                          stdout=subprocess.PIPE, text=True).stdout


@pytest.fixture(scope="module")
def ws(tmp_path_factory, shared_cache) -> Workspace:
    """`parent` (abstract) and `child` extends it, both with stage hooks;
    `other` extends child: the same packages and hooks, so the same bootstrap
    and configure entries, but its own image."""
    needs_root_and_tools()
    assert SCRIPT.exists(), f"{SCRIPT} is missing: ./setup.sh installs the console script"
    cache = tmp_path_factory.mktemp("cli-cache")
    if (shared_cache / "debs").is_dir():  # no second download of the same packages
        subprocess.run(["cp", "-al", str(shared_cache / "debs"), str(cache / "debs")], check=True)
    w = Workspace(tmp_path_factory.mktemp("workspace"), cache)
    w.target("parent", tiny_target(extra="abstract: true\n"))
    w.target("child", "extends: [parent]\nhostname: child\n")
    w.target("other", "extends: [child]\nhostname: other\n")  # child's packages and hooks
    hooks = {"post-bootstrap": '"$HYPERSOLID_TREE"', "pre-configure": "", "post-configure": ""}
    for kind, where in hooks.items():
        for layer, name in (("parent", "10-parent"), ("child", "9-child"), ("child", "20-child"),
                            ("parent", "30-parent")):
            w.write(f"targets/{layer}/hooks/{kind}.d/{name}", STAGE_RECORDER.format(where=where), 0o755)
    w.write("targets/child/hooks/post-build.d/50-record",
            "#!/bin/sh\nenv | grep '^HYPERSOLID_' | sort > \"$HYPERSOLID_DIST/post-build-$HYPERSOLID_ARCH.env\"\n",
            0o755)
    for name in ("pre-build", "post-build", "codesigning", "deploy"):
        w.write(f".hooks/{name}", ENV_RECORDER.format(name=name), 0o755)
    w.built = w.hypersolid("build", "targets/child/")  # a path, as the original tool took
    return w


def test_build_runs_every_stage_through_doit_and_says_where_outputs_are(ws):
    assert ws.built.status == 0, ws.built.out + ws.built.err
    assert {"bootstrap:child", "configure:child", "squashfs:child", "bootfiles:child"} <= ws.built.executed
    assert "hypersolid: stage timings" in ws.built.out
    assert re.search(r"^  configure:child +\d+\.\d+s  ok$", ws.built.out, re.M)
    assert "outputs in dist/child/:" in ws.built.out
    assert re.search(r"^  system-amd64\.img +\d+\.\d+ MB$", ws.built.out, re.M)
    # The same build again, by name: nothing to do.
    again = ws.hypersolid("build", "child")
    assert again.status == 0 and again.executed == set()


def test_stage_hooks_run_in_numeric_order_across_inherited_targets(ws):
    image = ws.root / "dist/child/system-amd64.img"
    order = [line.split()[:2] for line in cat_image(image, "etc/hs-hooks").splitlines()]
    per_kind = ["9-child", "10-parent", "20-child", "30-parent"]
    assert order == ([["post-bootstrap", n] for n in per_kind] + [["pre-configure", n] for n in per_kind]
                     + [["post-configure", n] for n in per_kind])
    assert cat_image(image, "etc/hs-hooks").split()[2] == "amd64"   # HYPERSOLID_ARCH
    post_build = dict(line.split("=", 1) for line in
                      (ws.root / "dist/child/post-build-amd64.env").read_text().splitlines())
    assert post_build["HYPERSOLID_DIST"] == str(ws.root / "dist/child")
    assert post_build["HYPERSOLID_BUILD_ID"] == ws.build_info()["build_id"]
    assert post_build["HYPERSOLID_TARGET"] == "child" and post_build["HYPERSOLID_HOOK"] == "post-build"


def test_each_hook_is_an_input_of_its_own_stage_only(ws):
    post_build = ws.root / "targets/child/hooks/post-build.d/50-record"
    post_configure = ws.root / "targets/parent/hooks/post-configure.d/30-parent"
    originals = {p: p.read_text() for p in (post_build, post_configure)}
    try:
        post_build.write_text(originals[post_build] + "# edited\n")
        assert ws.hypersolid("build", "child").executed == {"bootfiles:child"}
        post_configure.write_text(originals[post_configure] + "# edited\n")
        # squashfs runs the post-configure hooks; configure is left alone
        assert ws.hypersolid("build", "child").executed == {"squashfs:child", "sbom:child", "bootfiles:child"}
    finally:
        for path, text in originals.items():
            path.write_text(text)
        assert ws.hypersolid("build", "child").status == 0  # back to the first entries


def test_workspace_hooks_get_target_architectures_dist_and_build_id(ws):
    info = ws.build_info()
    build_id = info["build_id"]
    assert info["build_id_from"] == "inputs" and re.fullmatch(r"[0-9a-f-]{36}", build_id)
    for name in ("pre-build", "post-build"):
        env = ws.env_file(name)
        assert env["HYPERSOLID_TARGET"] == "child"
        assert env["HYPERSOLID_ARCHITECTURES"] == "amd64"
        assert env["HYPERSOLID_DIST"] == str(ws.root / "dist/child")
        assert env["HYPERSOLID_BUILD_ID"] == build_id       # known before the build, too
        assert env["HYPERSOLID_WORKSPACE"] == str(ws.root)
    # In the image: /etc/hypersolid_build links to what bootfiles appended.
    assert cat_image(ws.root / "dist/child/system-amd64.img", ".hypersolid/build") == build_id + "\n"


def test_sign_and_deploy_run_their_hooks_on_the_built_target(ws):
    for verb, hook in (("sign", "codesigning"), ("deploy", "deploy")):
        (ws.root / f"{hook}.env").unlink(missing_ok=True)
        result = ws.hypersolid(verb, "child")
        assert result.status == 0, result.err
        env = ws.env_file(hook)
        assert env["HYPERSOLID_TARGET"] == "child" and env["HYPERSOLID_ARCHITECTURES"] == "amd64"
        assert env["HYPERSOLID_DIST"] == str(ws.root / "dist/child")
        assert env["HYPERSOLID_BUILD_ID"] == ws.build_info()["build_id"]
        assert f"hypersolid: running .hooks/{hook}" in result.out


def test_update_with_a_given_build_id_rebuilds_only_bootfiles_then_signs_and_deploys(ws):
    for verb, given in (("update", "ci-run-41"), ("build-deploy", "ci-run-42")):
        result = ws.hypersolid(verb, "child", env={"HYPERSOLID_UUID": given})
        assert result.status == 0, result.out + result.err
        assert result.executed == {"bootfiles:child"}          # the cache is not defeated
        assert ws.env_file("codesigning")["HYPERSOLID_BUILD_ID"] == given
        assert ws.env_file("deploy")["HYPERSOLID_BUILD_ID"] == given
        assert ws.build_info()["build_id"] == given and ws.build_info()["build_id_from"] == "HYPERSOLID_UUID"
        image = ws.root / "dist/child/system-amd64.img"
        assert cat_image(image, ".hypersolid/build") == given + "\n"
        assert cat_image(image, ".hypersolid/issue").startswith(f"hypersolid child (amd64) build {given}")
    # Without it, the derived id is back, from the same cache entries.
    result = ws.hypersolid("build", "child")
    assert result.executed == {"bootfiles:child"} and ws.build_info()["build_id_from"] == "inputs"


def test_a_missing_workspace_hook_is_skipped_with_a_notice(ws):
    hook = ws.root / ".hooks/codesigning"
    text = hook.read_text()
    hook.unlink()
    try:
        result = ws.hypersolid("sign", "child")
    finally:
        ws.write(".hooks/codesigning", text, 0o755)
    assert result.status == 0
    assert "hypersolid: no .hooks/codesigning hook, skipped" in result.out


def test_a_failing_or_non_executable_workspace_hook_fails_the_command_with_status_3(ws):
    with ws.temporary(".hooks/deploy", "#!/bin/sh\necho deploying; exit 4\n", 0o755):
        failed = ws.hypersolid("deploy", "child")
    assert "deploying" in (ws.root / "build/child/logs/hook-deploy.log").read_text()
    with ws.temporary(".hooks/deploy", "#!/bin/sh\ntrue\n", 0o644):
        not_executable = ws.hypersolid("deploy", "child")
    ws.write(".hooks/deploy", ENV_RECORDER.format(name="deploy"), 0o755)
    assert failed.status == 3
    assert "deploying" in failed.out                     # its output is shown as it runs
    assert failed.err.count("\n") == 1                   # one message: what, command, log
    assert "hook .hooks/deploy failed with exit status 4" in failed.err
    assert f"command: {ws.root}/.hooks/deploy" in failed.err
    assert "log: build/child/logs/hook-deploy.log" in failed.err
    assert not_executable.status == 3
    assert "hook .hooks/deploy is not executable (chmod +x it)" in not_executable.err


def test_a_failing_stage_hook_names_stage_hook_status_and_log_with_status_3(ws):
    with ws.temporary("targets/child/hooks/post-build.d/60-fail", "#!/bin/sh\nexit 5\n", 0o755):
        result = ws.hypersolid("build", "child")
    assert result.status == 3
    assert result.err.count("\n") == 1
    assert ("stage bootfiles:child failed: hook targets/child/hooks/post-build.d/60-fail "
            "failed with exit status 5") in result.err
    assert "log: build/child/amd64/logs/bootfiles.log" in result.err
    assert not (ws.root / "post-build.env").read_text() == ""   # recorded earlier, untouched
    assert ws.hypersolid("build", "child").status == 0


def test_a_non_executable_stage_hook_stops_the_stage_before_its_work(ws):
    with ws.temporary("targets/parent/hooks/post-bootstrap.d/40-notexec", "#!/bin/sh\ntrue\n", 0o644):
        result = ws.hypersolid("build", "child")
    assert result.status == 3
    assert ("stage bootstrap:child failed: hook targets/parent/hooks/post-bootstrap.d/40-notexec "
            "is not executable (chmod +x it)") in result.err
    log = (ws.root / "build/child/amd64/logs/bootstrap.log").read_text()
    assert "multistrap" not in log                          # refused before the download
    after = ws.hypersolid("build", "child")                 # hook gone: the old entries again
    assert after.status == 0 and "configure:child" not in after.executed


def test_a_failing_stage_command_exits_1_with_stage_command_and_log(ws):
    ws.target("broken", "extends: [parent]\nhostname: broken\n"
              "sections:\n  - name: debian\n    packages: [hs-no-such-package]\n")
    result = ws.hypersolid("build", "broken")
    assert result.status == 1
    message = result.err.strip()
    assert "\n" not in message
    # the package set is resolved (apt) before anything is unpacked
    assert message.startswith("hypersolid: build broken: stage resolve:broken failed: apt cannot resolve the "
                              "package set: E: Unable to locate package hs-no-such-package")
    assert message.endswith("; log: build/broken/amd64/logs/resolve.log")
    shutil.rmtree(ws.root / "targets/broken")


def test_attach_runs_stdin_in_the_configured_tree_and_leaves_the_cache_entry_alone(ws):
    entry = ws.cache / "configure" / (ws.root / "build/child/amd64/configure.key").read_text().strip()
    before = digest_json(describe_tree(entry))
    result = ws.hypersolid("attach", "child", stdin=(
        "cat /etc/debian_version\n"
        "grep -c pre-configure /etc/hs-hooks\n"       # the configured tree, hooks applied
        "echo changed > /etc/attach-was-here && cat /etc/attach-was-here\n"
        "exit 7\n"))
    assert result.status == 7, result.err                # the shell's own status
    assert "configure:child" in result.err               # doit's lines are not in the shell's output
    lines = result.out.split()
    assert re.fullmatch(r"12\.\d+", lines[0]) and lines[1] == "4" and lines[2] == "changed"
    assert digest_json(describe_tree(entry)) == before
    assert not (entry / "tree/etc/attach-was-here").exists()
    assert not list((ws.root / "build/child/amd64/attach").iterdir())
    assert not any("/attach/" in m for m in mounts())
    assert ws.hypersolid("attach", "child", "--arch", "arm64").status == 2


def test_clean_removes_only_the_named_targets_outputs_and_cache_entries(ws):
    assert ws.hypersolid("build", "other").status == 0
    key = lambda t, s: (ws.root / f"build/{t}/amd64/{s}.key").read_text().strip()  # noqa: E731
    shared = {s: key("other", s) for s in ("bootstrap", "configure")}
    assert shared == {s: key("child", s) for s in shared}     # same packages: same entries
    others_image = ws.cache / "squashfs" / key("other", "squashfs")
    childs_image = ws.cache / "squashfs" / key("child", "squashfs")

    result = ws.hypersolid("clean", "other")
    assert result.status == 0 and "removed dist/other/" in result.out
    assert not (ws.root / "dist/other").exists() and (ws.root / "dist/child/system-amd64.img").exists()
    assert others_image.is_dir()                             # plain clean keeps the cache

    result = ws.hypersolid("clean", "--cache", "targets/other")
    assert result.status == 0, result.err
    assert not others_image.exists() and childs_image.is_dir()
    assert all((ws.cache / s / k).is_dir() for s, k in shared.items())   # child still uses them
    kept = result.out.split("kept shared: ")[1]
    for what in ("apt", "bootstrap", "configure"):  # apt: the resolver's state of their one source set
        assert f"{what} (also child)" in kept
    assert ws.hypersolid("build", "child").executed == set()              # child untouched
    rebuilt = ws.hypersolid("build", "other")                # key files gone: stages run again,
    assert rebuilt.status == 0                               # finding the kept entries
    for stage, outcome in (("bootstrap", "cache hit"), ("configure", "cache hit"), ("squashfs", "ok")):
        assert re.search(rf"^  {stage}:other +\d+\.\d+s  {outcome}$", rebuilt.out, re.M), rebuilt.out


def test_usage_errors_exit_2_with_one_line(ws):
    for args, expected in ((["build", "nope"], "no such target 'nope'"),
                           (["build", "parent"], "target parent is abstract"),
                           (["sign", "targets/nowhere/"], "no target.yaml in")):
        result = ws.hypersolid(*args)
        assert result.status == 2 and expected in result.err and result.err.count("\n") == 1
    version = ws.hypersolid("--version")
    assert version.status == 0 and version.out.startswith("hypersolid 0.")
    assert "build-deploy" in ws.hypersolid("--help").out
    # From a subdirectory the workspace is found; -C names it from elsewhere.
    assert ws.hypersolid("build", "child", cwd=ws.root / "targets").status == 0
    assert ws.hypersolid("-C", str(ws.root), "build", "child", cwd=Path("/")).status == 0
