"""A small caching HTTP proxy that apt (inside multistrap) downloads through.

multistrap unpacks every .deb it finds in the tree's archive directory, so
packages cannot be reused by pre-seeding that directory.  Instead apt is
pointed at this proxy (http_proxy): pool files (.deb, immutable per URL) are
served from ``<cache>/debs/<host>/<path>`` or fetched once and stored
atomically; index files pass through untouched.  Upstream fetches go through
the target's apt proxy when it has one.
"""
from __future__ import annotations

import os
import secrets
import shutil
import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


class DebProxy:
    def __init__(self, store: Path, upstream_proxy: str | None = None):
        self.store = Path(store)
        self.upstream_proxy = upstream_proxy
        self.downloaded = 0  # bytes fetched from upstream, indexes included
        self.downloaded_debs = 0  # of which package files
        self.served_from_cache = 0  # bytes of .deb served without downloading
        self._lock = threading.Lock()
        self._local = threading.local()  # upstream connections, one set per handler thread
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "DebProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _count(self, attr: str, n: int) -> None:
        with self._lock:
            setattr(self, attr, getattr(self, attr) + n)

    def _cached_path(self, url: str) -> Path | None:
        parts = urlsplit(url)
        if not parts.path.endswith(".deb") or ".." in parts.path.split("/"):
            return None
        return self.store / parts.netloc.replace(":", "_") / parts.path.lstrip("/")

    def _fetch(self, url: str) -> tuple[int, dict, bytes]:
        """GET url upstream over a kept-alive connection of this thread:
        a new TCP (and CDN) handshake per package costs more than the
        download of most packages."""
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise OSError(f"only http:// is proxied, not {parts.scheme}://")
        host = urlsplit(self.upstream_proxy).netloc if self.upstream_proxy else parts.netloc
        target = url if self.upstream_proxy else (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conns = self._local.__dict__.setdefault("conns", {})
        for attempt in (1, 2):
            conn = conns.get(host) or http.client.HTTPConnection(host, timeout=120)
            try:
                conn.request("GET", target, headers={"Host": parts.netloc, "User-Agent": "hypersolid-debproxy"})
                resp = conn.getresponse()
                body = resp.read()
            except (http.client.HTTPException, OSError):
                conn.close()
                conns.pop(host, None)
                if attempt == 2:
                    raise
                continue
            if resp.will_close:
                conn.close()
                conns.pop(host, None)
            else:
                conns[host] = conn
            break
        self._count("downloaded", len(body))
        keep = {k: resp.headers[k] for k in ("Content-Type", "Last-Modified") if resp.headers.get(k)}
        return resp.status, keep, body

    def _store(self, path: Path, body: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        tmp.write_bytes(body)
        os.replace(tmp, path)

    def _handler(proxy):  # noqa: N805 - closes over the proxy instance
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the build log for apt's own lines
                pass

            def do_GET(self, head: bool = False):
                url = self.path
                cached = proxy._cached_path(url)
                if cached is not None and cached.is_file():
                    size = cached.stat().st_size
                    self._send(200, {"Content-Type": "application/vnd.debian.binary-package"}, size)
                    if not head:
                        with open(cached, "rb") as f:
                            shutil.copyfileobj(f, self.wfile)
                    proxy._count("served_from_cache", size)
                    return
                try:
                    status, headers, body = proxy._fetch(url)
                except OSError as err:
                    msg = f"hypersolid deb proxy: {url}: {err}\n".encode()
                    self._send(502, {"Content-Type": "text/plain"}, len(msg))
                    self.wfile.write(msg)
                    return
                if cached is not None and status == 200:
                    proxy._store(cached, body)
                    proxy._count("downloaded_debs", len(body))
                self._send(status, headers, len(body))
                if not head:
                    self.wfile.write(body)

            def do_HEAD(self):
                self.do_GET(head=True)

            def _send(self, status, headers, length):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(length))
                self.end_headers()

        return Handler
