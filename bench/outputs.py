"""Benchmark of ``dicom_out``: build the SC, SR and PDF of a 4-image study.

Inputs are real radiographs from ``../shared/data/dicom`` (RG3_UNCR: CR 1760 x 1760,
RG2_JPLL: CR 2140 x 1760), decoded and windowed once before timing (decoding is the
pipeline's job, not ``dicom_out``'s).  Heat maps are Gaussian blobs on a 224 grid,
standing in for Grad-CAM.  The four instances are moved into one study (Patient /
Study attributes of the first, new UIDs), as a PACS would send them.

Timed, per repetition: four Secondary Captures, the SR (which lists the SCs as
evidence) and the PDF, built in memory; optionally also written to bytes
(``--write``).  The target is < 0.5 s for the whole study.

Usage::

    .venv/bin/python bench/outputs.py [--repeat 7] [--write]
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dicom_out.common import OutputSettings  # noqa: E402
from dicom_out.pdf import build_pdf_report  # noqa: E402
from dicom_out.sc import build_secondary_capture  # noqa: E402
from dicom_out.sr import build_structured_report  # noqa: E402
from pipeline.resize import fit_square  # noqa: E402
from pipeline.result import (  # noqa: E402
    BodyPartDecision,
    Decision,
    ImageFinding,
    ImageMetadata,
    ModelInfo,
    NormalisedImage,
    StudyResult,
)

DICOM_DATA = ROOT.parent / "shared" / "data" / "dicom"
GRID = 224
T = TypeVar("T")

ROUTER = ModelInfo("fracture-router", "1.0.0", "MobileNetV2", "a" * 64, "1.2.826.0.1.3680043.8.498.1")
CLASSIFIER = ModelInfo(
    "fracture-classifier", "1.2.0", "MobileNetV2", "b" * 64, "1.2.826.0.1.3680043.8.498.2"
)


def _window(ds: pydicom.Dataset) -> np.ndarray:
    arr = ds.pixel_array.astype(np.float32)
    wc = float(np.atleast_1d(ds.WindowCenter)[0])
    ww = float(np.atleast_1d(ds.WindowWidth)[0])
    out = np.clip((arr - (wc - ww / 2.0)) / ww, 0.0, 1.0)
    return (1.0 - out if ds.PhotometricInterpretation == "MONOCHROME1" else out).astype(np.float32)


def _blob(cy: float, cx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:GRID, 0:GRID].astype(np.float32) / GRID
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.12**2)).astype(np.float32)


def demo_study() -> tuple[StudyResult, dict[str, pydicom.Dataset]]:
    """A 4-image study (real pixels, stand-in model outputs) and its sources."""
    files = [
        ("pydicom-data/RG3_UNCR.dcm", "WRIST", 0.87, Decision.POSITIVE),
        ("pylibjpeg-data/RG2_JPLL.dcm", "HAND", 0.47, Decision.DOUBTFUL),
        ("pydicom-data/RG3_UNCR.dcm", "WRIST", 0.71, Decision.POSITIVE),
        ("pylibjpeg-data/RG2_JPLL.dcm", "HAND", 0.12, Decision.NEGATIVE),
    ]
    cache: dict[str, tuple[pydicom.Dataset, np.ndarray]] = {}
    head: pydicom.Dataset | None = None
    findings: list[ImageFinding] = []
    sources: dict[str, pydicom.Dataset] = {}
    for n, (name, part, p, decision) in enumerate(files, start=1):
        if name not in cache:
            ds = pydicom.dcmread(DICOM_DATA / name)
            cache[name] = (ds, _window(ds))
        ds, pixels = cache[name]
        src = copy.deepcopy(ds)
        if head is None:
            head = src
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                   "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                   "ReferringPhysicianName", "StudyDescription"):
            if kw in head:
                src[kw] = copy.deepcopy(head[kw])
        src.SeriesInstanceUID = generate_uid(entropy_srcs=[head.StudyInstanceUID, f"s{n}"])
        src.SOPInstanceUID = generate_uid(entropy_srcs=[head.StudyInstanceUID, f"i{n}"])
        src.InstanceNumber = n
        sources[src.SOPInstanceUID] = src
        _, transform = fit_square(pixels, GRID)
        meta = ImageMetadata(
            study_instance_uid=src.StudyInstanceUID,
            series_instance_uid=src.SeriesInstanceUID,
            sop_instance_uid=src.SOPInstanceUID,
            sop_class_uid=src.SOPClassUID,
            modality=src.Modality,
            body_part_examined=src.get("BodyPartExamined", ""),
            rows=int(src.Rows),
            columns=int(src.Columns),
        )
        findings.append(
            ImageFinding(
                image=NormalisedImage(meta=meta, pixels=pixels, source_shape=pixels.shape),
                transform=transform,
                body_part=part,
                body_part_probability=0.95,
                body_part_probabilities={part: 0.95},
                fracture_probability=p,
                threshold=0.5,
                doubt_band=(0.4, 0.6),
                decision=decision,
                heatmap=_blob(0.3 + 0.1 * n, 0.5),
                router=ROUTER,
                classifier=CLASSIFIER,
            )
        )
    assert head is not None
    by_part = {}
    for part in ("HAND", "WRIST"):
        group = [f for f in findings if f.body_part == part]
        mean = float(np.mean([f.fracture_probability for f in group]))
        by_part[part] = BodyPartDecision(
            part, mean, 0.5, (0.4, 0.6),
            Decision.POSITIVE if mean >= 0.6 else Decision.DOUBTFUL if mean >= 0.4
            else Decision.NEGATIVE,
            tuple(f.meta.sop_instance_uid for f in group),
        )
    result = StudyResult(
        study_instance_uid=head.StudyInstanceUID,
        findings=tuple(findings),
        refusals=(),
        by_body_part=by_part,
        models=(ROUTER, CLASSIFIER),
        decision=Decision.POSITIVE,
    )
    return result, sources


CLOCK: Callable[[], float] = time.perf_counter


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = CLOCK()
    value = fn()
    return value, CLOCK() - start


def _to_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def run_once(
    result: StudyResult, sources: dict[str, pydicom.Dataset], settings: OutputSettings, write: bool
) -> dict[str, float]:
    """Build (and optionally serialise) all outputs once; seconds per object."""
    times: dict[str, float] = {}
    scs = []
    for i, finding in enumerate(result.findings, start=1):
        sc, t = _timed(
            lambda f=finding: build_secondary_capture(f, sources[f.meta.sop_instance_uid], settings)
        )
        if write:
            t += _timed(lambda d=sc: _to_bytes(d))[1]
        times[f"sc{i}"] = t
        scs.append(sc)
    sr, t = _timed(lambda: build_structured_report(result, sources, scs, settings))
    if write:
        t += _timed(lambda: _to_bytes(sr))[1]
    times["sr"] = t
    pdf, t = _timed(lambda: build_pdf_report(result, sources, settings))
    if write:
        t += _timed(lambda: _to_bytes(pdf))[1]
    times["pdf"] = t
    times["total"] = sum(times.values())
    return times


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print per-object and total times (ms)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="timed repetitions")
    parser.add_argument("--write", action="store_true", help="also serialise to bytes")
    args = parser.parse_args(argv)
    import pydicom.config

    pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    global CLOCK
    result, sources = demo_study()
    settings = OutputSettings()
    cold = run_once(result, sources, settings, args.write)
    wall = [run_once(result, sources, settings, args.write) for _ in range(args.repeat)]
    CLOCK = time.process_time
    cpu = [run_once(result, sources, settings, args.write) for _ in range(args.repeat)]
    CLOCK = time.perf_counter
    print(
        f"dicom_out benchmark: 4-image study, {args.repeat} repetitions"
        f"{' (incl. writing to bytes)' if args.write else ''}; "
        "wall clock is inflated when other processes share the CPUs, CPU time is not"
    )
    print(f"{'object':<8}{'cold ms':>9}{'wall median':>13}{'wall min':>10}{'CPU median':>12}")
    for key in cold:
        w = [r[key] * 1000 for r in wall]
        c = [r[key] * 1000 for r in cpu]
        print(
            f"{key:<8}{cold[key] * 1000:>9.1f}{statistics.median(w):>13.1f}{min(w):>10.1f}"
            f"{statistics.median(c):>12.1f}"
        )
    median_wall = statistics.median(r["total"] for r in wall)
    median_cpu = statistics.median(r["total"] for r in cpu)
    print(
        f"target < 500 ms for the whole study: wall median {median_wall * 1000:.0f} ms "
        f"({'OK' if median_wall < 0.5 else 'OVER'}), CPU median {median_cpu * 1000:.0f} ms "
        f"({'OK' if median_cpu < 0.5 else 'OVER'})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
