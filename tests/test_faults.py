"""Faults with the real node process (``fracture-node serve``, real models) and the
real Orthanc: SIGKILL during receive, during inference and during delivery; after a
restart nothing acknowledged is lost, every study gets its results, the archive holds
no duplicate object, and the job database is intact."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import ROOT, Orthanc, free_port, wait_for, write_config

EXE = ROOT / ".venv" / "bin" / "fracture-node"
DEMO = sorted((ROOT / "demo" / "studies" / "forearm").glob("*.dcm"))


class ServedNode:
    def __init__(self, tmp: Path, orthanc: Orthanc, port: int) -> None:
        self.tmp = tmp
        self.port = port
        self.config = write_config(tmp, port, quiet_seconds=1.0, destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "port": orthanc.dicom_port}])
        self.ready = tmp / "ready"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [str(EXE), "--config", str(self.config), "serve", "--ready-file", str(self.ready)],
            stderr=(self.tmp / "node.log").open("ab"))
        wait_for(self.ready.exists, timeout=120)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)

    def db(self, sql: str) -> list[tuple]:  # type: ignore[type-arg]
        con = sqlite3.connect(self.tmp / "node.sqlite", timeout=10)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()


def _study(tmp: Path, name: str) -> tuple[str, list[Path]]:
    study_uid = generate_uid()
    out = []
    for f in DEMO[:4]:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = study_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = tmp / f"{name}_{f.name}"
        ds.save_as(path)
        out.append(path)
    return study_uid, out


def _send(port: int, files: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", "FRACTURE_NODE", "-xe",
                           "127.0.0.1", str(port), *map(str, files)], capture_output=True,
                          timeout=120)


def _kill_when(node: ServedNode, condition: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                node.kill()
                return
        except sqlite3.OperationalError:
            pass
        time.sleep(0.005)
    raise AssertionError("the phase to interrupt never came")


@pytest.mark.parametrize("phase", ["receive", "inference", "delivery"])
def test_sigkill_then_restart_loses_nothing(tmp_path: Path, phase: str) -> None:
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port=port).start()
    node = ServedNode(tmp_path, orthanc, port)
    try:
        node.start()
        study_uid, files = _study(tmp_path, phase)
        if phase == "receive":
            sender = threading.Thread(target=_send, args=(port, files))
            sender.start()
            _kill_when(node, lambda: len(node.db("SELECT 1 FROM instances")) >= 2)
            sender.join()
        else:
            assert _send(port, files).returncode == 0
            if phase == "inference":
                _kill_when(node, lambda: node.db("SELECT state FROM studies") == [("processing",)])
            else:
                _kill_when(node, lambda: bool(node.db("SELECT 1 FROM outbox")))
        acknowledged = {r[0] for r in node.db("SELECT sop_instance_uid FROM instances")}
        node.start()
        missing = [f for f in files if str(pydicom.dcmread(f, stop_before_pixels=True)
                                           .SOPInstanceUID) not in acknowledged]
        if missing:  # what the killed association did not get acknowledged, resent
            assert _send(port, missing).returncode == 0
        wait_for(lambda: node.db("SELECT state FROM studies") == [("processed",)] and not
                 node.db("SELECT 1 FROM outbox WHERE state != 'delivered'"), timeout=180)
        held = {r[0] for r in node.db("SELECT sop_instance_uid FROM instances")}
        assert acknowledged <= held, "an acknowledged instance was lost"
        queued = node.db("SELECT sop_instance_uid FROM outbox")
        assert len(queued) == len(set(queued)), "a result was queued twice"
        in_archive = [i["tags"]["SOPInstanceUID"] for i in orthanc.study_instances(study_uid)]
        assert sorted(in_archive) == sorted(r[0] for r in queued)
        assert node.db("PRAGMA integrity_check") == [("ok",)]
    finally:
        node.stop()
        orthanc.stop()
