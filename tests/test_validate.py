"""Header checks (``pipeline.validate``) on real files and on the objects a PACS may route
to the node by mistake: SRs, PDFs, our own outputs, other modalities, broken headers."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline.normalise import prepare
from pipeline.result import (
    NODE_MANUFACTURER,
    NODE_MODEL_NAME,
    ImageMetadata,
    NormalisedImage,
    Refusal,
    RefusalCode,
)
from pipeline.validate import check_header, read_metadata

DICOM_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
RG3 = DICOM_DATA / "pydicom-data" / "RG3_UNCR.dcm"
SMALL_CR = DICOM_DATA / "fo-dicom" / "CR-MONO1-10-chest.dcm"

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _small_cr() -> Dataset:
    return pydicom.dcmread(SMALL_CR, force=True)


def _non_image(sop_class_uid: str, modality: str) -> Dataset:
    """A minimal SR or Encapsulated PDF as another system (or we) would send it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    if sop_class_uid == ENCAPSULATED_PDF:
        ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    else:
        ds.ValueType = "CONTAINER"
    return ds


@pytest.mark.parametrize(
    ("sop_class_uid", "modality"),
    [(COMPREHENSIVE_SR, "SR"), (ENHANCED_SR, "SR"), (ENCAPSULATED_PDF, "DOC")],
)
def test_sr_and_pdf_are_not_images(sop_class_uid: str, modality: str) -> None:
    refusal = check_header(_non_image(sop_class_uid, modality))
    assert isinstance(refusal, Refusal)
    assert refusal.code is RefusalCode.NOT_AN_IMAGE
    assert sop_class_uid in refusal.text
    # prepare() gives the same answer without touching pixels
    assert isinstance(prepare(_non_image(sop_class_uid, modality)), Refusal)


@pytest.mark.parametrize(
    ("sop_class_uid", "modality"), [(COMPREHENSIVE_SR, "SR"), (ENCAPSULATED_PDF, "DOC")]
)
def test_our_own_sr_and_pdf_are_own_output(sop_class_uid: str, modality: str) -> None:
    ds = _non_image(sop_class_uid, modality)
    ds.Manufacturer = NODE_MANUFACTURER
    refusal = check_header(ds)
    assert isinstance(refusal, Refusal) and refusal.code is RefusalCode.OWN_OUTPUT


def test_own_output_by_manufacturer_even_on_a_real_radiograph() -> None:
    ds = _small_cr()
    ds.Manufacturer = NODE_MANUFACTURER
    refusal = prepare(ds)
    assert isinstance(refusal, Refusal) and refusal.code is RefusalCode.OWN_OUTPUT


def test_own_output_by_model_name() -> None:
    ds = _small_cr()
    ds.ManufacturerModelName = NODE_MODEL_NAME
    refusal = check_header(ds)
    assert isinstance(refusal, Refusal) and refusal.code is RefusalCode.OWN_OUTPUT


@pytest.mark.parametrize(
    ("keyword", "text"),
    [
        ("SeriesDescription", "fracture-node Grad-CAM (not for diagnostic use)"),
        ("DerivationDescription", "Grad-CAM heat map over the source radiograph"),
    ],
)
def test_own_secondary_capture_by_description(keyword: str, text: str) -> None:
    """A PACS may rewrite Manufacturer; our SC's descriptions still mark it."""
    ds = _small_cr()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.Modality = "OT"
    ds.Manufacturer = "Some PACS"
    setattr(ds, keyword, text)
    refusal = check_header(ds)
    assert isinstance(refusal, Refusal) and refusal.code is RefusalCode.OWN_OUTPUT
    assert keyword in refusal.text


def test_description_marker_only_counts_on_secondary_capture() -> None:
    """A CR whose series description happens to mention Grad-CAM is still a CR."""
    ds = _small_cr()
    ds.SeriesDescription = "grad-cam study arm"
    assert check_header(ds) is None


@pytest.mark.parametrize("modality", ["CT", "MR", "NM", "US", "PT"])
def test_cross_sectional_modalities_are_refused(modality: str) -> None:
    ds = _small_cr()
    ds.Modality = modality
    refusal = check_header(ds)
    assert isinstance(refusal, Refusal) and refusal.code is RefusalCode.UNSUPPORTED_MODALITY
    assert modality in refusal.text


@pytest.mark.parametrize("modality", ["CR", "DX", "RG", "RF", "XA", "MG", "OT"])
def test_projection_modalities_are_accepted(modality: str) -> None:
    ds = _small_cr()
    ds.Modality = modality
    assert check_header(ds) is None


def test_ct_sop_class_without_modality_is_refused() -> None:
    ds = _small_cr()
    del ds.Modality
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    refusal = check_header(ds)
    assert isinstance(refusal, Refusal) and refusal.code is RefusalCode.UNSUPPORTED_MODALITY


def test_no_pixel_data_is_not_an_image() -> None:
    ds = _small_cr()
    del ds.PixelData
    refusal = check_header(ds)
    assert isinstance(refusal, Refusal) and refusal.code is RefusalCode.NOT_AN_IMAGE


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"Rows": 60000, "Columns": 60000}, RefusalCode.ABSURD_SIZE),
        ({"Rows": 32, "Columns": 32}, RefusalCode.ABSURD_SIZE),
        ({"BitsStored": 0}, RefusalCode.BAD_PIXEL_ATTRIBUTES),
        ({"BitsStored": 17}, RefusalCode.BAD_PIXEL_ATTRIBUTES),
        ({"BitsAllocated": 12}, RefusalCode.BAD_PIXEL_ATTRIBUTES),
        ({"HighBit": 15, "BitsStored": 10}, RefusalCode.BAD_PIXEL_ATTRIBUTES),
        ({"SamplesPerPixel": 3}, RefusalCode.BAD_PIXEL_ATTRIBUTES),
        ({"PhotometricInterpretation": "PALETTE COLOR"}, RefusalCode.UNSUPPORTED_PHOTOMETRIC),
        ({"PhotometricInterpretation": "YBR_PARTIAL_420"}, RefusalCode.UNSUPPORTED_PHOTOMETRIC),
        ({"Rows": 441}, RefusalCode.BAD_PIXEL_ATTRIBUTES),  # one row more than the data hold
        ({"Rows": 400}, RefusalCode.BAD_PIXEL_ATTRIBUTES),  # 40 rows of data unexplained
    ],
)
def test_inconsistent_pixel_attributes(changes: dict[str, object], code: RefusalCode) -> None:
    ds = _small_cr()  # 440 x 440, 16 bits allocated, 10 stored, native
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    refusal = prepare(ds)
    assert isinstance(refusal, Refusal), refusal
    assert refusal.code is code, refusal.text


def test_missing_rows_is_bad_pixel_attributes() -> None:
    ds = _small_cr()
    del ds.Rows
    refusal = check_header(ds)
    assert isinstance(refusal, Refusal) and refusal.code is RefusalCode.BAD_PIXEL_ATTRIBUTES
    assert "Rows" in refusal.text


def test_read_metadata_routing_fields() -> None:
    ds = pydicom.dcmread(RG3, stop_before_pixels=True)
    ds.ViewPosition = "AP"
    ds.ImageLaterality = "L"
    meta = read_metadata(ds)
    assert isinstance(meta, ImageMetadata)
    assert meta.modality == "CR"
    assert meta.body_part_examined == "EXTREMITY"
    assert meta.view_position == "AP"
    assert meta.laterality == "L"
    assert (meta.rows, meta.columns) == (1760, 1760)
    assert meta.photometric_interpretation == "MONOCHROME1"
    assert meta.transfer_syntax_uid == ExplicitVRLittleEndian
    assert meta.sop_instance_uid == ds.SOPInstanceUID
    # never patient identity
    assert not any("patient_name" in f or "patient_id" in f for f in meta.__dataclass_fields__)


def test_read_metadata_never_raises_on_an_empty_dataset() -> None:
    meta = read_metadata(Dataset())
    assert meta.sop_instance_uid == "" and meta.rows == 0
    refusal = check_header(Dataset())
    assert isinstance(refusal, Refusal) and refusal.code is RefusalCode.NOT_AN_IMAGE


def test_a_real_radiograph_passes() -> None:
    ds = _small_cr()
    assert check_header(ds) is None
    assert isinstance(prepare(ds), NormalisedImage)


def test_corrupt_element_under_a_routing_keyword_does_not_escape() -> None:
    """Found by bench/fuzz_decode.py: Study Description read as a sequence whose item
    holds an element of unknown VR; printing it raised out of read_metadata()."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    item = Dataset()
    item[0x00100010] = RawDataElement(Tag(0x00100010), "U.", 4, b"abcd", 0, False, True)
    ds = _small_cr()
    ds.add_new(0x00081030, "SQ", [item])  # (0008,1030) Study Description
    meta = read_metadata(ds)
    assert meta.study_description == ""
    assert isinstance(prepare(ds), (Refusal, NormalisedImage))
