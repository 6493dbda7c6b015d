"""The remote cache (remote.py) against a real registry (tests/registry.py):
small hand-made entries, pushed and fetched through the real client."""
from __future__ import annotations

import base64
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hypersolid import remote
from hypersolid.cache import Cache, describe_tree, digest_json
from hypersolid.entry import contents

from registry import PASSWORD, USER, Registry, free_port, registry_binary


# ---- settings ------------------------------------------------------------

def test_settings_parse_host_port_path_and_scheme():
    c = remote.config_from_env({"HYPERSOLID_REMOTE_CACHE": "oci://ghcr.io/acme/hs-cache"})
    assert (c.host, c.path, c.insecure, c.mode) == ("ghcr.io", "acme/hs-cache", False, "readwrite")
    assert c.repository("squashfs") == "acme/hs-cache/squashfs"
    c = remote.config_from_env({"HYPERSOLID_REMOTE_CACHE": "oci+http://127.0.0.1:5000/c",
                                "HYPERSOLID_REMOTE_CACHE_MODE": "read"})
    assert (c.host, c.insecure, c.mode) == ("127.0.0.1:5000", True, "read")
    assert remote.config_from_env({}) is None


@pytest.mark.parametrize("env, says", [
    ({"HYPERSOLID_REMOTE_CACHE": "https://ghcr.io/x"}, "expected oci://HOST"),
    ({"HYPERSOLID_REMOTE_CACHE": "oci://ghcr.io/Acme"}, "'Acme' is not valid"),
    ({"HYPERSOLID_REMOTE_CACHE": "oci://ghcr.io/x", "HYPERSOLID_REMOTE_CACHE_MODE": "write"}, "read or readwrite"),
    ({"HYPERSOLID_REMOTE_CACHE": "oci://ghcr.io/x", "HYPERSOLID_REMOTE_CACHE_USER": "u"},
     "HYPERSOLID_REMOTE_CACHE_USER is set but HYPERSOLID_REMOTE_CACHE_PASSWORD is not"),
    ({"HYPERSOLID_REMOTE_CACHE": "oci://ghcr.io/x", "HYPERSOLID_REMOTE_CACHE_CHUNK_MIB": "0"}, "from 1 to 1024"),
])
def test_bad_settings_are_one_line_errors(env, says):
    with pytest.raises(remote.RemoteConfigError) as err:
        remote.config_from_env(env)
    assert says in str(err.value) and "\n" not in str(err.value)


# ---- a real registry -------------------------------------------------------

@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> Path:
    return registry_binary(Path(os.environ.get("HYPERSOLID_TEST_CACHE") or tmp_path_factory.mktemp("reg-bin")))


@pytest.fixture
def reg(binary, tmp_path):
    r = Registry(binary, tmp_path / "registry").start()
    yield r
    r.stop()


def client(reg: Registry, **env) -> remote.Remote:
    return remote.Remote(remote.config_from_env({**reg.env(), **env}))


def make_entry(cache: Cache, stage: str, big: int = 0) -> str:
    """A published entry: a tree (file, symlink, hard link, empty dir, a
    setuid file) and two plain files, one `big` bytes of noise."""
    manifest = {"stage": stage, "n": os.urandom(4).hex()}
    key = digest_json(manifest)
    with cache.publish(stage, key, manifest) as work:
        tree = work / "tree"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc" / "hostname").write_text("tiny\n")
        (tree / "etc" / "link").symlink_to("hostname")
        os.link(tree / "etc" / "hostname", tree / "etc" / "hard")
        (tree / "empty").mkdir()
        (tree / "suid").write_bytes(b"#!/bin/sh\n")
        (tree / "suid").chmod(0o4755)
        (work / "small.txt").write_text("1700000000\n")
        (work / "image.img").write_bytes(os.urandom(big))
    return key


def test_an_entry_goes_up_and_comes_back_the_same(reg, tmp_path, capsys):
    here, there = Cache(tmp_path / "a"), Cache(tmp_path / "b")
    key = make_entry(here, "squashfs", big=3 << 20)
    r = client(reg, HYPERSOLID_REMOTE_CACHE_CHUNK_MIB="1")
    assert not r.has("squashfs", key)
    assert r.push(here, "squashfs", key)
    # The 3 MiB blob went up as 1 MiB chunks (bounded memory, registries that cap a chunk).
    assert reg.requests("PATCH") >= 3
    other = client(reg)
    assert other.has("squashfs", key)
    got = other.fetch(there, "squashfs", key)
    assert got == there.entry("squashfs", key)
    a, b = here.entry("squashfs", key), got
    assert describe_tree(b / "tree") == describe_tree(a / "tree")
    assert (b / "image.img").read_bytes() == (a / "image.img").read_bytes()
    assert contents(b) == contents(a)
    assert other.stats.downloaded > 3 << 20
    assert "warning" not in capsys.readouterr().err


def test_pushing_again_uploads_no_blob_the_registry_has(reg, tmp_path):
    here = Cache(tmp_path / "a")
    key = make_entry(here, "squashfs", big=1 << 20)
    assert client(reg).push(here, "squashfs", key)
    posts = reg.requests("POST")
    # Another entry whose image is the same bytes: only its other blobs go up.
    key2 = digest_json({"stage": "squashfs", "n": "other"})
    with here.publish("squashfs", key2, {"stage": "squashfs", "n": "other"}) as work:
        (work / "image.img").write_bytes((here.entry("squashfs", key) / "image.img").read_bytes())
    assert client(reg).push(here, "squashfs", key2)
    assert reg.requests("POST") == posts + 1  # the config only


def test_a_tampered_blob_is_caught_and_nothing_is_published(reg, tmp_path, capsys):
    here, there = Cache(tmp_path / "a"), Cache(tmp_path / "b")
    key = make_entry(here, "squashfs", big=200_000)
    assert client(reg).push(here, "squashfs", key)
    image = (here.entry("squashfs", key) / "image.img").read_bytes()
    stored = next(p for p in reg.blob_files().values() if p.stat().st_size == len(image))
    data = bytearray(stored.read_bytes())
    data[4096:8192] = bytes(4096)  # 4 KiB overwritten, size unchanged
    stored.write_bytes(bytes(data))
    r = client(reg)
    capsys.readouterr()
    assert r.fetch(there, "squashfs", key) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0] and "image.img" in err[0], err
    assert there.lookup("squashfs", key) is None
    assert not r.has("squashfs", key)  # counted as absent for the rest of the run: rebuilt locally


def test_a_tampered_tree_blob_is_caught_and_nothing_is_published(reg, tmp_path, capsys):
    here, there = Cache(tmp_path / "a"), Cache(tmp_path / "b")
    key = make_entry(here, "configure")
    r = client(reg)
    assert r.push(here, "configure", key)
    tree = next(d for d in json.loads(r._manifest("configure", key))["layers"]
                if d["mediaType"] == "application/vnd.hypersolid.tree.v1.tar+zstd")
    stored = reg.blob_files()[tree["digest"]]
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    capsys.readouterr()
    assert client(reg).fetch(there, "configure", key) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "configure entry" in err[0] and "not used" in err[0], err
    assert there.lookup("configure", key) is None and not list(there.tmp.glob("configure-*"))


def test_a_manifest_that_does_not_hash_to_its_tag_is_refused(reg, tmp_path, capsys):
    here, there = Cache(tmp_path / "a"), Cache(tmp_path / "b")
    key = make_entry(here, "squashfs")
    r = client(reg)
    assert r.push(here, "squashfs", key)
    # Tag another key with this (valid, complete) manifest.
    manifest = r._manifest("squashfs", key)
    wrong = "f" * 32
    put = r._request("PUT", r._url("squashfs", f"manifests/{wrong}"), data=manifest,
                     headers={"Content-Type": remote.MANIFEST_TYPE})
    assert put.status_code == 201
    assert client(reg).fetch(there, "squashfs", wrong) is None
    assert "corrupt" in capsys.readouterr().err
    assert there.lookup("squashfs", wrong) is None


def _push_one(url_env: dict, cache_root: str, key: str, queue) -> None:
    os.environ.update(url_env)
    queue.put(remote.Remote(remote.config_from_env(url_env)).push(Cache(cache_root), "configure", key))


def test_two_publishers_of_the_same_key_both_succeed(reg, tmp_path):
    here, there = Cache(tmp_path / "a"), Cache(tmp_path / "b")
    key = make_entry(here, "configure", big=2 << 20)
    queue = multiprocessing.get_context("fork").Queue()
    env = {**reg.env(), "HYPERSOLID_REMOTE_CACHE_CHUNK_MIB": "1"}
    procs = [multiprocessing.get_context("fork").Process(target=_push_one, args=(env, str(here.root), key, queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [queue.get(timeout=5), queue.get(timeout=5)] == [True, True]
    got = client(reg).fetch(there, "configure", key)
    assert got is not None and contents(got) == contents(here.entry("configure", key))


def test_read_only_mode_pushes_nothing(reg, tmp_path):
    here = Cache(tmp_path / "a")
    key = make_entry(here, "squashfs", big=10_000)
    before = reg.snapshot()
    r = client(reg, HYPERSOLID_REMOTE_CACHE_MODE="read")
    assert not r.push(here, "squashfs", key)
    assert reg.snapshot() == before
    assert reg.requests("POST") == 0 and reg.requests("PUT") == 0


def test_a_registry_that_is_down_is_one_warning_and_then_left_alone(binary, tmp_path, capsys):
    here = Cache(tmp_path / "a")
    key = make_entry(here, "squashfs")
    r = remote.Remote(remote.config_from_env({"HYPERSOLID_REMOTE_CACHE": f"oci+http://127.0.0.1:{free_port()}/c"}))
    assert not r.has("squashfs", key)
    assert not r.push(here, "squashfs", key)
    assert r.fetch(Cache(tmp_path / "b"), "squashfs", key) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach 127.0.0.1" in err[0] and "local cache only" in err[0], err


def test_a_refused_push_is_one_warning_and_reading_goes_on(binary, tmp_path, capsys):
    here = Cache(tmp_path / "a")
    key = make_entry(here, "squashfs")
    r = Registry(binary, tmp_path / "ro-registry", read_only=True).start()  # refuses every write
    try:
        c = client(r)
        assert not c.push(here, "squashfs", key)
        assert not c.push(here, "squashfs", make_entry(here, "squashfs"))  # not tried again
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "push refused" in err[0], err
        assert not c.down and not c.has("squashfs", "0" * 32)
        assert r.requests("POST") == 1
    finally:
        r.stop()


def test_wrong_credentials_are_one_warning(reg, tmp_path, capsys):
    r = client(reg, HYPERSOLID_REMOTE_CACHE_PASSWORD="wrong")
    assert not r.has("squashfs", "0" * 32)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "401" in err[0], err


def test_credentials_from_the_docker_config(reg, tmp_path, monkeypatch):
    here = Cache(tmp_path / "a")
    key = make_entry(here, "squashfs")
    docker = tmp_path / "docker"
    docker.mkdir()
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (docker / "config.json").write_text(json.dumps({"auths": {reg.address: {"auth": token}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    r = remote.Remote(remote.config_from_env({"HYPERSOLID_REMOTE_CACHE": reg.url()}))
    assert r.push(here, "squashfs", key) and r.has("squashfs", key)


def test_credentials_from_a_docker_credential_helper(reg, tmp_path, monkeypatch):
    here = Cache(tmp_path / "a")
    key = make_entry(here, "squashfs")
    bindir, docker = tmp_path / "bin", tmp_path / "docker"
    bindir.mkdir()
    docker.mkdir()
    helper = bindir / "docker-credential-hstest"
    asked = tmp_path / "asked"
    # The credential-helper protocol: `get` reads the server on stdin, prints JSON.
    helper.write_text(f"#!/bin/sh\ncat > {asked}\n"
                      f"echo '{{\"ServerURL\":\"x\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}'\n")
    helper.chmod(0o755)
    (docker / "config.json").write_text(json.dumps({"credHelpers": {reg.address: "hstest"}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    r = remote.Remote(remote.config_from_env({"HYPERSOLID_REMOTE_CACHE": reg.url()}))
    assert r.push(here, "squashfs", key)
    assert asked.read_text().strip() == reg.address


def test_one_file_of_an_entry_comes_without_its_tree(reg, tmp_path):
    here, there = Cache(tmp_path / "a"), Cache(tmp_path / "b")
    key = make_entry(here, "bootstrap", big=100_000)
    assert client(reg).push(here, "bootstrap", key)
    r = client(reg)
    path = r.fetch_file(there, "bootstrap", key, "small.txt")
    assert path.read_text() == "1700000000\n"
    assert there.lookup("bootstrap", key) is None  # no half entry
    # config + small.txt only: not the tree, not the image.
    assert r.stats.downloaded < 2000
    assert r.fetch_file(there, "bootstrap", key, "tree") is None  # a tree is never a lone file


def test_the_registry_binary_is_the_distribution_registry(binary):
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout
    assert "2.8" in out


def test_a_bad_setting_stops_hypersolid_build_with_exit_2(tmp_path):
    env = {**os.environ, "HYPERSOLID_REMOTE_CACHE": "oci://ghcr.io/acme", "HYPERSOLID_REMOTE_CACHE_MODE": "write"}
    proc = subprocess.run([sys.executable, "-m", "hypersolid.cli", "build", "tiny"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("hypersolid: build tiny: HYPERSOLID_REMOTE_CACHE_MODE=write: "
                                   "expected read or readwrite")
