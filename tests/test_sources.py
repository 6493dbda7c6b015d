"""What the target's sections become: the resolver's apt sources (every
section, plus security) and the bootstrap's one-section multistrap
configuration of the local repository."""
from __future__ import annotations

import configparser
import textwrap
from pathlib import Path

import pytest

from hypersolid.config import Project, clear_caches
from hypersolid import resolve
from hypersolid.stages.bootstrap import multistrap_ini, sections_for

REPO = Path(__file__).resolve().parents[1]

TARGET = """\
    architectures: [amd64, arm64]
    suite: bookworm
    mirror: http://deb.debian.org/debian
    security_mirror: http://security.debian.org/debian-security
    sections:
      - name: debian
        components: [main, non-free-firmware]
        packages: [systemd, sudo]
        arch_packages:
          amd64: [linux-image-amd64]
          arm64: [linux-image-arm64]
      - name: vendor
        source: http://apt.vendor.example/debian
        suite: stable
        components: [vendor]
        packages: [vendor-tools]
    """


def load(tmp_path: Path, text: str, name: str = "t"):
    path = tmp_path / "targets" / name / "target.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return Project(tmp_path).load(name)


def parse(text: str) -> configparser.ConfigParser:
    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string(text)
    return ini


def by_name(target, arch: str) -> dict[str, dict]:
    return {s["name"]: s for s in sections_for(target, arch)}


def apt_sources(target, arch: str) -> list[str]:
    return resolve.sources_list(sections_for(target, arch), arch, "/k.gpg").splitlines()


def test_the_bootstrap_installs_from_one_local_section_naming_every_package():
    ini = parse(multistrap_ini("arm64", Path("/work/out/tree"), "http://127.0.0.1:1234/", ["zstd", "apt"]))
    general = ini["General"]
    assert general["arch"] == "arm64"
    assert general["directory"] == "/work/out/tree"
    assert general["ignorenativearch"] == "true"
    assert general["cleanup"] == "true"
    assert general["unpack"] == "false"  # multistrap resolves and downloads; unpack.py unpacks
    assert general["noauth"] == "true"  # the loopback repository of verified .debs
    assert general["allowrecommends"] == "false"  # the resolver chose the recommends already
    assert ini.sections() == ["General", "hypersolid"]
    assert dict(ini["hypersolid"]) == {"packages": "apt zstd", "source": "http://127.0.0.1:1234/",
                                       "suite": "hypersolid", "components": "main", "omitdebsrc": "true"}


def test_every_section_is_an_apt_source_including_security(tmp_path):
    assert apt_sources(load(tmp_path, TARGET), "amd64") == [
        "deb [arch=amd64 signed-by=/k.gpg] http://deb.debian.org/debian bookworm main non-free-firmware",
        "deb [arch=amd64 signed-by=/k.gpg] http://apt.vendor.example/debian stable vendor",
        "deb [arch=amd64 signed-by=/k.gpg] http://security.debian.org/debian-security bookworm-security "
        "main non-free-firmware",
    ]


def test_security_section_uses_suite_security_and_the_mirror_components(tmp_path):
    security = by_name(load(tmp_path, TARGET), "amd64")["security"]
    assert security["source"] == "http://security.debian.org/debian-security"
    assert security["suite"] == "bookworm-security"
    # components of the sections from the main mirror, not the vendor's
    assert security["components"] == ["main", "non-free-firmware"]
    assert security["packages"] == []


def test_no_security_section_when_security_mirror_is_null(tmp_path):
    text = TARGET.replace("security_mirror: http://security.debian.org/debian-security",
                          "security_mirror: null")
    assert list(by_name(load(tmp_path, text), "amd64")) == ["debian", "vendor"]


def test_child_disabling_security_of_base(tmp_path):
    (tmp_path / "targets" / "base").mkdir(parents=True)
    (tmp_path / "targets" / "base" / "target.yaml").write_text(textwrap.dedent(TARGET))
    target = load(tmp_path, "extends: base\nsecurity_mirror: null\n", name="child")
    assert "security" not in by_name(target, "amd64")


@pytest.mark.parametrize("arch, present, absent", [
    ("amd64", "linux-image-amd64", "linux-image-arm64"),
    ("arm64", "linux-image-arm64", "linux-image-amd64"),
])
def test_arch_packages_only_for_that_arch(tmp_path, arch, present, absent):
    packages = by_name(load(tmp_path, TARGET), arch)["debian"]["packages"]
    assert packages == ["systemd", "sudo", present]
    assert absent not in packages


def test_security_components_default_to_main_without_mirror_sections(tmp_path):
    text = """\
        architectures: [amd64]
        suite: trixie
        mirror: http://deb.debian.org/debian
        security_mirror: http://security.debian.org/debian-security
        sections:
          - name: local
            source: file:///srv/repo
            components: [local]
            packages: [thing]
        """
    security = by_name(load(tmp_path, text), "amd64")["security"]
    assert security["suite"] == "trixie-security"
    assert security["components"] == ["main"]


def test_shipped_qemu_amd64_sections():
    clear_caches()
    target = Project(REPO).load("qemu-amd64")
    sections = by_name(target, "amd64")
    expected = [s.name for s in target.sections] + (["security"] if target.security_mirror else [])
    assert list(sections) == expected
    assert "linux-image-amd64" in sections["debian"]["packages"]


def test_section_named_security_does_not_duplicate_the_security_section(tmp_path):
    """A target's own section called `security` plus security_mirror must not
    give apt two security sources: reject it or emit one."""
    from hypersolid.config import ConfigError
    text = TARGET.rstrip(" ") + "      - name: security\n        source: http://security.example/debian-security\n"
    try:
        target = load(tmp_path, text)
    except ConfigError as err:
        assert err.key == "sections[2].name", str(err)
        return
    names = [s["name"] for s in sections_for(target, "amd64")]
    assert len(names) == len(set(names)), names


def test_a_section_with_recommends_makes_the_resolver_take_recommends(tmp_path):
    """apt resolves all sections in one run: one section asking is enough."""
    text = TARGET.replace("        packages: [vendor-tools]\n", "        packages: [vendor-tools]\n        recommends: true\n")
    conf = resolve.prepare(tmp_path / "state", sections_for(load(tmp_path, text), "amd64"), "amd64", "/k", None)
    assert 'APT::Install-Recommends "true";' in conf.read_text()


def test_recommends_false_given_explicitly_is_the_default(tmp_path):
    text = TARGET.replace("        packages: [vendor-tools]\n", "        packages: [vendor-tools]\n        recommends: false\n")
    conf = resolve.prepare(tmp_path / "state", sections_for(load(tmp_path, text), "amd64"), "amd64", "/k", None)
    assert 'APT::Install-Recommends "false";' in conf.read_text()
