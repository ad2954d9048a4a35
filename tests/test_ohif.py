"""The node's results in OHIF v3 (3.13.2, npm ``@ohif/app``), in Debian's Chromium.

Topology as in test_e2e: modality (storescu) -> Orthanc (DICOMweb plugin, routing rule)
-> node -> Orthanc; OHIF's built viewer is served on loopback with a same-origin proxy
to Orthanc's DICOMweb root (orthanc-test/ohif.py).  Playwright drives /usr/bin/chromium
headless (no browser download).  Screenshots are kept in var/test-artefacts/ohif/.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from conftest import ROOT, Orthanc, free_port, storescu, wait_for, write_config
from node.config import load_config
from node.processing import processor_factory
from node.service import Node

playwright_api = pytest.importorskip("playwright.sync_api")  # installed by bootstrap.sh

logger = logging.getLogger(__name__)

ARTEFACTS = ROOT / "var" / "test-artefacts" / "ohif"
CHROMIUM = "/usr/bin/chromium"
STUDIES = ("forearm", "normal-forearm")
LOAD_TIMEOUT_MS = 120_000
"""Generous: two shared cores, software WebGL."""


def _ohif_module() -> Any:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("ohif", ROOT / "orthanc-test" / "ohif.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ohif"] = module
    spec.loader.exec_module(module)
    return module


class Viewer:
    """Orthanc with DICOMweb, the node, OHIF, and the demo studies' UIDs."""

    def __init__(self, ohif: Any, studies: dict[str, str]) -> None:
        self.ohif = ohif
        self.studies = studies


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Viewer]:
    workdir = tmp_path_factory.mktemp("ohif")
    node_port = free_port()
    orthanc = Orthanc(workdir / "orthanc", node_port=node_port, route=True, stable_age=1,
                      dicomweb=True).start()
    config = load_config(write_config(
        workdir, node_port, quiet_seconds=1.0,
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "port": orthanc.dicom_port}],
    ), environ={})
    node = Node(config, processor_factory(config))
    node.start()
    ohif = _ohif_module().OhifServer(orthanc.url).start()
    try:
        uids: dict[str, str] = {}
        for name in STUDIES:
            files = sorted((ROOT / "demo" / "studies" / name).glob("*.dcm"))
            uids[name] = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            sent = storescu(orthanc.dicom_port, files, "ORTHANC", "MODALITY")
            assert sent.returncode == 0, sent.stderr

        def settled(uid: str) -> bool:
            rows = node.jobs.query(
                "SELECT state FROM studies WHERE study_instance_uid = ?", [uid])
            waiting = node.jobs.query(
                "SELECT COUNT(*) AS n FROM outbox WHERE study_instance_uid = ? AND "
                "state != 'delivered'", [uid])
            return bool(rows) and rows[0]["state"] == "processed" and waiting[0]["n"] == 0

        for uid in uids.values():
            wait_for(lambda: settled(uid), timeout=300, interval=0.5)
        yield Viewer(ohif, uids)
    finally:
        ohif.stop()
        node.stop(grace_seconds=2)
        orthanc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--use-gl=swiftshader", "--enable-unsafe-swiftshader",
                  "--ignore-gpu-blocklist"],
        )
        yield chromium
        chromium.close()


def _open(browser: Any, viewer: Viewer, study: str) -> Any:
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(LOAD_TIMEOUT_MS)
    page.goto(viewer.ohif.study_url(viewer.studies[study]))
    # OHIF's first-visit tour covers the study browser
    page.get_by_text("Skip all").click()
    return page


def _shot(page: Any, name: str) -> Path:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTEFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


@pytest.mark.orthanc
@pytest.mark.parametrize("study", STUDIES)
def test_ohif_lists_the_node_results_in_the_study(browser: Any, viewer: Viewer, study: str) -> None:
    """OHIF opens the study and its study browser lists the node's SC, SR, PDF series
    beside the source series (all read through DICOMweb)."""
    page = _open(browser, viewer, study)
    try:
        page.get_by_text("AI fracture findings (SR)", exact=False).first.wait_for()
        page.get_by_text("AI fracture report (PDF)", exact=False).first.wait_for()
        text = page.inner_text("body")
        assert "Forearm views" in text
        flagged = study == "forearm"
        assert "AI fracture heat map" in text  # one SC per analysed image, flagged or not
        assert ("AI fracture key images" in text) == flagged  # KOS only for flagged images
        _shot(page, f"{study}-study")
    finally:
        page.close()


@pytest.mark.orthanc
def test_ohif_displays_the_secondary_capture(browser: Any, viewer: Viewer) -> None:
    """Double-clicking the heat-map series loads it into the viewport: OHIF's overlay
    names the series and counts its images."""
    page = _open(browser, viewer, "forearm")
    try:
        page.get_by_text("AI fracture heat map", exact=False).first.dblclick()
        overlay = page.locator(".viewport-overlay, [class*='overlay']").filter(
            has_text=re.compile("AI fracture heat map"))
        # OHIF keeps the overlay text in the DOM, shown on hover
        overlay.first.wait_for(state="attached")
        assert "1/2" in page.inner_text("body") or "2/2" in page.inner_text("body")
        _shot(page, "forearm-secondary-capture")
    finally:
        page.close()


@pytest.mark.orthanc
@pytest.mark.xfail(strict=True, reason=(
    "OHIF 3.13.2 here: after double-clicking the SR series the viewport stays black and "
    "the Measurements panel says 'Measurements (0) / No tracked measurements'; the console "
    "logs 'Measurement is preview, skipping' for the image's region group (parsed with one "
    "coordinate set) and nothing is drawn"))
def test_ohif_draws_the_sr_region_on_the_radiograph(browser: Any, viewer: Viewer) -> None:
    """The doubtful view's SR region is drawn (an SVG path in the annotation layer) and
    the finding is listed in the measurements panel."""
    page = _open(browser, viewer, "forearm")
    try:
        page.get_by_text("AI fracture findings (SR)", exact=False).first.dblclick()
        page.locator("svg.svg-layer path, svg.svg-layer polyline").first.wait_for(timeout=60_000)
        _shot(page, "forearm-sr-region")
    finally:
        _shot(page, "forearm-sr")
        page.close()
