"""Reading a tree's dpkg database (no dpkg needed: works for any architecture),
and the host's package versions."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .run import output


HOST_STATUS = Path("/var/lib/dpkg/status")


@lru_cache(maxsize=None)
def _host_status() -> dict[str, list[dict[str, str]]]:
    """The host's dpkg records by package name, read once per run."""
    out: dict[str, list[dict[str, str]]] = {}
    try:
        text = HOST_STATUS.read_text(errors="replace")
    except OSError:
        return out
    for record in _records(text):
        out.setdefault(record.get("Package", ""), []).append(record)
    return out


@lru_cache(maxsize=None)  # once per run: task creation is on the no-op path
def host_version(package: str) -> str:
    """Version of a host tool's package; part of the keys of stages it shapes.
    A missing package is a version too ("not installed"): the stage that
    runs the tool then says what is not installed, in one line.  Read from
    dpkg's status file (a dpkg-query each was ~70 ms of a no-op build);
    dpkg-query answers what that does not settle (several architectures)."""
    records = _host_status().get(package, [])
    if len(records) == 1 and records[0].get("Status", "").endswith(" installed"):
        return records[0].get("Version", "") or "not installed"
    return output(["dpkg-query", "-W", "-f=${Version}", package], default="").strip() or "not installed"


def _records(text: str) -> list[dict[str, str]]:
    records, current = [], {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                records.append(current)
            current = {}
        elif not line[0].isspace() and ":" in line:
            k, v = line.split(":", 1)
            current[k] = v.strip()
    if current:
        records.append(current)
    return records


def read_status(tree: Path) -> list[dict[str, str]]:
    """Package records of the tree's dpkg status file."""
    return _records((tree / "var/lib/dpkg/status").read_text(errors="replace"))


def write_package_manifest(tree: Path, dest: Path) -> None:
    """name, version, architecture of every installed package, tab-separated."""
    packages = sorted((r["Package"], r.get("Version", ""), r.get("Architecture", ""))
                      for r in read_status(tree) if r.get("Status") == "install ok installed")
    dest.write_text("".join("\t".join(p) + "\n" for p in packages))
