"""What the mirror would install now: apt resolves the target's package set
against the target's sources, giving exact versions, pool paths and SHA256s.

apt, not our own solver: `apt-get install --print-uris` with an empty dpkg
status is exactly multistrap's own resolution (multistrap runs the same
`apt-get install` of the Priority: required packages, the sections'
packages and the keyring package), so the resolved set is the set the
bootstrap would have unpacked.  apt keeps its state (lists, InRelease) in a
persistent directory per source set and architecture,
``<cache>/apt/<digest>/``, so `apt-get update` revalidates with
If-Modified-Since and downloads only changed indexes; InRelease is checked
against the host's Debian archive keyring (or the target's apt_keyring).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .cache import digest_file, digest_json, mark_used
from .config import DEBIAN_KEYRING
from .debproxy import parse_packages
from . import layers
from .lockfile import TOP, LockEntry
from .run import BuildError, Log, run, tail_of

DEFAULT_MAX_AGE = 3600
MAX_AGE_ENV = "HYPERSOLID_INDEX_MAX_AGE"
REFRESH_ENV = "HYPERSOLID_REFRESH"
URI_LINE = re.compile(r"^'([^']+)' (\S+) (\d+) ?(\S*)$", re.M)


def max_age(target) -> int:
    """Seconds a resolution stays valid: HYPERSOLID_INDEX_MAX_AGE (seconds, or
    30m/1h/2d; the environment wins, so CI can say 0 for every target), else
    the target's index_max_age, else 1 h."""
    from .config import parse_duration
    env = os.environ.get(MAX_AGE_ENV, "").strip()
    if env:
        value = parse_duration(env)
        if value is None:
            raise BuildError("resolve", f"{MAX_AGE_ENV}={env!r} is not seconds or a duration such as 30m, 1h, 2d")
        return value
    return target.index_max_age if target.index_max_age is not None else DEFAULT_MAX_AGE


def is_fresh(stamp: Path, age: int, now: float | None = None) -> bool:
    """Whether the resolution recorded in `stamp` (its content: the Unix time
    it was made) is younger than `age` seconds and no refresh is asked for."""
    if os.environ.get(REFRESH_ENV) or age <= 0:
        return False
    try:
        made = float(stamp.read_text().strip())
    except (OSError, ValueError):
        return False
    now = time.time() if now is None else now
    return 0 <= now - made < age


def keyring_of(target) -> str:
    return target.apt_keyring or DEBIAN_KEYRING


def sources_list(sections: list[dict], arch: str, keyring: str) -> str:
    return "".join(f"deb [arch={arch} signed-by={keyring}] {s['source']} {s['suite']} {' '.join(s['components'])}\n"
                   for s in sections)


def state_dir(cache_root: Path, sections: list[dict], arch: str, keyring: str) -> Path:
    """apt's persistent state for one source set and architecture."""
    ident = [sources_list(sections, arch, keyring), arch,
             digest_file(Path(keyring)) if os.path.exists(keyring) else "missing"]
    return Path(cache_root) / "apt" / digest_json(ident)


def _apt_conf(state: Path, arch: str, recommends: bool, proxy: str | None) -> str:
    s = str(state)
    lines = [f'Dir "{s}/";', f'Dir::Etc "{s}/etc/apt/";', f'Dir::Etc::Parts "{s}/etc/apt/apt.conf.d/";',
             f'Dir::Etc::PreferencesParts "{s}/etc/apt/preferences.d/";',
             f'Dir::Etc::SourceList "{s}/etc/apt/sources.list";',
             f'Dir::Etc::SourceParts "{s}/etc/apt/sources.list.d/";',
             f'Dir::Etc::TrustedParts "{s}/etc/apt/trusted.gpg.d/";',
             f'Dir::State "{s}/var/lib/apt/";', f'Dir::State::status "{s}/var/lib/dpkg/status";',
             f'Dir::Cache "{s}/var/cache/apt/";', f'Dir::Log "{s}/var/log/apt/";',
             f'APT::Architecture "{arch}";', f'APT::Architectures {{ "{arch}"; }};',
             'APT::Sandbox::User "root";', 'Debug::NoLocking "true";', 'Acquire::Languages "none";',
             'Acquire::GzipIndexes "false";',  # "true" recompresses to lz4, which Python cannot read
             f'APT::Install-Recommends "{"true" if recommends else "false"}";',
             f'Acquire::http::Proxy "{proxy}";' if proxy else 'Acquire::http::Proxy "DIRECT";']
    return "\n".join(lines) + "\n"


def prepare(state: Path, sections: list[dict], arch: str, keyring: str, proxy: str | None) -> Path:
    """The state directory's layout and configuration; returns the apt.conf."""
    for d in ("etc/apt/apt.conf.d", "etc/apt/preferences.d", "etc/apt/sources.list.d", "etc/apt/trusted.gpg.d",
              "var/lib/apt/lists/partial", "var/cache/apt/archives/partial", "var/lib/dpkg", "var/log/apt"):
        (state / d).mkdir(parents=True, exist_ok=True)
    (state / "var/lib/dpkg/status").write_text("")  # empty: what a new tree has
    (state / "etc/apt/sources.list").write_text(sources_list(sections, arch, keyring))
    conf = state / "apt.conf"
    conf.write_text(_apt_conf(state, arch, any(s.get("recommends") for s in sections), proxy))
    return conf


def package_lists(lists: Path) -> list[Path]:
    """apt's Packages lists, plain or compressed (GzipIndexes keeps them as fetched)."""
    return sorted(p for p in lists.glob("*_Packages*") if re.search(r"_Packages(\.(xz|gz|bz2|lz4|zst))?$", p.name))


def _plain_text(data: bytes) -> bytes:
    import bz2
    import gzip
    import lzma
    if data.startswith(b"\xfd7zXZ\x00"):
        return lzma.decompress(data)
    if data.startswith(b"\x1f\x8b"):
        return gzip.decompress(data)
    if data.startswith(b"BZh"):
        return bz2.decompress(data)
    return data


def required_packages(lists: Path, memo: Path | None = None) -> set[str]:
    """Priority: required (and Essential packages without a priority) in the
    fetched Packages lists: what multistrap adds (get_required_debs).  With
    `memo` (a JSON file), a list whose size and mtime are unchanged since the
    last call (apt-get update kept it) is not read again: 0.2 s."""
    try:
        known = json.loads(memo.read_text()) if memo else {}
    except (OSError, ValueError):
        known = {}
    out: set[str] = set()
    now = {}
    for path in package_lists(lists):
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        names = known.get(path.name, [None, None, None])
        if names[:2] != stamp:
            names = [*stamp, sorted(_required_in(_plain_text(path.read_bytes())))]
        now[path.name] = names
        out.update(names[2])
    if memo and now != known:
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps(now))
        os.replace(tmp, memo)
    return out


def _required_in(data: bytes) -> set[str]:
    out = set()
    for stanza in data.split(b"\n\n"):
        if b"\nPriority: required" in stanza or (b"\nEssential: yes" in stanza and b"\nPriority:" not in stanza):
            m = re.match(rb"Package: *(\S+)", stanza.lstrip(b"\n"))
            if m:
                out.add(m.group(1).decode())
    return out


def list_prefix(source: str) -> str:
    """The name prefix of apt's list files of a source (URI without scheme, / as _)."""
    return re.sub(r"^[a-z]+://", "", source.rstrip("/")).replace("/", "_") + "_dists_"


def pool_hashes(lists: Path, sources: list[str]) -> dict[tuple[str, str], tuple[int, str]]:
    """(source, pool path) -> (size, SHA256) of every package in the fetched
    Packages lists (apt's --print-uris gives only MD5Sum)."""
    prefixes = sorted(((list_prefix(u), u.rstrip("/")) for u in sources), key=lambda p: len(p[0]), reverse=True)
    out: dict[tuple[str, str], tuple[int, str]] = {}
    for path in package_lists(lists):
        source = next((u for prefix, u in prefixes if path.name.startswith(prefix)), None)
        if source is not None:
            out.update({(source, name): v for name, v in parse_packages(path.read_bytes()).items()})
    return out


def shown_hashes(shown: str, sources: list[str]) -> dict[tuple[str, str], tuple[int, str]]:
    """pool_hashes' answer for just the packages `apt-cache show` printed
    (its records carry Filename, Size and SHA256 from the same lists), so the
    50 MB lists need not be parsed (0.3 s).  A pool path shown with two
    different contents is left out: pool_hashes decides it."""
    seen: dict[str, set] = {}
    for stanza in shown.split("\n\n"):
        fields = dict(re.findall(r"^(Filename|Size|SHA256): *(\S+)$", stanza, re.M))
        if len(fields) == 3:
            seen.setdefault(fields["Filename"], set()).add((int(fields["Size"]), fields["SHA256"].lower()))
    return {(source.rstrip("/"), pool): next(iter(found)) for pool, found in seen.items() if len(found) == 1
            for source in sources}


def parse_uris(text: str, sources: list[str], hashes: dict[tuple[str, str], tuple[int, str]]) -> list[LockEntry]:
    """`apt-get --print-uris` lines -> lock entries.  The local file name is
    name_version_arch.deb with the epoch kept (%3a); the URL below one of
    the sources is the pool path; the SHA256 comes from the lists (hashes)."""
    bases = sorted((u.rstrip("/") + "/" for u in sources), key=len, reverse=True)
    out = []
    for url, local, size, _digest in URI_LINE.findall(text):
        name, version, arch = unquote(local)[:-len(".deb")].split("_")
        base = next((b for b in bases if url.startswith(b)), None)
        if base is None:
            raise BuildError("resolve", f"apt would download {url}, which is under no source of the target")
        source, pool = base.rstrip("/"), unquote(url[len(base):])
        known = hashes.get((source, pool))
        if known is None or known[0] != int(size):
            raise BuildError("resolve", f"{pool} is not in the Packages lists of {source} (or its size differs)")
        out.append(LockEntry(name, version, arch, known[1], pool, source))
    return sorted(out)


def resolve(cache_root: Path, sections: list[dict], names: list[str], arch: str, keyring: str,
            proxy: str | None, log: Log) -> list[LockEntry]:
    """The exact packages multistrap would install now: `apt-get update`
    (revalidating what changed), then the install plan with an empty status."""
    if not os.path.exists(keyring):
        raise log.fail(f"the keyring {keyring} is missing (install debian-archive-keyring, or set apt_keyring)")
    state = state_dir(cache_root, sections, arch, keyring)
    state.mkdir(parents=True, exist_ok=True)
    # Targets with the same sources share the state (and its apt.conf, whose
    # Install-Recommends is theirs): one resolution at a time in it, also
    # when stages run side by side.  flock: released however we end.
    with open(state / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        return _resolve(state, sections, names, arch, keyring, proxy, log)


def _resolve(state: Path, sections: list[dict], names: list[str], arch: str, keyring: str,
             proxy: str | None, log: Log) -> list[LockEntry]:
    conf = prepare(state, sections, arch, keyring, proxy)
    mark_used(state)  # its last use, for `hypersolid cache gc`
    env = {"APT_CONFIG": str(conf), "LC_ALL": "C"}
    start = time.monotonic()
    update = run(["apt-get", "-q", "update", "-o", "APT::Update::Error-Mode=any"], log, env=env, check=False)
    if update.returncode != 0:
        unreachable = _unreachable(tail_of(log.path, 60), [s["source"] for s in sections], proxy)
        raise log.fail(unreachable or f"apt-get update failed: {_apt_error(log, update.returncode)}")
    took_update = time.monotonic() - start
    lists = state / "var/lib/apt/lists"
    wanted = sorted(required_packages(lists, state / "required.json") | set(names))
    plan = run(["apt-get", "-q", "-y", "--print-uris", "install", *wanted], log, env=env, check=False, capture=True)
    if plan.returncode != 0:
        raise log.fail(f"apt cannot resolve the package set: {_apt_error(log, plan.returncode)}")
    uris, urls = plan.stdout.decode(errors="replace"), [s["source"] for s in sections]
    planned = [unquote(local)[:-len(".deb")].split("_")[:2] for _url, local, _size, _md5 in URI_LINE.findall(uris)]
    # The control data of exactly these versions: their hashes and what depends on what (mark_top).
    shown = run(["apt-cache", "show", *(f"{name}={version}" for name, version in planned)], log,
                env=env, check=False, capture=True).stdout.decode(errors="replace")
    try:
        try:
            entries = parse_uris(uris, urls, shown_hashes(shown, urls))
        except BuildError:  # not all shown (or shown twice): from the lists themselves
            entries = parse_uris(uris, urls, pool_hashes(lists, urls))
    except BuildError as err:
        raise log.fail(err.message) from None
    entries = mark_top(entries, shown, log)
    log.note(f"# resolved {len(entries)} packages ({sum(e.top for e in entries)} on top): apt-get update "
             f"{took_update:.1f}s, plan {time.monotonic() - start - took_update:.1f}s")
    return entries


def mark_top(entries: list[LockEntry], shown: str, log: Log | None = None) -> list[LockEntry]:
    """The entries with the packages nothing else depends on marked `top`
    (layers.py), from `apt-cache show` of exactly these versions; unmarked
    (a flat build) if apt did not show every one of them."""
    stanzas = layers.parse_stanzas(shown)
    wanted = {e.package: e.version for e in entries}
    known = {name: fields for name, fields in stanzas.items() if fields.get("Version") == wanted.get(name)}
    if set(known) != set(wanted):
        if log is not None:
            log.note(f"# no top layer: apt shows no control data of {' '.join(sorted(set(wanted) - set(known))[:5])}")
        return [dataclasses.replace(e, layer="") for e in entries]
    top = layers.top_packages(known)
    return [dataclasses.replace(e, layer=TOP if e.package in top else "") for e in entries]


def _apt_error(log: Log, status: int) -> str:
    """apt's first error line from the log's tail (its stderr goes there)."""
    lines = tail_of(log.path, 60)
    for prefix in ("E:", "Err:", "W:"):
        found = [ln.strip() for ln in lines if ln.startswith(prefix)]
        if found:
            return found[0]
    return f"exit status {status}"


FAILED_FETCH = re.compile(r"^E: Failed to fetch (\S+) +(.*)$")


def _unreachable(lines: list[str], sources: list[str], proxy: str | None = None) -> str | None:
    """'cannot reach the mirror URL: cause[; ...]' from apt's `Failed to
    fetch` lines (the words DebProxy uses for the same failures), or None."""
    found: dict[str, str] = {}
    for line in lines:
        m = FAILED_FETCH.match(line.strip())
        if not m:
            continue
        url, why = m.groups()
        source = next((u for u in sorted(sources, key=len, reverse=True) if url.startswith(u.rstrip("/") + "/")), url)
        what = f"the mirror {source}"
        if proxy and urlsplit(proxy).netloc and urlsplit(proxy).netloc.split(":")[0] in why:
            what = f"the apt proxy {proxy}"
        if "Connection refused" in why:
            why = "connection refused"
        elif "Could not resolve" in why or "Temporary failure resolving" in why:
            why = f"DNS lookup failed ({why})"
        elif "timed out" in why.lower():
            why = "no answer (timed out)"
        elif re.match(r"\d{3} ", why):
            why = f"it answers {why}"
        found.setdefault(what, why)
    return "; ".join(f"cannot reach {u}: {w}" for u, w in found.items()) or None
