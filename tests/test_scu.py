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
