"""The binfmt_misc check before foreign-architecture binaries run.

The kernel's binfmt_misc files are the interface; the tests point the check
at a directory laid out the same way."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from hypersolid import container
from hypersolid.run import BuildError, Log

AARCH64 = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\noffset 0\n"


@pytest.fixture
def binfmt(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "binfmt_misc"
    d.mkdir()
    (d / "status").write_text("enabled\n")
    monkeypatch.setattr(container, "BINFMT_DIR", d)
    monkeypatch.setattr(container, "host_arch", lambda: "amd64")
    monkeypatch.setattr(container.shutil, "which", lambda name: None)  # no update-binfmts
    return d


def log(tmp_path) -> Log:
    return Log(tmp_path / "stage.log", "configure:t/arm64")


def test_native_and_compatible_architectures_need_no_handler(binfmt, tmp_path):
    container.ensure_binfmt("amd64", log(tmp_path))
    container.ensure_binfmt("i386", log(tmp_path))
    assert container.emulated("arm64") and container.emulated("armel")


def test_registered_handler_with_f_flag_passes(binfmt, tmp_path):
    (binfmt / "qemu-aarch64").write_text(AARCH64)
    container.ensure_binfmt("arm64", log(tmp_path))


def test_missing_handler_says_what_to_install(binfmt, tmp_path):
    with pytest.raises(BuildError) as err:
        container.ensure_binfmt("armhf", log(tmp_path))
    assert "no binfmt_misc handler" in err.value.message and "qemu-arm" in err.value.message
    assert "apt-get install qemu-user-static binfmt-support" in err.value.message
    assert err.value.log == tmp_path / "stage.log"


def test_disabled_handler_and_missing_f_flag_are_named(binfmt, tmp_path):
    (binfmt / "qemu-aarch64").write_text(AARCH64.replace("enabled", "disabled"))
    with pytest.raises(BuildError, match="disabled: update-binfmts --enable qemu-aarch64"):
        container.ensure_binfmt("arm64", log(tmp_path))
    (binfmt / "qemu-aarch64").write_text(AARCH64.replace("flags: PF", "flags: P"))
    with pytest.raises(BuildError, match="lacks the F flag"):
        container.ensure_binfmt("arm64", log(tmp_path))


def test_this_host_can_run_arm64_binaries(tmp_path):
    """The real kernel: what the arm64 integration tests rely on (registers
    the handler through binfmt-support if it is only missing)."""
    if not Path("/usr/share/binfmts/qemu-aarch64").exists():
        pytest.skip("qemu-user-static is not installed (./setup.sh --no-build)")
    if os.geteuid() != 0 and not (container.BINFMT_DIR / "qemu-aarch64").exists():
        pytest.skip("registering a binfmt handler needs root")
    container.ensure_binfmt("arm64", log(tmp_path))
    assert (container.BINFMT_DIR / "qemu-aarch64").read_text().startswith("enabled")
