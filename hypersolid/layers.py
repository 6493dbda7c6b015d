"""The two layers of a package set: the base, and the top packages nothing
else in the set depends on.

Adding a package to a target is the most common change after editing a
file, and with one flat `dpkg --configure -a` it costs a whole bootstrap
and configure.  So the configured tree is made in two steps, always the
same two whatever the cache holds: the base (every package some other
package of the set depends on, the Essential and Priority: required ones)
is unpacked and configured as before, then the top packages are installed
onto it with `dpkg -i`, as an administrator adds a package.  A package
added that depends only on what the set already has (`less`, `nano`,
`htop`) changes the top layer only: the configured base is reused.

The base is closed under dependencies (a dependency of any package is
depended on, so it is never a top package), so it configures alone; the top
packages depend on nothing but the base.  Which packages are on top is a
property of the set alone, recorded in the lock by the resolver (the one
place with the archive's Depends fields), never of what was built before:
a cold build and an incremental one make the same tree.
"""
from __future__ import annotations

import re

# Kept in the base whatever depends on them: configure merges /usr natively
# only when usrmerge is in the tree it configures.
ALWAYS_BASE = frozenset({"usrmerge", "usr-is-merged"})
DEPENDENCY_FIELDS = ("Depends", "Pre-Depends")


def names(field: str) -> list[str]:
    """Every package name a Depends-style field mentions, each alternative
    too: `a (>= 1) | b:any, c` -> [a, b, c]."""
    out = []
    for clause in field.split(","):
        for alternative in clause.split("|"):
            m = re.match(r"\s*([a-z0-9][a-z0-9+.-]*)", alternative)
            if m:
                out.append(m.group(1))
    return out


def parse_stanzas(text: str) -> dict[str, dict[str, str]]:
    """Package name -> its fields, from `apt-cache show` output (the first
    stanza of a name wins: the same version may be listed by two sources)."""
    out: dict[str, dict[str, str]] = {}
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        last = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and last:
                fields[last] += " " + line.strip()
            elif ":" in line:
                last, _, value = line.partition(":")
                fields[last] = value.strip()
        if "Package" in fields:
            out.setdefault(fields["Package"], fields)
    return out


def top_packages(stanzas: dict[str, dict[str, str]]) -> set[str]:
    """The packages of the set (name -> control fields) that no other one
    depends on (Depends or Pre-Depends, any alternative, directly or through
    a Provides) and that are neither Essential nor Priority: required."""
    providers: dict[str, set[str]] = {}
    for name, fields in stanzas.items():
        providers.setdefault(name, set()).add(name)
        for virtual in names(fields.get("Provides", "")):
            providers.setdefault(virtual, set()).add(name)
    depended: set[str] = set()
    for name, fields in stanzas.items():
        for field in DEPENDENCY_FIELDS:
            for wanted in names(fields.get(field, "")):
                depended |= providers.get(wanted, set()) - {name}
    return {name for name, fields in stanzas.items()
            if name not in depended and name not in ALWAYS_BASE
            and fields.get("Essential", "no") != "yes" and fields.get("Priority") != "required"}
