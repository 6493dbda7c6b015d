"""The one runner every subprocess goes through.

Output goes to the stage's log file, never to the console, so doit's own
lines stay readable; a failure raises BuildError naming the stage, the exact
command (pasteable) and the log, with the log's tail.

The runner also owns the lifetime of what it starts, so a build never
leaves a process behind:
- every child gets PR_SET_PDEATHSIG=SIGKILL: a `kill -9` of doit kills it;
- a build command runs as PID 1's child in its own PID namespace
  (`unshare --pid --kill-child`), so when it dies everything it started
  dies with it, however deep (apt under multistrap, dpkg under nspawn,
  qemu-user);
- it runs in its own process group; SIGINT, SIGTERM and SIGHUP reach only
  hypersolid (`install_signal_handlers`), which raises `Interrupted`, kills
  the group and lets the cache remove the half-built entry;
- a timeout kills it the same way.

`isolated` runs a Python function in a forked child inside a private mount
namespace: a stage that mounts (an overlay over a cached tree) says so
with `isolated = True`, and its mounts vanish with the child however it ends.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping, Sequence

# A fixed, minimal environment: builds must not depend on the caller's locale
# or leak its variables into the image.
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}
# A build command's own PID namespace: when unshare dies (killed, or its
# parent killed), the kernel kills every process in it.
CONTAIN = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18


class BuildError(Exception):
    """A stage failed: what, where, and where to read more."""

    def __init__(self, stage: str, message: str, command: Sequence[str] | None = None,
                 log: Path | None = None):
        self.stage, self.message, self.command, self.log = stage, message, command, log
        super().__init__(str(self))

    def __reduce__(self):  # crosses the pipe from an isolated child
        return (type(self), (self.stage, self.message, self.command, self.log))

    def __str__(self) -> str:
        lines = [f"{self.stage}: {self.message}"]
        if self.command:
            lines.append(f"  command: {shlex.join(self.command)}")
        if self.log:
            lines.append(f"  log: {self.log}")
            # The log's own "# FAILED:" lines repeat the first line: left out.
            tail = [line for line in tail_of(self.log) if not line.startswith("# FAILED:")]
            if tail:
                lines.append("  last lines of the log:")
                lines += [f"    {line}" for line in tail]
        return "\n".join(lines)


class HookError(BuildError):
    """A user hook failed or cannot run: the user's script, not hypersolid,
    is what to look at (the command line exits 3 for these)."""


class CommandTimeout(BuildError):
    """A command ran past its time limit and was killed with all it started."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP reached hypersolid.  A KeyboardInterrupt, so
    doit still saves its database and every `finally` runs on the way out."""

    def __init__(self, signum: int | str):
        if isinstance(signum, str):  # rebuilt from doit's worker message ("interrupted by SIGTERM")
            signum = getattr(signal, signum.rsplit(" ", 1)[-1], signal.SIGINT)
        super().__init__(int(signum))
        self.signum = int(signum)

    @property
    def status(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """Turn the stop signals into Interrupted in the main thread (once)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)


# A doit worker process (parallel stages) between starting and ending a stage.
_in_stage = False
_stopping = False


def install_worker_signal_handlers(parent: int) -> None:
    """In a doit worker process (`doit -n N -P process`), right after fork.
    The main process decides when the build stops: Ctrl-C and SIGHUP reach
    it, and it sends its workers SIGTERM.  A worker then stops its stage
    exactly once (a second signal must not cut its cleanup short) and an
    idle one simply exits.  PDEATHSIG: a `kill -9` of the main process takes
    the workers, and through theirs everything they started."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
    signal.signal(signal.SIGINT, _ignore)  # a handler, not SIG_IGN: not inherited by what it runs
    signal.signal(signal.SIGHUP, _ignore)
    signal.signal(signal.SIGTERM, _stop_worker)


def _ignore(signum, frame):
    pass


def _stop_worker(signum, frame):
    global _stopping
    if _stopping:
        return
    _stopping = True
    if not _in_stage:
        os._exit(128 + signum)  # idle or finishing: nothing of ours to undo
    raise Interrupted(signum)


class stage_running:
    """Marks a stage running in this process (see _stop_worker)."""

    def __enter__(self):
        global _in_stage
        _in_stage = True

    def __exit__(self, *exc):
        global _in_stage
        _in_stage = False


BUILD_UMASK = 0o022


def set_build_umask() -> None:
    """A fixed umask for everything a build creates: the caller's (027, say)
    would otherwise end up in the modes of files in the image."""
    os.umask(BUILD_UMASK)


def interrupted_status(exc: BaseException) -> int:
    return exc.status if isinstance(exc, Interrupted) else 128 + signal.SIGINT


def tail_of(log: Path, count: int = 15) -> list[str]:
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 8192))
            return f.read().decode(errors="replace").splitlines()[-count:]
    except OSError:
        return []


class Log:
    """A stage's log file: commands and their output, appended in order."""

    def __init__(self, path: Path, stage: str, append: bool = False):
        self.path, self.stage = Path(path), stage
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._progress_at, self._progress = 0.0, {}
        if not append:
            self.path.write_text(f"# {stage} started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")

    def progress(self, force: bool = False, **fields) -> None:
        """What the stage is doing, for the console (progress.py): fields are
        merged into <log>.progress, written at most twice a second unless
        forced.  Never raises, and costs nothing when nobody reads it."""
        from . import progress
        self._progress.update(fields)
        now = time.monotonic()
        if force or now - self._progress_at >= progress.MIN_WRITE:
            self._progress_at = now
            progress.write(self.path.with_suffix(".progress"), self._progress)

    def note(self, text: str) -> None:
        with open(self.path, "a") as f:
            f.write(text.rstrip("\n") + "\n")

    def fail(self, message: str, command: Sequence[str] | None = None,
             error: type[BuildError] = BuildError) -> BuildError:
        self.note(f"# FAILED: {message}")
        return error(self.stage, message, command, self.path)


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL when the thread that started us dies."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(argv: Sequence[str], *, contain: bool = True, own_group: bool = True, env=None,
          **popen) -> subprocess.Popen:
    """Start argv tied to this process's lifetime (see the module doc).
    contain=False for commands that must act on the caller's mount
    namespace (mount, umount) or are quick queries; own_group=False for
    programs on the caller's terminal (they must stay in its foreground
    group to read it)."""
    argv = [os.fspath(a) for a in argv]
    return subprocess.Popen([*CONTAIN, *argv] if contain else argv, env=env,
                            preexec_fn=_die_with_parent, process_group=0 if own_group else None, **popen)


def stop(proc: subprocess.Popen) -> None:
    """Kill proc and its process group (for a contained command: its whole
    PID namespace) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    proc.wait()


def run(argv: Sequence[str], log: Log, *, env: Mapping[str, str] | None = None,
        cwd: Path | None = None, input: bytes | None = None, check: bool = True,
        capture: bool = False, timeout: float | None = None, contain: bool = True,
        console: str = "log") -> subprocess.CompletedProcess:
    """Run argv, its output appended to `log`; raise BuildError on failure.

    capture=True returns stdout (stderr still goes to the log).  console:
    "log" (default), "tee" (also on the console: hooks the user watches) or
    "terminal" (the caller's terminal: a VM or a shell).  A run past
    `timeout` seconds is killed with everything it started and raises
    CommandTimeout."""
    argv = [os.fspath(a) for a in argv]
    log.note(f"$ {shlex.join(argv)}")
    start = time.monotonic()
    terminal = console == "terminal"
    with open(log.path, "ab") as out:
        try:
            proc = spawn(argv, contain=contain, own_group=not terminal, cwd=cwd,
                         env=None if terminal else {**BASE_ENV, **(env or {})},
                         **_streams(console, capture, input is not None, out))
        except FileNotFoundError:
            raise log.fail(f"{argv[0]} is not installed (see README: setup)", argv) from None
        try:
            if console == "tee":
                for line in proc.stdout:
                    out.write(line)
                    out.flush()
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
                proc.wait(timeout)
                stdout = b""
            else:
                stdout, _ = proc.communicate(input, timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            log.note(f"# killed after {timeout:g}s: over its time limit")
            raise log.fail(f"command did not finish within {timeout:g} s and was killed",
                           argv, error=CommandTimeout) from None
        except BaseException:
            stop(proc)
            log.note(f"# killed after {time.monotonic() - start:.1f}s: the build was stopped")
            raise
    if contain and proc.returncode == 127 and not _exists(argv[0], env):
        raise log.fail(f"{argv[0]} is not installed (see README: setup)", argv)
    log.note(f"# exit {proc.returncode} after {time.monotonic() - start:.1f}s")
    if check and proc.returncode != 0:
        raise log.fail(f"command exited with status {proc.returncode}", argv)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout or b"")


@contextmanager
def piped(argv: Sequence[str], log: Log, *, write: bool = False) -> Iterator[BinaryIO]:
    """Run argv with its stdout (or, write=True, its stdin) as a pipe this
    process streams through: a tar that packs or unpacks a tree while the
    caller hashes the bytes.  The other streams go to the log.  Leaving the
    block waits for the command (a failure raises BuildError); an exception
    inside it kills the command first."""
    argv = [os.fspath(a) for a in argv]
    log.note(f"$ {shlex.join(argv)}" + (" < (stream)" if write else " > (stream)"))
    start = time.monotonic()
    with open(log.path, "ab") as out:
        try:
            proc = spawn(argv, env=BASE_ENV, stdin=subprocess.PIPE if write else subprocess.DEVNULL,
                         stdout=out if write else subprocess.PIPE, stderr=out)
        except FileNotFoundError:
            raise log.fail(f"{argv[0]} is not installed (see README: setup)", argv) from None
        pipe = proc.stdin if write else proc.stdout
        try:
            yield pipe
            pipe.close()
            proc.wait()
        except BrokenPipeError:  # it stopped reading: it failed, its log says why
            proc.wait()
            raise log.fail(f"command exited with status {proc.returncode} before reading all its input",
                           argv) from None
        except BaseException:
            stop(proc)
            try:
                pipe.close()
            except OSError:
                pass
            log.note(f"# killed after {time.monotonic() - start:.1f}s: the stream was abandoned")
            raise
    log.note(f"# exit {proc.returncode} after {time.monotonic() - start:.1f}s")
    if proc.returncode != 0:
        raise log.fail(f"command exited with status {proc.returncode}", argv)


def _streams(console: str, capture: bool, has_input: bool, out) -> dict:
    """Popen's stdin, stdout and stderr for run()'s console modes."""
    if console == "terminal":
        return {}  # the caller's terminal, and its environment
    return {"stdin": subprocess.PIPE if has_input else subprocess.DEVNULL,
            "stdout": subprocess.PIPE if capture or console == "tee" else out,
            "stderr": subprocess.STDOUT if console == "tee" else out}


def _exists(program: str, env: Mapping[str, str] | None) -> bool:
    if "/" in program:
        return os.path.exists(program)
    return shutil.which(program, path={**BASE_ENV, **(env or {})}["PATH"]) is not None


def output(argv: Sequence[str], log: Log | None = None, default: str | None = None) -> str:
    """Stdout of a quick query command (versions, listings).  Without a log,
    a failure returns `default` when one is given."""
    if log is not None:
        return run(argv, log, capture=True, contain=False).stdout.decode()
    try:
        proc = spawn(argv, contain=False, env=BASE_ENV, stdin=subprocess.DEVNULL,
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        stdout, _ = proc.communicate()
    except FileNotFoundError:
        proc, stdout = None, b""
    if proc is None or proc.returncode != 0:
        if default is not None:
            return default
        raise BuildError("host", f"{shlex.join(map(str, argv))} failed")
    return stdout.decode()


def isolated(fn: Callable, *args, foreground: bool = False):
    """fn(*args) in a forked child in a private mount namespace; its return
    value or exception comes back through a pipe.  Stop signals here kill
    the child (and through PDEATHSIG all it runs).  foreground=True keeps
    the child in the terminal's process group (an interactive shell)."""
    return Isolated(fn, *args, foreground=foreground).wait()


class Isolated:
    """An isolated child started now and waited for later (`wait`), so a
    build can do other work meanwhile.  Fork it before starting threads."""

    def __init__(self, fn: Callable, *args, foreground: bool = False):
        parent = os.getpid()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(r)
            status, result = 0, None
            try:
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != parent:
                    os._exit(1)
                if not foreground:
                    os.setpgid(0, 0)
                if _libc.unshare(CLONE_NEWNS) != 0 or _libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
                    err = ctypes.get_errno()
                    raise BuildError("mount namespace", f"cannot make a private mount namespace: {os.strerror(err)}")
                result = fn(*args)
            except BaseException as exc:  # noqa: B902 - everything goes back to the parent
                status, result = 1, exc
            try:
                data = pickle.dumps((status, result))
            except Exception:
                data = pickle.dumps((1, BuildError("isolated", f"{result!r}")))
            with os.fdopen(w, "wb") as f:
                f.write(data)
            os._exit(status)
        os.close(w)
        self.pid, self._r = pid, r

    def wait(self):
        """The child's return value (its exception raised here)."""
        r, self._r = self._r, None
        try:
            with os.fdopen(r, "rb") as f:
                data = f.read()
            _, wstatus = os.waitpid(self.pid, 0)
        except BaseException:
            self.kill()
            raise
        if not data:
            raise BuildError("isolated", f"the isolated build process died ({_describe(wstatus)})")
        status, result = pickle.loads(data)
        if status:
            raise result
        return result

    def kill(self) -> None:
        """Stop the child and everything it runs (its process group), and reap it."""
        if self._r is not None:
            os.close(self._r)
            self._r = None
        for target in (-self.pid, self.pid):
            try:
                os.kill(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _describe(wstatus: int) -> str:
    if os.WIFSIGNALED(wstatus):
        return f"killed by {signal.Signals(os.WTERMSIG(wstatus)).name}"
    return f"exit status {os.waitstatus_to_exitcode(wstatus)}"
