"""The top layer of a package set: what nothing else depends on, computed
from the archive's control fields alone (layers.py, resolve.mark_top)."""
from __future__ import annotations

from hypersolid import layers, lockfile
from hypersolid.lockfile import LockEntry
from hypersolid.resolve import mark_top

SHA = "c24fe4eb8e60d8632d72ed104cce7c92cff200847c897dc8ba764b6c47b519e0"

SHOWN = """Package: libc6
Version: 2.36-9
Priority: optional
Depends: libgcc-s1

Package: libgcc-s1
Version: 12.2.0-14
Depends: gcc-12-base (= 12.2.0-14), libc6 (>= 2.35)

Package: gcc-12-base
Version: 12.2.0-14

Package: dash
Version: 0.5.12-2
Essential: yes
Pre-Depends: libc6 (>= 2.34)

Package: bsdutils
Version: 1:2.38.1-5
Priority: required

Package: less
Version: 590-2
Depends: libc6 (>= 2.34),
 libtinfo6 (>= 6)

Package: libtinfo6
Version: 6.4-4

Package: dbus
Version: 1.14.10-1
Provides: dbus-system-bus, default-dbus-system-bus

Package: libpam-systemd
Version: 252.30-1
Depends: systemd (= 252.30-1), default-dbus-system-bus | dbus-system-bus

Package: systemd
Version: 252.30-1
Depends: libc6
Recommends: less

Package: systemd-sysv
Version: 252.30-1
Depends: systemd (= 252.30-1)

Package: python3
Version: 3.11.2-1

Package: tool
Version: 1.0
Depends: python3:any, gcc-12-base | libtinfo6
Pre-Depends: usrmerge

Package: usrmerge
Version: 37

Package: other-usrmerge-user
Version: 1
"""


def entry(name: str, version: str) -> LockEntry:
    return LockEntry(name, version, "amd64", SHA, f"pool/main/{name}_{version.replace(':', '%3a')}_amd64.deb",
                     "http://deb.debian.org/debian")


def test_names_takes_every_alternative_without_versions_or_qualifiers():
    assert layers.names("a (>= 1) | b:any, c [amd64],\n d") == ["a", "b", "c", "d"]
    assert layers.names("") == []


def test_top_packages_are_what_nothing_depends_on():
    top = layers.top_packages(layers.parse_stanzas(SHOWN))
    # less: only a Recommends points at it; tool and systemd-sysv: nothing does
    assert top == {"less", "systemd-sysv", "tool", "libpam-systemd", "other-usrmerge-user"}


def test_a_provider_of_a_depended_on_virtual_package_is_base():
    assert "dbus" not in layers.top_packages(layers.parse_stanzas(SHOWN))


def test_essential_required_and_usrmerge_stay_in_the_base_unless_depended_on_or_not():
    top = layers.top_packages(layers.parse_stanzas(SHOWN))
    assert not top & {"dash", "bsdutils", "usrmerge"}


def test_the_base_is_closed_under_dependencies():
    stanzas = layers.parse_stanzas(SHOWN)
    top = layers.top_packages(stanzas)
    for name, fields in stanzas.items():
        if name in top:
            continue
        for field in layers.DEPENDENCY_FIELDS:
            assert not set(layers.names(fields.get(field, ""))) & top, name


def test_adding_a_package_that_needs_only_the_base_leaves_the_base_alone():
    without = layers.parse_stanzas(SHOWN)
    del without["less"]
    before = set(without) - layers.top_packages(without)
    after = set(layers.parse_stanzas(SHOWN)) - layers.top_packages(layers.parse_stanzas(SHOWN))
    assert before == after


def test_mark_top_marks_exactly_the_shown_versions():
    stanzas = layers.parse_stanzas(SHOWN)
    entries = [entry(name, fields["Version"]) for name, fields in stanzas.items()]
    marked = {e.package: e.top for e in mark_top(entries, SHOWN)}
    assert {n for n, top in marked.items() if top} == layers.top_packages(stanzas)
    assert all(e.layer in ("", lockfile.TOP) for e in mark_top(entries, SHOWN))


def test_a_package_apt_did_not_show_leaves_the_whole_lock_flat():
    stanzas = layers.parse_stanzas(SHOWN)
    entries = [entry(name, fields["Version"]) for name, fields in stanzas.items()]
    entries.append(entry("unknown", "1"))
    assert not any(e.top for e in mark_top(entries, SHOWN))
    wrong = [entry("less", "1"), *entries[:3]]  # another version than apt's
    assert not any(e.top for e in mark_top(wrong, SHOWN))


# The stages' keys: what a new top package changes, and what it leaves alone.

def project_with_locks(tmp_path, extra_top: bool):
    """Targets `plain`, `post` (a post-bootstrap hook) and `pre` (a
    pre-configure hook) pinned to the SHOWN set, with or without less."""
    import os
    import textwrap

    from hypersolid.config import Project
    lock = [entry(name, fields["Version"]) for name, fields in layers.parse_stanzas(SHOWN).items()
            if name != "less" or extra_top]
    for name in ("plain", "post", "pre"):
        d = tmp_path / "targets" / name
        d.mkdir(parents=True)
        (d / "target.yaml").write_text(textwrap.dedent("""\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
                packages: [tool]
            lock: packages-{arch}.lock
            """))
        lockfile.write(d / "packages-amd64.lock", mark_top(lock, SHOWN), name, "amd64")
    for name, kind in (("post", "post-bootstrap"), ("pre", "pre-configure")):
        hook = tmp_path / f"targets/{name}/hooks/{kind}.d/10-edit"
        hook.parent.mkdir(parents=True)
        hook.write_text("#!/bin/sh\n")
        os.chmod(hook, 0o755)
    return Project(tmp_path)


def keys(project, name):
    from hypersolid.cache import Cache
    from hypersolid.stages import STAGES, Unit, planned_keys
    from hypersolid.stages.configure import base_key
    u = Unit(project, project.load(name), "amd64", Cache(project.root / "cache"))
    planned = planned_keys(u)
    return planned, base_key(STAGES["configure"].manifest(u, {"bootstrap": planned["bootstrap"]})), u


def test_the_bootstrap_unpacks_the_base_and_configure_gets_the_top(tmp_path):
    from hypersolid.stages.bootstrap import read_layers
    project = project_with_locks(tmp_path, extra_top=True)
    _, _, u = keys(project, "plain")
    base, top = read_layers(u)
    assert {e.package for e in top} == layers.top_packages(layers.parse_stanzas(SHOWN))
    assert not {e.package for e in base} & {e.package for e in top}


def test_a_post_bootstrap_hook_gets_the_whole_set_unpacked_a_pre_configure_one_the_base(tmp_path):
    from hypersolid.stages.bootstrap import read_layers
    project = project_with_locks(tmp_path, extra_top=True)
    base, top = read_layers(keys(project, "post")[2])
    assert top == [] and len(base) == len(layers.parse_stanzas(SHOWN))
    # configure unpacks the top .debs before the hooks, then configures them all
    assert read_layers(keys(project, "pre")[2]) == read_layers(keys(project, "plain")[2])


def test_a_new_top_package_keeps_the_bootstrap_and_base_keys_and_changes_configures(tmp_path):
    without = project_with_locks(tmp_path / "a", extra_top=False)
    with_less = project_with_locks(tmp_path / "b", extra_top=True)
    (k1, base1, _), (k2, base2, _) = keys(without, "plain"), keys(with_less, "plain")
    assert k1["bootstrap"] == k2["bootstrap"]
    assert base1 == base2
    assert k1["configure"] != k2["configure"] and k1["squashfs"] != k2["squashfs"]
    # a post-bootstrap hook: all of the set is unpacked, so the bootstrap key changes
    assert keys(without, "post")[0]["bootstrap"] != keys(with_less, "post")[0]["bootstrap"]
    assert keys(without, "pre")[0]["bootstrap"] == keys(with_less, "pre")[0]["bootstrap"]
