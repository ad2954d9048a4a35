"""Decide, from the header alone, whether an instance is a radiograph we may analyse.

Cheap checks that run before any pixel is decoded (the pixel-based checks, colour and
document, live in :mod:`pipeline.normalise` because they need the decoded image):

1. the node's own output (Manufacturer / Manufacturer's Model Name, or a Secondary
   Capture whose descriptions carry our marker) -> ``OWN_OUTPUT``, so an auto-routing
   rule in the PACS can never make a loop;
2. not an image: SOP classes without pixels (Structured Reports PS3.3 A.35, Encapsulated
   PDF/CDA PS3.3 A.45, presentation states, key object selection ...) or no Pixel Data
   -> ``NOT_AN_IMAGE``;
3. a modality that is not a projection radiograph (CT, MR, NM, US, PT ...) ->
   ``UNSUPPORTED_MODALITY``;
4. the Image Pixel Module (PS3.3 C.7.6.3) is incomplete or inconsistent ->
   ``BAD_PIXEL_ATTRIBUTES`` / ``UNSUPPORTED_PHOTOMETRIC``; a matrix too small or too
   large to be a radiograph -> ``ABSURD_SIZE``.

Nothing here raises for bad data: a bad input becomes a :class:`Refusal`.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipeline.result import (
    NODE_MANUFACTURER,
    NODE_MODEL_NAME,
    ImageMetadata,
    Refusal,
    RefusalCode,
)

logger = logging.getLogger(__name__)

ACCEPTED_MODALITIES = frozenset({"CR", "DX", "RG", "RF", "XA", "MG", "OT", "SC", "PX", "IO"})
"""Projection radiography (PS3.3 C.7.3.1.1.1 defined terms) and the generic modalities
of Secondary Capture.  The body part is decided later, by the router."""

REFUSED_MODALITIES = frozenset(
    {
        "CT",
        "MR",
        "NM",
        "US",
        "PT",
        "ES",
        "XC",
        "OP",
        "OPT",
        "OCT",
        "SM",
        "GM",
        "IVUS",
        "ECG",
        "EPS",
        "HD",
        "RTIMAGE",
        "RTDOSE",
        "RTSTRUCT",
        "RTPLAN",
        "SEG",
        "SR",
        "DOC",
        "KO",
        "PR",
        "REG",
        "FID",
        "BI",
        "TG",
        "OPM",
        "OPV",
        "IVOCT",
        "LS",
        "AU",
        "BDUS",
    }
)
"""Modalities that are not plain radiographs; refused whatever the SOP class."""

_NON_IMAGE_SOP_PREFIXES: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.5.1.4.1.1.88.", "Structured Report"),
    ("1.2.840.10008.5.1.4.1.1.104.", "Encapsulated Document (PDF/CDA/STL)"),
    ("1.2.840.10008.5.1.4.1.1.11.", "Presentation State"),
    ("1.2.840.10008.5.1.4.1.1.9.", "Waveform"),
    ("1.2.840.10008.5.1.4.1.1.66", "Raw Data / Spatial Registration / Segmentation"),
    ("1.2.840.10008.5.1.4.1.1.481.", "Radiotherapy object"),
)
"""Storage SOP classes (PS3.4 B.5) that carry no image to analyse."""

_NON_PROJECTION_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",
    "1.2.840.10008.5.1.4.1.1.2.1": "CT",
    "1.2.840.10008.5.1.4.1.1.4": "MR",
    "1.2.840.10008.5.1.4.1.1.4.1": "MR",
    "1.2.840.10008.5.1.4.1.1.6.1": "US",
    "1.2.840.10008.5.1.4.1.1.3.1": "US",
    "1.2.840.10008.5.1.4.1.1.20": "NM",
    "1.2.840.10008.5.1.4.1.1.128": "PT",
    "1.2.840.10008.5.1.4.1.1.130": "PT",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "XC",
}
"""Image SOP classes of cross-sectional and other non-radiograph modalities."""

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
"""Secondary Capture Image Storage and its multi-frame variants (PS3.4 B.5)."""

OWN_OUTPUT_MARKERS = ("fracture-node", "grad-cam", "gradcam")
"""Lower-case words that the node's Secondary Captures carry in Series Description,
Derivation Description or Image Comments (``dicom_out``): a Secondary Capture with one
of them is our output even when a PACS has rewritten Manufacturer."""

MIN_SIDE = 64
"""Smallest Rows/Columns accepted: below this there is nothing for the models to see."""

MAX_SIDE = 16384
"""Largest Rows/Columns accepted.  Flat-panel detectors are at most ~4300 pixels, mammography
~5000 and stitched long-leg/spine images ~8000; 16384 leaves room, 60000 is absurd."""

MAX_PIXELS = 100_000_000
"""Largest Rows x Columns accepted (a 10000 x 10000 image is already 200 MB at 16 bits)."""

MAX_EXCESS_BYTES = 64
"""Trailing bytes after the last native frame that are still read as padding."""

MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
"""Colour photometric interpretations (PS3.3 C.7.6.3.1.2) that we decode to RGB, only to
look at their saturation (a grey RGB image is converted, a colour one refused)."""


def _text(ds: Dataset, keyword: str) -> str:
    """A string attribute, or ``""`` when absent, empty or unreadable."""
    try:
        value = ds.get(keyword, "")
        if value is None or isinstance(value, (Dataset, Sequence, bytes)):
            return ""  # a corrupt element read with another VR than the keyword's
        if not isinstance(value, str) and hasattr(value, "__iter__"):
            value = "\\".join(str(v) for v in value)
        return str(value).strip()
    except Exception:  # an unparsable element read leniently
        return ""


def _int(ds: Dataset, keyword: str) -> int | None:
    """An integer attribute, or ``None`` when absent or not an integer."""
    try:
        value: Any = ds.get(keyword, None)
        if value is None or value == "":
            return None
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        return int(value)
    except Exception:
        return None


def read_metadata(ds: Dataset) -> ImageMetadata:
    """Read the identifying and routing attributes of ``ds`` (never raises).

    Laterality is Image Laterality (0020,0062) when present, else the series'
    Laterality (0020,0060) (PS3.3 C.7.6.2 / C.7.3.1).  Patient name and ID are not read.
    """
    file_meta = getattr(ds, "file_meta", None)
    tsyntax = ""
    if file_meta is not None:
        tsyntax = _text(file_meta, "TransferSyntaxUID")
    sop_class_uid = _text(ds, "SOPClassUID")
    if not sop_class_uid and file_meta is not None:
        sop_class_uid = _text(file_meta, "MediaStorageSOPClassUID")
    return ImageMetadata(
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=sop_class_uid,
        modality=_text(ds, "Modality").upper(),
        body_part_examined=_text(ds, "BodyPartExamined").upper(),
        study_description=_text(ds, "StudyDescription"),
        series_description=_text(ds, "SeriesDescription"),
        view_position=_text(ds, "ViewPosition").upper(),
        laterality=(_text(ds, "ImageLaterality") or _text(ds, "Laterality")).upper(),
        patient_age=_text(ds, "PatientAge"),
        rows=_int(ds, "Rows") or 0,
        columns=_int(ds, "Columns") or 0,
        number_of_frames=_int(ds, "NumberOfFrames") or 1,
        photometric_interpretation=_text(ds, "PhotometricInterpretation").upper(),
        transfer_syntax_uid=tsyntax,
        protocol_name=_text(ds, "ProtocolName"),
        anatomic_region=_anatomic_region(ds),
    )


def _anatomic_region(ds: Dataset) -> str:
    """Code Meaning (else Code Value) of the first Anatomic Region Sequence item, or ``""``."""
    try:
        seq = ds.get("AnatomicRegionSequence", None)
        if not seq:
            return ""
        item = seq[0]
        return _text(item, "CodeMeaning") or _text(item, "CodeValue")
    except Exception:  # a malformed sequence read leniently
        return ""


def own_output_reason(ds: Dataset) -> str | None:
    """Why ``ds`` looks like an object fracture-node wrote, or ``None``."""
    if _text(ds, "Manufacturer") == NODE_MANUFACTURER:
        return f"Manufacturer is {NODE_MANUFACTURER!r}"
    if _text(ds, "ManufacturerModelName") == NODE_MODEL_NAME:
        return f"Manufacturer's Model Name is {NODE_MODEL_NAME!r}"
    if _text(ds, "SOPClassUID").startswith(SECONDARY_CAPTURE_PREFIX):
        for keyword in ("SeriesDescription", "DerivationDescription", "ImageComments"):
            text = _text(ds, keyword).lower()
            if any(marker in text for marker in OWN_OUTPUT_MARKERS):
                return f"Secondary Capture whose {keyword} marks it as fracture-node output"
    return None


def pixel_attribute_problem(ds: Dataset) -> tuple[RefusalCode, str] | None:
    """Check the Image Pixel Module (PS3.3 C.7.6.3) before decoding.

    Returns
    -------
    (code, text) or None
        ``BAD_PIXEL_ATTRIBUTES``, ``UNSUPPORTED_PHOTOMETRIC`` or ``ABSURD_SIZE`` with the
        broken rule, or ``None`` when the attributes are usable.
    """
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            return RefusalCode.BAD_PIXEL_ATTRIBUTES, "float Pixel Data is not a radiograph"
        return RefusalCode.BAD_PIXEL_ATTRIBUTES, "no Pixel Data (7FE0,0010)"
    values: dict[str, int] = {}
    for keyword in (
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "PixelRepresentation",
        "SamplesPerPixel",
    ):
        value = _int(ds, keyword)
        if value is None:
            return RefusalCode.BAD_PIXEL_ATTRIBUTES, f"{keyword} is missing or not an integer"
        values[keyword] = value
    rows, columns = values["Rows"], values["Columns"]
    bits_allocated, bits_stored = values["BitsAllocated"], values["BitsStored"]
    samples = values["SamplesPerPixel"]
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if rows < 1 or columns < 1:
        return RefusalCode.BAD_PIXEL_ATTRIBUTES, f"Rows/Columns {rows}x{columns} are not positive"
    if bits_allocated not in (8, 16):
        return RefusalCode.BAD_PIXEL_ATTRIBUTES, (
            f"Bits Allocated {bits_allocated}: radiographs use 8 or 16 (PS3.3 C.8.11.7)"
        )
    if not 1 <= bits_stored <= bits_allocated:
        return RefusalCode.BAD_PIXEL_ATTRIBUTES, (
            f"Bits Stored {bits_stored} not in 1..Bits Allocated ({bits_allocated})"
        )
    high_bit = _int(ds, "HighBit")
    if high_bit is not None and high_bit != bits_stored - 1:
        # Other High Bit positions were retired (PS3.5 8.1.1); the data would sit in other
        # bits than the ones we read.
        return RefusalCode.BAD_PIXEL_ATTRIBUTES, (
            f"High Bit {high_bit} is not Bits Stored - 1 ({bits_stored - 1}), PS3.5 8.1.1"
        )
    if values["PixelRepresentation"] not in (0, 1):
        return RefusalCode.BAD_PIXEL_ATTRIBUTES, "Pixel Representation must be 0 or 1"
    if not photometric:
        return RefusalCode.BAD_PIXEL_ATTRIBUTES, "Photometric Interpretation is missing"
    if photometric in MONOCHROME:
        if samples != 1:
            return RefusalCode.BAD_PIXEL_ATTRIBUTES, (
                f"{photometric} needs Samples per Pixel 1, not {samples}"
            )
    elif photometric in COLOUR:
        if samples != 3:
            return RefusalCode.BAD_PIXEL_ATTRIBUTES, (
                f"{photometric} needs Samples per Pixel 3, not {samples}"
            )
        if bits_allocated != 8:
            return RefusalCode.UNSUPPORTED_PHOTOMETRIC, f"{bits_allocated}-bit colour"
    else:
        return RefusalCode.UNSUPPORTED_PHOTOMETRIC, (
            f"Photometric Interpretation {photometric} is not converted (PS3.3 C.7.6.3.1.2)"
        )
    frames = _int(ds, "NumberOfFrames")
    if "NumberOfFrames" in ds and (frames is None or frames < 1):
        return RefusalCode.BAD_PIXEL_ATTRIBUTES, "Number of Frames is not a positive integer"
    if min(rows, columns) < MIN_SIDE:
        return RefusalCode.ABSURD_SIZE, f"{columns}x{rows} is smaller than {MIN_SIDE} pixels"
    if max(rows, columns) > MAX_SIDE or rows * columns > MAX_PIXELS:
        return RefusalCode.ABSURD_SIZE, (
            f"{columns}x{rows} exceeds {MAX_SIDE} pixels a side or {MAX_PIXELS} pixels"
        )
    # Native Pixel Data holds exactly Rows x Columns x Samples x Frames samples, padded to
    # even length (PS3.5 8.1.1, 8.2).  A few trailing bytes are tolerated (a real-world
    # defect pydicom also reads); MAX_EXCESS_BYTES or more means the declared matrix does
    # not describe the data: with sides of at least MIN_SIDE, a wrong Rows or Columns
    # always leaves a whole row or column (>= 64 samples) unexplained or missing.
    try:
        element = ds["PixelData"]
        is_undefined = bool(element.is_undefined_length)
        length = len(element.value) if element.value is not None else 0
    except Exception as exc:
        return RefusalCode.BAD_PIXEL_ATTRIBUTES, f"Pixel Data unreadable: {exc}"
    if not is_undefined:
        row_bytes = columns * samples * bits_allocated // 8
        needed = rows * row_bytes * (frames or 1)
        if length < needed or length - needed >= MAX_EXCESS_BYTES:
            return RefusalCode.BAD_PIXEL_ATTRIBUTES, (
                f"native Pixel Data holds {length} bytes, {frames or 1} frame(s) of"
                f" {columns}x{rows}x{samples} {bits_allocated}-bit samples need {needed}"
            )
    elif length < 16:
        return RefusalCode.BAD_PIXEL_ATTRIBUTES, "encapsulated Pixel Data holds no frame"
    return None


def check_header(ds: Dataset) -> Refusal | None:
    """Cheap checks before decoding; a :class:`Refusal` or ``None`` (go on).

    The order matters: our own output is recognised first (so that its reason is
    ``OWN_OUTPUT`` even for our SR and PDF), then non-image SOP classes, the modality,
    and last the Image Pixel Module.  Never raises.
    """
    meta = read_metadata(ds)
    try:
        reason = own_output_reason(ds)
        if reason:
            return Refusal(meta, RefusalCode.OWN_OUTPUT, reason)
        sop_class_uid = meta.sop_class_uid
        for prefix, name in _NON_IMAGE_SOP_PREFIXES:
            if sop_class_uid.startswith(prefix):
                return Refusal(
                    meta, RefusalCode.NOT_AN_IMAGE, f"SOP Class {sop_class_uid} is a {name}"
                )
        if "PixelData" not in ds:
            return Refusal(meta, RefusalCode.NOT_AN_IMAGE, "no Pixel Data (7FE0,0010)")
        modality = meta.modality
        if modality in REFUSED_MODALITIES:
            return Refusal(
                meta, RefusalCode.UNSUPPORTED_MODALITY, f"Modality {modality} is not a radiograph"
            )
        sop_modality = _NON_PROJECTION_SOP_CLASSES.get(sop_class_uid)
        if sop_modality is not None:
            return Refusal(
                meta,
                RefusalCode.UNSUPPORTED_MODALITY,
                f"SOP Class {sop_class_uid} is a {sop_modality} image",
            )
        if modality and modality not in ACCEPTED_MODALITIES:
            return Refusal(
                meta, RefusalCode.UNSUPPORTED_MODALITY, f"Modality {modality} is not accepted"
            )
        problem = pixel_attribute_problem(ds)
        if problem is not None:
            return Refusal(meta, problem[0], problem[1])
    except Exception as exc:  # a malformed data set read leniently
        logger.warning("header check failed on %s: %s", meta.sop_instance_uid, exc)
        return Refusal(meta, RefusalCode.BAD_PIXEL_ATTRIBUTES, f"unreadable header: {exc}")
    return None
