"""End-to-end benchmark: N real studies through a real Orthanc and the node.

Studies of 2-4 real radiographs (MURA validation studies of the humerus and forearm
from ../shared/data/msk, wrapped into CR DICOM in a temporary folder) are stored into
Orthanc with DCMTK storescu; Orthanc's routing rule sends each stable study to the
node, which sends its results back.  For every study the node's job database gives:

* ``received``  first and last instance received by the node (Orthanc routed it);
* ``ready``     last received + the node's quiet period (the study is complete);
* ``processed`` results written and queued (pipeline + dicom_out);
* ``delivered`` the last result acknowledged by Orthanc.

Printed per study and as medians: processing (ready -> processed, the node's share),
delivery (processed -> delivered, mostly Orthanc storing), and the total after the
quiet period (ready -> delivered), plus throughput and lost studies.  Target: median
under 2 s after the quiet period, no study lost.  Usage::

    .venv/bin/python bench/e2e.py [--studies 20]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
MSK = ROOT.parent / "shared" / "data" / "msk"
sys.path.insert(0, str(ROOT))


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


orthanc_ctl = _load("orthanc_ctl", ROOT / "orthanc-test" / "orthanc_ctl.py")
demo_data = _load("make_demo_data", ROOT / "scripts" / "make_demo_data.py")


def make_studies(directory: Path, count: int) -> dict[str, list[Path]]:
    """``count`` MURA validation studies with 2-4 images each, as CR DICOM."""
    directory.mkdir(parents=True, exist_ok=True)
    by_study: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in csv.DictReader((MSK / "manifest.csv").open()):
        if row["dataset"] == "MURA-v1.1" and row["split"] == "val" and \
                row["body_part"] in ("HUMERUS", "FOREARM"):
            by_study[row["study_id"]].append(row)
    chosen = [(k, v) for k, v in sorted(by_study.items()) if 2 <= len(v) <= 4][:count]
    studies: dict[str, list[Path]] = {}
    for i, (key, rows) in enumerate(chosen):
        from pydicom.uid import generate_uid

        study_uid = generate_uid(entropy_srcs=[key, "bench-e2e"])
        patient = {"PatientName": f"BENCH^{i:03d}", "PatientID": f"BENCH-{i:03d}",
                   "PatientBirthDate": "19700101", "PatientSex": "O"}
        paths = []
        for n, row in enumerate(rows, start=1):
            ds = demo_data.wrap(MSK / row["path"], row["body_part"], 1, n, study_uid, patient)
            if row["body_part"] == "FOREARM":
                ds.BodyPartExamined = "ARM"
            path = directory / f"{i:03d}_{n}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        studies[study_uid] = paths
    return studies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--quiet-seconds", type=float, default=1.0)
    parser.add_argument("--stable-age", type=int, default=1)
    parser.add_argument("--interval", type=float, default=0.0,
                        help="seconds between two studies (0: all at once, a burst)")
    args = parser.parse_args(argv)

    from node.config import (
        Config,
        DestinationConfig,
        NodeConfig,
        PeerConfig,
        StorageConfig,
        StudyConfig,
        load_config,
        render_config,
    )
    from node.processing import processor_factory
    from node.service import Node

    work = Path(tempfile.mkdtemp(prefix="e2e-bench-"))
    try:
        studies = make_studies(work / "studies", args.studies)
        n_images = sum(len(v) for v in studies.values())
        print(f"{len(studies)} studies, {n_images} images", flush=True)
        node_port = orthanc_ctl.free_port()
        orthanc = orthanc_ctl.Orthanc(work / "orthanc", node_port=node_port, route=True,
                                      stable_age=args.stable_age).start()
        shipped = load_config(ROOT / "config.toml", environ={})
        cfg = work / "node.toml"
        cfg.write_text(render_config(Config(
            node=NodeConfig(port=node_port),
            peers=(PeerConfig("ORTHANC", "127.0.0.1"),),
            destinations=(DestinationConfig("pacs", "ORTHANC", "127.0.0.1", orthanc.dicom_port),),
            storage=StorageConfig(spool_dir=work / "spool", database=work / "node.sqlite"),
            study=StudyConfig(quiet_seconds=args.quiet_seconds),
            models=shipped.models,
        )))
        config = load_config(cfg, environ={})
        node = Node(config, processor_factory(config))
        node.start()
        try:
            started = time.time()
            for n, paths in enumerate(studies.values()):
                if n and args.interval:
                    time.sleep(args.interval)
                subprocess.run(["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "ORTHANC", "-xe",
                                "127.0.0.1", str(orthanc.dicom_port), *map(str, paths)],
                               check=True, capture_output=True,
                               env=dict(os.environ, TCP_NODELAY="1"))
            pushed = time.time()
            deadline = time.monotonic() + 120 + 10 * len(studies)
            while time.monotonic() < deadline:
                done = node.jobs.query(
                    "SELECT COUNT(*) AS n FROM studies s WHERE state = 'processed' AND NOT "
                    "EXISTS (SELECT 1 FROM outbox o WHERE o.study_instance_uid = "
                    "s.study_instance_uid AND o.state != 'delivered')")[0]["n"]
                if done >= len(studies):
                    break
                time.sleep(0.2)
            finished = time.time()
            rows = node.jobs.query(
                "SELECT s.study_instance_uid AS uid, s.updated_at AS processed, "
                "(SELECT MIN(received_at) FROM instances i WHERE i.study_instance_uid = "
                " s.study_instance_uid) AS first, "
                "(SELECT MAX(received_at) FROM instances i WHERE i.study_instance_uid = "
                " s.study_instance_uid) AS last, "
                "(SELECT MAX(delivered_at) FROM outbox o WHERE o.study_instance_uid = "
                " s.study_instance_uid) AS delivered, "
                "(SELECT COUNT(*) FROM outbox o WHERE o.study_instance_uid = s.study_instance_uid)"
                " AS results FROM studies s")
        finally:
            node.stop(grace_seconds=2)
            orthanc.stop()

        processing, delivery, total = [], [], []
        print("\n| study | images | results | processing s | delivery s | after quiet s |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            if r["delivered"] is None:
                continue
            ready = r["last"] + args.quiet_seconds
            processing.append(r["processed"] - ready)
            delivery.append(r["delivered"] - r["processed"])
            total.append(r["delivered"] - ready)
            print(f"| ...{r['uid'][-8:]} | {len(studies.get(r['uid'], []))} | {r['results']} | "
                  f"{processing[-1]:.2f} | {delivery[-1]:.2f} | {total[-1]:.2f} |")
        lost = len(studies) - len(total)
        print(f"\nstudies: {len(studies)}, completed: {len(total)}, lost: {lost}")
        if total:
            print(f"median after the quiet period: {statistics.median(total):.2f} s "
                  f"(processing {statistics.median(processing):.2f} s, delivery "
                  f"{statistics.median(delivery):.2f} s); max {max(total):.2f} s")
            print(f"throughput: {n_images / (finished - started):.2f} images/s, "
                  f"{len(total) / (finished - started) * 60:.1f} studies/min "
                  f"(push took {pushed - started:.1f} s, Orthanc StableAge {args.stable_age} s, "
                  f"node quiet period {args.quiet_seconds} s, one study every "
                  f"{args.interval} s)")
        return 0 if lost == 0 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
