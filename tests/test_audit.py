"""The audit trail against a real syslog receiver started by the test (a TCP socket
server reading RFC 6587 octet-counted RFC 5424 frames): a run with one rejected
association and one study gives Application Start, a Security Alert, DICOM
Instances Transferred (received and sent) and Application Stop, in the JSON-lines
file and at the receiver, also when the receiver comes up only after the messages
were written (spool and retry)."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from conftest import DICOM_DATA, free_port, wait_for, write_config
from nodeharness import CopyProcessor
from node.config import load_config
from node.service import Node
from test_tls import pki  # noqa: F401  (the test CA, node and client certificates)

STUDY = "1.2.826.0.1.3680043.10.5151"


class SyslogReceiver:
    """A TCP syslog server (RFC 6587 octet counting) collecting messages."""

    def __init__(self, port: int) -> None:
        self.messages: list[str] = []
        self._server = socket.create_server(("127.0.0.1", port))
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                while b" " in buffer:
                    length, _, rest = buffer.partition(b" ")
                    n = int(length)
                    if len(rest) < n:
                        break
                    self.messages.append(rest[:n].decode("utf-8"))
                    buffer = rest[n:]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()


def _event(xml_text: str) -> tuple[str, str | None]:
    root = ET.fromstring(xml_text)
    ev = root.find("EventIdentification")
    assert ev is not None
    event_id = ev.find("EventID")
    event_type = ev.find("EventTypeCode")
    assert event_id is not None
    return event_id.get("originalText", ""), (event_type.get("originalText")
                                              if event_type is not None else None)


def test_audit_messages_reach_the_syslog_receiver_after_it_comes_up(tmp_path: Path) -> None:
    syslog_port = free_port()
    extra = (f'[audit]\nenabled = true\nfile = "{tmp_path / "audit" / "audit.jsonl"}"\n'
             f'syslog_host = "127.0.0.1"\nsyslog_port = {syslog_port}\nsyslog_protocol = "tcp"\n')
    refuser_port = free_port()
    archive = AE(ae_title="ARCHIVE")
    archive.add_supported_context(ComputedRadiographyImageStorage,
                                  pydicom.uid.AllTransferSyntaxes)
    server = archive.start_server(("127.0.0.1", refuser_port), block=False,
                                  evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    config = load_config(write_config(tmp_path, free_port(), extra=extra, destinations=[
        {"name": "archive", "ae_title": "ARCHIVE", "port": refuser_port}]))
    node = Node(config, CopyProcessor)
    node.start()
    receiver = None
    try:
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(Verification)
        assert ae.associate("127.0.0.1", node.address[1], ae_title="FRACTURE_NODE").is_rejected
        ds = pydicom.dcmread(DICOM_DATA / "pylibjpeg-data" / "RG2_JPLL.dcm")
        ds.StudyInstanceUID = STUDY
        ds.SOPInstanceUID = generate_uid()
        ds.PatientName = "Secret^Patient"
        ds.PatientID = "PID-123987"
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(ComputedRadiographyImageStorage,
                                 [str(ds.file_meta.TransferSyntaxUID)])
        assoc = ae.associate("127.0.0.1", node.address[1], ae_title="FRACTURE_NODE")
        assert int(assoc.send_c_store(ds).Status) == 0
        assoc.release()
        wait_for(lambda: node.jobs.counts()["outbox"].get("delivered") == 1, timeout=60)
        spool = tmp_path / "audit" / "syslog-spool"
        wait_for(lambda: len(list(spool.glob("*.msg"))) >= 4)  # nobody listens yet: kept
        receiver = SyslogReceiver(syslog_port)  # the audit repository comes up
        wait_for(lambda: len(receiver.messages) >= 4, timeout=90)
    finally:
        node.stop(grace_seconds=1)
        server.shutdown()
    wait_for(lambda: len(receiver.messages) >= 5, timeout=30)  # + Application Stop
    receiver.stop()
    assert not list(spool.glob("*.msg")), "sent messages left in the spool"

    frames = receiver.messages
    assert all(f.startswith("<85>1 ") and " fracture-node " in f and " IHE+RFC-3881 - \ufeff" in f
               for f in frames)
    events = [_event(f.split("\ufeff", 1)[1]) for f in frames]
    assert events[0] == ("Application Activity", "Application Start")
    assert events[-1] == ("Application Activity", "Application Stop")
    assert ("Security Alert", "Node Authentication") in events
    transferred = [f for f, e in zip(frames, events) if e[0] == "DICOM Instances Transferred"]
    assert len(transferred) == 2
    actions = sorted(ET.fromstring(f.split("\ufeff", 1)[1]).find("EventIdentification")
                     .get("EventActionCode") for f in transferred)
    assert actions == ["C", "R"]  # received from TESTSCU, sent to the archive
    for f in transferred:
        assert STUDY in f and "AETITLES=" in f
    alert = next(f for f, e in zip(frames, events) if e[0] == "Security Alert")
    assert "INTRUDER" in alert and "not in the allow list" in alert
    lines = [json.loads(line) for line in
             (tmp_path / "audit" / "audit.jsonl").read_text().splitlines()]
    assert [m["EventIdentification"]["EventID"]["originalText"] for m in lines] == \
        [e[0] for e in events]
    everything = "\n".join(frames) + (tmp_path / "audit" / "audit.jsonl").read_text()
    assert "Secret" not in everything and "PID-123987" not in everything


def test_a_failed_tls_handshake_is_logged_and_audited(
        tmp_path: Path, pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    extra = (f'[tls]\nenabled = true\ncertificate = "{pki / "node.crt"}"\n'
             f'private_key = "{pki / "node.key"}"\nca_certificates = "{pki / "ca.crt"}"\n'
             f'[audit]\nenabled = true\nfile = "{tmp_path / "audit.jsonl"}"\n')
    config = load_config(write_config(tmp_path, free_port(), extra=extra))
    node = Node(config, CopyProcessor)
    caplog.set_level(logging.WARNING, logger="node.scp")
    node.start()
    try:
        out = subprocess.run(["/usr/bin/echoscu", "-aet", "STORESCU", "-aec", "FRACTURE_NODE",
                              "127.0.0.1", str(node.address[1])], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode != 0  # plain DICOM to a TLS-only node
        wait_for(lambda: any("TLS handshake failed" in r.getMessage() for r in caplog.records))
    finally:
        node.stop(grace_seconds=1)
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    alerts = [m for m in lines if m["EventIdentification"]["EventID"]["originalText"]
              == "Security Alert"]
    assert len(alerts) == 1
    assert alerts[0]["EventIdentification"]["EventOutcomeIndicator"] == "8"
    assert "TLS handshake failed" in alerts[0]["EventIdentification"]["EventOutcomeDescription"]
