"""The cache never hides a mirror update, and a lock pins a build: against a
real, signed apt repository made here from real .debs (the tiny target's
set) and served on 127.0.0.1 by this process.  A newer netbase is
published there by repacking the real one with a bumped version."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from conftest import TestProject, needs_root_and_tools, tiny_target
from hostile import Outcome
from hypersolid import lockfile
from hypersolid.debproxy import fetch_debs

pytestmark = pytest.mark.integration

SCRIPT = Path(sys.executable).with_name("hypersolid")
BUMP = "+hs1"


class Mirror:
    """A signed apt repository (bookworm/main/amd64) of the .debs given to
    publish(), on 127.0.0.1, stoppable and restartable on the same port."""

    def __init__(self, root: Path):
        self.root, self.gnupg, self.keyring = root / "www", root / "gnupg", root / "key.gpg"
        self.root.mkdir(parents=True)
        self.gnupg.mkdir(mode=0o700)
        self.gpg("--quick-gen-key", "hypersolid test mirror <test@example.invalid>", "ed25519", "sign", "never")
        self.keyring.write_bytes(self.gpg("--export"))
        self.server = None
        self.port = self._start().server_address[1]
        self.stop()

    def gpg(self, *args: str) -> bytes:
        return subprocess.run(["gpg", "--homedir", str(self.gnupg), "--batch", "--yes", "--pinentry-mode", "loopback",
                               "--passphrase", "", *args], check=True, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL).stdout

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/debian"

    def publish(self, debs: list[Path]) -> None:
        """Exactly these .debs are on the mirror now (older ones gone, as on Debian's)."""
        top = self.root / "debian"
        shutil.rmtree(top, ignore_errors=True)
        (top / "pool/main").mkdir(parents=True)
        for deb in debs:  # the store keeps apt's URL escaping (%2b); a pool has the plain names
            shutil.copy(deb, top / "pool/main" / unquote(deb.name))
        index = top / "dists/bookworm/main/binary-amd64"
        index.mkdir(parents=True)
        (index / "Packages").write_bytes(subprocess.run(["apt-ftparchive", "packages", "pool"], cwd=top, check=True,
                                                        stdout=subprocess.PIPE).stdout)
        release = subprocess.run(["apt-ftparchive", "-o", "APT::FTPArchive::Release::Suite=bookworm",
                                  "-o", "APT::FTPArchive::Release::Codename=bookworm",
                                  "-o", "APT::FTPArchive::Release::Architectures=amd64",
                                  "-o", "APT::FTPArchive::Release::Components=main", "release", "dists/bookworm"],
                                 cwd=top, check=True, stdout=subprocess.PIPE).stdout
        (top / "dists/bookworm/Release").write_bytes(release)
        self.gpg("--clearsign", "-o", str(top / "dists/bookworm/InRelease"), str(top / "dists/bookworm/Release"))

    def _start(self) -> ThreadingHTTPServer:
        handler = partial(_Quiet, directory=str(self.root))
        self.server = ThreadingHTTPServer(("127.0.0.1", getattr(self, "port", 0)), handler)
        threading.Thread(target=self.server.serve_forever, args=(0.1,), daemon=True).start()
        return self.server

    def start(self) -> None:
        if self.server is None:
            self._start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def bumped(deb: Path, dest: Path) -> Path:
    """The same package with a newer version: unpacked, control edited, packed."""
    work = dest / "repack"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(work)], check=True)
    control = work / "DEBIAN/control"
    lines = control.read_text().splitlines()
    version = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Version:"))
    control.write_text("\n".join(f"Version: {version}{BUMP}" if ln.startswith("Version:") else ln
                                 for ln in lines) + "\n")
    out = dest / deb.name.replace(f"_{version}_", f"_{version}{BUMP}_")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(work), str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    shutil.rmtree(work)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_cache):
    """The mirror (old set published, not yet serving), the two sets of
    .debs, and a project whose target `m` uses the mirror."""
    needs_root_and_tools()
    tmp = tmp_path_factory.mktemp("lock")
    # The tiny target's real .debs, resolved against Debian and cached once.
    seed = TestProject(tmp / "seed", shared_cache)
    seed.target("tiny", tiny_target())
    seed.doit("resolve:tiny")
    entries = lockfile.read(seed.root / "build/tiny/amd64/resolved.lock")
    old = sorted(fetch_debs(shared_cache / "debs", entries).values())
    netbase = next(d for d in old if d.name.startswith("netbase_"))
    new = [d for d in old if d != netbase] + [bumped(netbase, tmp)]
    mirror = Mirror(tmp / "mirror")
    mirror.publish(old)
    p = TestProject(tmp / "project", shared_cache)
    p.target("m", target_text(mirror))
    yield mirror, old, new, p
    mirror.stop()


def target_text(mirror: Mirror, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        architectures: [amd64]
        suite: bookworm
        mirror: {mirror.url}
        security_mirror: null
        apt_keyring: {mirror.keyring}
        sections:
          - name: debian
            packages: [netbase]
        """) + extra


def installed(p: TestProject, target: str, package: str) -> str:
    """The version in the configured tree (netbase is a top package: layers.py)."""
    status = (p.entry("configure", target) / "tree/var/lib/dpkg/status").read_text()
    stanza = next(s for s in status.split("\n\n") if s.startswith(f"Package: {package}\n"))
    return next(ln.split(": ", 1)[1] for ln in stanza.splitlines() if ln.startswith("Version:"))


def hypersolid(p: TestProject, *args: str, env: dict | None = None) -> Outcome:
    full = {**os.environ, "HYPERSOLID_CACHE": str(p.cache), **(env or {})}
    proc = subprocess.run([str(SCRIPT), *args], cwd=p.root, env=full, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1800)
    return Outcome(proc.returncode, proc.stdout)


WITHIN = {"HYPERSOLID_INDEX_MAX_AGE": "1h"}
AFTER = {"HYPERSOLID_INDEX_MAX_AGE": "0"}


def test_a_mirror_update_is_picked_up_after_the_window_and_not_within_it(world):
    mirror, old, new, p = world
    mirror.start()
    first = p.doit("configure:m", env=WITHIN)
    assert {"resolve:m", "bootstrap:m", "configure:m"} <= first.executed
    before = p.key("configure", "m")
    old_version = installed(p, "m", "netbase")
    assert not old_version.endswith(BUMP)

    mirror.publish(new)
    mirror.stop()  # within the window nothing may ask the mirror
    quiet = p.doit("configure:m", env=WITHIN)
    assert quiet.executed == set(), quiet.output
    assert {"resolve:m", "bootstrap:m", "configure:m"} <= quiet.uptodate
    assert p.key("configure", "m") == before

    mirror.start()
    report = hypersolid(p, "outdated", "m")
    assert report.status == 1, report.output
    assert report.line("netbase:all", old_version, f"{old_version}{BUMP}")

    after = p.doit("configure:m", env=AFTER)
    assert {"resolve:m", "configure:m"} <= after.executed
    assert p.key("configure", "m") != before  # so everything after runs again
    assert installed(p, "m", "netbase") == f"{old_version}{BUMP}"
    lock = {e.package: e for e in lockfile.read(p.entry("configure", "m") / "packages.lock")}
    assert lock["netbase"].version == f"{old_version}{BUMP}"
    current = hypersolid(p, "outdated", "m")
    assert current.status == 0, current.output
    assert current.line("are the mirror's newest")

    again = p.doit("configure:m", env=AFTER)  # re-resolved, same answer: the build stays
    assert "resolve:m" in again.executed and {"bootstrap:m", "configure:m"} <= again.uptodate

    mirror.stop()  # offline after the window: one warning, the last resolution
    offline = p.doit("configure:m", env=AFTER)
    assert "configure:m" in offline.uptodate
    assert Outcome(offline.returncode, offline.output).line("warning: m/amd64: cannot check the mirror",
                                                           f"cannot reach the mirror {mirror.url}: connection refused")
    refresh = hypersolid(p, "build", "--refresh", "m")  # --refresh insists on asking
    assert refresh.status == 1
    refresh.line("hypersolid: build m: stage resolve:m failed: cannot reach the mirror")


def test_a_locked_target_keeps_its_versions_and_lock_round_trips(world):
    mirror, old, new, p = world
    mirror.publish(old)
    mirror.start()
    p.target("locked", target_text(mirror, "lock: packages-{arch}.lock\n"))
    lock_file = p.root / "targets/locked/packages-amd64.lock"
    assert hypersolid(p, "lock", "locked").status == 0
    first = lock_file.read_text()
    p.doit("configure:locked")
    assert hypersolid(p, "lock", "locked").status == 0
    assert lock_file.read_text() == first  # lock, build, lock: the same file
    old_version = installed(p, "locked", "netbase")

    # Newer netbase on the mirror, the old one gone from it: the locked
    # target has no resolve task, and a rebuild takes the pinned .deb from the cache.
    mirror.publish(new)
    assert "resolve:locked" not in p.doit("list", "--all").output
    for stage in ("bootstrap", "configure"):
        shutil.rmtree(p.entry(stage, "locked"))
    rebuilt = p.doit("configure:locked", env=AFTER)
    assert {"bootstrap:locked", "configure:locked"} <= rebuilt.executed
    assert installed(p, "locked", "netbase") == old_version
    assert lockfile.read(p.entry("configure", "locked") / "packages.lock") == lockfile.read(lock_file)
    assert any(e.top for e in lockfile.read(lock_file))  # `hypersolid lock` marks the top layer


def test_a_lock_naming_a_version_nobody_has_is_one_error_line(world):
    mirror, old, new, p = world
    mirror.publish(new)
    mirror.start()
    p.target("gone", target_text(mirror, "lock: packages-{arch}.lock\n"))
    assert hypersolid(p, "lock", "gone").status == 0
    entries = lockfile.read(p.root / "targets/gone/packages-amd64.lock")
    fake = [e if e.package != "netbase" else
            lockfile.LockEntry("netbase", "9.9-1", "all", "0" * 64, "pool/main/netbase_9.9-1_all.deb", e.source)
            for e in entries]
    lockfile.write(p.root / "targets/gone/packages-amd64.lock", fake, "gone", "amd64")
    result = hypersolid(p, "build", "gone")
    assert result.status == 1
    line = result.line("hypersolid: build gone:", "netbase=9.9-1")  # the command's one line
    assert "packages-amd64.lock" in line and "neither in" in line and "404" in line


def test_a_missing_lock_file_is_one_line_saying_how_to_write_it(world):
    mirror, old, new, p = world
    p.target("unlocked", target_text(mirror, "lock: packages-{arch}.lock\n"))
    result = hypersolid(p, "build", "unlocked")
    assert result.status == 1
    result.line("hypersolid: build unlocked:", "targets/unlocked/packages-amd64.lock is missing",
                "`hypersolid lock unlocked`")
