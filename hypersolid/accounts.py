"""Users and passwords written straight into a tree's passwd/group/shadow.

Done natively rather than with useradd in the container: it is the same for
every architecture, needs no emulation, and is deterministic (no dates).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .config import User

FIRST_UID, LAST_UID = 1000, 59999
LOCKED = "*"


class AccountError(Exception):
    pass


class Table:
    """One colon-separated account file, edited in memory."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = [line.split(":") for line in path.read_text().splitlines() if line] if path.exists() else []

    def find(self, name: str) -> list[str] | None:
        return next((r for r in self.rows if r[0] == name), None)

    def ids(self, col: int) -> set[int]:
        return {int(r[col]) for r in self.rows if len(r) > col and r[col].isdigit()}

    def save(self, mode: int) -> None:
        tmp = self.path.with_name(self.path.name + "+")
        tmp.write_text("".join(":".join(r) + "\n" for r in self.rows))
        os.chmod(tmp, mode)
        if self.path.exists():
            st = self.path.stat()
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, self.path)


def _free_id(*used: set[int]) -> int:
    taken = set().union(*used)
    return next(i for i in range(FIRST_UID, LAST_UID) if i not in taken)


def apply(tree: Path, users: tuple[User, ...], root_password: str | None) -> None:
    etc = Path(tree) / "etc"
    passwd, group = Table(etc / "passwd"), Table(etc / "group")
    shadow, gshadow = Table(etc / "shadow"), Table(etc / "gshadow")

    root = shadow.find("root")
    if root is None:
        raise AccountError("the tree has no root entry in /etc/shadow (was base-passwd configured?)")
    root[1] = root_password or LOCKED

    for user in users:
        if passwd.find(user.name):
            raise AccountError(f"user {user.name!r} already exists in the image (created by a package)")
        if group.find(user.name):
            raise AccountError(f"user {user.name!r}: a group of that name already exists in the image")
        wanted = list(dict.fromkeys([*user.groups, *(["sudo"] if user.sudo else [])]))
        missing = [g for g in wanted if group.find(g) is None]
        if missing:
            raise AccountError(f"user {user.name!r}: no group {', '.join(missing)} in the image "
                               "(groups come from base-passwd and packages)")
        if user.sudo and not (Path(tree) / "usr/bin/sudo").exists():
            raise AccountError(f"user {user.name!r} has sudo: true but the image has no sudo package")
        if not (Path(tree) / user.shell.lstrip("/")).exists():
            raise AccountError(f"user {user.name!r}: shell {user.shell} does not exist in the image")
        uid = _free_id(passwd.ids(2))
        gid = uid if uid not in group.ids(2) else _free_id(group.ids(2))
        home = f"/home/{user.name}"
        passwd.rows.append([user.name, "x", str(uid), str(gid), "", home, user.shell])
        shadow.rows.append([user.name, user.password or "!", "", "0", "99999", "7", "", "", ""])
        group.rows.append([user.name, "x", str(gid), ""])
        gshadow.rows.append([user.name, "!", "", ""])
        for g in wanted:
            for table, col in ((group, 3), (gshadow, 3)):
                row = table.find(g)
                if row is not None:
                    while len(row) <= col:
                        row.append("")
                    row[col] = ",".join(filter(None, [*row[col].split(","), user.name]))
        _make_home(Path(tree), home, uid, gid)

    passwd.save(0o644)
    group.save(0o644)
    shadow.save(0o640)
    gshadow.save(0o640)


def _make_home(tree: Path, home: str, uid: int, gid: int) -> None:
    target = tree / home.lstrip("/")
    skel = tree / "etc/skel"
    if skel.is_dir():
        shutil.copytree(skel, target, symlinks=True, dirs_exist_ok=True)
    else:
        target.mkdir(parents=True, exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(target):
        for name in [dirpath, *[os.path.join(dirpath, n) for n in dirnames + filenames]]:
            os.lchown(name, uid, gid)
    os.chmod(target, 0o700)
