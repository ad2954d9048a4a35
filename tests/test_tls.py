"""DICOM TLS (PS3.15 B.1) for the SCP and the SCU, against DCMTK's TLS-enabled
echoscu/storescu and an Orthanc with DICOM TLS enabled."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from conftest import DICOM_DATA, Orthanc, free_port, wait_for, write_config
from nodeharness import CopyProcessor
from node.config import load_config
from node.service import Node

FILE = DICOM_DATA / "pylibjpeg-data" / "RG2_JPLY_fixed.dcm"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, and certificates for the node, a client and Orthanc (127.0.0.1)."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=fracture-node test CA", "-keyout", str(d / "ca.key"),
             "-out", str(d / "ca.crt"))
    ext = d / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("node", "client", "orthanc", "rogue"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        if name == "rogue":  # self-signed, not from our CA
            _openssl("x509", "-req", "-in", str(d / "rogue.csr"), "-signkey",
                     str(d / "rogue.key"), "-days", "2", "-out", str(d / "rogue.crt"))
            continue
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-extfile", str(ext), "-out", str(d / f"{name}.crt"))
    return d


def _tls_section(pki: Path) -> str:
    return (f'[tls]\nenabled = true\ncertificate = "{pki / "node.crt"}"\n'
            f'private_key = "{pki / "node.key"}"\nca_certificates = "{pki / "ca.crt"}"\n')


@pytest.fixture
def tls_node(tmp_path: Path, pki: Path) -> Iterator[Node]:
    config = load_config(write_config(tmp_path, free_port(), extra=_tls_section(pki)))
    node = Node(config, CopyProcessor)
    node.start()
    yield node
    node.stop(grace_seconds=1)


def _echoscu(port: int, *tls: str) -> subprocess.CompletedProcess:
    return subprocess.run(["/usr/bin/echoscu", *tls, "-aet", "STORESCU", "-aec", "FRACTURE_NODE",
                           "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60)


def test_dcmtk_echo_and_store_over_tls(tls_node: Node, pki: Path) -> None:
    port = tls_node.address[1]
    tls = ["+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")]
    out = _echoscu(port, *tls)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(["/usr/bin/storescu", *tls, "-aet", "STORESCU", "-aec", "FRACTURE_NODE", "-xx",
                          "-R", "127.0.0.1", str(port), str(FILE)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    uid = str(pydicom.dcmread(FILE, stop_before_pixels=True).SOPInstanceUID)
    assert tls_node.jobs.has_instance(uid)


def test_plain_and_uncertified_clients_are_refused(tls_node: Node, pki: Path) -> None:
    port = tls_node.address[1]
    assert _echoscu(port).returncode != 0, "a plain connection must not get through"
    rogue = ["+tls", str(pki / "rogue.key"), str(pki / "rogue.crt"), "+cf", str(pki / "ca.crt")]
    assert _echoscu(port, *rogue).returncode != 0, "a certificate outside our CA was accepted"
    anonymous = ["+tla", "+cf", str(pki / "ca.crt")]  # TLS, but no client certificate
    assert _echoscu(port, *anonymous).returncode != 0, "a client without certificate got in"


def test_delivery_to_orthanc_over_tls(tmp_path: Path, pki: Path) -> None:
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port=node_port, extra_config={
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki / "orthanc.crt"),
        "DicomTlsPrivateKey": str(pki / "orthanc.key"),
        "DicomTlsTrustedCertificates": str(pki / "ca.crt"),
        "DicomTlsRemoteCertificateRequired": True,
    }).start()
    try:
        extra = (f'[tls]\nenabled = false\ncertificate = "{pki / "node.crt"}"\n'
                 f'private_key = "{pki / "node.key"}"\nca_certificates = "{pki / "ca.crt"}"\n')
        cfg = write_config(tmp_path, node_port, extra=extra, destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "port": orthanc.dicom_port}])
        cfg.write_text(cfg.read_text().replace("port = %d\n" % orthanc.dicom_port,
                                               "port = %d\ntls = true\n" % orthanc.dicom_port))
        node = Node(load_config(cfg), CopyProcessor)
        node.start()
        try:
            out = subprocess.run(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", "FRACTURE_NODE", "-xx",
                                  "-R", "127.0.0.1", str(node_port), str(FILE)],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            wait_for(lambda: [r for r in node.jobs.query("SELECT state FROM outbox")
                              if r["state"] == "delivered"], timeout=60)
            study = str(pydicom.dcmread(FILE, stop_before_pixels=True).StudyInstanceUID)
            assert len(orthanc.study_instances(study)) == 1
        finally:
            node.stop(grace_seconds=1)
    finally:
        orthanc.stop()
