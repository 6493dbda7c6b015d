"""The content-addressed cache, its digests, and the doit file checker."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hypersolid.cache import Cache, canonical, describe_tree, digest_bytes, digest_file, digest_json
from hypersolid.checker import XxhashChecker

KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def cache(tmp_path) -> Cache:
    return Cache(tmp_path / "cache")


def tmp_entries(cache: Cache) -> list[str]:
    return sorted(p.name for p in cache.tmp.iterdir()) if cache.tmp.is_dir() else []


# --- publish ------------------------------------------------------------------

def test_publish_makes_the_entry_appear_only_on_success(cache):
    with cache.publish("bootstrap", KEY, {"stage": "bootstrap"}) as work:
        assert cache.lookup("bootstrap", KEY) is None
        assert work.is_dir() and not any(work.iterdir())
        assert work.parent == cache.tmp
        (work / "tree").mkdir()
        (work / "tree" / "file").write_text("content")
        assert cache.lookup("bootstrap", KEY) is None
    entry = cache.lookup("bootstrap", KEY)
    assert entry == cache.root / "bootstrap" / KEY
    assert (entry / "tree" / "file").read_text() == "content"
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["stage"] == "bootstrap" and set(manifest) == {"stage", "contents"}  # contents: entry.py
    assert not work.exists()
    assert tmp_entries(cache) == []


def test_work_directory_name_format(cache):
    with cache.publish("configure", KEY, {}) as work:
        stage_key, pid, token = work.name.split(".")
        assert stage_key == f"configure-{KEY[:12]}"
        assert int(pid) == os.getpid()
        assert len(token) == 6 and int(token, 16) >= 0


@pytest.mark.parametrize("exc", [RuntimeError("build failed"), KeyboardInterrupt(), SystemExit(1)],
                         ids=["exception", "keyboard-interrupt", "system-exit"])
def test_escaping_exception_leaves_no_entry_and_no_tmp_dir(cache, exc):
    with pytest.raises(type(exc)):
        with cache.publish("bootstrap", KEY, {}) as work:
            (work / "half").mkdir()
            (work / "half" / "built").write_text("x")
            raise exc
    assert cache.lookup("bootstrap", KEY) is None
    assert not (cache.root / "bootstrap" / KEY).exists()
    assert not work.exists()
    assert tmp_entries(cache) == []


def test_failure_with_read_only_directories_still_cleans_up(cache):
    with pytest.raises(RuntimeError):
        with cache.publish("rootfs", KEY, {}) as work:
            ro = work / "ro"
            ro.mkdir()
            (ro / "f").write_text("x")
            ro.chmod(0o555)
            raise RuntimeError
    assert tmp_entries(cache) == []


def test_publishing_the_same_key_twice_keeps_one_entry(cache):
    with cache.publish("squashfs", KEY, {"n": 1}) as work:
        (work / "out").write_text("first")
    with cache.publish("squashfs", KEY, {"n": 2}) as work:
        (work / "out").write_text("second")
    entries = list((cache.root / "squashfs").iterdir())
    assert entries == [cache.root / "squashfs" / KEY]
    entry = cache.lookup("squashfs", KEY)
    assert (entry / "out").read_text() == "first"
    assert json.loads((entry / "manifest.json").read_text())["n"] == 1
    assert sorted(p.name for p in entry.iterdir()) == [".used", "manifest.json", "out"]  # .used: last use
    assert tmp_entries(cache) == []


def test_different_keys_are_different_entries(cache):
    other = "f" * 32
    for key in (KEY, other):
        with cache.publish("rootfs", key, {"key": key}):
            pass
    assert cache.lookup("rootfs", KEY) and cache.lookup("rootfs", other)
    assert cache.lookup("bootstrap", KEY) is None


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not Path(f"/proc/{proc.pid}").exists()
    return proc.pid


def test_collect_garbage_removes_dirs_of_dead_pids_only(cache):
    cache.tmp.mkdir(parents=True)
    dead = cache.tmp / f"bootstrap-{KEY[:12]}.{_dead_pid()}.a1b2c3"
    (dead / "tree" / "etc").mkdir(parents=True)
    (dead / "tree" / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    mine = cache.tmp / f"configure-{KEY[:12]}.{os.getpid()}.d4e5f6"
    mine.mkdir()
    parent = cache.tmp / f"squashfs-{KEY[:12]}.{os.getppid()}.0f0f0f"
    parent.mkdir()
    unrelated = cache.tmp / "not-a-work-dir"
    unrelated.mkdir()

    cache.collect_garbage()

    assert not dead.exists()
    assert mine.is_dir() and parent.is_dir() and unrelated.is_dir()


def test_collect_garbage_without_tmp_dir(cache):
    cache.collect_garbage()
    assert not cache.tmp.exists()


# --- digests --------------------------------------------------------------------

def test_digest_json_is_independent_of_dict_key_order():
    a = {"arch": "amd64", "sections": [{"name": "debian", "packages": ["a", "b"]}], "n": 1}
    b = {"n": 1, "sections": [{"packages": ["a", "b"], "name": "debian"}], "arch": "amd64"}
    assert digest_json(a) == digest_json(b)
    assert canonical(a) == canonical(b)


def test_digest_json_sees_value_and_list_order_changes():
    base = {"packages": ["a", "b"], "arch": "amd64"}
    assert digest_json(base) != digest_json({"packages": ["b", "a"], "arch": "amd64"})
    assert digest_json(base) != digest_json({"packages": ["a", "b"], "arch": "arm64"})


def test_digest_file_matches_digest_bytes(tmp_path):
    f = tmp_path / "f"
    data = os.urandom(3 * (1 << 20) + 17)  # more than one chunk
    f.write_bytes(data)
    assert digest_file(f) == digest_bytes(data)
    assert len(digest_bytes(b"")) == 32


@pytest.fixture
def small_tree(tmp_path) -> Path:
    root = tmp_path / "tree"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("box\n")
    (root / "etc" / "hostname").chmod(0o644)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "tool").write_text("#!/bin/sh\n")
    (root / "usr" / "bin" / "tool").chmod(0o755)
    (root / "bin").symlink_to("usr/bin")
    return root


def test_describe_tree_lists_every_entry_relative(small_tree):
    d = describe_tree(small_tree)
    assert sorted(d) == ["bin", "etc", "etc/hostname", "usr", "usr/bin", "usr/bin/tool"]
    assert d["bin"][:2] == ["link", "usr/bin"]
    assert d["etc"][0] == "dir"
    assert d["usr/bin/tool"][:2] == ["file", 0o755]
    assert d["etc/hostname"][2] == digest_bytes(b"box\n")
    st = os.lstat(small_tree / "etc/hostname")
    assert d["etc/hostname"][-2:] == [st.st_uid, st.st_gid]


def test_describe_tree_sees_a_mode_change(small_tree):
    before = describe_tree(small_tree)
    (small_tree / "etc" / "hostname").chmod(0o600)
    after = describe_tree(small_tree)
    assert before != after
    assert before["etc/hostname"][1] == 0o644 and after["etc/hostname"][1] == 0o600
    assert before["etc/hostname"][2] == after["etc/hostname"][2]


def test_describe_tree_sees_a_directory_mode_change(small_tree):
    before = describe_tree(small_tree)
    (small_tree / "etc").chmod(0o700)
    assert describe_tree(small_tree) != before


def test_describe_tree_sees_a_content_change(small_tree):
    before = describe_tree(small_tree)
    (small_tree / "etc" / "hostname").write_text("cox\n")  # same size
    after = describe_tree(small_tree)
    assert before["etc/hostname"][2] != after["etc/hostname"][2]


def test_describe_tree_sees_owner_and_link_changes(small_tree):
    before = describe_tree(small_tree)
    os.lchown(small_tree / "usr/bin/tool", 1234, 5678)
    (small_tree / "bin").unlink()
    (small_tree / "bin").symlink_to("/usr/bin")
    after = describe_tree(small_tree)
    assert after["usr/bin/tool"][-2:] == [1234, 5678]
    assert before["bin"] != after["bin"]


def test_describe_tree_ignores_mtime(small_tree):
    before = describe_tree(small_tree)
    os.utime(small_tree / "etc" / "hostname", ns=(1, 1))
    assert describe_tree(small_tree) == before


# --- the doit checker -------------------------------------------------------------

@pytest.fixture
def dep(tmp_path) -> Path:
    f = tmp_path / "dep.yaml"
    f.write_text("hostname: one\n")
    return f


def bump_mtime(path: Path, seconds: int = 10) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_checker_unchanged_after_get_state(dep):
    checker = XxhashChecker()
    state = checker.get_state(str(dep), None)
    assert checker.check_modified(str(dep), os.stat(dep), state) is False


def test_checker_touch_without_content_change_is_not_modified(dep):
    checker = XxhashChecker()
    state = checker.get_state(str(dep), None)
    bump_mtime(dep)
    assert checker.check_modified(str(dep), os.stat(dep), state) is False


def test_checker_content_change_same_size_is_modified(dep):
    checker = XxhashChecker()
    state = checker.get_state(str(dep), None)
    dep.write_text("hostname: two\n")
    bump_mtime(dep)  # a distinct mtime even on coarse clocks
    assert checker.check_modified(str(dep), os.stat(dep), state) is True


def test_checker_content_change_other_size_is_modified(dep):
    checker = XxhashChecker()
    state = checker.get_state(str(dep), None)
    dep.write_text("hostname: three\n")
    assert checker.check_modified(str(dep), os.stat(dep), state) is True


def test_checker_without_state_is_modified(dep):
    checker = XxhashChecker()
    assert checker.check_modified(str(dep), os.stat(dep), None) is True
    assert checker.check_modified(str(dep), os.stat(dep), ["old", "md5"]) is True


def test_checker_get_state_reports_unchanged_as_none_and_refreshes_mtime(dep):
    checker = XxhashChecker()
    state = checker.get_state(str(dep), None)
    st = dep.stat()
    assert state == [st.st_mtime_ns, st.st_size, digest_file(dep)]
    assert checker.get_state(str(dep), state) is None
    bump_mtime(dep)
    fresh = checker.get_state(str(dep), state)
    assert fresh == [dep.stat().st_mtime_ns, st.st_size, state[2]]
    assert checker.check_modified(str(dep), os.stat(dep), fresh) is False
