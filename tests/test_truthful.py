"""Every statement agrees with the image decisions: the study rule cannot dilute a
suspicious image, and the SC captions, the SR (parsed with highdicom), the PDF text
(extracted with ``pdftotext``) and the KOS all say what the decision objects say.

Study compositions are drawn at random (hypothesis): numbers of images, body parts,
probabilities, decisions, refusals, series and instance numbers, and what the
classifier's number means (fracture or MURA abnormality).
"""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import pixelmed_sr_errors
from dicom_out import wording
from dicom_out.common import shows_heatmap
from dicom_out.common import DECISION_EVALUATION, OutputSettings, finding_code
from dicom_out.ko import build_key_object_selection
from dicom_out.pdf import build_pdf_report
from dicom_out.sc import (
    MIN_CAPTION_WIDTH,
    caption_layout,
    compose_secondary_capture,
    font_path,
    wrap_text,
)
from dicom_out.sr import OHIF_TOOL_PREFIX, SR_IMAGE_REGIONS, build_structured_report
from pipeline.aggregate import SEVERITY, aggregate_study, decide
from pipeline.resize import fit_square
from pipeline.result import (
    Decision,
    ImageFinding,
    ImageMetadata,
    ModelInfo,
    NormalisedImage,
    Refusal,
    RefusalCode,
    StudyResult,
)
from pipeline.validate import read_metadata

CR = "1.2.840.10008.5.1.4.1.1.1"
SETTINGS = OutputSettings()
ROUTER = ModelInfo("bodypart-router", "9.9.9", "MobileNetV2 (test)", "1" * 64, "2.25.1",
                   finding="body part")
BAND = (0.4, 0.6)


def classifier(finding: str) -> ModelInfo:
    return ModelInfo("classifier", "9.9.9", "MobileNetV2 (test)", ("2" if finding == "fracture"
                     else "3") * 64, "2.25.2", finding=finding,
                     validated=("Forearm: AUROC 0.90 (95 % CI 0.83\u20130.94) on 133 validation studies",))


def source(study_uid: str, series: int, instance: int, salt: str) -> Dataset:
    """A small real CR instance of the test study (8-bit, 96 x 64)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[study_uid, salt])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study_uid, str(series)])
    ds.SeriesNumber = series
    ds.InstanceNumber = instance
    ds.SeriesDescription = f"Views {series}"
    ds.Modality = "CR"
    ds.PatientName, ds.PatientID = "TEST^Truth", "TRUTH-1"
    ds.PatientBirthDate = ds.PatientSex = ds.ReferringPhysicianName = ""
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240102", "101010", "A1", "1"
    ds.PatientOrientation = ""
    ds.Rows, ds.Columns = 96, 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    rng = np.random.default_rng(abs(hash(salt)) % 2**32)
    ds.PixelData = rng.integers(0, 255, (96, 64), dtype=np.uint8).tobytes()
    return ds


def analysed(ds: Dataset, part: str, p: float, decision: Decision, model: ModelInfo) -> ImageFinding:
    pixels = (np.frombuffer(ds.PixelData, np.uint8).reshape(96, 64) / 255.0).astype(np.float32)
    _, transform = fit_square(pixels, 32)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    heat = np.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / 0.05).astype(np.float32)
    return ImageFinding(
        image=NormalisedImage(read_metadata(ds), pixels, (96, 64)), transform=transform,
        body_part=part, body_part_probability=0.9, body_part_probabilities={part: 0.9},
        fracture_probability=p, threshold=0.5, doubt_band=BAND, decision=decision,
        heatmap=heat, router=ROUTER, classifier=model)


REFUSALS = [
    (RefusalCode.UNSUPPORTED_BODY_PART, "HAND"),
    (RefusalCode.UNSUPPORTED_BODY_PART, "OTHER"),
    (RefusalCode.COLOUR_IMAGE, ""),
    (RefusalCode.DECODE_FAILED, ""),
    (RefusalCode.BODY_PART_UNCERTAIN, "WRIST"),
]

image_strategy = st.one_of(
    st.tuples(st.just("finding"), st.sampled_from(["FOREARM", "HUMERUS", "UPPER_LIMB"]),
              st.floats(0.0, 1.0), st.booleans()),
    st.tuples(st.just("refusal"), st.integers(0, len(REFUSALS) - 1), st.just(0.0), st.just(False)),
)


def compose(images: list[tuple], finding: str) -> tuple[StudyResult, dict[str, Dataset]]:
    study_uid = generate_uid(entropy_srcs=[repr(images), finding])
    model = classifier(finding)
    outcomes: list[ImageFinding | Refusal] = []
    sources: dict[str, Dataset] = {}
    for i, (kind, a, p, review) in enumerate(images):
        ds = source(study_uid, 1 + i % 2, 1 + i, f"{study_uid}-{i}")
        sources[ds.SOPInstanceUID] = ds
        if kind == "finding":
            decision = Decision.NEEDS_REVIEW if review else decide(p, BAND)
            outcomes.append(analysed(ds, a, p, decision, model))
        else:
            code, part = REFUSALS[a]
            outcomes.append(Refusal(read_metadata(ds), code, "detail", body_part=part))
    return aggregate_study(study_uid, outcomes, (ROUTER, model)), sources


def _severity(decision: Decision) -> int:
    return SEVERITY.index(decision)


def _pdf_text(pdf: Dataset, tmp: Path) -> str:
    path = tmp / "report.pdf"
    path.write_bytes(bytes(pdf.EncapsulatedDocument)[: pdf.EncapsulatedDocumentLength])
    text = subprocess.run(["pdftotext", str(path), "-"], capture_output=True, text=True,
                          timeout=60, check=True).stdout
    return re.sub(r"\s+", " ", text)


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(images=st.lists(image_strategy, min_size=1, max_size=5),
       finding=st.sampled_from(["fracture", "abnormality"]))
def test_every_output_agrees_with_the_image_decisions(images: list[tuple], finding: str,
                                                      tmp_path: Path) -> None:
    result, sources = compose(images, finding)
    images_analysed = [f for f in result.findings]

    # the study rule: never milder than the most severe image, per part and per study
    for part in result.by_body_part.values():
        for decision in part.image_decisions.values():
            assert _severity(part.decision) <= _severity(decision)
    for f in images_analysed:
        assert _severity(result.decision) <= _severity(f.decision)
    flagged = [f for f in images_analysed if f.decision in (Decision.POSITIVE, Decision.DOUBTFUL)]
    if flagged:
        assert result.decision in (Decision.POSITIVE, Decision.DOUBTFUL)
    # an image whose body part the router is not sure of needs a human, whatever else
    if any(r.code is RefusalCode.BODY_PART_UNCERTAIN for r in result.refusals) and not flagged:
        assert result.decision is Decision.NEEDS_REVIEW

    # captions: the decision and the number, named after what the model measures
    for f in images_analysed:
        first = wording.caption_lines(f)[0][0]
        assert first.startswith(f"{finding.capitalize()}: {wording.DECISION_LABEL[f.decision]}")
        assert f"{f.fracture_probability:.2f}" in first

    if not images_analysed and all(isinstance(o, Refusal) for o in result.outcomes()):
        pass  # refusals only: the report still says why each was not analysed
    # SR, parsed back with highdicom
    sr = build_structured_report(result, sources, [], SETTINGS)
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    parsed = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(buf.getvalue())))
    concept = finding_code(result.models[1])
    assert parsed.content.get_planar_roi_measurement_groups() == []  # TID 1501 throughout
    groups = {g.tracking_identifier: g for g in parsed.content.get_image_measurement_groups()}
    # a region (TID 320 SCOORD of the probability) names OHIF's tool before the image
    regions = {ident for ident, g in groups.items()
               if any(m.referenced_coordinates for m in g.get_measurements())}
    assert all(i.startswith(tuple(OHIF_TOOL_PREFIX.values())) for i in regions)

    def image_of(ident: str) -> str:
        for prefix in OHIF_TOOL_PREFIX.values():
            ident = ident.removeprefix(prefix + " ")
        return ident

    for outcome in result.outcomes():
        meta = outcome.meta
        matches = [g for ident, g in groups.items()
                   if image_of(ident).startswith(wording.image_short(meta) + ":")]
        assert len(matches) == 1, (wording.image_short(meta), list(groups))
        values = {q.name.value: q.value.value for q in matches[0].get_qualitative_evaluations()}
        decision = outcome.decision if isinstance(outcome, ImageFinding) else Decision.NOT_ANALYSED
        assert values[concept.value] == DECISION_EVALUATION[decision].value
        assert values["decision"] == decision.value
        # a region on the image iff the decision shows a heat map (positive, doubtful)
        (ident,) = [i for i in groups if image_of(i).startswith(wording.image_short(meta) + ":")]
        assert (ident in regions) == (SR_IMAGE_REGIONS and shows_heatmap(decision))
    study_values = [
        {q.name.value: q.value.value for q in g.get_qualitative_evaluations()}
        for g in parsed.content.get_image_measurement_groups() if g.tracking_identifier == "Study"
    ]
    assert study_values == [{concept.value: DECISION_EVALUATION[result.decision].value,
                             "decision": result.decision.value}]

    # PDF, as pdftotext reads it
    text = _pdf_text(build_pdf_report(result, sources, SETTINGS), tmp_path)
    title, sub = wording.headline(result)
    assert _flat(title) in text
    other = "abnormality" if finding == "fracture" else "fracture"
    assert f"{other.upper()} SUSPECTED" not in text and f"NO {other.upper()}" not in text
    assert f"{other.capitalize()} p" not in text
    if flagged:
        assert "NO FRACTURE DETECTED" not in text and "NO ABNORMALITY DETECTED" not in text
        assert f"was detected by the AI" not in text
        for f in flagged:
            assert _flat(wording.image_name(f.meta)) in _flat(sub)
    for outcome in result.outcomes():
        assert _flat(wording.image_name(outcome.meta)) in text
        if isinstance(outcome, Refusal):
            assert _flat(wording.refusal_reason(outcome)) in text

    # KOS: exactly the flagged images
    ko = build_key_object_selection(result, sources, [], SETTINGS) if images_analysed else None
    if flagged:
        assert ko is not None
        selected = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                    for item in ko.ContentSequence if item.ValueType == "IMAGE"}
        assert selected == {f.meta.sop_instance_uid for f in flagged}
    else:
        assert ko is None


def test_an_added_normal_view_does_not_hide_a_doubtful_one(tmp_path: Path) -> None:
    """The demo's forearm: 0.70 (doubtful) alone is doubtful; with a 0.41 normal view
    the plain mean (0.555) would say negative; the study stays doubtful."""
    model = classifier("abnormality")
    band = (0.556374, 0.756374)
    study = generate_uid()
    a, b = source(study, 1, 1, "a"), source(study, 1, 2, "b")
    doubtful = analysed(a, "FOREARM", 0.70, decide(0.70, band), model)
    normal = analysed(b, "FOREARM", 0.41, decide(0.41, band), model)
    from dataclasses import replace
    doubtful, normal = replace(doubtful, doubt_band=band), replace(normal, doubt_band=band)
    result = aggregate_study(study, [doubtful, normal], (ROUTER, model))
    part = result.by_body_part["FOREARM"]
    assert part.mean_decision is Decision.NEGATIVE and part.probability == pytest.approx(0.555)
    assert part.decision is Decision.DOUBTFUL and result.decision is Decision.DOUBTFUL
    title, sub = wording.headline(result)
    assert title == "DOUBTFUL ABNORMALITY RESULT"
    assert "1 of 2 forearm images doubtful, 1 negative" in sub
    assert "Series 1 (Views 1), image 1 (doubtful, p = 0.70)" in sub
    text = _pdf_text(build_pdf_report(result, {a.SOPInstanceUID: a, b.SOPInstanceUID: b},
                                      SETTINGS), tmp_path)
    assert "DOUBTFUL ABNORMALITY RESULT" in text and "NO ABNORMALITY DETECTED" not in text
    assert "mean rule: negative" in text


def test_refused_images_are_named_with_their_series_and_reason() -> None:
    study = generate_uid()
    hip = source(study, 4, 1, "hip")
    hip.SeriesDescription = "Hip"
    refusal = Refusal(read_metadata(hip), RefusalCode.UNSUPPORTED_BODY_PART, "router: HIP",
                      body_part="HIP")
    assert wording.refusal_sentence(refusal) == (
        "Series 4 (Hip), image 1 \u2014 not analysed: hip radiograph: body part not "
        "supported by this version.")
    result = aggregate_study(study, [refusal], (ROUTER, classifier("fracture")))
    assert result.decision is Decision.NOT_ANALYSED
    assert wording.headline(result)[0] == "NOT ANALYSED"


# ----------------------------------------------------------------------------- captions


@pytest.mark.parametrize(("rows", "cols"), [(1638, 480), (768, 480), (400, 520), (600, 768),
                                             (1000, 768), (2048, 2048), (768, 1800)])
def test_captions_fit_the_image_width(rows: int, cols: int) -> None:
    """Every caption line, measured with the font's own metrics, fits the width it is
    drawn in, and no word is lost, from the smallest to the largest rendering."""
    study = generate_uid()
    ds = source(study, 12, 345, "caption")
    ds.SeriesDescription = "Forearm and wrist views, left, two projections"
    finding = analysed(ds, "FOREARM", 0.7, Decision.DOUBTFUL, classifier("abnormality"))
    layout = caption_layout(finding, cols, rows)
    assert layout.text_width > 0
    for text, bold, _ in layout.lines:
        font = ImageFont.truetype(str(font_path(bold)), layout.font_size)
        assert font.getlength(text) <= layout.text_width, (text, layout.text_width)
    words = " ".join(t for t, _, _ in layout.lines).split()
    expected = " ".join(t for t, _ in wording.caption_lines(finding)).split()
    assert words == expected


@pytest.mark.parametrize("shape", [(96, 64), (4000, 64), (64, 4000)])
def test_secondary_capture_pixels_hold_the_whole_caption(shape: tuple[int, int]) -> None:
    """From the smallest radiograph the node accepts (64 px a side) to a stitched
    64 x 4000 strip, the SC is wide enough for the caption (the narrow strip is centred
    on a wider canvas) and its band holds every wrapped line."""
    study = generate_uid()
    ds = source(study, 1, 1, "narrow")
    finding = analysed(ds, "FOREARM", 0.8, Decision.POSITIVE, classifier("fracture"))
    pixels = np.zeros(shape, np.float32)
    _, transform = fit_square(pixels, 32)
    from dataclasses import replace
    finding = replace(finding, image=NormalisedImage(finding.meta, pixels, shape),
                      transform=transform)
    out = compose_secondary_capture(finding, 2048)
    assert out.shape[1] >= MIN_CAPTION_WIDTH and max(out.shape[:2]) <= 2048
    layout = caption_layout(finding, out.shape[1], out.shape[0])
    assert layout.height < out.shape[0]
    for text, bold, _ in layout.lines:
        font = ImageFont.truetype(str(font_path(bold)), layout.font_size)
        assert font.getlength(text) <= layout.text_width


def test_wrap_refuses_a_word_wider_than_the_line() -> None:
    font = ImageFont.truetype(str(font_path(False)), 20)
    assert wrap_text("a" * 200, font, 100.0) is None
    assert wrap_text("two words", font, 1000.0) == ["two words"]


# ----------------------------------------------------------------------------- validators


def test_sr_and_kos_validate_in_pixelmed_and_dciodvfy(tmp_path: Path) -> None:
    images = [("finding", "FOREARM", 0.8, False), ("finding", "FOREARM", 0.45, False),
              ("finding", "HUMERUS", 0.1, False), ("refusal", 0, 0.0, False),
              ("refusal", 2, 0.0, False)]
    for finding in ("fracture", "abnormality"):
        result, sources = compose(images, finding)
        sr = build_structured_report(result, sources, [], SETTINGS)
        ko = build_key_object_selection(result, sources, [], SETTINGS)
        assert ko is not None
        for name, ds in (("sr", sr), ("ko", ko)):
            path = tmp_path / f"{finding}-{name}.dcm"
            ds.save_as(path, enforce_file_format=True)
            assert pixelmed_sr_errors(path) == [], (finding, name)
            out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            errors = [line for line in (out.stdout + out.stderr).splitlines()
                      if line.startswith("Error")]
            assert errors == [], (finding, name, errors)
