#!/usr/bin/env python3
"""Measure the portable cache (issue #12) of one target, side by side in one run.

    sudo .venv/bin/python bench/cache.py [--target qemu-amd64] [--repeat 3] [--keep]

In a scratch checkout with a fresh cache (see bench/incremental.py): the
cold build to dist/ (per stage), the no-op build, what verifying each entry
a running stage consumes costs next to that stage, `hypersolid cache
export` (time, archive size), `hypersolid cache import` into an empty cache,
and a fresh checkout building from the imported cache (time, and whether
anything but bootfiles ran), and a fresh machine with a warm remote cache:
a real registry (tests/registry.py) is filled from the cold build's cache
(`push`), then a fresh checkout with an empty cache builds from it (time
to dist/, bytes it downloaded, stages whose entries it fetched; --no-remote
skips this); last, the cache's size on disk after the one
build (.debs and apt state included) and after `hypersolid cache gc
--max-size X` with X = what the last build's entries take: what a no-op
build needs, so it stays a no-op while the .debs and the apt state (used
first, so least recently) go.  Prints a table and one JSON line; the load
average is printed with them, since the machine may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from incremental import doit, make_checkout  # noqa: E402  (the same checkouts and timed doit)

sys.path.insert(0, str(REPO / "tests"))
from registry import Registry, registry_binary  # noqa: E402  (the tests' real registry)

# Which stage's run consumes which entry (Unit.output), to compare the
# verification with the work it guards.
CONSUMERS = {"rootfs": "squashfs", "bootstrap": "configure", "configure": "squashfs",
             "squashfs": "bootfiles", "initramfs": "bootfiles"}


def hypersolid(checkout: Path, cache: Path, *args: str) -> tuple[float, str]:
    env = {**os.environ, "HYPERSOLID_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "hypersolid.cli", "-C", str(checkout), *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"bench: hypersolid {' '.join(args)} failed:\n{proc.stdout}")
    return seconds, proc.stdout


def verification(checkout: Path, cache: Path, target: str) -> dict[str, dict]:
    """Per entry the target's build used: seconds to verify it (a separate
    process, as a build would: no memo), its size, the consuming stage."""
    script = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from hypersolid import entry\n"
        "out = {}\n"
        "for stage, key in json.loads(sys.argv[1]):\n"
        "    path = Path(sys.argv[2]) / stage / key\n"
        "    start = time.monotonic()\n"
        "    problems = entry.verify(stage, key, path)\n"
        "    out[stage] = [time.monotonic() - start, problems]\n"
        "print(json.dumps(out))\n")
    keys = sorted({(f.stem, f.read_text().strip()) for f in (checkout / "build" / target).rglob("*.key")
                   if f.stem in CONSUMERS})
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(keys), str(cache)], check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    timed = json.loads(proc.stdout)
    result = {}
    for stage, key in keys:
        seconds, problems = timed[stage]
        if problems:
            sys.exit(f"bench: {stage}/{key} does not verify: {problems}")
        size = sum(p.stat().st_size for p in (cache / stage / key).rglob("*") if p.is_file() and not p.is_symlink())
        result[stage] = {"seconds": round(seconds, 2), "mb": round(size / 1e6, 1), "consumer": CONSUMERS[stage]}
    return result


def cache_sizes(checkout: Path, cache: Path) -> tuple[int, int]:
    """(bytes on disk of the whole cache, of the last build's entries alone:
    no .debs, no apt state), as gc counts them."""
    from hypersolid.cache import Cache
    from hypersolid.config import Project
    from hypersolid.gc import APT, DEBS, last_build_items, scan
    items, other = scan(Cache(cache), last_build_items(Project(checkout), Cache(cache)))
    return (other + sum(i.size for i in items),
            other + sum(i.size for i in items if i.kept and i.kind not in (DEBS, APT)))


def gc_rows(checkout: Path, cache: Path, task: str) -> dict:
    """The cache after the one build, and after gc to its entries' size."""
    before, entries_only = cache_sizes(checkout, cache)
    seconds, out = hypersolid(checkout, cache, "cache", "gc", "--max-size", str(entries_only))
    after, _ = cache_sizes(checkout, cache)
    _, executed, _ = doit(checkout, cache, task)
    return {"size_after_one_build_mb": round(before / 1e6, 1), "gc_max_size_mb": round(entries_only / 1e6, 1),
            "size_after_gc_mb": round(after / 1e6, 1), "gc_seconds": round(seconds, 2),
            "noop_after_gc_executed": sorted(executed), "gc_said": out.strip().splitlines()[-1]}


def measure(target: str, args, scratch: Path) -> dict:
    task = f"bootfiles:{target}"
    cache = scratch / "cache"
    checkout = make_checkout(scratch / "checkout")
    rows: dict[str, float] = {}
    rows["cold"], cold_stages, _ = doit(checkout, cache, task)
    rows["noop"] = statistics.median(doit(checkout, cache, task)[0] for _ in range(args.repeat))

    verified = verification(checkout, cache, target)
    for stage, v in verified.items():
        consumer = next((s for k, s in cold_stages.items() if k.split(":")[0] == v["consumer"]), None)
        v["consumer_seconds"] = consumer
        v["vs_consumer"] = round(v["seconds"] / consumer, 3) if consumer else None

    archive = scratch / "export" / "cache.tar"
    archive.parent.mkdir()
    rows["export"], _ = hypersolid(checkout, cache, "cache", "export", str(archive), target)
    imported = scratch / "imported-cache"
    rows["import"], _ = hypersolid(checkout, imported, "cache", "import", str(archive))

    clone = make_checkout(scratch / "clone")
    rows["fresh_clone_after_import"], clone_stages, output = doit(clone, imported, task)
    built = [m[1] for m in re.finditer(r"^  (\S+)\s+[\d.]+s  (ok|FAILED)$", output, re.M)]
    remote = warm_remote(checkout, cache, task, scratch, args) if args.remote else {}
    if remote:
        rows["push_to_remote"] = remote.pop("push_seconds")
        rows["fresh_machine_warm_remote"] = remote.pop("fresh_seconds")
        remote["fresh_machine_vs_cold"] = round(rows["fresh_machine_warm_remote"] / rows["cold"], 3)
    gc = gc_rows(checkout, cache, task)  # last: it removes the .debs
    return {
        **remote,
        "gc": gc,
        "target": target, "seconds": {k: round(v, 2) for k, v in rows.items()}, "cold_stages": cold_stages,
        "verify": verified, "archive_mb": round(archive.stat().st_size / 1e6, 1),
        "cache_mb": round(sum(p.stat().st_size for p in cache.rglob("*")
                              if p.is_file() and not p.is_symlink() and p.parts[len(cache.parts)] != "debs") / 1e6, 1),
        "fresh_clone_built": built,
        "fresh_clone_vs_cold": round(rows["fresh_clone_after_import"] / rows["cold"], 3),
    }


def warm_remote(checkout: Path, cache: Path, task: str, scratch: Path, args) -> dict:
    """Fill a local registry from the built cache (a second checkout: every
    stage a local hit, pushed), then build in a fresh checkout with an empty
    cache from the registry alone."""
    binary = registry_binary(Path(os.environ.get("HYPERSOLID_TEST_CACHE") or scratch))
    reg = Registry(binary, scratch / "registry").start()
    try:
        env = reg.env()
        push_seconds, _, _ = doit(make_checkout(scratch / "pusher"), cache, task, caller=env)
        fetched_before = len(_blob_gets(reg))
        fresh = make_checkout(scratch / "fresh-machine")
        fresh_seconds, _, output = doit(fresh, scratch / "fresh-machine-cache", task, caller=env)
        gets = _blob_gets(reg)[fetched_before:]
        built = sorted(p.stem for p in (fresh / "build").rglob("logs/*.log") if "# built in" in p.read_text())
        same = all((fresh / "dist" / p.relative_to(checkout / "dist")).read_bytes() == p.read_bytes()
                   for p in (checkout / "dist").rglob("*") if p.is_file() and p.suffix in (".img", ".cpio"))
    finally:
        reg.stop()
    by_stage: dict[str, int] = {}
    for repo, size in gets:
        by_stage[repo.rsplit("/", 1)[-1]] = by_stage.get(repo.rsplit("/", 1)[-1], 0) + size
    return {"push_seconds": push_seconds, "fresh_seconds": fresh_seconds,
            "fresh_machine_downloaded_mb": round(sum(by_stage.values()) / 1e6, 1),
            "fresh_machine_downloaded_by_stage_mb": {k: round(v / 1e6, 2) for k, v in sorted(by_stage.items())},
            "fresh_machine_built": built,  # resolve and bootfiles are not cached: they always run
            "fresh_machine_images_identical": same,
            "fresh_machine_warnings": [line for line in output.splitlines() if "warning" in line]}


def _blob_gets(reg: Registry) -> list[tuple[str, int]]:
    """(repository, bytes) of each blob the registry served (its access log)."""
    return [(m[0], int(m[1])) for m in re.findall(r'"GET /v2/(\S+)/blobs/sha256:[0-9a-f]+ HTTP/[0-9.]+" 200 (\d+)',
                                                  reg.log_path.read_text())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", help="target to measure (repeatable; default: qemu-amd64)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the no-op build (median)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--no-remote", dest="remote", action="store_false",
                        help="skip the fresh machine with a warm remote cache")
    args = parser.parse_args()
    targets = args.target or ["qemu-amd64"]
    load_before = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="hypersolid-bench-cache-"))
    try:
        results = [measure(t, args, scratch / t) for t in targets]
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    load_after = os.getloadavg()

    print(f"\nhypersolid cache benchmark (seconds; no-op: median of {args.repeat}); "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"{'measurement':<30}" + "".join(f"{r['target']:>14}" for r in results))
    for row in results[0]["seconds"]:
        print(f"{row:<30}" + "".join(f"{r['seconds'].get(row, float('nan')):>14.2f}" for r in results))
    for key in ("archive_mb", "cache_mb", "fresh_clone_vs_cold", "fresh_machine_vs_cold",
                "fresh_machine_downloaded_mb"):
        if key in results[0]:
            print(f"{key:<30}" + "".join(f"{r[key]:>14}" for r in results))
    for r in results:
        for stage, v in r["verify"].items():
            print(f"{r['target']}: verify {stage} ({v['mb']} MB): {v['seconds']:.2f}s; its consumer "
                  f"{v['consumer']} took {v['consumer_seconds']}s cold: {v['vs_consumer']}")
        print(f"{r['target']}: fresh clone after import built: {', '.join(r['fresh_clone_built']) or 'nothing'}")
        if "fresh_machine_downloaded_by_stage_mb" in r:
            print(f"{r['target']}: fresh machine, warm remote: downloaded (MB) "
                  f"{r['fresh_machine_downloaded_by_stage_mb']}; built {', '.join(r['fresh_machine_built'])}; "
                  f"images identical: {r['fresh_machine_images_identical']}; warnings: {r['fresh_machine_warnings']}")
        g = r["gc"]
        print(f"{r['target']}: cache size after one build {g['size_after_one_build_mb']} MB; after gc --max-size "
              f"X = {g['gc_max_size_mb']} MB (the last build's entries, no .debs/apt state): {g['size_after_gc_mb']} MB "
              f"in {g['gc_seconds']}s; no-op after gc executed: {', '.join(g['noop_after_gc_executed']) or 'nothing'}")
    print(json.dumps({"results": results, "load": [load_before, load_after]}, sort_keys=True))


if __name__ == "__main__":
    main()
