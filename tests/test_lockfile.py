"""Lock files: the format round-trips, and every bad line is one FILE:LINE error."""
from __future__ import annotations

import pytest

from hypersolid import lockfile
from hypersolid.lockfile import LockEntry, LockError

SHA = "c24fe4eb8e60d8632d72ed104cce7c92cff200847c897dc8ba764b6c47b519e0"
A = LockEntry("base-files", "12.4+deb12u5", "amd64", SHA, "pool/main/b/base-files/base-files_12.4+deb12u5_amd64.deb",
              "http://deb.debian.org/debian")
B = LockEntry("adduser", "3.134", "all", SHA, "pool/main/a/adduser/adduser_3.134_all.deb", "http://deb.debian.org/debian")


def test_write_sorts_and_read_round_trips(tmp_path):
    path = tmp_path / "packages-amd64.lock"
    lockfile.write(path, [A, B], "tiny", "amd64")
    text = path.read_text()
    assert text.splitlines()[0] == "# hypersolid package lock: tiny amd64"
    assert text.splitlines()[1].startswith("# package\tversion")
    assert text.splitlines()[2].startswith("adduser\t3.134\tall\t")
    assert lockfile.read(path) == [B, A]
    assert lockfile.dumps(lockfile.read(path), "tiny", "amd64") == text
    assert not [p for p in tmp_path.iterdir() if p.name != path.name]  # no temp file left


def test_url_joins_source_and_pool_path():
    assert A.url == "http://deb.debian.org/debian/pool/main/b/base-files/base-files_12.4+deb12u5_amd64.deb"


@pytest.mark.parametrize("line, message", [
    ("adduser\t3.134\tall\t" + SHA, "expected 6 tab-separated fields"),
    ("adduser\t3.134\tall\tabc\tpool/a.deb\thttp://x", "sha256: 'abc' is not 64"),
    ("Adduser\t3.134\tall\t" + SHA + "\tpool/a.deb\thttp://x", "package: 'Adduser'"),
    ("adduser\t3 134\tall\t" + SHA + "\tpool/a.deb\thttp://x", "version: '3 134'"),
    ("adduser\t3.134\tall\t" + SHA + "\t/etc/passwd\thttp://x", "filename: '/etc/passwd'"),
    ("adduser\t3.134\tall\t" + SHA + "\tpool/../../x.deb\thttp://x", "filename:"),
    ("adduser\t3.134\tall\t" + SHA + "\tpool/a.deb\tmirror", "source: 'mirror'"),
])
def test_a_bad_line_is_one_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "x.lock"
    path.write_text(f"# comment\n{B.line()}\n{line}\n")
    with pytest.raises(LockError) as err:
        lockfile.read(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_package_locked_twice_is_an_error(tmp_path):
    path = tmp_path / "x.lock"
    path.write_text(f"{B.line()}\n{B.line()}\n")
    with pytest.raises(LockError, match=r"x.lock:2: adduser:all is locked twice \(line 1 too\)"):
        lockfile.read(path)


def test_unreadable_or_binary_lock_is_one_error(tmp_path):
    with pytest.raises(LockError, match="cannot read"):
        lockfile.read(tmp_path / "missing.lock")
    (tmp_path / "bin.lock").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(LockError, match="not UTF-8"):
        lockfile.read(tmp_path / "bin.lock")
