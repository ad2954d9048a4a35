"""The node core against real peers: DCMTK echoscu/storescu, pynetdicom SCUs, and the
real Orthanc from orthanc-test/.  No socket mocks."""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from conftest import DICOM_DATA, ROOT, Orthanc, free_port, storescu, wait_for, write_config
from nodeharness import CopyProcessor
from node.config import PeerConfig, StudyConfig, config_from_dict, load_config, render_config
from node.errors import ConfigError
from node.scp import STATUS_MISSING_IDENTIFIERS, STATUS_OUT_OF_RESOURCES
from node.service import Node

RADIOGRAPHS = [
    DICOM_DATA / "pydicom-data" / "RG3_UNCR.dcm",          # explicit LE, 6 MB
    DICOM_DATA / "pydicom-data" / "RG3_J2KR.dcm",          # JPEG 2000 lossless
    DICOM_DATA / "pylibjpeg-data" / "RG2_JPLL.dcm",        # JPEG lossless SV1
    DICOM_DATA / "pylibjpeg-data" / "RG2_JLSL.dcm",        # JPEG-LS lossless
    DICOM_DATA / "pylibjpeg-data" / "RG2_JPLY_fixed.dcm",  # JPEG extended
    DICOM_DATA / "pydicom-testfiles" / "MR_small_RLE.dcm",  # RLE (SOP class not ours)
    DICOM_DATA / "pylibjpeg-data" / "966_fixed.dcm",       # DX, MONOCHROME1
]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    port = free_port()
    config = load_config(write_config(tmp_path, port))
    n = Node(config, CopyProcessor)
    n.start()
    yield n
    n.stop(grace_seconds=2)


@pytest.fixture
def any_node(tmp_path: Path, job_database: str) -> Iterator[Node]:
    """The node on each job store: SQLite and PostgreSQL."""
    config = load_config(write_config(tmp_path, free_port(), extra=job_database))
    n = Node(config, CopyProcessor)
    n.start()
    yield n
    n.stop(grace_seconds=2)


def _rows(n: Node, sql: str) -> list[dict]:
    return n.jobs.query(sql)


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"node": {"ae_title": "A" * 17}}, "node.ae_title must not exceed 16 characters"),
        ({"node": {"port": 70000}}, "node.port must be between 0 and 65535"),
        ({"node": {"ae_title": "BAD\\AE"}}, "not allowed in an AE title"),
        ({"destinations": [{"name": "pacs", "ae_title": "PACS", "port": 104}]}, "host"),
        ({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 0}]},
         "destinations[pacs].port must be between 1 and 65535"),
        ({"study": {"quiet_seconds": 0}}, "study.quiet_seconds must be greater than 0"),
        ({"node": {"colour": "red"}}, "node: unknown key(s) colour"),
        ({"limits": {"max_associations": 2.5}}, "limits.max_associations must be an integer"),
        ({"tls": {"enabled": "false"}}, "tls.enabled must be true or false"),
        ({"tls": {"enabled": True, "certificate": "a.crt"}}, "tls.certificate and tls.private_key"),
    ],
)
def test_invalid_config_names_key_and_rule(raw: dict, message: str) -> None:
    raw = {"peers": [{"ae_title": "ORTHANC"}], **raw}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, Path("/tmp"))
    assert message in str(info.value)


def test_shipped_config_is_valid_and_closed_by_default() -> None:
    config = load_config(ROOT / "config.toml", environ={})
    assert config.node.ae_title == "FRACTURE_NODE"
    assert not config.allow_any_peer and config.peers
    assert all(p.host for p in config.peers)



@pytest.mark.parametrize("allow_any_peer", [False, True])
def test_rendered_config_reads_back_as_the_same_config(tmp_path: Path, allow_any_peer: bool) -> None:
    shipped = load_config(ROOT / "config.toml", environ={})
    config = dataclasses.replace(shipped, allow_any_peer=allow_any_peer,
                                 study=StudyConfig(quiet_seconds=0.5))
    path = tmp_path / "config.toml"
    path.write_text(render_config(config))
    assert load_config(path, environ={}) == config

def _cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the installed ``fracture-node`` console script with ``--config config``."""
    exe = ROOT / ".venv" / "bin" / "fracture-node"
    return subprocess.run([str(exe), "--config", str(config), *args],
                          capture_output=True, text=True)


def test_check_config_cli_reports_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n[[peers]]\nae_title = "X"\n')
    out = _cli(bad, "check-config")
    assert out.returncode == 2
    assert "node.ae_title must not exceed 16 characters" in out.stderr


def test_check_config_applies_the_result_object_rules(tmp_path: Path) -> None:
    path = write_config(tmp_path, 11112, extra=(
        '[outputs]\nsc_series_description = "A series description far too long for VR LO"\n'))
    out = _cli(path, "check-config")
    assert out.returncode == 2
    assert "outputs.sc_series_description must fit VR LO (64 characters)" in out.stderr


def test_environment_overrides_only_deployment_fields(tmp_path: Path) -> None:
    path = write_config(tmp_path, 11112)
    config = load_config(path, environ={"FRACTURE_NODE_PORT": "11999"})
    assert config.node.port == 11999


# -- association policy ---------------------------------------------------------------------


def _reject_reason(port: int, calling: str, called: str = "FRACTURE_NODE") -> tuple[int, int, int] | None:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if assoc.is_established:
        assoc.release()
        return None
    assert assoc.is_rejected
    rsp = assoc.acceptor.primitive
    return (rsp.result, rsp.result_source, int(rsp.diagnostic))


def test_echo_with_dcmtk(node: Node) -> None:
    out = subprocess.run(["/usr/bin/echoscu", "-aet", "STORESCU", "-aec", "FRACTURE_NODE", "127.0.0.1",
                          str(node.address[1])], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_unknown_calling_ae_is_rejected(node: Node) -> None:
    assert _reject_reason(node.address[1], "INTRUDER") == (1, 1, 3)
    out = subprocess.run(["/usr/bin/echoscu", "-aet", "INTRUDER", "-aec", "FRACTURE_NODE", "127.0.0.1",
                          str(node.address[1])], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "Calling AE Title Not Recognized" in out.stdout + out.stderr


def test_wrong_called_ae_is_rejected(node: Node) -> None:
    assert _reject_reason(node.address[1], "TESTSCU", called="SOMEONE_ELSE") == (1, 1, 7)


def test_allowed_ae_from_wrong_host_is_rejected(tmp_path: Path) -> None:
    peers = (PeerConfig("TESTSCU", "127.0.0.2"),)
    config = load_config(write_config(tmp_path, free_port(), peers=peers))
    n = Node(config, CopyProcessor)
    n.start()
    try:
        assert _reject_reason(n.address[1], "TESTSCU") == (1, 1, 3)
    finally:
        n.stop(grace_seconds=1)


def test_associations_beyond_the_limit_are_refused(tmp_path: Path) -> None:
    extra = "[limits]\nmax_associations = 1\n"
    config = load_config(write_config(tmp_path, free_port(), extra=extra))
    n = Node(config, CopyProcessor)
    n.start()
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        first = ae.associate("127.0.0.1", n.address[1], ae_title="FRACTURE_NODE")
        assert first.is_established
        second = ae.associate("127.0.0.1", n.address[1], ae_title="FRACTURE_NODE")
        assert second.is_rejected
        rsp = second.acceptor.primitive
        assert (rsp.result, rsp.result_source, int(rsp.diagnostic)) == (2, 3, 2)
        first.release()
    finally:
        n.stop(grace_seconds=1)


# -- receiving ------------------------------------------------------------------------------


def _storescu(port: int, files: list[Path], aet: str = "STORESCU") -> subprocess.CompletedProcess:
    return storescu(port, files, "FRACTURE_NODE", aet)


def test_storescu_instances_are_spooled_byte_identical(node: Node) -> None:
    files = [f for f in RADIOGRAPHS if "MR_" not in f.name]
    out = _storescu(node.address[1], files)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {r["sop_instance_uid"]: r for r in _rows(node, "SELECT * FROM instances")}
    for path in files:
        src = pydicom.dcmread(path)
        row = rows[str(src.SOPInstanceUID)]
        assert row["study_instance_uid"] == src.StudyInstanceUID
        held = pydicom.dcmread(row["path"])
        assert held.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        assert held.PixelData == src.PixelData
        assert oct(Path(row["path"]).stat().st_mode & 0o777) == "0o600"
    # spool and job database are readable by the node's user only
    assert oct(node.spool.root.stat().st_mode & 0o777) == "0o700"
    for suffix in ("", "-wal"):
        db = Path(str(node.config.storage.database) + suffix)
        assert oct(db.stat().st_mode & 0o777) == "0o600", db.name


def test_duplicate_instance_is_acknowledged_once(any_node: Node) -> None:
    node = any_node
    f = RADIOGRAPHS[2]
    assert _storescu(node.address[1], [f]).returncode == 0
    assert _storescu(node.address[1], [f]).returncode == 0
    uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
    rows = _rows(node, "SELECT * FROM instances")
    assert [r["sop_instance_uid"] for r in rows] == [uid]
    files = list((node.spool.root / "incoming").rglob("*.dcm"))
    assert len(files) == 1


def _cr_dataset(study_uid: str | None = "1.2.3.4", sop_uid: str | None = None) -> Dataset:
    ds = pydicom.dcmread(DICOM_DATA / "pylibjpeg-data" / "RG2_JPLL.dcm")
    ds.SOPInstanceUID = sop_uid or generate_uid()
    if study_uid is None:
        del ds.StudyInstanceUID
    else:
        ds.StudyInstanceUID = study_uid
    return ds


def _pynetdicom_store(port: int, datasets: list[Dataset]) -> list[int]:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage,
                             [str(datasets[0].file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACTURE_NODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_reactor_polls_rest_on_a_quiet_association_and_wake_for_its_next_store(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """``node/netpoll.py``: pynetdicom's reactor threads poll every 1 ms; on a quiet
    association the node's wait grow to 20 ms, and a C-STORE sent after the quiet
    spell on the same association is still received and acknowledged."""
    import inspect
    import threading
    from collections import Counter

    import pynetdicom.association
    import pynetdicom.dul

    from node import netpoll

    # the pinned pynetdicom still polls where netpoll expects it to
    assert "time.sleep(self._run_loop_delay)" in inspect.getsource(pynetdicom.dul.DULServiceProvider.run_reactor)
    assert "time.sleep(0.001)" in inspect.getsource(pynetdicom.association.Association._run_reactor)
    assert netpoll.installed()
    assert netpoll.reactor_sleep(0.0) == netpoll.REACTOR_SLEEP == 0.001
    assert netpoll.reactor_sleep(0.05) == pytest.approx(0.005)
    assert netpoll.reactor_sleep(60.0) == netpoll.MAX_SLEEP

    wakes: Counter[str] = Counter()
    sleep = netpoll._ReactorTime.sleep

    def counting(self: netpoll._ReactorTime, seconds: float) -> None:
        if seconds == netpoll.REACTOR_SLEEP:
            wakes[threading.current_thread().name] += 1
        sleep(self, seconds)

    monkeypatch.setattr(netpoll._ReactorTime, "sleep", counting)
    ds = _cr_dataset()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", node.address[1], ae_title="FRACTURE_NODE")
    assert assoc.is_established
    try:
        time.sleep(0.3)
        wakes.clear()
        time.sleep(1.0)  # quiet: pynetdicom as shipped wakes each reactor ~1000 times a second
        quiet = dict(wakes)
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert len(quiet) >= 2, quiet  # the node's acceptor and DUL threads (and the SCU's DUL)
    assert max(quiet.values()) < 200, quiet
    assert int(status.Status) == 0
    held = {r["sop_instance_uid"] for r in _rows(node, "SELECT * FROM instances")}
    assert str(ds.SOPInstanceUID) in held


def test_a_reactor_waiting_for_a_message_never_keeps_its_wake_up_from_a_consumer() -> None:
    """``netpoll``: a quiet association thread waits on its DIMSE queue's condition,
    which a thread sending a request also waits on for the response (``Queue.get``).
    A put wakes one waiter; if it wakes the reactor, the reactor hands the wake-up on.
    Without that, the sender slept until its DIMSE timeout (seen once: every result of a
    burst delivered ~89 s late)."""
    import queue
    import threading
    from types import SimpleNamespace

    from node import netpoll

    q: queue.Queue[str] = queue.Queue()
    assoc = SimpleNamespace(dimse=SimpleNamespace(msg_queue=q))
    reactor = threading.Thread(target=netpoll._wait_for_message, args=(assoc, 10.0))
    reactor.start()
    time.sleep(0.2)  # the reactor waits first, so the put's notify() goes to it
    got: list[tuple[str, float]] = []

    def consumer() -> None:
        t = time.monotonic()
        got.append((q.get(timeout=10.0), time.monotonic() - t))

    sender = threading.Thread(target=consumer)
    sender.start()
    time.sleep(0.2)
    q.put("C-STORE-RSP")
    sender.join(timeout=15)
    reactor.join(timeout=15)
    assert got and got[0][0] == "C-STORE-RSP"
    assert got[0][1] < 5.0, f"the response waited {got[0][1]:.1f} s for a wake-up"


def test_missing_study_uid_gets_failure_status_and_neighbours_survive(node: Node) -> None:
    good1, bad, good2 = _cr_dataset(), _cr_dataset(study_uid=None), _cr_dataset()
    statuses = _pynetdicom_store(node.address[1], [good1, bad, good2])
    assert statuses == [0, STATUS_MISSING_IDENTIFIERS, 0]
    held = {r["sop_instance_uid"] for r in _rows(node, "SELECT * FROM instances")}
    assert held == {good1.SOPInstanceUID, good2.SOPInstanceUID}


def test_disk_full_answers_out_of_resources_then_recovers(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the tmpfs test needs root (the tests run as root here)")
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    try:
        config = load_config(write_config(tmp_path, free_port(), spool_dir=mount / "spool"))
        n = Node(config, CopyProcessor)
        n.start()
        try:
            datasets = [_cr_dataset() for _ in range(6)]  # ~2 MB each, 8 MB of tmpfs
            statuses = _pynetdicom_store(n.address[1], datasets)
            assert STATUS_OUT_OF_RESOURCES in statuses and statuses[0] == 0
            stored = [ds for ds, s in zip(datasets, statuses) if s == 0]
            assert not list((mount / "spool" / "tmp").iterdir()), "partial file left behind"
            held = {r["sop_instance_uid"] for r in _rows(n, "SELECT * FROM instances")}
            assert held == {ds.SOPInstanceUID for ds in stored}
            for row in _rows(n, "SELECT path FROM instances"):
                assert pydicom.dcmread(row["path"]).PixelData  # whole files only
            # free space, and it accepts again
            for row in _rows(n, "SELECT path FROM instances"):
                Path(row["path"]).unlink()
            assert _pynetdicom_store(n.address[1], [_cr_dataset()]) == [0]
        finally:
            n.stop(grace_seconds=1)
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# -- grouping, delivery, retries --------------------------------------------------------------


def test_study_waits_for_quiet_period_and_open_association(any_node: Node) -> None:
    node = any_node
    ae = AE(ae_title="TESTSCU")
    ds = _cr_dataset(study_uid="1.2.826.0.1.3680043.10.1")
    ae.add_requested_context(ComputedRadiographyImageStorage, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", node.address[1], ae_title="FRACTURE_NODE")
    assert int(assoc.send_c_store(ds).Status) == 0
    time.sleep(node.config.study.quiet_seconds * 3)
    state = _rows(node, "SELECT state FROM studies")[0]["state"]
    assert state == "pending", "study processed while its association was still open"
    assoc.release()
    wait_for(lambda: _rows(node, "SELECT state FROM studies")[0]["state"] == "processed")


@pytest.fixture
def orthanc_and_node(tmp_path: Path, job_database: str) -> Iterator[tuple[Orthanc, Node]]:
    """Orthanc and the node, on each job store (SQLite and PostgreSQL)."""
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port=node_port).start()
    config = load_config(write_config(
        tmp_path, node_port,
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "port": orthanc.dicom_port}],
        extra=job_database,
    ))
    n = Node(config, CopyProcessor)
    n.start()
    yield orthanc, n
    n.stop(grace_seconds=2)
    orthanc.stop()


def test_orthanc_pushes_study_and_results_come_back(orthanc_and_node: tuple[Orthanc, Node]) -> None:
    orthanc, node = orthanc_and_node
    src = RADIOGRAPHS[0].read_bytes()
    up = orthanc.upload(src)
    orthanc.post("/modalities/fracture-node/store", {"Resources": [up["ID"]], "Synchronous": True})
    study_uid = str(pydicom.dcmread(RADIOGRAPHS[0], stop_before_pixels=True).StudyInstanceUID)
    instances = wait_for(lambda: len(orthanc.study_instances(study_uid)) == 2 and
                         orthanc.study_instances(study_uid))
    manufacturers = sorted(i["tags"].get("Manufacturer", "") for i in instances)
    assert "fracture-node" in manufacturers
    wait_for(lambda: all(r["state"] == "delivered" for r in _rows(node, "SELECT state FROM outbox")))
    # the file goes once every destination has acknowledged it (just after the state)
    wait_for(lambda: not list((node.spool.root / "outbox").rglob("*.dcm")), timeout=10)


def test_delivery_waits_for_orthanc_to_come_back(orthanc_and_node: tuple[Orthanc, Node]) -> None:
    orthanc, node = orthanc_and_node
    orthanc.stop()
    assert _storescu(node.address[1], [RADIOGRAPHS[2]]).returncode == 0
    wait_for(lambda: any(r["attempts"] >= 2 for r in _rows(node, "SELECT * FROM outbox")))
    assert _rows(node, "SELECT state FROM outbox")[0]["state"] == "pending"
    orthanc.start()
    wait_for(lambda: _rows(node, "SELECT state FROM outbox")[0]["state"] == "delivered",
             timeout=30)
    study_uid = str(pydicom.dcmread(RADIOGRAPHS[2], stop_before_pixels=True).StudyInstanceUID)
    assert len(orthanc.study_instances(study_uid)) == 1


def test_destination_that_rejects_becomes_dead_letter(tmp_path: Path, job_database: str) -> None:
    reject_port = free_port()
    refuser = AE(ae_title="REFUSER")
    refuser.add_supported_context(ComputedRadiographyImageStorage)
    refuser.require_calling_aet = ["SOMEBODY_ELSE"]
    server = refuser.start_server(("127.0.0.1", reject_port), block=False)
    config = load_config(write_config(
        tmp_path, free_port(),
        destinations=[{"name": "refuser", "ae_title": "REFUSER", "port": reject_port}],
        extra=job_database,
    ))
    n = Node(config, CopyProcessor)
    n.start()
    try:
        assert _storescu(n.address[1], [RADIOGRAPHS[2]]).returncode == 0
        row = wait_for(lambda: [r for r in _rows(n, "SELECT * FROM outbox") if r["state"] == "dead"])
        assert "rejected" in row[0]["last_error"]
        assert row[0]["attempts"] == 2
        status = _cli(tmp_path / "config.toml", "status")
        assert "dead" in status.stdout and "rejected" in status.stdout
    finally:
        n.stop(grace_seconds=1)
        server.shutdown()


def test_sigkill_mid_study_loses_nothing_and_delivers_once(tmp_path: Path) -> None:
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port=node_port).start()
    try:
        cfg = write_config(tmp_path, node_port, quiet_seconds=1.0, destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "port": orthanc.dicom_port}])
        ready = tmp_path / "ready"

        def start() -> subprocess.Popen:
            ready.unlink(missing_ok=True)
            proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "nodeharness.py"),
                                     str(cfg), str(ready)], cwd=ROOT / "tests",
                                    stderr=open(tmp_path / "node.log", "ab"))
            wait_for(ready.exists, timeout=60)
            return proc

        study = "1.2.826.0.1.3680043.10.99"
        datasets = [_cr_dataset(study_uid=study) for _ in range(6)]
        proc = start()
        assert _pynetdicom_store(node_port, datasets[:3]) == [0, 0, 0]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = start()
        assert _pynetdicom_store(node_port, datasets[3:]) == [0, 0, 0]
        wait_for(lambda: len(orthanc.study_instances(study)) == 6, timeout=60)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        con = sqlite3.connect(tmp_path / "node.sqlite")
        held = {r[0] for r in con.execute("SELECT sop_instance_uid FROM instances")}
        assert held == {str(ds.SOPInstanceUID) for ds in datasets}
        states = [r[0] for r in con.execute("SELECT state FROM outbox")]
        assert states == ["delivered"] * 6
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        orthanc.stop()


_WRITER = """
import sys, time
from pathlib import Path
from node.jobs import InstanceRecord, JobStore
store = JobStore(Path(sys.argv[1]))
i = 0
while True:
    uid = f"1.2.3.{i}"
    store.record_instance(InstanceRecord(uid, f"1.2.4.{i % 7}", "1.2.5", "1.2.840.10008.5.1.4.1.1.1",
                                         "1.2.840.10008.1.2.1", f"/spool/{uid}.dcm", 1000,
                                         "TESTSCU", "127.0.0.1:1"))
    print(i, flush=True)
    i += 1
"""


def test_kill_during_heavy_writes_keeps_database_intact(tmp_path: Path) -> None:
    """SIGKILL a process in the middle of a stream of committed transactions (WAL,
    synchronous=FULL): the database opens intact and holds every transaction the
    writer had seen committed."""
    db = tmp_path / "jobs.sqlite"
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(db)], stdout=subprocess.PIPE,
                                text=True, cwd=ROOT)
        assert proc.stdout is not None
        seen = -1
        deadline = time.monotonic() + 0.4 + 0.3 * _
        for line in proc.stdout:
            seen = int(line)
            if time.monotonic() > deadline and seen > 20:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        con = sqlite3.connect(db)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = con.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
        con.close()
        assert rows >= seen + 1, "a committed transaction was lost"
        db.unlink()
        for suffix in ("-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)


def test_the_ready_file_is_written_whole_by_a_rename(tmp_path: Path) -> None:
    """``serve --ready-file`` is polled for by supervisors and tests: it appears with its
    whole text or not at all (a reader that saw it exist once read it empty, on a fast
    machine), and replaces an old one from an earlier run, leaving no temporary file."""
    from node.cli import _write_ready_file

    ready = tmp_path / "ready"
    ready.write_text("127.0.0.1:1\n")
    _write_ready_file(ready, "127.0.0.1:11112\n")
    assert ready.read_text() == "127.0.0.1:11112\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ready"]
