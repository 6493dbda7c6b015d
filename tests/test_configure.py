"""configure stage, for real: hooks, the chroot fallback, failure reports."""
from __future__ import annotations

import os

import pytest

from conftest import TestProject, mounts, needs_root_and_tools, tiny_target

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_cache) -> TestProject:
    needs_root_and_tools()
    p = TestProject(tmp_path_factory.mktemp("configure"), shared_cache)
    p.target("tiny", tiny_target())
    return p


def test_pre_configure_hook_runs_in_the_container_and_only_reruns_configure_onwards(project):
    project.doit("squashfs:tiny")
    project.write("targets/tiny/hooks/pre-configure.d/10-stamp",
                  "#!/bin/sh\nset -e\n[ -x /usr/sbin/policy-rc.d ]\n"
                  "echo \"pre-configure in $(cat /etc/debian_version)\" > /etc/preconf-stamp\n", mode=0o755)
    result = project.doit("squashfs:tiny")
    assert "bootstrap:tiny" in result.uptodate
    assert {"configure:tiny", "squashfs:tiny"} <= result.executed
    stamp = (project.entry("configure", "tiny") / "tree/etc/preconf-stamp").read_text()
    assert stamp.startswith("pre-configure in 12.")
    assert not (project.entry("configure", "tiny") / "tree/usr/sbin/policy-rc.d").exists()


def test_configure_falls_back_to_a_chroot_in_a_private_namespace(project):
    # (the project path makes the key new: never a hit from an earlier run on a kept cache)
    project.write("targets/tiny/hooks/pre-configure.d/20-chroot", f"#!/bin/sh\n# chroot variant {project.root}\ntrue\n",
                  mode=0o755)
    before = mounts()
    env_backup = os.environ.get("HYPERSOLID_CONTAINER")
    os.environ["HYPERSOLID_CONTAINER"] = "chroot"
    try:
        result = project.doit("configure:tiny")
    finally:
        if env_backup is None:
            del os.environ["HYPERSOLID_CONTAINER"]
        else:
            os.environ["HYPERSOLID_CONTAINER"] = env_backup
        (project.root / "targets/tiny/hooks/pre-configure.d/20-chroot").unlink()
    assert "configure:tiny" in result.executed
    log = (project.root / "build/tiny/amd64/logs/configure.log").read_text()
    assert "$ unshare --uts sh -c 'hostname hypersolid && mount -t proc proc" in log and "exec chroot" in log  # in the runner's namespaces
    assert "systemd-nspawn" not in log
    assert mounts() == before


def test_package_left_unconfigured_fails_naming_it(project):
    with project.temporary("targets/tiny/hooks/pre-configure.d/30-break-netbase",
                           "#!/bin/sh\nprintf '#!/bin/sh\\nexit 1\\n' > /var/lib/dpkg/info/netbase.postinst\n",
                           mode=0o755):
        result = project.doit("configure:tiny", check=False)
    assert result.returncode != 0
    assert "configure:tiny" in result.output
    assert "not installed after configure: netbase (install ok half-configured)" in result.output
    assert "build/tiny/amd64/logs/configure.log" in result.output


def test_non_executable_hook_stops_the_build_naming_it(project):
    with project.temporary("targets/tiny/hooks/pre-configure.d/40-not-exec", "#!/bin/sh\ntrue\n", mode=0o644):
        result = project.doit("configure:tiny", check=False)
    assert result.returncode != 0
    assert "targets/tiny/hooks/pre-configure.d/40-not-exec is not executable" in result.output


def test_a_pre_configure_hook_installs_extra_packages_with_apt(project):
    """The documented recipe (docs/targets.md): apt-get update and install
    inside the hook; downloads go through the build's caching proxy."""
    hook = ("#!/bin/sh\nset -e\n"
            "[ \"$(cat /usr/sbin/policy-rc.d)\" ]      # daemons are blocked\n"
            "[ -r /proc/self/status ] && [ -d /sys/kernel ] && [ -c /dev/null ]\n"
            "[ \"$DEBIAN_FRONTEND\" = noninteractive ]\n"
            "apt-get update -q\n"
            "apt-get install -y -q --no-install-recommends hello\n")
    with project.temporary("targets/tiny/hooks/pre-configure.d/50-apt", hook, mode=0o755):
        result = project.doit("squashfs:tiny")
        assert "bootstrap:tiny" in result.uptodate              # only configure onwards
        assert {"configure:tiny", "squashfs:tiny"} <= result.executed
        tree = project.entry("configure", "tiny") / "tree"
        assert (tree / "usr/bin/hello").exists()
        packages = (project.entry("configure", "tiny") / "packages.tsv").read_text()
        assert "\nhello\t" in packages
    debs = list((project.cache / "debs").rglob("hello_*.deb"))
    assert debs, "the .deb went through the caching proxy"


def test_configure_makes_no_ssh_host_keys_the_image_would_drop(tmp_path_factory, shared_cache):
    """openssh-server's postinst skips its key generation (stand-ins while
    dpkg configures, removed after): the keys were deleted before packing
    anyway, and RSA under qemu-user was most of an arm64 configure."""
    needs_root_and_tools()
    p = TestProject(tmp_path_factory.mktemp("sshkeys"), shared_cache)
    p.target("sshbox", tiny_target(packages="openssh-server"))
    p.doit("configure:sshbox")
    tree = p.entry("configure", "sshbox") / "tree"
    assert (tree / "usr/sbin/sshd").exists() and (tree / "etc/ssh/sshd_config").exists()
    assert [n for n in os.listdir(tree / "etc/ssh") if n.startswith("ssh_host_")] == []
    log = (p.root / "build/sshbox/amd64/logs/configure.log").read_text()
    assert "Creating SSH2" not in log and "Setting up openssh-server" in log
