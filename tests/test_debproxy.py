"""DebProxy against real HTTP servers on 127.0.0.1 (no mocks): what it
forwards and refuses, how it reports an unreachable mirror, a full disk, a
damaged cached package, and its temp files."""
from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import lzma
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import MIRROR, TestProject, needs_root_and_tools, tiny_target
from hostile import outcome, untouched_host
from hypersolid.debproxy import DebProxy, fetch_debs, host_apt_sources, parse_packages
from hypersolid.lockfile import LockEntry
from hypersolid.run import Log

POOL = "pool/main/f/foo/foo_1.0_amd64.deb"
INDEX = "dists/bookworm/main/binary-amd64/Packages.xz"


class Upstream:
    """A tiny archive: path -> bytes, with a count of requests per path."""

    def __init__(self, files: dict[str, bytes], drop_idle: bool = False):
        self.files, self.hits = dict(files), {}
        self.connections: set = set()  # client (address, port): one per TCP connection
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                upstream.hits[self.path] = upstream.hits.get(self.path, 0) + 1
                upstream.connections.add(self.client_address)
                # drop_idle: hang up after each answer without saying so, as a
                # mirror does with a connection that was idle too long
                self.close_connection = drop_idle
                body = upstream.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/debian"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def deb() -> bytes:
    return b"!<arch>\n" + os.urandom(20_000)


def packages_index(debs: dict[str, bytes]) -> bytes:
    """A Packages.xz with one stanza per (pool path, bytes)."""
    stanzas = [f"Package: p{i}\nVersion: 1.0\nArchitecture: amd64\nFilename: {path}\n"
               f"Size: {len(body)}\nMD5sum: {hashlib.md5(body).hexdigest()}\n"
               f"SHA256: {hashlib.sha256(body).hexdigest()}\nDescription: test\n"
               for i, (path, body) in enumerate(debs.items())]
    return lzma.compress("\n".join(stanzas).encode())


@pytest.fixture
def upstream(deb):
    up = Upstream({f"/debian/{POOL}": deb, f"/debian/{INDEX}": packages_index({POOL: deb})})
    yield up
    up.close()


@pytest.fixture
def log(tmp_path) -> Log:
    return Log(tmp_path / "logs" / "bootstrap.log", "bootstrap:test")


def get(proxy: DebProxy, url: str, method: str = "GET", body: bytes | None = None,
        timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(proxy.url.split("//")[1], timeout=timeout)
    try:
        conn.request(method, url, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def raw(proxy: DebProxy, request: bytes) -> bytes:
    """A request line sent as is (http.client would not send some of these)."""
    host, port = proxy.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_deb_is_fetched_once_then_served_from_cache(tmp_path, upstream, deb, log):
    with DebProxy(tmp_path / "debs", [upstream.base], log=log) as proxy:
        assert get(proxy, f"{upstream.base}/{POOL}") == (200, deb)
        assert get(proxy, f"{upstream.base}/{POOL}") == (200, deb)
    assert upstream.hits[f"/debian/{POOL}"] == 1
    assert proxy.served_from_cache == len(deb) and proxy.downloaded_debs == len(deb)
    host = upstream.base.split("//")[1].split("/")[0].replace(":", "_")
    assert (tmp_path / "debs" / host / "debian" / POOL).read_bytes() == deb


@pytest.mark.parametrize("path", [
    "http://../x.deb",                              # the old hole: any .deb under the store
    "http://127.0.0.1:1/debian/{pool}",            # another host (port) than the sources'
    "http://deb.debian.org/debian/{pool}",          # a real host, just not this target's
    "{base}/../../x.deb",
    "{base}/pool/%2e%2e/%2e%2e/x.deb",
    "{base}/pool/main/f/foo/.foo_1.0_amd64.deb.tmp-1-ab",
    "{base}/pool//x.deb",
    "{base}/{pool}?x=1",
    "{base}-other/{pool}",                          # a sibling of the source path
    "/debian/{pool}",                               # origin form: not a proxy request
    "ftp://127.0.0.1/debian/{pool}",
])
def test_refuses_urls_outside_the_targets_sources(tmp_path, upstream, path):
    store = tmp_path / "debs"
    (store / "..").mkdir(parents=True, exist_ok=True)
    (store / "x.deb").write_bytes(b"secret")  # what `http://../x.deb` used to serve
    url = path.format(base=upstream.base, pool=POOL)
    with DebProxy(store, [upstream.base]) as proxy:
        reply = raw(proxy, f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403"), reply
    assert body.startswith(b"hypersolid deb proxy: ") and body.count(b"\n") == 1, body
    assert b"secret" not in reply
    assert upstream.hits == {}


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "CONNECT", "OPTIONS"])
def test_refuses_methods_other_than_get_and_head(tmp_path, upstream, method):
    with DebProxy(tmp_path / "debs", [upstream.base]) as proxy:
        status, body = get(proxy, f"{upstream.base}/{POOL}", method, body=b"data")
        assert get(proxy, f"{upstream.base}/{POOL}", "HEAD")[0] == 200
    assert status == 403 and f"method {method}".encode() in body
    assert upstream.hits == {f"/debian/{POOL}": 1}  # the HEAD only


def test_unreachable_mirror_names_mirror_and_refused_connection(tmp_path, log):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mirror = f"http://127.0.0.1:{port}/debian"
    with DebProxy(tmp_path / "debs", [mirror], log=log) as proxy:
        status, body = get(proxy, f"{mirror}/{INDEX}")
        get(proxy, f"{mirror}/{POOL}")
    assert status == 502 and b"connection refused" in body
    assert proxy.failure_message() == f"cannot reach the mirror {mirror}: connection refused"
    assert log.path.read_text().count("cannot reach the mirror") == 1  # noted once, not per request


def test_mirror_that_never_answers_is_a_timeout_after_the_given_seconds(tmp_path):
    with socket.socket() as listener:  # accepts connections (backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        mirror = f"http://127.0.0.1:{listener.getsockname()[1]}/debian"
        with DebProxy(tmp_path / "debs", [mirror], timeout=0.5) as proxy:
            start = time.monotonic()
            status, body = get(proxy, f"{mirror}/{INDEX}")
            elapsed = time.monotonic() - start
    assert status == 502 and elapsed < 3
    assert proxy.failure_message() == f"cannot reach the mirror {mirror}: no answer within 0.5s (timed out)"


def test_mirror_with_unknown_name_is_a_dns_failure(tmp_path):
    mirror = "http://hypersolid-test.invalid/debian"
    with DebProxy(tmp_path / "debs", [mirror], timeout=10) as proxy:
        status, _ = get(proxy, f"{mirror}/{INDEX}")
    assert status == 502
    assert proxy.failure_message().startswith(f"cannot reach the mirror {mirror}: DNS lookup failed")


def test_unreachable_apt_proxy_is_named_instead_of_the_mirror(tmp_path, upstream):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        apt_proxy = f"http://127.0.0.1:{s.getsockname()[1]}"
    with DebProxy(tmp_path / "debs", [upstream.base], upstream_proxy=apt_proxy) as proxy:
        assert get(proxy, f"{upstream.base}/{INDEX}")[0] == 502
    assert proxy.failure_message() == f"cannot reach the apt proxy {apt_proxy}: connection refused"


def test_apt_proxy_is_used_as_the_upstream(tmp_path, upstream, deb):
    """The apt proxy gets the absolute URL (upstream stands in for it)."""
    upstream.files[f"{upstream.base}/{POOL}"] = deb
    apt_proxy = upstream.base.rsplit("/", 1)[0]
    other = "http://mirror.example.org/debian"
    with DebProxy(tmp_path / "debs", [other], upstream_proxy=apt_proxy) as proxy:
        assert get(proxy, f"{other}/{POOL}") == (404, b"")  # asked as f"{other}/..." upstream
        assert get(proxy, f"{upstream.base}/{POOL}")[0] == 403
    assert upstream.hits == {f"{other}/{POOL}": 1}


@contextmanager
def tiny_tmpfs(path: Path, size: str = "64k"):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_full_disk_passes_the_deb_through_and_notes_it_without_traceback(tmp_path, log, capfd):
    big = b"!<arch>\n" + os.urandom(200_000)
    up = Upstream({f"/debian/{POOL}": big})
    try:
        with tiny_tmpfs(tmp_path / "full") as store:
            with DebProxy(store, [up.base], log=log) as proxy:
                for _ in range(3):  # apt would retry; every try gets the whole file
                    assert get(proxy, f"{up.base}/{POOL}") == (200, big)
            left = [p for p in store.rglob("*") if p.is_file()]
    finally:
        up.close()
    assert left == []  # no temp file, no partial .deb
    text = log.path.read_text()
    assert f"cannot store {store}/" in text and POOL in text
    assert "No space left on device" in text and "bytes free in" in text
    out, err = capfd.readouterr()
    assert err == "" and "Traceback" not in out


def test_client_hanging_up_prints_nothing(tmp_path, upstream, deb, capfd):
    with DebProxy(tmp_path / "debs", [upstream.base]) as proxy:
        get(proxy, f"{upstream.base}/{POOL}")
        host, port = proxy.url.split("//")[1].split(":")
        for _ in range(5):  # ask for the cached file and hang up before reading it
            with socket.create_connection((host, int(port))) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST on close
                s.sendall(f"GET {upstream.base}/{POOL} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            raw(proxy, b"garbage\r\n\r\n")
        assert get(proxy, f"{upstream.base}/{POOL}") == (200, deb)
    out, err = capfd.readouterr()
    assert err == "" and out == ""


def cached_path(store: Path, base: str, pool: str = POOL) -> Path:
    host = base.split("//")[1].split("/")[0].replace(":", "_")
    return store / host / "debian" / pool


@pytest.mark.parametrize("damage", ["truncated", "same size, other bytes"])
def test_damaged_cached_deb_is_downloaded_again(tmp_path, upstream, deb, log, damage):
    store = tmp_path / "debs"
    with DebProxy(store, [upstream.base], log=log) as proxy:
        get(proxy, f"{upstream.base}/{POOL}")
    cached = cached_path(store, upstream.base)
    if damage == "truncated":
        cached.write_bytes(deb[:1000])
    else:
        cached.write_bytes(deb[:-1] + bytes([deb[-1] ^ 1]))
    with DebProxy(store, [upstream.base], log=log) as proxy:
        assert get(proxy, f"{upstream.base}/{INDEX}")[0] == 200  # apt-get update, as in every bootstrap
        assert get(proxy, f"{upstream.base}/{POOL}") == (200, deb)
        assert get(proxy, f"{upstream.base}/{POOL}") == (200, deb)
    assert upstream.hits[f"/debian/{POOL}"] == 2
    assert cached.read_bytes() == deb and proxy.refetched == 1
    assert f"{cached} is damaged" in log.path.read_text()


def test_damaged_download_is_not_stored(tmp_path, upstream, deb, log):
    upstream.files[f"/debian/{POOL}"] = deb[:-10]  # the mirror sends what the index does not describe
    store = tmp_path / "debs"
    with DebProxy(store, [upstream.base], log=log) as proxy:
        get(proxy, f"{upstream.base}/{INDEX}")
        assert get(proxy, f"{upstream.base}/{POOL}") == (200, deb[:-10])  # apt reports the mismatch
    assert not cached_path(store, upstream.base).exists()
    assert "arrived damaged" in log.path.read_text()


def test_good_cached_deb_is_hashed_once_not_every_run(tmp_path, upstream, deb):
    """The proof: a same-size change with the old mtime put back goes
    unnoticed, so the second run trusted the recorded hash."""
    store = tmp_path / "debs"
    with DebProxy(store, [upstream.base]) as proxy:
        get(proxy, f"{upstream.base}/{INDEX}")
        get(proxy, f"{upstream.base}/{POOL}")
    cached = cached_path(store, upstream.base)
    recorded = json.loads((store / ".verified.json").read_text())
    assert list(recorded.values())[0][3] == hashlib.sha256(deb).hexdigest()
    st = cached.stat()
    with open(cached, "r+b") as f:
        f.write(b"X")
    os.utime(cached, ns=(st.st_atime_ns, st.st_mtime_ns))
    with DebProxy(store, [upstream.base]) as proxy:
        get(proxy, f"{upstream.base}/{INDEX}")
        assert get(proxy, f"{upstream.base}/{POOL}")[1][:1] == b"X"
    assert upstream.hits[f"/debian/{POOL}"] == 1


def test_packages_index_is_read_in_every_compression_and_field_order(tmp_path, deb):
    plain = lzma.decompress(packages_index({POOL: deb}))
    want = {POOL: (len(deb), hashlib.sha256(deb).hexdigest())}
    assert parse_packages(plain) == parse_packages(gzip.compress(plain)) == want
    assert parse_packages(b"Package: foo\nDescription-md5: 0\n") == {}  # a Translation file
    sha = hashlib.sha256(deb).hexdigest()
    other_order = (f"Package: a\nSHA256: {sha}\nFilename: {POOL}\nSize: {len(deb)}\n\n"
                   f"Package: b\nFilename: pool/b.deb\nSize: 1\n\n"  # no SHA256: not checked
                   f"Package: c\nFilename: pool/c.deb\nSize: 2\nSHA256: {'0' * 64}\n").encode()
    assert parse_packages(other_order) == {**want, "pool/c.deb": (2, "0" * 64)}



@pytest.mark.parametrize("release_names_it", [True, False])
def test_by_hash_packages_index_is_used_for_checks(tmp_path, deb, release_names_it):
    """apt fetches indexes by hash; the InRelease file says which hash is
    a Packages file (without one, any by-hash file is tried)."""
    packages = gzip.compress(lzma.decompress(packages_index({POOL: deb})))
    digest = hashlib.sha256(packages).hexdigest()
    by_hash = f"dists/bookworm/main/binary-amd64/by-hash/SHA256/{digest}"
    release = (f"Suite: bookworm\nMD5Sum:\n {'0' * 32} {len(packages)} main/binary-amd64/Packages.gz\n"
               f"SHA256:\n {'1' * 64} 10 main/i18n/Translation-en.gz\n"
               f" {digest} {len(packages)} main/binary-amd64/Packages.gz\n").encode()
    up = Upstream({f"/debian/{by_hash}": packages, f"/debian/{POOL}": b"damaged",
                   "/debian/dists/bookworm/InRelease": release})
    try:
        with DebProxy(tmp_path / "debs", [up.base]) as proxy:
            if release_names_it:
                get(proxy, f"{up.base}/dists/bookworm/InRelease")
            get(proxy, f"{up.base}/{by_hash}")
            assert get(proxy, f"{up.base}/{POOL}") == (200, b"damaged")
    finally:
        up.close()
    assert not cached_path(tmp_path / "debs", up.base).exists()  # checked against the by-hash index


def test_temp_files_carry_the_pid_and_dead_writers_are_swept_at_start(tmp_path, upstream):
    store = tmp_path / "debs"
    pool = store / "127.0.0.1_1/debian/pool/main/f/foo"
    pool.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = pool / f".foo_1.0_amd64.deb.tmp-{dead.pid}-0123abcd"
    live = pool / f".foo_1.0_amd64.deb.tmp-{os.getpid()}-0123abcd"
    other = pool / ".unrelated"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    proxy = DebProxy(store, [upstream.base])
    assert stale.exists()  # constructing (doit loading the graph) sweeps nothing
    with proxy:
        pass
    assert not stale.exists() and live.exists() and other.exists()


def test_escaped_name_is_stored_as_apt_asks_and_checked_by_its_index_name(tmp_path, deb, log):
    """apt asks for foo_1.0%2bb1 (the cache keeps that name, as it always
    did); Packages says foo_1.0+b1."""
    plus = "pool/main/f/foo/foo_1.0+b1_amd64.deb"
    escaped = plus.replace("+", "%2b")
    up = Upstream({f"/debian/{escaped}": deb, f"/debian/{INDEX}": packages_index({plus: deb})})
    store = tmp_path / "debs"
    try:
        with DebProxy(store, [up.base], log=log) as proxy:
            get(proxy, f"{up.base}/{escaped}")
        cached = cached_path(store, up.base, escaped)
        assert cached.read_bytes() == deb
        cached.write_bytes(b"damaged")
        with DebProxy(store, [up.base], log=log) as proxy:
            get(proxy, f"{up.base}/{INDEX}")
            assert get(proxy, f"{up.base}/{escaped}") == (200, deb)
    finally:
        up.close()
    assert cached.read_bytes() == deb and up.hits[f"/debian/{escaped}"] == 2


def test_host_sources_serve_only_the_keyring_package(tmp_path, upstream, deb):
    """multistrap downloads the keyring with the host's apt sources; from
    those the proxy forwards keyring packages and nothing else."""
    keyring = "pool/main/d/debian-archive-keyring/debian-archive-keyring_2023.3%2bdeb12u2_all.deb"
    upstream.files[f"/debian/{keyring}"] = deb
    target_mirror = "http://mirror.example.org/debian"
    with DebProxy(tmp_path / "debs", [target_mirror], keyring_sources=[upstream.base]) as proxy:
        assert get(proxy, f"{upstream.base}/{keyring}") == (200, deb)
        assert get(proxy, f"{upstream.base}/{POOL}")[0] == 403
        assert get(proxy, f"{upstream.base}/{INDEX}")[0] == 403
    assert upstream.hits == {f"/debian/{keyring}": 1}


def test_unreachable_host_source_is_named_as_such(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        host_source = f"http://127.0.0.1:{s.getsockname()[1]}/debian"
    keyring = "pool/main/d/debian-archive-keyring/debian-archive-keyring_1_all.deb"
    with DebProxy(tmp_path / "debs", ["http://mirror.example.org/debian"], keyring_sources=[host_source]) as proxy:
        assert get(proxy, f"{host_source}/{keyring}")[0] == 502
    assert proxy.failure_message() == (f"cannot reach the host's apt source {host_source} (for the keyring): "
                                       "connection refused")


def test_host_apt_sources_reads_list_and_deb822_files(tmp_path):
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text("# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://a.example/debian bookworm main\n"
                                      "deb-src http://src.example/debian bookworm main\n")
    (etc / "sources.list.d/x.sources").write_text("Types: deb\nURIs: http://b.example/debian http://a.example/debian\n"
                                                  "Suites: bookworm\n\nTypes: deb\nURIs: https://c.example/x\n")
    (etc / "sources.list.d/off.list.disabled").write_text("deb http://d.example/debian bookworm main\n")
    assert host_apt_sources(etc) == ["http://a.example/debian", "http://b.example/debian"]


@pytest.mark.integration
def test_bootstrap_from_unreachable_mirror_fails_naming_mirror_and_cause(tmp_path):
    needs_root_and_tools()
    mirror = "http://127.0.0.1:9/debian"  # discard: nothing listens there
    p = TestProject(tmp_path / "project", tmp_path / "cache")
    p.target("tiny", tiny_target().replace(f"mirror: {MIRROR}", f"mirror: {mirror}"))
    with untouched_host(tmp_path, p.root, p.cache):
        result = outcome(p.doit("bootstrap:tiny", check=False, timeout=600))
    assert result.status != 0
    # the resolve task asks the mirror first (apt), in the proxy's words
    result.line("resolve:tiny", f"cannot reach the mirror {mirror}: connection refused")


def locked_pool(count: int) -> tuple[dict[str, bytes], list[LockEntry]]:
    files, entries = {}, []
    for i in range(count):
        body = os.urandom(1000 + i)
        files[f"/debian/pool/main/p/p{i}/p{i}_1.0_amd64.deb"] = body
        entries.append(LockEntry(f"p{i}", "1.0", "amd64", hashlib.sha256(body).hexdigest(),
                                 f"pool/main/p/p{i}/p{i}_1.0_amd64.deb", ""))
    return files, entries


def test_locked_debs_are_fetched_over_one_kept_alive_connection_per_job(tmp_path):
    files, entries = locked_pool(40)
    up = Upstream(files)
    try:
        entries = [LockEntry(**{**e.__dict__, "source": up.base}) for e in entries]
        got = fetch_debs(tmp_path / "debs", entries, jobs=4)
    finally:
        up.close()
    assert {e.package: p.read_bytes() for e, p in got.items()} == \
        {e.package: files[f"/debian/{e.filename}"] for e in entries}
    assert len(up.connections) <= 4  # not one connection (and DNS lookup) per package


def test_a_kept_connection_the_mirror_dropped_is_retried_on_a_new_one(tmp_path):
    files, entries = locked_pool(10)
    up = Upstream(files, drop_idle=True)
    try:
        entries = [LockEntry(**{**e.__dict__, "source": up.base}) for e in entries]
        got = fetch_debs(tmp_path / "debs", entries, jobs=2)
    finally:
        up.close()
    assert len(got) == 10 and all(up.hits[f"/debian/{e.filename}"] == 1 for e in entries)
    assert len(up.connections) == 10
