"""Run a fracture-node (SCP + worker + deliverer) with a small processing function,
in this process or as a subprocess, for the node-core tests.

``CopyProcessor`` stands in for the pipeline in the node-core tests only: for every
received image it writes one derived object (a copy with new UIDs, Manufacturer set
to the node's), so spool, queue, outbox, retries and restarts are exercised with real
DICOM bytes.  ``ReportProcessor`` adds one study-level object per study generation, a
Basic Text SR whose evidence lists every source instance and, for a reopened study,
whose Predecessor Documents Sequence names the previous version (read from the
spool, as the node's real SR does; for the scale-out tests: one study, one report
per generation, wherever its instances arrived and wherever it was processed).  The end-to-end tests use the real pipeline and models.

As a script: ``nodeharness.py CONFIG READY_FILE [--report] [--delay SECONDS]``
(``--delay``: each study takes that long to process, so a test can kill a node while
it holds a study).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.config import load_config
from node.jobs import StudyJob
from node.service import Node
from node.worker import ProcessedStudy
from pipeline.result import NODE_MANUFACTURER


class CopyProcessor:
    def __call__(self, job: StudyJob) -> ProcessedStudy:
        outputs = []
        outcomes = {}
        for inst in job.instances:
            ds = pydicom.dcmread(inst.path)
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[inst.sop_instance_uid, "copy"])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesInstanceUID = generate_uid(entropy_srcs=[job.study_instance_uid, "copy"])
            ds.Manufacturer = NODE_MANUFACTURER
            outputs.append(("sc", ds))
            outcomes[inst.sop_instance_uid] = ("analysed", "")
        return ProcessedStudy(outputs=outputs, outcomes=outcomes, decision="copied")


BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


class ReportProcessor(CopyProcessor):
    """CopyProcessor + one SR per study generation referencing every instance.

    Parameters
    ----------
    delay
        Seconds each study takes (a sleep), so that a test can catch a node holding one.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    def __call__(self, job: StudyJob) -> ProcessedStudy:
        copied = super().__call__(job)
        if self.delay:
            time.sleep(self.delay)
        first = pydicom.dcmread(job.instances[0].path, stop_before_pixels=True)
        sr = Dataset()
        sr.file_meta = FileMetaDataset()
        sr.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
        sr.SOPClassUID = BASIC_TEXT_SR
        sr.SOPInstanceUID = generate_uid(
            entropy_srcs=[job.study_instance_uid, str(job.generation), "sr"])
        sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
        sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        for keyword in ("PatientName", "PatientID", "StudyDate", "StudyTime", "StudyID",
                        "AccessionNumber", "ReferringPhysicianName"):
            setattr(sr, keyword, first.get(keyword, ""))
        sr.StudyInstanceUID = job.study_instance_uid
        sr.SeriesInstanceUID = generate_uid(entropy_srcs=[job.study_instance_uid, "sr"])
        sr.SeriesNumber = 9002
        sr.InstanceNumber = job.generation
        sr.Modality = "SR"
        sr.Manufacturer = NODE_MANUFACTURER
        sr.ValueType = "CONTAINER"
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = "126000", "DCM"
        code.CodeMeaning = "Imaging Measurement Report"
        sr.ConceptNameCodeSequence = Sequence([code])
        sr.ContinuityOfContent = "SEPARATE"
        sr.CompletionFlag = "COMPLETE"
        sr.VerificationFlag = "UNVERIFIED"
        by_series: dict[str, list[Dataset]] = {}
        for inst in job.instances:
            ref = Dataset()
            ref.ReferencedSOPClassUID = inst.sop_class_uid
            ref.ReferencedSOPInstanceUID = inst.sop_instance_uid
            by_series.setdefault(inst.series_instance_uid, []).append(ref)
        series = []
        for series_uid, refs in by_series.items():
            item = Dataset()
            item.SeriesInstanceUID = series_uid
            item.ReferencedSOPSequence = Sequence(refs)
            series.append(item)
        evidence = Dataset()
        evidence.StudyInstanceUID = job.study_instance_uid
        evidence.ReferencedSeriesSequence = Sequence(series)
        sr.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
        if job.previous_report is not None:  # a new version: name the one it replaces
            prev = pydicom.dcmread(job.previous_report, stop_before_pixels=True)
            ref = Dataset()
            ref.ReferencedSOPClassUID = prev.SOPClassUID
            ref.ReferencedSOPInstanceUID = prev.SOPInstanceUID
            prev_series = Dataset()
            prev_series.SeriesInstanceUID = prev.SeriesInstanceUID
            prev_series.ReferencedSOPSequence = Sequence([ref])
            prev_study = Dataset()
            prev_study.StudyInstanceUID = prev.StudyInstanceUID
            prev_study.ReferencedSeriesSequence = Sequence([prev_series])
            sr.PredecessorDocumentsSequence = Sequence([prev_study])
        return ProcessedStudy(outputs=[*copied.outputs, ("sr", sr)], outcomes=copied.outcomes,
                              decision="reported")


def main(config_path: str, ready_file: str, report: bool = False, delay: float = 0.0) -> int:
    config = load_config(Path(config_path))
    node = Node(config, (lambda: ReportProcessor(delay)) if report else CopyProcessor)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    address, port = node.start()
    from node.cli import _write_ready_file

    _write_ready_file(Path(ready_file), f"{address}:{port}\n")  # as serve writes it
    stop.wait()
    node.stop()
    return 0


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("ready_file")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    sys.exit(main(args.config, args.ready_file, args.report, args.delay))
