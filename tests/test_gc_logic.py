"""Cache gc without builds: the size parser, the LRU order, last-use stamps,
the accounting of a real cache directory, and the cache lock."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hypersolid import lock
from hypersolid.cache import USED, Cache, mark_file_used
from hypersolid.config import Project
from hypersolid.gc import GcError, Item, gc, human, parse_days, parse_size, plan, scan

KEY = "0123456789abcdef0123456789abcdef"


def key(n: int) -> str:
    return f"{n:032x}"


@pytest.mark.parametrize("text,size", [("10G", 10 << 30), ("500M", 500 << 20), ("1.5G", 3 << 29), ("123", 123),
                                       ("2TiB", 2 << 40), ("10gb", 10 << 30), ("64k", 64 << 10), (" 1M ", 1 << 20),
                                       ("0", 0)])
def test_size_parser_takes_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "ten", "-1G", "10X", "G", "1.2.3M", "10 G B"])
def test_size_parser_refuses_what_is_no_size(text):
    with pytest.raises(GcError, match="is not a size"):
        parse_size(text)


def test_age_parser_refuses_negative_and_words():
    assert parse_days("0.5") == 0.5
    for bad in ("-1", "x", "nan", "inf"):
        with pytest.raises(GcError, match="not a number of days"):
            parse_days(bad)


def test_human_sizes():
    assert [human(n) for n in (512, 2048, 5 << 20, 3 << 30)] == ["512B", "2.0K", "5.0M", "3.0G"]


def items() -> list[Item]:
    p = Path("/c")
    return [Item("squashfs", p / "new", 100, used=50), Item("squashfs", p / "old", 100, used=10),
            Item("debs", p / "mid.deb", 100, used=30), Item("configure", p / "last", 100, used=1, kept=True),
            Item("bootstrap", p / "last2", 100, used=5, kept=True)]


def names(doomed: list[Item]) -> list[str]:
    return [i.path.name for i in doomed]


def test_lru_removes_oldest_first_until_it_fits():
    assert names(plan(items(), 300, None, now=100)) == ["old", "mid.deb"]


def test_lru_removes_last_build_items_last():
    assert names(plan(items(), 50, None, now=100)) == ["old", "mid.deb", "new", "last", "last2"]
    assert names(plan(items(), 150, None, now=100)) == ["old", "mid.deb", "new", "last"]


def test_max_age_spares_the_last_builds_items():
    day = 86400
    aged = [Item("squashfs", Path("/c/a"), 1, used=0), Item("squashfs", Path("/c/b"), 1, used=9 * day),
            Item("configure", Path("/c/k"), 1, used=0, kept=True)]
    assert names(plan(aged, None, 5, now=10 * day)) == ["a"]
    assert names(plan(aged, 1, 5, now=10 * day)) == ["a", "b"]


def test_nothing_to_remove_when_it_fits():
    assert plan(items(), 10_000, None, now=100) == []


def published(cache: Cache, stage: str, k: str, size: int = 4096) -> Path:
    with cache.publish(stage, k, {"stage": stage}) as work:
        (work / "blob").write_bytes(os.urandom(size))
    return cache.entry(stage, k)


def test_lookup_and_publish_stamp_last_use(tmp_path):
    cache = Cache(tmp_path / "cache")
    entry = published(cache, "squashfs", KEY)
    assert (entry / USED).exists()  # publishing is a use
    os.utime(entry / USED, (1000, 1000))
    assert cache.lookup("squashfs", KEY) == entry
    assert (entry / USED).stat().st_mtime > time.time() - 60
    assert cache.lookup("squashfs", key(1)) is None
    assert not cache.entry("squashfs", key(1)).exists()  # a miss creates nothing


def test_old_entries_without_a_stamp_get_one_on_lookup(tmp_path):
    cache = Cache(tmp_path / "cache")
    entry = published(cache, "squashfs", KEY)
    (entry / USED).unlink()
    assert cache.lookup("squashfs", KEY) == entry and (entry / USED).exists()


def test_deb_use_moves_atime_not_mtime(tmp_path):
    deb = tmp_path / "a.deb"
    deb.write_bytes(b"x")
    os.utime(deb, (1000, 2000))
    mark_file_used(deb)
    st = deb.stat()
    assert st.st_mtime == 2000 and st.st_atime > time.time() - 60


def make_cache(tmp_path) -> Cache:
    cache = Cache(tmp_path / "cache")
    for n, age_days in enumerate((1, 3, 2)):
        e = published(cache, "configure", key(n), size=64 << 10)
        t = time.time() - age_days * 86400
        os.utime(e / USED, (t, t))
    deb = cache.root / "debs/deb.debian.org/debian/pool/main/n/netbase/netbase_6.4_all.deb"
    deb.parent.mkdir(parents=True)
    deb.write_bytes(os.urandom(32 << 10))
    os.utime(deb, (time.time() - 10 * 86400, time.time() - 20 * 86400))
    (cache.root / "debs/.verified.json").write_text("{}")
    (cache.root / "apt" / KEY).mkdir(parents=True)
    (cache.root / "apt" / KEY / "lists").write_bytes(os.urandom(16 << 10))
    (cache.root / "somebody-elses").mkdir()
    (cache.root / "somebody-elses/file").write_bytes(os.urandom(8 << 10))
    return cache


def test_scan_counts_entries_debs_and_apt_state_and_leaves_the_rest(tmp_path):
    cache = make_cache(tmp_path)
    found, other = scan(cache)
    kinds = sorted((i.kind, i.path.name) for i in found)
    assert kinds == [("apt", KEY), ("configure", key(0)), ("configure", key(1)), ("configure", key(2)),
                     ("debs", "netbase_6.4_all.deb")]
    deb = next(i for i in found if i.kind == "debs")
    assert time.time() - deb.used == pytest.approx(10 * 86400, abs=60)  # atime, not mtime
    assert all(i.size >= 16 << 10 for i in found) and other >= 8 << 10


def linked_entries(tmp_path) -> tuple[Cache, Path, Path]:
    """A configure entry whose big file is a hard link to its base memo's
    (delta.py), each with a small file of its own."""
    cache = Cache(tmp_path / "cache")
    base, entry = cache.entry("configure-base", key(0)), cache.entry("configure", key(1))
    for d in (base, entry):
        (d / "tree").mkdir(parents=True)
        (d / "tree/own").write_bytes(os.urandom(16 << 10))
    (base / "tree/big").write_bytes(os.urandom(1 << 20))
    os.link(base / "tree/big", entry / "tree/big")
    return cache, base, entry


def test_a_file_linked_into_two_entries_is_counted_once_and_with_the_kept_one(tmp_path):
    cache, base, entry = linked_entries(tmp_path)
    found, _ = scan(cache, kept={entry})
    size = {i.path: i.size for i in found}
    assert size[entry] > 1 << 20 > size[base]
    assert sum(size.values()) < (1 << 20) + (64 << 10)  # not twice


def test_removing_an_entry_whose_files_another_holds_frees_only_its_own(tmp_path):
    cache, base, entry = linked_entries(tmp_path)
    found, _ = scan(cache, kept={entry})
    total = sum(i.size for i in found)
    # Asked to free 100 KiB: the base goes (not kept), but frees only its own file.
    doomed = plan(found, total - (100 << 10), None, time.time())
    assert [i.path for i in doomed] == [base, entry]
    assert doomed[0].freed < 64 << 10 and doomed[1].freed > 1 << 20  # the big file goes with its last link
    assert sum(i.freed for i in doomed) == total


def test_a_deb_also_linked_outside_the_cache_shrinks_it_when_removed(tmp_path):
    cache = Cache(tmp_path / "cache")
    deb = cache.root / "debs/m.example/debian/pool/main/l/less/less_1_amd64.deb"
    deb.parent.mkdir(parents=True)
    deb.write_bytes(os.urandom(64 << 10))
    os.link(deb, tmp_path / "elsewhere.deb")  # e.g. the same .deb in another cache
    found, other = scan(cache)
    doomed = plan(found, 0, None, time.time())
    assert [i.path for i in doomed] == [deb] and doomed[0].freed == found[0].size >= 64 << 10


def workspace(tmp_path, cache: Cache, last: dict[str, str]) -> Project:
    """A workspace whose last build recorded these key files."""
    root = tmp_path / "ws"
    (root / "targets").mkdir(parents=True)
    (root / "dodo.py").write_text("")
    for stage, k in last.items():
        f = root / "build/t/amd64" / f"{stage}.key"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(k + "\n")
    return Project(root)


def test_gc_removes_least_recently_used_and_keeps_the_last_build(tmp_path):
    cache = make_cache(tmp_path)
    project = workspace(tmp_path, cache, {"configure": key(1)})  # the oldest, but the last build's
    lines = []
    before, after = gc(project, cache, parse_size("200K"), None, out=lines.append)
    assert after <= parse_size("200K") < before
    assert cache.entry("configure", key(1)).is_dir()
    assert not cache.entry("configure", key(2)).exists()  # the LRU of the others
    assert not list(cache.root.glob("debs/**/*.deb"))  # 10 days unused: older than any entry
    assert (cache.root / "somebody-elses/file").exists()
    assert not list(cache.tmp.iterdir())
    assert any(line.startswith("removed configure/" + key(2)) for line in lines)
    assert "before" in lines[-1] and "after" in lines[-1]


def test_gc_max_age_alone(tmp_path):
    cache = make_cache(tmp_path)
    project = workspace(tmp_path, cache, {"configure": key(1)})
    gc(project, cache, None, 1.5, out=lambda _: None)
    assert sorted(p.name for p in (cache.root / "configure").iterdir()) == [key(0), key(1)]


def test_gc_dry_run_removes_nothing(tmp_path):
    cache = make_cache(tmp_path)
    lines = []
    gc(workspace(tmp_path, cache, {}), cache, 0, None, dry_run=True, out=lines.append)
    assert len(list((cache.root / "configure").iterdir())) == 3
    assert sum(line.startswith("would remove") for line in lines) == 5  # 3 entries, apt, 1 line of .debs
    assert any(line.startswith("would remove 1 .debs from debs/") for line in lines)


def test_gc_needs_a_bound(tmp_path):
    cache = make_cache(tmp_path)
    with pytest.raises(GcError, match="--max-size"):
        gc(workspace(tmp_path, cache, {}), cache, None, None)


HOLD = """
import sys, time
from pathlib import Path
from hypersolid import lock
lock.share_cache(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_gc_does_not_run_under_a_running_build(tmp_path):
    """A build holds the cache shared for its run: gc waits for it, or
    with --no-wait refuses at once naming its pid."""
    cache = make_cache(tmp_path)
    build = subprocess.Popen([sys.executable, "-c", HOLD, str(cache.root), "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert build.stdout.readline() == "held\n"
        with pytest.raises(lock.Busy, match=rf"pid {build.pid}"):
            with lock.own_cache(cache.root, wait=False):
                pass
        start = time.monotonic()
        with lock.own_cache(cache.root):
            waited = time.monotonic() - start
        assert waited > 1  # until the build ended (its 3 s)
        assert build.wait(timeout=5) == 0
    finally:
        build.kill()
        build.wait()


def test_a_build_waits_for_a_running_gc(tmp_path):
    cache = make_cache(tmp_path)
    with lock.own_cache(cache.root):
        build = subprocess.Popen([sys.executable, "-c", HOLD, str(cache.root), "0"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        time.sleep(1)
        assert build.poll() is None
    out, err = build.communicate(timeout=10)
    assert out == "held\n" and "waiting for the cache gc" in err
