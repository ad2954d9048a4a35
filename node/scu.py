"""The SCU side: C-ECHO and C-STORE to a remote AE.

A failed send is *temporary* (connection refused, timeout, abort, a transient
association rejection, 0xA7xx out of resources at the peer) or *permanent* (a
permanent association rejection, no accepted presentation context, a failure status).
Only temporary failures are worth retrying soon; :class:`SendError` says which.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from node import netpoll
from node.errors import SendError
from node.scp import set_nodelay

_config.STORE_SEND_CHUNKED_DATASET = True
"""A file is sent as its encoded bytes (read in chunks, never decoded) when the peer
accepted its own transfer syntax: the deliverer's dcmread and re-encoding were ~2.5 ms
of Python per object under the 16 x 50 load (``py-spy``).  Where the peer accepted only
another uncompressed syntax, :func:`_store_one` passes the decoded dataset instead, which
pynetdicom converts, so what is sent does not depend on this flag."""

logger = logging.getLogger(__name__)

_WARNING_STATUSES = {0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class Peer:
    """A remote AE; ``ssl_context`` set means DICOM TLS."""

    ae_title: str
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None


@dataclass(frozen=True)
class StoreOutcome:
    path: Path
    sop_instance_uid: str
    status: int | None
    """The peer's status, or None when the instance could not be sent at all."""
    error: SendError | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Timeouts:
    """Seconds; see ``[limits]`` in config.toml."""

    connection: float = 10.0
    acse: float = 30.0
    dimse: float = 60.0
    network: float = 60.0


def _make_ae(calling_ae_title: str, timeouts: Timeouts, max_pdu: int) -> AE:
    netpoll.install()
    ae = AE(ae_title=calling_ae_title)
    ae.connection_timeout = timeouts.connection
    ae.acse_timeout = timeouts.acse
    ae.dimse_timeout = timeouts.dimse
    ae.network_timeout = timeouts.network
    ae.maximum_pdu_size = max_pdu
    return ae


def _associate(ae: AE, peer: Peer) -> Association:
    try:
        assoc = ae.associate(
            peer.host, peer.port, ae_title=peer.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
            tls_args=(peer.ssl_context, peer.host) if peer.ssl_context else None,
        )
    except (OSError, socket.gaierror) as exc:
        raise SendError(f"cannot connect to {peer.host}:{peer.port}: {exc}", permanent=False)
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        result = getattr(rsp, "result", None)
        reason = getattr(rsp, "result_str", None) or "rejected"
        diag = getattr(rsp, "reason_str", "")
        raise SendError(
            f"association rejected by {peer.ae_title} at {peer.host}:{peer.port}: {reason} "
            f"({getattr(rsp, 'source_str', '')}: {diag})",
            permanent=(result == 0x01),
        )
    raise SendError(
        f"no association with {peer.ae_title} at {peer.host}:{peer.port} "
        "(connection refused or timed out)",
        permanent=False,
    )


def echo(calling_ae_title: str, peer: Peer, timeouts: Timeouts = Timeouts(),
         max_pdu: int = 262144) -> int:
    """C-ECHO ``peer``; returns the status (0x0000 on success).

    Raises
    ------
    SendError
        No association could be established.
    """
    ae = _make_ae(calling_ae_title, timeouts, max_pdu)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, peer)
    try:
        rsp = assoc.send_c_echo()
        if not rsp or "Status" not in rsp:
            raise SendError(f"no C-ECHO response from {peer.ae_title}", permanent=False)
        return int(rsp.Status)
    finally:
        assoc.release()


def _contexts_for(paths: Sequence[Path]) -> tuple[dict[Path, pydicom.Dataset], set[tuple[str, str]]]:
    headers: dict[Path, pydicom.Dataset] = {}
    contexts: set[tuple[str, str]] = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID"])
        headers[path] = ds
        contexts.add((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    return headers, contexts


def store_files(
    calling_ae_title: str,
    peer: Peer,
    paths: Sequence[Path],
    timeouts: Timeouts = Timeouts(),
    max_pdu: int = 262144,
) -> list[StoreOutcome]:
    """C-STORE ``paths`` over one association, each in its own transfer syntax
    (with Explicit/Implicit VR Little Endian offered as fall-backs), then release it.

    Returns one :class:`StoreOutcome` per path.  An association that cannot be
    established makes every outcome fail with the same :class:`SendError`.
    """
    sender = StoreAssociation(calling_ae_title, peer, timeouts, max_pdu)
    try:
        return sender.store(paths)
    finally:
        sender.close()


def _requested_contexts(contexts: Iterable[tuple[str, str]]) -> set[tuple[str, tuple[str, ...]]]:
    """The presentation contexts to propose for files of these (SOP class, transfer
    syntax): one per compressed syntax (a compressed file can only travel in its own
    syntax; pynetdicom does not transcode), and one uncompressed context per SOP class,
    so the peer's preference can never strand a compressed file."""
    requested: set[tuple[str, tuple[str, ...]]] = set()
    uncompressed = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    for sop_class, syntax in contexts:
        requested.add((sop_class, uncompressed))
        if syntax not in uncompressed:
            requested.add((sop_class, (syntax,)))
    return requested


class StoreAssociation:
    """C-STORE to one peer over an association that stays open between calls of
    :meth:`store` until :meth:`close` (the deliverer closes it once nothing has been
    sent for ``[delivery] keep_open_seconds``).  A call that needs a presentation
    context the open association did not propose, or finds it no longer established
    (the peer released or aborted it), opens a new one first."""

    def __init__(self, calling_ae_title: str, peer: Peer, timeouts: Timeouts = Timeouts(),
                 max_pdu: int = 262144) -> None:
        self.calling_ae_title = calling_ae_title
        self.peer = peer
        self.timeouts = timeouts
        self.max_pdu = max_pdu
        self._assoc: Association | None = None
        self._proposed: set[tuple[str, tuple[str, ...]]] = set()
        self.associations = 0
        """Associations this sender has opened (``tests/test_scu.py``)."""
        self.last_used = time.monotonic()
        """When :meth:`store` last returned (``time.monotonic``; for the deliverer's
        ``keep_open_seconds``)."""

    @property
    def is_open(self) -> bool:
        return self._assoc is not None and self._assoc.is_established

    def store(self, paths: Sequence[Path]) -> list[StoreOutcome]:
        """C-STORE ``paths`` in order; one :class:`StoreOutcome` per path.  An
        association that cannot be established fails every outcome with the same
        :class:`SendError`."""
        try:
            return self._store(paths)
        finally:
            self.last_used = time.monotonic()

    def _store(self, paths: Sequence[Path]) -> list[StoreOutcome]:
        if not paths:
            return []
        try:
            headers, contexts = _contexts_for(paths)
        except Exception as exc:  # unreadable file in our own spool: permanent
            err = SendError(f"cannot read a file to send: {exc}", permanent=True)
            return [StoreOutcome(p, "", None, err) for p in paths]
        needed = _requested_contexts(contexts)
        if not self.is_open or not needed <= self._proposed:
            self.close()
            # what the last association carried is proposed again beside what is
            # needed now, so that alternating kinds of object do not reopen it
            wanted = needed | self._proposed
            if len(wanted) > 128:
                wanted = needed
            if len(wanted) > 128:
                raise SendError("more than 128 presentation contexts needed in one send",
                                permanent=True)
            try:
                self._open(wanted)
            except SendError as exc:
                return [StoreOutcome(p, str(headers[p].SOPInstanceUID), None, exc) for p in paths]
        assoc = self._assoc
        assert assoc is not None
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                    for cx in assoc.accepted_contexts}
        outcomes: list[StoreOutcome] = []
        for path in paths:
            header = headers[path]
            uid = str(header.SOPInstanceUID)
            as_is = (str(header.SOPClassUID), str(header.file_meta.TransferSyntaxUID)) in accepted
            outcomes.append(_store_one(assoc, self.peer, path, uid, as_is))
            if not assoc.is_established:
                err = SendError(f"association with {self.peer.ae_title} lost", permanent=False)
                outcomes.extend(
                    StoreOutcome(p, str(headers[p].SOPInstanceUID), None, err)
                    for p in paths[len(outcomes):]
                )
                self._assoc = None
                break
        return outcomes

    def _open(self, contexts: set[tuple[str, tuple[str, ...]]]) -> None:
        ae = _make_ae(self.calling_ae_title, self.timeouts, self.max_pdu)
        for sop_class, syntaxes in sorted(contexts):
            ae.add_requested_context(sop_class, list(syntaxes))
        self._assoc = _associate(ae, self.peer)
        self._proposed = contexts
        self.associations += 1

    def close(self) -> None:
        """Release the association, if one is open."""
        assoc, self._assoc = self._assoc, None
        if assoc is not None and assoc.is_established:
            assoc.release()


def _store_one(assoc: Association, peer: Peer, path: Path, uid: str, as_is: bool = False
               ) -> StoreOutcome:
    """C-STORE one file: its bytes as they are when ``as_is`` (the peer accepted the
    file's own transfer syntax), else the decoded dataset, for pynetdicom to convert."""
    try:
        rsp = assoc.send_c_store(path if as_is else pydicom.dcmread(path))
    except (ValueError, RuntimeError) as exc:
        err = SendError(f"{peer.ae_title} accepted no presentation context for {uid}: {exc}",
                        permanent=True)
        return StoreOutcome(path, uid, None, err)
    if not rsp or "Status" not in rsp:
        err = SendError(f"no C-STORE response from {peer.ae_title} (timeout or abort)",
                        permanent=False)
        return StoreOutcome(path, uid, None, err)
    status = int(rsp.Status)
    if status == 0x0000 or status in _WARNING_STATUSES:
        if status:
            logger.warning("C-STORE %s to %s: warning status 0x%04X", uid, peer.ae_title, status)
        return StoreOutcome(path, uid, status, None)
    transient = (status & 0xFF00) == 0xA700
    err = SendError(f"{peer.ae_title} answered 0x{status:04X} for {uid}", permanent=not transient)
    return StoreOutcome(path, uid, status, err)


def dicom_files(inputs: Iterable[Path]) -> list[Path]:
    """Expand files and folders (recursively) into the DICOM files among them
    (Part 10 files with the ``DICM`` prefix)."""
    found: list[Path] = []
    for item in inputs:
        candidates = sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else [item]
        for path in candidates:
            try:
                with path.open("rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        found.append(path)
            except OSError:
                continue
    return found
