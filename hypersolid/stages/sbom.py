"""sbom: the image's software bill of materials, CycloneDX 1.6 and SPDX 2.3.

Made by debsbom (Siemens) from what the image itself holds, read back from
the squashfs: the dpkg status and the packages' usr/share/doc/*/copyright
(DEP-5 licenses), so a package or copyright file an overlay or a hook
changed is the one described.  Then, with the format libraries:
- each installed package gets the sha256 of its .deb (from the configure stage's
  package lock), its architecture and source package, and its source
  package's license (debsbom puts licenses on source packages only);
- the root component is the system image, and it contains every package;
- SPDX packages and relationships are sorted (debsbom's order follows
  Python's hash seed).
Timestamp: the build's SOURCE_DATE_EPOCH; CycloneDX serial number and SPDX
namespace: derived from a digest of everything read, so the same image
contents give the same bytes.

Keyed on squashfs (the image), so an overlay edit re-runs it; debsbom's ~10 s
run is then skipped when the digest of what it reads is unchanged (the edit
did not touch a package or a copyright file): the documents are reused
from `<cache>/sbom-content/<digest>/`.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

from .. import lockfile
from ..cache import describe_tree, digest_file, digest_json, remove_tree
from ..dpkg import host_version
from ..epoch import source_date_epoch
from ..run import Log, output, run
from . import Stage, Unit, register
from .squashfs import image_name

CDX_SCHEMA = "1.6"
CDX, SPDX = "sbom.cdx.json", "sbom.spdx.json"
MEMO = "sbom-content"
SUPPLIER = "hypersolid"
# What debsbom reads of a root (debsbom/generate/rootfs.py); apt lists are
# removed from the image (squashfs LEFTOVERS), so sources come from dpkg.
METADATA = ("var/lib/dpkg/status", "var/lib/dpkg/arch-native", "var/lib/apt/extended_states")
DOC = "usr/share/doc"


def library_versions() -> dict[str, str]:
    return {p: version(p) for p in ("debsbom", "cyclonedx-python-lib", "spdx-tools", "license-expression")}


@contextmanager
def warnings_to(log: Log):
    """debsbom's logged warnings ("no supplier for linux@...") into the
    stage's log: without a handler Python prints them on the console, in
    the middle of doit's lines and the live progress."""
    logger = logging.getLogger("debsbom")
    handler = logging.FileHandler(log.path)
    handler.setFormatter(logging.Formatter("# debsbom %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.propagate = propagate


@register
class Sbom(Stage):
    name = "sbom"
    upstream = ("configure", "squashfs")
    helpers = ("hypersolid.lockfile", "hypersolid.epoch")
    doc = "SBOM of the system image: CycloneDX 1.6 and SPDX 2.3 (debsbom), .deb sha256 from the lock"

    def computed(self, unit: Unit) -> dict:
        return {"arch": unit.arch, "cdx_schema": CDX_SCHEMA, "libraries": library_versions(),
                "squashfs_tools": host_version("squashfs-tools")}

    def build(self, unit: Unit, out: Path, log: Log) -> None:
        a, name = unit.arch, unit.target.name
        root = out / ".root"
        read_metadata(unit.output("squashfs") / image_name(a), root, log)
        lock = unit.output("configure", "packages.lock")
        sde = source_date_epoch(unit)
        content = digest_json({"tree": describe_tree(root), "lock": digest_file(lock), "epoch": sde,
                               "target": name, "arch": a, "image": image_name(a),
                               "inputs": self.static_inputs(unit)})
        memo = unit.cache.lookup(MEMO, content)
        # Which memo this build used, beside the stages' key files: gc keeps the last build's entries.
        memo_key = unit.build_dir / f"{MEMO}.key"
        memo_key.parent.mkdir(parents=True, exist_ok=True)
        memo_key.write_text(content + "\n")
        if memo is not None:
            log.note(f"# what the SBOM reads is unchanged: reusing {memo}")
            for f in (CDX, SPDX):
                shutil.copyfile(memo / f, out / f)
        else:
            try:
                with warnings_to(log):
                    cdx, spdx = generate(root, name, a, lockfile.read(lock), sde, content)
            except Exception as err:  # a library's error: one line, with the log, not a traceback
                log.note(f"# {type(err).__module__}.{type(err).__name__}: {err}")
                raise log.fail(f"debsbom could not describe the image: {err}") from None
            with unit.cache.publish(MEMO, content, {"stage": MEMO, "target": name, "arch": a}) as work:
                (work / CDX).write_text(cdx)
                (work / SPDX).write_text(spdx)
            (out / CDX).write_text(cdx)
            (out / SPDX).write_text(spdx)
        remove_tree(root)


def read_metadata(image: Path, root: Path, log: Log) -> None:
    """What debsbom reads, from the image: the dpkg database, the copyright
    files, and the usr/share/doc/<pkg> links to another package's directory
    (made relative inside root, or dropped if they point out of it, so no
    host file is ever read)."""
    listing = output(["unsquashfs", "-lln", "-max-depth", "4", image, DOC], log)
    links = re.findall(rf"^l\S+ .* squashfs-root/({DOC}/[^/ ]+) -> (.+)$", listing, re.M)
    paths = [*METADATA, f"{DOC}/*/copyright", *(p for p, _ in links)]
    run(["unsquashfs", "-d", root, "-no-progress", "-quiet", "-no-xattrs", image, *paths], log, contain=False)
    real_root = os.path.realpath(root)
    for rel, target in links:
        link = root / rel
        dest = os.path.normpath(os.path.join(root, target.lstrip("/")) if target.startswith("/")
                                else os.path.join(link.parent, target))
        link.unlink(missing_ok=True)
        if os.path.commonpath([real_root, os.path.realpath(dest)]) == real_root and os.path.isdir(dest):
            link.symlink_to(os.path.relpath(dest, link.parent))


@functools.lru_cache(maxsize=None)
def _spdx_licensing():
    """license_expression rebuilds its SPDX index (~60 ms) on every call,
    which debsbom makes once per copyright file: 10 s of a 12 s run."""
    from license_expression import get_spdx_licensing
    return get_spdx_licensing()


def generate(root: Path, target: str, arch: str, lock: list, sde: int, content: str) -> tuple[str, str]:
    """(CycloneDX JSON, SPDX JSON) of the packages installed in root."""
    import debsbom.apt.copyright
    from debsbom.generate.generate import Debsbom
    from debsbom.sbom import SBOMType
    debsbom.apt.copyright.get_spdx_licensing = _spdx_licensing

    serial = uuid.uuid5(uuid.NAMESPACE_URL, f"hypersolid:sbom:{content}")  # a valid UUID, from the digest
    sbom = Debsbom(distro_name=target, root=root, distro_arch=arch, distro_supplier=SUPPLIER,
                   distro_summary=f"the system image {image_name(arch)} of the hypersolid target {target}",
                   spdx_namespace=urlparse(f"https://hypersolid.invalid/sbom/{target}/{arch}/{serial}"),
                   cdx_serialnumber=serial, timestamp=datetime.fromtimestamp(sde, timezone.utc),
                   with_licenses=True, cdx_schema_version=CDX_SCHEMA)
    sbom.scan()
    hashes = {(e.package, e.version, e.architecture): e.sha256 for e in lock}
    return (cyclonedx_json(sbom.generate(SBOMType.CycloneDX), arch, hashes),
            spdx_json(sbom.generate(SBOMType.SPDX), arch, hashes))


def _purl_parts(purl: str) -> tuple[str, str, str]:
    """(name, version, arch) of a pkg:deb purl."""
    from packageurl import PackageURL
    p = PackageURL.from_string(purl)
    return p.name, p.version, p.qualifiers.get("arch", "")


def cyclonedx_json(bom, arch: str, hashes: dict) -> str:
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.output import make_outputter
    from cyclonedx.schema import OutputFormat, SchemaVersion

    by_ref = {str(c.bom_ref): c for c in bom.components}
    deps = {str(d.ref): [str(x.ref) for x in d.dependencies] for d in bom.dependencies}
    for c in bom.components:
        if not c.purl:
            continue
        name, ver, a = _purl_parts(str(c.purl))
        if a == "source":
            continue
        sha = hashes.get((name, ver, a))
        if sha:
            c.hashes.add(HashType(alg=HashAlgorithm.SHA_256, content=sha))
        c.properties.add(Property(name="hypersolid:deb:architecture", value=a))
        src = next((by_ref[r] for r in deps.get(str(c.bom_ref), []) if r in by_ref and by_ref[r].purl
                    and by_ref[r].purl.qualifiers.get("arch") == "source"), None)
        if src is not None:
            c.properties.add(Property(name="hypersolid:deb:source", value=f"{src.name} {src.version}"))
            if not c.licenses and src.licenses:
                c.licenses.update(src.licenses)
    root = bom.metadata.component
    root.properties.add(Property(name="hypersolid:image", value=image_name(arch)))
    text = make_outputter(bom, OutputFormat.JSON, SchemaVersion.from_version(CDX_SCHEMA)).output_as_string(indent=1)
    return json.dumps(json.loads(text), indent=1, sort_keys=True) + "\n"


def spdx_json(doc, arch: str, hashes: dict) -> str:
    import io
    from spdx_tools.spdx.model import Checksum, ChecksumAlgorithm, Relationship, RelationshipType
    from spdx_tools.spdx.writer.json.json_writer import write_document_to_stream

    packages = {p.spdx_id: p for p in doc.packages}
    root_id = next(r.related_spdx_element_id for r in doc.relationships
                   if r.relationship_type == RelationshipType.DESCRIBES)
    sources = {r.spdx_element_id: packages.get(r.related_spdx_element_id) for r in doc.relationships
               if r.relationship_type == RelationshipType.GENERATED_FROM}
    sources.update({r.related_spdx_element_id: packages.get(r.spdx_element_id) for r in doc.relationships
                    if r.relationship_type == RelationshipType.GENERATES})
    contains = []
    for p in doc.packages:
        purl = next((r.locator for r in p.external_references if r.reference_type == "purl"), "")
        if not purl or p.spdx_id == root_id:
            continue
        name, ver, a = _purl_parts(purl)
        if a == "source":
            continue
        sha = hashes.get((name, ver, a))
        if sha:
            p.checksums = [Checksum(ChecksumAlgorithm.SHA256, sha)]
        src = sources.get(p.spdx_id)
        p.source_info = f"architecture {a}" + (f"; built from the source package {src.name} {src.version}"
                                               if src else "")
        if src is not None and _noassertion(p.license_declared) and not _noassertion(src.license_declared):
            p.license_declared = src.license_declared
        contains.append(Relationship(root_id, RelationshipType.CONTAINS, p.spdx_id))
    packages[root_id].file_name = image_name(arch)
    doc.packages.sort(key=lambda p: p.spdx_id)
    doc.relationships = sorted([*doc.relationships, *contains], key=lambda r: (
        r.spdx_element_id, r.relationship_type.name, str(r.related_spdx_element_id), r.comment or ""))
    out = io.StringIO()
    write_document_to_stream(doc, out, validate=False)
    return json.dumps(json.loads(out.getvalue()), indent=1, sort_keys=True) + "\n"


def _noassertion(value) -> bool:
    from spdx_tools.spdx.model import SpdxNoAssertion
    return value is None or isinstance(value, SpdxNoAssertion)
