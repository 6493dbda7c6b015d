"""SOURCE_DATE_EPOCH from a tree's changelogs, and the target setting that overrides it."""
from __future__ import annotations

import gzip
import textwrap
from email.utils import format_datetime
from datetime import datetime, timezone
from pathlib import Path

import pytest

from hypersolid import epoch
from hypersolid.config import ConfigError, Project
from hypersolid.cache import Cache
from hypersolid.stages import STAGES, Unit, planned_keys

MIRROR = "http://deb.debian.org/debian"


def changelog(when: datetime, later_entries: tuple[datetime, ...] = ()) -> bytes:
    """A Debian changelog whose first entry is dated `when`."""
    out = ""
    for i, date in enumerate((when, *later_entries)):
        out += (f"pkg (1.{9 - i}) bookworm; urgency=medium\n\n  * change {i}\n\n"
                f" -- Jane Doe <jane@example.org>  {format_datetime(date)}\n\n")
    return gzip.compress(out.encode())


def at(year: int, month: int = 1, day: int = 1) -> datetime:
    return datetime(year, month, day, 12, 0, 0, tzinfo=timezone.utc)


def doc(tree: Path, package: str, name: str = "changelog.Debian.gz", data: bytes = b"") -> Path:
    path = tree / "usr/share/doc" / package / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_the_epoch_is_the_newest_first_entry_date_of_the_changelogs(tmp_path):
    doc(tmp_path, "old", data=changelog(at(2020)))
    # Only the first entry counts: an older first entry with a newer one below is a 2021 changelog.
    doc(tmp_path, "new", data=changelog(at(2023, 5, 17), (at(2019),)))
    doc(tmp_path, "mid", data=changelog(at(2021)))
    assert epoch.from_tree(tmp_path) == int(at(2023, 5, 17).timestamp())


def test_a_binnmu_changelog_counts_too(tmp_path):
    doc(tmp_path, "libx", data=changelog(at(2022)))
    doc(tmp_path, "libx", "changelog.Debian.amd64.gz", changelog(at(2024, 2, 2)))
    assert epoch.from_tree(tmp_path) == int(at(2024, 2, 2).timestamp())


def test_timezones_of_the_trailer_are_honoured(tmp_path):
    path = doc(tmp_path, "tz")
    path.write_bytes(gzip.compress(b"tz (1) unstable; urgency=low\n\n  * x\n\n"
                                   b" -- A B <a@b.c>  Sat, 01 Jan 2022 02:00:00 +0200\n"))
    assert epoch.from_tree(tmp_path) == int(datetime(2022, 1, 1, 0, 0, tzinfo=timezone.utc).timestamp())


def test_symlinked_doc_dirs_and_changelogs_are_not_followed(tmp_path):
    """Debian links a package's doc dir to another's; an absolute link would
    lead onto the build host, whose changelogs must not count."""
    tree, host = tmp_path / "tree", tmp_path / "host"
    doc(tree, "real", data=changelog(at(2021)))
    doc(host, "hostpkg", data=changelog(at(2030)))
    (tree / "usr/share/doc/linked-dir").symlink_to(host / "usr/share/doc/hostpkg")
    (tree / "usr/share/doc/linked-file").mkdir()
    (tree / "usr/share/doc/linked-file/changelog.Debian.gz").symlink_to(host / "usr/share/doc/hostpkg/changelog.Debian.gz")
    assert epoch.from_tree(tree) == int(at(2021).timestamp())


def test_missing_broken_and_undated_changelogs_are_skipped(tmp_path):
    doc(tmp_path, "good", data=changelog(at(2022)))
    (tmp_path / "usr/share/doc/no-changelog").mkdir()
    doc(tmp_path, "not-gzip", data=b"plain text")
    doc(tmp_path, "truncated", data=changelog(at(2029))[:20])
    doc(tmp_path, "undated", data=gzip.compress(b"pkg (1) unstable; urgency=low\n\n  * x\n"))
    doc(tmp_path, "bad-date", data=gzip.compress(b" -- A B <a@b.c>  Someday soon\n"))
    (tmp_path / "usr/share/doc/a-file").write_text("not a directory")
    assert epoch.from_tree(tmp_path) == int(at(2022).timestamp())


def test_a_tree_without_a_dated_changelog_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no dated changelog"):
        epoch.from_tree(tmp_path)
    doc(tmp_path, "undated", data=gzip.compress(b"nothing\n"))
    with pytest.raises(ValueError, match="no dated changelog"):
        epoch.from_tree(tmp_path)


def test_the_epoch_does_not_depend_on_file_times(tmp_path):
    import os
    path = doc(tmp_path, "p", data=changelog(at(2022)))
    before = epoch.from_tree(tmp_path)
    os.utime(path, (2_000_000_000, 2_000_000_000))
    assert epoch.from_tree(tmp_path) == before


def project_with(tmp_path: Path, extra: str) -> Project:
    path = tmp_path / "targets/t/target.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(textwrap.dedent(f"""\
        architectures: [amd64]
        suite: bookworm
        mirror: {MIRROR}
        sections:
          - name: debian
            packages: [netbase]
        """) + extra)
    return Project(tmp_path)


def test_the_setting_defaults_to_none_and_takes_an_integer(tmp_path):
    assert project_with(tmp_path / "a", "").load("t").source_date_epoch is None
    assert project_with(tmp_path / "b", "source_date_epoch: 1700000000\n").load("t").source_date_epoch == 1700000000


@pytest.mark.parametrize("value, message", [
    ("-1", "outside 0..4294967295"),
    ("4294967296", "outside 0..4294967295"),
    ("'1700000000'", "expected an integer"),
    ("2023-01-01", "expected an integer"),
])
def test_a_bad_setting_names_file_line_and_key(tmp_path, value, message):
    project = project_with(tmp_path, f"hostname: x\nsource_date_epoch: {value}\n")
    with pytest.raises(ConfigError) as err:
        project.load("t")
    assert "target.yaml:8: source_date_epoch: " in str(err.value)
    assert message in str(err.value)


def test_the_setting_is_in_the_bootstrap_key_and_so_in_every_later_one(tmp_path):
    def keys(extra: str) -> dict[str, str]:
        project = project_with(tmp_path / str(len(extra)), extra)
        return planned_keys(Unit(project, project.load("t"), "amd64", Cache(tmp_path / "cache")))

    derived, given = keys(""), keys("source_date_epoch: 1700000000\n")
    assert "hypersolid.epoch" in STAGES["bootstrap"].helpers
    assert all(derived[s] != given[s] for s in ("bootstrap", "configure", "squashfs"))
