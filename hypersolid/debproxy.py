"""A small caching HTTP proxy that apt (inside multistrap) downloads through.

multistrap unpacks every .deb it finds in the tree's archive directory, so
packages cannot be reused by pre-seeding that directory.  Instead apt is
pointed at this proxy (http_proxy): pool files (.deb, immutable per URL) are
served from ``<cache>/debs/<host>/<path>`` or fetched once and stored
atomically; index files pass through untouched.  Upstream fetches go through
the target's apt proxy when it has one.

What it refuses and what it checks:
- It listens on loopback and forwards only absolute-form GET/HEAD requests
  for plain paths under one of the target's own sources (mirror, security
  mirror, section sources); everything else gets a 403 and a one-line body.
- Upstream failures (refused, DNS, timeout, 5xx) are recorded per source
  (`failures`, `failure_message()`), so a stage can name the mirror and the
  cause instead of apt's "Unable to locate package".
- The Packages indexes apt fetches through it are parsed as they pass; a
  cached .deb whose size or SHA256 differs from its index is deleted and
  downloaded again, and a download is checked before it is stored.  Hashes
  of checked files are remembered in ``<store>/.verified.json`` keyed on
  (size, mtime_ns, inode), so a good file is hashed once, not every run.
- A .deb that cannot be stored (full disk) is still passed through to apt
  and noted in the stage log; nothing is ever printed to the console.
- Temp files are ``.<name>.tmp-<pid>-<hex>``; those of dead writers are
  swept when a proxy starts.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import http.client
import json
import lzma
import os
import re
import shutil
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable
from urllib.parse import unquote, urlsplit

from .cache import mark_file_used, sweep_leftovers, temp_name

SEGMENT = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._~+:@=,-]*")
STANZA = re.compile(rb"^Filename: *(\S+)\n(?:[^\n]+\n)*?Size: *(\d+)\n(?:[^\n]+\n)*?SHA256: *([0-9a-fA-F]{64})$",
                    re.M)
RELEASE_SHA256 = re.compile(rb"^ ([0-9a-fA-F]{64}) +\d+ +(\S+)$", re.M)
INDEX_NAMES = {"Packages", "Packages.xz", "Packages.gz", "Packages.bz2"}
VERIFIED = ".verified.json"
DEB_TYPE = "application/vnd.debian.binary-package"


KEYRING_DEB = re.compile(r"pool/(?:[^/]+/)+[a-z0-9.+-]+-keyring_[^/]+\.deb")


def host_apt_sources(etc: Path = Path("/etc/apt")) -> list[str]:
    """The archive URLs of the host's own apt sources (one-line .list and
    deb822 .sources files): multistrap downloads the keyring package with
    the host's apt configuration, not the target's."""
    urls: list[str] = []
    files = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list")),
             *sorted((etc / "sources.list.d").glob("*.sources"))]
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if path.suffix == ".sources":
                if line.lower().startswith("uris:"):
                    urls += line.split(":", 1)[1].split()
            elif line.startswith("deb ") or line.startswith("deb\t"):
                words = re.sub(r"\[[^]]*\]", " ", line).split()
                if len(words) > 1:
                    urls.append(words[1])
    return list(dict.fromkeys(u for u in urls if u.startswith("http://")))


class Refused(Exception):
    """A request the proxy does not forward (403)."""


def _netloc(parts) -> str:
    """host[:port], lower case, without the default port."""
    host = (parts.hostname or "").lower()
    port = parts.port  # ValueError for a bad port: the caller refuses
    return host if port in (None, 80) else f"{host}:{port}"


def describe_error(err: BaseException, timeout: float) -> str:
    """An upstream failure in plain words."""
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, socket.gaierror):
        return f"DNS lookup failed ({err.strerror or err})"
    if isinstance(err, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g}s (timed out)"
    if isinstance(err, ConnectionResetError):
        return "connection reset"
    if isinstance(err, http.client.RemoteDisconnected):
        return "connection closed without an answer"
    if isinstance(err, http.client.HTTPException):
        return f"bad HTTP answer ({type(err).__name__})"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror[0].lower() + err.strerror[1:]
    return str(err) or type(err).__name__


class Upstream:
    """Kept-alive HTTP connections, one per host and thread, to addresses
    looked up once.  Measured here: a new connection per package costs more
    than most packages' download, and about one lookup in fifteen stalls 5 s
    (a lost DNS answer and the resolver's retry), so 128 MB of .debs took
    26-30 s with a connection each and about 1 s kept alive."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._local = threading.local()
        self._addresses: dict[tuple[str, int], list] = {}
        self._lookup = threading.Lock()
        self._opened: list[http.client.HTTPConnection] = []

    def _connect(self, address, timeout=None, source_address=None) -> socket.socket:
        with self._lookup:
            if address not in self._addresses:
                self._addresses[address] = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)
            infos = self._addresses[address]
        error: OSError = OSError(f"no address for {address[0]}")
        for family, kind, proto, _, where in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                sock.connect(where)
                return sock
            except OSError as err:
                sock.close()
                error = err
        raise error

    def get(self, host: str, target: str, headers: dict, tls: bool = False) -> tuple[http.client.HTTPResponse, bytes]:
        """GET target from host (netloc); a kept connection that the server
        closed in the meantime is retried once on a new one."""
        conns = self._local.__dict__.setdefault("conns", {})
        for attempt in (1, 2):
            conn = conns.pop(host, None)
            reused = conn is not None
            if conn is None:
                conn = (http.client.HTTPSConnection if tls else http.client.HTTPConnection)(host, timeout=self.timeout)
                conn._create_connection = self._connect  # TLS still checks the host name
                with self._lookup:
                    self._opened.append(conn)
            try:
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except (http.client.HTTPException, OSError):
                conn.close()
                if attempt == 2 or not reused:  # a fresh connection that failed fails again
                    raise
                continue
            if resp.will_close:
                conn.close()
            else:
                conns[host] = conn
            return resp, body
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lookup:
            for conn in self._opened:
                conn.close()
            self._opened.clear()


def parse_packages(data: bytes) -> dict[str, tuple[int, str]]:
    """Filename -> (Size, SHA256) of a Packages index, compressed (xz, gz,
    bz2) or plain; {} for anything else (e.g. a Translation file)."""
    try:
        if data.startswith(b"\xfd7zXZ\x00"):
            data = lzma.decompress(data)
        elif data.startswith(b"\x1f\x8b"):
            data = gzip.decompress(data)
        elif data.startswith(b"BZh"):
            data = bz2.decompress(data)
    except (lzma.LZMAError, OSError, EOFError, ValueError):
        return {}
    if b"\nFilename: " not in data[:65536]:
        return {}
    # Fast path (0.4 s for bookworm's main, 63k stanzas): the fields in the
    # order every archive tool writes them, never across a blank line.
    out = {name.decode(errors="replace"): (int(size), sha.decode().lower())
           for name, size, sha in STANZA.findall(data)}
    if len(out) == data.count(b"\nFilename: ") + data.startswith(b"Filename: "):
        return out
    out = {}  # some stanza has another order (or lacks a field): each stanza alone, 1 s
    for stanza in data.split(b"\n\n"):
        name = re.search(rb"^Filename: *(\S+)", stanza, re.M)
        size = re.search(rb"^Size: *(\d+)", stanza, re.M)
        sha = re.search(rb"^SHA256: *([0-9a-fA-F]{64})", stanza, re.M)
        if name and size and sha:
            out[name.group(1).decode(errors="replace")] = (int(size.group(1)), sha.group(1).decode().lower())
    return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, proxy: "DebProxy", handler):
        self.proxy = proxy
        super().__init__(("127.0.0.1", 0), handler)

    def handle_error(self, request, client_address) -> None:
        """Never a traceback on the console: a dropped client is normal, the
        rest is one line in the stage log."""
        err = sys.exc_info()[1]
        if not isinstance(err, (BrokenPipeError, ConnectionResetError, TimeoutError)):
            self.proxy._note(f"# deb proxy: request failed: {type(err).__name__}: {err}")


class DebProxy:
    def __init__(self, store: Path, sources: Iterable[str], *, keyring_sources: Iterable[str] = (),
                 upstream_proxy: str | None = None, log=None, timeout: float = 60.0):
        """store: the .deb cache directory; sources: the archive URLs the
        target's apt may fetch from (nothing else is forwarded);
        keyring_sources: archives only `pool/.../*-keyring_*.deb` files are
        forwarded from (multistrap fetches its keyring with the host's apt
        sources, see host_apt_sources);
        upstream_proxy: the target's apt_proxy, used for every upstream
        fetch; log: the stage's hypersolid.run.Log (notes); timeout: seconds
        an upstream connect or read may take."""
        self.store = Path(store)
        self.upstream_proxy = upstream_proxy
        self.timeout = timeout
        self.log = log
        # (netloc, base path, URL as given, keyring packages only)
        self.sources: list[tuple[str, str, str, bool]] = []
        for urls, keyring_only in ((sources, False), (keyring_sources, True)):
            for url in urls:
                parts = urlsplit(url)
                if parts.scheme == "http":
                    self.sources.append((_netloc(parts), unquote(parts.path).rstrip("/"),
                                         url.rstrip("/"), keyring_only))
        self.failures: dict[str, str] = {}  # "the mirror URL" -> cause, first cause each
        self.downloaded = 0  # bytes fetched from upstream, indexes included
        self.downloaded_debs = 0  # of which package files
        self.served_from_cache = 0  # bytes of .deb served without downloading
        self.refetched = 0  # cached .debs found damaged and downloaded again
        self._lock = threading.Lock()
        self._index: dict[str, tuple[int, str]] = {}  # store-relative path -> (size, sha256)
        self._parsing = 0  # index parses in progress (a .deb lookup waits for them)
        self._parsed = threading.Condition(self._lock)
        self._release_seen = False
        self._by_hash: set[str] = set()  # SHA256 digests of Packages files (Release files)
        self._verified: dict[str, list] = {}  # store-relative path -> [size, mtime_ns, ino, sha256]
        self._verified_dirty = False
        self._upstream = Upstream(self.timeout)  # kept-alive connections, one set per handler thread
        self._server = _Server(self, self._handler())
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "DebProxy":
        self.sweep()
        self._load_verified()
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._upstream.close()
        self._save_verified()

    # -- bookkeeping -----------------------------------------------------

    def _note(self, text: str) -> None:
        if self.log is None:
            return
        try:
            self.log.note(text)
        except OSError:
            pass  # the log's disk is full too: nothing better to do

    def _count(self, attr: str, n: int) -> None:
        with self._lock:
            setattr(self, attr, getattr(self, attr) + n)

    def failure_message(self) -> str | None:
        """'cannot reach the mirror URL: cause[; ...]', or None."""
        with self._lock:
            if not self.failures:
                return None
            return "cannot reach " + "; ".join(f"{what}: {cause}" for what, cause in self.failures.items())

    def _fail(self, what: str, cause: str) -> None:
        with self._lock:
            first = what not in self.failures
            self.failures.setdefault(what, cause)
        if first:
            self._note(f"# deb proxy: cannot reach {what}: {cause}")

    def sweep(self) -> list[Path]:
        """Remove temp files of writers that are gone (killed, or ENOSPC
        before the cleanup ran)."""
        removed = []
        for dirpath, _dirs, _files in os.walk(self.store):
            removed += sweep_leftovers(Path(dirpath))
        if removed:
            self._note(f"# deb proxy: removed {len(removed)} temp file(s) of dead writers from {self.store}")
        return removed

    def _load_verified(self) -> None:
        try:
            data = json.loads((self.store / VERIFIED).read_text())
            self._verified = {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 4}
        except (OSError, ValueError, AttributeError):
            self._verified = {}

    def _save_verified(self) -> None:
        if not self._verified_dirty:
            return
        path = self.store / VERIFIED
        try:
            merged = json.loads(path.read_text())  # another proxy (doit -n 2) may have added some
            if not isinstance(merged, dict):
                merged = {}
        except (OSError, ValueError):
            merged = {}
        merged.update(self._verified)
        merged = {rel: v for rel, v in merged.items() if (self.store / rel).is_file()}  # 3 us a file
        tmp = temp_name(path)
        try:
            tmp.write_text(json.dumps(merged, separators=(",", ":")))
            os.replace(tmp, path)
        except OSError as err:
            self._note(f"# deb proxy: cannot save {path}: {err.strerror}")
        finally:
            tmp.unlink(missing_ok=True)

    # -- requests ----------------------------------------------------------

    def route(self, url: str) -> tuple[str, str, str, str]:
        """(source URL, path below the source, its index key, its file
        below the store) of an allowed request URL; raises Refused otherwise.

        The index key is the decoded path (as Packages' Filename says it);
        the file keeps apt's own escaping (`%2b`), as caches always had it."""
        try:
            parts = urlsplit(url)
            netloc = _netloc(parts)
        except ValueError:
            raise Refused("not a valid URL") from None
        if parts.scheme != "http" or not parts.hostname:
            raise Refused("only absolute http:// URLs are proxied")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise Refused("no query, fragment or credentials")
        path = unquote(parts.path)
        for src_netloc, base, src_url, keyring_only in self.sources:
            if netloc == src_netloc and path.startswith(base + "/"):
                rest = path[len(base) + 1:]
                if keyring_only and not KEYRING_DEB.fullmatch(rest):
                    continue
                segments = rest.split("/")
                if not all(SEGMENT.fullmatch(s) for s in segments):
                    raise Refused("not a plain archive path")
                top = netloc.replace(":", "_")
                key = f"{top}{base}/{rest}"
                stored = f"{top}{parts.path}"
                return src_url, rest, key, stored
        raise Refused(f"{parts.scheme}://{parts.netloc}{parts.path} is not under a source of this target")

    def _fetch(self, url: str, source: str) -> tuple[int, dict, bytes]:
        """GET url upstream over a kept-alive connection of this thread:
        a new TCP (and CDN) handshake per package costs more than the
        download of most packages."""
        parts = urlsplit(url)
        if self.upstream_proxy:
            host, what = urlsplit(self.upstream_proxy).netloc, f"the apt proxy {self.upstream_proxy}"
        elif any(src == source and not keyring_only for *_, src, keyring_only in self.sources):
            host, what = parts.netloc, f"the mirror {source}"
        else:
            host, what = parts.netloc, f"the host's apt source {source} (for the keyring)"
        target = url if self.upstream_proxy else (parts.path or "/")
        try:
            resp, body = self._upstream.get(host, target, {"Host": parts.netloc, "User-Agent": "hypersolid-debproxy"})
        except (http.client.HTTPException, OSError) as err:
            self._fail(what, describe_error(err, self.timeout))
            raise
        self._count("downloaded", len(body))
        if resp.status >= 500:
            self._fail(what, f"it answers {resp.status} {resp.reason}")
        keep = {k: resp.headers[k] for k in ("Content-Type", "Last-Modified") if resp.headers.get(k)}
        return resp.status, keep, body

    def _expected(self, rel: str) -> tuple[int, str] | None:
        with self._parsed:
            if self._parsing:
                start = time.monotonic()
                self._parsed.wait_for(lambda: self._parsing == 0, timeout=120)
                self._note(f"# deb proxy: {rel.rsplit('/', 1)[-1]} waited {time.monotonic() - start:.2f}s "
                           "for the index checksums")
            return self._index.get(rel)

    def _is_packages(self, rest: str) -> bool:
        """Whether rest (a path below a source) is a Packages index: by name,
        or a by-hash URL whose digest a Release file gave to a Packages file
        (any by-hash file when no Release file was seen)."""
        if "/dists/" not in "/" + rest:
            return False
        name = rest.rsplit("/", 1)[-1]
        if name in INDEX_NAMES:
            return True
        if "/by-hash/SHA256/" in rest:
            with self._lock:
                return name in self._by_hash if self._release_seen else True
        return False

    def _learn_release(self, body: bytes) -> None:
        """Note the by-hash digests of the Packages files a Release lists."""
        digests = {m[0].decode().lower() for m in RELEASE_SHA256.findall(body)
                   if m[1].rsplit(b"/", 1)[-1].decode(errors="replace") in INDEX_NAMES}
        with self._lock:
            self._release_seen = True
            self._by_hash |= digests

    def _learn(self, key: str, rest: str, body: bytes) -> None:
        """Add a Packages index (key: its index key, rest: its path below
        the source) to the map."""
        start = time.monotonic()
        try:
            entries = parse_packages(body)
            root = key[:len(key) - len(rest)].rstrip("/")
            found = {f"{root}/{name}": v for name, v in entries.items()}
            with self._lock:
                self._index.update(found)
            if found:
                self._note(f"# deb proxy: {len(found)} package checksums from {rest} "
                           f"in {time.monotonic() - start:.2f}s")
        except Exception as err:  # a thread's exception would be a traceback on the console
            self._note(f"# deb proxy: cannot read {rest}: {type(err).__name__}: {err}")
        finally:
            with self._parsed:
                self._parsing -= 1
                self._parsed.notify_all()

    def _check_cached(self, f, rel: str, want: tuple[int, str]) -> str | None:
        """None if the open cached file f matches its index entry, else what
        is wrong (the bytes checked are the bytes then served)."""
        st = os.fstat(f.fileno())
        if st.st_size != want[0]:
            return f"size {st.st_size}, the index says {want[0]}"
        known = self._verified.get(rel)
        if known == [st.st_size, st.st_mtime_ns, st.st_ino, want[1]]:
            return None
        h = hashlib.sha256()
        while chunk := f.read(1 << 20):
            h.update(chunk)
        f.seek(0)
        if h.hexdigest() != want[1]:
            return "SHA256 differs from the index"
        with self._lock:
            self._verified[rel] = [st.st_size, st.st_mtime_ns, st.st_ino, want[1]]
            self._verified_dirty = True
        return None

    def _store(self, path: Path, rel: str, body: bytes, sha: str) -> None:
        """Store body atomically; on failure (full disk) note it and go on:
        the caller passes the bytes to apt anyway."""
        tmp = temp_name(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "xb") as f:
                f.write(body)
            os.replace(tmp, path)
        except OSError as err:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            free = "unknown"
            for d in (path.parent, self.store):
                try:
                    st = os.statvfs(d)
                    free = f"{st.f_bavail * st.f_frsize} bytes free in {d}"
                    break
                except OSError:
                    continue
            self._note(f"# deb proxy: cannot store {path} ({len(body)} bytes): "
                       f"{err.strerror or err} ({free}); passed to apt without caching")
            return
        st = path.stat()
        with self._lock:
            self._verified[rel] = [st.st_size, st.st_mtime_ns, st.st_ino, sha]
            self._verified_dirty = True

    def _handler(proxy):  # noqa: N805 - closes over the proxy instance
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the build log for apt's own lines
                pass

            def parse_request(self) -> bool:
                if not super().parse_request():
                    return False
                if self.command not in ("GET", "HEAD"):
                    self.close_connection = True  # an unread body would be taken for the next request
                    self._text(403, f"method {self.command} is not proxied")
                    return False
                return True

            def do_GET(self, head: bool = False):
                url = self.path
                try:
                    source, rest, key, rel = proxy.route(url)
                except Refused as why:
                    self._text(403, str(why), head)
                    return
                cached = proxy.store / rel if rest.endswith(".deb") else None
                want = proxy._expected(key) if cached is not None else None
                try:
                    f = open(cached, "rb") if cached is not None else None
                except OSError:
                    f = None  # not cached (or unreadable): fetch it
                if f is not None:
                    with f:
                        wrong = proxy._check_cached(f, rel, want) if want else None
                        if wrong is None:
                            size = os.fstat(f.fileno()).st_size
                            self._send(200, {"Content-Type": DEB_TYPE}, size)
                            if not head:
                                shutil.copyfileobj(f, self.wfile)
                            proxy._count("served_from_cache", size)
                            mark_file_used(cached)
                            return
                    proxy._note(f"# deb proxy: {cached} is damaged ({wrong}); downloading it again")
                    cached.unlink(missing_ok=True)
                    proxy._count("refetched", 1)
                try:
                    status, headers, body = proxy._fetch(url, source)
                except (http.client.HTTPException, OSError) as err:
                    self._text(502, f"{url}: {describe_error(err, proxy.timeout)}", head)
                    return
                if cached is not None and status == 200:
                    sha = hashlib.sha256(body).hexdigest()
                    if want and (len(body), sha) != want:
                        proxy._note(f"# deb proxy: {url} arrived damaged (size {len(body)}, index says "
                                    f"{want[0]}, SHA256 {'ok' if sha == want[1] else 'differs'}); not cached")
                    else:
                        proxy._store(cached, rel, body, sha)
                    proxy._count("downloaded_debs", len(body))
                index = status == 200 and proxy._is_packages(rest)
                if status == 200 and rest.rsplit("/", 1)[-1] in ("InRelease", "Release"):
                    proxy._learn_release(body)
                if index:
                    with proxy._parsed:
                        proxy._parsing += 1  # before apt has the answer, so its next request waits
                try:
                    self._send(status, headers, len(body))
                    if not head:
                        self.wfile.write(body)
                        self.wfile.flush()
                finally:
                    if index:  # in its own thread: apt's next index on this connection need not wait
                        threading.Thread(target=proxy._learn, args=(key, rest, body), daemon=True).start()

            def do_HEAD(self):
                self.do_GET(head=True)

            def _text(self, status: int, message: str, head: bool = False):
                msg = f"hypersolid deb proxy: {message}\n".encode()
                self._send(status, {"Content-Type": "text/plain"}, len(msg))
                if not head:
                    self.wfile.write(msg)

            def _send(self, status, headers, length):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(length))
                self.end_headers()

        return Handler


# -- exact .debs for the bootstrap (a lock's entries) ------------------------

def apt_quote(path: str) -> str:
    """A pool path as apt writes it in a URL (`+` -> %2b, `~` -> %7e, `:` ->
    %3a): the layout of the store, which DebProxy fills from apt's requests."""
    return re.sub(r"[^A-Za-z0-9._/-]", lambda m: "".join(f"%{b:02x}" for b in m.group().encode()), path)


def store_path(store: Path, url: str) -> Path:
    """Where the .deb at url (pool path decoded) lives in the store."""
    parts = urlsplit(url)
    return Path(store) / (_netloc(parts).replace(":", "_") + apt_quote(parts.path))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class MissingDebs(Exception):
    """Some locked .debs are neither in the store nor on their mirror."""


def fetch_debs(store: Path, entries, *, upstream_proxy: str | None = None, log=None, timeout: float = 60.0,
               jobs: int = 4, stats: dict | None = None, progress=None) -> dict:
    """entry -> verified local file of every lock entry: from the store when
    its SHA256 matches, else downloaded from entry.url (through the apt
    proxy if there is one), checked and stored atomically.  Raises
    MissingDebs naming every entry that could not be had (one line), so a
    lock never silently installs anything else.  `stats`, when given, gets
    the bytes "downloaded" and "reused"; `progress(done, total, stats)`, when
    given, is called as each entry is had (the console's n/N)."""
    from concurrent.futures import ThreadPoolExecutor

    store = Path(store)
    stats = {} if stats is None else stats
    stats.update(downloaded=0, reused=0)
    lock = threading.Lock()
    upstream = Upstream(timeout)

    def one(entry):
        if urlsplit(entry.url).scheme == "file":
            path = Path(unquote(urlsplit(entry.url).path))
            if path.is_file() and _sha256(path) == entry.sha256:
                return entry, path, None
            return entry, None, "missing or different at its file: source"
        path = store_path(store, entry.url)
        if path.is_file():
            if _sha256(path) == entry.sha256:
                mark_file_used(path)  # its last use, for `hypersolid cache gc`
                with lock:
                    stats["reused"] += path.stat().st_size
                return entry, path, None
            if log:
                log.note(f"# {path} differs from the lock's SHA256; downloading it again")
        parts = urlsplit(entry.url)
        host = urlsplit(upstream_proxy).netloc if upstream_proxy else parts.netloc
        try:
            resp, body = upstream.get(host, entry.url if upstream_proxy else apt_quote(parts.path),
                                      {"Host": parts.netloc, "User-Agent": "hypersolid-fetch"},
                                      tls=parts.scheme == "https" and not upstream_proxy)
        except (http.client.HTTPException, OSError) as err:
            return entry, None, f"{entry.source}: {describe_error(err, timeout)}"
        if resp.status != 200:
            return entry, None, f"{resp.status} {resp.reason} from {entry.source}"
        if hashlib.sha256(body).hexdigest() != entry.sha256:
            return entry, None, f"the SHA256 of {entry.url} differs from the lock's"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(path)
        try:
            tmp.write_bytes(body)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        with lock:
            stats["downloaded"] += len(body)
        return entry, path, None

    done, total = [0], len(entries)

    def counted(entry):
        result = one(entry)
        if progress is not None:
            with lock:
                done[0] += 1
                progress(done[0], total, stats)
        return result

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(counted, sorted(entries)))
    finally:
        upstream.close()
    missing = [(e, why) for e, path, why in results if path is None]
    if missing:
        causes = dict.fromkeys(why for _, why in missing)
        raise MissingDebs(f"{len(missing)} locked package version(s) are neither in {store} nor on their mirror: "
                          + " ".join(f"{e.package}={e.version}" for e, _ in missing[:20])
                          + (" ..." if len(missing) > 20 else "") + f" ({'; '.join(list(causes)[:3])})")
    if log:
        log.note(f"# .debs: {stats['reused']} bytes from {store}, {stats['downloaded']} bytes downloaded")
    return {e: path for e, path, _ in results}
