"""doit file checker: content (xxh3-128), not MD5, not mtimes.

mtime+size equal to the stored state means "unchanged" without reading the
file; otherwise the content decides, so a fresh clone (new mtimes, same
bytes) rebuilds nothing.  Digests are memoised per run by inode, size and
mtime, since many tasks share a dependency.
"""
from __future__ import annotations

import os

from doit.dependency import FileChangedChecker

from .cache import digest_file

_memo: dict[tuple, str] = {}


def _digest(path: str, st: os.stat_result) -> str:
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _memo:
        _memo[key] = digest_file(path)
    return _memo[key]


class XxhashChecker(FileChangedChecker):
    def check_modified(self, file_path, file_stat, state):
        if not state or len(state) != 3:
            return True
        mtime, size, digest = state
        if file_stat.st_mtime_ns == mtime and file_stat.st_size == size:
            return False
        return file_stat.st_size != size or _digest(file_path, file_stat) != digest

    def get_state(self, dep, current_state):
        st = os.stat(dep)
        if current_state and len(current_state) == 3:
            mtime, size, digest = current_state
            if st.st_mtime_ns == mtime and st.st_size == size:
                return None
        return [st.st_mtime_ns, st.st_size, _digest(dep, st)]
