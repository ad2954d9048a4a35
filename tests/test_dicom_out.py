"""Tests of ``dicom_out``: Secondary Capture, TID 1500 SR and Encapsulated PDF.

The inputs are real radiographs from ``../shared/data/dicom``, decoded here with
pydicom and a plain window (standing in for ``pipeline.normalise``).  The heat maps
are Gaussian blobs on the model grid: a fixture standing in for the models, whose
real output is plugged in by the integration tests.  To make one study out of
files that come from different studies, the test copies the Patient/Study
attributes of the first file into the others and gives them new SOP Instance UIDs.

Every object is written with strict validation (``conftest.py``), read back,
validated with ``dciodvfy`` and rendered with DCMTK / poppler.
"""

from __future__ import annotations

import copy
import io
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_out.common import (
    BODY_PART_CODES,
    OutputSettings,
    output_uid,
    render_heatmap,
)
from dicom_out.pdf import build_pdf_report
from dicom_out.sc import build_secondary_capture
from dicom_out.sr import build_structured_report
from pipeline.resize import fit_square
from pipeline.result import (
    NODE_MANUFACTURER,
    BodyPartDecision,
    Decision,
    ImageFinding,
    ImageMetadata,
    ModelInfo,
    NormalisedImage,
    Refusal,
    RefusalCode,
    StudyResult,
)

DICOM_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
MODEL_GRID = 224

ROUTER = ModelInfo(
    name="fracture-router",
    version="1.0.0",
    architecture="MobileNetV2",
    weights_sha256="a" * 64,
    device_uid="1.2.826.0.1.3680043.8.498.1001",
)
CLASSIFIER = ModelInfo(
    name="fracture-classifier",
    version="1.2.0",
    architecture="MobileNetV2",
    weights_sha256="b" * 64,
    device_uid="1.2.826.0.1.3680043.8.498.1002",
)
SETTINGS = OutputSettings()


# ----------------------------------------------------------------------------- helpers


def read(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(DICOM_DATA / name)


def window(ds: pydicom.Dataset) -> np.ndarray:
    """Decode and window like a viewer; bone bright, float32 in [0, 1]."""
    arr = ds.pixel_array.astype(np.float32)
    wc = float(np.atleast_1d(ds.WindowCenter)[0])
    ww = float(np.atleast_1d(ds.WindowWidth)[0])
    out = np.clip((arr - (wc - ww / 2.0)) / ww, 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def meta_of(ds: pydicom.Dataset) -> ImageMetadata:
    return ImageMetadata(
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        modality=ds.get("Modality", ""),
        body_part_examined=ds.get("BodyPartExamined", ""),
        laterality=ds.get("ImageLaterality", "") or ds.get("Laterality", ""),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
    )


def blob(centre: tuple[float, float], sigma: float = 0.12) -> np.ndarray:
    """Gaussian heat map on the model grid (stands in for Grad-CAM)."""
    yy, xx = np.mgrid[0:MODEL_GRID, 0:MODEL_GRID].astype(np.float32) / MODEL_GRID
    d2 = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2
    return np.exp(-d2 / (2 * sigma**2)).astype(np.float32)


def make_finding(
    ds: pydicom.Dataset,
    pixels: np.ndarray,
    body_part: str,
    probability: float,
    decision: Decision,
    centre: tuple[float, float] = (0.45, 0.5),
) -> ImageFinding:
    _, transform = fit_square(pixels, MODEL_GRID)
    image = NormalisedImage(meta=meta_of(ds), pixels=pixels, source_shape=pixels.shape)
    return ImageFinding(
        image=image,
        transform=transform,
        body_part=body_part,
        body_part_probability=0.97,
        body_part_probabilities={body_part: 0.97, "HAND": 0.03},
        fracture_probability=probability,
        threshold=0.5,
        doubt_band=(0.4, 0.6),
        decision=decision,
        heatmap=blob(centre),
        router=ROUTER,
        classifier=CLASSIFIER,
    )


def reparent(ds: pydicom.Dataset, study: pydicom.Dataset, n: int) -> pydicom.Dataset:
    """A copy of ``ds`` moved into ``study`` with new Series/SOP Instance UIDs."""
    out = copy.deepcopy(ds)
    for keyword in (
        "SpecificCharacterSet",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyDescription",
    ):
        if keyword in study:
            out[keyword] = study[keyword]
        elif keyword in out:
            del out[keyword]
    out.SeriesInstanceUID = generate_uid(entropy_srcs=[study.StudyInstanceUID, str(n), "series"])
    out.SOPInstanceUID = generate_uid(entropy_srcs=[study.StudyInstanceUID, str(n), "sop"])
    out.InstanceNumber = n
    return out


def study_result(
    findings: list[ImageFinding], refusals: list[Refusal], study_uid: str
) -> StudyResult:
    by_part: dict[str, BodyPartDecision] = {}
    for part in sorted({f.body_part for f in findings}):
        group = [f for f in findings if f.body_part == part]
        p = float(np.mean([f.fracture_probability for f in group]))
        decision = (
            Decision.POSITIVE
            if p >= 0.6
            else Decision.NEGATIVE
            if p < 0.4
            else Decision.DOUBTFUL
        )
        by_part[part] = BodyPartDecision(
            body_part=part,
            probability=p,
            threshold=0.5,
            doubt_band=(0.4, 0.6),
            decision=decision,
            sop_instance_uids=tuple(f.meta.sop_instance_uid for f in group),
        )
    order = [Decision.POSITIVE, Decision.DOUBTFUL, Decision.NEEDS_REVIEW, Decision.NEGATIVE]
    decisions = [d.decision for d in by_part.values()]
    decision = next((d for d in order if d in decisions), Decision.NOT_ANALYSED)
    return StudyResult(
        study_instance_uid=study_uid,
        findings=tuple(findings),
        refusals=tuple(refusals),
        by_body_part=by_part,
        models=(ROUTER, CLASSIFIER),
        decision=decision,
    )


def to_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) reported by dicom3tools' dciodvfy."""
    proc = subprocess.run(
        ["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=60
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings


# ----------------------------------------------------------------------------- fixtures


class Study:
    """A 4-image study (3 analysed, 1 refused) built from real files."""

    def __init__(self, charset: str | None = None, name: str | None = None) -> None:
        rg3 = read("pydicom-data/RG3_UNCR.dcm")
        rg2 = read("pylibjpeg-data/RG2_JPLL.dcm")
        ct = read("pydicom-testfiles/CT_small.dcm")
        head = rg3.copy()
        if charset is not None:
            head.SpecificCharacterSet = charset
        if name is not None:
            head.PatientName = name
        wrist = reparent(rg3, head, 1)
        wrist.ImageLaterality = "R"
        hand = reparent(rg2, head, 2)
        elbow = reparent(rg3, head, 3)
        refused = reparent(ct, head, 4)
        p3, p2 = _pixels("rg3", rg3), _pixels("rg2", rg2)
        self.findings = [
            make_finding(wrist, p3, "WRIST", 0.87, Decision.POSITIVE, (0.35, 0.55)),
            make_finding(hand, p2, "HAND", 0.47, Decision.DOUBTFUL, (0.6, 0.4)),
            make_finding(elbow, p3, "ELBOW", 0.12, Decision.NEGATIVE),
        ]
        self.refusals = [
            Refusal(
                meta=meta_of(refused),
                code=RefusalCode.UNSUPPORTED_MODALITY,
                text="CT is not a projection radiograph",
            )
        ]
        self.sources: dict[str, pydicom.Dataset] = {
            d.SOPInstanceUID: d for d in (wrist, hand, elbow, refused)
        }
        self.result = study_result(self.findings, self.refusals, head.StudyInstanceUID)

    def build(self) -> tuple[list[pydicom.Dataset], pydicom.Dataset, pydicom.Dataset]:
        scs = [
            build_secondary_capture(f, self.sources[f.meta.sop_instance_uid], SETTINGS)
            for f in self.findings
        ]
        sr = build_structured_report(self.result, self.sources, scs, SETTINGS)
        pdf = build_pdf_report(self.result, self.sources, SETTINGS)
        return scs, sr, pdf


_PIXELS: dict[str, np.ndarray] = {}


def _pixels(key: str, ds: pydicom.Dataset) -> np.ndarray:
    if key not in _PIXELS:
        _PIXELS[key] = window(ds)
    return _PIXELS[key]


@pytest.fixture(scope="module")
def study() -> Study:
    return Study()


@pytest.fixture(scope="module")
def built(study: Study) -> tuple[list[pydicom.Dataset], pydicom.Dataset, pydicom.Dataset]:
    return study.build()


@pytest.fixture(scope="module")
def written(
    built: tuple[list[pydicom.Dataset], pydicom.Dataset, pydicom.Dataset],
    tmp_path_factory: pytest.TempPathFactory,
) -> Mapping[str, Path]:
    """The objects written to files (strict writing validation is on here)."""
    import pydicom.config

    folder = tmp_path_factory.mktemp("dicom_out")
    scs, sr, pdf = built
    paths = {f"sc{i}": folder / f"sc{i}.dcm" for i in range(len(scs))}
    paths["sr"] = folder / "sr.dcm"
    paths["pdf"] = folder / "pdf.dcm"
    mode = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    try:
        for i, ds in enumerate(scs):
            ds.save_as(paths[f"sc{i}"], enforce_file_format=True)
        sr.save_as(paths["sr"], enforce_file_format=True)
        pdf.save_as(paths["pdf"], enforce_file_format=True)
    finally:
        pydicom.config.settings.writing_validation_mode = mode
    return paths


# ----------------------------------------------------------------------------- settings


def test_settings_validate() -> None:
    assert SETTINGS.manufacturer == NODE_MANUFACTURER
    with pytest.raises(ValueError, match="series numbers must differ"):
        OutputSettings(sr_series_number=9001)
    with pytest.raises(ValueError, match="max_sc_side"):
        OutputSettings(max_sc_side=10)
    with pytest.raises(ValueError, match="64"):
        OutputSettings(manufacturer="x" * 65)


def test_output_uid_is_deterministic() -> None:
    assert output_uid("1.2.3", "abc", "sc") == output_uid("1.2.3", "abc", "sc")
    assert output_uid("1.2.3", "abc", "sc") != output_uid("1.2.3", "abc", "sr")
    assert len(output_uid("x")) <= 64
    # pydicom joins entropy sources without a separator; ours must not collide
    assert output_uid("1.2.3", "45") != output_uid("1.2.34", "5")


def test_negative_heatmap_is_grey(study: Study) -> None:
    negative = study.findings[2]
    rgb = render_heatmap(negative, 512)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    positive = render_heatmap(study.findings[0], 512)
    assert not np.array_equal(positive[..., 0], positive[..., 2])
