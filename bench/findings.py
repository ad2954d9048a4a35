"""Stand-in findings on real radiographs, for ``bench/outputs.py`` and
``tests/test_dicom_out.py``.

Radiographs from ``../shared/data/dicom`` are decoded with pydicom and a plain window
(standing in for ``pipeline.normalise``).  The heat maps are Gaussian blobs on the
model grid, standing in for Grad-CAM.  To make one study out of files that come from
different studies, :func:`reparent` copies the Patient/Study attributes of one file
into a copy of another and gives it new Series and SOP Instance UIDs.
"""

from __future__ import annotations

import copy

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from pipeline.aggregate import aggregate_study
from pipeline.resize import fit_square
from pipeline.validate import read_metadata
from pipeline.result import (
    Decision,
    ImageFinding,
    ImageMetadata,
    ModelInfo,
    NormalisedImage,
    Refusal,
    StudyResult,
)

MODEL_GRID = 224

ROUTER = ModelInfo(
    name="fracture-router",
    version="1.0.0",
    architecture="MobileNetV2",
    weights_sha256="a" * 64,
    device_uid="1.2.826.0.1.3680043.8.498.1001",
    finding="body part",
)
CLASSIFIER = ModelInfo(
    name="fracture-classifier",
    version="1.2.0",
    architecture="MobileNetV2",
    weights_sha256="b" * 64,
    device_uid="1.2.826.0.1.3680043.8.498.1002",
    finding="fracture",
)


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
    """The node's own reading of the identifying attributes."""
    return read_metadata(ds)


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
    """The study result of stand-in findings, aggregated by the node's own rule."""
    return aggregate_study(study_uid, [*findings, *refusals], (ROUTER, CLASSIFIER))
