"""The Storage SCP: C-ECHO and C-STORE, association policy, durable receive.

The C-STORE handler checks the identifying attributes, writes the dataset as
received (no decode, no re-encode) to the spool with temporary file + fsync + rename,
records it in the job database, and only then answers 0x0000.  Inference never runs
inside an association.  Only this module maps exceptions to DIMSE statuses
(PS3.4 B.2.3, PS3.7 C.4.2.1.4).
"""

from __future__ import annotations

import errno
import io
import logging
import socket
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pydicom
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from node.config import Config
from node.errors import DatasetError, MissingIdentifierError, SpoolError, StartError
from node.jobs import InstanceRecord, JobStoreBackend
from node import netpoll
from node.spool import Spool, safe_uid
from node.tls import server_context
from pipeline.result import NODE_MANUFACTURER

if TYPE_CHECKING:
    from node.audit import AuditTrail
    from node.metrics import NodeMetrics

logger = logging.getLogger(__name__)

# C-STORE statuses we answer (PS3.4 Table B.2-1); named, never bare numbers.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
"""Refused: out of resources (disk full, below the free-space floor, write failed)."""
STATUS_CANNOT_UNDERSTAND = 0xC210
"""Error: cannot understand (the dataset cannot be parsed)."""
STATUS_UNEXPECTED = 0xC211
"""Error: cannot understand (an unexpected failure in the node; logged)."""
STATUS_MISSING_IDENTIFIERS = 0xC212
"""Error: cannot understand (Study/Series/SOP Instance UID missing, invalid or
inconsistent with the C-STORE request)."""

#: Image storage SOP classes we accept and process (radiographs).
IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.2": "Digital Mammography X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "Digital Mammography X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.3": "Digital Intra-Oral X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.3.1": "Digital Intra-Oral X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.12.1": "X-Ray Angiographic Image Storage",
    "1.2.840.10008.5.1.4.1.1.12.2": "X-Ray Radiofluoroscopic Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
}

#: Non-image SOP classes accepted so that a whole-study push (which may hold a
#: report, or our own results) does not fail; they are recorded and not processed.
DOCUMENT_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR Storage",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF Storage",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection Document Storage",
}

#: Transfer syntaxes accepted for every storage SOP class.
TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

_HEADER_TAGS = [
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Manufacturer",
]


def set_nodelay(event: Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle on the association's socket (a ~40 ms
    stall per small object otherwise; see NOTES.md)."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        try:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


@dataclass
class AssociationTracker:
    """Which studies are being sent by which open associations (a study is not
    ready while one is still open), plus counters for ``status``."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _studies: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))

    def touch(self, assoc_id: int, study_instance_uid: str) -> None:
        with self._lock:
            self._studies[assoc_id].add(study_instance_uid)

    def close(self, assoc_id: int) -> None:
        with self._lock:
            self._studies.pop(assoc_id, None)

    def busy_studies(self) -> frozenset[str]:
        with self._lock:
            return frozenset(uid for uids in self._studies.values() for uid in uids)


class SopLocks:
    """One lock per SOP Instance UID being stored, so that the duplicate check, the
    spool write and the database record of one instance are atomic under concurrent
    associations (one stored copy; every other sender hears "already held")."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, sop_instance_uid: str) -> Iterator[None]:
        with self._lock:
            lock, users = self._held.get(sop_instance_uid, (threading.Lock(), 0))
            self._held[sop_instance_uid] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._held[sop_instance_uid]
                if users == 1:
                    del self._held[sop_instance_uid]
                else:
                    self._held[sop_instance_uid] = (lock, users - 1)


@dataclass
class _AssocLog:
    """What one association did, for the line logged when it ends."""

    calling: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    abort: str | None = None
    studies: dict[str, dict[str, int]] = field(default_factory=dict)
    """Study Instance UID -> SOP Class UID -> instances stored (for the audit trail)."""


def _context_name(uid: str) -> str:
    return IMAGE_SOP_CLASSES.get(uid) or DOCUMENT_SOP_CLASSES.get(uid) or _uid_name(uid)


def _uid_name(uid: str) -> str:
    try:
        return str(pydicom.uid.UID(uid).name) or uid
    except Exception:
        return uid


def _peer(assoc: Association) -> str:
    return f"{assoc.requestor.address}:{assoc.requestor.port}"


class StorageSCP:
    """The node's listening side.

    Parameters
    ----------
    config
        The resolved configuration.
    spool, jobs
        Where received instances are kept and recorded.
    """

    def __init__(self, config: Config, spool: Spool, jobs: JobStoreBackend,
                 metrics: NodeMetrics | None = None, audit: AuditTrail | None = None) -> None:
        self.config = config
        self.spool = spool
        self.jobs = jobs
        self.metrics = metrics
        self.audit = audit
        self.tracker = AssociationTracker()
        self._sop_locks = SopLocks()
        self._assocs: dict[int, _AssocLog] = {}
        self._assocs_lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        netpoll.install()
        ae = AE(ae_title=config.node.ae_title)
        ae.maximum_associations = config.limits.max_associations
        ae.maximum_pdu_size = config.node.max_pdu
        ae.acse_timeout = config.limits.acse_timeout
        ae.dimse_timeout = config.limits.dimse_timeout
        ae.network_timeout = config.limits.network_timeout
        # The policy is ours (handle_requested): calling AE, host and called AE.
        ae.require_called_aet = False
        ae.add_supported_context(Verification)
        for uid in list(IMAGE_SOP_CLASSES) + list(DOCUMENT_SOP_CLASSES):
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        self.ae = ae

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Start listening (non-blocking).  Returns the bound (address, port)."""
        handlers = [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ACSE_RECV, self.handle_acse_recv),
            (evt.EVT_RELEASED, self.handle_released),
            (evt.EVT_ABORTED, self.handle_aborted),
            (evt.EVT_CONN_CLOSE, self.handle_closed),
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_ACCEPTED, self.handle_accepted),
        ]
        ssl_context = server_context(self.config.tls) if self.config.tls.enabled else None
        bind = (self.config.node.bind_address, self.config.node.port)
        try:
            server = self.ae.start_server(
                bind,
                block=False,
                evt_handlers=handlers,  # type: ignore[arg-type]
                ssl_context=ssl_context,
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartError(
                    f"port {bind[1]} on {bind[0]} is already in use by another process: stop "
                    f"it (ss -ltnp 'sport = :{bind[1]}' shows which) or set another node.port"
                ) from None
            if exc.errno == errno.EACCES:
                raise StartError(
                    f"no permission to listen on port {bind[1]} (ports below 1024 need "
                    "privileges): set node.port to 1024 or above, e.g. 11112") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise StartError(
                    f"node.bind_address {bind[0]} is not an address of this machine: use "
                    "127.0.0.1, 0.0.0.0 or one of its own addresses") from None
            raise StartError(f"cannot listen on {bind[0]}:{bind[1]}: {exc.strerror}") from None
        if ssl_context is not None:
            server.get_request = self._tls_accept(server)  # type: ignore[method-assign]
        self._server = server
        address, port = server.server_address[:2]
        logger.info(
            "listening as %s on %s:%s%s", self.config.node.ae_title, address, port,
            " (DICOM TLS)" if ssl_context else "",
            extra={"calling_aet": None},
        )
        return str(address), int(port)

    def _tls_accept(
        self, server: ThreadedAssociationServer
    ) -> Callable[[], tuple[socket.socket, tuple[str, int]]]:
        """The server's accept step with the TLS handshake's failure logged and audited
        (socketserver otherwise drops it without a word)."""

        def get_request() -> tuple[socket.socket, tuple[str, int]]:
            assert server.socket is not None and server.ssl_context is not None
            client, address = server.socket.accept()
            try:
                return server.ssl_context.wrap_socket(client, server_side=True), address
            except (ssl.SSLError, OSError) as exc:
                client.close()
                reason = f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}"
                logger.warning("connection from %s:%s refused: %s", address[0], address[1],
                               reason)
                if self.audit is not None:
                    self.audit.tls_failure(f"{address[0]}:{address[1]}", reason)
                if self.metrics is not None:
                    self.metrics.associations.labels(result="rejected",
                                                     reason="tls-handshake").inc()
                raise

        return get_request

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting associations, let open ones finish the instance in hand
        (up to ``grace_seconds``), then abort what is left."""
        server = self._server
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + grace_seconds
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            assoc.abort()
        self._server = None
        logger.info("stopped listening")

    # -- handlers -----------------------------------------------------------------------

    def handle_requested(self, event: Event) -> None:
        """EVT_REQUESTED: the association acceptance policy (PS3.8 7.1.1.9).

        Calling AE not in the allow list -> rejected-permanent, service-user,
        "calling-AE-title-not-recognized"; allowed AE from another host -> the same
        (the AE is not recognised from there); a called AE other than ours ->
        "called-AE-title-not-recognized".
        """
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = str(rq.calling_ae_title).strip()
        called = str(rq.called_ae_title).strip()
        address = assoc.requestor.address
        reason = None
        code = ""
        diagnostic = 0x01
        if called != self.config.node.ae_title:
            reason, diagnostic = f"called AE {called!r} is not ours", 0x07
            code = "called-ae-not-recognised"
        elif not self.config.allow_any_peer:
            peer = self.config.peer(calling)
            if peer is None:
                reason, diagnostic = f"calling AE {calling!r} is not in the allow list", 0x03
                code = "calling-ae-not-recognised"
            elif peer.host is not None and not _host_matches(peer.host, address):
                reason = f"calling AE {calling!r} is allowed only from {peer.host}"
                diagnostic = 0x03
                code = "host-not-allowed"
        if reason is None:
            return  # pynetdicom still applies the association limit; see handle_accepted
        logger.warning(
            "association from %s at %s rejected: %s", calling, _peer(assoc), reason,
            extra={"calling_aet": calling},
        )
        if self.metrics is not None:
            self.metrics.associations.labels(result="rejected", reason=code).inc()
        if self.audit is not None:
            self.audit.association_rejected(calling, _peer(assoc), reason)
        assoc.acse.send_reject(0x01, 0x01, diagnostic)
        assoc.is_rejected = True
        assoc.kill()

    def handle_accepted(self, event: Event) -> None:
        """EVT_ACCEPTED: log the association, and why any presentation context was
        rejected (PS3.8 9.3.3.2): an association whose every context was rejected can
        carry nothing, and the log says so with the SOP classes it proposed."""
        assoc = event.assoc
        calling = assoc.requestor.ae_title.strip()
        with self._assocs_lock:
            self._assocs[id(assoc)] = _AssocLog(calling, _peer(assoc))
        rejected = assoc.rejected_contexts
        accepted = assoc.accepted_contexts
        names = sorted({_context_name(str(c.abstract_syntax)) for c in rejected})
        if self.metrics is not None:
            self.metrics.associations.labels(
                result="accepted", reason="" if accepted else "no-presentation-context").inc()
        if not accepted:
            logger.warning(
                "association from %s at %s accepted with no usable presentation context: "
                "the node does not accept %s (or none of the transfer syntaxes proposed); "
                "nothing can be stored on it", calling, _peer(assoc), ", ".join(names) or "?",
                extra={"calling_aet": calling})
        elif rejected:
            logger.info("association from %s at %s accepted (%d presentation context(s) "
                        "rejected: %s)", calling, _peer(assoc), len(rejected),
                        ", ".join(names), extra={"calling_aet": calling})
        else:
            logger.info("association from %s at %s accepted", calling, _peer(assoc),
                        extra={"calling_aet": calling})

    def handle_acse_recv(self, event: Event) -> None:
        """EVT_ACSE_RECV: remember who aborted, for the line of :meth:`handle_aborted`."""
        primitive = event.primitive  # type: ignore[attr-defined]
        kind = type(primitive).__name__
        if kind not in ("A_ABORT", "A_P_ABORT"):
            return
        if kind == "A_ABORT":
            source = getattr(primitive, "abort_source", None)
            text = ("A-ABORT from the calling AE" if source in (0, 1, None)
                    else "A-ABORT from the peer's DICOM service provider")
        else:
            text = "the connection was lost or closed without a release (A-P-ABORT)"
        with self._assocs_lock:
            log = self._assocs.get(id(event.assoc))
            if log is not None and log.abort is None:
                log.abort = text

    def handle_released(self, event: Event) -> None:
        log = self._finish(event)
        if log is not None:
            logger.info("association from %s at %s released after %.1f s: %d stored, "
                        "%d already held, %d refused", log.calling, log.peer,
                        time.monotonic() - log.started, log.stored, log.duplicates,
                        log.refused, extra={"calling_aet": log.calling})
        self.tracker.close(id(event.assoc))

    def handle_aborted(self, event: Event) -> None:
        log = self._finish(event)
        assoc = event.assoc
        if log is None:
            return
        if getattr(assoc, "_sent_abort", False):
            reason = "aborted by the node (timeout, or the node stopping)"
        else:
            reason = log.abort or "aborted by the peer"
        logger.warning("association from %s at %s aborted: %s; %d instance(s) stored before "
                       "(each one acknowledged is kept), %d already held, %d refused",
                       log.calling, log.peer, reason, log.stored, log.duplicates, log.refused,
                       extra={"calling_aet": log.calling})
        self.tracker.close(id(event.assoc))

    def _finish(self, event: Event) -> _AssocLog | None:
        with self._assocs_lock:
            log = self._assocs.pop(id(event.assoc), None)
        if log is not None and self.audit is not None:
            for study, sop_classes in log.studies.items():
                self.audit.instances_transferred(
                    received=True, peer_ae=log.calling, peer_address=log.peer,
                    study_instance_uid=study, sop_classes=sop_classes)
        return log

    def _count(self, assoc: Association, what: str) -> None:
        with self._assocs_lock:
            log = self._assocs.get(id(assoc))
            if log is not None:
                setattr(log, what, getattr(log, what) + 1)

    def _instance(self, assoc: Association, outcome: str, status: int) -> None:
        field_name = {"stored": "stored", "duplicate": "duplicates",
                      "own_output": "duplicates"}.get(outcome, "refused")
        self._count(assoc, field_name)
        if self.metrics is not None:
            self.metrics.instances.labels(outcome=outcome, status=f"0x{status:04X}").inc()

    def handle_rejected(self, event: Event) -> None:
        rq = event.assoc.requestor.primitive
        calling = str(rq.calling_ae_title).strip() if rq is not None else "?"
        logger.warning(
            "association from %s at %s rejected: limit of %d associations reached",
            calling, _peer(event.assoc), self.config.limits.max_associations,
            extra={"calling_aet": calling},
        )
        if self.metrics is not None:  # pynetdicom's own rejection: the association limit
            self.metrics.associations.labels(result="rejected", reason="limit-reached").inc()

    def handle_echo(self, event: Event) -> int:
        logger.info("C-ECHO from %s", event.assoc.requestor.ae_title.strip())
        return STATUS_SUCCESS

    def handle_closed(self, event: Event) -> None:
        self.tracker.close(id(event.assoc))

    def handle_store(self, event: Event) -> int:
        """EVT_C_STORE: keep the instance durably, then acknowledge."""
        started = time.perf_counter()
        assoc = event.assoc
        calling = assoc.requestor.ae_title.strip()
        request_uid = str(event.request.AffectedSOPInstanceUID or "")
        log_extra = {"calling_aet": calling, "sop_uid": request_uid}
        try:
            data = event.encoded_dataset(include_meta=True)
            header = _read_header(data)
            ids = _identifiers(header, event)
            log_extra.update(study_uid=ids["study"], series_uid=ids["series"])
            if is_own_output(header):
                # Our own result coming back (e.g. a whole-study push): recorded, never
                # stored or processed, and it does not reopen the study: no loop.
                self.jobs.record_ignored(ids, calling, _peer(assoc), "own-output")
                logger.info("C-STORE %s from %s: the node's own output, acknowledged and not "
                            "processed", ids["sop"], calling, extra=log_extra)
                self._instance(assoc, "own_output", STATUS_SUCCESS)
                return STATUS_SUCCESS
            self.tracker.touch(id(assoc), ids["study"])
            with self._sop_locks.hold(ids["sop"]):  # check, write and record: one step
                if self.jobs.has_instance(ids["sop"]):
                    logger.info(
                        "C-STORE %s from %s: already held, acknowledged without storing again",
                        ids["sop"], calling, extra=log_extra,
                    )
                    self._instance(assoc, "duplicate", STATUS_SUCCESS)
                    return STATUS_SUCCESS
                target = self.spool.path("incoming", ids["study"], ids["sop"])
                self.spool.write(target, data)
                record = InstanceRecord(
                    sop_instance_uid=ids["sop"],
                    study_instance_uid=ids["study"],
                    series_instance_uid=ids["series"],
                    sop_class_uid=ids["sop_class"],
                    transfer_syntax_uid=str(event.context.transfer_syntax),
                    path=str(target),
                    size=len(data),
                    calling_aet=calling,
                    peer=_peer(assoc),
                )
                try:
                    self.jobs.record_instance(record)
                except Exception as exc:
                    self.spool.remove(target)
                    raise SpoolError(f"job database write failed: {exc}") from exc
        except SpoolError as exc:
            logger.error("C-STORE %s from %s refused (0xA700): %s", request_uid, calling, exc,
                         extra=log_extra)
            self._instance(assoc, "refused", STATUS_OUT_OF_RESOURCES)
            return STATUS_OUT_OF_RESOURCES
        except DatasetError as exc:
            status = (STATUS_MISSING_IDENTIFIERS if isinstance(exc, MissingIdentifierError)
                      else STATUS_CANNOT_UNDERSTAND)
            logger.error("C-STORE %s from %s refused (0x%04X): %s", request_uid, calling,
                         status, exc, extra=log_extra)
            self._instance(assoc, "refused", status)
            return status
        except Exception:
            logger.exception("C-STORE %s from %s failed unexpectedly (0xC211)", request_uid,
                             calling, extra=log_extra)
            self._instance(assoc, "refused", STATUS_UNEXPECTED)
            return STATUS_UNEXPECTED
        seconds = time.perf_counter() - started
        self._instance(assoc, "stored", STATUS_SUCCESS)
        with self._assocs_lock:
            log = self._assocs.get(id(assoc))
            if log is not None:
                per_class = log.studies.setdefault(ids["study"], {})
                per_class[ids["sop_class"]] = per_class.get(ids["sop_class"], 0) + 1
        if self.metrics is not None:
            self.metrics.stage("receive", seconds)
        logger.info(
            "C-STORE %s from %s stored (%d bytes, %.1f ms)", ids["sop"], calling, len(data),
            seconds * 1000, extra=log_extra,
        )
        return STATUS_SUCCESS


def _host_matches(allowed: str, address: str) -> bool:
    if allowed == address:
        return True
    try:
        return address in {info[4][0] for info in socket.getaddrinfo(allowed, None)}
    except OSError:
        return False


def _read_header(data: bytes) -> pydicom.Dataset:
    """Parse the identifying attributes of an encoded instance (no pixel data)."""
    try:
        return pydicom.dcmread(
            io.BytesIO(data), stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True
        )
    except Exception as exc:
        raise DatasetError(f"dataset cannot be parsed: {exc}") from exc


def _identifiers(ds: pydicom.Dataset, event: Event) -> dict[str, str]:
    """Study/Series/SOP Instance UIDs and SOP Class UID, checked (PS3.4 B.2.3)."""
    ids: dict[str, str] = {}
    for key, keyword in (
        ("sop", "SOPInstanceUID"),
        ("study", "StudyInstanceUID"),
        ("series", "SeriesInstanceUID"),
        ("sop_class", "SOPClassUID"),
    ):
        value = str(ds.get(keyword, "") or "")
        try:
            ids[key] = safe_uid(value)
        except ValueError:
            raise MissingIdentifierError(f"{keyword} UID missing or invalid ({value[:70]!r})") from None
    affected = str(event.request.AffectedSOPInstanceUID or "").strip()
    if affected and affected != ids["sop"]:
        raise MissingIdentifierError(
            f"SOPInstanceUID {ids['sop']} differs from the request's Affected SOP Instance UID "
            f"{affected}"
        )
    return ids


def is_own_output(ds: pydicom.Dataset) -> bool:
    """True for objects fracture-node wrote itself (Manufacturer)."""
    return str(ds.get("Manufacturer", "")).strip() == NODE_MANUFACTURER
