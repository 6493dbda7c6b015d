"""The multistrap configuration written by the bootstrap stage."""
from __future__ import annotations

import configparser
import textwrap
from pathlib import Path

import pytest

from hypersolid.config import Project, clear_caches
from hypersolid.stages.bootstrap import KEYRING, multistrap_ini, sections_for

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


def ini_for(target, arch: str, directory: Path = Path("/build/tree")) -> configparser.ConfigParser:
    return parse(multistrap_ini(arch, directory, sections_for(target, arch)))


def test_general_section(tmp_path):
    ini = ini_for(load(tmp_path, TARGET), "arm64", Path("/work/out/tree"))
    general = ini["General"]
    assert general["arch"] == "arm64"
    assert general["directory"] == "/work/out/tree"
    assert general["ignorenativearch"] == "true"
    assert general["cleanup"] == "true"
    assert general["unpack"] == "true"
    assert general["noauth"] == "false"
    assert general["allowrecommends"] == "false"  # multistrap's default too: only Depends


def test_every_section_is_an_apt_source_and_bootstrapped_including_security(tmp_path):
    ini = ini_for(load(tmp_path, TARGET), "amd64")
    assert ini["General"]["aptsources"].split() == ["debian", "vendor", "security"]
    assert ini["General"]["bootstrap"].split() == ["debian", "vendor", "security"]
    assert ini.sections() == ["General", "debian", "vendor", "security"]


def test_security_section_uses_suite_security_and_the_mirror_components(tmp_path):
    security = ini_for(load(tmp_path, TARGET), "amd64")["security"]
    assert security["source"] == "http://security.debian.org/debian-security"
    assert security["suite"] == "bookworm-security"
    # components of the sections from the main mirror, not the vendor's
    assert security["components"].split() == ["main", "non-free-firmware"]
    assert security["packages"] == ""


def test_no_security_section_when_security_mirror_is_null(tmp_path):
    text = TARGET.replace("security_mirror: http://security.debian.org/debian-security",
                          "security_mirror: null")
    ini = ini_for(load(tmp_path, text), "amd64")
    assert ini["General"]["aptsources"].split() == ["debian", "vendor"]
    assert ini["General"]["bootstrap"].split() == ["debian", "vendor"]
    assert "security" not in ini.sections()


def test_child_disabling_security_of_base(tmp_path):
    (tmp_path / "targets" / "base").mkdir(parents=True)
    (tmp_path / "targets" / "base" / "target.yaml").write_text(textwrap.dedent(TARGET))
    target = load(tmp_path, "extends: base\nsecurity_mirror: null\n", name="child")
    assert "security" not in ini_for(target, "amd64").sections()


@pytest.mark.parametrize("arch, present, absent", [
    ("amd64", "linux-image-amd64", "linux-image-arm64"),
    ("arm64", "linux-image-arm64", "linux-image-amd64"),
])
def test_arch_packages_only_for_that_arch(tmp_path, arch, present, absent):
    packages = ini_for(load(tmp_path, TARGET), arch)["debian"]["packages"].split()
    assert packages == ["systemd", "sudo", present]
    assert absent not in packages


def test_each_section_has_source_suite_components_and_the_first_the_keyring(tmp_path):
    ini = ini_for(load(tmp_path, TARGET), "amd64")
    for name in ("debian", "vendor", "security"):
        s = ini[name]
        assert {"packages", "source", "suite", "components", "omitdebsrc"} <= set(s), name
        assert s["omitdebsrc"] == "true"
    # multistrap deletes the keyring package after the first section naming
    # it and then fails on the next: the keyring is named once.
    assert ini["debian"]["keyring"] == KEYRING == "debian-archive-keyring"
    assert "keyring" not in ini["vendor"] and "keyring" not in ini["security"]
    assert dict(ini["debian"]) == {
        "packages": "systemd sudo linux-image-amd64",
        "source": "http://deb.debian.org/debian",
        "keyring": "debian-archive-keyring",
        "suite": "bookworm",
        "components": "main non-free-firmware",
        "omitdebsrc": "true",
    }
    vendor = ini["vendor"]
    assert vendor["source"] == "http://apt.vendor.example/debian"
    assert vendor["suite"] == "stable"
    assert vendor["components"] == "vendor"
    assert vendor["packages"] == "vendor-tools"


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
    security = ini_for(load(tmp_path, text), "amd64")["security"]
    assert security["suite"] == "trixie-security"
    assert security["components"] == "main"


def test_shipped_qemu_amd64_ini():
    clear_caches()
    target = Project(REPO).load("qemu-amd64")
    ini = ini_for(target, "amd64")
    names = [s.name for s in target.sections]
    expected = names + (["security"] if target.security_mirror else [])
    assert ini["General"]["aptsources"].split() == expected
    assert "linux-image-amd64" in ini["debian"]["packages"].split()
    if target.security_mirror:
        assert ini["security"]["suite"] == f"{target.suite}-security"


def test_section_named_security_does_not_duplicate_the_security_section(tmp_path):
    """A target's own section called `security` plus security_mirror must not
    give multistrap two [security] sections: reject it or emit one."""
    from hypersolid.config import ConfigError
    text = TARGET.rstrip(" ") + "      - name: security\n        source: http://security.example/debian-security\n"
    try:
        target = load(tmp_path, text)
    except ConfigError as err:
        assert err.key == "sections[2].name", str(err)
        return
    text = multistrap_ini("amd64", Path("/tree"), sections_for(target, "amd64"))
    ini = parse(text)  # strict: a duplicate section raises DuplicateSectionError
    names = ini["General"]["aptsources"].split()
    assert len(names) == len(set(names)), names


def test_a_section_with_recommends_allows_recommends_for_the_bootstrap(tmp_path):
    """multistrap resolves all sections in one apt run and reads
    allowrecommends from [General] only: one section asking is enough."""
    text = TARGET.replace("        packages: [vendor-tools]\n", "        packages: [vendor-tools]\n        recommends: true\n")
    ini = ini_for(load(tmp_path, text), "amd64")
    assert ini["General"]["allowrecommends"] == "true"
    assert not any("allowrecommends" in ini[name] for name in ("debian", "vendor", "security"))


def test_recommends_false_given_explicitly_is_the_default(tmp_path):
    text = TARGET.replace("        packages: [vendor-tools]\n", "        packages: [vendor-tools]\n        recommends: false\n")
    assert ini_for(load(tmp_path, text), "amd64")["General"]["allowrecommends"] == "false"
