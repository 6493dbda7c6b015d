"""Target YAML: loading, validation (file, line, key path) and merging."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from hypersolid.config import ConfigError, Project, Section, User, clear_caches
from hypersolid.stages.squashfs import mksquashfs_args
from hypersolid.tasks import subtask_name

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """A project directory; the cwd is a sibling so paths display absolute."""
    project = tmp_path / "proj"
    (project / "targets").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return project


def write(root: Path, name: str, text: str) -> Path:
    path = root / "targets" / name / "target.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def target_file(root: Path, name: str) -> Path:
    return (root / "targets" / name / "target.yaml").resolve()


# --- bad targets ------------------------------------------------------------
# Each case: files to write, the target to load, the file the error must name,
# the key path, the 1-based line and a fragment of the message.

BASE = """\
    abstract: true
    suite: bookworm
    mirror: http://deb.debian.org/debian
    sections:
      - name: debian
        packages: [systemd]
    """

BAD = [
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            hostnme: box
            sections:
              - name: debian
            """},
        "t", "t", "hostnme", 4, "unknown key (allowed here:",
        id="unknown-top-level-key"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
                packages: [systemd]
              - name: extra
                pakages: [vim]
            """},
        "t", "t", "sections[1].pakages", 8, "unknown key (allowed here: arch_packages, components, name",
        id="unknown-key-in-section"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: [bookworm, trixie]
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            """},
        "t", "t", "suite", 2, "expected a string, got a list",
        id="list-where-string-expected"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            users:
              - name: alice
                groups: audio
            """},
        "t", "t", "users[0].groups", 8, "expected a list, got a scalar",
        id="string-where-list-expected"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections: debian
            """},
        "t", "t", "sections", 4, "expected a list, got a scalar",
        id="string-where-list-of-sections-expected"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: 12
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            """},
        "t", "t", "suite", 2, "expected a string, got an integer",
        id="integer-where-string-expected"),
    pytest.param(
        {"t": """\
            # a comment first
            architectures: [amd64, sparc64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            """},
        "t", "t", "architectures[1]", 2, "unknown architecture 'sparc64'",
        id="unknown-architecture"),
    pytest.param(
        {"t": """\
            architectures: amd64
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
                arch_packages:
                  amd64: [linux-image-amd64]
                  sparc: [linux-image-sparc64]
            """},
        "t", "t", "sections[0].arch_packages.sparc", 8, "unknown architecture 'sparc'",
        id="unknown-architecture-in-arch-packages"),
    pytest.param(
        {"base": BASE, "t": """\
            # extends a target that is not there
            extends: [base, nosuch]
            architectures: [amd64]
            """},
        "t", "t", "extends", 2, "no target 'nosuch'",
        id="missing-extended-target"),
    pytest.param(
        {"a": """\
            extends: b
            architectures: [amd64]
            """,
         "b": """\
            abstract: true
            extends: [a]
            """},
        "a", "b", "extends", 2, "inheritance cycle: a -> b -> a",
        id="inheritance-cycle"),
    pytest.param(
        {"a": """\
            description: me again
            extends: a
            """},
        "a", "a", "extends", 2, "inheritance cycle: a -> a",
        id="target-extends-itself"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
                packages:
                  - systemd
                  - Vim_Editor
            """},
        "t", "t", "sections[0].packages[1]", 8, "'Vim_Editor' is not a Debian package name",
        id="invalid-package-name"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            users:
              - name: alice
                sudo: true
                password: hunter2
            """},
        "t", "t", "users[0].password", 9, "'hunter2' is not a crypt(3) hash",
        id="plaintext-user-password"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            root_password: toor
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            """},
        "t", "t", "root_password", 2, "'toor' is not a crypt(3) hash",
        id="plaintext-root-password"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            services:
              enable: [ssh, cron]
              disable:
                - getty@tty1
                - ssh.service
            """},
        "t", "t", "services.disable[1]", 10, "'ssh.service' is in services.enable of this file too",
        id="unit-enabled-and-disabled-in-one-file"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            root_password: "$6$salt$hash:0:99999:7:::"
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            """},
        "t", "t", "root_password", 3, "'$6$salt$hash:0:99999:7:::' is not a crypt(3) hash",
        id="colon-in-root-password"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            root_password: "$6$salt$hash\\nintruder::0:0:::::"
            """},
        "t", "t", "root_password", 6, "'$6$salt$hash\\nintruder::0:0:::::' is not a crypt(3) hash",
        id="newline-in-root-password"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            users:
              - name: alice
                password: |
                  $y$j9T$salt$hash
                  mallory::0:0:::::
            """},
        "t", "t", "users[0].password", 8, "is not a crypt(3) hash",
        id="newline-in-user-password"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            users:
              - name: alice
              - name: bob
                password: '!$6$sa:lt$hash'
            """},
        "t", "t", "users[1].password", 9, "'!$6$sa:lt$hash' is not a crypt(3) hash",
        id="colon-in-user-password"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            users:
              - name: alice
                password: '$6$salt$'
            """},
        "t", "t", "users[0].password", 8, "'$6$salt$' is not a crypt(3) hash",
        id="truncated-password-hash"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            users:
              - name: alice
                shell: "/bin/sh:0:0"
            """},
        "t", "t", "users[0].shell", 8, "is not an absolute path without ':'",
        id="colon-in-shell"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            squashfs:
              level: 3
              compression: brotli
            """},
        "t", "t", "squashfs.compression", 8, "unknown compression 'brotli' (known: zstd, xz",
        id="bad-compression"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            squashfs:
              compression: zstd
              level: 23
            """},
        "t", "t", "squashfs.level", 8, "23 is outside 1..22",
        id="level-above-range"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            squashfs: {level: 0}
            """},
        "t", "t", "squashfs.level", 6, "0 is outside 1..22",
        id="level-below-range"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            suite: trixie
            """},
        "t", "t", "suite", 6, "given twice",
        id="duplicate-top-level-key"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
                packages: [systemd]
                packages: [vim]
            """},
        "t", "t", "sections[0].packages", 7, "given twice",
        id="duplicate-key-in-section"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian: main
            sections:
              - name: debian
            """},
        "t", "t", "", 3, "invalid YAML: mapping values are not allowed here",
        id="invalid-yaml-mapping-value"),
    pytest.param(
        {"t": "architectures: [amd64]\nsuite: bookworm\n\tmirror: http://deb.debian.org/debian\n"},
        "t", "t", "", 3, "invalid YAML: found character '\\t' that cannot start any token",
        id="invalid-yaml-tab"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            """},
        "t", "t", "suite", 1, "required to build this target, but neither it nor the targets it extends (none) set it",
        id="non-abstract-missing-suite"),
    pytest.param(
        {"base": BASE, "t": """\
            extends: base
            hostname: box
            """},
        "t", "t", "architectures", 1, "the targets it extends (base) set it",
        id="non-abstract-missing-architectures"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            sections:
              - name: debian
            """},
        "t", "t", "mirror", 1, "required to build this target",
        id="non-abstract-missing-mirror"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            """},
        "t", "t", "sections", 1, "mark it `abstract: true`",
        id="non-abstract-missing-sections"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - packages: [vim]
            """},
        "t", "t", "sections[0].name", 5, "required key is missing",
        id="section-without-name"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: ftp://deb.debian.org/debian
            sections:
              - name: debian
            """},
        "t", "t", "mirror", 3, "is not an http(s):// or file:// URL",
        id="mirror-not-a-url"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            users:
              - name: alice
                sudo: "yes"
            """},
        "t", "t", "users[0].sudo", 8, "expected true or false, got a string 'yes'",
        id="quoted-bool"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            hostname: my_box
            """},
        "t", "t", "hostname", 6, "'my_box' is not a host name",
        id="bad-hostname"),
    pytest.param(
        {"t": """\
            extends:
              base: true
            """},
        "t", "t", "extends", 2, "expected a list, got a mapping",
        id="extends-is-a-mapping"),
    pytest.param(
        {"t": """\
            - architectures: [amd64]
            """},
        "t", "t", "", 1, "expected a mapping, got a list",
        id="top-level-not-a-mapping"),
    pytest.param(
        {"base": """\
            abstract: true
            suite: bookworm
            image: iso
            """,
         "t": """\
            extends: [base]
            architectures: [amd64]
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            """},
        "t", "base", "image", 3, "unknown image type 'iso'",
        id="error-in-extended-target-names-its-file"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            image_sources: default
            """},
        "t", "t", "image_sources", 6, "expected a list of sources or none, got 'default'",
        id="image-sources-not-a-list-or-none"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            image_sources:
              - uris: [http://deb.debian.org/debian]
                suite: bookworm
            """},
        "t", "t", "image_sources[0].suite", 8, "unknown key (allowed here: components, signed_by, suites, uris)",
        id="image-sources-unknown-key"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            image_sources:
              - uris: [http://deb.debian.org/debian]
            """},
        "t", "t", "image_sources[0].suites", 7, "required key is missing",
        id="image-sources-without-suites"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            image_sources:
              - uris: [http://apt.example/flat]
                suites: [./]
                components: [main]
            """},
        "t", "t", "image_sources[0].components", 9, "an exact path suite (./) takes no components",
        id="image-sources-flat-suite-with-components"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            image_sources:
              - uris: [http://deb.debian.org/debian]
                suites: [bookworm]
                signed_by: debian.gpg
            """},
        "t", "t", "image_sources[0].signed_by", 9, "is not an absolute path of a keyring in the image",
        id="image-sources-relative-signed-by"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
                recommends: "yes"
            """},
        "t", "t", "sections[0].recommends", 6, "expected true or false",
        id="recommends-not-a-bool"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            users:
              - name: alice
                password: ""
            """},
        "t", "t", "users[0].password", 8, "an empty password needs password_change_on_first_login: true",
        id="empty-password-without-first-login-change"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            users:
              - name: alice
                groups: [adm]
                password_change_on_first_login: true
            """},
        "t", "t", "users[0].password_change_on_first_login", 9,
        "the account is locked (password absent (locked)): a locked account cannot",
        id="first-login-change-of-a-locked-account"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            users:
              - name: alice
                password: "!$6$salt$hashhashhash"
                password_change_on_first_login: true
            """},
        "t", "t", "users[0].password_change_on_first_login", 9, "the account is locked (password '!$6$salt",
        id="first-login-change-of-a-locked-hash"),
    pytest.param(
        {"base": """\
            abstract: true
            users:
              - name: bob
              - name: alice
                password: ""
                password_change_on_first_login: true
            """,
         "t": """\
            extends: [base]
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            users:
              - name: alice
                password: '*'
            """},
        "t", "t", "users[0].password", 9, "the account is locked (password '*')",
        id="first-login-change-locked-by-a-later-layer-names-that-layer"),
    pytest.param(
        {"t": """\
            architectures: [amd64]
            suite: bookworm
            mirror: http://deb.debian.org/debian
            sections:
              - name: debian
            root_password: ""
            """},
        "t", "t", "root_password", 6, "'' is not a crypt(3) hash",
        id="empty-root-password"),
]


@pytest.mark.parametrize("files, load, culprit, key, line, message", BAD)
def test_bad_target_names_file_key_and_line(root, files, load, culprit, key, line, message):
    for name, text in files.items():
        write(root, name, text)
    with pytest.raises(ConfigError) as info:
        Project(root).load(load)
    err = info.value
    path = target_file(root, culprit)
    assert (err.file, err.line, err.key) == (path, line, key), str(err)
    prefix = f"{path}:{line}: {key}: " if key else f"{path}:{line}: "
    assert str(err).startswith(prefix), str(err)
    assert message in err.message, str(err)


# Malformed files: raw bytes, the 1-based line, the key path ("" for the
# file as a whole) and a fragment of the message.  Never a traceback, and
# nothing is constructed from a tag.
MALFORMED = [
    pytest.param(b"architectures: [amd64]\nhostname: caf\xe9\n", 2, "",
                 "not UTF-8 text (byte 0xe9 at column 14)", id="not-utf-8"),
    pytest.param(b"architectures: [amd64]\nhostname: a\x00b\n", 2, "",
                 "invalid YAML: character #x0000: special characters are not allowed", id="nul-byte"),
    pytest.param(b"a: &a [lol, lol, lol]\nb: &b [*a, *a, *a]\nkernel_cmdline: [*b, *b, *b]\n", 2, "",
                 "alias *a: YAML anchors and aliases are not supported", id="alias-bomb"),
    pytest.param(b"architectures: [amd64]\nkernel_cmdline: &k [*k]\n", 2, "",
                 "alias *k: YAML anchors and aliases", id="list-containing-itself"),
    pytest.param(b"architectures: [amd64]\nsquashfs: {level: " + b"9" * 5000 + b"}\n", 2, "squashfs.level",
                 "is not an integer of sane size", id="huge-integer"),
    pytest.param(b"squashfs:\n  level: !!int twelve\n", 2, "squashfs.level",
                 "expected an integer, got 'twelve'", id="int-tag-on-text"),
    pytest.param(b"architectures:\n\t- amd64\n", 2, "",
                 "found character '\\t' that cannot start any token (indent with spaces, not tabs)",
                 id="tab-indented"),
    pytest.param(b"- architectures: [amd64]\n- suite: bookworm\n", 1, "",
                 "expected a mapping, got a list", id="top-level-list"),
    pytest.param(b"architectures: [amd64]\nhostname: !!python/object/apply:os.system [touch /tmp/pwned]\n",
                 2, "hostname", "YAML tag '!!python/object/apply:os.system' is not allowed", id="python-tag"),
    pytest.param(b"!!python/object/apply:os.system\n- touch /tmp/pwned\n", 1, "",
                 "YAML tag '!!python/object/apply:os.system' is not allowed", id="python-tag-on-document"),
    pytest.param(b"kernel_cmdline:\n  - - ok\n  - " + b"[" * 100000, 3, "",
                 "invalid YAML: [ and { nested more than 64 deep", id="deeply-nested-flow"),
    pytest.param(b"kernel_cmdline:\n" + b"- " * 2000 + b"x\n", 1, "",
                 "invalid YAML: nested too deeply", id="deeply-nested-block"),
    pytest.param(b"", 1, "architectures", "required to build this target", id="empty-file"),
    pytest.param(b"hostname: " + b"x" * (256 << 10) + b"\n", 1, "",
                 "more than 262144 is not a target", id="huge-file"),
    pytest.param(b"extends: [..]\n", 1, "extends[0]", "'..' is not a target name", id="extends-parent-dir"),
]


@pytest.mark.parametrize("data, line, key, message", MALFORMED)
def test_malformed_file_is_one_config_error(root, data, line, key, message):
    path = root / "targets/t/target.yaml"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        Project(root).load("t")
    err = info.value
    assert (err.file, err.line, err.key) == (target_file(root, "t"), line, key), str(err)
    assert message in err.message and "\n" not in str(err) and len(str(err)) < 400, str(err)


def test_brackets_in_quotes_and_comments_are_no_nesting(root):
    deep = "[" * 100
    lines = ["raspberrypi:",
             f"  config_txt: ['{deep}', \"{deep}{{\\\"\", '{deep}''']  # {deep}",
             f"# {deep}"]
    write(root, "t", textwrap.dedent(BASE.replace("abstract: true", "architectures: [amd64]"))
          + "\n".join(lines) + "\n")
    assert Project(root).load("t").rpi_config_txt == (deep, deep + '{"', deep + "'")


def test_a_target_yaml_that_is_a_directory_or_a_fifo_is_one_config_error(root):
    path = root / "targets/t/target.yaml"
    path.mkdir(parents=True)
    assert Project(root).target_names() == ["t"]
    with pytest.raises(ConfigError) as info:
        Project(root).load("t")
    assert str(info.value) == f"{target_file(root, 't')}:1: cannot read target: {target_file(root, 't')} is a directory"
    path.rmdir()
    os.mkfifo(path)  # never opened: it would block
    clear_caches()
    with pytest.raises(ConfigError) as info:
        Project(root).load("t")
    assert info.value.message.endswith("is not a regular file")


def test_a_target_yaml_linked_from_outside_targets_is_refused(root, tmp_path):
    outside = tmp_path / "outside.yaml"
    outside.write_text("architectures: [amd64]\n")
    link = (root / "targets").resolve() / "t/target.yaml"
    link.parent.mkdir()
    link.symlink_to(outside)
    with pytest.raises(ConfigError) as info:
        Project(root).load("t")
    assert info.value.file == link and info.value.line == 1   # the link, not where it points
    assert f"target.yaml resolves to {outside.resolve()}, outside" in info.value.message
    link.unlink()
    link.symlink_to("target.yaml")  # a loop
    clear_caches()
    with pytest.raises(ConfigError) as info:
        Project(root).load("t")
    assert "cannot read target: Symlink loop" in info.value.message and info.value.file == link


def test_a_link_inside_targets_is_followed(root):
    write(root, "real", BASE.replace("abstract: true", "architectures: [amd64]"))
    (root / "targets/alias").mkdir()
    (root / "targets/alias/target.yaml").symlink_to("../real/target.yaml")
    assert Project(root).load("alias").suite == "bookworm"


def test_unknown_architecture_names_file_key_and_line(root):
    write(root, "t", """\
        suite: bookworm
        mirror: http://deb.debian.org/debian
        architectures:
          - amd64
          - mips
        sections:
          - name: debian
        """)
    with pytest.raises(ConfigError) as info:
        Project(root).load("t")
    assert str(info.value).startswith(f"{target_file(root, 't')}:5: architectures[1]: unknown architecture 'mips'")


def test_error_path_is_relative_to_the_working_directory(root, monkeypatch):
    monkeypatch.chdir(root)
    write(root, "t", "architectures: [amd64]\nsquashfs:\n  compression: brotli\n")
    with pytest.raises(ConfigError) as info:
        Project(root).load("t")
    assert str(info.value).startswith("targets/t/target.yaml:3: squashfs.compression: unknown compression")


def test_loading_an_unknown_target_lists_the_known_ones(root):
    write(root, "base", BASE)
    write(root, "other", BASE)
    with pytest.raises(ConfigError) as info:
        Project(root).load("nope")
    assert "no such target 'nope' (known: base, other)" in str(info.value)


def test_buildable_gives_the_good_targets_and_the_errors_of_the_bad(root):
    write(root, "good", """\
        architectures: [amd64]
        suite: bookworm
        mirror: http://deb.debian.org/debian
        sections:
          - name: debian
        """)
    write(root, "bad", "architectures: [vax]\n")
    write(root, "loop", "extends: [loop2]\n")
    write(root, "loop2", "abstract: true\nextends: [loop]\n")  # says it is a base: its children report it
    buildable = Project(root).buildable()
    assert [t.name for t in buildable] == ["good"]
    assert sorted(buildable.errors) == ["bad", "loop"]
    bad = buildable.errors["bad"]
    assert (bad.file, bad.line, bad.key) == (target_file(root, "bad"), 1, "architectures[0]")
    loop = buildable.errors["loop"]
    assert (loop.file, loop.line, loop.key) == (target_file(root, "loop2"), 2, "extends")  # closes the cycle
    assert "inheritance cycle: loop -> loop2 -> loop" in loop.message


# --- shipped targets ------------------------------------------------------------

def test_shipped_qemu_amd64_target_loads():
    project = Project(REPO)
    t = project.load("qemu-amd64")
    assert t.architectures == ("amd64",)
    assert not t.abstract
    assert t.suite and t.mirror.startswith("http")
    packages = [p for s in t.sections for p in s.packages_for("amd64")]
    assert "linux-image-amd64" in packages
    assert [layer.name for layer in t.layers] == ["base", "qemu-amd64"]


def test_shipped_base_is_abstract_and_not_buildable():
    project = Project(REPO)
    assert project.load("base").abstract
    names = [t.name for t in project.buildable()]
    assert "base" not in names
    assert "qemu-amd64" in names


def test_shipped_motd_is_the_one_line_it_should_be():
    motd = REPO / "targets/qemu-amd64/rootfs/etc/motd"
    assert motd.read_text() == "hypersolid qemu-amd64: an immutable system. Changes to / vanish at reboot.\n"


def test_shipped_kernel_is_only_for_its_architecture():
    t = Project(REPO).load("qemu-amd64")
    assert all("linux-image-amd64" not in s.packages_for("arm64") for s in t.sections)


# --- merging ----------------------------------------------------------------------

def _two_parents(root: Path) -> None:
    write(root, "a", """\
        abstract: true
        description: parent a
        suite: bookworm
        mirror: http://a.example/debian
        hostname: from-a
        timezone: Europe/Berlin
        sections:
          - name: debian
            packages: [pa1, shared]
            arch_packages:
              amd64: [ka]
          - name: extra-a
            source: http://extra-a.example/debian
            suite: stable
            packages: [xa]
        users:
          - name: alice
            groups: [audio]
        services:
          enable: [svc-a]
          disable: [off-a]
        squashfs:
          compression: gzip
          level: 5
        """)
    write(root, "b", """\
        abstract: true
        hostname: from-b
        locale: de_DE.UTF-8
        mirror: http://b.example/debian
        sections:
          - name: debian
            packages: [pb1, shared]
            components: [main, contrib]
            arch_packages:
              amd64: [kb]
              arm64: [karm]
        users:
          - name: alice
            groups: [video, audio]
            sudo: true
          - name: bob
        services:
          enable: [svc-b, svc-a]
        """)
    write(root, "child", """\
        extends: [a, b]
        architectures: [amd64, arm64]
        locale: en_GB.UTF-8
        sections:
          - name: debian
            packages: [pc1, pa1]
          - name: own
            packages: [oc]
        users:
          - name: alice
            password: '$6$salt$hashhashhash'
        squashfs:
          compression: xz
        """)


def test_later_parent_scalar_wins_and_child_wins_over_both(root):
    _two_parents(root)
    t = Project(root).load("child")
    assert t.hostname == "from-b"          # b over a
    assert t.timezone == "Europe/Berlin"   # only a sets it
    assert t.locale == "en_GB.UTF-8"       # child over b
    assert t.mirror == "http://b.example/debian"
    assert t.suite == "bookworm"


def test_own_settings_are_not_inherited(root):
    _two_parents(root)
    t = Project(root).load("child")
    assert t.abstract is False
    assert t.description == ""


def test_package_lists_union_in_layer_order(root):
    _two_parents(root)
    debian = Project(root).load("child").sections[0]
    assert debian.packages == ("pa1", "shared", "pb1", "pc1")
    assert debian.packages_for("amd64") == ("pa1", "shared", "pb1", "pc1", "ka", "kb")
    assert debian.packages_for("arm64") == ("pa1", "shared", "pb1", "pc1", "karm")


def test_sections_merge_by_name(root):
    _two_parents(root)
    t = Project(root).load("child")
    assert [s.name for s in t.sections] == ["debian", "extra-a", "own"]
    debian, extra, own = t.sections
    assert debian.components == ("main", "contrib")
    assert debian.source == "http://b.example/debian"  # no source: the merged mirror
    assert debian.suite == "bookworm"                   # no suite: the merged suite
    assert extra == Section(name="extra-a", packages=("xa",), arch_packages=(), suite="stable",
                            components=("main",), source="http://extra-a.example/debian")
    assert own.packages == ("oc",) and own.components == ("main",)


def test_users_merge_by_name(root):
    _two_parents(root)
    t = Project(root).load("child")
    assert t.users == (
        User(name="alice", groups=("audio", "video"), sudo=True,
             password="$6$salt$hashhashhash", shell="/bin/bash"),
        User(name="bob", groups=(), sudo=False, password=None, shell="/bin/bash"),
    )


def test_record_settings_merge_key_by_key(root):
    _two_parents(root)
    t = Project(root).load("child")
    assert t.services_enable == ("svc-a", "svc-b")
    assert t.services_disable == ("off-a",)
    assert (t.compression, t.compression_level) == ("xz", 5)


def test_a_later_layer_re_enables_or_disables_an_inherited_unit(root):
    write(root, "base", textwrap.dedent(BASE) + "services:\n  enable: [ssh, cron]\n  disable: [getty@tty1, rsync]\n")
    write(root, "mid", "abstract: true\nextends: base\nservices:\n  disable: [ssh.service]\n")
    write(root, "t", "extends: mid\narchitectures: [amd64]\nservices: {enable: [getty@tty1.service, ssh]}\n")
    project = Project(root)
    mid = project.load("mid")
    assert (mid.services_enable, mid.services_disable) == (("cron",), ("getty@tty1", "rsync", "ssh.service"))
    t = project.load("t")
    assert t.services_enable == ("cron", "getty@tty1.service", "ssh")   # the last layer's word
    assert t.services_disable == ("rsync",)


def test_merged_services_never_name_a_unit_twice(root):
    write(root, "a", textwrap.dedent(BASE) + "services: {enable: [x, y], disable: [z]}\n")
    write(root, "b", "abstract: true\nservices: {enable: [z, x.service], disable: [y]}\n")
    write(root, "t", "extends: [a, b]\narchitectures: [amd64]\nservices: {enable: [x, x]}\n")
    t = Project(root).load("t")
    assert t.services_enable == ("x", "z") and t.services_disable == ("y",)
    assert len({*t.services_enable, *t.services_disable}) == 3


def test_layers_run_generic_first_and_each_target_once(root):
    write(root, "d", "abstract: true\n")
    write(root, "b", "abstract: true\nextends: d\n")
    write(root, "c", "abstract: true\nextends: [d]\n")
    write(root, "a", "abstract: true\nextends: [b, c]\n")
    project = Project(root)
    t = project.load("a")
    resolved = (root / "targets").resolve()
    assert t.layers == tuple(resolved / n for n in ("d", "b", "c", "a"))
    assert project.overlay_dirs(t) == [root / "rootfs", *(resolved / n / "rootfs" for n in ("d", "b", "c", "a"))]


def test_extends_as_a_single_string(root):
    write(root, "base", BASE)
    write(root, "t", "extends: base\narchitectures: amd64\n")
    t = Project(root).load("t")
    assert t.architectures == ("amd64",)
    assert [layer.name for layer in t.layers] == ["base", "t"]
    assert t.sections[0].packages == ("systemd",)


def test_child_can_clear_security_mirror_with_null(root):
    write(root, "base", BASE + "security_mirror: http://security.example/debian-security\n")
    write(root, "t", "extends: base\narchitectures: [amd64]\nsecurity_mirror: null\n")
    project = Project(root)
    assert project.load("base").security_mirror == "http://security.example/debian-security"
    assert project.load("t").security_mirror is None


def test_arch_packages_only_for_their_arch(root):
    write(root, "t", """\
        architectures: [amd64, arm64, armhf]
        suite: bookworm
        mirror: http://deb.debian.org/debian
        sections:
          - name: debian
            packages: [systemd]
            arch_packages:
              amd64: [linux-image-amd64, grub-efi-amd64]
              arm64: [linux-image-arm64]
        """)
    s = Project(root).load("t").sections[0]
    assert s.packages_for("amd64") == ("systemd", "linux-image-amd64", "grub-efi-amd64")
    assert s.packages_for("arm64") == ("systemd", "linux-image-arm64")
    assert s.packages_for("armhf") == ("systemd",)


def test_defaults_for_a_minimal_target(root):
    write(root, "t", """\
        architectures: [arm64, arm64]
        suite: bookworm
        mirror: http://deb.debian.org/debian
        sections:
          - name: debian
        """)
    t = Project(root).load("t")
    assert t.architectures == ("arm64",)
    assert (t.hostname, t.locale, t.timezone, t.image) == ("hypersolid", "C.UTF-8", "Etc/UTC", "img")
    assert (t.compression, t.compression_level) == ("zstd", None)
    assert t.security_mirror is None and t.apt_proxy is None and t.root_password is None
    assert t.users == () and t.services_enable == () and t.services_disable == ()
    assert t.sections[0].components == ("main",)


def test_locked_password_markers_are_accepted(root):
    write(root, "t", """\
        architectures: [amd64]
        suite: bookworm
        mirror: http://deb.debian.org/debian
        sections:
          - name: debian
        root_password: '*'
        users:
          - name: alice
            password: '!'
          - name: bob
            password: null
        """)
    t = Project(root).load("t")
    assert t.root_password == "*"
    assert [u.password for u in t.users] == ["!", None]


@pytest.mark.parametrize("hash", [
    "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7",
    "$6$7Hj0mRsalt$" + "a/." * 28 + "xy",
    "$6$rounds=656000$salt$hash",
    "$5$salt$hash0123456789",
    "$2b$12$" + "N9qo8uLOickgx2ZMRZoMye" + "IjZAgcfl7p92ldGxad68LJZdL17lhWy",
    "$1$saltsalt$hashhashhashhashhashha",
    "!$6$salt$hashhashhash",   # a hash kept but locked
    "!", "*",
])
def test_crypt_formats_are_accepted(root, hash):
    write(root, "t", f"""\
        architectures: [amd64]
        suite: bookworm
        mirror: http://deb.debian.org/debian
        sections:
          - name: debian
        root_password: '{hash}'
        users:
          - name: alice
            password: '{hash}'
        """)
    t = Project(root).load("t")
    assert t.root_password == hash and t.users[0].password == hash


def test_buildable_lists_non_abstract_targets_sorted(root):
    write(root, "base", BASE)
    write(root, "zed", "extends: base\narchitectures: [amd64]\n")
    write(root, "alpha", "extends: base\narchitectures: [arm64]\n")
    assert [t.name for t in Project(root).buildable()] == ["alpha", "zed"]
    assert Project(root).target_names() == ["alpha", "base", "zed"]


def test_clear_caches_rereads_edited_targets(root):
    write(root, "base", BASE)
    write(root, "t", "extends: base\narchitectures: [amd64]\nhostname: one\n")
    assert Project(root).load("t").hostname == "one"
    write(root, "t", "extends: base\narchitectures: [amd64]\nhostname: two\n")
    clear_caches()
    assert Project(root).load("t").hostname == "two"


# --- hooks ------------------------------------------------------------------------

def test_hook_files_sorted_across_layers_and_later_layer_overrides(root):
    write(root, "base", BASE)
    write(root, "t", "extends: base\narchitectures: [amd64]\n")
    targets = root / "targets"
    for rel in ("base/hooks/pre-configure.d/10-first", "base/hooks/pre-configure.d/30-third",
                "base/hooks/pre-configure.d/.hidden", "t/hooks/pre-configure.d/20-second",
                "t/hooks/pre-configure.d/30-third", "t/hooks/pre-configure.d/40-backup~",
                "t/hooks/post-configure.d/10-post"):
        (targets / rel).parent.mkdir(parents=True, exist_ok=True)
        (targets / rel).write_text("#!/bin/sh\n")
    t = Project(root).load("t")
    resolved = targets.resolve()
    assert t.hook_files("pre-configure") == [
        resolved / "base/hooks/pre-configure.d/10-first",
        resolved / "t/hooks/pre-configure.d/20-second",
        resolved / "t/hooks/pre-configure.d/30-third",
    ]
    assert t.hook_files("post-configure") == [resolved / "t/hooks/post-configure.d/10-post"]
    assert t.hook_files("no-such-kind") == []


# --- values derived from a target -------------------------------------------------

@pytest.mark.parametrize("compression, level, expected", [
    ("zstd", None, ["-comp", "zstd", "-Xcompression-level", "3"]),
    ("zstd", 19, ["-comp", "zstd", "-Xcompression-level", "19"]),
    ("gzip", 9, ["-comp", "gzip", "-Xcompression-level", "9"]),
    ("gzip", None, ["-comp", "gzip"]),
    ("xz", 5, ["-comp", "xz"]),
    ("lz4", None, ["-comp", "lz4"]),
], ids=["zstd-default-level", "zstd-level", "gzip-level", "gzip-default", "xz-ignores-level", "lz4"])
def test_mksquashfs_args(compression, level, expected):
    assert mksquashfs_args(compression, level) == expected


def test_subtask_name_adds_arch_only_for_multi_arch_targets(root):
    write(root, "base", BASE)
    write(root, "one", "extends: base\narchitectures: [arm64]\n")
    write(root, "multi", "extends: base\narchitectures: [amd64, arm64]\n")
    project = Project(root)
    one, multi = project.load("one"), project.load("multi")
    assert subtask_name(one, "arm64") == "one"
    assert subtask_name(one, None) == "one"
    assert subtask_name(multi, "arm64") == "multi-arm64"
    assert subtask_name(multi, None) == "multi"


# --- names that must be unique within a list ---------------------------------------
# A list merged by name must not keep two entries of one name: either the target
# is rejected (ConfigError at the second name) or the entries are merged, as they
# are when the same list comes from a later layer.

def test_duplicate_section_name_in_one_target_is_rejected_or_merged(root):
    write(root, "t", """\
        architectures: [amd64]
        suite: bookworm
        mirror: http://deb.debian.org/debian
        sections:
          - name: debian
            packages: [systemd]
          - name: debian
            packages: [vim]
        """)
    try:
        t = Project(root).load("t")
    except ConfigError as err:
        assert (err.file, err.line, err.key) == (target_file(root, "t"), 7, "sections[1].name"), str(err)
    else:
        names = [s.name for s in t.sections]
        assert len(names) == len(set(names)), f"two sections named debian: {t.sections}"


def test_duplicate_user_name_in_one_target_is_rejected_or_merged(root):
    write(root, "t", """\
        architectures: [amd64]
        suite: bookworm
        mirror: http://deb.debian.org/debian
        sections:
          - name: debian
        users:
          - name: alice
          - name: alice
            sudo: true
        """)
    try:
        t = Project(root).load("t")
    except ConfigError as err:
        assert (err.file, err.line, err.key) == (target_file(root, "t"), 8, "users[1].name"), str(err)
    else:
        names = [u.name for u in t.users]
        assert len(names) == len(set(names)), f"two users named alice: {t.users}"


def test_duplicate_section_name_in_a_later_layer_is_rejected_too(root):
    write(root, "base", BASE)
    write(root, "t", """\
        extends: base
        architectures: [amd64]
        sections:
          - name: debian
            packages: [vim]
          - name: debian
            packages: [less]
        """)
    with pytest.raises(ConfigError) as err:
        Project(root).load("t")
    assert (err.value.line, err.value.key) == (6, "sections[1].name")


def test_empty_password_with_first_login_change_and_across_layers(root):
    write(root, "base", """\
        abstract: true
        users:
          - name: alice
            password: ""
          - name: bob
            password: '$6$salt$hashhashhash'
            password_change_on_first_login: true
        """)
    write(root, "t", """\
        extends: [base]
        architectures: [amd64]
        suite: bookworm
        mirror: http://deb.debian.org/debian
        sections:
          - name: debian
        users:
          - name: alice
            password_change_on_first_login: true
          - name: carol
        """)
    users = {u.name: u for u in Project(root).load("t").users}
    assert (users["alice"].password, users["alice"].password_change_on_first_login) == ("", True)
    assert (users["bob"].password, users["bob"].password_change_on_first_login) == ("$6$salt$hashhashhash", True)
    assert (users["carol"].password, users["carol"].password_change_on_first_login) == (None, False)


def test_recommends_defaults_to_false_and_merges_by_section(root):
    write(root, "base", """\
        abstract: true
        sections:
          - name: debian
            recommends: true
          - name: extra
        """)
    write(root, "t", """\
        extends: [base]
        architectures: [amd64]
        suite: bookworm
        mirror: http://deb.debian.org/debian
        sections:
          - name: debian
            packages: [procps]
        """)
    sections = {s.name: s for s in Project(root).load("t").sections}
    assert sections["debian"].recommends is True and sections["extra"].recommends is False
