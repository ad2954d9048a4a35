"""Malformed and hostile input at the network edge.

Every case must end with a DICOM status (or a rejected presentation context), the
association must stay usable, and the instance sent next on the same association
must be kept.  Byte-level mutations of real files are generated with hypothesis and
sent as raw bytes (pynetdicom streams a file's dataset without decoding it when
``STORE_SEND_CHUNKED_DATASET`` is set)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, ComputedRadiographyImageStorage

from conftest import DICOM_DATA, free_port, write_config
from nodeharness import CopyProcessor
from node.config import load_config
from node.service import Node

SOURCE = DICOM_DATA / "pylibjpeg-data" / "RG2_JPLY_fixed.dcm"  # CR, JPEG extended, 206 kB


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    directory = tmp_path_factory.mktemp("hostile")
    config = load_config(write_config(directory, free_port(), quiet_seconds=3600))
    n = Node(config, CopyProcessor)
    n.start()
    yield n
    n.stop(grace_seconds=2)


@pytest.fixture(scope="module")
def source() -> tuple[bytes, int]:
    """The real file's bytes and the offset where its dataset starts (after meta)."""
    data = SOURCE.read_bytes()
    _, offset = _split(SOURCE)
    return data, offset


def _split(path: Path) -> tuple[pydicom.Dataset, int]:
    from pynetdicom.dsutils import split_dataset

    return split_dataset(path)


def _fresh(tmp: Path, name: str) -> Path:
    """A copy of the source with a new SOP Instance UID (a well-formed neighbour)."""
    ds = pydicom.dcmread(SOURCE)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp / name
    ds.save_as(path)
    return path


def _associate(port: int, contexts: list[tuple[str, list[str]]]):  # type: ignore[no-untyped-def]
    ae = AE(ae_title="TESTSCU")
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACTURE_NODE")
    assert assoc.is_established
    return assoc


MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 0.999), st.integers(0, 255)),
                                        min_size=1, max_size=40)),
    st.tuples(st.just("length"), st.floats(0, 0.999), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("random"), st.binary(min_size=0, max_size=4096)),
    st.tuples(st.just("undefined-length"), st.floats(0, 0.999)),
)


def _mutate(data: bytes, offset: int, mutation: tuple) -> bytes:  # type: ignore[type-arg]
    body = bytearray(data[offset:])
    kind = mutation[0]
    if kind == "truncate":
        body = body[: int(len(body) * mutation[1])]
    elif kind == "flip":
        for where, value in mutation[1]:
            body[int(len(body) * where)] = value
    elif kind == "length":
        at = int(len(body) * mutation[1]) & ~1
        body[at: at + 4] = int(mutation[2]).to_bytes(4, "little")
    elif kind == "undefined-length":
        at = int(len(body) * mutation[1]) & ~1
        body[at: at + 4] = b"\xff\xff\xff\xff"
    else:
        body = bytearray(mutation[1])
    return data[:offset] + bytes(body)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutation=MUTATIONS)
def test_mutated_instances_get_a_status_and_neighbours_survive(
    node: Node, source: tuple[bytes, int], tmp_path: Path, mutation: tuple  # type: ignore[type-arg]
) -> None:
    data, offset = source
    ts = str(pydicom.dcmread(SOURCE, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(_mutate(data, offset, mutation))
    good = _fresh(tmp_path, "good.dcm")
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = _associate(node.address[1], [(ComputedRadiographyImageStorage, [ts])])
        try:
            status = assoc.send_c_store(bad)
            assert status and "Status" in status, "no answer to a malformed instance"
            assert int(status.Status) in (0x0000, 0xA700, 0xC210, 0xC211, 0xC212)
            assert assoc.is_established, "the association did not survive"
            neighbour = assoc.send_c_store(good)
            assert int(neighbour.Status) == 0
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    uid = str(pydicom.dcmread(good, stop_before_pixels=True).SOPInstanceUID)
    assert node.jobs.has_instance(uid)
    assert not list((node.spool.root / "tmp").iterdir())


def test_unknown_transfer_syntax_and_non_image_class_are_not_accepted(node: Node) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, ["1.2.3.4.5.6.7"])
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(ComputedRadiographyImageStorage)  # a good one, to associate
    assoc = ae.associate("127.0.0.1", node.address[1], ae_title="FRACTURE_NODE")
    assert assoc.is_established
    accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
    rejected = {(c.abstract_syntax, tuple(c.transfer_syntax)) for c in assoc.rejected_contexts}
    assoc.release()
    assert all(ts != "1.2.3.4.5.6.7" for _, ts in accepted)
    assert all(sop != CTImageStorage for sop, _ in accepted)
    assert any(sop == CTImageStorage for sop, _ in rejected)


def test_absurd_declared_size_is_kept_for_the_pipeline_to_refuse(node: Node, tmp_path: Path) -> None:
    """60000 x 60000 declared over a small Pixel Data: the header is sound, so the
    instance is acknowledged and kept; the pipeline refuses it later (ABSURD_SIZE)."""
    ds = pydicom.dcmread(SOURCE)
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 60000
    assoc = _associate(node.address[1], [(ComputedRadiographyImageStorage,
                                          [str(ds.file_meta.TransferSyntaxUID)])])
    try:
        assert int(assoc.send_c_store(ds).Status) == 0
    finally:
        assoc.release()
    from pipeline.normalise import prepare
    from pipeline.result import Refusal, RefusalCode

    row = node.jobs.query("SELECT path FROM instances WHERE sop_instance_uid = ?",
                          [ds.SOPInstanceUID])[0]
    refused = prepare(pydicom.dcmread(row["path"]))
    assert isinstance(refused, Refusal) and refused.code is RefusalCode.ABSURD_SIZE


def test_association_aborted_mid_instance_keeps_nothing_partial(node: Node, tmp_path: Path) -> None:
    big = pydicom.dcmread(DICOM_DATA / "pydicom-data" / "RG3_UNCR.dcm")
    pixels = np.tile(big.pixel_array, (3, 3))  # 5280 x 5280 x 16 bit, ~56 MB
    big.Rows, big.Columns = pixels.shape
    big.PixelData = pixels.tobytes()
    big.SOPInstanceUID = generate_uid()
    big.file_meta.MediaStorageSOPInstanceUID = big.SOPInstanceUID
    path = tmp_path / "big.dcm"
    big.save_as(path)
    proc = subprocess.Popen(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", "FRACTURE_NODE", "-xe",
                             "--max-send-pdu", "16384", "127.0.0.1", str(node.address[1]),
                             str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not node.scp.ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.01)
    assert node.scp.ae.active_associations, "storescu never associated"
    time.sleep(0.1)
    assert proc.poll() is None, "the transfer finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)  # the sender dies mid-transfer: the peer aborts
    proc.wait()
    time.sleep(0.5)
    assert not node.jobs.has_instance(str(big.SOPInstanceUID)), "a partial instance was kept"
    assert not list((node.spool.root / "tmp").iterdir())
    good = _fresh(tmp_path, "after.dcm")
    out = subprocess.run(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", "FRACTURE_NODE", "-xx", "-R",
                          "127.0.0.1", str(node.address[1]), str(good)], capture_output=True,
                         env=dict(os.environ, TCP_NODELAY="1"), timeout=60)
    assert out.returncode == 0
