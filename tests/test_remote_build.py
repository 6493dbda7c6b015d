"""Builds with a remote cache on a real registry (tests/registry.py): one
tiny target is built and pushed once; fresh checkouts with empty caches
then build from it."""
from __future__ import annotations

import json
import re
import urllib.request
import base64
from pathlib import Path

import pytest

from conftest import TestProject, needs_root_and_tools, tiny_target
from registry import PASSWORD, USER, Registry, free_port, registry_binary

pytestmark = pytest.mark.integration

TREE_TYPE = "application/vnd.hypersolid.tree.v1.tar+zstd"


@pytest.fixture(scope="module")
def reg(tmp_path_factory, shared_cache):
    r = Registry(registry_binary(shared_cache), tmp_path_factory.mktemp("registry")).start()
    yield r
    r.stop()


def checkout(root: Path, cache: Path) -> TestProject:
    p = TestProject(root, cache)
    p.target("tiny", tiny_target())
    return p


@pytest.fixture(scope="module")
def warm(tmp_path_factory, shared_cache, reg) -> TestProject:
    """The first machine: builds (or finds in its cache) and pushes every entry."""
    needs_root_and_tools()
    p = checkout(tmp_path_factory.mktemp("first"), shared_cache)
    result = p.doit("bootfiles:tiny", env=reg.env())
    assert "warning" not in result.output, result.output
    return p


def manifest(reg: Registry, stage: str, key: str) -> dict:
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    req = urllib.request.Request(f"http://{reg.address}/v2/cache/{stage}/manifests/{key}",
                                 headers={"Authorization": f"Basic {auth}",
                                          "Accept": "application/vnd.oci.image.manifest.v1+json"})
    return json.loads(urllib.request.urlopen(req).read())


def fetched_blobs(reg: Registry) -> list[tuple[str, str, int]]:
    """(repository, digest, bytes) of every blob GET in the registry's access log."""
    return [(m[0], m[1], int(m[2])) for m in re.findall(
        r'"GET /v2/(\S+)/blobs/(sha256:[0-9a-f]+) HTTP/[0-9.]+" 200 (\d+)', reg.log_path.read_text())]


def test_a_fresh_clone_with_a_warm_remote_builds_nothing_and_fetches_no_tree(warm, reg, tmp_path):
    before = len(fetched_blobs(reg))
    fresh = checkout(tmp_path / "fresh", tmp_path / "empty-cache")
    result = fresh.doit("bootfiles:tiny", env=reg.env())
    assert "warning" not in result.output, result.output
    assert {"bootstrap:tiny", "configure:tiny", "squashfs:tiny", "bootfiles:tiny"} <= result.executed
    logs = fresh.root / "build/tiny/amd64/logs"
    for stage, tool in (("bootstrap", "multistrap"), ("configure", "dpkg"), ("squashfs", "mksquashfs")):
        text = (logs / f"{stage}.log").read_text()
        assert "# remote cache hit" in text and tool not in text.replace("# remote cache hit", ""), text
    # Only image-sized and small blobs came down: no bootstrap or configure tree.
    trees = {layer["digest"] for stage in ("bootstrap", "configure")
             for layer in manifest(reg, stage, warm.key(stage, "tiny"))["layers"] if layer["mediaType"] == TREE_TYPE}
    got = fetched_blobs(reg)[before:]
    assert trees and not trees & {d for _, d, _ in got}, got
    assert not (fresh.cache / "bootstrap").exists() and not (fresh.cache / "configure").exists()
    assert (fresh.root / "dist/tiny/system-amd64.img").read_bytes() == \
        (warm.root / "dist/tiny/system-amd64.img").read_bytes()
    assert fresh.doit("bootfiles:tiny", env=reg.env()).executed == set()


def test_the_no_op_build_asks_the_registry_nothing(warm, reg):
    def asked() -> int:
        log = reg.log_path.read_text()
        return log.count('"HEAD /v2/') + log.count('"GET /v2/')
    before = asked()
    assert warm.doit("bootfiles:tiny", env=reg.env()).executed == set()
    assert asked() == before


def test_read_only_mode_pushes_nothing(warm, reg, tmp_path):
    """A checkout whose stages run (local hits here) would push them to an
    empty repository path; read-only, the registry's storage stays as it was."""
    before = reg.snapshot()
    p = checkout(tmp_path / "ro", warm.cache)
    p.doit("bootfiles:tiny", env=reg.env(path="readonly", HYPERSOLID_REMOTE_CACHE_MODE="read"))
    assert reg.snapshot() == before


def test_a_registry_that_is_down_costs_one_warning(warm, tmp_path):
    p = checkout(tmp_path / "down", warm.cache)
    env = {"HYPERSOLID_REMOTE_CACHE": f"oci+http://127.0.0.1:{free_port()}/cache"}
    result = p.doit("bootfiles:tiny", env=env)
    warnings = [line for line in result.output.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "cannot reach" in warnings[0], result.output
    assert (p.root / "dist/tiny/system-amd64.img").exists()


def test_a_tampered_image_in_the_registry_is_rebuilt_not_delivered(warm, reg, tmp_path):
    layer = next(d for d in manifest(reg, "squashfs", warm.key("squashfs", "tiny"))["layers"]
                 if d["annotations"]["org.opencontainers.image.title"] == "system-amd64.img")
    stored = reg.blob_files()[layer["digest"]]
    with open(stored, "r+b") as f:
        f.seek(8192)
        f.write(bytes(4096))
    fresh = checkout(tmp_path / "fresh2", tmp_path / "empty-cache2")
    result = fresh.doit("bootfiles:tiny", env=reg.env())
    warnings = [line for line in result.output.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "corrupt" in warnings[0] and "squashfs" in warnings[0], result.output
    assert "mksquashfs" in (fresh.root / "build/tiny/amd64/logs/squashfs.log").read_text()
    # Built again here, the same bytes as the first machine delivered (not the tampered ones).
    assert (fresh.root / "dist/tiny/system-amd64.img").read_bytes() == \
        (warm.root / "dist/tiny/system-amd64.img").read_bytes()
