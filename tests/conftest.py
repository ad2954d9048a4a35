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
