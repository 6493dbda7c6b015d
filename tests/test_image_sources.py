"""The image's apt sources (image_sources) are separate from the build's mirror."""
from __future__ import annotations

import subprocess
import textwrap

import pytest

from conftest import MIRROR, TestProject, needs_root_and_tools, tiny_target
from hypersolid.aptsources import deb822
from hypersolid.config import DEBIAN_KEYRING, AptSource, Project

ELSEWHERE = "http://apt.example.invalid/debian"


def load(tmp_path, text: str, name: str = "t"):
    path = tmp_path / "targets" / name / "target.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return Project(tmp_path).load(name)


TARGET = """\
    architectures: [amd64]
    suite: bookworm
    mirror: http://mirror.internal/debian
    security_mirror: http://mirror.internal/debian-security
    sections:
      - name: debian
        components: [main, non-free-firmware]
      - name: contrib
        components: [contrib]
      - name: vendor
        source: http://apt.vendor.example/debian
        suite: stable
        components: [vendor]
    """


def test_default_is_the_mirror_with_the_components_of_its_sections_and_the_security_mirror(tmp_path):
    t = load(tmp_path, TARGET)
    assert t.image_sources == (
        AptSource(("http://mirror.internal/debian",), ("bookworm",), ("main", "non-free-firmware", "contrib"),
                  DEBIAN_KEYRING, True),
        AptSource(("http://mirror.internal/debian-security",), ("bookworm-security",),
                  ("main", "non-free-firmware", "contrib"), DEBIAN_KEYRING, True))


def test_default_deb822_names_the_keyring_only_when_the_image_has_it(tmp_path):
    t = load(tmp_path, TARGET)
    assert deb822(t.image_sources, lambda path: path == DEBIAN_KEYRING) == textwrap.dedent("""\
        # The image's apt sources: image_sources in target.yaml (written by hypersolid)
        Types: deb
        URIs: http://mirror.internal/debian
        Suites: bookworm
        Components: main non-free-firmware contrib
        Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

        Types: deb
        URIs: http://mirror.internal/debian-security
        Suites: bookworm-security
        Components: main non-free-firmware contrib
        Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
        """)
    assert "Signed-By" not in deb822(t.image_sources, lambda path: False)


def test_default_without_security_mirror_is_one_entry(tmp_path):
    t = load(tmp_path, TARGET.replace("security_mirror: http://mirror.internal/debian-security",
                                      "security_mirror: null"))
    assert [s.uris for s in t.image_sources] == [("http://mirror.internal/debian",)]


def test_given_entries_are_written_exactly(tmp_path):
    t = load(tmp_path, TARGET + """image_sources:
      - uris: [http://deb.debian.org/debian, http://ftp.de.debian.org/debian]
        suites: [bookworm, bookworm-updates]
        components: [main, contrib]
        signed_by: /usr/share/keyrings/debian-archive-keyring.gpg
      - uris: http://apt.vendor.example/flat
        suites: ./
        components: []
    """)
    assert deb822(t.image_sources) == textwrap.dedent("""\
        # The image's apt sources: image_sources in target.yaml (written by hypersolid)
        Types: deb
        URIs: http://deb.debian.org/debian http://ftp.de.debian.org/debian
        Suites: bookworm bookworm-updates
        Components: main contrib
        Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

        Types: deb
        URIs: http://apt.vendor.example/flat
        Suites: ./
        """)


def test_none_is_no_sources_and_null_in_a_child_is_the_default_again(tmp_path):
    load(tmp_path, TARGET.replace("architectures: [amd64]", "abstract: true") + "image_sources: none\n", "base")
    assert load(tmp_path, "extends: [base]\narchitectures: [amd64]\n", "a").image_sources == ()
    assert deb822(()) == ""
    child = load(tmp_path, "extends: [base]\narchitectures: [amd64]\nimage_sources: null\n", "b")
    assert [s.uris[0] for s in child.image_sources] == ["http://mirror.internal/debian",
                                                         "http://mirror.internal/debian-security"]


def test_a_child_replaces_the_inherited_entries(tmp_path):
    load(tmp_path, TARGET.replace("architectures: [amd64]", "abstract: true")
         + "image_sources: [{uris: [http://a.example/debian], suites: [bookworm]}]\n", "base")
    t = load(tmp_path, "extends: [base]\narchitectures: [amd64]\n"
             "image_sources: [{uris: [http://b.example/debian], suites: [bookworm]}]\n")
    assert t.image_sources == (AptSource(("http://b.example/debian",), ("bookworm",), ("main",)),)


# --- real images ----------------------------------------------------------------

def listing(path) -> list[str]:
    out = subprocess.run(["unsquashfs", "-lln", str(path)], check=True, stdout=subprocess.PIPE, text=True).stdout
    return [line.split(" squashfs-root", 1)[1].split(" -> ")[0] for line in out.splitlines() if " squashfs-root" in line]


def cat(path, name: str) -> str:
    return subprocess.run(["unsquashfs", "-cat", str(path), name.lstrip("/")], check=True,
                          stdout=subprocess.PIPE, text=True).stdout


def etc_apt(path) -> dict[str, str]:
    """Every regular text file under /etc/apt of an image, with its content."""
    out = subprocess.run(["unsquashfs", "-lln", str(path), "etc/apt"], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    files = [line.split(" squashfs-root", 1)[1] for line in out.splitlines()
             if line.startswith("-") and " squashfs-root" in line]
    return {f: cat(path, f) for f in files if not f.endswith((".gpg", ".asc"))}


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_cache) -> TestProject:
    needs_root_and_tools()
    p = TestProject(tmp_path_factory.mktemp("sources"), shared_cache)
    # The sections name the build's mirror explicitly; the image is to use another.
    p.target("elsewhere", tiny_target().replace("    packages: [netbase]", f"    packages: [netbase]\n    source: {MIRROR}")
             + textwrap.dedent(f"""\
                 image_sources:
                   - uris: [{ELSEWHERE}]
                     suites: [bookworm, bookworm-updates]
                     components: [main, contrib]
                 """))
    p.target("nosources", tiny_target(extra="image_sources: none\n"))
    p.doit("squashfs:elsewhere", "squashfs:nosources")
    return p


@pytest.mark.integration
def test_image_apt_names_only_the_image_sources_not_the_build_mirror(project):
    image = project.entry("squashfs", "elsewhere") / "system-amd64.img"
    files = etc_apt(image)
    sources = [f for f in listing(image) if f.startswith("/etc/apt/sources.list")]
    assert sources == ["/etc/apt/sources.list.d", "/etc/apt/sources.list.d/hypersolid.sources"]
    text = files["/etc/apt/sources.list.d/hypersolid.sources"]
    assert f"URIs: {ELSEWHERE}\nSuites: bookworm bookworm-updates\nComponents: main contrib\n" in text
    assert "Signed-By" not in text  # none given
    build_host = MIRROR.split("://", 1)[1].split("/")[0]
    assert [f for f, t in files.items() if build_host in t or "127.0.0.1" in t] == []


@pytest.mark.integration
def test_image_sources_none_leaves_an_empty_sources_list_d(project):
    image = project.entry("squashfs", "nosources") / "system-amd64.img"
    assert [f for f in listing(image) if f.startswith("/etc/apt/sources.list")] == ["/etc/apt/sources.list.d"]


@pytest.mark.integration
def test_multistrap_copies_of_the_keyrings_are_gone_but_the_package_keyrings_stay(project):
    entries = listing(project.entry("squashfs", "elsewhere") / "system-amd64.img")
    assert DEBIAN_KEYRING in entries
    trusted = [e for e in entries if e.startswith("/etc/apt/trusted.gpg.d/")]
    assert trusted and all(e.endswith(".asc") for e in trusted), trusted


@pytest.mark.integration
def test_a_signed_by_keyring_missing_from_the_image_fails_the_build(project):
    project.target("nokey", tiny_target(extra=textwrap.dedent(f"""\
        image_sources:
          - uris: [{ELSEWHERE}]
            suites: [bookworm]
            signed_by: /usr/share/keyrings/vendor-archive-keyring.gpg
        """)))
    result = project.doit("squashfs:nokey", check=False)
    assert result.returncode != 0
    assert "image_sources: signed_by /usr/share/keyrings/vendor-archive-keyring.gpg is not in the image" \
        in result.output
