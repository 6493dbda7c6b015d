"""bootstrap: multistrap unpacks exactly the locked .debs into a tree
(the base of the set: the top packages are configure's, see layers.py).

The package set is a lock file (lockfile.py): the target's own (`lock:`)
or the resolve stage's build/<t>/<arch>/resolved.lock.  Its content is an
input file of this stage, so the key holds every version and SHA256: a
security update on the mirror changes the resolution, the key, and this
stage re-runs; an unchanged mirror is a cache hit.

How the tree gets exactly those versions (so the key never lies): every
.deb is taken from <cache>/debs/<host>/<path> (the layout DebProxy fills)
or downloaded from its URL, and checked against the lock's SHA256
(fetch_debs); the verified files make a small apt repository
(apt-ftparchive) served on 127.0.0.1, and multistrap installs from that
repository only, naming every package.  Name=version pins against the
real mirror were the alternative, but a lock whose versions the mirror
has dropped could then not be built even with the .debs in the cache, and
apt would still pick dependencies itself.  noauth is safe here: the
repository is ours and each .deb in it was checked against the signed
index (resolve) or the lock.  Finally the tree's dpkg status is compared
with the lock.  Post-bootstrap hooks run on the host against the tree.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .. import epoch, hooks, lockfile, unpack
from ..cache import digest_json, remove_tree
from ..debproxy import MissingDebs, fetch_debs
from ..dpkg import host_version, read_status
from ..run import Log, run
from . import Stage, Unit, real_target, register
from .resolve import KEYRING, RESOLVED, sections_for, source_urls  # noqa: F401  (re-exported)

LOCAL_SUITE = "hypersolid"
LOCAL_CONF = "00hypersolid-local-repository"


def multistrap_ini(arch: str, directory: Path, source: str, packages: list[str]) -> str:
    """multistrap's configuration: one section, the local repository of
    exactly the resolved .debs (local_repository), every package named.
    unpack=false: multistrap resolves and downloads, unpack.py unpacks the
    same way in a fraction of the time (its module docstring).
    Native configuration is switched off (ignorenativearch): configuring is
    the configure stage's job.  noauth: the repository is ours, on
    loopback, and every .deb in it was checked against the signed index
    (resolve) or the lock's SHA256.  No keyring= line: the keyring package
    is in the resolved set like any other.  Recommends were the resolver's
    business, so allowrecommends is false."""
    return "\n".join([
        "[General]", f"arch={arch}", f"directory={directory}", "cleanup=true", "noauth=true", "unpack=false",
        "ignorenativearch=true", "allowrecommends=false", "aptsources=hypersolid", "bootstrap=hypersolid", "",
        "[hypersolid]", f"packages={' '.join(sorted(packages))}", f"source={source}", f"suite={LOCAL_SUITE}",
        "components=main", "omitdebsrc=true", ""])


def local_repository(repo: Path, debs: dict, arch: str, log: Log) -> None:
    """An apt repository of exactly these .debs (hard links into the store,
    copies across file systems), indexed by apt-ftparchive."""
    pool = repo / "pool"
    pool.mkdir(parents=True)
    for entry, path in debs.items():
        dest = pool / f"{entry.package}_{entry.version.replace(':', '%3a')}_{entry.architecture}.deb"
        try:
            os.link(path, dest)
        except OSError:
            shutil.copyfile(path, dest)
    index = repo / "dists" / LOCAL_SUITE / "main" / f"binary-{arch}"
    index.mkdir(parents=True)
    packages = run(["apt-ftparchive", "packages", "pool"], log, cwd=repo, capture=True).stdout
    (index / "Packages").write_bytes(packages)
    release = run(["apt-ftparchive", "-o", f"APT::FTPArchive::Release::Suite={LOCAL_SUITE}",
                   "-o", "APT::FTPArchive::Release::Components=main",
                   "-o", f"APT::FTPArchive::Release::Architectures={arch}",
                   "release", f"dists/{LOCAL_SUITE}"], log, cwd=repo, capture=True).stdout
    (repo / "dists" / LOCAL_SUITE / "Release").write_bytes(release)


@contextmanager
def serving(directory: Path):
    """directory over HTTP on 127.0.0.1 (apt's file: method would leave the
    .debs where they are, and multistrap unpacks what apt put in its cache)."""
    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(directory), **kw)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def lock_path(unit: Unit) -> Path:
    """The lock the bootstrap installs: the target's own (lock: setting), else
    the last resolution of the mirror (the resolve task's output)."""
    return real_target(unit.target).lock_file(unit.arch) or unit.build_dir / RESOLVED


def layers_of(unit: Unit, entries: list[lockfile.LockEntry]) -> tuple[list, list]:
    """(base, top) of a lock (layers.py): the bootstrap unpacks the base, the
    configure stage adds the top packages.  All base for a target with
    post-bootstrap hooks: such a hook may read or edit any package's files."""
    if real_target(unit.target).hook_files("post-bootstrap"):
        return list(entries), []
    return [e for e in entries if not e.top], [e for e in entries if e.top]


def read_layers(unit: Unit) -> tuple[list, list] | str:
    """layers_of the unit's lock, or why the lock is unusable (a key value:
    the build then says what is wrong)."""
    try:
        return layers_of(unit, lockfile.read(lock_path(unit)))
    except lockfile.LockError as err:
        return f"unreadable: {err.message}"


def locked_set(entries: list[lockfile.LockEntry] | str) -> str:
    """The key's view of a set of lock entries: a digest of the entries (not
    the lock's comments, so two targets with one package set share the
    entry); a bad lock is a value too."""
    return entries if isinstance(entries, str) else digest_json([e.line() for e in entries])


def _check_tree(tree: Path, entries: list[lockfile.LockEntry], log: Log) -> None:
    """The unpacked tree holds exactly the lock's packages (else the key would lie)."""
    got = {(r.get("Package"), r.get("Version")) for r in read_status(tree)}
    want = {(e.package, e.version) for e in entries}
    if got != want:
        extra = sorted(f"{n}={v}" for n, v in got - want)
        missing = sorted(f"{n}={v}" for n, v in want - got)
        raise log.fail(f"the unpacked tree differs from the lock: not locked {' '.join(extra[:10]) or 'none'}; "
                       f"not installed {' '.join(missing[:10]) or 'none'}")


@register
class Bootstrap(Stage):
    name = "bootstrap"
    doc = "multistrap: exactly the resolved (or locked) .debs unpacked into a tree (post-bootstrap hooks)"
    helpers = ("hypersolid.hooks", "hypersolid.lockfile", "hypersolid.epoch", "hypersolid.unpack")
    reads = ("source_date_epoch",)  # the package set is the lock file's content (input_files)
    uses = ("apt_proxy", "hook_timeout", "lock")

    def computed(self, unit: Unit) -> dict:
        read = read_layers(unit)  # the base only: adding a top package keeps this entry
        return {"arch": unit.arch, "multistrap": host_version("multistrap"),
                "apt-ftparchive": host_version("apt-utils"), "packages": locked_set(read if isinstance(read, str) else read[0])}

    def input_files(self, unit: Unit) -> dict[str, Path]:
        return hooks.input_files(unit, "post-bootstrap")

    def watched(self, unit: Unit) -> list[Path]:
        path = lock_path(unit)
        # a missing target lock is the build's one-line error, not doit's "file_dep does not exist"
        return [path] if path.exists() or not real_target(unit.target).lock else []

    def build(self, unit: Unit, out: Path, log: Log) -> None:
        hooks.checked(unit, "post-bootstrap", log)  # before minutes of work, not after
        source = lock_path(unit)
        if not source.exists() and unit.target.lock:
            raise log.fail(f"{os.path.relpath(source, unit.project.root)} is missing (lock: in target.yaml): "
                           f"write it with `hypersolid lock {unit.target.name}`")
        try:
            entries = lockfile.read(source)
        except lockfile.LockError as err:
            raise log.fail(str(err)) from None
        wrong = [e for e in entries if e.architecture not in (unit.arch, "all")]
        if wrong:
            raise log.fail(f"{source}: {wrong[0].package} is locked for {wrong[0].architecture}, not {unit.arch}")
        entries, top = layers_of(unit, entries)
        if top:
            log.note(f"# the base: {len(entries)} packages; {len(top)} on top, for configure: "
                     f"{' '.join(e.package for e in top)}")
        try:
            stats: dict = {}
            debs = fetch_debs(unit.cache.root / "debs", entries, upstream_proxy=unit.target.apt_proxy, log=log,
                              stats=stats, progress=lambda done, total, got: log.progress(
                                  what="packages downloaded", done=done, total=total, bytes=got["downloaded"]))
        except MissingDebs as err:
            raise log.fail(f"{os.path.relpath(source, unit.project.root)}: {err}") from None
        tree, repo = out / "tree", out / "repo"
        local_repository(repo, debs, unit.arch, log)
        ini = out / "multistrap.ini"
        # multistrap's apt reads the tree's apt.conf.d: the loopback repository
        # has no signature (noauth covers packages, not the Release file).
        insecure = tree / "etc/apt/apt.conf.d" / LOCAL_CONF
        insecure.parent.mkdir(parents=True)
        insecure.write_text('Acquire::AllowInsecureRepositories "true";\n')
        try:
            log.progress(force=True, count="I: Extracting ", count_what="unpacked", count_total=len(entries))
            with serving(repo) as url:
                ini.write_text(multistrap_ini(unit.arch, tree, url, [e.package for e in entries]))
                run(["multistrap", "-f", ini], log, env={"no_proxy": "127.0.0.1"}, cwd=out)
            unpack.unpack(tree, log)
        finally:
            remove_tree(repo)
            insecure.unlink(missing_ok=True)
        _check_tree(tree, entries, log)
        lockfile.write(out / "packages.lock", entries, unit.target.name, unit.arch)
        (out / "stats.json").write_text(json.dumps({"downloaded_deb_bytes": stats["downloaded"],
                                                    "reused_deb_bytes": stats["reused"]}))
        log.note(f"# downloaded {stats['downloaded']} bytes, reused {stats['reused']} bytes of cached packages")
        for leftover in (tree / "var/cache/apt").glob("*.bin"):
            leftover.unlink()
        for leftover in (tree / "etc/apt/sources.list.d").glob("multistrap-*.list"):
            leftover.unlink()  # the loopback repository: gone with this build
        sde = epoch.write(unit, tree, out, log)  # after multistrap, before the hooks
        hooks.run_on_host(unit, "post-bootstrap", log, {"HYPERSOLID_TREE": str(tree.resolve()), **epoch.env(sde)})
