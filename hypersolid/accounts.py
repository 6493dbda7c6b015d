"""Users and passwords written straight into a tree's passwd/group/shadow.

Done natively rather than with useradd in the container: it is the same for
every architecture, needs no emulation, and is deterministic (no dates).
"""
from __future__ import annotations

import stat
from pathlib import Path

from . import intree
from .config import User

FIRST_UID, LAST_UID = 1000, 59999
LOCKED = "*"


class AccountError(Exception):
    pass


class Table:
    """One colon-separated account file of a tree, edited in memory; read
    and written in the tree (intree), so a link never leads to the host."""

    def __init__(self, root: intree.Root, rel: str):
        self.root, self.rel = root, rel
        self.rows = ([line.split(":") for line in root.read_text(rel).splitlines() if line]
                     if root.exists(rel) else [])

    def find(self, name: str) -> list[str] | None:
        return next((r for r in self.rows if r[0] == name), None)

    def ids(self, col: int) -> set[int]:
        return {int(r[col]) for r in self.rows if len(r) > col and r[col].isdigit()}

    def save(self, mode: int) -> None:
        """Atomic replace (a temporary name beside the file), keeping its owner."""
        self.root.write_text(self.rel, "".join(":".join(r) + "\n" for r in self.rows), mode)


def _free_id(*used: set[int]) -> int:
    taken = set().union(*used)
    return next(i for i in range(FIRST_UID, LAST_UID) if i not in taken)


def apply(tree: Path, users: tuple[User, ...], root_password: str | None) -> None:
    with intree.Root(tree) as root:
        try:
            _apply(root, users, root_password)
        except OSError as err:
            where = f" {err.filename}" if err.filename else ""
            raise AccountError(f"cannot write the accounts in the image:{where}: {err.strerror or err}") from None


def _apply(tree: intree.Root, users: tuple[User, ...], root_password: str | None) -> None:
    passwd, group = Table(tree, "etc/passwd"), Table(tree, "etc/group")
    shadow, gshadow = Table(tree, "etc/shadow"), Table(tree, "etc/gshadow")

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
        if user.sudo and not tree.exists("usr/bin/sudo"):
            raise AccountError(f"user {user.name!r} has sudo: true but the image has no sudo package")
        if not tree.exists(user.shell):
            raise AccountError(f"user {user.name!r}: shell {user.shell} does not exist in the image")
        uid = _free_id(passwd.ids(2))
        gid = uid if uid not in group.ids(2) else _free_id(group.ids(2))
        home = f"/home/{user.name}"
        passwd.rows.append([user.name, "x", str(uid), str(gid), "", home, user.shell])
        # Last change 0: the password must be changed at the first login
        # (login/pam_unix ask for a new one before the shell starts).
        lastchg = "0" if user.password_change_on_first_login else ""
        password = "!" if user.password is None else user.password
        shadow.rows.append([user.name, password, lastchg, "0", "99999", "7", "", "", ""])
        group.rows.append([user.name, "x", str(gid), ""])
        gshadow.rows.append([user.name, "!", "", ""])
        for g in wanted:
            for table, col in ((group, 3), (gshadow, 3)):
                row = table.find(g)
                if row is not None:
                    while len(row) <= col:
                        row.append("")
                    row[col] = ",".join(filter(None, [*row[col].split(","), user.name]))
        _make_home(tree, home, uid, gid)

    passwd.save(0o644)
    group.save(0o644)
    shadow.save(0o640)
    gshadow.save(0o640)


def _make_home(root: intree.Root, home: str, uid: int, gid: int) -> None:
    """The home from /etc/skel, owned by the user, mode 0700.  A link at the
    home (from an overlay) is followed in the tree, and a missing target is
    created; a link to a directory the image already has is refused, since
    that directory would be handed to the user."""
    rel = home.lstrip("/")
    try:
        real = root.resolve(rel)
    except FileNotFoundError:
        real = rel  # missing: made below, links and all
    if real != rel:
        st = root.stat(rel)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise AccountError(f"home {home} is a symlink to /{real}, a directory the image already "
                               "has; it would be given to the user")
    target = root.makedirs(rel)
    if root.is_dir("etc/skel"):
        root.copy_tree("etc/skel", target)  # what the overlay put in the home wins
    root.chown_tree(target, uid, gid)
    root.chmod(target, 0o700)
