"""The logic around booting, without building anything: which targets get an
initramfs and a boot task, what lands in dist/, how initrds are joined."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hypersolid.boot import concatenate_initrds
from hypersolid.cache import Cache
from hypersolid.config import ConfigError, Project
from hypersolid.stages import STAGES, Unit
from hypersolid.stages.initramfs import initramfs_conf, kernel_version

REPO = Path(__file__).resolve().parents[1]
COMMON = """\
    architectures: [amd64, arm64]
    suite: bookworm
    mirror: http://deb.debian.org/debian
    """


@pytest.fixture
def project(tmp_path) -> Project:
    def target(name, text):
        path = tmp_path / "targets" / name / "target.yaml"
        path.parent.mkdir(parents=True)
        path.write_text(textwrap.dedent(COMMON) + textwrap.dedent(text))
    target("vm", """\
        sections:
          - name: debian
            packages: [initramfs-tools]
            arch_packages: {amd64: [linux-image-amd64]}
        image: both
        """)
    target("appliance", """\
        sections:
          - name: debian
            packages: [netbase]
        """)
    return Project(tmp_path)


def unit(project, name, arch):
    return Unit(project, project.load(name), arch, Cache(project.root / "cache"))


def test_only_architectures_whose_packages_name_a_kernel_have_an_initramfs(project):
    vm, appliance = project.load("vm"), project.load("appliance")
    assert vm.has_kernel("amd64") and not vm.has_kernel("arm64")
    assert not appliance.has_kernel("amd64")
    assert STAGES["initramfs"].applies(unit(project, "vm", "amd64"))
    assert not STAGES["initramfs"].applies(unit(project, "vm", "arm64"))


def test_dist_holds_kernel_initramfs_image_manifest_and_build_info(project):
    stage = STAGES["bootfiles"]
    u = unit(project, "vm", "amd64")
    assert stage.files(u) == {
        "kernel-amd64.img": ("initramfs", "kernel.img"),
        "initramfs-amd64.img": ("initramfs", "initramfs.img"),
        "system-amd64.img": ("squashfs", "system-amd64.img"),
        "system-amd64.cpio": ("squashfs", "system-amd64.img"),  # wrapped by bootfiles
        "packages-amd64.tsv": ("squashfs", "packages.tsv"),
        "packages-amd64.lock": ("configure", "packages.lock"),
        "sbom-amd64.cdx.json": ("sbom", "sbom.cdx.json"),
        "sbom-amd64.spdx.json": ("sbom", "sbom.spdx.json"),
    }
    assert project.root / "dist/vm/build-amd64.json" in stage.outputs(u)
    assert stage.upstream_of(u) == ("bootstrap", "configure", "squashfs", "initramfs", "sbom")


def test_a_target_without_kernel_still_gets_its_image_in_dist(project):
    stage = STAGES["bootfiles"]
    u = unit(project, "appliance", "arm64")
    assert stage.files(u) == {"system-arm64.img": ("squashfs", "system-arm64.img"),
                              "packages-arm64.tsv": ("squashfs", "packages.tsv"),
                              "packages-arm64.lock": ("configure", "packages.lock"),
                              "sbom-arm64.cdx.json": ("sbom", "sbom.cdx.json"),
                              "sbom-arm64.spdx.json": ("sbom", "sbom.spdx.json")}
    assert "initramfs" not in stage.upstream_of(u)


def test_initrds_are_joined_on_four_byte_boundaries(tmp_path):
    parts = []
    for name, data in (("a", b"12345"), ("b", b"xyz"), ("c", b"0123456")):
        parts.append(tmp_path / name)
        parts[-1].write_bytes(data)
    joined = concatenate_initrds(parts, tmp_path / "joined").read_bytes()
    assert joined == b"12345\0\0\0" + b"xyz\0" + b"0123456"


def test_newest_kernel_with_modules_is_chosen(tmp_path):
    for v in ("6.1.0-9-amd64", "6.1.0-10-amd64", "6.1.0-11-amd64"):
        (tmp_path / "boot").mkdir(exist_ok=True)
        (tmp_path / f"boot/vmlinuz-{v}").write_text("")
    for v in ("6.1.0-9-amd64", "6.1.0-10-amd64"):  # -11 has no modules: half removed
        (tmp_path / f"lib/modules/{v}").mkdir(parents=True)
    assert kernel_version(tmp_path) == "6.1.0-10-amd64"
    assert kernel_version(tmp_path / "nothing") is None


def test_initramfs_settings_default_and_reach_initramfs_conf(project):
    t = project.load("vm")
    assert (t.initramfs_compression, t.initramfs_modules, t.initramfs_extra_modules) == ("zstd", "most", ())
    assert "MODULES=most\nCOMPRESS=zstd\n" in initramfs_conf("most", "zstd")


# text appended to a target, the line of the error within it, key, message
@pytest.mark.parametrize("text, at, key, message", [
    ("initramfs: {modules: dep}\n", 1, "initramfs.modules", "unknown module policy 'dep'"),
    ("initramfs: {compression: brotli}\n", 1, "initramfs.compression", "unknown compression 'brotli'"),
    ("initramfs:\n  extra_modules: [virtio blk]\n", 2, "initramfs.extra_modules[0]", "a kernel module name"),
])
def test_bad_initramfs_settings_name_file_line_and_key(project, text, at, key, message):
    path = project.root / "targets/appliance/target.yaml"
    before = len(path.read_text().splitlines())
    path.write_text(path.read_text() + text)
    line = before + at
    with pytest.raises(ConfigError) as err:
        project.load("appliance")
    assert err.value.key == key and message in err.value.message
    assert err.value.line == line


def test_boot_and_initramfs_tasks_exist_only_for_kernels(project):
    (project.root / "dodo.py").write_text((REPO / "dodo.py").read_text())
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYPERSOLID_CACHE": str(project.root / "cache")}
    listing = subprocess.run([sys.executable, "-m", "doit", "list", "--all", "-q"], cwd=project.root,
                             env=env, check=True, stdout=subprocess.PIPE, text=True).stdout.split()
    assert "initramfs:vm-amd64" in listing and "boot:vm-amd64" in listing
    assert "initramfs:vm-arm64" not in listing and "boot:vm-arm64" not in listing
    assert not [t for t in listing if t.endswith(":appliance") and t.split(":")[0] in ("initramfs", "boot")]
    assert "bootfiles:appliance-arm64" in listing and "bootfiles:vm-arm64" in listing


@pytest.mark.parametrize("size", [0, 1, 3, 4, 511, 512, 513, 70001])
def test_the_image_cpio_has_the_bytes_gnu_cpio_makes(tmp_path, size):
    import shutil
    if not shutil.which("cpio"):
        pytest.skip("cpio is not installed")
    from hypersolid.stages.bootfiles import newc
    img = tmp_path / "system-amd64.img"
    img.write_bytes(os.urandom(size))
    img.chmod(0o600)  # the archive says 0644 whatever the file's mode
    newc(img, tmp_path / "ours.cpio", 1700000000)
    img.chmod(0o644)
    os.utime(img, (1700000000, 1700000000))
    subprocess.run('echo system-amd64.img | cpio --quiet --reproducible -R 0:0 -o -H newc > gnu.cpio',
                   shell=True, check=True, cwd=tmp_path)
    assert (tmp_path / "ours.cpio").read_bytes() == (tmp_path / "gnu.cpio").read_bytes()
