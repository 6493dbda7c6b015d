"""Hostile overlays: symlinks aimed at the build host (a sentinel directory
outside every tree) stay symlinks in the image and are never followed onto
the host; merged-usr overlay paths land under usr/.

The cases whose outcome is a good image share one build; each refused case
is its own build (they stop early, with the shared cache in seconds)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import TestProject, needs_root_and_tools, tiny_target
from hostile import outcome, untouched_host

pytestmark = pytest.mark.integration

DEEP = "../" * 40  # more than any tree is deep: a relative link to the host's /

UNIT = """\
    [Unit]
    Description=hypersolid test unit from an overlay's lib/systemd/system

    [Service]
    ExecStart=/bin/hs-tool

    [Install]
    WantedBy=multi-user.target
    """


def listing(image: Path) -> dict[str, str]:
    out = subprocess.run(["unsquashfs", "-lln", str(image)], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return {line.split(" squashfs-root", 1)[1].split(" -> ")[0]: line
            for line in out.splitlines() if " squashfs-root" in line}


def cat(image: Path, name: str) -> str:
    return subprocess.run(["unsquashfs", "-cat", str(image), name], check=True,
                          stdout=subprocess.PIPE, text=True).stdout


def link_target(entries: dict[str, str], path: str) -> str:
    line = entries[path]
    assert line.startswith("l"), f"{path} is no longer a symlink: {line}"
    return line.split(" -> ", 1)[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_cache) -> TestProject:
    needs_root_and_tools()
    return TestProject(tmp_path_factory.mktemp("hostile-tree"), shared_cache)


def link(project: TestProject, target: str, rel: str, dest) -> str:
    path = project.root / "targets" / target / "rootfs" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(dest)
    return str(dest)


@pytest.fixture(scope="module")
def links(project, tmp_path_factory):
    """One build with every link whose outcome is an image: each written
    through inside the tree (chroot semantics), the host left alone."""
    with untouched_host(tmp_path_factory.mktemp("links-host"), project.root) as host:
        s = host.sentinel
        project.target("links", tiny_target(extra="""\
            users: [{name: alice}]
            services: {enable: [hs-test]}
            """))
        made = {
            "etc/hostname": link(project, "links", "etc/hostname", s / "hostname"),
            "etc/hosts": link(project, "links", "etc/hosts", s / "hosts"),
            "etc/timezone": link(project, "links", "etc/timezone", DEEP + str(s / "timezone").lstrip("/")),
            "home/alice": link(project, "links", "home/alice", s / "home"),
            "etc/shadow+": link(project, "links", "etc/shadow+", s / "shadow"),
        }
        project.write("targets/links/rootfs/lib/systemd/system/hs-test.service", UNIT)
        project.write("targets/links/rootfs/bin/hs-tool", "#!/bin/sh\nexec sleep infinity\n", mode=0o755)
        project.write("targets/links/rootfs/var/run/hs-test.flag", "x\n")
        result = outcome(project.doit("squashfs:links", check=False))
    assert result.status == 0, result.output
    image = project.entry("squashfs", "links") / "system-amd64.img"
    return result, made, listing(image), image


@pytest.mark.parametrize("rel", ["etc/hostname", "etc/hosts", "etc/timezone", "home/alice", "etc/shadow+"])
def test_an_overlay_link_stays_a_link_and_the_host_is_untouched(links, rel):
    result, made, entries, _ = links
    assert "Traceback" not in result.output
    assert link_target(entries, "/" + rel) == made[rel]


def test_settings_and_users_are_still_made(links):
    _, _, entries, image = links
    assert "alice:" in cat(image, "etc/passwd")
    shadow = entries["/etc/shadow"]
    assert shadow.startswith("-rw-r-----"), shadow  # replaced, not written through etc/shadow+
    assert cat(image, "etc/shadow").count("alice:") == 1
    assert link_target(entries, "/etc/localtime") == "/usr/share/zoneinfo/Etc/UTC"


def test_merged_usr_overlay_paths_land_under_usr(links):
    _, _, entries, image = links
    assert "/usr/lib/systemd/system/hs-test.service" in entries
    assert "hs-tool" in cat(image, "usr/lib/systemd/system/hs-test.service")
    assert entries["/usr/bin/hs-tool"].startswith("-rwxr-xr-x 0/0")
    assert "/run/hs-test.flag" in entries
    for path, dest in (("/lib", "usr/lib"), ("/bin", "usr/bin"), ("/sbin", "usr/sbin"), ("/var/run", "/run")):
        assert link_target(entries, path) == dest  # the tree's own links are kept
    assert link_target(entries, "/etc/systemd/system/multi-user.target.wants/hs-test.service") \
        == "/lib/systemd/system/hs-test.service"  # systemctl found and enabled it


@pytest.mark.parametrize("stage, name, rel, dest, fragment", [
    # hooks would be copied into /.hypersolid: reserved, refused by the rootfs stage
    ("rootfs", "dot", ".hypersolid", "home", "is reserved for the build's own scripts"),
    # a relative link where the image has a directory: the overlay cannot replace it
    ("squashfs", "vlog", "var/log", DEEP, "a symlink where the image has a directory"),
])
def test_a_refused_link_is_one_line_naming_the_overlay_path(project, tmp_path, stage, name, rel, dest, fragment):
    with untouched_host(tmp_path, project.root) as host:
        project.target(name, tiny_target())
        project.write(f"targets/{name}/hooks/post-configure.d/10-noop", "#!/bin/sh\ntrue\n", mode=0o755)
        aim = DEEP + str(host.sentinel / "home").lstrip("/") if dest == DEEP else host.sentinel / dest
        link(project, name, rel, aim)
        result = outcome(project.doit(f"squashfs:{name}", check=False))
    assert result.status != 0
    # the stage's error line (the log's tail repeats it as "# FAILED: ...")
    result.line(f"{stage}:{name}", f": targets/{name}/rootfs/{rel}: ", fragment)


def test_links_on_paths_the_build_cleans_or_empties_are_followed_inside_the_tree(project, tmp_path):
    """etc/machine-id is emptied and etc/ssh/ssh_host_* removed after the
    hooks: through links aimed at the host, that happens in the tree (the
    tiny image has no /etc/ssh of its own)."""
    with untouched_host(tmp_path, project.root) as host:
        project.target("clean", tiny_target())
        link(project, "clean", "etc/machine-id", host.sentinel / "hostname")
        link(project, "clean", "etc/ssh", host.sentinel / "home")
        project.doit("squashfs:clean")
    image = project.entry("squashfs", "clean") / "system-amd64.img"
    entries = listing(image)
    assert link_target(entries, "/etc/machine-id") == str(host.sentinel / "hostname")
    assert link_target(entries, "/etc/ssh") == str(host.sentinel / "home")
    assert cat(image, str(host.sentinel / "hostname").lstrip("/")) == ""
