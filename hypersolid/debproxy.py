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
import threading
import urllib.error
import urllib.request
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
        proxies = {"http": upstream_proxy, "https": upstream_proxy} if upstream_proxy else {}
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
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
        try:
            with self._opener.open(urllib.request.Request(url), timeout=120) as resp:
                body = resp.read()
                status, headers = resp.status, resp.headers
        except urllib.error.HTTPError as err:
            body, status, headers = err.read(), err.code, err.headers
        self._count("downloaded", len(body))
        keep = {k: headers[k] for k in ("Content-Type", "Last-Modified") if headers.get(k)}
        return status, keep, body

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
