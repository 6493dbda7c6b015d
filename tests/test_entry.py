"""Entries as checkable, movable data (entry.py): the contents record,
verification, the memo, a corrupt entry rebuilt where it is consumed, and
pack/unpack on small trees.  Fast; the round trip with device nodes, xattrs
and ACLs is in test_entry_tree.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import hypersolid.stages as engine
from hypersolid import entry
from hypersolid.cache import Cache, digest_json
from hypersolid.config import Project
from hypersolid.stages import Stage, Unit, execute

MANIFEST = {"stage": "configure", "settings": {"hostname": "one"}}
KEY = digest_json(MANIFEST)


@pytest.fixture
def cache(tmp_path) -> Cache:
    return Cache(tmp_path / "cache")


def publish(cache: Cache, manifest: dict = MANIFEST) -> Path:
    with cache.publish(manifest["stage"], digest_json(manifest), manifest) as work:
        (work / "tree" / "etc").mkdir(parents=True)
        (work / "tree" / "etc" / "hostname").write_text("one\n")
        (work / "tree" / "etc" / "motd").write_text("hello\n")
        os.symlink("hostname", work / "tree" / "etc" / "name")
        (work / "packages.tsv").write_text("netbase\t6.4\n")
    return cache.entry(manifest["stage"], digest_json(manifest))


# --- the contents record ---------------------------------------------------------

def test_publish_records_a_digest_per_item_and_the_key_still_checks(cache):
    path = publish(cache)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["contents"] == entry.contents(path)
    assert manifest["contents"]["packages.tsv"]["size"] == len("netbase\t6.4\n")
    assert manifest["contents"]["tree"]["type"] == "tree"
    assert entry.key_of(manifest) == KEY


def test_dot_names_and_the_manifest_are_not_content(cache):
    path = publish(cache)
    (path / ".used").touch()
    assert set(entry.contents(path)) == {"packages.tsv", "tree"}
    assert entry.verify("configure", KEY, path) == []


def test_an_intact_entry_verifies(cache):
    assert entry.verify("configure", KEY, publish(cache)) == []


@pytest.mark.parametrize("damage, expected", [
    (lambda p: (p / "tree/etc/motd").unlink(), "tree/ differs from its record"),
    (lambda p: (p / "tree/etc/motd").write_text("hellO\n"), "tree/ differs from its record"),
    (lambda p: (p / "tree/etc/motd").chmod(0o600), "tree/ differs from its record"),
    (lambda p: os.chown(p / "tree/etc/motd", 1, 1) if os.geteuid() == 0 else pytest.skip("root"),
     "tree/ differs from its record"),
    (lambda p: (p / "tree/etc/new").write_text(""), "tree/ differs from its record"),
    (lambda p: (p / "tree").chmod(0o700), "tree/ differs from its record"),
    (lambda p: (p / "packages.tsv").write_text("netbase\t6.5\n"), "packages.tsv's content differs from its record"),
    (lambda p: (p / "packages.tsv").write_text(""), "packages.tsv has 0 bytes, recorded 12"),
    (lambda p: (p / "packages.tsv").unlink(), "packages.tsv is missing"),
    (lambda p: (p / "stray").write_text(""), "stray is not in the record"),
    (lambda p: (p / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda p: (p / "manifest.json").write_text("{"), "manifest.json cannot be read"),
], ids=["file-deleted", "file-changed", "mode", "owner", "file-added", "tree-root-mode", "item-changed",
        "item-truncated", "item-deleted", "item-added", "no-manifest", "bad-manifest"])
def test_damage_is_named(cache, damage, expected):
    path = publish(cache)
    damage(path)
    problems = entry.verify("configure", KEY, path)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_a_manifest_edited_to_other_inputs_no_longer_matches_its_key(cache):
    path = publish(cache)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["settings"]["hostname"] = "two"
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert entry.verify("configure", KEY, path) == [
        f"manifest.json hashes to {entry.key_of(manifest)}, not to its key"]


def test_an_entry_from_before_contents_records_has_only_its_key_checked(cache):
    path = publish(cache)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["contents"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "packages.tsv").write_text("changed")
    assert entry.verify("configure", KEY, path) == []


def test_only_checks_the_manifest_and_one_item(cache):
    path = publish(cache)
    (path / "tree/etc/motd").write_text("changed\n")
    assert entry.verify("configure", KEY, path, only="packages.tsv") == []
    assert entry.verify("configure", KEY, path, only="tree") != []


def test_checked_remembers_a_good_entry_for_this_process_only(cache, monkeypatch):
    monkeypatch.setattr(entry, "_verified", set())
    path = publish(cache)
    assert entry.checked("configure", KEY, path) == []
    (path / "packages.tsv").write_text("changed later")
    assert entry.checked("configure", KEY, path) == []  # the memo: no second hash in one build
    assert entry.verify("configure", KEY, path) != []   # a new process (no memo) sees it


def test_discard_removes_the_entry_and_forgets_it(cache, monkeypatch):
    monkeypatch.setattr(entry, "_verified", set())
    path = publish(cache)
    entry.checked("configure", KEY, path)
    entry.discard(cache, "configure", KEY)
    assert not path.exists() and list(cache.tmp.iterdir()) == []
    assert entry._verified == set()


# --- a corrupt entry consumed by a running stage --------------------------------

class Source(Stage):
    name = "fake-source"
    reads = ("hostname",)
    builds = 0

    def build(self, unit, out, log):
        type(self).builds += 1
        (out / "value").write_text(unit.target.hostname)


class Sink(Stage):
    name = "fake-sink"
    upstream = ("fake-source",)

    def build(self, unit, out, log):
        (out / "copy").write_text((unit.output("fake-source") / "value").read_text())


@pytest.fixture
def unit(tmp_path, monkeypatch) -> Unit:
    monkeypatch.setattr(engine, "STAGES", {s.name: s for s in (Source(), Sink())})
    monkeypatch.setattr(entry, "_verified", set())
    Source.builds = 0
    project = Project(tmp_path / "project")
    (project.root / "targets/t").mkdir(parents=True)
    (project.root / "targets/t/target.yaml").write_text(
        "architectures: [amd64]\nsuite: bookworm\nmirror: http://deb.debian.org/debian\n"
        "sections:\n  - name: debian\n    packages: [netbase]\nhostname: one\n")
    from hypersolid.config import clear_caches
    clear_caches()
    return Unit(project, project.load("t"), "amd64", Cache(tmp_path / "cache"))


def test_a_corrupt_upstream_entry_is_removed_with_one_warning_and_rebuilt(unit, capsys):
    key = execute("fake-source", unit)["key"]
    entry._verified.clear()  # a later build process
    (unit.cache.entry("fake-source", key) / "value").write_text("two")
    execute("fake-sink", unit)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"hypersolid: warning: cache entry fake-source/{key} is corrupt")
    assert "value's content differs" in err[0]
    assert Source.builds == 2
    assert (unit.output("fake-sink") / "copy").read_text() == "one"
    assert entry.verify("fake-source", key, unit.cache.entry("fake-source", key)) == []


def test_a_good_upstream_entry_is_used_as_it_is(unit, capsys):
    execute("fake-source", unit)
    execute("fake-sink", unit)
    assert Source.builds == 1 and capsys.readouterr().err == ""


# --- pack and unpack --------------------------------------------------------------

def blobs_by_digest(blobs):
    return {b.digest: b.path for b in blobs}


def test_pack_is_one_oci_manifest_config_first_layers_by_name_same_bytes_twice(cache, tmp_path):
    publish(cache)
    manifest_bytes, blobs = entry.pack(cache, "configure", KEY, tmp_path / "blobs")
    again, _ = entry.pack(cache, "configure", KEY, tmp_path / "blobs2")
    assert manifest_bytes == again
    manifest = json.loads(manifest_bytes)
    assert manifest["mediaType"] == entry.MANIFEST_TYPE and manifest["schemaVersion"] == 2
    assert manifest["annotations"] == {entry.STAGE_ANNOTATION: "configure", entry.KEY_ANNOTATION: KEY}
    assert manifest["config"]["mediaType"] == entry.CONFIG_TYPE
    assert blobs[0].path.read_bytes() == (cache.entry("configure", KEY) / "manifest.json").read_bytes()
    assert [(l["annotations"][entry.TITLE], l["mediaType"]) for l in manifest["layers"]] == [
        ("packages.tsv", entry.FILE_TYPE), ("tree", entry.TREE_TYPE)]
    assert blobs[1].path == cache.entry("configure", KEY) / "packages.tsv"  # a file: referenced in place
    assert blobs[2].path.parent == tmp_path / "blobs" / "sha256"


def test_unpack_publishes_an_equal_entry(cache, tmp_path):
    path = publish(cache)
    os.utime(path / ".used", (1000, 1000))  # bookkeeping, not content: not packed
    manifest_bytes, blobs = entry.pack(cache, "configure", KEY, tmp_path / "blobs")
    other = Cache(tmp_path / "other")
    by = blobs_by_digest(blobs)
    out = entry.unpack(other, "configure", KEY, manifest_bytes, lambda d: entry.file_chunks(by[d["digest"]]))
    assert out == other.entry("configure", KEY)
    assert (out / "manifest.json").read_bytes() == (path / "manifest.json").read_bytes()
    assert entry.contents(out) == entry.contents(path)
    assert (out / ".used").stat().st_mtime > 1000  # its own publish, a use here


def _tampered(blobs, tmp_path, title):
    """open_blob serving a copy of one blob with one byte changed."""
    by = blobs_by_digest(blobs)
    bad = next(b for b in blobs if b.title == title)
    copy = tmp_path / "tampered"
    data = bytearray(bad.path.read_bytes())
    data[len(data) // 2] ^= 1
    copy.write_bytes(bytes(data))
    return lambda d: entry.file_chunks(copy if d["digest"] == bad.digest else by[d["digest"]])


@pytest.mark.parametrize("title", ["tree", "packages.tsv", "manifest.json"])
def test_a_tampered_blob_is_caught_and_nothing_is_published(cache, tmp_path, title):
    publish(cache)
    manifest_bytes, blobs = entry.pack(cache, "configure", KEY, tmp_path / "blobs")
    other = Cache(tmp_path / "other")
    with pytest.raises(entry.Corrupt, match="sha256 is|bytes|zstd|not"):
        entry.unpack(other, "configure", KEY, manifest_bytes, _tampered(blobs, tmp_path, title))
    assert other.lookup("configure", KEY) is None
    assert not other.tmp.exists() or [p.name for p in other.tmp.iterdir() if not p.name.startswith("entry-log")] == []


def test_a_manifest_for_another_key_is_refused(cache, tmp_path):
    publish(cache)
    manifest_bytes, blobs = entry.pack(cache, "configure", KEY, tmp_path / "blobs")
    by = blobs_by_digest(blobs)
    other_key = "0" * 32
    with pytest.raises(entry.Corrupt, match="annotated as"):
        entry.unpack(Cache(tmp_path / "o"), "configure", other_key, manifest_bytes,
                     lambda d: entry.file_chunks(by[d["digest"]]))
    unannotated = json.loads(manifest_bytes)
    del unannotated["annotations"]
    with pytest.raises(entry.Corrupt, match="does not hash to the key"):
        entry.unpack(Cache(tmp_path / "o"), "configure", other_key, json.dumps(unannotated).encode(),
                     lambda d: entry.file_chunks(by[d["digest"]]))


@pytest.mark.parametrize("title", ["../escape", ".used", "manifest.json", "a/b", ""])
def test_a_layer_name_that_is_not_a_plain_item_is_refused(cache, tmp_path, title):
    publish(cache)
    manifest_bytes, blobs = entry.pack(cache, "configure", KEY, tmp_path / "blobs")
    manifest = json.loads(manifest_bytes)
    manifest["layers"][0]["annotations"][entry.TITLE] = title
    with pytest.raises(entry.Corrupt, match="a layer named"):
        entry.unpack(Cache(tmp_path / "o"), "configure", KEY, json.dumps(manifest).encode(),
                     lambda d: entry.file_chunks(blobs_by_digest(blobs)[d["digest"]]))


def test_contents_that_differ_from_the_record_are_refused(cache, tmp_path):
    """Blobs that hash right but do not hold what the config records (a
    packer bug, or a manifest naming other blobs): nothing published."""
    path = publish(cache)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["contents"]["packages.tsv"]["digest"] = "0" * 32
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    manifest_bytes, blobs = entry.pack(cache, "configure", KEY, tmp_path / "blobs")
    other = Cache(tmp_path / "other")
    with pytest.raises(entry.Corrupt, match="packages.tsv's content differs"):
        entry.unpack(other, "configure", KEY, manifest_bytes,
                     lambda d: entry.file_chunks(blobs_by_digest(blobs)[d["digest"]]))
    assert other.lookup("configure", KEY) is None


def test_an_entry_this_process_just_built_is_not_hashed_again_by_its_consumer(unit, monkeypatch):
    key = execute("fake-source", unit)["key"]
    calls = []
    monkeypatch.setattr(entry, "verify", lambda *a: calls.append(a) or [])
    execute("fake-sink", unit)
    assert calls == [] and (unit.cache.entry("fake-source", key)).is_dir()


def test_an_entry_this_run_published_is_not_hashed_again_in_another_worker(cache, monkeypatch):
    monkeypatch.setattr(entry, "_verified", set())
    monkeypatch.setattr(entry, "_published", None)
    entry.start_run(cache.tmp)  # the main process, before doit forks its workers
    path = publish(cache)
    entry.remember("configure", KEY)
    monkeypatch.setattr(entry, "_verified", set())  # another worker process: no memo of its own
    calls = []
    monkeypatch.setattr(entry, "verify", lambda *a: calls.append(a) or ["damaged"])
    assert entry.checked("configure", KEY, path) == [] and calls == []
    entry.discard(cache, "configure", KEY)  # a discarded entry is not vouched for any more
    assert not (entry._published / f"configure-{KEY}").exists()
    monkeypatch.setattr(entry, "_published", None)
    monkeypatch.setattr(entry, "_verified", set())
    assert entry.checked("configure", KEY, publish(cache)) == ["damaged"]  # the next run hashes it


def test_a_failing_pack_names_tar_and_its_log_and_leaves_no_partial_blob(tmp_path):
    from hypersolid.run import BuildError, Log
    log = Log(tmp_path / "pack.log", "cache")
    with pytest.raises(BuildError) as caught:
        entry.pack_tree(tmp_path / "no-such-tree", tmp_path / "blobs", log)
    assert caught.value.command[0] == "tar" and caught.value.log == log.path
    assert "status 2" in caught.value.message and "no-such-tree" in (tmp_path / "pack.log").read_text()
    assert list((tmp_path / "blobs" / "sha256").iterdir()) == []


def test_an_unpack_whose_tar_fails_publishes_nothing(cache, tmp_path):
    from hypersolid.run import BuildError
    publish(cache)
    manifest_bytes, blobs = entry.pack(cache, "configure", KEY, tmp_path / "blobs")
    tree = next(b for b in blobs if b.title == "tree")
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not zstd at all" * 100)
    manifest = json.loads(manifest_bytes)
    layer = next(l for l in manifest["layers"] if l["digest"] == tree.digest)
    layer["size"] = garbage.stat().st_size  # right size, wrong bytes: tar fails before the digest is known
    by = blobs_by_digest(blobs)
    other = Cache(tmp_path / "other")
    with pytest.raises((BuildError, entry.Corrupt)):
        entry.unpack(other, "configure", KEY, json.dumps(manifest).encode(),
                     lambda d: entry.file_chunks(garbage if d["digest"] == tree.digest else by[d["digest"]]))
    assert other.lookup("configure", KEY) is None
