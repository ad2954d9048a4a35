"""End to end through a real PACS: studies are stored into a real Orthanc with DCMTK
``storescu``; Orthanc's auto-routing rule (orthanc-test/route.lua, OnStableStudy)
sends them to the node, which runs the real shipped models and sends its results
back into the same study.  Nothing calls the node directly."""

from __future__ import annotations

import io
import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import (ROOT, Orthanc, free_port, pixelmed_sr_errors, restudy, storescu, wait_for,
                      write_config)
from models.registry import load_registry
from node.config import load_config
from node.processing import processor_factory
from node.service import Node

DEMO_STUDIES = {d.name: sorted(d.glob("*.dcm")) for d in sorted((ROOT / "demo" / "studies").iterdir())}
DEMO = DEMO_STUDIES["forearm"]
ARTEFACTS = ROOT / "var" / "test-artefacts" / "e2e"
"""Renderings of the results (SC and PDF pages as PNG) for a person to look at."""
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
PDF_CLASS = "1.2.840.10008.5.1.4.1.1.104.1"
KO_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


class Pacs:
    """The running pair: Orthanc with the routing rule, and the node."""

    def __init__(self, orthanc: Orthanc, node: Node, workdir: Path) -> None:
        self.orthanc = orthanc
        self.node = node
        self.workdir = workdir

    def store(self, files: list[Path]) -> None:
        """A modality pushes files into Orthanc with storescu."""
        out = storescu(self.orthanc.dicom_port, files, "ORTHANC", "MODALITY")
        assert out.returncode == 0, out.stderr

    def settled(self, study_uid: str) -> bool:
        rows = self.node.jobs.query(
            "SELECT state FROM studies WHERE study_instance_uid = ?", [study_uid])
        waiting = self.node.jobs.query(
            "SELECT COUNT(*) AS n FROM outbox WHERE study_instance_uid = ? AND "
            "state != 'delivered'", [study_uid])
        return bool(rows) and rows[0]["state"] == "processed" and waiting[0]["n"] == 0

    def wait_results(self, study_uid: str, timeout: float = 180.0) -> list[dict[str, Any]]:
        wait_for(lambda: self.settled(study_uid), timeout=timeout, interval=0.2)
        return self.results(study_uid)

    def results(self, study_uid: str) -> list[dict[str, Any]]:
        return [i for i in self.orthanc.study_instances(study_uid)
                if i["tags"].get("Manufacturer") == "fracture-node"]

    def fetch(self, instance_id: str) -> tuple[Path, Dataset]:
        path = self.workdir / f"{instance_id}.dcm"
        path.write_bytes(self.orthanc.get(f"/instances/{instance_id}/file", raw=True))
        return path, pydicom.dcmread(path)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    workdir = tmp_path_factory.mktemp("e2e")
    node_port = free_port()
    orthanc = Orthanc(workdir / "orthanc", node_port=node_port, route=True, stable_age=1).start()
    config = load_config(write_config(
        workdir, node_port, quiet_seconds=1.0,
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "port": orthanc.dicom_port}],
    ), environ={})
    node = Node(config, processor_factory(config))
    node.start()
    yield Pacs(orthanc, node, workdir)
    node.stop(grace_seconds=2)
    orthanc.stop()



def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _pdf_text(pdf: Dataset, path: Path) -> str:
    path.write_bytes(bytes(pdf.EncapsulatedDocument)[: pdf.EncapsulatedDocumentLength])
    text = subprocess.run(["pdftotext", str(path), "-"], capture_output=True, text=True,
                          check=True).stdout
    return " ".join(text.split())


def _series_image(ds: Dataset) -> str:
    """How the report names a source image (:func:`dicom_out.wording.image_name`)."""
    from dicom_out.wording import image_name
    from pipeline.validate import read_metadata

    return image_name(read_metadata(ds))


def test_demo_studies_return_results_that_agree_with_each_other(
    pacs: Pacs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The demo's four studies, as a department sends them, through Orthanc's routing
    rule: SC per analysed image, SR, PDF (and KOS when an image is flagged) in each
    study; all valid; the PDF's headline, rows and reasons agree with the image
    decisions the node recorded; renderings kept in var/test-artefacts/e2e."""
    caplog.set_level(logging.INFO)
    studies: dict[str, tuple[str, list[Path]]] = {}
    for name, files in DEMO_STUDIES.items():
        study_uid = generate_uid()
        studies[name] = (study_uid, restudy(files, tmp_path / name, study_uid))
    pacs.store([f for _, files in studies.values() for f in files])
    ARTEFACTS.mkdir(parents=True, exist_ok=True)

    for name, (study_uid, files) in studies.items():
        results = pacs.wait_results(study_uid)
        sources = {str(ds.SOPInstanceUID): ds for ds in
                   (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
        rows = {r["sop_instance_uid"]: (r["outcome"], r["reason"]) for r in pacs.node.jobs.query(
            "SELECT sop_instance_uid, outcome, reason FROM instances WHERE study_instance_uid = ?",
            [study_uid])}
        assert set(rows) == set(sources), (name, "every pushed instance reached the node")
        analysed = {uid for uid, (o, _) in rows.items() if o == "analysed"}
        flagged = {uid for uid in analysed if rows[uid][1].split(":")[0] in ("positive", "doubtful")}
        by_class: dict[str, list[tuple[Path, Dataset, str]]] = {}
        for item in results:
            path, ds = pacs.fetch(item["ID"])
            by_class.setdefault(str(ds.SOPClassUID), []).append((path, ds, item["ID"]))
        assert len(by_class[SR_CLASS]) == 1 and len(by_class[PDF_CLASS]) == 1, name
        assert len(by_class.get(SC_CLASS, [])) == len(analysed), name
        assert len(by_class.get(KO_CLASS, [])) == (1 if flagged else 0), name
        numbers = sorted(int(ds.InstanceNumber) for _, ds, _ in by_class.get(SC_CLASS, []))
        assert numbers == list(range(1, len(numbers) + 1)), (name, "unique SC numbers")
        patient_id = next(iter(sources.values())).PatientID
        result_series = {kind: {str(ds.SeriesInstanceUID) for _, ds, _ in items}
                         for kind, items in by_class.items()}
        assert all(len(v) == 1 for v in result_series.values())
        assert not set().union(*result_series.values()) & {str(d.SeriesInstanceUID)
                                                            for d in sources.values()}
        for kind, items in by_class.items():
            for path, ds, instance_id in items:
                assert ds.StudyInstanceUID == study_uid and ds.PatientID == patient_id
                assert dciodvfy_errors(path) == [], (name, kind, dciodvfy_errors(path))
                if kind in (SR_CLASS, KO_CLASS):
                    assert pixelmed_sr_errors(path) == [], (name, kind)
        for path, ds, instance_id in by_class.get(SC_CLASS, []):
            source_uid = str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
            assert source_uid in analysed
            png = pacs.orthanc.get(f"/instances/{instance_id}/preview", raw=True)
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            (ARTEFACTS / f"{name}-sc-{ds.InstanceNumber}.png").write_bytes(png)

        _, sr, _ = by_class[SR_CLASS][0]
        evidence = {str(inst.ReferencedSOPInstanceUID)
                    for st in sr.CurrentRequestedProcedureEvidenceSequence
                    for series in st.ReferencedSeriesSequence for inst in series.ReferencedSOPSequence}
        assert set(sources) <= evidence, (name, "every received instance is referenced")
        pdf_path, pdf, _ = by_class[PDF_CLASS][0]
        text = _pdf_text(pdf, tmp_path / f"{name}.pdf")
        subprocess.run(["pdftoppm", "-r", "50", "-png", str(tmp_path / f"{name}.pdf"),
                        str(ARTEFACTS / f"{name}-pdf")], check=True)
        finding = "abnormality" if "ABNORMALITY" in text.upper() else "fracture"
        if flagged:
            assert f"NO {finding.upper()} DETECTED" not in text, name
            assert "SUSPECTED" in text or "DOUBTFUL" in text, name
        elif analysed:
            assert f"NO {finding.upper()} DETECTED" in text or "NEEDS HUMAN REVIEW" in text, name
        else:
            assert "NOT ANALYSED" in text, name
        for uid, ds in sources.items():
            assert " ".join(_series_image(ds).split()) in text, (name, _series_image(ds))

    # the demo's own expectations with today's models
    forearm_uid, forearm_files = studies["forearm"]
    rows = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f.name for f in forearm_files}
    outcomes = {rows[r["sop_instance_uid"]]: r["reason"] for r in pacs.node.jobs.query(
        "SELECT sop_instance_uid, reason FROM instances WHERE study_instance_uid = ?", [forearm_uid])}
    assert outcomes["photograph.dcm"].startswith("colour-image")
    # the hand views: analysed where the classifier supports the hand, else refused
    registry = load_registry(ROOT / "models" / "registry.toml")
    if "HAND" in registry.get("fracture-classifier", role="classifier").supported_body_parts:
        assert outcomes["hand_1.dcm"].split(":")[0] in ("positive", "doubtful", "negative",
                                                        "needs-review"), outcomes["hand_1.dcm"]
    else:
        assert outcomes["hand_1.dcm"].startswith("unsupported-body-part")
    hip_uid, _ = studies["hip"]
    assert pacs.node.jobs.query("SELECT decision FROM studies WHERE study_instance_uid = ?",
                                [hip_uid])[0]["decision"] == "not-analysed"

    # the logs of the whole run carry UIDs, never the patients' names or IDs
    assert forearm_uid in caplog.text
    for identifier in ("DEMO^Forearm", "DEMO^Hip", "DEMO-0001", "DEMO-0004"):
        assert identifier not in caplog.text


def test_same_study_pushed_twice_makes_no_duplicates(pacs: Pacs, tmp_path: Path) -> None:
    study_uid = generate_uid()
    files = restudy(DEMO[:2], tmp_path / "study", study_uid)
    pacs.store(files)
    first = {i["tags"]["SOPInstanceUID"] for i in pacs.wait_results(study_uid)}
    assert first
    # push the whole study (sources and our results) from Orthanc to the node again
    study_id = pacs.orthanc.find_study(study_uid)
    pacs.orthanc.post("/modalities/fracture-node/store",
                      {"Resources": [study_id], "Synchronous": True})
    time.sleep(pacs.node.config.study.quiet_seconds + 2.5)  # a full quiet period + StableAge
    wait_for(lambda: pacs.settled(study_uid), timeout=60)
    again = [i["tags"]["SOPInstanceUID"] for i in pacs.results(study_uid)]
    assert sorted(again) == sorted(first), "the second push created new objects"
    ignored = pacs.node.jobs.query(
        "SELECT COUNT(*) AS n FROM instances WHERE study_instance_uid = ? AND outcome = 'ignored'",
        [study_uid])[0]["n"]
    assert ignored == len(first), "our own results must be refused, not processed"


def test_late_instance_reopens_study_with_new_sr_version(pacs: Pacs, tmp_path: Path) -> None:
    study_uid = generate_uid()
    files = restudy(DEMO[:2], tmp_path / "study", study_uid)
    pacs.store(files[:1])
    first = pacs.wait_results(study_uid)
    first_sr = [i for i in first if i["tags"]["Modality"] == "SR"]
    first_sc = {i["tags"]["SOPInstanceUID"] for i in first if i["tags"]["Modality"] != "SR"
                and i["tags"]["Modality"] != "DOC"}
    assert len(first_sr) == 1
    pacs.store(files[1:])
    wait_for(lambda: len([i for i in pacs.results(study_uid)
                          if i["tags"]["Modality"] == "SR"]) == 2, timeout=120)
    wait_for(lambda: pacs.settled(study_uid), timeout=60)
    srs = [pacs.fetch(i["ID"])[1] for i in pacs.results(study_uid)
           if i["tags"]["Modality"] == "SR"]
    newest = [ds for ds in srs if "PredecessorDocumentsSequence" in ds]
    assert len(newest) == 1
    predecessor = newest[0].PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        first_sr[0]["tags"]["SOPInstanceUID"]
    delivered = pacs.node.jobs.query(
        "SELECT sop_instance_uid FROM outbox WHERE study_instance_uid = ? AND kind = 'sc'",
        [study_uid])
    sc_uids = [r["sop_instance_uid"] for r in delivered]
    assert len(sc_uids) == len(set(sc_uids)), "an SC was queued twice"
    assert first_sc <= set(sc_uids)


def broken_copy(source: Path, path: Path, study_uid: str) -> str:
    """What a client sent on the wrong presentation context: the encapsulated (JPEG)
    pixel data of ``source`` under Explicit VR Little Endian, without the sequence
    delimiter.  The header parses (the node acknowledges it), but the dataset reads
    back empty.  Returns its SOP Instance UID."""
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info

    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = study_uid
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[study_uid, "broken"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf)
    data = buf.getvalue()
    stream = io.BytesIO(data)
    read_preamble(stream, False)
    _read_file_meta_info(stream)
    body = data[stream.tell():]
    assert body[-8:] == bytes.fromhex("feffdde000000000"), "source must be encapsulated"
    meta = ds.file_meta
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    head = io.BytesIO()
    write_file_meta_info(head, meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + head.getvalue() + body[:-8])
    return str(ds.SOPInstanceUID)


def test_a_broken_instance_costs_only_itself(pacs: Pacs, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A study with one instance that reads back empty: the other images get their
    results, and the broken one is a refusal named by what was received."""
    from pynetdicom import AE, _config

    # send the files' bytes as they are (pynetdicom's chunked mode), as the faulty client did
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    study_uid = generate_uid()
    files = restudy([f for f in DEMO if f.name.startswith("forearm")], tmp_path / "s", study_uid)
    hip = DEMO_STUDIES["hip"][0]
    broken = tmp_path / "broken.dcm"
    broken_uid = broken_copy(hip, broken, study_uid)
    ae = AE(ae_title="TESTSCU")
    for sop_class in {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID)
                      for f in files + [broken]}:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", pacs.node.config.node.port, ae_title="FRACTURE_NODE")
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(f).Status for f in files]
        statuses.append(assoc.send_c_store(broken).Status)
    finally:
        assoc.release()
    assert statuses == [0] * len(statuses), [hex(s) for s in statuses]
    results = pacs.wait_results(study_uid)
    rows = {r["sop_instance_uid"]: (r["outcome"], r["reason"]) for r in pacs.node.jobs.query(
        "SELECT sop_instance_uid, outcome, reason FROM instances WHERE study_instance_uid = ?",
        [study_uid])}
    assert rows[broken_uid][0] == "refused" and rows[broken_uid][1].startswith("decode-failed")
    assert sum(1 for o, _ in rows.values() if o == "analysed") == len(files)
    kinds: dict[str, list[Dataset]] = {}
    for item in results:
        _, ds = pacs.fetch(item["ID"])
        kinds.setdefault(str(ds.SOPClassUID), []).append(ds)
    assert len(kinds[SC_CLASS]) == len(files)
    sr = kinds[SR_CLASS][0]
    evidence = {str(inst.ReferencedSOPInstanceUID)
                for st in sr.CurrentRequestedProcedureEvidenceSequence
                for series in st.ReferencedSeriesSequence for inst in series.ReferencedSOPSequence}
    assert broken_uid in evidence, "the broken instance is still referenced"
    assert sr.PatientID == "DEMO-0001", "patient and study come from a readable instance"
