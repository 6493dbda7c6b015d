"""Paths inside an image tree, resolved the way the image itself resolves them.

Every write, read and chown the build does inside a tree goes through a
`Root`.  A path is resolved with the tree as `/` (openat2(2) with
RESOLVE_IN_ROOT, or a component-by-component walk with O_NOFOLLOW where
openat2 is missing): an absolute symlink or a `../../..` one in an overlay
or a package is followed *inside* the tree, never onto the build host, and
stays a symlink in the image.

Semantics (chroot-like):
- reads and `write_*` follow every link in the tree, the last component
  too (a write through a dangling link creates its target in the tree);
  directories missing along the resolved path are created (0755);
- `write_*` replaces atomically: a temporary name in the resolved directory,
  then rename(2);
- `copy_file`, `symlink`, `unlink`, `remove`, `lchown`, `chmod` follow the
  links of the parent path but not the last component: a file or link
  there is replaced (never written through), a mode or owner applies to
  the entry itself.
"""
from __future__ import annotations

import ctypes
import errno
import fnmatch
import os
import platform
import secrets
import shutil
import stat
from pathlib import Path

__all__ = ["Root", "SYS_OPENAT2"]

# openat2 has the same number on every architecture with the unified
# syscall table (x86_64, aarch64, arm, i386, riscv64, ...); alpha differs.
SYS_OPENAT2 = {"alpha": 547}.get(platform.machine(), 437)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
MAX_HOPS = 40  # the kernel's own symlink limit


class _IsRoot(IsADirectoryError):
    """The path is the tree's root: it has no parent to resolve."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_have_openat2: bool | None = None  # None: not tried yet


def _openat2(dirfd: int, path: str, flags: int) -> int:
    how = _OpenHow(flags, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    for _ in range(8):  # EAGAIN: a concurrent rename in the tree; retry
        fd = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd), os.fsencode(path),
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EAGAIN:
            raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


def _chmod_at(dirfd: int, name: str, mode: int) -> None:
    """chmod the entry name in dirfd itself (fchmodat cannot refuse links)."""
    f = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        if stat.S_ISLNK(os.fstat(f).st_mode):
            raise OSError(errno.ELOOP, "a symlink has no mode", name)
        os.chmod(f"/proc/self/fd/{f}", mode)  # the inode f holds, not a path
    finally:
        os.close(f)


def _parts(rel: str) -> list[str]:
    return [p for p in rel.split("/") if p not in ("", ".")]


def _join(*parts: str) -> str:
    return "/".join(p for part in parts for p in _parts(part))


class Root:
    """An image tree as `/`.  Paths given to the methods are in the tree
    (a leading '/' is optional); paths returned are relative to it ('' is
    the root).  Use as a context manager, or call close()."""

    def __init__(self, path: Path | str, walk: bool | None = None):
        self.path = os.path.realpath(path)
        self.fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._walk_only = walk  # True: never openat2 (tests the fallback)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Root":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- resolution -------------------------------------------------------

    def _dir(self, rel: str) -> tuple[int, str]:
        """Open directory rel (every link followed in the tree): an O_PATH fd
        (the caller closes it) and its canonical path in the tree."""
        global _have_openat2
        if not self._walk_only and _have_openat2 is not False:
            try:
                fd = _openat2(self.fd, _join(rel) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                _have_openat2 = True
                return fd, self._where(fd)
            except OSError as err:
                if err.errno not in (errno.ENOSYS, errno.EPERM) or _have_openat2:
                    raise
                _have_openat2 = False  # old kernel or a seccomp filter
        return self._walk(rel)

    def _where(self, fd: int) -> str:
        real = os.readlink(f"/proc/self/fd/{fd}")
        if real == self.path:
            return ""
        if not real.startswith(self.path.rstrip("/") + "/"):
            os.close(fd)
            raise OSError(errno.EXDEV, "resolved outside the tree", real)
        return real[len(self.path.rstrip("/")) + 1:]

    def _walk(self, rel: str) -> tuple[int, str]:
        """The fallback: each component opened with O_NOFOLLOW, links read
        and spliced in, '..' never above the root."""
        todo, done, hops = _parts(rel), [], 0
        fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            while todo:
                name = todo.pop(0)
                if name == "..":
                    done = done[:-1]
                    os.close(fd)
                    fd = os.open(_join(*done) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
                                 dir_fd=self.fd)  # `done` holds no links: safe
                    continue
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    hops += 1
                    if hops > MAX_HOPS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
                    target = os.readlink(name, dir_fd=fd)
                    todo = _parts(target) + todo
                    if target.startswith("/"):
                        done = []
                        os.close(fd)
                        fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), rel)
                new = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = new
                done.append(name)
            return fd, _join(*done)
        except BaseException:
            os.close(fd)
            raise

    def _locate(self, rel: str, follow: bool, create: bool, depth: int = 0,
                lenient: bool = False) -> tuple[int, str, str]:
        """(fd of the resolved parent directory, last name, canonical path of
        the entry).  follow: chase a link in the last component too.
        create: make missing parent directories (following dangling links).
        lenient: a missing parent is no error (fd -1; the missing part of
        the path holds no links, so it is taken as written)."""
        if depth > MAX_HOPS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
        hops = 0
        while True:
            parts = _parts(rel)
            if not parts or parts[-1] == "..":  # the entry is a directory: split its real path
                if not parts:
                    where = ""
                elif lenient:  # '..' of what rel's head resolves to
                    where = self._lenient("/".join(parts[:-1]), depth + 1).rpartition("/")[0]
                else:
                    fd, where = self._dir(rel)
                    os.close(fd)
                if not where:
                    raise _IsRoot(errno.EISDIR, "the tree's root itself", "/")
                parts = where.split("/")
            head, name = "/".join(parts[:-1]), parts[-1]
            try:
                fd, where = self._dir(head)
            except FileNotFoundError:
                if lenient:
                    return -1, name, _join(self._lenient(head, depth + 1), name)
                if not create:
                    raise
                fd, where = self._makedirs(head, depth + 1)
            path = _join(where, name)
            if not follow:
                return fd, name, path
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return fd, name, path
            if not stat.S_ISLNK(st.st_mode):
                return fd, name, path
            target = os.readlink(name, dir_fd=fd)
            os.close(fd)
            hops += 1
            if hops > MAX_HOPS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
            rel = target if target.startswith("/") else _join(where, target)

    def _makedirs(self, rel: str, depth: int = 0, mode: int = 0o755) -> tuple[int, str]:
        try:
            return self._dir(rel)
        except FileNotFoundError:
            pass
        fd, name, _ = self._locate(rel, follow=True, create=True, depth=depth)
        try:
            os.mkdir(name, mode, dir_fd=fd)
            _chmod_at(fd, name, mode)  # the mode asked for, whatever the umask
        except FileExistsError:
            pass  # made meanwhile, or not a directory: _dir says which
        finally:
            os.close(fd)
        return self._dir(rel)

    def resolve(self, rel: str) -> str:
        """rel's canonical path in the tree, every link followed; what is
        missing is taken as written (where a write would create it)."""
        return self._lenient(rel)

    def _lenient(self, rel: str, depth: int = 0) -> str:
        try:
            fd, _, path = self._locate(rel, follow=True, create=False, depth=depth, lenient=True)
        except _IsRoot:
            return ""
        if fd >= 0:
            os.close(fd)
        return path

    # -- queries ----------------------------------------------------------

    def _stat(self, rel: str, follow: bool) -> os.stat_result | None:
        try:
            fd, name, _ = self._locate(rel, follow=follow, create=False)
        except _IsRoot:
            return os.stat(self.fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        finally:
            os.close(fd)

    def lstat(self, rel: str) -> os.stat_result | None:
        """The entry itself (last link not followed); None if missing."""
        return self._stat(rel, follow=False)

    def stat(self, rel: str) -> os.stat_result | None:
        """What rel resolves to in the tree; None if missing or dangling."""
        return self._stat(rel, follow=True)

    def exists(self, rel: str) -> bool:
        return self.stat(rel) is not None

    def is_dir(self, rel: str) -> bool:
        st = self.stat(rel)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def is_link(self, rel: str) -> bool:
        st = self.lstat(rel)
        return st is not None and stat.S_ISLNK(st.st_mode)

    def readlink(self, rel: str) -> str:
        fd, name, _ = self._locate(rel, follow=False, create=False)
        try:
            return os.readlink(name, dir_fd=fd)
        finally:
            os.close(fd)

    # -- reading and writing files -----------------------------------------

    def read_bytes(self, rel: str) -> bytes:
        fd, name, _ = self._locate(rel, follow=True, create=False)
        try:
            f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)
        with os.fdopen(f, "rb") as fh:
            return fh.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def _replace(self, rel: str, follow: bool, fill, mode: int, owner: tuple[int, int] | None,
                 times: tuple[int, int] | None = None) -> str:
        fd, name, path = self._locate(rel, follow=follow, create=True)
        try:
            try:
                old = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                old = None
            if old is not None and stat.S_ISDIR(old.st_mode):
                raise IsADirectoryError(errno.EISDIR, "a directory is in the way", path)
            if owner is None and old is not None and not stat.S_ISLNK(old.st_mode):
                owner = (old.st_uid, old.st_gid)
            tmp = f".{name[:200]}.hs-{secrets.token_hex(4)}"
            f = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o600, dir_fd=fd)
            try:
                with os.fdopen(f, "wb", closefd=False) as fh:
                    fill(fh)
                if owner is not None:
                    os.fchown(f, *owner)
                os.fchmod(f, mode)
                if times is not None:
                    os.utime(f, ns=times)
                os.close(f)
                f = -1
                os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                if f >= 0:
                    os.close(f)
                try:
                    os.unlink(tmp, dir_fd=fd)
                except FileNotFoundError:
                    pass
                raise
            return path
        finally:
            os.close(fd)

    def write_bytes(self, rel: str, data: bytes, mode: int = 0o644,
                    owner: tuple[int, int] | None = None) -> str:
        """Write through links, in the tree; atomic.  owner: default the
        replaced file's (else the caller's).  Returns the path written."""
        return self._replace(rel, True, lambda fh: fh.write(data), mode, owner)

    def write_text(self, rel: str, text: str, mode: int = 0o644,
                   owner: tuple[int, int] | None = None) -> str:
        return self.write_bytes(rel, text.encode(), mode, owner)

    def copy_file(self, src: Path | str, rel: str, mode: int | None = None,
                  owner: tuple[int, int] | None = (0, 0), times: bool = True) -> str:
        """Copy a host file to rel, replacing what is there (a link is
        replaced, not written through).  Keeps src's mode and mtime unless
        told otherwise; owner root:root by default."""
        st = os.stat(src, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(src))

        def fill(fh):
            with open(src, "rb") as s:
                shutil.copyfileobj(s, fh, 1 << 20)
        return self._replace(rel, False, fill, st.st_mode & 0o7777 if mode is None else mode, owner,
                             (st.st_atime_ns, st.st_mtime_ns) if times else None)

    # -- directories, links, removal, ownership -----------------------------

    def makedirs(self, rel: str, mode: int = 0o755) -> str:
        """mkdir -p in the tree (links followed, dangling ones created
        through); returns the directory's canonical path."""
        fd, path = self._makedirs(rel, mode=mode)
        os.close(fd)
        return path

    def symlink(self, target: str, rel: str) -> str:
        """Make rel a link to target, replacing a file or link (not a directory)."""
        fd, name, path = self._locate(rel, follow=False, create=True)
        try:
            tmp = f".{name[:200]}.hs-{secrets.token_hex(4)}"
            os.symlink(target, tmp, dir_fd=fd)
            try:
                old = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                old = None
            if old is not None and stat.S_ISDIR(old.st_mode):
                os.unlink(tmp, dir_fd=fd)
                raise IsADirectoryError(errno.EISDIR, "a directory is in the way", path)
            os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            return path
        finally:
            os.close(fd)

    def unlink(self, rel: str, missing_ok: bool = True) -> None:
        """Remove a file or link (the link itself)."""
        try:
            fd, name, _ = self._locate(rel, follow=False, create=False)
        except (FileNotFoundError, NotADirectoryError):
            if missing_ok:
                return
            raise
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            if not missing_ok:
                raise
        finally:
            os.close(fd)

    def listdir(self, rel: str) -> list[str]:
        """The names in directory rel (resolved in the tree); [] if missing."""
        try:
            fd, _ = self._dir(rel)
        except (FileNotFoundError, NotADirectoryError):
            return []
        try:
            dup = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)
        try:
            return sorted(os.listdir(dup))
        finally:
            os.close(dup)

    def remove_matching(self, pattern: str) -> list[str]:
        """rm -rf of the entries a glob's last component matches (`var/log/apt/*`),
        in the directory its first part resolves to in the tree."""
        head, tail = os.path.split(pattern.strip("/"))
        gone = []
        for name in fnmatch.filter(self.listdir(head), tail):
            self.remove(_join(head, name))
            gone.append(_join(head, name))
        return gone

    def remove(self, rel: str) -> None:
        """rm -rf of the entry itself: a link is removed, not followed."""
        try:
            fd, name, _ = self._locate(rel, follow=False, create=False)
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(name, dir_fd=fd)  # fd-based, never follows links
            else:
                os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def fresh_dir(self, rel: str, mode: int = 0o755) -> str:
        """An empty directory at rel, whatever was there (removed, not followed)."""
        self.remove(rel)
        fd, name, path = self._locate(rel, follow=False, create=True)
        try:
            os.mkdir(name, dir_fd=fd)
        finally:
            os.close(fd)
        self.chmod(path, mode)
        return path

    def lchown(self, rel: str, uid: int, gid: int) -> None:
        fd, name, _ = self._locate(rel, follow=False, create=False)
        try:
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)

    def chmod(self, rel: str, mode: int) -> None:
        """chmod the entry itself; a link has no mode of its own (ELOOP)."""
        fd, name, path = self._locate(rel, follow=False, create=False)
        try:
            _chmod_at(fd, name, mode)
        finally:
            os.close(fd)

    def utime(self, rel: str, ns: tuple[int, int]) -> None:
        fd, name, _ = self._locate(rel, follow=False, create=False)
        try:
            os.utime(name, ns=ns, dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)

    def chown_tree(self, rel: str, uid: int, gid: int) -> None:
        """lchown rel (resolved) and everything below it, following no link."""
        top, where = self._dir(rel)
        try:
            os.chown(f"/proc/self/fd/{top}", uid, gid)
            for _, dirnames, filenames, dfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
                for name in dirnames + filenames:
                    os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(top)

    def copy_tree(self, src: str, dest: str, owner: tuple[int, int] | None = None,
                  overwrite: bool = False) -> None:
        """Copy directory src of the tree into dest of the tree (e.g. skel
        into a home): files, links and directories, modes and mtimes kept.
        Entries already in dest stay unless overwrite."""
        top, _ = self._dir(src)
        dest = self.makedirs(dest)
        try:
            for dirpath, dirnames, filenames, dfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
                base = _join(dest, dirpath)
                for name in dirnames + filenames:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    to = _join(base, name)
                    if not overwrite and self.lstat(to) is not None:
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        self.makedirs(to, st.st_mode & 0o7777)
                        self.chmod(to, st.st_mode & 0o7777)
                    elif stat.S_ISLNK(st.st_mode):
                        self.symlink(os.readlink(name, dir_fd=dfd), to)
                    elif stat.S_ISREG(st.st_mode):
                        f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                        with os.fdopen(f, "rb") as fh:
                            data = fh.read()
                        self._replace(to, False, lambda out: out.write(data), st.st_mode & 0o7777,
                                      owner, (st.st_atime_ns, st.st_mtime_ns))
                        continue
                    else:
                        continue  # fifos and devices have no place in a skeleton
                    if owner is not None:
                        self.lchown(to, *owner)
        finally:
            os.close(top)
