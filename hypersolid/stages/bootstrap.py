"""bootstrap: multistrap unpacks the target's packages into a tree.

Only the package selection, its sources and the post-bootstrap hooks (run
on the host against the unpacked tree) are inputs, so editing anything else
never repeats this stage.  apt downloads through DebProxy, which keeps
every .deb in the cache: a later bootstrap downloads only new packages.
"""
from __future__ import annotations

import json
from pathlib import Path

from urllib.parse import urlsplit

from .. import epoch, hooks, lockfile
from ..config import Target
from ..debproxy import DebProxy, host_apt_sources
from ..dpkg import host_version, read_status
from ..run import BuildError, Log, run
from . import Stage, Unit, register

KEYRING = "debian-archive-keyring"


def sections_for(target: Target, arch: str) -> list[dict]:
    """The target's sections for one architecture, plus the security archive
    (unless the target defines a section named `security` itself)."""
    out = [{"name": s.name, "packages": list(s.packages_for(arch)), "suite": s.suite,
            "components": list(s.components), "source": s.source, "recommends": s.recommends}
           for s in target.sections]
    if target.security_mirror and not any(s.name == "security" for s in target.sections):
        components = list(dict.fromkeys(c for s in target.sections if s.source == target.mirror
                                        for c in s.components)) or ["main"]
        out.append({"name": "security", "packages": [], "suite": f"{target.suite}-security",
                    "components": components, "source": target.security_mirror, "recommends": False})
    return out


def source_urls(target: Target, arch: str) -> list[str]:
    """The archive URLs the target's apt fetches from: all DebProxy forwards to."""
    return list(dict.fromkeys([target.mirror, *(s["source"] for s in sections_for(target, arch))]))


def multistrap_ini(arch: str, directory: Path, sections: list[dict]) -> str:
    """multistrap's configuration.  Native configuration is switched off
    (ignorenativearch): configuring is the configure stage's job.

    Recommends: multistrap resolves every section in one apt run, and
    allowrecommends is a [General] option, so a section with recommends:
    true allows Recommends for the whole package set."""
    names = " ".join(s["name"] for s in sections)
    recommends = "true" if any(s.get("recommends") for s in sections) else "false"
    lines = ["[General]", f"arch={arch}", f"directory={directory}", "cleanup=true",
             "noauth=false", "unpack=true", "ignorenativearch=true", f"allowrecommends={recommends}",
             f"aptsources={names}", f"bootstrap={names}", ""]
    for i, s in enumerate(sections):
        # The keyring once: multistrap deletes the downloaded keyring package
        # after the first section naming it, then fails on the next.
        keyring = [f"keyring={KEYRING}"] if i == 0 else []
        lines += [f"[{s['name']}]", f"packages={' '.join(s['packages'])}", f"source={s['source']}",
                  *keyring, f"suite={s['suite']}",
                  f"components={' '.join(s['components'])}", "omitdebsrc=true", ""]
    return "\n".join(lines)


def lock_of_tree(tree: Path, index: dict[str, tuple[int, str]], sources: list[str]) -> list[lockfile.LockEntry]:
    """The lock entries of the packages in the tree's dpkg status: each
    .deb's pool path and SHA256 from the Packages indexes apt fetched
    (DebProxy.index: '<host><base>/pool/...' -> (size, sha256))."""
    bases = []
    for url in sources:
        parts = urlsplit(url)
        bases.append((f"{parts.netloc}{parts.path.rstrip('/')}/", url.rstrip("/")))
    by_name = {}
    for key, (_size, sha) in index.items():
        by_name.setdefault(key.rsplit("/", 1)[-1], (key, sha))
    out, missing = [], []
    for r in read_status(tree):
        name, version, arch = r.get("Package", ""), r.get("Version", ""), r.get("Architecture", "")
        deb = f"{name}_{version.split(':', 1)[-1]}_{arch}.deb"
        found = by_name.get(deb)
        source = next(((prefix, url) for prefix, url in bases if found and found[0].startswith(prefix)), None)
        if found is None or source is None:
            missing.append(deb)
            continue
        out.append(lockfile.LockEntry(name, version, arch, found[1], found[0][len(source[0]):], source[1]))
    if missing:
        raise BuildError("bootstrap", f"no index entry for {len(missing)} installed package(s): {' '.join(missing[:5])}")
    return sorted(out)


@register
class Bootstrap(Stage):
    name = "bootstrap"
    doc = "multistrap: the target's packages unpacked into a tree (post-bootstrap hooks)"
    helpers = ("hypersolid.hooks",)
    reads = ("suite", "mirror", "security_mirror", "sections")  # sections: this architecture's view
    reads += ("source_date_epoch",)  # epoch.write
    helpers += ("hypersolid.epoch",)
    uses = ("apt_proxy", "hook_timeout")

    def computed(self, unit: Unit) -> dict:
        return {"arch": unit.arch, "multistrap": host_version("multistrap")}

    def input_files(self, unit: Unit) -> dict[str, Path]:
        return hooks.input_files(unit, "post-bootstrap")

    def build(self, unit: Unit, out: Path, log: Log) -> None:
        hooks.checked(unit, "post-bootstrap", log)  # before minutes of work, not after
        tree = out / "tree"
        ini = out / "multistrap.ini"
        ini.write_text(multistrap_ini(unit.arch, tree, sections_for(unit.target, unit.arch)))
        # multistrap downloads the keyring package with the host's apt sources.
        with DebProxy(unit.cache.root / "debs", source_urls(unit.target, unit.arch),
                      keyring_sources=host_apt_sources(), upstream_proxy=unit.target.apt_proxy,
                      log=log) as proxy:
            # cwd: multistrap downloads the keyring package into it and `find`s it there.
            try:
                run(["multistrap", "-f", ini], log, env={"http_proxy": proxy.url}, cwd=out)
            except BuildError:
                unreachable = proxy.failure_message()
                if unreachable is None:
                    raise
                raise log.fail(unreachable) from None
        lockfile.write(out / "packages.lock", lock_of_tree(tree, proxy.index(), source_urls(unit.target, unit.arch)),
                       unit.target.name, unit.arch)
        stats = {"downloaded_bytes": proxy.downloaded, "downloaded_deb_bytes": proxy.downloaded_debs,
                 "reused_deb_bytes": proxy.served_from_cache}
        (out / "stats.json").write_text(json.dumps(stats))
        log.note(f"# downloaded {proxy.downloaded} bytes, reused {proxy.served_from_cache} bytes of cached packages")
        for leftover in (tree / "var/cache/apt").glob("*.bin"):
            leftover.unlink()
        sde = epoch.write(unit, tree, out, log)  # after multistrap, before the hooks
        hooks.run_on_host(unit, "post-bootstrap", log, {"HYPERSOLID_TREE": str(tree.resolve()), **epoch.env(sde)})
