"""`hypersolid cache gc` on the cache of a real tiny target built twice
(with `less`, then without): the second build's entries, .debs and apt
state are the last build's; the first build's are what gc takes first.

The cache is the module's own (gc empties it), its .debs hard links of the
session's shared cache, so nothing is downloaded twice."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TestProject, needs_root_and_tools, tiny_target
from hypersolid import lockfile
from hypersolid.cache import USED, Cache
from hypersolid.config import Project
from hypersolid.debproxy import store_path
from hypersolid.gc import human, last_build_items, scan

pytestmark = pytest.mark.integration
DAY = 86400


def hypersolid(p: TestProject, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYPERSOLID_CACHE": str(p.cache),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "hypersolid.cli", "-C", str(p.root), *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def entries(cache: Path) -> set[Path]:
    return {e for e in cache.glob("*/*") if e.is_dir() and len(e.name) == 32 and e.parent.name not in ("debs", "apt")}


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_cache):
    """(project, the first build's entries, the `less` .deb only it used)."""
    needs_root_and_tools()
    cache = tmp_path_factory.mktemp("gc-cache")
    if (shared_cache / "debs").is_dir():
        subprocess.run(["cp", "-al", str(shared_cache / "debs"), str(cache / "debs")], check=True)
    p = TestProject(tmp_path_factory.mktemp("gc-ws"), cache)
    p.target("tiny", tiny_target("netbase, less"))
    p.doit("bootfiles:tiny")
    first = entries(cache)
    lock = lockfile.read(p.entry("configure", "tiny") / "packages.lock")  # less: a top package
    less = store_path(cache / "debs", next(e for e in lock if e.package == "less").url)
    assert less.is_file()
    p.target("tiny", tiny_target("netbase"))
    p.doit("bootfiles:tiny")
    return p, first, less


def last_build(p: TestProject) -> set[Path]:
    return {k for k in last_build_items(Project(p.root), Cache(p.cache)) if k.exists()}


def set_last_use(paths, when: float) -> None:
    for path in paths:
        if path.is_dir():
            os.utime(path / USED, (when, when))
        else:
            os.utime(path, (when, path.stat().st_mtime))


def total(cache: Path) -> int:
    items, other = scan(Cache(cache))
    return other + sum(i.size for i in items)


def test_gc_max_age_removes_what_was_unused_for_longer_but_not_the_last_build(built):
    p, first, less = built
    kept = last_build(p)
    old = sorted(first - kept)
    assert old and less not in kept and p.entry("squashfs", "tiny") in kept
    long_ago = time.time() - 10 * DAY
    set_last_use([*old[1:], less, *kept], long_ago)  # old[0] stays recent
    result = hypersolid(p, "cache", "gc", "--max-age", "5")
    assert result.returncode == 0, result.stdout
    assert old[0].is_dir() and not any(e.exists() for e in old[1:])
    assert not less.exists() and "removed 1 .debs from debs/" in result.stdout
    assert all(k.exists() for k in kept)  # as old, but the last build's
    assert "before" in result.stdout and "after" in result.stdout


def test_gc_keeps_the_last_build_when_it_fits_and_the_next_build_is_a_no_op(built):
    p, first, _ = built
    kept = last_build(p)
    items, other = scan(Cache(p.cache), kept)
    needed = other + sum(i.size for i in items if i.kept)
    bound = needed + (1 << 20)
    assert total(p.cache) > bound  # the first build's leftovers do not fit
    result = hypersolid(p, "cache", "gc", "--max-size", str(bound))
    assert result.returncode == 0, result.stdout
    assert total(p.cache) <= bound
    assert all(k.exists() for k in kept)
    assert not (first - kept) & entries(p.cache)
    assert "still" not in result.stdout
    assert p.doit("bootfiles:tiny").executed == set()


def test_gc_below_the_last_build_removes_its_least_recently_used_and_the_build_recovers(built):
    p, _, _ = built
    kept = last_build(p)
    configure = p.entry("configure", "tiny")
    squashfs = p.entry("squashfs", "tiny")
    set_last_use(kept, time.time() - DAY)
    set_last_use([configure], time.time() - 2 * DAY)  # the least recently used
    set_last_use([squashfs], time.time())
    items, other = scan(Cache(p.cache), kept)
    size = {i.path: i.size for i in items}
    others = sum(i.size for i in items if not i.kept)
    bound = total(p.cache) - others - size[configure] // 2  # half the configure tree too much
    result = hypersolid(p, "cache", "gc", "--max-size", str(bound))
    assert result.returncode == 0, result.stdout
    assert "(last build)" in result.stdout
    assert not configure.exists() and squashfs.is_dir()
    assert total(p.cache) <= bound
    run = p.doit("bootfiles:tiny")
    assert "configure:tiny" in run.executed and "squashfs:tiny" not in run.executed  # rebuilt: the same key
    assert (p.root / "dist/tiny/system-amd64.img").is_file()


def test_gc_waits_for_a_running_build(built):
    """A build holds the cache for its whole run (here: while its pre-build
    hook runs): gc --no-wait refuses naming it; gc waits for it to end."""
    p, _, _ = built
    started = p.root / "started"
    p.write(".hooks/pre-build", f"#!/bin/sh\ntouch {started}\nsleep 4\n", mode=0o755)
    build = subprocess.Popen([sys.executable, "-m", "hypersolid.cli", "-C", str(p.root), "build", "tiny"],
                             env={**os.environ, "HYPERSOLID_CACHE": str(p.cache),
                                  "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert time.monotonic() < deadline and build.poll() is None
            time.sleep(0.1)
        refused = hypersolid(p, "cache", "gc", "--max-size", "100G", "--no-wait")
        assert refused.returncode == 2 and f"pid {build.pid}" in refused.stdout, refused.stdout
        waited = hypersolid(p, "cache", "gc", "--max-size", "100G")
        assert build.poll() == 0  # it had ended before gc could start
        assert waited.returncode == 0 and "waiting for the builds using the cache" in waited.stdout
    finally:
        build.kill()
        build.wait()
        (p.root / ".hooks/pre-build").unlink()
