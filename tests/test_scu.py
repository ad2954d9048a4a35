"""The node's C-STORE client (:func:`node.scu.store_files`) against DCMTK's storescp.

A file goes as its encoded bytes when the peer accepted its own transfer syntax, and as
the decoded dataset (converted by pynetdicom) when the peer accepted only another
uncompressed syntax; what arrives is the same data set either way.  A compressed file
that the peer accepts in no context of its own syntax fails permanently.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGExtended12Bit

from conftest import ROOT, free_port
from node.scu import Peer, store_files

FOREARM = ROOT / "demo" / "studies" / "forearm" / "forearm_1.dcm"
JPEG = ROOT / "demo" / "studies" / "hip" / "hip_rg2_jpeg.dcm"


class StoreSCP:
    """``/usr/bin/storescp`` (pynetdicom shadows it in the venv) with its transfer-syntax
    option (``+xa`` every syntax it supports, ``+xi`` Implicit VR Little Endian only)."""

    def __init__(self, directory: Path, syntaxes: str) -> None:
        self.directory = directory
        directory.mkdir(parents=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["/usr/bin/storescp", "-aet", "PACS", "-od", str(directory), "-uf", syntaxes,
             str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})
        time.sleep(0.5)

    def received(self, sop_instance_uid: str) -> pydicom.Dataset:
        deadline = time.monotonic() + 10
        while True:
            files = [f for f in self.directory.iterdir() if sop_instance_uid in f.name]
            if files or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert files, f"{sop_instance_uid} was not received"
        return pydicom.dcmread(files[0])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[dict[str, StoreSCP]]:
    scps = {"all": StoreSCP(tmp_path / "all", "+xa"),
            "implicit": StoreSCP(tmp_path / "implicit", "+xi")}
    yield scps
    for scp in scps.values():
        scp.stop()


def _same_data_set(got: pydicom.Dataset, want: pydicom.Dataset) -> None:
    assert [e.tag for e in got] == [e.tag for e in want]
    for elem in want:
        assert got[elem.tag].value == elem.value, elem.keyword


def test_files_go_as_they_are_or_converted_and_arrive_the_same(
        peers: dict[str, StoreSCP], monkeypatch: pytest.MonkeyPatch) -> None:
    forearm, jpeg = pydicom.dcmread(FOREARM), pydicom.dcmread(JPEG)
    decoded: list[Path] = []  # whole files the client decodes to send them
    real_dcmread = pydicom.dcmread

    def dcmread(path: Path, *args: object, **kwargs: object) -> pydicom.Dataset:
        if not kwargs.get("stop_before_pixels") and Path(path) in (FOREARM, JPEG):
            decoded.append(Path(path))
        return real_dcmread(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", dcmread)
    assert forearm.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert jpeg.file_meta.TransferSyntaxUID == JPEGExtended12Bit

    every = peers["all"]
    outcomes = store_files("FRACTURE_NODE", Peer("PACS", "127.0.0.1", every.port), [FOREARM, JPEG])
    assert [(o.ok, o.status) for o in outcomes] == [(True, 0), (True, 0)]
    got = every.received(forearm.SOPInstanceUID)
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    _same_data_set(got, forearm)
    got = every.received(jpeg.SOPInstanceUID)
    assert got.file_meta.TransferSyntaxUID == JPEGExtended12Bit
    _same_data_set(got, jpeg)
    assert decoded == []  # both went as their bytes

    implicit = peers["implicit"]
    outcomes = store_files("FRACTURE_NODE", Peer("PACS", "127.0.0.1", implicit.port), [FOREARM, JPEG])
    assert outcomes[0].ok and outcomes[0].status == 0
    got = implicit.received(forearm.SOPInstanceUID)
    assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    _same_data_set(got, forearm)
    assert FOREARM in decoded  # converted from its decoded data set
    assert not outcomes[1].ok and outcomes[1].error is not None and outcomes[1].error.permanent
    assert "accepted no presentation context" in str(outcomes[1].error)


class _CountingSCP:
    """A pynetdicom Storage SCP on loopback that counts the associations it accepts and
    the ones released, and keeps what it stores."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.accepted = 0
        self.released = 0
        self.stored: list[str] = []
        ae = AE(ae_title="PACS")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian,
                                                          ImplicitVRLittleEndian,
                                                          JPEGExtended12Bit])
        self.port = free_port()
        handlers = [(evt.EVT_ACCEPTED, self._accepted), (evt.EVT_RELEASED, self._released),
                    (evt.EVT_C_STORE, self._store)]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=handlers)

    def _accepted(self, event: object) -> None:
        self.accepted += 1

    def _released(self, event: object) -> None:
        self.released += 1

    def _store(self, event: object) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))  # type: ignore[attr-defined]
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def test_one_association_carries_consecutive_sends_until_closed() -> None:
    """:class:`StoreAssociation`: consecutive sends travel on one association; a file
    needing a context it did not propose opens a new one (proposing the earlier contexts
    again, so the first kind does not reopen it); an association the peer aborted is
    reopened by the next send; close() releases it."""
    from node.scu import StoreAssociation

    peer = _CountingSCP()
    sender = StoreAssociation("FRACTURE_NODE", Peer("PACS", "127.0.0.1", peer.port))
    forearm, jpeg = (str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                     for f in (FOREARM, JPEG))
    try:
        assert all(o.ok for o in sender.store([FOREARM]) + sender.store([FOREARM]))
        assert (sender.associations, peer.accepted, peer.released) == (1, 1, 0)
        assert all(o.ok for o in sender.store([JPEG]))  # JPEG's own context: a new one
        assert all(o.ok for o in sender.store([FOREARM]))
        assert sender.associations == 2 and peer.accepted == 2
        assert _wait(lambda: peer.released == 1)
        for assoc in peer.server.active_associations:
            assoc.abort()
        assert _wait(lambda: not sender.is_open)
        assert all(o.ok for o in sender.store([FOREARM]))
        assert sender.associations == 3
        sender.close()
        assert _wait(lambda: peer.released == 2)
        assert not sender.is_open
        assert peer.stored == [forearm, forearm, jpeg, forearm, forearm]
    finally:
        sender.close()
        peer.stop()


def _wait(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("keep_open", [1.0, 0.0])
def test_the_deliverer_keeps_its_association_open_between_studies_then_releases_it(
        tmp_path: Path, keep_open: float) -> None:
    """Three studies delivered one after another by a node (``[delivery]
    keep_open_seconds = 1``): their results travel on one association, released about a
    second after the last; with 0, each round of sends has its own association."""
    import dataclasses

    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

    from conftest import write_config
    from node.config import DeliveryConfig, load_config
    from node.service import Node
    from node.worker import WholeStudy
    from nodeharness import ReportProcessor

    peer = _CountingSCP()
    port = free_port()
    cfg = write_config(tmp_path, port, quiet_seconds=0.2,
                       destinations=[{"name": "pacs", "ae_title": "PACS", "port": peer.port}])
    config = load_config(cfg, environ={})
    config = dataclasses.replace(config, delivery=dataclasses.replace(
        config.delivery, keep_open_seconds=keep_open))
    assert isinstance(config.delivery, DeliveryConfig)
    node = Node(config, lambda: WholeStudy(ReportProcessor()))
    node.start()
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(ComputedRadiographyImageStorage, [ExplicitVRLittleEndian])
        source = pydicom.dcmread(FOREARM)
        for n in range(3):
            ds = source.copy()
            ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.19.{n}"
            ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.19.{n}.1"
            assoc = ae.associate("127.0.0.1", port, ae_title="FRACTURE_NODE")
            assert assoc.is_established
            assert int(assoc.send_c_store(ds).Status) == 0
            assoc.release()
            assert _wait(lambda: len(peer.stored) == 2 * (n + 1), timeout=30)  # copy + SR
        done = time.monotonic()
        if keep_open:
            assert (peer.accepted, peer.released) == (1, 0)
            assert _wait(lambda: peer.released == 1, timeout=5)
            assert time.monotonic() - done >= 0.5
        else:
            assert peer.accepted >= 3 and _wait(lambda: peer.released == peer.accepted)
    finally:
        node.stop(grace_seconds=2)
        peer.stop()


def test_a_bad_keep_open_seconds_is_one_line_naming_the_key_and_the_fix() -> None:
    from node.config import config_from_dict
    from node.errors import ConfigError

    for value in (-1, "5", True, 4000):
        with pytest.raises(ConfigError) as info:
            config_from_dict({"peers": [{"ae_title": "ORTHANC"}], "keep_results_local": True,
                              "delivery": {"keep_open_seconds": value}}, Path("/tmp"))
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith("delivery.keep_open_seconds must be a number of seconds")
        assert "0 releases the association" in message
