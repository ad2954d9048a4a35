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

import psycopg
import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import LEASE_SECONDS, ROOT, Orthanc, free_port, wait_for, write_config

EXE = ROOT / ".venv" / "bin" / "fracture-node"
DEMO = sorted((ROOT / "demo" / "studies" / "forearm").glob("*.dcm"))


class ServedNode:
    def __init__(self, tmp: Path, orthanc: Orthanc, port: int, database: str = "") -> None:
        self.tmp = tmp
        self.port = port
        self.url = load_config_url(database)
        self.config = write_config(tmp, port, quiet_seconds=1.0, destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "port": orthanc.dicom_port}],
            extra=database)
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
        if self.url:  # PostgreSQL
            with psycopg.connect(self.url) as conn:
                return [tuple(r) for r in conn.execute(sql).fetchall()]
        con = sqlite3.connect(self.tmp / "node.sqlite", timeout=10)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()


def load_config_url(database: str) -> str:
    """The PostgreSQL URL in a ``job_database`` TOML section ("" for SQLite)."""
    import tomllib

    return str(tomllib.loads(database).get("database", {}).get("url", "")) if database else ""


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
        except (sqlite3.OperationalError, psycopg.OperationalError):
            pass
        time.sleep(0.005)
    raise AssertionError("the phase to interrupt never came")


@pytest.fixture(params=[
    pytest.param(("receive", "sqlite"), id="receive"),
    pytest.param(("inference", "sqlite"), id="inference"),
    pytest.param(("delivery", "sqlite"), id="delivery"),
    pytest.param(("inference", "postgres"), id="inference-postgres"),
])
def phase_and_store(request: pytest.FixtureRequest) -> tuple[str, str]:
    """Where the kill falls, and the job store.  On PostgreSQL the interesting phase
    is inference: the killed process holds the study's lease, and the restarted one
    (a new node id) takes it over only once that lease has expired."""
    return tuple(request.param)  # type: ignore[return-value]


@pytest.fixture
def job_database(phase_and_store: tuple[str, str]) -> str:
    """conftest's job store fixture, for the store this case names."""
    if phase_and_store[1] == "sqlite":
        return ""
    from pgserver import shared_server

    url = shared_server().new_database()
    return (f'[database]\nurl = "{url}"\nlease_seconds = {LEASE_SECONDS}\n'
            'heartbeat_seconds = 0.5\n')


def test_sigkill_then_restart_loses_nothing(tmp_path: Path, phase_and_store: tuple[str, str],
                                            job_database: str) -> None:
    phase = phase_and_store[0]
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port=port).start()
    node = ServedNode(tmp_path, orthanc, port, job_database)
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
        killed_owner = node.db("SELECT owner FROM studies")[0][0] if node.url else None
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
        if node.url:  # the restarted process is another node id: it took the study over
            assert killed_owner is not None
            (processed_by,), = node.db("SELECT processed_by FROM studies")
            assert processed_by and processed_by != killed_owner, (processed_by, killed_owner)
            assert node.db("SELECT 1 FROM studies WHERE owner IS NOT NULL") == []
        else:
            assert node.db("PRAGMA integrity_check") == [("ok",)]
    finally:
        node.stop()
        orthanc.stop()
