"""The SBOM every build writes: dist/<t>/sbom-<arch>.cdx.json (CycloneDX 1.6)
and sbom-<arch>.spdx.json (SPDX 2.3), checked with the formats' own
libraries on the built default target."""
from __future__ import annotations

import json
import shutil

import pytest
from packageurl import PackageURL

from hypersolid import lockfile
from tests.conftest import TestProject, needs_root_and_tools, tiny_target

pytestmark = pytest.mark.integration


def tsv(dist) -> set[tuple[str, str, str]]:
    return {tuple(line.split("\t")) for line in (dist / "packages-amd64.tsv").read_text().splitlines()}


def binaries_cdx(bom: dict) -> list[dict]:
    return [c for c in bom["components"] if PackageURL.from_string(c["purl"]).qualifiers.get("arch") != "source"]


def binaries_spdx(doc: dict) -> list[dict]:
    root = doc["documentDescribes"][0] if doc.get("documentDescribes") else next(
        r["relatedSpdxElement"] for r in doc["relationships"] if r["relationshipType"] == "DESCRIBES")
    return [p for p in doc["packages"] if p["SPDXID"] != root and "arch=source" not in purl_of(p)]


def purl_of(p: dict) -> str:
    return next((r["referenceLocator"] for r in p.get("externalRefs", []) if r["referenceType"] == "purl"), "")


@pytest.fixture(scope="module")
def dist(default_project):
    return default_project.root / "dist/qemu-amd64"


def test_cyclonedx_sbom_validates_against_the_1_6_schema(dist):
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator
    text = (dist / "sbom-amd64.cdx.json").read_text()
    assert json.loads(text)["specVersion"] == "1.6"
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None


def test_spdx_sbom_validates_as_2_3(dist):
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document
    doc = parse_file(str(dist / "sbom-amd64.spdx.json"))
    assert doc.creation_info.spdx_version == "SPDX-2.3"
    assert validate_full_spdx_document(doc) == []


def test_one_entry_per_installed_package_with_version_purl_and_deb_sha256(dist):
    installed = tsv(dist)
    lock = {(e.package, e.version, e.architecture): e.sha256 for e in lockfile.read(dist / "packages-amd64.lock")}
    cdx = binaries_cdx(json.loads((dist / "sbom-amd64.cdx.json").read_text()))
    spdx = binaries_spdx(json.loads((dist / "sbom-amd64.spdx.json").read_text()))
    assert len(cdx) == len(spdx) == len(installed)
    for c in cdx:
        p = PackageURL.from_string(c["purl"])
        assert (p.type, p.namespace) == ("deb", "debian") and p.version == c["version"]
        row = (c["name"], c["version"], p.qualifiers["arch"])
        assert row in installed
        assert p.name == c["name"]
        props = {x["name"]: x["value"] for x in c.get("properties", [])}
        assert props["hypersolid:deb:architecture"] == row[2] and props["hypersolid:deb:source"]
        assert c["supplier"]["name"]
        if row in lock:
            assert c["hashes"] == [{"alg": "SHA-256", "content": lock[row]}]
    assert sum(1 for c in cdx if "hashes" in c) == len(installed.intersection(lock)) > 0.9 * len(installed)
    for p in spdx:
        assert p["versionInfo"] and PackageURL.from_string(purl_of(p)).name == p["name"]
        assert p["licenseDeclared"] and p["supplier"] and "source package" in p["sourceInfo"]


def test_licenses_come_from_dep5_copyright_files(dist):
    cdx = {c["name"]: c for c in binaries_cdx(json.loads((dist / "sbom-amd64.cdx.json").read_text()))}
    spdx = {p["name"]: p for p in binaries_spdx(json.loads((dist / "sbom-amd64.spdx.json").read_text()))}
    # base-files' copyright is not machine-readable; adduser's is DEP-5 (GPL-2+).  A DEP-5 file
    # naming a key SPDX does not know (dash: "public-domain") is NOASSERTION as well (debsbom).
    for name in ("base-files", "dash"):
        assert "licenses" not in cdx[name] and spdx[name]["licenseDeclared"] == "NOASSERTION"
    assert cdx["adduser"]["licenses"] == [{"acknowledgement": "declared", "expression": "GPL-2.0-or-later"}]
    assert spdx["adduser"]["licenseDeclared"] == "GPL-2.0-or-later"


def test_the_image_is_the_root_and_contains_every_package(dist):
    bom = json.loads((dist / "sbom-amd64.cdx.json").read_text())
    root = bom["metadata"]["component"]
    assert {"name": "hypersolid:image", "value": "system-amd64.img"} in root["properties"]
    [deps] = [d for d in bom["dependencies"] if d["ref"] == root["bom-ref"]]
    assert {c["bom-ref"] for c in binaries_cdx(bom)} <= set(deps["dependsOn"])
    doc = json.loads((dist / "sbom-amd64.spdx.json").read_text())
    root_id = next(p["SPDXID"] for p in doc["packages"] if p.get("packageFileName") == "system-amd64.img")
    contained = {r["relatedSpdxElement"] for r in doc["relationships"]
                 if r["spdxElementId"] == root_id and r["relationshipType"] == "CONTAINS"}
    assert contained == {p["SPDXID"] for p in binaries_spdx(doc)}


def test_sbom_timestamp_is_the_builds_source_date_epoch(dist, default_project):
    from datetime import datetime, timezone
    sde = int((default_project.entry("bootstrap", "qemu-amd64") / "source-date-epoch").read_text())
    stamp = datetime.fromtimestamp(sde, timezone.utc)
    assert datetime.fromisoformat(json.loads((dist / "sbom-amd64.cdx.json").read_text())["metadata"]["timestamp"]) \
        == stamp
    created = json.loads((dist / "sbom-amd64.spdx.json").read_text())["creationInfo"]["created"]
    assert datetime.fromisoformat(created.replace("Z", "+00:00")) == stamp


def test_two_runs_give_identical_bytes_whatever_the_hash_seed(dist, default_project):
    p = default_project
    before = {n: (dist / n).read_bytes() for n in ("sbom-amd64.cdx.json", "sbom-amd64.spdx.json")}
    shutil.rmtree(p.entry("sbom", "qemu-amd64"))
    shutil.rmtree(p.cache / "sbom-content")  # no reuse: debsbom runs again
    r = p.doit("bootfiles:qemu-amd64", env={"PYTHONHASHSEED": "12345"})
    assert "sbom:qemu-amd64" in r.executed
    assert "reusing" not in (p.root / "build/qemu-amd64/amd64/logs/sbom.log").read_text()
    assert {n: (dist / n).read_bytes() for n in before} == before


def test_an_overlay_edit_reuses_the_sbom_without_running_debsbom(tmp_path, shared_cache):
    """The stage is keyed on the image, but an edit that touches no package
    or copyright file gets the same documents from the content memo."""
    needs_root_and_tools()
    p = TestProject(tmp_path, shared_cache)
    p.target("one", tiny_target("netbase"))
    p.write("targets/one/rootfs/etc/motd", "first\n")
    p.doit("bootfiles:one")
    first = (p.root / "dist/one/sbom-amd64.cdx.json").read_bytes()
    p.write("targets/one/rootfs/etc/motd", "second\n")
    r = p.doit("bootfiles:one")
    assert {"squashfs:one", "sbom:one"} <= r.executed
    assert "reusing" in (p.root / "build/one/amd64/logs/sbom.log").read_text()
    assert (p.root / "dist/one/sbom-amd64.cdx.json").read_bytes() == first
