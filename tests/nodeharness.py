"""Run a fracture-node (SCP + worker + deliverer) with a small processing function,
in this process or as a subprocess, for the node-core tests.

``CopyProcessor`` stands in for the pipeline in the node-core tests only: for every
received image it writes one derived object (a copy with new UIDs, Manufacturer set
to the node's), so spool, queue, outbox, retries and restarts are exercised with real
DICOM bytes.  The end-to-end tests use the real pipeline and models.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

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


def main(config_path: str, ready_file: str) -> int:
    config = load_config(Path(config_path))
    node = Node(config, CopyProcessor)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    address, port = node.start()
    Path(ready_file).write_text(f"{address}:{port}\n")
    stop.wait()
    node.stop()
    return 0


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(main(sys.argv[1], sys.argv[2]))
