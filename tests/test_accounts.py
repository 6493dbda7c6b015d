"""Users and passwords written natively into a tree's account files."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hypersolid.accounts import AccountError, apply
from hypersolid.config import User

HASH = "$6$rounds=5000$saltsalt$Q0vQ1fVdpl0lDvFh4o0Xl3b0XyVtM5V3Z0jU6mQfW9s1dR1KjK4nG0Q7vZ8e3m2"
ROOT_HASH = "$y$j9T$abcdefghijklmnop$0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef"

PASSWD = """\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
bin:x:2:2:bin:/bin:/usr/sbin/nologin
sys:x:3:3:sys:/dev:/usr/sbin/nologin
sync:x:4:65534:sync:/bin:/bin/sync
games:x:5:60:games:/usr/games:/usr/sbin/nologin
man:x:6:12:man:/var/cache/man:/usr/sbin/nologin
lp:x:7:7:lp:/var/spool/lpd:/usr/sbin/nologin
mail:x:8:8:mail:/var/mail:/usr/sbin/nologin
news:x:9:9:news:/var/spool/news:/usr/sbin/nologin
uucp:x:10:10:uucp:/var/spool/uucp:/usr/sbin/nologin
proxy:x:13:13:proxy:/bin:/usr/sbin/nologin
www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin
backup:x:34:34:backup:/var/backups:/usr/sbin/nologin
list:x:38:38:Mailing List Manager:/var/list:/usr/sbin/nologin
irc:x:39:39:ircd:/run/ircd:/usr/sbin/nologin
_apt:x:42:65534::/nonexistent:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""

GROUPS = [("root", 0), ("daemon", 1), ("bin", 2), ("sys", 3), ("adm", 4), ("tty", 5), ("disk", 6),
          ("lp", 7), ("mail", 8), ("news", 9), ("uucp", 10), ("man", 12), ("proxy", 13), ("kmem", 15),
          ("dialout", 20), ("fax", 21), ("voice", 22), ("cdrom", 24), ("floppy", 25), ("tape", 26),
          ("sudo", 27), ("audio", 29), ("dip", 30), ("www-data", 33), ("backup", 34),
          ("operator", 37), ("list", 38), ("irc", 39), ("src", 40), ("shadow", 42), ("utmp", 43),
          ("video", 44), ("sasl", 45), ("plugdev", 46), ("staff", 50), ("games", 60),
          ("users", 100), ("nogroup", 65534)]
GROUP = "".join(f"{name}:x:{gid}:\n" for name, gid in GROUPS)
GSHADOW = "".join(f"{name}:*::\n" for name, _ in GROUPS)
SHADOW = "".join(f"{line.split(':')[0]}:*:19500:0:99999:7:::\n" for line in PASSWD.splitlines())


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "tree"
    etc = root / "etc"
    (etc / "skel").mkdir(parents=True)
    for name, text, mode in (("passwd", PASSWD, 0o644), ("group", GROUP, 0o644),
                             ("shadow", SHADOW, 0o640), ("gshadow", GSHADOW, 0o640)):
        (etc / name).write_text(text)
        (etc / name).chmod(mode)
    (etc / "skel" / ".bashrc").write_text("# ~/.bashrc\n")
    (etc / "skel" / ".profile").write_text("# ~/.profile\n")
    (etc / "skel" / ".config").mkdir()
    (etc / "skel" / ".config" / "app.conf").write_text("x=1\n")
    for rel in ("bin/bash", "usr/bin/sudo", "usr/bin/zsh"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
        (root / rel).chmod(0o755)
    return root


def rows(tree: Path, name: str) -> dict[str, list[str]]:
    return {line.split(":")[0]: line.split(":") for line in (tree / "etc" / name).read_text().splitlines()}


def user(name="alice", groups=(), sudo=False, password=HASH, shell="/bin/bash", change=False) -> User:
    return User(name=name, groups=tuple(groups), sudo=sudo, password=password, shell=shell,
                password_change_on_first_login=change)


def test_root_locked_without_a_hash(tree):
    apply(tree, (), None)
    assert rows(tree, "shadow")["root"][1] == "*"


def test_root_hash_set_when_given(tree):
    apply(tree, (), ROOT_HASH)
    root = rows(tree, "shadow")["root"]
    assert root[1] == ROOT_HASH
    assert root[2:] == ["19500", "0", "99999", "7", "", "", ""]


def test_other_entries_are_kept(tree):
    apply(tree, (user(),), None)
    assert (tree / "etc/passwd").read_text().startswith(PASSWD)
    assert (tree / "etc/group").read_text().startswith(GROUP)
    assert rows(tree, "shadow")["daemon"] == ["daemon", "*", "19500", "0", "99999", "7", "", "", ""]


def test_user_gets_uid_1000_own_group_and_shadow_hash(tree):
    apply(tree, (user(),), None)
    assert rows(tree, "passwd")["alice"] == ["alice", "x", "1000", "1000", "", "/home/alice", "/bin/bash"]
    assert rows(tree, "group")["alice"] == ["alice", "x", "1000", ""]
    assert rows(tree, "gshadow")["alice"] == ["alice", "!", "", ""]
    shadow = rows(tree, "shadow")["alice"]
    assert shadow[1] == HASH
    assert len(shadow) == 9


def test_user_without_password_is_locked(tree):
    apply(tree, (user(password=None),), None)
    assert rows(tree, "shadow")["alice"][1] == "!"


def test_shadow_fields_of_a_user_without_first_login_change(tree):
    apply(tree, (user(),), None)
    # name, hash, last change (empty: no aging), min 0, max 99999, warn 7, inactive, expire, reserved
    assert rows(tree, "shadow")["alice"] == ["alice", HASH, "", "0", "99999", "7", "", "", ""]


def test_empty_password_changed_at_first_login_has_last_change_0(tree):
    apply(tree, (user(password="", change=True),), None)
    assert rows(tree, "shadow")["alice"] == ["alice", "", "0", "0", "99999", "7", "", "", ""]


def test_hash_changed_at_first_login_keeps_the_hash_with_last_change_0(tree):
    apply(tree, (user(change=True), user(name="bob")), None)
    shadow = rows(tree, "shadow")
    assert shadow["alice"] == ["alice", HASH, "0", "0", "99999", "7", "", "", ""]
    assert shadow["bob"][2] == ""


def test_home_is_copied_from_skel_owned_by_the_user_mode_0700(tree):
    apply(tree, (user(),), None)
    home = tree / "home/alice"
    st = home.stat()
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert (home / ".bashrc").read_text() == "# ~/.bashrc\n"
    for rel in (".bashrc", ".profile", ".config", ".config/app.conf"):
        s = os.lstat(home / rel)
        assert (s.st_uid, s.st_gid) == (1000, 1000), rel
    skel = (tree / "etc/skel").stat()
    assert (skel.st_uid, skel.st_gid) != (1000, 1000)


def test_sudo_adds_user_to_sudo_group_and_gshadow(tree):
    apply(tree, (user(sudo=True),), None)
    assert rows(tree, "group")["sudo"] == ["sudo", "x", "27", "alice"]
    assert rows(tree, "gshadow")["sudo"] == ["sudo", "*", "", "alice"]


def test_groups_membership_appends_to_existing_members(tree):
    (tree / "etc/group").write_text(GROUP.replace("audio:x:29:\n", "audio:x:29:pulse\n"))
    apply(tree, (user(groups=("audio", "video"), sudo=True),
                 user(name="bob", groups=("audio",))), None)
    group = rows(tree, "group")
    assert group["audio"][3] == "pulse,alice,bob"
    assert group["video"][3] == "alice"
    assert group["sudo"][3] == "alice"
    assert rows(tree, "gshadow")["audio"][3] == "alice,bob"


def test_second_user_gets_1001(tree):
    apply(tree, (user(), user(name="bob", shell="/usr/bin/zsh")), None)
    assert rows(tree, "passwd")["bob"] == ["bob", "x", "1001", "1001", "", "/home/bob", "/usr/bin/zsh"]
    assert rows(tree, "group")["bob"][2] == "1001"
    assert (tree / "home/bob").stat().st_uid == 1001


def test_own_group_skips_a_taken_gid(tree):
    (tree / "etc/group").write_text(GROUP + "docker:x:1000:\n")
    apply(tree, (user(),), None)
    assert rows(tree, "passwd")["alice"][2:4] == ["1000", "1001"]
    assert rows(tree, "group")["alice"][2] == "1001"


def test_file_modes_after_apply(tree):
    apply(tree, (user(),), None)
    modes = {n: stat.S_IMODE((tree / "etc" / n).stat().st_mode) for n in ("passwd", "group", "shadow", "gshadow")}
    assert modes == {"passwd": 0o644, "group": 0o644, "shadow": 0o640, "gshadow": 0o640}
    assert not list((tree / "etc").glob("*+"))


def test_missing_group_is_named(tree):
    with pytest.raises(AccountError, match=r"'alice': no group wheel, docker"):
        apply(tree, (user(groups=("audio", "wheel", "docker")),), None)


def test_sudo_without_sudo_package(tree):
    (tree / "usr/bin/sudo").unlink()
    with pytest.raises(AccountError, match="sudo: true but the image has no sudo package"):
        apply(tree, (user(sudo=True),), None)


def test_missing_shell(tree):
    with pytest.raises(AccountError, match="shell /bin/fish does not exist"):
        apply(tree, (user(shell="/bin/fish"),), None)


def test_existing_user_is_an_error(tree):
    with pytest.raises(AccountError, match="user 'daemon' already exists"):
        apply(tree, (user(name="daemon"),), None)


def test_same_user_twice_is_an_error(tree):
    with pytest.raises(AccountError, match="user 'alice' already exists"):
        apply(tree, (user(), user()), None)


def test_failure_leaves_account_files_untouched(tree):
    before = {n: (tree / "etc" / n).read_text() for n in ("passwd", "group", "shadow", "gshadow")}
    with pytest.raises(AccountError):
        apply(tree, (user(), user(name="bob", groups=("nosuch",))), ROOT_HASH)
    assert {n: (tree / "etc" / n).read_text() for n in before} == before


def test_tree_without_root_in_shadow(tree):
    (tree / "etc/shadow").write_text("")
    with pytest.raises(AccountError, match="no root entry"):
        apply(tree, (), None)


def test_user_named_like_an_existing_group_does_not_duplicate_the_group(tree):
    """`staff` is a base-passwd group: adding a user `staff` must fail (as
    useradd does) or reuse it, never write a second `staff` group."""
    try:
        apply(tree, (user(name="staff"),), None)
    except AccountError as err:
        assert "staff" in str(err)
        return
    for name in ("group", "gshadow"):
        names = [line.split(":")[0] for line in (tree / "etc" / name).read_text().splitlines()]
        assert names.count("staff") == 1, f"etc/{name} has {names.count('staff')} 'staff' groups"


def test_links_at_the_home_and_shadow_plus_are_followed_inside_the_tree(tree, tmp_path):
    host = tmp_path / "host"
    (host / "home").mkdir(parents=True)
    (host / "shadow").write_text("host\n")
    os.chmod(host / "home", 0o751)
    (tree / "home").mkdir()
    (tree / "home/alice").symlink_to(host / "home")
    (tree / "etc/shadow+").symlink_to(host / "shadow")
    apply(tree, (user(),), None)
    assert os.listdir(host / "home") == [] and stat.S_IMODE((host / "home").stat().st_mode) == 0o751
    assert (host / "home").stat().st_uid != 1000 and (host / "shadow").read_text() == "host\n"
    inside = tree / str(host / "home").lstrip("/")
    assert (inside / ".bashrc").exists() and inside.stat().st_uid == 1000
    assert (tree / "home/alice").is_symlink() and (tree / "etc/shadow+").is_symlink()
    assert "alice" in rows(tree, "shadow")


def test_a_home_linked_to_a_directory_of_the_image_is_refused(tree):
    (tree / "home").mkdir()
    (tree / "home/alice").symlink_to("/etc")
    with pytest.raises(AccountError, match="home /home/alice is a symlink to /etc"):
        apply(tree, (user(),), None)
