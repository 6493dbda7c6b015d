"""Audit of a real image: what an immutable appliance image must not ship."""
from __future__ import annotations

import subprocess

import pytest

from conftest import REPO, TestProject, needs_root_and_tools, tiny_target

pytestmark = pytest.mark.integration


def listing(path):
    out = subprocess.run(["unsquashfs", "-lln", str(path)], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return {line.split(" squashfs-root", 1)[1].split(" -> ")[0]: line
            for line in out.splitlines() if " squashfs-root" in line}


@pytest.fixture(scope="module", params=["sshbox", "default"])
def image(request, tmp_path_factory, shared_cache):
    """A small target with ssh and a hook, and the shipped default target as
    delivered in dist/."""
    needs_root_and_tools()
    if request.param == "default":
        path = request.getfixturevalue("default_project").root / "dist/qemu-amd64/system-amd64.img"
        return path, listing(path)
    p = TestProject(tmp_path_factory.mktemp("image"), shared_cache)
    # The shipped generic overlay, as a real checkout has it.
    subprocess.run(["cp", "-a", f"{REPO}/rootfs/.", str(p.root / "rootfs")], check=True)
    p.target("sshbox", tiny_target(packages="openssh-server", extra="""\
        services: {enable: [ssh, hypersolid-firstboot]}
        users:
          - name: alice
            password: ""
            password_change_on_first_login: true
          - name: bob
            password: '$6$saltsalt$hashhashhash'
            password_change_on_first_login: true
          - name: carol
            password: '$6$saltsalt$hashhashhash'
        """))
    p.write("targets/sshbox/hooks/post-configure.d/10-noop", "#!/bin/sh\ntrue\n", mode=0o755)
    p.doit("squashfs:sshbox")
    path = p.entry("squashfs", "sshbox") / "system-amd64.img"
    return path, listing(path)


def cat(path, name: str) -> str:
    return subprocess.run(["unsquashfs", "-cat", str(path), name], check=True,
                          stdout=subprocess.PIPE, text=True).stdout


def test_image_has_no_ssh_host_keys_but_a_first_boot_unit_that_makes_them(image):
    path, entries = image
    assert "/usr/sbin/sshd" in entries
    assert not [e for e in entries if e.startswith("/etc/ssh/ssh_host_")]
    assert "/etc/systemd/system/hypersolid-firstboot.service" in entries
    assert "/etc/systemd/system/multi-user.target.wants/hypersolid-firstboot.service" in entries
    assert "ssh-keygen -A" in cat(path, "usr/lib/hypersolid/firstboot")


def test_image_has_an_empty_machine_id(image):
    path, entries = image
    assert cat(path, "etc/machine-id") == ""
    assert "/var/lib/dbus/machine-id" not in entries


def test_root_is_locked_without_a_password_hash(image):
    path, _ = image
    rows = [line.split(":") for line in cat(path, "etc/shadow").splitlines()]
    root = [r for r in rows if r[0] == "root"]
    assert len(root) == 1 and root[0][1] in ("*", "!", "!*")


def test_shadow_fields_of_users_who_change_the_password_at_first_login(image):
    path, _ = image
    shadow = {r[0]: r for r in (line.split(":") for line in cat(path, "etc/shadow").splitlines())}
    if "alice" not in shadow:
        pytest.skip("the shipped target declares no users")
    # name, password, last change (0: change at next login), min, max, warn, inactive, expire, reserved
    assert shadow["alice"] == ["alice", "", "0", "0", "99999", "7", "", "", ""]
    assert shadow["bob"] == ["bob", "$6$saltsalt$hashhashhash", "0", "0", "99999", "7", "", "", ""]
    assert shadow["carol"] == ["carol", "$6$saltsalt$hashhashhash", "", "0", "99999", "7", "", "", ""]


def test_image_has_no_build_leftovers(image):
    path, entries = image
    stamp = {"/.hypersolid", "/.hypersolid/build", "/.hypersolid/issue", "/.hypersolid/motd"}  # the build id
    forbidden = [e for e in entries if e.startswith(("/.hypersolid", "/boot/", "/tmp/", "/var/cache/apt/archives/"))
                 and not e.endswith(("/partial", "/lock")) and e not in stamp]
    forbidden += [e for e in entries if "/qemu-" in e and e.endswith("-static")]
    forbidden += [e for e in entries if e in ("/usr/sbin/policy-rc.d", "/usr/sbin/update-initramfs.hypersolid")]
    forbidden += [e for e in entries if "/hooks/post-configure.d" in e or "/hooks/pre-configure.d" in e]
    assert forbidden == []
    if "/usr/share/initramfs-tools" in entries:
        assert "/usr/sbin/update-initramfs" in entries  # the diversion was undone
    apt_conf = [e for e in entries if e.startswith("/etc/apt/apt.conf.d/")]
    assert not [e for e in apt_conf if "Proxy" in cat(path, e.lstrip("/"))]


def test_image_apt_has_only_its_image_sources_and_no_proxy(image):
    """No build mirror list (multistrap-*.list), no proxy (apt_proxy or the
    build's caching proxy on 127.0.0.1) anywhere in /etc/apt."""
    path, entries = image
    assert [e for e in entries if e.startswith("/etc/apt/sources.list")] == [
        "/etc/apt/sources.list.d", "/etc/apt/sources.list.d/hypersolid.sources"]
    text = cat(path, "etc/apt/sources.list.d/hypersolid.sources")
    assert "Types: deb\nURIs: http" in text
    assert "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" in text
    assert "/usr/share/keyrings/debian-archive-keyring.gpg" in entries
    files = [e for e in entries if e.startswith("/etc/apt/") and entries[e].startswith("-")
             and not e.endswith((".gpg", ".asc"))]
    leaks = [(e, word) for e in files for word in ("proxy", "127.0.0.1", "localhost", "multistrap")
             if word in cat(path, e.lstrip("/")).lower()]
    assert leaks == []
    assert not [e for e in entries if e.startswith("/etc/apt/trusted.gpg.d/") and e.endswith(".gpg")]


def test_image_ships_the_pstorage_command(image):
    path, entries = image
    assert entries["/usr/sbin/pstorage"].startswith("-rwxr-xr-x 0/0")
    assert "persist" in cat(path, "usr/sbin/pstorage")
