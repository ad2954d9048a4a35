"""The DICOM audit trail (PS3.15 Annex A.5, the DICOM Audit Message schema).

Messages: Application Activity (start, stop), Security Alert (an association
rejected by the node's policy: Node Authentication), DICOM Instances Transferred
(received from a modality or PACS, per association and study; sent to a
destination, per result object).  Each carries AE titles, network addresses, the
Study Instance UID and SOP classes; never a patient name or id.

Every message is appended to a JSON-lines file, and, when ``[audit] syslog_host`` is
set, sent as RFC 5424 syslog (facility authpriv, severity notice, MSGID
``IHE+RFC-3881``, the message as XML) over UDP, TCP (RFC 6587 octet counting) or TLS
(RFC 5425).  A message is written to a spool folder before it is sent and deleted
only once sent, so an unreachable audit repository loses nothing: a thread retries
with back-off, oldest first.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import ssl
import threading
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from node.config import Config

logger = logging.getLogger(__name__)

# Coded values of PS3.16 (DCM) used by the messages.
APPLICATION_ACTIVITY = ("110100", "DCM", "Application Activity")
APPLICATION_START = ("110120", "DCM", "Application Start")
APPLICATION_STOP = ("110121", "DCM", "Application Stop")
SECURITY_ALERT = ("110113", "DCM", "Security Alert")
NODE_AUTHENTICATION = ("110126", "DCM", "Node Authentication")
INSTANCES_TRANSFERRED = ("110104", "DCM", "DICOM Instances Transferred")
ROLE_APPLICATION = ("110150", "DCM", "Application")
ROLE_SOURCE = ("110153", "DCM", "Source Role ID")
ROLE_DESTINATION = ("110152", "DCM", "Destination Role ID")
STUDY_UID_TYPE = ("110180", "DCM", "Study Instance UID")

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"


def _code(value: tuple[str, str, str]) -> dict[str, str]:
    return {"csd-code": value[0], "codeSystemName": value[1], "originalText": value[2]}


def _participant(ae_title: str, address: str, role: tuple[str, str, str] | None,
                 requestor: bool) -> dict[str, Any]:
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 else address
    out: dict[str, Any] = {"UserID": ae_title, "AlternativeUserID": f"AETITLES={ae_title}",
                           "UserIsRequestor": requestor, "NetworkAccessPointID": host,
                           "NetworkAccessPointTypeCode": "2" if _is_ip(host) else "1"}
    if role is not None:
        out["RoleIDCode"] = _code(role)
    return out


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class AuditTrail:
    """Writes audit messages to the JSON-lines file and the syslog spool.

    Parameters
    ----------
    config
        The node's configuration (``[audit]``, ``[node]`` and ``[tls]``).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        audit = config.audit
        self.file = audit.file
        self.spool = audit.file.parent / "syslog-spool"
        for folder in (self.file.parent, self.spool):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.hostname = socket.gethostname()
        if audit.syslog_host is not None:
            self._thread = threading.Thread(target=self._send_loop, name="audit-syslog",
                                            daemon=True)
            self._thread.start()

    # -- the messages ------------------------------------------------------------------

    def _source(self) -> dict[str, Any]:
        return {"AuditSourceID": self.config.node.ae_title,
                "AuditEnterpriseSiteID": self.hostname,
                "AuditSourceTypeCode": {"csd-code": "4", "codeSystemName": "DCM",
                                        "originalText": "Application Server Process"}}

    def _me(self, role: tuple[str, str, str] | None, requestor: bool) -> dict[str, Any]:
        node = self.config.node
        me = _participant(node.ae_title, node.bind_address, role, requestor)
        me["UserID"] = f"{node.ae_title} (pid {os.getpid()})"
        return me

    def application(self, started: bool) -> None:
        """Application Activity: start or stop of ``serve`` (PS3.15 A.5.3.1)."""
        self.emit(APPLICATION_ACTIVITY, "E", SUCCESS,
                  APPLICATION_START if started else APPLICATION_STOP,
                  [self._me(ROLE_APPLICATION, False)], [])

    def association_rejected(self, calling: str, address: str, reason: str) -> None:
        """Security Alert, Node Authentication: an association refused by the policy
        (PS3.15 A.5.3.11)."""
        self.emit(SECURITY_ALERT, "E", MINOR_FAILURE, NODE_AUTHENTICATION,
                  [_participant(calling, address, None, True), self._me(None, False)], [],
                  description=reason)

    def tls_failure(self, address: str, reason: str) -> None:
        """Security Alert, Node Authentication: a failed DICOM TLS handshake."""
        self.emit(SECURITY_ALERT, "E", SERIOUS_FAILURE, NODE_AUTHENTICATION,
                  [_participant("?", address, None, True), self._me(None, False)], [],
                  description=reason)

    def instances_transferred(self, *, received: bool, peer_ae: str, peer_address: str,
                              study_instance_uid: str, sop_classes: dict[str, int],
                              outcome: str = SUCCESS) -> None:
        """DICOM Instances Transferred (PS3.15 A.5.3.4): ``received`` from a sender
        (action C, the node is the destination) or sent to a destination (action R)."""
        peer_role, my_role = ((ROLE_SOURCE, ROLE_DESTINATION) if received
                              else (ROLE_DESTINATION, ROLE_SOURCE))
        participants = [_participant(peer_ae, peer_address, peer_role, received),
                        self._me(my_role, not received)]
        study = {"ParticipantObjectID": study_instance_uid,
                 "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3",
                 "ParticipantObjectIDTypeCode": _code(STUDY_UID_TYPE),
                 "ParticipantObjectDescription": {
                     "SOPClass": [{"UID": uid, "NumberOfInstances": n}
                                  for uid, n in sorted(sop_classes.items())]}}
        self.emit(INSTANCES_TRANSFERRED, "C" if received else "R", outcome, None,
                  participants, [study])

    def emit(self, event_id: tuple[str, str, str], action: str, outcome: str,
             event_type: tuple[str, str, str] | None, participants: list[dict[str, Any]],
             objects: list[dict[str, Any]], description: str | None = None) -> dict[str, Any]:
        """Record one message: the JSON line first, then the syslog spool."""
        event: dict[str, Any] = {
            "EventID": _code(event_id), "EventActionCode": action,
            "EventDateTime": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": outcome}
        if event_type is not None:
            event["EventTypeCode"] = _code(event_type)
        if description:
            event["EventOutcomeDescription"] = description
        message = {"EventIdentification": event, "ActiveParticipant": participants,
                   "AuditSourceIdentification": self._source(),
                   "ParticipantObjectIdentification": objects}
        line = json.dumps(message, separators=(",", ":"))
        with self._lock:
            with self.file.open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            if self._thread is not None:
                name = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}"
                tmp = self.spool / f".{name}.tmp"
                tmp.write_text(to_syslog(message, self.hostname), encoding="utf-8")
                tmp.rename(self.spool / f"{name}.msg")
        self._wake.set()
        return message

    # -- the syslog sender ------------------------------------------------------------

    def _connect(self) -> socket.socket:
        audit = self.config.audit
        assert audit.syslog_host is not None
        if audit.syslog_protocol == "udp":
            sock = socket.socket(socket.AF_INET6 if ":" in audit.syslog_host else socket.AF_INET,
                                 socket.SOCK_DGRAM)
            sock.connect((audit.syslog_host, audit.syslog_port))
            return sock
        sock = socket.create_connection((audit.syslog_host, audit.syslog_port), timeout=10)
        if audit.syslog_protocol == "tls":
            ctx = ssl.create_default_context(
                cafile=str(self.config.tls.ca_certificates) if self.config.tls.ca_certificates
                else None)
            if self.config.tls.certificate and self.config.tls.private_key:
                ctx.load_cert_chain(str(self.config.tls.certificate),
                                    str(self.config.tls.private_key))
            sock = ctx.wrap_socket(sock, server_hostname=audit.syslog_host)
        return sock

    def _send_loop(self) -> None:
        audit = self.config.audit
        sock: socket.socket | None = None
        delay = 1.0
        failing_since: str | None = None
        while not self._stop.is_set():
            pending = sorted(self.spool.glob("*.msg"))
            if not pending:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                if sock is None:
                    sock = self._connect()
                for path in pending:
                    data = path.read_bytes()
                    if audit.syslog_protocol == "udp":
                        sock.send(data)
                    else:
                        sock.sendall(str(len(data)).encode() + b" " + data)  # RFC 6587 3.4.1
                    path.unlink()
                if failing_since is not None:
                    logger.info("audit repository %s:%d reachable again; spooled messages sent",
                                audit.syslog_host, audit.syslog_port)
                failing_since = None
                delay = 1.0
            except (OSError, ssl.SSLError) as exc:
                if sock is not None:
                    sock.close()
                sock = None
                if failing_since is None:
                    failing_since = str(exc)
                    logger.warning("audit repository %s:%d (%s) unreachable: %s; %d message(s) "
                                   "kept in %s, retrying", audit.syslog_host, audit.syslog_port,
                                   audit.syslog_protocol, exc, len(pending), self.spool)
                self._stop.wait(delay)
                delay = min(delay * 2, 60.0)
        if sock is not None:
            sock.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the sender after it has tried to send what is spooled (what is left
        stays in the spool for the next start)."""
        if self._thread is not None:
            deadline = timeout
            while deadline > 0 and any(self.spool.glob("*.msg")):
                self._wake.set()
                self._stop.wait(0.1)
                deadline -= 0.1
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout=timeout)


def to_xml(message: dict[str, Any]) -> str:
    """The message in the DICOM Audit Message schema's XML form (PS3.15 A.5.1)."""
    root = ET.Element("AuditMessage")

    def coded(parent: ET.Element, tag: str, value: dict[str, str]) -> None:
        ET.SubElement(parent, tag, {k: str(v) for k, v in value.items()})

    event = message["EventIdentification"]
    attrs = {k: str(event[k]) for k in ("EventActionCode", "EventDateTime",
                                        "EventOutcomeIndicator")}
    ev = ET.SubElement(root, "EventIdentification", attrs)
    coded(ev, "EventID", event["EventID"])
    if "EventTypeCode" in event:
        coded(ev, "EventTypeCode", event["EventTypeCode"])
    if "EventOutcomeDescription" in event:
        ET.SubElement(ev, "EventOutcomeDescription").text = event["EventOutcomeDescription"]
    for p in message["ActiveParticipant"]:
        el = ET.SubElement(root, "ActiveParticipant", {
            k: (str(v).lower() if isinstance(v, bool) else str(v))
            for k, v in p.items() if k != "RoleIDCode"})
        if "RoleIDCode" in p:
            coded(el, "RoleIDCode", p["RoleIDCode"])
    source = message["AuditSourceIdentification"]
    src = ET.SubElement(root, "AuditSourceIdentification", {
        "AuditSourceID": source["AuditSourceID"],
        "AuditEnterpriseSiteID": source["AuditEnterpriseSiteID"]})
    coded(src, "AuditSourceTypeCode", source["AuditSourceTypeCode"])
    for o in message["ParticipantObjectIdentification"]:
        el = ET.SubElement(root, "ParticipantObjectIdentification", {
            k: str(o[k]) for k in ("ParticipantObjectID", "ParticipantObjectTypeCode",
                                   "ParticipantObjectTypeCodeRole")})
        coded(el, "ParticipantObjectIDTypeCode", o["ParticipantObjectIDTypeCode"])
        desc = ET.SubElement(el, "ParticipantObjectDescription")
        for sop in o["ParticipantObjectDescription"]["SOPClass"]:
            ET.SubElement(desc, "SOPClass", {"UID": sop["UID"],
                                             "NumberOfInstances": str(sop["NumberOfInstances"])})
    return ET.tostring(root, encoding="unicode")


def to_syslog(message: dict[str, Any], hostname: str) -> str:
    """RFC 5424: ``<85>1 TIMESTAMP HOST fracture-node PID IHE+RFC-3881 - BOM XML``
    (facility 10 authpriv, severity 5 notice, as IHE ATNA uses)."""
    ts = message["EventIdentification"]["EventDateTime"].replace("+00:00", "Z")
    return f"<85>1 {ts} {hostname} fracture-node {os.getpid()} IHE+RFC-3881 - \ufeff" + \
        to_xml(message)
