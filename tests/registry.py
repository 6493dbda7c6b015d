"""A real OCI registry for tests: Debian's docker-registry package (the CNCF
distribution registry), unpacked with `apt-get download` + `dpkg -x` so no
system service is installed or started.  It listens on 127.0.0.1 at a free
port, stores blobs under a directory the test owns and wants htpasswd
(bcrypt) credentials, like a forge's registry wants a token."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt

USER, PASSWORD = "builder", "s3cret-for-tests"


def registry_binary(cache: Path) -> Path:
    """The registry binary, unpacked once into cache/.docker-registry/."""
    root = cache / ".docker-registry"  # a dot name: no stage of the cache
    binary = root / "usr" / "bin" / "docker-registry"
    if binary.exists():
        return binary
    download = cache / ".docker-registry.dl"
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir(parents=True)
    fetch = ["apt-get", "download", "-q", "docker-registry"]
    if subprocess.run(fetch, cwd=download, capture_output=True).returncode != 0:
        # No package lists yet (a fresh machine whose host packages were all there).
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
        subprocess.run(fetch, cwd=download, check=True, capture_output=True)
    deb, = download.glob("docker-registry_*.deb")
    work = cache / ".docker-registry.tmp"
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["dpkg", "-x", str(deb), str(work)], check=True)
    shutil.rmtree(root, ignore_errors=True)
    os.rename(work, root)
    shutil.rmtree(download)
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """One registry process; `storage` is its filesystem driver's root."""

    def __init__(self, binary: Path, workdir: Path, port: int | None = None, read_only: bool = False):
        self.binary, self.workdir, self.read_only = binary, workdir, read_only
        self.port = port or free_port()
        self.storage = workdir / "storage"
        self.log_path = workdir / "registry.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str = "cache") -> str:
        """The HYPERSOLID_REMOTE_CACHE value for this registry."""
        return f"oci+http://{self.address}/{path}"

    def env(self, path: str = "cache", **extra: str) -> dict[str, str]:
        return {"HYPERSOLID_REMOTE_CACHE": self.url(path), "HYPERSOLID_REMOTE_CACHE_USER": USER,
                "HYPERSOLID_REMOTE_CACHE_PASSWORD": PASSWORD, **extra}

    def start(self) -> "Registry":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        htpasswd = self.workdir / "htpasswd"
        htpasswd.write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(5)).decode()}\n")
        config = self.workdir / "config.yml"
        config.write_text(f"""\
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: {self.storage}
  delete:
    enabled: true
  maintenance:
    readonly:
      enabled: {"true" if self.read_only else "false"}
http:
  addr: {self.address}
auth:
  htpasswd:
    realm: hypersolid-tests
    path: {htpasswd}
""")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(self.binary), "serve", str(config)], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"registry exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://{self.address}/v2/", timeout=1)
            except urllib.error.HTTPError as err:
                if err.code == 401:  # up, and asking for credentials
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"registry did not answer on {self.address} within 30 s (log: {self.log_path})")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def blob_files(self) -> dict[str, Path]:
        """The stored blobs by digest ("sha256:…"), as the filesystem driver keeps them."""
        base = self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256"
        return {f"sha256:{d.name}": d / "data" for d in base.glob("*/*") if (d / "data").exists()}

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """Every file under storage with its size and mtime: what a read-only client must not change."""
        return {str(p.relative_to(self.storage)): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in sorted(self.storage.rglob("*")) if p.is_file()}

    def requests(self, method: str) -> int:
        """How many requests of this method the registry logged (its access log)."""
        return self.log_path.read_text().count(f'"{method} /v2/')
