"""A section's recommends: true lets multistrap install Recommends; the
package list in dist shows what that added."""
from __future__ import annotations

import pytest

from conftest import TestProject, needs_root_and_tools, tiny_target

pytestmark = pytest.mark.integration


def installed(p: TestProject, target: str) -> set[str]:
    lines = (p.root / "dist" / target / "packages-amd64.tsv").read_text().splitlines()
    return {line.split("\t")[0] for line in lines}


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_cache) -> TestProject:
    """procps (Recommends: psmisc) with and without recommends."""
    needs_root_and_tools()
    p = TestProject(tmp_path_factory.mktemp("recommends"), shared_cache)
    p.target("plain", tiny_target(packages="procps"))
    p.target("recommending", tiny_target(packages="procps").replace(
        "    packages: [procps]\n", "    packages: [procps]\n    recommends: true\n"))
    p.doit("bootfiles:plain", "bootfiles:recommending")
    return p


def test_without_recommends_a_recommended_package_is_not_installed(project):
    assert "procps" in installed(project, "plain")
    assert "psmisc" not in installed(project, "plain")


def test_recommends_true_installs_the_recommended_package_and_the_tsv_shows_it(project):
    plain, recommending = installed(project, "plain"), installed(project, "recommending")
    assert plain < recommending
    assert "psmisc" in recommending - plain
    # the resolver took the recommends; the build installed exactly its lock
    lock = (project.entry("configure", "recommending") / "packages.lock").read_text()
    assert "\npsmisc\t" in lock
