"""The remote cache: cache entries as OCI artifacts on a registry.

HYPERSOLID_REMOTE_CACHE=oci://HOST[:PORT]/PATH (https) or oci+http://…
(plain HTTP); an entry lives in repository <PATH>/<stage>, tagged with its
key, packed by entry.pack (docs/remote-cache.md).  The registry is a cache,
never a requirement: a remote that is down or refuses a push costs one
warning line, and the build goes on with the local cache.

The client is oras-py, with three things of its own: no retry loop (oras
sleeps up to two minutes per request on a dead host), uploads in bounded
chunks read from disk (oras' monolithic upload reads the whole blob into
memory; some registries cap a chunk at a few MiB), and downloads checked
against their sha256 while they stream (oras does not check).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import secrets
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # imported where a remote is used: ~70 ms of every no-op build otherwise
    import requests

from .cache import Cache, digest_file, remove_tree
from .entry import FILE_TYPE, MANIFEST_TYPE, TITLE, TREE_TYPE, key_of
from .run import BuildError

ENV = "HYPERSOLID_REMOTE_CACHE"
DEFAULT_CHUNK_MIB = 4
TIMEOUT = (10, 120)  # connect, read (seconds)
# An OCI repository name component (distribution's grammar).
COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")


class RemoteConfigError(Exception):
    """A HYPERSOLID_REMOTE_CACHE* value that cannot be used (one line)."""


class RemoteFailed(Exception):
    """The registry cannot be reached or refused a request."""


class BadBlob(Exception):
    """A downloaded blob that does not match its digest or size."""


@dataclass(frozen=True)
class Config:
    url: str
    host: str  # HOST[:PORT]
    path: str  # repository prefix, may be ""
    insecure: bool  # plain HTTP
    mode: str  # "read" or "readwrite"
    user: str | None = None
    password: str | None = None
    chunk: int = DEFAULT_CHUNK_MIB << 20

    def repository(self, stage: str) -> str:
        return f"{self.path}/{stage}" if self.path else stage


def config_from_env(env=os.environ) -> Config | None:
    """The remote cache's settings, or None when HYPERSOLID_REMOTE_CACHE is unset."""
    url = env.get(ENV, "").strip()
    if not url:
        return None
    m = re.fullmatch(r"(oci|oci\+http)://([^/\s]+)(?:/(.*))?", url)
    if not m:
        raise RemoteConfigError(f"{ENV}={url}: expected oci://HOST[:PORT]/PATH or oci+http://HOST[:PORT]/PATH")
    scheme, host, path = m.group(1), m.group(2), (m.group(3) or "").strip("/")
    if not re.fullmatch(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](:[0-9]{1,5})?", host):
        raise RemoteConfigError(f"{ENV}={url}: {host!r} is not a host name[:port]")
    bad = [c for c in path.split("/") if not COMPONENT.fullmatch(c)] if path else []
    if bad:
        raise RemoteConfigError(f"{ENV}={url}: repository path component {bad[0]!r} is not valid "
                                "(lower-case letters, digits and . _ - between them)")
    mode = env.get(f"{ENV}_MODE", "").strip() or "readwrite"
    if mode not in ("read", "readwrite"):
        raise RemoteConfigError(f"{ENV}_MODE={mode}: expected read or readwrite")
    user, password = env.get(f"{ENV}_USER") or None, env.get(f"{ENV}_PASSWORD") or None
    if (user is None) != (password is None):
        given, missing = (f"{ENV}_USER", f"{ENV}_PASSWORD") if user else (f"{ENV}_PASSWORD", f"{ENV}_USER")
        raise RemoteConfigError(f"{given} is set but {missing} is not (set both, or neither to use the "
                                "docker config and its credential helpers)")
    chunk_text = env.get(f"{ENV}_CHUNK_MIB", "").strip() or str(DEFAULT_CHUNK_MIB)
    if not chunk_text.isdigit() or not 1 <= int(chunk_text) <= 1024:
        raise RemoteConfigError(f"{ENV}_CHUNK_MIB={chunk_text}: expected a whole number of MiB from 1 to 1024")
    return Config(url, host, path, scheme == "oci+http", mode, user, password, int(chunk_text) << 20)


@functools.lru_cache(maxsize=None)
def _client_class():
    """oras' classes, imported on first use: oras takes ~2 s to import
    (jsonschema grammars), which the no-op build must not pay."""
    import oras.auth
    import oras.provider

    class _Auth(oras.auth.TokenAuth):
        """oras' token auth, which also answers a Basic challenge (registries
        behind htpasswd, such as a self-hosted distribution registry)."""

        basic = False

        def get_auth_header(self):
            if self.basic and getattr(self, "_basic_auth", None):
                return {"Authorization": f"Basic {self._basic_auth}"}
            return super().get_auth_header()

        def authenticate_request(self, original, headers, refresh=False):
            challenge = original.headers.get("Www-Authenticate", "")
            if challenge.lower().startswith("basic"):
                if not getattr(self, "_basic_auth", None):
                    return headers, False
                self.basic = True
                return {**(headers or {}), **self.get_auth_header()}, True
            return super().authenticate_request(original, headers, refresh)


    class _Client(oras.provider.Registry):
        """oras' registry client, one request per call: a 401 gets a fresh token
        for the challenge's scope (each stage is its own repository) and is
        sent once more; no sleeping retries, and a time limit."""

        def __init__(self, config: Config):
            super().__init__(hostname=config.host, insecure=config.insecure)
            self.auth = _Auth()
            self.auth.session, self.auth.prefix, self.auth._tls_verify = self.session, self.prefix, True
            if config.user:
                self.auth.set_basic_auth(config.user, config.password)
            else:  # ~/.docker/config.json ($DOCKER_CONFIG), its credsStore and credHelpers
                docker = os.environ.get("DOCKER_CONFIG")
                configs = [os.path.join(docker, "config.json")] if docker and os.path.exists(
                    os.path.join(docker, "config.json")) else None
                self.auth.load_configs(self.get_container(f"{config.repository('x')}:x"), configs=configs)

        def do_request(self, url, method="GET", data=None, headers=None, json=None, stream=False):
            headers = dict(headers or {})

            def send(extra: dict) -> requests.Response:
                return self.session.request(method, url, data=data, json=json, headers={**headers, **extra},
                                            stream=stream, timeout=TIMEOUT)

            response = send(self.auth.get_auth_header())
            if response.status_code == 401:
                retry, changed = self.auth.authenticate_request(response, dict(headers), refresh=True)
                if changed:
                    response.close()
                    response = send({k: v for k, v in retry.items() if k.lower() == "authorization"})
            return response

    return _Client


def _requests():
    import requests
    return requests


def _with_digest(location: str, digest: str) -> str:
    """The upload location with ?digest= (oras.utils.append_url_params, without importing oras)."""
    import oras.utils
    return oras.utils.append_url_params(location, {"digest": digest})


def _problem(response: requests.Response) -> str:
    """'401 Unauthorized (authentication required)' from a registry's error body."""
    try:
        detail = "; ".join(e.get("message", "") for e in response.json().get("errors", []))
    except (ValueError, AttributeError):
        detail = ""
    return f"{response.status_code} {response.reason}" + (f" ({detail})" if detail else "")


@dataclass
class Stats:
    """What this process moved (the bench reports it)."""
    downloaded: int = 0
    uploaded: int = 0
    fetched: list = field(default_factory=list)  # "stage/key" of each entry or item fetched
    pushed: list = field(default_factory=list)


class Remote:
    """One process's view of the remote cache: which keys it has (memo), and
    whether it is still usable (a failure switches it off for the run)."""

    def __init__(self, config: Config):
        self.config = config
        self._client = None  # oras' client, made on first use
        self.known: dict[tuple[str, str], bool] = {}
        self._manifests: dict[tuple[str, str], bytes] = {}
        self.down = False
        self.push_refused = False
        self.stats = Stats()
        self.pid = os.getpid()
        # One run, several processes (stages side by side in doit workers,
        # forked from the process that loaded the tasks): a marker in
        # <cache>/tmp/ named for the run says the warning was given.
        self.run = f"{os.getpid()}.{secrets.token_hex(3)}"
        self.run_dir: Path | None = None

    @property
    def client(self):
        """Made on first use: the no-op build never reads credentials or runs a helper."""
        if self._client is None:
            self._client = _client_class()(self.config)
        return self._client

    # ---- warnings -------------------------------------------------------
    def _warn(self, text: str) -> None:
        print(f"hypersolid: warning: remote cache {self.config.url}: {text}", file=sys.stderr, flush=True)

    def _went_down(self, err: Exception) -> None:
        if not self.down:
            self.down = True
            if self._first_in_run("remote-down"):
                self._warn(f"{err}; building with the local cache only")

    def _first_in_run(self, what: str) -> bool:
        """Whether no other process of this run has said `what` yet."""
        if self.run_dir is None:
            return True
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.run_dir / f"{what}.{self.run}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return False
        except OSError:
            pass
        return True

    # ---- reading --------------------------------------------------------
    def _url(self, stage: str, what: str) -> str:
        return f"{'http' if self.config.insecure else 'https'}://{self.config.host}/v2/{self.config.repository(stage)}/{what}"

    def _request(self, method: str, url: str, **kw) -> requests.Response:
        try:
            return self.client.do_request(url, method, **kw)
        except (_requests().RequestException, OSError) as err:
            raise RemoteFailed(f"cannot reach {self.config.host} ({type(err).__name__})") from None
        except ValueError as err:  # oras: a token endpoint that would not answer
            raise RemoteFailed(str(err)) from None

    def has(self, stage: str, key: str) -> bool:
        """Whether the remote has this entry (a manifest HEAD, once per process)."""
        if self.down:
            return False
        if (stage, key) in self.known:
            return self.known[(stage, key)]
        try:
            r = self._request("HEAD", self._url(stage, f"manifests/{key}"), headers={"Accept": MANIFEST_TYPE})
            if r.status_code not in (200, 404):
                raise RemoteFailed(f"HEAD {stage}:{key[:12]}: {_problem(r)}")
        except RemoteFailed as err:
            self._went_down(err)
            return False
        self.known[(stage, key)] = r.status_code == 200
        return self.known[(stage, key)]

    def forget(self, stage: str, key: str) -> None:
        """Count stage/key as absent for the rest of the run (its copy failed)."""
        self.known[(stage, key)] = False
        self._manifests.pop((stage, key), None)

    def _manifest(self, stage: str, key: str) -> bytes:
        if (stage, key) in self._manifests:
            return self._manifests[(stage, key)]
        r = self._request("GET", self._url(stage, f"manifests/{key}"), headers={"Accept": MANIFEST_TYPE})
        if r.status_code != 200:
            raise RemoteFailed(f"GET manifest {stage}:{key[:12]}: {_problem(r)}")
        self._manifests[(stage, key)] = r.content
        return r.content

    @contextmanager
    def open_blob(self, stage: str, descriptor: dict, check: bool = True) -> Iterator[Iterator[bytes]]:
        """A blob's bytes as they stream in; the last chunk is followed by a
        check of their sha256 and size (BadBlob when they differ; check=False
        for entry.unpack, which checks them itself)."""
        digest, size = descriptor["digest"], int(descriptor["size"])
        if not digest.startswith("sha256:"):
            raise BadBlob(f"{stage}: blob {digest}: only sha256 digests are accepted")
        r = self._request("GET", self._url(stage, f"blobs/{digest}"), stream=True)
        try:
            if r.status_code != 200:
                raise RemoteFailed(f"GET blob {digest[:19]}: {_problem(r)}")

            def chunks() -> Iterator[bytes]:
                h, n = hashlib.sha256(), 0
                try:
                    for chunk in r.iter_content(1 << 20):
                        if check:
                            h.update(chunk)
                        n += len(chunk)
                        self.stats.downloaded += len(chunk)
                        if n > size:
                            break
                        yield chunk
                except _requests().RequestException as err:
                    raise RemoteFailed(f"download of {digest[:19]} broke off ({type(err).__name__})") from None
                if check and (n != size or f"sha256:{h.hexdigest()}" != digest):
                    raise BadBlob(f"{stage}: blob {digest[:19]}… from {self.config.host} does not match its "
                                  f"digest ({n} bytes, sha256:{h.hexdigest()[:12]}…)")
            yield chunks()
        finally:
            r.close()

    def fetch(self, cache: Cache, stage: str, key: str) -> Path | None:
        """Download the entry into the local cache (entry.unpack verifies it
        and publishes it atomically); None, with a warning, when it cannot."""
        from . import entry
        if not self.has(stage, key):
            return None
        try:
            manifest = self._manifest(stage, key)
            path = entry.unpack(cache, stage, key, manifest, lambda d: self.open_blob(stage, d, check=False))
        except (entry.Corrupt, BadBlob) as err:
            self.forget(stage, key)  # rebuild it locally; never publish what failed
            self._warn(f"{stage} entry {key} is corrupt, not used: {err}")
            return None
        except BuildError as err:  # tar could not unpack a tree (damaged on the way, or a full disk)
            self.forget(stage, key)
            self._warn(f"{stage} entry {key} could not be unpacked, not used: {err.message} (log: {err.log})")
            return None
        except RemoteFailed as err:
            self._went_down(err)
            return None
        self.stats.fetched.append(f"{stage}/{key}")
        return path

    def fetch_file(self, cache: Cache, stage: str, key: str, name: str) -> Path | None:
        """One file of an entry that holds a tree, without the tree
        (bootstrap's epoch and lock): checked against the entry's manifest
        (which hashes to the key) and kept in
        <cache>/.remote-files/<stage>/<key>/<name>.  None for an entry of
        files only (fetch it whole: its other files are wanted too)."""
        dest = cache.root / ".remote-files" / stage / key / name
        if dest.exists():
            return dest
        if not self.has(stage, key):
            return None
        try:
            manifest = json.loads(self._manifest(stage, key))
            if not any(d.get("mediaType") == TREE_TYPE for d in manifest.get("layers", [])):
                return None
            config = b"".join(self._download(stage, manifest["config"]))
            record = json.loads(config)
            if not isinstance(record, dict) or record.get("stage") != stage or key_of(record) != key:
                raise BadBlob(f"{stage}: manifest of {key} does not hash to its key")
            layer = next((d for d in manifest.get("layers", []) if d.get("annotations", {}).get(TITLE) == name), None)
            want = record.get("contents", {}).get(name)
            if layer is None or not isinstance(want, dict) or want.get("type") != "file" \
                    or layer.get("mediaType") != FILE_TYPE:
                return None  # a tree, or no such item: the whole entry is fetched instead
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
            try:
                with open(tmp, "wb") as f:
                    for chunk in self._download(stage, layer):
                        f.write(chunk)
                if not _file_matches(tmp, want):
                    raise BadBlob(f"{stage}: file {name} of {key} does not match the entry's manifest")
                os.replace(tmp, dest)
            finally:
                if tmp.exists():
                    tmp.unlink()
        except (BadBlob, KeyError, ValueError, TypeError) as err:
            self.forget(stage, key)
            self._warn(f"{stage} entry {key} is corrupt, not used: {err}")
            return None
        except RemoteFailed as err:
            self._went_down(err)
            return None
        self.stats.fetched.append(f"{stage}/{key}/{name}")
        return dest

    def _download(self, stage: str, descriptor: dict) -> Iterator[bytes]:
        with self.open_blob(stage, descriptor) as chunks:
            yield from chunks

    # ---- writing --------------------------------------------------------
    def push(self, cache: Cache, stage: str, key: str) -> bool:
        """Upload a published local entry (readwrite mode): blobs the registry
        lacks first, in bounded chunks, then the manifest under tag = key, so
        a tag only ever names a complete entry.  False, with one warning, when
        the registry is down or refuses."""
        if self.config.mode != "readwrite" or self.down or self.push_refused:
            return False
        if self.has(stage, key) or self.down:
            return self.known.get((stage, key), False)
        from . import entry
        cache.tmp.mkdir(parents=True, exist_ok=True)
        blobdir = Path(tempfile.mkdtemp(prefix=f"push-{key[:12]}.{os.getpid()}.", dir=cache.tmp))
        try:
            manifest_bytes, blobs = entry.pack(cache, stage, key, blobdir)
            manifest = json.loads(manifest_bytes)
            by_digest = {b.digest: b for b in blobs}
            for d in [manifest["config"], *manifest.get("layers", [])]:
                path = by_digest[d["digest"]].path if d["digest"] in by_digest else \
                    cache.entry(stage, key) / "manifest.json"  # the config, when pack lists only layers
                self._upload(stage, d["digest"], int(d["size"]), Path(path))
            r = self._request("PUT", self._url(stage, f"manifests/{key}"), data=manifest_bytes,
                              headers={"Content-Type": manifest.get("mediaType", MANIFEST_TYPE)})
            if r.status_code not in (200, 201):
                raise _Refused(f"PUT manifest {stage}:{key[:12]}: {_problem(r)}")
        except _Refused as err:
            self.push_refused = True
            if self._first_in_run("remote-refused"):
                self._warn(f"push refused, not pushing in this run: {err}")
            return False
        except RemoteFailed as err:
            self._went_down(err)
            return False
        finally:
            remove_tree(blobdir)
        self.known[(stage, key)] = True
        self.stats.pushed.append(f"{stage}/{key}")
        return True

    def _upload(self, stage: str, digest: str, size: int, path: Path) -> None:
        """One blob, unless the registry has it (HEAD).  Up to one chunk: POST
        then PUT; larger: POST, PATCH per chunk, PUT; never more than one
        chunk in memory."""
        r = self._request("HEAD", self._url(stage, f"blobs/{digest}"))
        if r.status_code == 200:
            return
        r = self._request("POST", self._url(stage, "blobs/uploads/"),
                          headers={"Content-Type": "application/octet-stream", "Content-Length": "0"})
        if r.status_code != 202:
            raise _Refused(f"POST upload {stage}: {_problem(r)}")
        location = self._location(r, stage)
        chunk = self.config.chunk
        with open(path, "rb") as f:
            if size <= chunk:
                data = f.read()
                r = self._request("PUT", _with_digest(location, digest), data=data,
                                  headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
            else:
                start = 0
                while data := f.read(chunk):
                    r = self._request("PATCH", location, data=data, headers={
                        "Content-Type": "application/octet-stream", "Content-Length": str(len(data)),
                        "Content-Range": f"{start}-{start + len(data) - 1}"})
                    if r.status_code != 202:
                        raise _Refused(f"PATCH blob {digest[:19]} at {start}: {_problem(r)}")
                    start += len(data)
                    self.stats.uploaded += len(data)
                    location = self._location(r, stage)
                r = self._request("PUT", _with_digest(location, digest),
                                  headers={"Content-Length": "0"})
        if r.status_code not in (201, 204):
            raise _Refused(f"PUT blob {digest[:19]}: {_problem(r)}")
        if size <= chunk:
            self.stats.uploaded += size

    def _location(self, r: requests.Response, stage: str) -> str:
        location = r.headers.get("Location", "")
        if not location:
            raise _Refused(f"upload to {self.config.repository(stage)}: the registry gave no Location")
        return location if location.startswith("http") else \
            f"{'http' if self.config.insecure else 'https'}://{self.config.host}{location}"


class _Refused(RemoteFailed):
    """The registry answered, but would not take the push."""


def _file_matches(path: Path, want: dict) -> bool:
    """A fetched file against its record in the entry's contents (entry.contents)."""
    return path.stat().st_size == want.get("size") and digest_file(path) == want.get("digest")


_remote: Remote | None = None
_loaded = False


def get() -> Remote | None:
    """This process's remote cache (None when none is configured).  Raises
    RemoteConfigError for a bad setting."""
    global _remote, _loaded
    if not _loaded:
        config = config_from_env()
        _remote = Remote(config) if config else None
        _loaded = True
    elif _remote is not None and _remote.pid != os.getpid():
        # A forked child (an isolated stage): its own connections, the parent's knowledge.
        parent = _remote
        _remote = Remote(parent.config)
        _remote.known, _remote.down, _remote.push_refused = dict(parent.known), parent.down, parent.push_refused
        _remote.run, _remote.run_dir = parent.run, parent.run_dir
    return _remote


def reset() -> None:
    """Forget the process's remote (tests change the environment)."""
    global _remote, _loaded
    _remote, _loaded = None, False
