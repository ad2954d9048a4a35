"""Ingest benchmark: how fast the node takes real-sized radiographs off the wire.

The same sets of files (200 of ~10 MB and 200 of ~0.5 MB, made from the real CR
radiograph RG1_UNCR with unique UIDs) are sent with DCMTK ``storescu`` over one
association and over 4 concurrent ones, to three receivers side by side in one run:

* the node (durability on: temporary file, fsync, rename, SQLite WAL commit per
  instance, before 0x0000 goes back) — run as its own process, worker idle;
* DCMTK ``storescp`` (writes files, no fsync);
* Orthanc (its own storage and index).

Receiving DCMTK/Orthanc processes get ``TCP_NODELAY=1`` (NOTES.md: Nagle otherwise
costs ~40 ms per object).  Prints images/s, MB/s and the ratios node/storescp and
node/Orthanc per row.  Usage::

    .venv/bin/python bench/ingest.py [--count 200] [--rounds 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "dicom" / "pydicom-data" / "RG1_UNCR.dcm"

_spec = importlib.util.spec_from_file_location("orthanc_ctl", ROOT / "orthanc-test" / "orthanc_ctl.py")
assert _spec and _spec.loader
orthanc_ctl = importlib.util.module_from_spec(_spec)
sys.modules["orthanc_ctl"] = orthanc_ctl
_spec.loader.exec_module(orthanc_ctl)


def make_set(directory: Path, count: int, shape: tuple[int, int]) -> int:
    """``count`` copies of the real radiograph resized to ``shape``, unique UIDs,
    one study per set.  Returns the total bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(SOURCE)
    pixels = cv2.resize(ds.pixel_array, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    ds.Rows, ds.Columns = shape
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    total = 0
    for i in range(count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        path = directory / f"{i:04d}.dcm"
        ds.save_as(path)
        total += path.stat().st_size
    return total


def send(port: int, aec: str, files: list[Path], associations: int) -> float:
    """Send ``files`` with ``associations`` concurrent storescu processes; seconds."""
    chunks = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    procs = [subprocess.Popen(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", aec, "-xe",
                               "127.0.0.1", str(port), *map(str, chunk)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for chunk in chunks]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - started
    for p, err in zip(procs, errors):
        if p.returncode != 0:
            raise RuntimeError(f"storescu to {aec} failed: {err.decode()[-400:]}")
    return elapsed


def wait_port(port: int, timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


class Receiver:
    name = ""
    aec = ""

    def start(self, workdir: Path) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class NodeReceiver(Receiver):
    name, aec = "node", "FRACTURE_NODE"

    def start(self, workdir: Path) -> int:
        port = orthanc_ctl.free_port()
        cfg = workdir / "node.toml"
        cfg.write_text(textwrap.dedent(f"""
            keep_results_local = true
            [node]
            ae_title = "FRACTURE_NODE"
            port = {port}
            [[peers]]
            ae_title = "STORESCU"
            host = "127.0.0.1"
            [storage]
            spool_dir = "{workdir / 'spool'}"
            database = "{workdir / 'node.sqlite'}"
            min_free_mb = 256
            [study]
            quiet_seconds = 86400
            [limits]
            max_associations = 16
            """))
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-node", str(cfg)],
                                     stderr=subprocess.DEVNULL)
        wait_port(port)
        return port

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


class StorescpReceiver(Receiver):
    name, aec = "storescp", "STORESCP"

    def start(self, workdir: Path) -> int:
        port = orthanc_ctl.free_port()
        out = workdir / "storescp"
        out.mkdir()
        self.proc = subprocess.Popen(["/usr/bin/storescp", "-aet", "STORESCP", "-od", str(out),
                                      str(port)], env=dict(os.environ, TCP_NODELAY="1"),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        return port

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class OrthancReceiver(Receiver):
    name, aec = "orthanc", "ORTHANC"

    def start(self, workdir: Path) -> int:
        self.orthanc = orthanc_ctl.Orthanc(workdir / "orthanc").start()
        return int(self.orthanc.dicom_port)

    def stop(self) -> None:
        self.orthanc.stop()


def serve_node(config_path: str) -> int:
    """The node as the benchmark runs it: SCP + job database, worker idle."""
    from node.config import load_config
    from node.service import Node
    from node.worker import ProcessedStudy

    def never(job: object) -> ProcessedStudy:  # the quiet period is a day
        raise RuntimeError("the ingest benchmark does not process studies")

    node = Node(load_config(Path(config_path)), lambda: never)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    node.start()
    stop.wait()
    node.stop(grace_seconds=5)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1, help="repeat and keep the median")
    parser.add_argument("--serve-node", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_node:
        return serve_node(args.serve_node)

    base = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        sets = {}
        for label, shape in (("10 MB", (2300, 2200)), ("0.5 MB", (512, 512))):
            d = base / label.replace(" ", "").replace(".", "_")
            total = make_set(d, args.count, shape)
            sets[label] = (sorted(d.glob("*.dcm")), total)
            print(f"set {label}: {args.count} files, {total / 2**20:.0f} MiB", flush=True)
        rows = []
        for label, (files, total) in sets.items():
            for assocs in (1, 4):
                rates: dict[str, float] = {}
                for receiver in (NodeReceiver(), StorescpReceiver(), OrthancReceiver()):
                    times = []
                    for _ in range(args.rounds):
                        work = Path(tempfile.mkdtemp(dir=base))
                        port = receiver.start(work)
                        try:
                            times.append(send(port, receiver.aec, files, assocs))
                        finally:
                            receiver.stop()
                            shutil.rmtree(work, ignore_errors=True)
                    seconds = statistics.median(times)
                    rates[receiver.name] = seconds
                    print(f"  {label:6} x{assocs} -> {receiver.name:8}: {seconds:6.2f} s, "
                          f"{len(files) / seconds:7.1f} img/s, {total / 2**20 / seconds:7.1f} MB/s",
                          flush=True)
                rows.append((label, assocs, len(files), total, rates))
        print("\n| set | assoc | receiver | img/s | MB/s |")
        print("|---|---|---|---|---|")
        for label, assocs, n, total, rates in rows:
            for name, seconds in rates.items():
                print(f"| {label} | {assocs} | {name} | {n / seconds:.1f} | "
                      f"{total / 2**20 / seconds:.1f} |")
        print("\n| set | assoc | node/storescp | node/Orthanc |")
        print("|---|---|---|---|")
        for label, assocs, n, total, rates in rows:
            print(f"| {label} | {assocs} | {rates['storescp'] / rates['node']:.2f} | "
                  f"{rates['orthanc'] / rates['node']:.2f} |")
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
