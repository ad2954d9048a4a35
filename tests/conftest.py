"""Shared test set-up: paths to the real data and pydicom's validation modes.

Reading is lenient (as the node reads what a PACS sends), writing is strict (as the
node writes): every object a test writes must be valid, or the test fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom.config
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DICOM_DATA = SHARED / "data" / "dicom"
MSK_DATA = SHARED / "data" / "msk"


@pytest.fixture(autouse=True)
def _strict_writing() -> Iterator[None]:
    reading = pydicom.config.settings.reading_validation_mode
    writing = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.WARN
    pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    yield
    pydicom.config.settings.reading_validation_mode = reading
    pydicom.config.settings.writing_validation_mode = writing


# -- the real peers ---------------------------------------------------------------------

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

from pydicom.uid import generate_uid  # noqa: E402

from node.config import (  # noqa: E402
    Config,
    DeliveryConfig,
    DestinationConfig,
    ModelConfig,
    NodeConfig,
    PeerConfig,
    StorageConfig,
    StudyConfig,
    render_config,
)

_spec = importlib.util.spec_from_file_location("orthanc_ctl", ROOT / "orthanc-test" / "orthanc_ctl.py")
assert _spec is not None and _spec.loader is not None
orthanc_ctl = importlib.util.module_from_spec(_spec)
sys.modules["orthanc_ctl"] = orthanc_ctl
_spec.loader.exec_module(orthanc_ctl)
free_port = orthanc_ctl.free_port
Orthanc = orthanc_ctl.Orthanc
storescu = orthanc_ctl.storescu


class StoreSCP:
    """DCMTK's storescp (``/usr/bin``: pynetdicom shadows it in the venv), keeping
    every received object as its own file, one process per association (``--fork``:
    several nodes deliver at once, as to a real archive; a single storescp serves one
    association at a time and the others' C-STOREs time out)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["/usr/bin/storescp", "--fork", "-aet", "PACS", "-od", str(directory), "-uf",
             "+xa", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=(directory.parent / "storescp.log").open("ab"),
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})

    def received(self) -> list[tuple[str, str, str]]:
        """(Study Instance UID, SOP Instance UID, Modality) of every file received."""
        out = []
        for f in sorted(self.directory.iterdir()):
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception:  # still being written
                continue
            out.append((str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), str(ds.Modality)))
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def write_config(directory: Path, node_port: int, *, destinations: list[dict[str, Any]] | None = None,
                 extra: str = "", peers: tuple[PeerConfig, ...] | None = None,
                 quiet_seconds: float = 0.5, min_free_mb: int = 0,
                 spool_dir: Path | None = None) -> Path:
    """A config.toml for a test node on loopback; ``extra`` is TOML text appended to it."""
    config = Config(
        node=NodeConfig(port=node_port),
        peers=peers if peers is not None else (
            PeerConfig("STORESCU", "127.0.0.1"), PeerConfig("ORTHANC", "127.0.0.1"),
            PeerConfig("TESTSCU")),
        destinations=tuple(DestinationConfig(host="127.0.0.1", **d) for d in destinations or []),
        storage=StorageConfig(spool_dir=spool_dir or (directory / "spool"),
                              database=directory / "node.sqlite", min_free_mb=min_free_mb),
        study=StudyConfig(quiet_seconds=quiet_seconds),
        delivery=DeliveryConfig(max_attempts=2, backoff_initial_seconds=0.2, backoff_max_seconds=1.0),
        models=ModelConfig(registry=ROOT / "models" / "registry.toml", router="bodypart-router",
                           classifier="fracture-classifier"),
        keep_results_local=not destinations,
    )
    path = directory / "config.toml"
    path.write_text(render_config(config) + extra)
    return path



def restudy(files: list[Path], directory: Path, study_uid: str, prefix: str = "") -> list[Path]:
    """Copies of ``files`` filed into the study ``study_uid`` (same patient; series and
    instance UIDs derived from the study's, so the same in every run), written to
    ``directory`` as ``prefix`` + the source's file name."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study_uid, str(ds.SeriesInstanceUID)])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[study_uid, str(ds.SOPInstanceUID)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = directory / f"{prefix}{f.name}"
        ds.save_as(path)
        out.append(path)
    return out

def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (or fail at the deadline)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


# -- a second validator ---------------------------------------------------------------

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")


def pixelmed_sr_errors(path: Path) -> list[str]:
    """Errors that PixelMed's ``DicomSRValidator`` (Debian ``libpixelmed-java``) reports
    for an SR or KOS file: the IOD and its templates.  Its "Content Item not in
    template" warnings for our qualitative evaluations are listed in the conformance
    statement; errors fail.  The three JAXP flags lift the XPath limits that otherwise
    stop it ("JAXP0801003 ... 10,000 limit")."""
    import subprocess

    proc = subprocess.run(
        ["java", "-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0",
         "-Djdk.xml.xpathTotalOpLimit=0", "-cp", str(PIXELMED_JAR),
         "com.pixelmed.validate.DicomSRValidator", str(path)],
        capture_output=True, text=True, timeout=120,
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    assert any("validation complete" in line.lower() for line in lines), lines[-20:]
    return [line for line in lines if line.startswith("Error") or "Exception" in line]


# -- the job store of a node under test ---------------------------------------------------

LEASE_SECONDS = 3.0
"""The lease of a test node on PostgreSQL: short, so a take-over costs seconds."""


@pytest.fixture(params=["sqlite", "postgres"])
def job_database(request: pytest.FixtureRequest) -> str:
    """The job store of a node under test, as TOML to append to its config: ``""`` (the
    SQLite file, the default) or a ``[database]`` section on a fresh database of the
    tests' PostgreSQL (tests/pgserver.py, one server per test process)."""
    if request.param == "sqlite":
        return ""
    from pgserver import shared_server

    url = shared_server().new_database()
    return (f'[database]\nurl = "{url}"\nlease_seconds = {LEASE_SECONDS}\n'
            'heartbeat_seconds = 0.5\n')
