"""The status console and /metrics against a running node: scraped counters match
what the test sent; the page in real Chromium (Debian's /usr/bin/chromium, driven by
Playwright, no browser download) lists the studies, the dead letter with its reason
and renders the charts; beyond loopback a request without the bearer token gets 401.
Screenshots are kept in tests/artifacts/ (gitignored)."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from conftest import DICOM_DATA, ROOT, Orthanc, free_port, wait_for, write_config
from nodeharness import CopyProcessor
from node.config import load_config
from node.service import Node

ARTIFACTS = ROOT / "tests" / "artifacts"
STUDY = "1.2.826.0.1.3680043.10.4242"


def _console_extra(port: int, bind: str = "127.0.0.1", token_file: Path | None = None) -> str:
    text = f'[console]\nenabled = true\nbind_address = "{bind}"\nport = {port}\n'
    if token_file is not None:
        text += f'token_file = "{token_file}"\n'
    return text


def _datasets(n: int, study: str = STUDY) -> list[Dataset]:
    out = []
    for _ in range(n):
        ds = pydicom.dcmread(DICOM_DATA / "pylibjpeg-data" / "RG2_JPLL.dcm")
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = generate_uid()
        ds.PatientName = "Secret^Patient"
        ds.PatientID = "PID-987654"
        out.append(ds)
    return out


def _send(port: int, datasets: list[Dataset], aet: str = "TESTSCU") -> list[int] | None:
    ae = AE(ae_title=aet)
    ae.add_requested_context(ComputedRadiographyImageStorage,
                             [str(datasets[0].file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACTURE_NODE")
    if not assoc.is_established:
        return None
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def orthanc_node(tmp_path: Path) -> Iterator[tuple[Node, Orthanc]]:
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port=node_port).start()
    config = load_config(write_config(
        tmp_path, node_port, extra=_console_extra(free_port()),
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "port": orthanc.dicom_port}]))
    node = Node(config, CopyProcessor)
    node.start()
    yield node, orthanc
    node.stop(grace_seconds=2)
    orthanc.stop()


def test_metrics_counters_match_what_was_sent(orthanc_node: tuple[Node, Orthanc]) -> None:
    node, orthanc = orthanc_node
    port = node.address[1]
    good = _datasets(3)
    bad = _datasets(1)[0]
    del bad.StudyInstanceUID
    assert _send(port, [*good, good[0], bad]) == [0, 0, 0, 0, 0xC212]
    assert _send(port, good[:1], aet="INTRUDER") is None  # rejected association
    wait_for(lambda: len(orthanc.study_instances(STUDY)) == 3, timeout=60)  # the 3 copies
    wait_for(lambda: node.jobs.counts()["outbox"].get("delivered") == 3)
    assert node.console is not None
    host, console_port = node.console.address  # type: ignore[attr-defined]
    status, text = _get(f"http://127.0.0.1:{console_port}/metrics")
    assert status == 200
    got = _samples(text)

    def value(name: str, **labels: str) -> float:
        return got.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("fracture_node_associations_total", result="accepted", reason="") == 1
    assert value("fracture_node_associations_total", result="rejected",
                 reason="calling-ae-not-recognised") == 1
    assert value("fracture_node_instances_total", outcome="stored", status="0x0000") == 3
    assert value("fracture_node_instances_total", outcome="duplicate", status="0x0000") == 1
    assert value("fracture_node_instances_total", outcome="refused", status="0xC212") == 1
    assert value("fracture_node_studies_total", decision="copied") == 1
    assert value("fracture_node_deliveries_total", destination="pacs", outcome="delivered") == 3
    assert value("fracture_node_stage_seconds_count", stage="receive") == 3
    assert value("fracture_node_stage_seconds_count", stage="processing") == 1
    assert value("fracture_node_stage_seconds_count", stage="quiet_wait") == 1
    assert value("fracture_node_queue_depth", table="outbox", state="delivered") == 3
    assert value("fracture_node_queue_depth", table="studies", state="processed") == 1
    assert value("fracture_node_spool_free_bytes") > 0


def _non_loopback_address() -> str:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.254", 9))  # no packet is sent for a UDP connect
        address = probe.getsockname()[0]
    finally:
        probe.close()
    if address.startswith("127."):
        pytest.fail("this machine has no non-loopback IPv4 address to test the token with")
    return address


def test_beyond_loopback_a_request_without_the_token_gets_401(tmp_path: Path) -> None:
    token = "s3cret-" + generate_uid()[-20:]
    token_file = tmp_path / "console.token"
    token_file.write_text(token + "\n")
    console_port = free_port()
    config = load_config(write_config(tmp_path, free_port(), extra=_console_extra(
        console_port, bind="0.0.0.0", token_file=token_file)))
    node = Node(config, CopyProcessor)
    node.start()
    try:
        address = _non_loopback_address()
        for path in ("/", "/metrics"):
            status, body = _get(f"http://{address}:{console_port}{path}")
            assert status == 401, body
            assert _get(f"http://{address}:{console_port}{path}", token="wrong")[0] == 401
            assert _get(f"http://{address}:{console_port}{path}", token=token)[0] == 200
            assert _get(f"http://127.0.0.1:{console_port}{path}")[0] == 200  # loopback
    finally:
        node.stop(grace_seconds=1)


def test_console_in_chromium_shows_studies_dead_letter_and_charts(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    refuser_port = free_port()
    refuser = AE(ae_title="REFUSER")
    refuser.add_supported_context(ComputedRadiographyImageStorage)
    refuser.add_supported_context(Verification)
    refuser.require_calling_aet = ["SOMEBODY_ELSE"]
    server = refuser.start_server(("127.0.0.1", refuser_port), block=False)
    config = load_config(write_config(
        tmp_path, free_port(), extra=_console_extra(free_port()),
        destinations=[{"name": "refuser", "ae_title": "REFUSER", "port": refuser_port}]))
    node = Node(config, CopyProcessor)
    node.start()
    try:
        assert _send(node.address[1], _datasets(2)) == [0, 0]
        other = "1.2.826.0.1.3680043.10.4343"
        assert _send(node.address[1], _datasets(1, study=other)) == [0]
        wait_for(lambda: node.jobs.counts()["outbox"].get("dead") == 3, timeout=60)
        url = "http://127.0.0.1:%d/" % node.console.address[1]  # type: ignore[attr-defined]
        ARTIFACTS.mkdir(exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                        args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                response = page.goto(url)
                assert response is not None and response.status == 200
                rows = page.locator("#studies tr").all_inner_texts()
                assert any(STUDY in r and "copied" in r and "processed" in r for r in rows), rows
                assert any(other in r for r in rows)
                dead = page.locator("#problems tr").all_inner_texts()
                assert sum("dead letter" in r and "rejected" in r for r in dead) == 3, dead
                assert "failing" in page.locator("#destinations").inner_text()
                assert page.locator("svg.chart").count() == 5
                bars = page.locator("svg.chart").first.locator("rect.bar")
                assert bars.count() >= 1
                box = bars.first.bounding_box()
                assert box is not None and box["height"] > 1  # drawn, not just present
                assert "bodypart-router" in page.locator("#models").inner_text()
                content = page.content()
                assert "Secret" not in content and "PID-987654" not in content
                page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)
            finally:
                browser.close()
        assert (ARTIFACTS / "console.png").stat().st_size > 10_000
    finally:
        node.stop(grace_seconds=1)
        server.shutdown()


def test_body_parts_come_from_the_finding_sites_of_the_node_s_sr(tmp_path: Path) -> None:
    from node.console.data import BodyParts
    from test_dicom_out import Study

    _, sr, _ = Study(name="Secret^Patient").build()
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    parts = BodyParts().of(str(path))
    assert {p.split()[0] for p in parts} == {"wrist", "hand", "elbow"}, parts
    assert BodyParts().of(str(tmp_path / "missing.dcm")) == ()


def test_serve_with_the_real_models_demo_study_in_the_console(tmp_path: Path) -> None:
    """The real ``serve`` (real models) with the console on: the demo study sent with
    ``fracture-node send`` while the models may still load, then the page in Chromium
    lists it with the decision ``status`` records and its body parts; serve's log
    has no third-party chatter."""
    import json
    import signal
    import subprocess

    from playwright.sync_api import sync_playwright

    exe = str(ROOT / ".venv" / "bin" / "fracture-node")
    console_port = free_port()
    cfg = write_config(tmp_path, free_port(), extra=_console_extra(console_port))
    ready = tmp_path / "ready"
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc = subprocess.Popen([exe, "--config", str(cfg), "serve", "--ready-file", str(ready)],
                                stderr=err, cwd=tmp_path)
    try:
        wait_for(ready.exists, timeout=60)
        port = ready.read_text().strip().rsplit(":", 1)[1]
        sent = subprocess.run([exe, "--config", str(cfg), "send", "--aet", "FRACTURE_NODE",
                               "--host", "127.0.0.1", "--port", port, "--calling-aet", "STORESCU",
                               str(ROOT / "demo" / "studies" / "forearm")], capture_output=True, text=True,
                              timeout=120)
        assert sent.returncode == 0, sent.stdout + sent.stderr

        def status() -> dict:
            out = subprocess.run([exe, "--config", str(cfg), "status", "--json"],
                                 capture_output=True, text=True, timeout=60)
            return json.loads(out.stdout) if out.returncode == 0 else {}

        done = wait_for(lambda: (s := status()) and s["studies"] and all(
            r["state"] == "processed" for r in s["studies"]) and s, timeout=300)
        study = done["studies"][0]
        status_code, text = _get(f"http://127.0.0.1:{console_port}/metrics")
        got = _samples(text)
        assert status_code == 200
        for stage in ("receive", "quiet_wait", "processing", "decode", "inference", "build"):
            count = got.get(("fracture_node_stage_seconds_count", (("stage", stage),)), 0)
            assert count == (5 if stage == "receive" else 1), (stage, count)
        assert got[("fracture_node_studies_total", (("decision", study["decision"]),))] == 1
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                        args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"http://127.0.0.1:{console_port}/")
                row = page.locator("#studies tr", has_text=study["study_instance_uid"])
                cells = row.locator("td").all_inner_texts()
                assert cells[1] == "processed" and cells[2] == study["decision"], cells
                assert cells[3] not in ("", "-"), cells  # body parts from the SR
                assert page.locator("svg.chart").count() == 5
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "console-demo.png"), full_page=True)
            finally:
                browser.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0
    text = log.read_text()
    assert "processing started" in text
    for noise in ("oneDNN", "cpu_feature_guard", "generation", " highdicom", " pynetdicom",
                  " tensorflow", " absl", "Traceback"):
        assert noise not in text, f"{noise!r} in serve's log:\n{text[-3000:]}"
