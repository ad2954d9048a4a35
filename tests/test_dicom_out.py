"""Tests of ``dicom_out``: Secondary Capture, TID 1500 SR and Encapsulated PDF.

The inputs are real radiographs from ``../shared/data/dicom``, decoded with pydicom
and a plain window (standing in for ``pipeline.normalise``).  The heat maps are
Gaussian blobs on the model grid: a fixture standing in for the models, whose real
output is plugged in by the integration tests.  To make one study out of files that
come from different studies, the test copies the Patient/Study attributes of the
first file into the others and gives them new SOP Instance UIDs.  These stand-ins
are ``bench/findings.py``, shared with the benchmark of ``dicom_out``.

Every object is written with strict validation (``conftest.py``), read back,
validated with ``dciodvfy`` and rendered with DCMTK / poppler.
"""

from __future__ import annotations

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

from bench.findings import (
    CLASSIFIER,
    ROUTER,
    make_finding,
    meta_of,
    reparent,
    study_result,
    window,
)
from dicom_out.common import (
    BODY_PART_CODES,
    OutputSettings,
    output_uid,
    render_heatmap,
)
from dicom_out.pdf import build_pdf_report
from dicom_out.sc import build_secondary_capture
from dicom_out.common import shows_heatmap
from dicom_out import wording
from dicom_out.common import HOT_REGION_SHARE, ascii_text
from dicom_out.sr import OHIF_TOOL_PREFIX, build_structured_report
from pipeline.result import (
    NODE_MANUFACTURER,
    Decision,
    Refusal,
    RefusalCode,
    StudyResult,
)

DICOM_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
SETTINGS = OutputSettings()


# ----------------------------------------------------------------------------- helpers


def read(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(DICOM_DATA / name)


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


# ----------------------------------------------------------------------------- common checks

ALLOWED_WARNINGS = (
    # This dicom3tools build does not list Device UID (0018,1002) in the Contributing
    # Equipment Sequence; STYLE 5 wants the model's Device UID recorded there.
    "DeviceUID(0018,1002)> - Attribute is not present in standard DICOM IOD",
    # Our private coding scheme, declared in the Coding Scheme Identification Sequence.
    "Unrecognized defined term = <99FRNODE>",
    # Paired body part, side unknown in the source: Laterality present and empty (Type 2C).
    "Laterality(0020,0060)> - is only permitted to be empty when actually unknown",
)


def assert_patient_study_copied(out: pydicom.Dataset, source: pydicom.Dataset) -> None:
    from dicom_out.common import PATIENT_STUDY_KEYWORDS

    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            assert out.get(keyword) == source.get(keyword), keyword
    assert out.get("SpecificCharacterSet") == source.get("SpecificCharacterSet")


def assert_node_equipment(ds: pydicom.Dataset) -> None:
    assert ds.Manufacturer == NODE_MANUFACTURER
    assert ds.ManufacturerModelName == SETTINGS.manufacturer_model_name
    assert "UNVERIFIED" in ds.SeriesDescription
    names = {item.get("ManufacturerModelName") for item in ds.ContributingEquipmentSequence}
    assert {CLASSIFIER.name, ROUTER.name} <= names
    uids = {item.get("DeviceUID") for item in ds.ContributingEquipmentSequence}
    assert {CLASSIFIER.device_uid, ROUTER.device_uid} <= uids


# ----------------------------------------------------------------------------- SC


def test_secondary_capture_attributes(study: Study, built: tuple) -> None:
    scs, _, _ = built
    for finding, sc in zip(study.findings, scs, strict=True):
        ds = roundtrip(sc)
        source = study.sources[finding.meta.sop_instance_uid]
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.BurnedInAnnotation == "YES"
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert max(ds.Rows, ds.Columns) <= SETTINGS.max_sc_side
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.SeriesNumber == SETTINGS.sc_series_number
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert "not for diagnostic use" in ds.DerivationDescription
        assert ds.BodyPartExamined == finding.body_part
        assert_patient_study_copied(ds, source)
        assert_node_equipment(ds)
    # one series for the heat maps of a study
    assert len({sc.SeriesInstanceUID for sc in scs}) == 1


def test_negative_secondary_capture_has_no_colour(study: Study, built: tuple) -> None:
    scs, _, _ = built
    for finding, sc in zip(study.findings, scs, strict=True):
        rgb = sc.pixel_array
        image = rgb[: int(rgb.shape[0] * 0.7)]  # above the caption band
        grey = np.array_equal(image[..., 0], image[..., 2])
        assert grey == (finding.decision is Decision.NEGATIVE), finding.decision


def test_secondary_capture_renders_with_dcmtk(written: Mapping[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sc0.png"
    proc = subprocess.run(
        ["dcmj2pnm", "+on", str(written["sc0"]), str(out)], capture_output=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    import cv2

    png = cv2.imread(str(out))
    sc = pydicom.dcmread(written["sc0"], stop_before_pixels=True)
    assert png.shape == (sc.Rows, sc.Columns, 3)


def test_secondary_capture_rejects_wrong_source(study: Study) -> None:
    other = study.sources[study.findings[1].meta.sop_instance_uid]
    with pytest.raises(ValueError, match="SOP Instance UID"):
        build_secondary_capture(study.findings[0], other, SETTINGS)


# ----------------------------------------------------------------------------- dciodvfy


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools missing")
def test_dciodvfy_reports_no_errors(written: Mapping[str, Path]) -> None:
    unexpected: dict[str, list[str]] = {}
    for name, path in written.items():
        errors, warnings = dciodvfy(path)
        assert not errors, f"{name}: {errors}"
        odd = [w for w in warnings if not any(a in w for a in ALLOWED_WARNINGS)]
        if odd:
            unexpected[name] = odd
    assert not unexpected, unexpected


# ----------------------------------------------------------------------------- SR


def test_structured_report_roundtrip(study: Study, built: tuple) -> None:
    from dicom_out.sr import SR_IMAGE_REGIONS

    assert SR_IMAGE_REGIONS  # shipped on
    _check_structured_report(study, built[1], built[0], regions=True)


def test_structured_report_without_image_regions(study: Study,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``SR_IMAGE_REGIONS`` off, no group carries an SCOORD and no tracking
    identifier an OHIF tool name."""
    import dicom_out.sr as sr_module

    monkeypatch.setattr(sr_module, "SR_IMAGE_REGIONS", False)
    sr = build_structured_report(study.result, study.sources, [], SETTINGS)
    _check_structured_report(study, sr, [], regions=False)


def test_structured_report_with_regions_validates(study: Study, built: tuple,
                                                  tmp_path: Path) -> None:
    """The SR with its regions passes dciodvfy and PixelMed's DicomSRValidator (every
    analysed image in TID 1501, each region a TID 320 SCOORD of its probability) and
    renders in dsr2html with the region's Comment."""
    from conftest import pixelmed_sr_errors

    sr = built[1]
    assert any(f.decision in (Decision.POSITIVE, Decision.DOUBTFUL) for f in study.findings)
    path = tmp_path / "sr-regions.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy(path)
    assert not errors, errors
    assert pixelmed_sr_errors(path) == []
    html = subprocess.run(["dsr2html", str(path)], capture_output=True, text=True, check=True)
    assert "Grad-CAM heat map reaches at least 50% of its maximum" in html.stdout
    assert "Polyline" in html.stdout or "Point" in html.stdout  # the SCOORD, in its annex


def _check_structured_report(study: Study, sr: pydicom.Dataset, scs: list[pydicom.Dataset],
                             regions: bool) -> None:
    ds = roundtrip(sr)
    doc = hd.sr.srread(io.BytesIO(to_bytes(sr)))
    assert isinstance(doc, hd.sr.Comprehensive3DSR)
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.SeriesNumber == SETTINGS.sr_series_number
    assert "PredecessorDocumentsSequence" not in ds
    first = study.sources[study.findings[0].meta.sop_instance_uid]
    assert_patient_study_copied(ds, first)
    assert_node_equipment(ds)

    report = doc.content
    assert isinstance(report, hd.sr.MeasurementReport)
    observer = report.get_observer_contexts()
    assert observer, "device observer context missing"

    from dicom_out.common import AI_DECISION, FRACTURE
    from dicom_out.sr import FRACTURE_PROBABILITY

    for finding in study.findings:
        uid = finding.meta.sop_instance_uid
        image_groups = report.get_image_measurement_groups(referenced_sop_instance_uid=uid)
        roi_groups = report.get_planar_roi_measurement_groups(referenced_sop_instance_uid=uid)
        roi_groups = report.get_planar_roi_measurement_groups(referenced_sop_instance_uid=uid)
        assert roi_groups == [] and len(image_groups) == 1, uid  # TID 1501 for every image
        group = image_groups[0]
        assert group.source_images[0].referenced_sop_instance_uid == uid
        (probability,) = group.get_measurements(name=FRACTURE_PROBABILITY)
        comments = [i.TextValue for i in group[0].ContentSequence
                    if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "121106"]
        assert comments[0].startswith(ascii_text(wording.image_decision_text(finding)))
        coordinates = probability.referenced_coordinates or []
        if regions and shows_heatmap(finding.decision):
            # positive / doubtful: the probability is INFERRED FROM the hot region (TID 320)
            (region,) = coordinates
            assert region.graphic_type in (hd.sr.GraphicTypeValues.POLYLINE, hd.sr.GraphicTypeValues.POINT)
            assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == uid
            assert probability.referenced_images in (None, [])  # TID 320: IMAGE xor SCOORD
            points = region.value
            rows, cols = finding.image.source_shape
            assert (points[:, 0] >= 0).all() and (points[:, 0] <= cols).all()
            assert (points[:, 1] >= 0).all() and (points[:, 1] <= rows).all()
            if region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE:
                assert len(points) >= 4 and tuple(points[0]) == tuple(points[-1])
            assert group.tracking_identifier.startswith(OHIF_TOOL_PREFIX[region.graphic_type] + " ")
            assert comments[0].endswith(
                wording.region_sentence(region.graphic_type.value, HOT_REGION_SHARE))
            # the SR viewport of OHIF opens on the first group: a group with a region
            first = report.get_image_measurement_groups()[0]
            assert first.get_measurements(name=FRACTURE_PROBABILITY)[0].referenced_coordinates
        else:
            assert coordinates == []
            assert not group.tracking_identifier.startswith("Cornerstone3DTools")
        assert group.finding_type == FRACTURE
        assert group.finding_sites[0].value == BODY_PART_CODES[finding.body_part]
        (probability,) = group.get_measurements(name=FRACTURE_PROBABILITY)
        assert probability.value == pytest.approx(finding.fracture_probability)
        assert probability.unit.value == "1"
        evaluations = {q.name: q.value for q in group.get_qualitative_evaluations()}
        expected = {
            Decision.POSITIVE: "52101004",  # Present
            Decision.DOUBTFUL: "82334004",  # Indeterminate
            Decision.NEGATIVE: "272519000",  # Absent
        }[finding.decision]
        assert evaluations[FRACTURE].value == expected
        assert evaluations[AI_DECISION].value == finding.decision.value
        assert group.tracking_uid
    # TID 4019 algorithm identification with the threshold as a parameter
    text = ds.to_json()
    assert "threshold=0.5" in text and CLASSIFIER.version in text

    # refused instance: "Not done" with the reason
    refusal = study.refusals[0]
    groups = report.get_image_measurement_groups()
    refused = [g for g in groups if "not analysed" in (g.tracking_identifier or "")]
    assert len(refused) == 1
    values = {q.name.value: q.value.value for q in refused[0].get_qualitative_evaluations()}
    assert values[FRACTURE.value] == "385660001"
    assert values["refusal"] == refusal.code.value
    assert refusal.text in text

    # study-level group
    study_groups = [g for g in groups if g.tracking_identifier == "Study"]
    assert len(study_groups) == 1
    study_eval = {q.name: q.value for q in study_groups[0].get_qualitative_evaluations()}
    assert study_eval[AI_DECISION].value == study.result.decision.value

    # evidence: every source and every secondary capture
    evidence = {
        item.ReferencedSOPInstanceUID
        for study_item in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert set(study.sources) | {sc.SOPInstanceUID for sc in scs} == evidence


def test_structured_report_predecessor(study: Study, built: tuple) -> None:
    scs, sr, _ = built
    # a later version of the report after one more image arrived
    late = study.findings[:2]
    earlier = study_result(late, [], study.result.study_instance_uid)
    sources = {f.meta.sop_instance_uid: study.sources[f.meta.sop_instance_uid] for f in late}
    first = build_structured_report(earlier, sources, scs[:2], SETTINGS)
    second = build_structured_report(study.result, study.sources, scs, SETTINGS, predecessor=first)
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    ds = roundtrip(second)
    (pre_study,) = ds.PredecessorDocumentsSequence
    refs = pre_study.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert refs[0].ReferencedSOPInstanceUID == first.SOPInstanceUID


def _without_times(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` read back from its bytes without the attributes set from the clock."""
    out = roundtrip(ds)

    def strip(d: pydicom.Dataset) -> None:
        for elem in list(d):
            if elem.keyword in {"ContentDate", "ContentTime", "InstanceCreationDate",
                                "InstanceCreationTime", "ContributionDateTime",
                                "DateOfSecondaryCapture", "TimeOfSecondaryCapture"}:
                del d[elem.tag]
            elif elem.VR == "SQ":
                for item in elem.value:
                    strip(item)

    strip(out)
    return out


def test_structured_report_same_without_copy(study: Study, built: tuple,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The SR's content tree is adopted by highdicom, neither copied nor parsed again (a
    CPU saving): the document is the one highdicom writes when it copies and parses the
    tree itself, and a copy of the document is independent of it."""
    import contextlib
    import copy

    import dicom_out.sr

    scs, _, _ = built
    parsed: list[str] = []
    parse = dicom_out.sr._HD_FROM_DATASET_DERIVED

    def counting(cls: type, dataset: pydicom.Dataset) -> pydicom.Dataset:
        parsed.append(dataset.ValueType)
        return parse(cls, dataset)

    monkeypatch.setattr(dicom_out.sr, "_HD_FROM_DATASET_DERIVED", counting)
    adopted = build_structured_report(study.result, study.sources, scs, SETTINGS)
    assert parsed == []  # every node was highdicom's already: nothing parsed again
    monkeypatch.setattr(dicom_out.sr, "_adopted", lambda content: contextlib.nullcontext())
    copied = build_structured_report(study.result, study.sources, scs, SETTINGS)
    assert len(parsed) > 20  # highdicom's own path parses the whole tree
    assert _without_times(adopted) == _without_times(copied)
    duplicate = copy.deepcopy(adopted)
    assert duplicate.ContentSequence[-1] is not adopted.ContentSequence[-1]
    duplicate.ContentSequence[-1].ContentSequence = []
    assert len(adopted.ContentSequence[-1].ContentSequence) > 0
    assert to_bytes(adopted) == to_bytes(roundtrip(adopted))


def test_fast_evidence_search_finds_what_highdicom_finds(study: Study, built: tuple,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The node's search for the SR's references (installed as highdicom's) returns
    the very items highdicom's own search returns, in its order, for every value type
    in the tree; the document built with highdicom's search is the same."""
    import highdicom as hd

    import dicom_out.sr

    scs, _, _ = built
    fast = build_structured_report(study.result, study.sources, scs, SETTINGS)
    assert hd.sr.utils.find_content_items is dicom_out.sr._find_content_items
    original = dicom_out.sr._HD_FIND_CONTENT_ITEMS
    value_types = {"IMAGE", "COMPOSITE", "SCOORD", "NUM", "CODE", "TEXT", "UIDREF",
                   "CONTAINER"}
    for value_type in value_types:
        for recursive in (True, False):
            ours = dicom_out.sr._find_content_items(fast, value_type=value_type,
                                                    recursive=recursive)
            theirs = original(fast, value_type=value_type, recursive=recursive)
            assert [id(i) for i in ours] == [id(i) for i in theirs], value_type
    assert len(dicom_out.sr._find_content_items(fast, value_type="IMAGE", recursive=True)) > 0
    monkeypatch.setattr(hd.sr.utils, "find_content_items", original)
    slow = build_structured_report(study.result, study.sources, scs, SETTINGS)
    assert _without_times(fast) == _without_times(slow)


def test_highdicom_reads_the_compact_module_table_with_the_same_content(
        study: Study, built: tuple) -> None:
    """highdicom's constructors read the compact table of module attributes (installed
    with dicom_out), which holds every entry of highdicom's JSON file, in order, and
    answers the three keys highdicom reads; a ~100 MB dict of it is never built."""
    import json
    import pkgutil

    import highdicom._standard_utils as standard_utils
    import highdicom.base
    import highdicom.image

    from dicom_out import standard

    for module in (standard_utils, highdicom.base, highdicom.image):
        assert module.get_module_attribute_map is standard.get_module_attribute_map
    build_secondary_capture(study.findings[0], study.sources[study.findings[0].meta.sop_instance_uid],
                            SETTINGS)  # a constructor that copies the patient and study modules
    compact = standard.get_module_attribute_map()
    raw = json.loads(pkgutil.get_data("highdicom", "_standard/module_attribute_map.json"))
    assert list(compact) == list(raw)
    for name, entries in raw.items():
        assert [(a["keyword"], a["type"], list(a["path"])) for a in compact[name]] == \
            [(e["keyword"], e["type"], e["path"]) for e in entries], name
    entry = compact["general-study"][0]
    assert isinstance(entry, standard.ModuleAttribute) and "path" in entry
    with pytest.raises(KeyError):
        entry["attributes"]
    assert standard_utils.is_attribute_in_iod("ContentDate", "1.2.840.10008.5.1.4.1.1.7")
    assert not standard_utils.is_attribute_in_iod("NoSuchKeyword", "1.2.840.10008.5.1.4.1.1.7")


def test_light_evidence_gives_the_documents_full_evidence_gives(study: Study, built: tuple,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """SR and KO evidence after the first holds only the UIDs (and Rows/Columns) that
    highdicom reads: the documents equal those built with a Patient/Study copy in
    every evidence dataset, and the KO still references the images as images."""
    import dicom_out.ko
    import dicom_out.sr
    from dicom_out.common import evidence_dataset, reference_dataset
    from dicom_out.ko import build_key_object_selection

    scs, _, _ = built
    light_sr = build_structured_report(study.result, study.sources, scs, SETTINGS)
    light_ko = build_key_object_selection(study.result, study.sources, scs, SETTINGS)
    source = next(iter(study.sources.values()))
    light = evidence_dataset(source)
    assert sorted(e.keyword for e in light) == ["Columns", "Rows", "SOPClassUID", "SOPInstanceUID",
                                                 "SeriesInstanceUID", "StudyInstanceUID"]
    assert "PatientName" not in light and "PixelData" not in light
    monkeypatch.setattr(dicom_out.sr, "evidence_dataset", reference_dataset)
    monkeypatch.setattr(dicom_out.ko, "evidence_dataset", reference_dataset)
    full_sr = build_structured_report(study.result, study.sources, scs, SETTINGS)
    full_ko = build_key_object_selection(study.result, study.sources, scs, SETTINGS)
    assert light_ko is not None and full_ko is not None
    assert _without_times(light_sr) == _without_times(full_sr)
    assert _without_times(light_ko) == _without_times(full_ko)
    items = light_ko.ContentSequence
    assert any(item.ValueType == "IMAGE" for item in items)


def test_cached_attribute_answer_is_highdicom_s() -> None:
    """The cached ``is_attribute_in_iod`` installed for highdicom's SOP class
    constructor gives highdicom's answer for the node's classes and attributes, passes
    exclusions through uncached, and raises as highdicom does for an unknown class."""
    import highdicom.base

    import dicom_out.common as common

    assert highdicom.base.is_attribute_in_iod is common.attribute_in_iod
    original = common._HD_IS_ATTRIBUTE_IN_IOD
    answers = set()
    for uid in (pydicom.uid.ComputedRadiographyImageStorage,
                pydicom.uid.SecondaryCaptureImageStorage,
                pydicom.uid.Comprehensive3DSRStorage,
                pydicom.uid.KeyObjectSelectionDocumentStorage,
                pydicom.uid.EncapsulatedPDFStorage):
        for attribute in ("ContentDate", "ContentTime", "PixelData", "ContentSequence",
                          "EncapsulatedDocument", "NumberOfFrames"):
            expected = original(attribute, uid)
            answers.add(expected)
            assert common.attribute_in_iod(attribute, uid) is expected, (attribute, uid)
            assert common.attribute_in_iod(attribute, str(uid)) is expected, (attribute, uid)
    assert answers == {True, False}  # the table holds both answers, so the check can fail
    assert common.attribute_in_iod("PixelData", pydicom.uid.SecondaryCaptureImageStorage,
                                    exclude_path_elements=["IconImageSequence"]) is original(
        "PixelData", pydicom.uid.SecondaryCaptureImageStorage,
        exclude_path_elements=["IconImageSequence"])
    with pytest.raises(KeyError):
        common.attribute_in_iod("ContentDate", "1.2.3.4.5.6.7")


def test_cached_pixel_data_answer_is_highdicom_s_and_the_secondary_capture_is_the_same(
        study: Study, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached answer installed for ``ContributingEquipment.for_image_acquisition``
    is highdicom's for image, non-image and unknown SOP classes, and an SC built with
    highdicom's own (uncached) function is the same object."""
    import highdicom.base_content

    import dicom_out.common as common

    assert highdicom.base_content.does_iod_have_pixel_data is common.iod_has_pixel_data
    original = common._HD_DOES_IOD_HAVE_PIXEL_DATA
    for uid in (pydicom.uid.ComputedRadiographyImageStorage,
                pydicom.uid.DigitalXRayImageStorageForPresentation,
                pydicom.uid.SecondaryCaptureImageStorage,
                pydicom.uid.Comprehensive3DSRStorage,
                pydicom.uid.KeyObjectSelectionDocumentStorage,
                pydicom.uid.EncapsulatedPDFStorage):
        assert common.iod_has_pixel_data(uid) is original(uid), uid
        assert common.iod_has_pixel_data(str(uid)) is original(uid), uid
    with pytest.raises(KeyError):
        common.iod_has_pixel_data("1.2.3.4.5.6.7")
    finding = study.result.findings[0]
    source = study.sources[finding.meta.sop_instance_uid]
    cached = build_secondary_capture(finding, source, SETTINGS)
    monkeypatch.setattr(highdicom.base_content, "does_iod_have_pixel_data", original)
    uncached = build_secondary_capture(finding, source, SETTINGS)
    assert _without_times(cached) == _without_times(uncached)


@pytest.mark.skipif(shutil.which("dsr2html") is None, reason="DCMTK missing")
def test_structured_report_renders_with_dsr2html(written: Mapping[str, Path]) -> None:
    proc = subprocess.run(
        ["dsr2html", str(written["sr"])], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    html = proc.stdout
    for text in ("Imaging Measurement Report", "Fracture of bone", "Present", "Wrist joint",
                 "Not done", "UNVERIFIED"):
        assert text in html, text


def test_structured_report_of_refusals_only(study: Study) -> None:
    result = StudyResult(
        study_instance_uid=study.result.study_instance_uid,
        findings=(),
        refusals=tuple(study.refusals),
    )
    sr = build_structured_report(result, study.sources, [], SETTINGS)
    doc = hd.sr.srread(io.BytesIO(to_bytes(sr)))
    assert doc.VerificationFlag == "UNVERIFIED"
    pdf = build_pdf_report(result, study.sources, SETTINGS)
    assert "SourceInstanceSequence" not in pdf
    roundtrip(pdf)


def test_sources_of_refused_instances_may_be_missing(study: Study) -> None:
    # the node may not have a dataset for a refused instance (unreadable file)
    sources = dict(study.sources)
    refused = study.refusals[0].meta.sop_instance_uid
    sources.pop(refused)
    sr = roundtrip(build_structured_report(study.result, sources, [], SETTINGS))
    evidence = {
        item.ReferencedSOPInstanceUID
        for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert refused in evidence
    build_pdf_report(study.result, sources, SETTINGS)
    # an analysed instance without its source is an error
    sources.pop(study.findings[0].meta.sop_instance_uid)
    with pytest.raises(ValueError, match="missing from sources"):
        build_structured_report(study.result, sources, [], SETTINGS)
    with pytest.raises(ValueError, match="missing from sources"):
        build_pdf_report(study.result, sources, SETTINGS)


def test_own_output_is_recognisable(built: tuple) -> None:
    """The pipeline refuses our own objects (Manufacturer, and words it looks for)."""
    scs, sr, pdf = built
    for ds in (*scs, sr, pdf):
        assert ds.Manufacturer == NODE_MANUFACTURER
    for sc in scs:
        assert "fracture-node" in sc.ImageComments.lower()
        assert "grad-cam" in sc.DerivationDescription.lower()


# ----------------------------------------------------------------------------- PDF


def test_pdf_report_attributes(study: Study, built: tuple) -> None:
    _, _, pdf = built
    ds = roundtrip(pdf)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1"
    assert ds.Modality == "DOC"
    assert ds.ConversionType == "WSD"
    assert ds.BurnedInAnnotation == "YES"
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert "not for diagnostic use" in ds.DocumentTitle
    concept = ds.ConceptNameCodeSequence[0]
    assert (concept.CodeValue, concept.CodingSchemeDesignator) == ("18748-4", "LN")
    data = bytes(ds.EncapsulatedDocument)[: ds.EncapsulatedDocumentLength]
    assert data.startswith(b"%PDF-") and b"%%EOF" in data[-32:]
    assert len(ds.EncapsulatedDocument) % 2 == 0
    refs = [item.ReferencedSOPInstanceUID for item in ds.SourceInstanceSequence]
    assert refs == [f.meta.sop_instance_uid for f in study.findings]
    first = study.sources[study.findings[0].meta.sop_instance_uid]
    assert_patient_study_copied(ds, first)
    assert_node_equipment(ds)


@pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="poppler-utils missing")
def test_pdf_renders_with_pdftoppm(built: tuple, tmp_path: Path) -> None:
    _, _, pdf = built
    path = tmp_path / "report.pdf"
    path.write_bytes(bytes(pdf.EncapsulatedDocument)[: pdf.EncapsulatedDocumentLength])
    proc = subprocess.run(
        ["pdftoppm", "-r", "40", "-png", str(path), str(tmp_path / "page")],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    pages = sorted(tmp_path.glob("page*.png"))
    assert 1 <= len(pages) <= 4
    text = subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, timeout=60
    ).stdout
    for phrase in ("FRACTURE SUSPECTED", "Recommendation", "Disclaimer", "fracture-classifier",
                   "not analysed:", "requires radiologist review"):
        assert phrase in text, phrase


def test_check_pdf_rejects_other_bytes() -> None:
    from dicom_out.pdf import check_pdf

    with pytest.raises(ValueError, match="PDF"):
        check_pdf(b"<html></html>")
    with pytest.raises(ValueError, match="EOF"):
        check_pdf(b"%PDF-1.4\n truncated")


# ----------------------------------------------------------------------------- character sets


@pytest.mark.parametrize(
    ("charset", "name", "visible"),
    [
        ("ISO_IR 192", "Παπαδόπουλος^Γιώργος", "Γιώργος Παπαδόπουλος"),
        ("ISO_IR 100", "Gómez^José Ñandú", "José Ñandú Gómez"),
    ],
)
def test_non_ascii_names_survive(charset: str, name: str, visible: str, tmp_path: Path) -> None:
    st = Study(charset=charset, name=name)
    st.findings = st.findings[:1]  # one image is enough here
    st.result = study_result(st.findings, st.refusals, st.result.study_instance_uid)
    scs, sr, pdf = st.build()
    for i, ds in enumerate((*scs, sr, pdf)):
        back = roundtrip(ds)
        assert back.SpecificCharacterSet == charset
        assert str(back.PatientName) == name
        if shutil.which("dciodvfy"):
            path = tmp_path / f"{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            errors, warnings = dciodvfy(path)
            assert not errors, errors
            assert all(any(a in w for a in ALLOWED_WARNINGS) for w in warnings), warnings
    path = tmp_path / "r.pdf"
    path.write_bytes(bytes(pdf.EncapsulatedDocument)[: pdf.EncapsulatedDocumentLength])
    text = subprocess.run(
        ["pdftotext", str(path), "-"], capture_output=True, text=True, timeout=60
    ).stdout
    assert visible in text


# ----------------------------------------------------------------------------- determinism


def test_same_input_gives_same_uids(study: Study, built: tuple) -> None:
    scs, sr, pdf = built
    scs2, sr2, pdf2 = study.build()
    uids = [(d.SOPInstanceUID, d.SeriesInstanceUID) for d in (*scs, sr, pdf)]
    uids2 = [(d.SOPInstanceUID, d.SeriesInstanceUID) for d in (*scs2, sr2, pdf2)]
    assert uids == uids2
    assert len({u for u, _ in uids}) == len(uids)
    # another classifier version gives other objects
    other = replace(study.findings[0], classifier=replace(CLASSIFIER, weights_sha256="c" * 64))
    source = study.sources[other.meta.sop_instance_uid]
    assert build_secondary_capture(other, source, SETTINGS).SOPInstanceUID != scs[0].SOPInstanceUID
    # and so does a new version of the same weights (another operating point: other answers)
    same_weights = replace(study.findings[0], classifier=replace(CLASSIFIER, version="1.2.1"))
    assert build_secondary_capture(same_weights, source, SETTINGS).SOPInstanceUID != scs[0].SOPInstanceUID
    assert build_secondary_capture(replace(study.findings[0]), source, SETTINGS).SOPInstanceUID == \
        scs[0].SOPInstanceUID


# ----------------------------------------------------------------------------- KO (going further)


def test_key_object_selection_of_flagged_images(
    study: Study, built: tuple, tmp_path: Path
) -> None:
    from dicom_out.ko import build_key_object_selection

    scs, _, _ = built
    ko = build_key_object_selection(study.result, study.sources, scs, SETTINGS)
    assert ko is not None
    path = tmp_path / "ko.dcm"
    ko.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.Modality == "KO" and back.SeriesNumber == SETTINGS.ko_series_number
    assert_patient_study_copied(back, study.sources[study.findings[0].meta.sop_instance_uid])
    referenced = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in back.ContentSequence
        if item.ValueType == "IMAGE"
    }
    flagged = {f.meta.sop_instance_uid for f in study.findings
               if f.decision in (Decision.POSITIVE, Decision.DOUBTFUL)}
    flagged_scs = {sc.SOPInstanceUID for sc in scs
                   if sc.SourceImageSequence[0].ReferencedSOPInstanceUID in flagged}
    assert len(flagged) == 2 and len(flagged_scs) == 2
    assert referenced == flagged | flagged_scs
    if shutil.which("dciodvfy"):
        errors, warnings = dciodvfy(path)
        assert not errors
        assert all(any(a in w for a in ALLOWED_WARNINGS) for w in warnings), warnings
    negative_only = replace(study.result, findings=(study.findings[2],))
    assert build_key_object_selection(negative_only, study.sources, scs, SETTINGS) is None
