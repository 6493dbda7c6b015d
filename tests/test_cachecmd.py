"""`hypersolid cache verify|export|import` on a workspace whose key files
point at small published entries (no build, no network; unpacking a tree
keeps owners, so root)."""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from hypersolid import cli, entry
from hypersolid.cache import Cache, digest_json
from hypersolid.cachecmd import used_entries
from hypersolid.config import Project

TARGET = "architectures: [amd64]\nsuite: bookworm\nmirror: http://deb.debian.org/debian\n" \
         "sections:\n  - name: debian\n    packages: [netbase]\n"


def publish(cache: Cache, stage: str, n: int) -> str:
    manifest = {"stage": stage, "n": n}
    key = digest_json(manifest)
    with cache.publish(stage, key, manifest) as work:
        (work / "tree").mkdir()
        (work / "tree" / "file").write_text(f"{stage} {n}\n")
        (work / "packages.tsv").write_text(f"{n}\n")
    return key


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """Workspace with targets a and b; a's last build used bootstrap and
    configure entries, b's only a configure entry; one more entry nobody uses."""
    root = tmp_path / "ws"
    for t in ("a", "b"):
        (root / "targets" / t).mkdir(parents=True)
        (root / "targets" / t / "target.yaml").write_text(TARGET)
    (root / "dodo.py").write_text("")
    cache = Cache(tmp_path / "cache")
    monkeypatch.setenv("HYPERSOLID_CACHE", str(cache.root))
    keys = {"a/bootstrap": publish(cache, "bootstrap", 1), "a/configure": publish(cache, "configure", 1),
            "b/configure": publish(cache, "configure", 2), "unused": publish(cache, "configure", 3)}
    for name, key in keys.items():
        if "/" in name:
            target, stage = name.split("/")
            (root / "build" / target / "amd64").mkdir(parents=True, exist_ok=True)
            (root / "build" / target / "amd64" / f"{stage}.key").write_text(key + "\n")
    (root / "build" / "a" / "amd64" / "resolve.key").write_text("f" * 32 + "\n")  # uncached: not an entry
    return root, cache, keys


def hs(root: Path, *args: str) -> int:
    return cli.main(["-C", str(root), *args])


def test_used_entries_are_the_key_files_of_the_targets_last_builds(ws):
    root, cache, keys = ws
    project = Project(root)
    assert used_entries(project) == [("bootstrap", keys["a/bootstrap"]),
                                     *sorted([("configure", keys["a/configure"]), ("configure", keys["b/configure"])])]
    assert used_entries(project, ["b"]) == [("configure", keys["b/configure"])]


def test_verify_checks_the_used_entries_removes_a_bad_one_and_exits_1(ws, capsys):
    root, cache, keys = ws
    bad = cache.entry("configure", keys["a/configure"])
    (bad / "tree" / "file").write_text("tampered\n")
    (cache.entry("configure", keys["unused"]) / "packages.tsv").write_text("tampered, unused\n")
    assert hs(root, "cache", "verify") == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f"hypersolid: cache verify: configure/{keys['a/configure']}: tree/ differs from its record "
                   "(a file changed, was added or removed, or a mode or owner changed): removed",
                   out[-1]]
    assert out[-1].startswith("hypersolid: cache verify: 3 entries checked, 1 bad (")
    assert not bad.exists() and cache.entry("configure", keys["unused"]).exists()
    assert hs(root, "cache", "verify", "--all") == 1  # now the unused one too
    assert not cache.entry("configure", keys["unused"]).exists()
    assert hs(root, "cache", "verify", "--all") == 0


def test_export_then_import_into_an_empty_cache_gives_the_same_entries(ws, tmp_path, monkeypatch, capsys):
    if os.geteuid() != 0:
        pytest.skip("unpacking trees keeps their owners: root")
    root, cache, keys = ws
    archive = tmp_path / "out" / "cache.tar"
    archive.parent.mkdir()
    assert hs(root, "cache", "export", str(archive), "a") == 0
    assert oct(archive.stat().st_mode & 0o777) == "0o644"
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        index = json.loads(tar.extractfile("index.json").read())
    assert names[0] == "oci-layout" and names[-1] == "index.json"
    assert [d["annotations"]["org.opencontainers.image.ref.name"] for d in index["manifests"]] == [
        f"bootstrap/{keys['a/bootstrap']}", f"configure/{keys['a/configure']}"]

    other = Cache(tmp_path / "other")
    monkeypatch.setenv("HYPERSOLID_CACHE", str(other.root))
    assert hs(root, "cache", "import", str(archive)) == 0
    for stage, key in (("bootstrap", keys["a/bootstrap"]), ("configure", keys["a/configure"])):
        assert entry.contents(other.entry(stage, key)) == entry.contents(cache.entry(stage, key))
        assert entry.verify(stage, key, other.entry(stage, key)) == []
    assert other.lookup("configure", keys["b/configure"]) is None
    assert hs(root, "cache", "import", str(archive)) == 0
    assert "0 entries imported, 2 already here" in capsys.readouterr().out


def test_a_damaged_archive_imports_nothing_of_the_damaged_entry(ws, tmp_path, monkeypatch, capsys):
    if os.geteuid() != 0:
        pytest.skip("unpacking trees keeps their owners: root")
    root, cache, keys = ws
    archive = tmp_path / "cache.tar"
    assert hs(root, "cache", "export", str(archive), "b") == 0
    with tarfile.open(archive) as tar:  # flip one byte of the packages.tsv blob
        member = next(m for m in tar.getmembers() if m.isfile() and m.size == len("2\n"))
    data = bytearray(archive.read_bytes())
    data[member.offset_data] ^= 1
    archive.write_bytes(bytes(data))
    other = Cache(tmp_path / "other")
    monkeypatch.setenv("HYPERSOLID_CACHE", str(other.root))
    assert hs(root, "cache", "import", str(archive)) == 1
    err = capsys.readouterr().err
    assert f"not imported: configure/{keys['b/configure']}: packages.tsv: sha256 is" in err
    assert other.lookup("configure", keys["b/configure"]) is None


def test_usage_errors_are_one_line_with_status_2(ws, tmp_path, capsys):
    root, cache, keys = ws
    assert hs(root, "cache", "export", str(tmp_path / "x.tar"), "nosuch") == 2
    assert capsys.readouterr().err == "hypersolid: cache export: nosuch: no such target " \
                                      "(no targets/nosuch/target.yaml)\n"
    assert hs(root, "cache", "import", str(tmp_path / "missing.tar")) == 2
    assert "missing.tar: no such file" in capsys.readouterr().err
    (tmp_path / "junk.tar").write_text("not a tar")
    assert hs(root, "cache", "import", str(tmp_path / "junk.tar")) == 2
    assert "not a readable tar archive" in capsys.readouterr().err
    assert hs(root, "cache", "export", str(tmp_path / "no-such-dir" / "x.tar")) == 1
    err = capsys.readouterr().err
    assert err.startswith("hypersolid: cache export: No such file or directory: ") and err.count("\n") == 1


def test_verify_says_how_many_entries_predate_contents_records(ws, capsys):
    root, cache, keys = ws
    path = cache.entry("configure", keys["b/configure"])
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["contents"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert hs(root, "cache", "verify") == 0
    assert "3 entries checked, 0 bad, 1 from before contents records (only their keys checked)" in \
        capsys.readouterr().out
