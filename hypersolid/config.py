"""Targets: the one place that reads, validates and merges target YAML.

A target is ``targets/<name>/target.yaml`` (plus optional ``rootfs/`` and
``hooks/`` beside it).  Values are checked against ``SETTINGS`` while the
YAML node marks are still at hand, so every error names file, line and key
path.  ``extends:`` is resolved by linearising the inheritance graph (depth
first, each target once, parents before children) and folding the layers in
that order with each setting's merge rule; nothing else merges config.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

ARCHITECTURES = ("amd64", "arm64", "armhf", "armel", "i386")
COMPRESSIONS = ("zstd", "xz", "gzip", "lz4", "lzo")
IMAGE_TYPES = ("img", "cpio", "both")
# mkinitramfs COMPRESS= values, with the package that provides each tool in the tree.
INITRAMFS_COMPRESSORS = {"zstd": "zstd", "gzip": "gzip", "xz": "xz-utils", "lz4": "lz4",
                         "lzma": "xz-utils", "lzop": "lzop", "bzip2": "bzip2"}
# MODULES= of initramfs.conf; `dep` is left out on purpose: it would pick the
# modules for the build host's hardware.
INITRAMFS_MODULES = ("most", "netboot", "list")


class ConfigError(Exception):
    """A bad target: says where (file:line) and what (key path)."""

    def __init__(self, file: Path | str, line: int, key: str, message: str):
        self.file, self.line, self.key, self.message = Path(file), line, key, message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{_display(self.file)}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


def _display(path: Path) -> str:
    """Relative to the working directory if below it; a symlink is shown as
    the link (its target may be the very problem), and never followed."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


# --- value types -----------------------------------------------------------
# Each type checks one YAML node and returns plain Python data.  `key` is the
# dotted path used in messages (sections[1].packages[0]).

def _fail(file: Path, node: yaml.Node, key: str, message: str):
    raise ConfigError(file, node.start_mark.line + 1, key, message)


_KIND = {yaml.ScalarNode: "a scalar", yaml.SequenceNode: "a list", yaml.MappingNode: "a mapping"}
_TAG = {"str": "a string", "int": "an integer", "bool": "true/false", "null": "null", "float": "a number"}


_CORE = "tag:yaml.org,2002:"


def _short(value, limit: int = 60) -> str:
    """repr() for a message: one line, not the whole of a huge value."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


def _plain(file, node, key) -> None:
    """Only YAML's own types: `!!python/object` and local `!tags` are refused."""
    if not node.tag.startswith(_CORE) or "/" in node.tag[len(_CORE):]:
        tag = "!!" + node.tag[len(_CORE):] if node.tag.startswith(_CORE) else node.tag
        _fail(file, node, key, f"YAML tag {_short(tag)} is not allowed (plain YAML values only)")


def _scalar(file, node, key, tag: str, want: str):
    _plain(file, node, key)
    if not isinstance(node, yaml.ScalarNode):
        _fail(file, node, key, f"expected {want}, got {_KIND[type(node)]}")
    got = node.tag.rsplit(":", 1)[-1]
    if got != tag:
        _fail(file, node, key, f"expected {want}, got {_TAG.get(got, got)} {_short(node.value)}")
    if tag == "int" and len(node.value) > 30:
        _fail(file, node, key, f"{_short(node.value)} is not an integer of sane size")
    try:
        return yaml.constructor.SafeConstructor().construct_object(node)
    except (ValueError, KeyError, TypeError, yaml.YAMLError):  # e.g. `!!int abc`, `!!bool maybe`
        _fail(file, node, key, f"expected {want}, got {_short(node.value)}")


class Str:
    def __init__(self, pattern: str | None = None, hint: str = ""):
        self.pattern, self.hint = pattern, hint

    def check(self, file, node, key):
        value = _scalar(file, node, key, "str", "a string")
        if self.pattern and not re.fullmatch(self.pattern, value):
            _fail(file, node, key, f"{_short(value)} is not {self.hint}")
        return value


class Bool:
    def check(self, file, node, key):
        return _scalar(file, node, key, "bool", "true or false")


class Int:
    def __init__(self, low: int, high: int):
        self.low, self.high = low, high

    def check(self, file, node, key):
        value = _scalar(file, node, key, "int", "an integer")
        if not self.low <= value <= self.high:
            _fail(file, node, key, f"{value} is outside {self.low}..{self.high}")
        return value


class Duration:
    """Seconds: an integer, or a number with a suffix s, m, h or d (`90m`, `1h`)."""

    UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def check(self, file, node, key):
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":int"):
            value = _scalar(file, node, key, "int", "seconds")
        else:
            text = _scalar(file, node, key, "str", "seconds or a duration such as 1h")
            value = parse_duration(text)
            if value is None:
                _fail(file, node, key, f"{_short(text)} is not seconds or a duration such as 30m, 1h, 2d")
        if not 0 <= value <= 10 * 365 * 86400:
            _fail(file, node, key, f"{value} is outside 0..10 years")
        return value


def parse_duration(text: str) -> int | None:
    """'3600', '60m', '1h', '2d' -> seconds; None if it is none of those."""
    m = re.fullmatch(r"\s*([0-9]{1,12})\s*([smhd]?)\s*", str(text))
    return int(m.group(1)) * Duration.UNITS[m.group(2) or "s"] if m else None


class Choice:
    def __init__(self, *values: str, what: str = "value"):
        self.values, self.what = values, what

    def check(self, file, node, key):
        value = _scalar(file, node, key, "str", "one of " + ", ".join(self.values))
        if value not in self.values:
            _fail(file, node, key, f"unknown {self.what} {_short(value)} (known: {', '.join(self.values)})")
        return value


class Optional:
    def __init__(self, inner):
        self.inner = inner

    def check(self, file, node, key):
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return None
        return self.inner.check(file, node, key)


class ListOf:
    def __init__(self, item, single_ok: bool = False):
        self.item, self.single_ok = item, single_ok

    def check(self, file, node, key):
        if self.single_ok and isinstance(node, yaml.ScalarNode):
            return [self.item.check(file, node, key)]
        _plain(file, node, key)
        if not isinstance(node, yaml.SequenceNode):
            _fail(file, node, key, f"expected a list, got {_KIND[type(node)]}")
        return [self.item.check(file, n, f"{key}[{i}]") for i, n in enumerate(node.value)]


class NamedList(ListOf):
    """A list of records merged by their `name`: each name once per file."""

    def check(self, file, node, key):
        items = super().check(file, node, key)
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item["name"] in seen:
                _fail(file, node.value[i], f"{key}[{i}].name", f"{item['name']!r} is given twice in this list")
            seen.add(item["name"])
        return items


def _pairs(file, node, key):
    _plain(file, node, key)
    if not isinstance(node, yaml.MappingNode):
        _fail(file, node, key, f"expected a mapping, got {_KIND[type(node)]}")
    seen = set()
    for knode, vnode in node.value:
        name = _scalar(file, knode, key or "(top level)", "str", "a string key")
        if name in seen:
            _fail(file, knode, _join(key, name), "given twice")
        seen.add(name)
        yield knode, name, vnode


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


class MapOf:
    """A mapping with checked keys, e.g. per-architecture package lists."""

    def __init__(self, keys: Choice, values):
        self.keys, self.values = keys, values

    def check(self, file, node, key):
        out = {}
        for knode, name, vnode in _pairs(file, node, key):
            self.keys.check(file, knode, _join(key, name))
            out[name] = self.values.check(file, vnode, _join(key, name))
        return out


@dataclass(frozen=True)
class Field:
    type: Any
    default: Any = None
    merge: str = "replace"  # replace | union | record | by_name | union_map | services | own
    required: bool = False


class Record:
    """A mapping with a closed set of keys; returns only the keys given."""

    def __init__(self, **fields: Field):
        self.fields = fields

    def check(self, file, node, key):
        out = {}
        for knode, name, vnode in _pairs(file, node, key):
            field = self.fields.get(name)
            if field is None:
                _fail(file, knode, _join(key, name),
                      f"unknown key (allowed here: {', '.join(sorted(self.fields))})")
            out[name] = field.type.check(file, vnode, _join(key, name))
        for name, field in self.fields.items():
            if field.required and name not in out:
                _fail(file, node, _join(key, name), "required key is missing")
        return out


UNIT_SUFFIXES = (".service", ".socket", ".target", ".timer", ".path", ".mount", ".automount",
                 ".swap", ".slice", ".scope", ".device")


def unit_id(name: str) -> str:
    """The unit systemctl means: `ssh` and `ssh.service` are one unit."""
    return name if name.endswith(UNIT_SUFFIXES) else name + ".service"


class Services(Record):
    """`services: {enable: [...], disable: [...]}`: one state per unit.

    Within one file a unit is in one list only; across layers the later
    layer's state wins (see _merge_services)."""

    def check(self, file, node, key):
        out = super().check(file, node, key)
        enabled = {unit_id(u): u for u in out.get("enable", [])}
        for knode, name, vnode in _pairs(file, node, key):
            if name != "disable":
                continue
            for i, (unode, unit) in enumerate(zip(vnode.value, out["disable"])):
                if unit_id(unit) in enabled:
                    _fail(file, unode, f"{_join(key, name)}[{i}]",
                          f"{unit!r} is in services.enable of this file too; "
                          "a unit is either enabled or disabled")
        return out


# --- the settings table -----------------------------------------------------

PACKAGE = Str(r"[a-z0-9][a-z0-9+.\-]*(:[a-z0-9]+)?([=/][A-Za-z0-9+.~:\-]+)?", "a Debian package name")
PACKAGES = ListOf(PACKAGE)
# crypt(3) hashes as /etc/shadow holds them: only the characters of each
# format ([./0-9A-Za-z] between `$` separators), so a value can never carry a
# `:` or a newline into shadow.  yescrypt, sha-512/256 (with rounds=N), bcrypt,
# md5; `!` or `*` alone lock the password, `!` before a hash locks that hash.
_B64 = r"[./0-9A-Za-z]"
CRYPT_HASH = (rf"\$y\${_B64}+\${_B64}+\${_B64}+"
              rf"|\$[56]\$(rounds=[0-9]{{1,9}}\$)?{_B64}+\${_B64}+"
              rf"|\$2b\$[0-9]{{2}}\${_B64}+"
              rf"|\$1\${_B64}*\${_B64}+")
_CRYPT_HINT = ("a crypt(3) hash ($y$, $6$, $5$, $2b$ or $1$ and only the characters [./0-9A-Za-z] "
               "between the $ fields; make one with `mkpasswd -m sha-512`), '!' or '*' (locked)")
CRYPT = Str(rf"!?({CRYPT_HASH})|!|\*", _CRYPT_HINT)
# A user's password may also be "" (empty, not locked), but only with
# password_change_on_first_login: true (checked after merging, _check_users).
USER_PASSWORD = Str(rf"|!?({CRYPT_HASH})|!|\*", _CRYPT_HINT + ', or "" with password_change_on_first_login: true')
URL = Str(r"(https?|file)://\S+", "an http(s):// or file:// URL")
NAME = Str(r"[a-z_][a-z0-9_-]*", "a user/group name")
UNIT = Str(r"[A-Za-z0-9@_.:\\-]+", "a systemd unit name")

SECTION = Record(
    name=Field(Str(r"[A-Za-z0-9_-]+", "a section name (letters, digits, _ and -)"), required=True),
    packages=Field(PACKAGES, [], "union"),
    arch_packages=Field(MapOf(Choice(*ARCHITECTURES, what="architecture"), PACKAGES), {}, "union_map"),
    suite=Field(Str(r"[a-z0-9.\-/]+", "a suite name")),
    components=Field(ListOf(Str(r"[a-z0-9\-/]+", "a component name")), ["main"]),
    source=Field(URL),
    recommends=Field(Bool(), False),
)
USER = Record(
    name=Field(NAME, required=True),
    groups=Field(ListOf(NAME), [], "union"),
    sudo=Field(Bool(), False),
    password=Field(Optional(USER_PASSWORD)),
    password_change_on_first_login=Field(Bool(), False),
    shell=Field(Str(r"/[^\s:]+", "an absolute path without ':' or spaces"), "/bin/bash"),
)
SUITE_OR_PATH = Str(r"[A-Za-z0-9.\-_/]+", "a suite name (or an exact path ending in /)")
COMPONENT = Str(r"[a-z0-9\-/]+", "a component name")


class AptSourceEntry(Record):
    """One deb822 entry of image_sources: URIs, Suites, Components, Signed-By."""

    def check(self, file, node, key):
        out = super().check(file, node, key)
        lines = {name: (knode, vnode) for knode, name, vnode in _pairs(file, node, key)}
        for name in ("uris", "suites"):
            if not out[name]:
                _fail(file, lines[name][1], _join(key, name), "needs at least one entry")
        exact = [s for s in out["suites"] if s.endswith("/")]
        components = out.get("components", ["main"])
        if exact and len(exact) != len(out["suites"]):
            _fail(file, lines["suites"][1], _join(key, "suites"),
                  "mixes exact paths (ending in /) and suite names; give them as separate entries")
        if exact and components:
            _fail(file, lines.get("components", lines["suites"])[1], _join(key, "components"),
                  f"an exact path suite ({exact[0]}) takes no components: give components: []")
        if not exact and not components:
            _fail(file, lines["components"][1], _join(key, "components"),
                  "needs at least one component (or an exact path suite ending in /)")
        return out


APT_SOURCE = AptSourceEntry(
    uris=Field(ListOf(URL, single_ok=True), required=True),
    suites=Field(ListOf(SUITE_OR_PATH, single_ok=True), required=True),
    components=Field(ListOf(COMPONENT, single_ok=True), ["main"]),
    signed_by=Field(Optional(Str(r"/[^\s]+", "an absolute path of a keyring in the image"))),
)


class ImageSources:
    """`image_sources:` the deb822 entries the image's apt gets, or `none`
    (null: the default, the target's mirror and security mirror)."""

    def check(self, file, node, key):
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return None
        if isinstance(node, yaml.ScalarNode):
            value = _scalar(file, node, key, "str", "a list of sources or none")
            if value != "none":
                _fail(file, node, key, f"expected a list of sources or none, got {_short(value)}")
            return "none"
        return [_with_defaults(APT_SOURCE, e) for e in ListOf(APT_SOURCE).check(file, node, key)]


SIZE_RE = r"[1-9][0-9]*[MG]"


# `disk:` the flashable image's layout (stages/disk.py); sizes in MiB (M) or GiB (G).
DISK = Record(
    build=Field(Bool(), False),
    size=Field(Str(f"minimal|{SIZE_RE}", "minimal or a size such as 4G or 3500M"), "minimal"),
    boot_size=Field(Str(SIZE_RE, "a size such as 256M"), "256M"),
    system_size=Field(Str(f"auto|{SIZE_RE}", "auto or a size such as 1G"), "auto"),
    storage_size=Field(Str(f"none|rest|{SIZE_RE}", "none, rest or a size such as 1G"), "none"),
    power_of_two=Field(Optional(Bool())),
)


def size_mib(value: str) -> int:
    """'256M' -> 256, '2G' -> 2048 (values DISK accepted)."""
    return int(value[:-1]) * (1024 if value.endswith("G") else 1)


SETTINGS = Record(
    extends=Field(ListOf(Str(r"(?!\.\.?$)[A-Za-z0-9_.\-]+", "a target name"), single_ok=True), [], "own"),
    abstract=Field(Bool(), False, "own"),
    description=Field(Str(), "", "own"),
    architectures=Field(ListOf(Choice(*ARCHITECTURES, what="architecture"), single_ok=True)),
    suite=Field(Str(r"[a-z0-9.\-]+", "a suite name")),
    mirror=Field(URL),
    security_mirror=Field(Optional(URL)),
    apt_proxy=Field(Optional(URL)),
    image_sources=Field(ImageSources()),
    sections=Field(NamedList(SECTION), [], "by_name"),
    hostname=Field(Str(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", "a host name"), "hypersolid"),
    locale=Field(Str(r"[A-Za-z0-9_.@\-]+", "a locale name such as en_US.UTF-8"), "C.UTF-8"),
    timezone=Field(Str(r"[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*", "a zone name such as Europe/Berlin"), "Etc/UTC"),
    users=Field(NamedList(USER), [], "by_name"),
    root_password=Field(Optional(CRYPT)),
    services=Field(Services(enable=Field(ListOf(UNIT), []),
                            disable=Field(ListOf(UNIT), [])), {}, "services"),
    squashfs=Field(Record(compression=Field(Choice(*COMPRESSIONS, what="compression"), "zstd"),
                          level=Field(Optional(Int(1, 22)))), {}, "record"),
    image=Field(Choice(*IMAGE_TYPES, what="image type"), "img"),
    initramfs=Field(Record(
        compression=Field(Choice(*INITRAMFS_COMPRESSORS, what="compression"), "zstd"),
        modules=Field(Choice(*INITRAMFS_MODULES, what="module policy"), "most"),
        extra_modules=Field(ListOf(Str(r"[A-Za-z0-9_\-]+", "a kernel module name")), [], "union"),
    ), {}, "record"),
    kernel_cmdline=Field(ListOf(Str(r"\S+", "a kernel parameter (no spaces)")), [], "union"),
    hook_timeout=Field(Int(1, 7 * 24 * 3600), 3600),
    # Package versions (docs/reproducibility.md "Lock files"): a lock file next
    # to target.yaml ({arch} is replaced), how old the last resolution may get,
    # the keyring the resolver checks the sections' InRelease with.
    lock=Field(Optional(Str(r"(?!\.)(?:[A-Za-z0-9_.+-]|\{arch\})+",
                            "a file name next to target.yaml ({arch} allowed), e.g. packages-{arch}.lock")),
               None, "own"),
    index_max_age=Field(Optional(Duration())),
    apt_keyring=Field(Optional(Str(r"[^\s]+", "a keyring file (absolute, or relative to target.yaml)"))),
    raspberrypi=Field(Record(
        dtbs=Field(ListOf(Str(r"[A-Za-z0-9_.\-]+\.dtb", "a device tree file name such as bcm2711-rpi-4-b.dtb")),
                   [], "union"),
        consoles=Field(ListOf(Str(r"[A-Za-z0-9,]+", "a console such as ttyS1,115200")), ["tty0", "ttyS1,115200"]),
        config_txt=Field(ListOf(Str()), [], "union"),
    ), {}, "record"),
    disk=Field(DISK, {}, "record"),
    # Seconds since 1970 (UTC); null: the newest changelog date of the
    # installed packages (epoch.py).  The squashfs format holds 32 bits.
    source_date_epoch=Field(Optional(Int(0, 2**32 - 1))),
)
REQUIRED_TO_BUILD = ("architectures", "suite", "mirror", "sections")


# --- merging ------------------------------------------------------------------

def _union(a: list, b: list) -> list:
    return list(dict.fromkeys([*a, *b]))


def _merge_services(base: dict, child: dict) -> dict:
    """A later layer's enable or disable of a unit replaces an earlier
    layer's, so the result has each unit in one list at most."""
    state = {unit_id(u): ("enable", u) for u in base.get("enable", [])}
    state.update({unit_id(u): ("disable", u) for u in base.get("disable", [])})
    for verb in ("enable", "disable"):
        for unit in child.get(verb, []):
            if state.get(unit_id(unit), (None,))[0] != verb:
                state.pop(unit_id(unit), None)  # a unit whose state changes goes last
                state[unit_id(unit)] = (verb, unit)
    return {verb: [u for v, u in state.values() if v == verb] for verb in ("enable", "disable")}


def _merge_record(record: Record, base: dict, child: dict) -> dict:
    out = dict(base)
    for name, value in child.items():
        field = record.fields[name]
        if field.merge == "services":
            out[name] = _merge_services(out.get(name, {}), value)
        elif name not in out or field.merge == "replace":
            out[name] = value
        elif field.merge == "union":
            out[name] = _union(out[name], value)
        elif field.merge == "union_map":
            out[name] = {k: _union(out[name].get(k, []), value.get(k, [])) for k in {**out[name], **value}}
        elif field.merge == "record":
            out[name] = _merge_record(field.type, out[name], value)
        elif field.merge == "by_name":
            items = {item["name"]: item for item in out[name]}
            for item in value:
                items[item["name"]] = _merge_record(field.type.item, items.get(item["name"], {}), item)
            out[name] = list(items.values())
    return out


def _with_defaults(record: Record, values: dict) -> dict:
    out = {}
    for name, field in record.fields.items():
        value = values.get(name, field.default)
        if isinstance(field.type, Record):
            value = _with_defaults(field.type, value or {})
        elif isinstance(field.type, ListOf) and isinstance(field.type.item, Record):
            value = [_with_defaults(field.type.item, v) for v in value]
        out[name] = value
    return out


# --- the result ---------------------------------------------------------------

@dataclass(frozen=True)
class Section:
    name: str
    packages: tuple[str, ...]
    arch_packages: tuple[tuple[str, tuple[str, ...]], ...]
    suite: str
    components: tuple[str, ...]
    source: str
    recommends: bool = False  # multistrap's allowrecommends (bootstrap)

    def packages_for(self, arch: str) -> tuple[str, ...]:
        extra = dict(self.arch_packages).get(arch, ())
        return tuple(dict.fromkeys([*self.packages, *extra]))


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...]
    sudo: bool
    password: str | None  # None: locked; "": empty (only with password_change_on_first_login)
    shell: str
    password_change_on_first_login: bool = False  # shadow's last change 0


DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclass(frozen=True)
class AptSource:
    """One deb822 entry of the image's /etc/apt/sources.list.d."""
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None = None
    signed_by_if_present: bool = False  # the default entries: Signed-By only if the image has that keyring


def default_image_sources(mirror: str, suite: str, security_mirror: str | None,
                          sections: tuple[Section, ...]) -> tuple[AptSource, ...]:
    """The target's mirror with its suite and the components of the sections
    on that mirror, plus the security mirror's <suite>-security."""
    components = tuple(dict.fromkeys(c for s in sections if s.source == mirror for c in s.components)) or ("main",)
    out = [AptSource((mirror,), (suite,), components, DEBIAN_KEYRING, True)]
    if security_mirror:
        out.append(AptSource((security_mirror,), (f"{suite}-security",), components, DEBIAN_KEYRING, True))
    return tuple(out)


@dataclass(frozen=True)
class Target:
    name: str
    file: Path
    layers: tuple[Path, ...]  # target directories, generic first, this target last
    abstract: bool
    description: str
    architectures: tuple[str, ...]
    suite: str
    mirror: str
    security_mirror: str | None
    apt_proxy: str | None
    image_sources: tuple[AptSource, ...]  # empty: `none`
    sections: tuple[Section, ...]
    hostname: str
    locale: str
    timezone: str
    users: tuple[User, ...]
    root_password: str | None
    services_enable: tuple[str, ...]
    services_disable: tuple[str, ...]
    compression: str
    compression_level: int | None
    image: str
    initramfs_compression: str
    initramfs_modules: str
    initramfs_extra_modules: tuple[str, ...]
    kernel_cmdline: tuple[str, ...]
    hook_timeout: int                    # seconds a stage hook may run (not in any key)
    rpi_dtbs: tuple[str, ...]            # non-empty: a Raspberry Pi target (dist/<t>/boot/)
    rpi_consoles: tuple[str, ...]
    rpi_config_txt: tuple[str, ...]
    # disk: (stages/disk.py); power_of_two None in target.yaml: true on Pi targets (QEMU's SD model)
    disk_build: bool = False
    disk_size: str = "minimal"
    disk_boot_size: str = "256M"
    disk_system_size: str = "auto"
    disk_storage_size: str = "none"
    disk_power_of_two: bool = False
    lock: str | None = None              # absolute path of the lock file, `{arch}` not yet replaced
    index_max_age: int | None = None     # seconds; None: HYPERSOLID_INDEX_MAX_AGE, else 1 h
    apt_keyring: str | None = None       # absolute; None: the host's Debian archive keyring

    def lock_file(self, arch: str) -> Path | None:
        return Path(self.lock.replace("{arch}", arch)) if self.lock else None
    source_date_epoch: int | None = None  # None: from the packages' changelogs (epoch.py)

    def packages_for(self, arch: str) -> tuple[str, ...]:
        return tuple(p for s in self.sections for p in s.packages_for(arch))

    def has_kernel(self, arch: str) -> bool:
        """Whether the package lists name a kernel: only then is there an
        initramfs to build and a machine to boot."""
        return any(p.split("=")[0].split(":")[0].startswith("linux-image-")
                   for p in self.packages_for(arch))

    def hook_files(self, kind: str) -> list[Path]:
        """Hooks of one kind (e.g. 'pre-configure') from every layer, in run order.

        Order: by the number a name starts with (`9-x` before `10-y`), then
        by name, across layers; a later layer's hook replaces an earlier one
        of the same name.
        """
        found: dict[str, Path] = {}
        for layer in self.layers:
            d = layer / "hooks" / f"{kind}.d"
            if d.is_dir():
                for f in sorted(d.iterdir()):
                    if not f.name.startswith(".") and not f.name.endswith("~"):
                        found[f.name] = f
        return [found[n] for n in sorted(found, key=hook_order)]


def hook_order(name: str) -> tuple:
    """Numeric order, as the NN- prefixes mean; names without one go last."""
    digits = re.match(r"\d+", name)
    return (0, int(digits.group()), name) if digits else (1, 0, name)


class Buildable(list):
    """Project.buildable(): a list of the targets that load and are not
    abstract, by name, plus `errors`: {name: ConfigError} of the targets that
    do not load (but a target whose own file says `abstract: true` is left
    out; its error is its children's)."""

    def __init__(self, targets: list[Target], errors: dict[str, ConfigError]):
        super().__init__(targets)
        self.errors = errors


class Project:
    """A checkout: targets/, the generic rootfs/ overlay, and where builds go."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.targets_dir = self.root / "targets"

    @property
    def generic_overlay(self) -> Path:
        return self.root / "rootfs"

    def overlay_dirs(self, target: Target) -> list[Path]:
        return [self.generic_overlay] + [layer / "rootfs" for layer in target.layers]

    def target_names(self) -> list[str]:
        if not self.targets_dir.is_dir():
            return []
        return sorted(p.parent.name for p in self.targets_dir.glob("*/target.yaml"))

    def buildable(self) -> Buildable:
        """The targets to build, and the errors of those that do not load:
        a broken target is the concern of whoever builds it, not of every
        build (see Buildable)."""
        targets, errors = [], {}
        for name in self.target_names():
            try:
                target = self.load(name)
            except ConfigError as err:
                if not self._says_abstract(name):
                    errors[name] = err
                continue
            if not target.abstract:
                targets.append(target)
        return Buildable(targets, errors)

    def _says_abstract(self, name: str) -> bool:
        """Whether a target that does not load says itself it is only a base
        (then its error is its children's, and is reported with them)."""
        try:
            values, _ = _read_layer(_target_file(self.targets_dir.resolve(), name))
        except ConfigError:
            return False
        return values.get("abstract", False)

    def load(self, name: str) -> Target:
        return _load_target(self.targets_dir.resolve(), name)


def _target_file(targets_dir: Path, name: str) -> Path:
    return targets_dir / name / "target.yaml"


MAX_TARGET_BYTES = 256 << 10  # a target is settings, not data (and PyYAML reads ~100 kB/s)
MAX_FLOW_DEPTH = 64  # PyYAML's scanner is quadratic in [ { nesting: 5000 levels take minutes


def _read_text(file: Path) -> str:
    """The file's text: a regular file inside targets/, UTF-8, of sane size."""
    targets_dir = file.parent.parent
    try:
        real = file.resolve()
        inside = real.is_relative_to(targets_dir.resolve())
        if inside and not real.is_file():
            what = ("a directory" if real.is_dir() else "a symlink to a missing file" if not real.exists()
                    else "not a regular file")
            raise ConfigError(file, 1, "", f"cannot read target: {_display(file)} is {what}")
        size = real.stat().st_size if inside else 0
        data = real.read_bytes() if inside and size <= MAX_TARGET_BYTES else b""
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
        raise ConfigError(file, 1, "", f"cannot read target: {getattr(err, 'strerror', None) or err}") from None
    if not inside:
        raise ConfigError(file, 1, "", f"target.yaml resolves to {real}, outside "
                          f"{_display(targets_dir)}/ (a symlink?): targets are read from there only")
    if size > MAX_TARGET_BYTES:
        raise ConfigError(file, 1, "", f"target.yaml is {size} bytes; more than "
                          f"{MAX_TARGET_BYTES} is not a target")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError(file, line, "", f"not UTF-8 text (byte 0x{data[err.start]:02x} at column "
                          f"{column}); save the file as UTF-8") from None


class _Loader(yaml.SafeLoader):
    """Composes nodes only (no tag ever constructs an object) and refuses
    aliases: an alias makes one node appear in many places (an alias bomb,
    a list that contains itself) and its errors name the anchor's line, not
    the use; targets share settings through `extends` instead."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor}: YAML anchors and aliases are not supported "
                "in targets (share settings with extends)", event.start_mark)
        return super().compose_node(parent, index)


_QUOTED_OR_COMMENT = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|(?:^|(?<=\s))#[^\n]*""", re.M)


def _check_nesting(file: Path, text: str) -> None:
    """Refuse [ { nesting deeper than MAX_FLOW_DEPTH before PyYAML sees it
    (brackets in quotes and comments do not count; the count errs high)."""
    blanked = _QUOTED_OR_COMMENT.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), text)
    depth = 0
    for m in re.finditer(r"[\[\]{}]", blanked):
        depth = depth + 1 if m.group() in "[{" else max(depth - 1, 0)
        if depth > MAX_FLOW_DEPTH:
            raise ConfigError(file, text.count("\n", 0, m.start()) + 1, "",
                              f"invalid YAML: [ and {{ nested more than {MAX_FLOW_DEPTH} deep")


def _compose(file: Path, text: str) -> yaml.Node | None:
    """The YAML node tree, nothing constructed yet."""
    _check_nesting(file, text)
    try:
        return yaml.compose(text, Loader=_Loader)
    except yaml.reader.ReaderError as err:
        line = text[:err.position].count("\n") + 1
        raise ConfigError(file, line, "", f"invalid YAML: character #x{err.character:04x}: "
                          f"{err.reason}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        line = mark.line + 1 if mark else 1
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        if "'\\t'" in problem:
            problem += " (indent with spaces, not tabs)"
        raise ConfigError(file, line, "", f"invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(file, 1, "", "invalid YAML: nested too deeply") from None


@lru_cache(maxsize=None)
def _read_layer(file: Path) -> tuple[dict, dict]:
    """Checked values of one file, plus the line of each top-level key."""
    node = _compose(file, _read_text(file))
    if node is None:
        return {}, {}
    values = SETTINGS.check(file, node, "")
    lines = {name: k.start_mark.line + 1 for k, name, _ in _pairs(file, node, "")}
    return values, lines


def _linearise(targets_dir: Path, name: str, chain: tuple[str, ...] = ()) -> list[str]:
    file = _target_file(targets_dir, name)
    values, lines = _read_layer(file)
    order: list[str] = []
    for parent in values.get("extends", []):
        if parent == name or parent in chain:
            raise ConfigError(file, lines["extends"], "extends",
                              f"inheritance cycle: {' -> '.join([*chain, name, parent])}")
        if not os.path.lexists(_target_file(targets_dir, parent)):
            known = ", ".join(p.parent.name for p in sorted(targets_dir.glob("*/target.yaml")))
            raise ConfigError(file, lines["extends"], "extends",
                              f"no target {parent!r} (no {_display(_target_file(targets_dir, parent))}; known: {known})")
        for n in _linearise(targets_dir, parent, (*chain, name)):
            if n not in order:
                order.append(n)
    return [*order, name]


@lru_cache(maxsize=None)
def _load_target(targets_dir: Path, name: str) -> Target:
    file = _target_file(targets_dir, name)
    if not os.path.lexists(file):  # anything else there is _read_layer's to explain
        known = ", ".join(p.parent.name for p in sorted(targets_dir.glob("*/target.yaml")))
        raise ConfigError(file, 0, "", f"no such target {name!r} (known: {known or 'none'})")
    order = _linearise(targets_dir, name)
    merged: dict = {}
    for layer in order:
        values, _ = _read_layer(_target_file(targets_dir, layer))
        merged = _merge_record(SETTINGS, merged, {k: v for k, v in values.items()
                                                  if SETTINGS.fields[k].merge != "own"})
    own, lines = _read_layer(file)
    merged.update({k: v for k, v in own.items() if SETTINGS.fields[k].merge == "own"})
    v = _with_defaults(SETTINGS, merged)
    if not v["abstract"]:
        for key in REQUIRED_TO_BUILD:
            if not v[key]:
                raise ConfigError(file, 1, key, "required to build this target, but neither it nor "
                                  f"the targets it extends ({', '.join(order[:-1]) or 'none'}) set it "
                                  "(mark it `abstract: true` if it is only a base)")
    _check_users(targets_dir, order, v["users"])
    if v["disk"]["storage_size"] == "rest" and v["disk"]["size"] == "minimal":
        raise ConfigError(file, lines.get("disk", 1), "disk.storage_size",
                          "rest needs a total size (size: minimal leaves no rest): give disk.size, e.g. 4G")
    if v["lock"] and "{arch}" not in v["lock"] and len(set(v["architectures"] or ())) > 1:
        raise ConfigError(file, lines["lock"], "lock", f"one file for {len(set(v['architectures']))} "
                          "architectures: put {arch} in the name (packages-{arch}.lock)")
    sections = tuple(
        Section(name=s["name"], packages=tuple(s["packages"]),
                arch_packages=tuple(sorted((a, tuple(p)) for a, p in s["arch_packages"].items())),
                suite=s["suite"] or v["suite"], components=tuple(s["components"]),
                source=s["source"] or v["mirror"], recommends=s["recommends"])
        for s in v["sections"])
    if v["image_sources"] == "none":
        image_sources = ()
    elif v["image_sources"] is None:
        image_sources = default_image_sources(v["mirror"] or "", v["suite"] or "", v["security_mirror"], sections)
    else:
        image_sources = tuple(AptSource(uris=tuple(e["uris"]), suites=tuple(e["suites"]),
                                        components=tuple(e["components"]), signed_by=e["signed_by"])
                              for e in v["image_sources"])
    return Target(
        name=name, file=file,
        layers=tuple(targets_dir / n for n in order),
        abstract=v["abstract"], description=v["description"],
        architectures=tuple(dict.fromkeys(v["architectures"] or ())),
        suite=v["suite"] or "", mirror=v["mirror"] or "",
        security_mirror=v["security_mirror"], apt_proxy=v["apt_proxy"],
        image_sources=image_sources, sections=sections,
        hostname=v["hostname"], locale=v["locale"], timezone=v["timezone"],
        users=tuple(User(name=u["name"], groups=tuple(u["groups"]), sudo=u["sudo"],
                         password=u["password"], shell=u["shell"],
                         password_change_on_first_login=u["password_change_on_first_login"])
                    for u in v["users"]),
        root_password=v["root_password"],
        services_enable=tuple(v["services"]["enable"]),
        services_disable=tuple(v["services"]["disable"]),
        compression=v["squashfs"]["compression"],
        compression_level=v["squashfs"]["level"],
        image=v["image"],
        initramfs_compression=v["initramfs"]["compression"],
        initramfs_modules=v["initramfs"]["modules"],
        initramfs_extra_modules=tuple(v["initramfs"]["extra_modules"]),
        kernel_cmdline=tuple(v["kernel_cmdline"]),
        hook_timeout=v["hook_timeout"],
        rpi_dtbs=tuple(v["raspberrypi"]["dtbs"]),
        rpi_consoles=tuple(v["raspberrypi"]["consoles"]),
        rpi_config_txt=tuple(v["raspberrypi"]["config_txt"]),
        disk_build=v["disk"]["build"], disk_size=v["disk"]["size"], disk_boot_size=v["disk"]["boot_size"],
        disk_system_size=v["disk"]["system_size"], disk_storage_size=v["disk"]["storage_size"],
        disk_power_of_two=(bool(v["raspberrypi"]["dtbs"]) if v["disk"]["power_of_two"] is None
                           else v["disk"]["power_of_two"]),
        lock=str(file.parent / v["lock"]) if v["lock"] else None,
        index_max_age=v["index_max_age"],
        apt_keyring=str(file.parent / v["apt_keyring"]) if v["apt_keyring"] else None,
        source_date_epoch=v["source_date_epoch"],
    )


def _locked(password: str | None) -> bool:
    return password is None or password == "*" or password.startswith("!")


def _check_users(targets_dir: Path, order: list[str], users: list[dict]) -> None:
    """Password rules that span layers (a password in one target, the
    first-login change in another): the error names the layer and key that
    made the merged user wrong."""
    for user in users:
        wrong = None
        if user["password"] == "" and not user["password_change_on_first_login"]:
            wrong = ("password", 'an empty password needs password_change_on_first_login: true '
                     "(or give a crypt hash; absent: locked)")
        elif user["password_change_on_first_login"] and _locked(user["password"]):
            shown = "absent (locked)" if user["password"] is None else repr(user["password"])
            wrong = ("password_change_on_first_login",
                     f"the account is locked (password {shown}): a locked account cannot log in to "
                     'change it; give password: "" (empty) or a crypt hash')
        if wrong is None:
            continue
        keys = ("password", "password_change_on_first_login")
        for layer in reversed(order):  # the last layer that set either key made it so
            file = _target_file(targets_dir, layer)
            values, _ = _read_layer(file)
            for i, item in enumerate(values.get("users", [])):
                if item["name"] == user["name"] and any(k in item for k in keys):
                    key = wrong[0] if wrong[0] in item else next(k for k in keys if k in item)
                    raise ConfigError(file, _user_key_line(file, i, key), f"users[{i}].{key}", wrong[1])


def _user_key_line(file: Path, index: int, key: str) -> int:
    """The line of users[index].key in a file (only on the error path)."""
    node = _compose(file, _read_text(file))
    for _, name, vnode in _pairs(file, node, ""):
        if name == "users":
            for knode, kname, _ in _pairs(file, vnode.value[index], "users"):
                if kname == key:
                    return knode.start_mark.line + 1
    return 1


def clear_caches() -> None:
    """Forget parsed files (tests edit targets within one process)."""
    _read_layer.cache_clear()
    _load_target.cache_clear()

