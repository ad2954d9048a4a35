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
import sys  # noqa: E402
import textwrap  # noqa: E402
from typing import Any  # noqa: E402

_spec = importlib.util.spec_from_file_location("orthanc_ctl", ROOT / "orthanc-test" / "orthanc_ctl.py")
assert _spec is not None and _spec.loader is not None
orthanc_ctl = importlib.util.module_from_spec(_spec)
sys.modules["orthanc_ctl"] = orthanc_ctl
_spec.loader.exec_module(orthanc_ctl)
free_port = orthanc_ctl.free_port
Orthanc = orthanc_ctl.Orthanc
storescu = orthanc_ctl.storescu


def write_config(directory: Path, node_port: int, *, destinations: list[dict[str, Any]] | None = None,
                 extra: str = "", peers: str | None = None, quiet_seconds: float = 0.5,
                 min_free_mb: int = 0, spool_dir: Path | None = None,
                 delivery: str = "") -> Path:
    """A config.toml for a test node on loopback."""
    dests = "".join(
        textwrap.dedent(f"""
        [[destinations]]
        name = "{d['name']}"
        ae_title = "{d['ae_title']}"
        host = "127.0.0.1"
        port = {d['port']}
        """) for d in (destinations or [])
    )
    peers = peers if peers is not None else textwrap.dedent("""
        [[peers]]
        ae_title = "STORESCU"
        host = "127.0.0.1"
        [[peers]]
        ae_title = "ORTHANC"
        host = "127.0.0.1"
        [[peers]]
        ae_title = "TESTSCU"
        """)
    spool = spool_dir or (directory / "spool")
    delivery = delivery or textwrap.dedent("""
        [delivery]
        max_attempts = 2
        backoff_initial_seconds = 0.2
        backoff_max_seconds = 1.0
        """)
    text = textwrap.dedent(f"""
        [node]
        ae_title = "FRACTURE_NODE"
        bind_address = "127.0.0.1"
        port = {node_port}
        [storage]
        spool_dir = "{spool}"
        database = "{directory / 'node.sqlite'}"
        min_free_mb = {min_free_mb}
        [study]
        quiet_seconds = {quiet_seconds}
        [models]
        registry = "{ROOT / 'models' / 'registry.toml'}"
        router = "bodypart-router"
        classifier = "fracture-classifier"
        """) + peers + dests + delivery + extra
    path = directory / "config.toml"
    path.write_text(text)
    return path


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
