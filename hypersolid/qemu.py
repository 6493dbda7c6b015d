"""Boot a kernel in QEMU and talk to its serial console (boot task and tests).

Typical use:

    with Qemu("vmlinuz", "initrd.img", "console=ttyS0 boot=hypersolid",
              disks=["storage.ext4"]) as vm:
        vm.expect(r"login:", timeout=300)

The VM always runs under TCG (the same on every CI host, no /dev/kvm needed) and
is always killed when the `with` block ends, whether it ended normally, with an
exception or with Ctrl-C, so a failing test never leaves a qemu process behind.
"""

import os
import re
import select
import subprocess
import time
from collections import deque

from .run import spawn

# Per Debian architecture: the qemu command and the kernel console device.
MACHINES = {
    "amd64": (["qemu-system-x86_64", "-machine", "q35"], "ttyS0"),
    "arm64": (["qemu-system-aarch64", "-machine", "virt", "-cpu", "cortex-a57"], "ttyAMA0"),
}


class QemuError(AssertionError):
    """Timeout or early exit; the message carries the end of the console log."""


class Qemu:
    """One VM whose serial console is qemu's stdin/stdout (no pty, no socket:
    nothing to clean up, and the pipe closes when qemu dies)."""

    def __init__(self, kernel, initrd=None, append="", disks=(), arch="amd64",
                 memory=1024, smp=1, extra=(), log_path=None, machine=None, serial_index=0):
        # machine: an argv replacing MACHINES[arch][0] (raspi3b, UEFI firmware);
        # kernel None: the firmware boots the disks (diskboot.py); smp None:
        # the machine's own count; serial_index: the console is that -serial.
        self.machine, self.serial_index = machine, serial_index
        self.kernel, self.initrd, self.append = kernel, initrd, append
        self.disks, self.arch, self.memory, self.smp = list(disks), arch, memory, smp
        self.extra = list(extra)
        self.log_path = log_path
        self.proc = None
        self.output = ""        # the whole console output, \r removed
        self.pos = 0            # expect() searches from here on
        self.started = None

    @property
    def console(self):
        """Kernel console device for this architecture, for `append`."""
        return MACHINES[self.arch][1]

    def command(self, interactive=False):
        """The qemu argv.  Interactive: the console is the terminal, and
        qemu's monitor is multiplexed on it (Ctrl-A X quits)."""
        cmd = list(self.machine or MACHINES[self.arch][0]) + [
            "-accel", "tcg", "-m", str(self.memory), *(["-smp", str(self.smp)] if self.smp else []),
            "-nodefaults", "-display", "none", *["-serial", "null"] * self.serial_index,
            "-serial", "mon:stdio" if interactive else "stdio"]
        if self.kernel:
            cmd += ["-kernel", str(self.kernel), "-append", self.append]
        if not interactive:
            cmd += ["-no-reboot"]   # a reboot, or a panic with panic=-1, ends qemu
        if self.initrd:
            cmd += ["-initrd", str(self.initrd)]
        for i, disk in enumerate(self.disks):
            # virtio-blk: /dev/vda, /dev/vdb... in the order given
            cmd += ["-drive", f"file={disk},format=raw,if=none,id=d{i}",
                    "-device", f"virtio-blk-pci,drive=d{i}" if self.arch == "amd64"
                    else f"virtio-blk-device,drive=d{i}"]
        return cmd + self.extra

    def start(self):
        # Through the runner's spawn: its own process group (a Ctrl-C in the
        # terminal reaches pytest, not qemu, and close() decides how qemu
        # ends), and killed by the kernel when the test process dies, even
        # by SIGKILL, where no Python cleanup could run.
        self.proc = spawn(self.command(), contain=False, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        self._log = open(self.log_path, "w") if self.log_path else None
        return self

    def elapsed(self):
        """Seconds since qemu started, for boot-time measurements."""
        return time.monotonic() - self.started

    def _read(self, timeout):
        """Append what the console printed within `timeout` s; False at EOF."""
        ready, _, _ = select.select([self.proc.stdout], [], [], max(timeout, 0))
        if not ready:
            return True
        data = os.read(self.proc.stdout.fileno(), 65536)
        if not data:
            return False
        text = data.decode("utf-8", "replace").replace("\r", "")
        self.output += text
        if self._log:
            self._log.write(text)
            self._log.flush()
        return True

    def tail(self, lines=100):
        return "\n".join(deque(self.output.splitlines(), maxlen=lines))

    def expect(self, pattern, timeout=60, anywhere=False):
        """Wait until `pattern` (regex) appears after the previous match (or
        anywhere in the output) and return the match. Raises QemuError with
        the log tail on timeout or if qemu exits first, so the failure says
        what the VM was doing."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output, 0 if anywhere else self.pos)
            if match:
                self.pos = max(self.pos, match.end())
                return match
            left = deadline - time.monotonic()
            if left <= 0:
                raise QemuError(f"timeout after {timeout}s waiting for {pattern!r}; "
                                f"console tail:\n{self.tail()}")
            if not self._read(min(left, 1.0)):
                self.proc.wait()
                raise QemuError(f"qemu exited ({self.proc.returncode}) while waiting "
                                f"for {pattern!r}; console tail:\n{self.tail()}")

    def sendline(self, line):
        """Type a line on the serial console (login, shell command)."""
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_exit(self, timeout=60):
        """Wait for qemu to end by itself (poweroff, or panic with -no-reboot)."""
        deadline = time.monotonic() + timeout
        while self._read(max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise QemuError(f"qemu still running after {timeout}s; "
                                f"console tail:\n{self.tail()}")
        return self.proc.wait()

    def close(self):
        """Always end qemu: TERM, then KILL after 5 s; idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self._log):
            if f:
                try:
                    f.close()
                except OSError:
                    pass
        self.proc = None

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc):
        self.close()
        return False
