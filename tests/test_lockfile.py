"""Lock files: the format round-trips, and every bad line is one FILE:LINE error."""
from __future__ import annotations

import dataclasses

import os

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


def test_the_top_mark_round_trips_and_a_six_field_lock_is_all_base(tmp_path):
    path = tmp_path / "packages-amd64.lock"
    top = dataclasses.replace(B, layer=lockfile.TOP)
    lockfile.write(path, [A, top], "tiny", "amd64")
    assert path.read_text().splitlines()[2].endswith("\thttp://deb.debian.org/debian\ttop")
    assert lockfile.read(path) == [top, A]
    assert [e.top for e in lockfile.read(path)] == [True, False]
    assert A.line().count("\t") == 5  # an unmarked entry is the six fields it always was


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
    ("adduser\t3.134\tall\t" + SHA + "\tpool/a.deb\thttp://x\tbase", "field 7: 'base' is not `top`"),
    ("adduser\t3.134\tall\t" + SHA + "\tpool/a.deb\thttp://x\ttop\tx", "found 8"),
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


# -- when the mirror is asked again (resolve's window) -------------------------

from hypersolid import resolve  # noqa: E402
from hypersolid.config import parse_duration  # noqa: E402


class _T:
    def __init__(self, age):
        self.index_max_age = age


@pytest.mark.parametrize("text, seconds", [("0", 0), ("3600", 3600), ("90m", 5400), ("1h", 3600), ("2d", 172800),
                                           (" 5s ", 5), ("1.5h", None), ("h", None), ("-1", None), ("1w", None)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_the_window_is_the_environment_else_the_target_else_an_hour(monkeypatch):
    monkeypatch.delenv(resolve.MAX_AGE_ENV, raising=False)
    assert resolve.max_age(_T(None)) == 3600
    assert resolve.max_age(_T(60)) == 60
    monkeypatch.setenv(resolve.MAX_AGE_ENV, "0")
    assert resolve.max_age(_T(60)) == 0
    monkeypatch.setenv(resolve.MAX_AGE_ENV, "soon")
    with pytest.raises(Exception, match="HYPERSOLID_INDEX_MAX_AGE='soon' is not seconds"):
        resolve.max_age(_T(60))


def test_a_resolution_is_fresh_only_within_the_window_and_without_refresh(tmp_path, monkeypatch):
    monkeypatch.delenv(resolve.REFRESH_ENV, raising=False)
    stamp = tmp_path / "resolved.time"
    assert not resolve.is_fresh(stamp, 3600, now=1000)  # never resolved
    stamp.write_text("1000\n")
    assert resolve.is_fresh(stamp, 3600, now=1000 + 3599)
    assert not resolve.is_fresh(stamp, 3600, now=1000 + 3600)
    assert not resolve.is_fresh(stamp, 0, now=1000)  # 0: every build
    assert not resolve.is_fresh(stamp, 3600, now=999)  # a clock set back: ask again
    monkeypatch.setenv(resolve.REFRESH_ENV, "1")
    assert not resolve.is_fresh(stamp, 3600, now=1001)  # --refresh
    stamp.write_text("garbage")
    monkeypatch.delenv(resolve.REFRESH_ENV)
    assert not resolve.is_fresh(stamp, 3600, now=1001)


def test_print_uris_lines_become_exact_entries():
    text = ("'http://m.example/debian/pool/main/z/zlib/zlib1g_1.2.13.dfsg-1_amd64.deb' "
            "zlib1g_1%3a1.2.13.dfsg-1_amd64.deb 86880 MD5Sum:8e7e741807b1e1939df8f58323affdcb\n"
            "'http://m.example/debian-security/pool/updates/main/l/libz/libzstd1_1.5.4%2bdfsg2-5_amd64.deb' "
            "libzstd1_1.5.4+dfsg2-5_amd64.deb 290236 \n")
    sources = ["http://m.example/debian", "http://m.example/debian-security"]
    hashes = {("http://m.example/debian", "pool/main/z/zlib/zlib1g_1.2.13.dfsg-1_amd64.deb"): (86880, SHA),
              ("http://m.example/debian-security", "pool/updates/main/l/libz/libzstd1_1.5.4+dfsg2-5_amd64.deb"):
              (290236, SHA)}
    got = resolve.parse_uris(text, sources, hashes)
    assert [(e.package, e.version, e.source, e.filename) for e in got] == [
        ("libzstd1", "1.5.4+dfsg2-5", "http://m.example/debian-security",
         "pool/updates/main/l/libz/libzstd1_1.5.4+dfsg2-5_amd64.deb"),
        ("zlib1g", "1:1.2.13.dfsg-1", "http://m.example/debian", "pool/main/z/zlib/zlib1g_1.2.13.dfsg-1_amd64.deb")]
    with pytest.raises(Exception, match="not in the Packages lists"):
        resolve.parse_uris(text, sources, {})


def test_apt_cache_show_records_give_the_hashes_unless_a_pool_path_has_two_contents():
    other = "b" * 64
    shown = ("Package: zlib1g\nVersion: 1:1.2.13.dfsg-1\nFilename: pool/main/z/zlib/zlib1g_1.2.13.dfsg-1_amd64.deb\n"
             f"Size: 86880\nSHA256: {SHA.upper()}\n\n"
             "Package: twice\nVersion: 1\nFilename: pool/main/t/twice/twice_1_all.deb\nSize: 10\n"
             f"SHA256: {SHA}\n\n"
             "Package: twice\nVersion: 1\nFilename: pool/main/t/twice/twice_1_all.deb\nSize: 10\n"
             f"SHA256: {other}\n\n"
             "Package: nohash\nVersion: 1\nFilename: pool/main/n/nohash/nohash_1_all.deb\nSize: 10\n")
    got = resolve.shown_hashes(shown, ["http://m.example/debian/", "http://m.example/debian-security"])
    assert got == {("http://m.example/debian", "pool/main/z/zlib/zlib1g_1.2.13.dfsg-1_amd64.deb"): (86880, SHA),
                   ("http://m.example/debian-security", "pool/main/z/zlib/zlib1g_1.2.13.dfsg-1_amd64.deb"):
                   (86880, SHA)}


def test_required_packages_reads_a_list_again_only_when_apt_changed_it(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    index = lists / "m.example_debian_dists_bookworm_main_binary-amd64_Packages"
    index.write_bytes(b"Package: base-files\nPriority: required\n\nPackage: less\nPriority: optional\n\n"
                      b"Package: dash\nEssential: yes\n")
    memo = tmp_path / "required.json"
    assert resolve.required_packages(lists, memo) == {"base-files", "dash"}
    st = index.stat()
    index.write_bytes(index.read_bytes().replace(b"Package: less\nPriority: optional",
                                                 b"Package: lesx\nPriority: required"))
    os.utime(index, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: the memo answers
    assert resolve.required_packages(lists, memo) == {"base-files", "dash"}
    os.utime(index, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # apt-get update wrote it
    assert resolve.required_packages(lists, memo) == {"base-files", "dash", "lesx"}
    memo.write_text("not json")
    assert resolve.required_packages(lists, memo) == {"base-files", "dash", "lesx"}
    assert resolve.required_packages(lists) == {"base-files", "dash", "lesx"}


def test_the_store_layout_is_apts_url_escaping(tmp_path):
    from hypersolid.debproxy import store_path
    assert store_path(tmp_path, "http://deb.debian.org/debian/pool/main/g/gcc-12/libstdc++6_12.2.0-14+deb12u1~x_amd64.deb") \
        == tmp_path / "deb.debian.org/debian/pool/main/g/gcc-12/libstdc%2b%2b6_12.2.0-14%2bdeb12u1%7ex_amd64.deb"
    assert store_path(tmp_path, "http://127.0.0.1:8080/d/pool/a_1:2_all.deb") == tmp_path / "127.0.0.1_8080/d/pool/a_1%3a2_all.deb"


# -- the settings ----------------------------------------------------------------

def _load(tmp_path, extra: str, arches: str = "[amd64]"):
    import textwrap
    from hypersolid.config import Project, clear_caches
    clear_caches()
    path = tmp_path / "targets/t/target.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent("""\
        architectures: ARCHES
        suite: bookworm
        mirror: http://deb.debian.org/debian
        sections: [{name: debian, packages: [netbase]}]
        """).replace("ARCHES", arches) + extra)
    return Project(tmp_path).load("t")


def test_lock_and_window_settings(tmp_path):
    t = _load(tmp_path, "lock: packages-{arch}.lock\nindex_max_age: 30m\napt_keyring: keys/k.gpg\n")
    assert t.lock_file("arm64") == tmp_path / "targets/t/packages-arm64.lock"
    assert t.index_max_age == 1800
    assert t.apt_keyring == str(tmp_path / "targets/t/keys/k.gpg")
    t = _load(tmp_path, "index_max_age: 0\n")
    assert t.lock is None and t.lock_file("amd64") is None and t.index_max_age == 0


@pytest.mark.parametrize("extra, key, message", [
    ("lock: ../other/x.lock\n", "lock", "is not a file name next to target.yaml"),
    ("lock: .hidden\n", "lock", "is not a file name"),
    ("index_max_age: soon\n", "index_max_age", "is not seconds or a duration"),
    ("index_max_age: -5\n", "index_max_age", "outside"),
])
def test_bad_lock_settings_are_one_error_naming_the_key(tmp_path, extra, key, message):
    from hypersolid.config import ConfigError
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, extra)
    assert err.value.key == key and message in str(err.value) and ":5:" in str(err.value)


def test_apts_fetch_failures_are_named_per_mirror():
    lines = ["E: Failed to fetch http://127.0.0.1:9/debian/dists/bookworm/InRelease  Could not connect to 127.0.0.1:9 "
             "(127.0.0.1). - connect (111: Connection refused)",
             "E: Failed to fetch http://x.invalid/debian/dists/bookworm/InRelease  Could not resolve 'x.invalid'",
             "E: Some index files failed to download. They have been ignored, or old ones used instead."]
    assert resolve._unreachable(lines, ["http://127.0.0.1:9/debian", "http://x.invalid/debian"]) == (
        "cannot reach the mirror http://127.0.0.1:9/debian: connection refused; "
        "cannot reach the mirror http://x.invalid/debian: DNS lookup failed (Could not resolve 'x.invalid')")
    assert resolve._unreachable(["E: The repository 'x' is not signed."], []) is None


def test_an_unreachable_apt_proxy_is_named_instead_of_the_mirror():
    lines = ["E: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease  Could not connect to "
             "10.9.9.9:3142 (10.9.9.9). - connect (111: Connection refused)"]
    assert resolve._unreachable(lines, ["http://deb.debian.org/debian"], "http://10.9.9.9:3142") == \
        "cannot reach the apt proxy http://10.9.9.9:3142: connection refused"


def test_one_lock_file_for_two_architectures_is_refused(tmp_path):
    from hypersolid.config import ConfigError
    with pytest.raises(ConfigError, match=r"target.yaml:5: lock: one file for 2 architectures: put \{arch\}"):
        _load(tmp_path, "lock: packages.lock\n", "[amd64, arm64]")
    assert _load(tmp_path, "lock: packages-{arch}.lock\n", "[amd64, arm64]").lock_file("arm64").name == \
        "packages-arm64.lock"
