"""Grad-CAM heat map Secondary Capture, one per analysed radiograph.

The object is a Secondary Capture Image (PS3.3 A.8.1, SOP Class
1.2.840.10008.5.1.4.1.1.7) built with highdicom's ``SCImage.from_ref_dataset``:
RGB, the radiograph at a readable resolution with the heat map blended in colour
(grey where the decision is negative or undecided), a colour legend and a burned-in
caption under the image.  It joins the source's patient and study in a series of its
own, is DERIVED\\SECONDARY with Burned In Annotation YES (C.7.6.1.1.4), points at
its source with Source Image Sequence and Derivation Description (C.7.6.1), and
lists the node and its models as Contributing Equipment (C.12.1).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.sr.coding import Code

from dicom_out import wording
from dicom_out.common import (
    DECISION_COLOUR,
    NOT_FOR_DIAGNOSTIC_USE,
    PAIRED_BODY_PARTS,
    OutputSettings,
    ascii_text,
    colour_bar,
    contributing_equipment,
    copy_patient_study,
    finding_models,
    font_path,
    model_hashes,
    output_uid,
    render_heatmap,
    series_description,
    shows_heatmap,
    study_series_uid,
)
from pipeline.result import ImageFinding

logger = logging.getLogger(__name__)

SOURCE_IMAGE_PURPOSE = Code("121322", "DCM", "Source image for image processing operation")
"""Purpose of Reference of the Source Image Sequence item (PS3.16 CID 7202)."""

MIN_SC_SIDE = 768
"""Small images are enlarged to this longer side so the caption stays legible."""

MIN_CAPTION_WIDTH = 480
"""A rendering narrower than this (a stitched long-leg image, 64 x 16384 at the
extreme the validator accepts) is centred on a black canvas this wide, so the caption
has room for every word at a legible size."""


def _widen(image: np.ndarray, width: int) -> np.ndarray:
    """``image`` centred on a black canvas at least ``width`` pixels wide."""
    rows, cols = image.shape[:2]
    if cols >= width:
        return image
    out = np.zeros((rows, width, 3), dtype=np.uint8)
    left = (width - cols) // 2
    out[:, left : left + cols] = image
    return out


def sc_series_uid(study_instance_uid: str, finding: ImageFinding) -> str:
    """Series Instance UID shared by the heat maps of one study and model version."""
    return study_series_uid(study_instance_uid, finding_models(finding), "sc")


def sc_instance_uid(finding: ImageFinding) -> str:
    """SOP Instance UID of the heat map of ``finding`` (source UID + model hashes)."""
    return output_uid(finding.meta.sop_instance_uid, *model_hashes(finding_models(finding)), "sc")


@functools.lru_cache(maxsize=64)
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = font_path(bold)
    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(path), size=size)


def caption_lines(finding: ImageFinding) -> list[tuple[str, bool, tuple[int, int, int]]]:
    """Text of the burned-in caption: (line, bold, RGB colour), top to bottom
    (the sentences are :func:`dicom_out.wording.caption_lines`)."""
    white = (235, 235, 235)
    lines = wording.caption_lines(finding)
    colours = [_caption_colour(finding)] + [white] * (len(lines) - 2) + [(255, 255, 255)]
    return [(text, bold, colour) for (text, bold), colour in zip(lines, colours)]


def _caption_colour(finding: ImageFinding) -> tuple[int, int, int]:
    r, g, b = DECISION_COLOUR[finding.decision]
    # brighter variant of the banner colour, readable on black
    return (min(255, r + 55), min(255, g + 55), min(255, b + 55))


Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@functools.lru_cache(maxsize=1)
def _measure() -> ImageDraw.ImageDraw:
    """A drawing context kept only to measure text (``textlength`` draws nothing)."""
    return ImageDraw.Draw(Image.new("RGB", (1, 1)))


@functools.lru_cache(maxsize=4096)
def text_width(text: str, font: Font) -> float:
    """Width in pixels of ``text`` set in ``font`` (the font's own advance metrics).

    Cached: the caption wrapper measures the same words and lines many times per
    image, and the fixed sentences again for every study."""
    return float(_measure().textlength(text, font=font))


def wrap_text(text: str, font: Font, width: float) -> list[str] | None:
    """``text`` broken at spaces into lines no wider than ``width`` pixels, or ``None``
    when a single word is wider than ``width`` (the caller then takes a smaller font).
    Nothing is dropped: the lines joined by spaces are ``text`` again."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if text_width(candidate, font) <= width:
            current = candidate
            continue
        if not current or text_width(word, font) > width:
            return None
        lines.append(current)
        current = word
    lines.append(current)
    return lines


@dataclass(frozen=True)
class CaptionLayout:
    """Where the caption goes under a rendering ``columns`` pixels wide.

    ``lines`` are the wrapped caption lines (text, bold, colour); each fits
    ``text_width``.  The legend sits beside the text when ``legend_beside``, else on
    its own row below it.
    """

    font_size: int
    line_height: int
    pad: int
    text_width: float
    legend_width: int
    legend_beside: bool
    lines: tuple[tuple[str, bool, tuple[int, int, int]], ...]

    @property
    def legend_height(self) -> int:
        return self.font_size * 3 + self.line_height

    @property
    def height(self) -> int:
        """Height of the caption band in pixels."""
        text = self.line_height * len(self.lines)
        if self.legend_beside:
            return self.pad * 2 + max(text, self.legend_height)
        return self.pad * 3 + text + self.legend_height


def caption_layout(finding: ImageFinding, columns: int, rows: int) -> CaptionLayout:
    """Lay the caption out for a rendering of ``rows`` x ``columns`` pixels.

    The font scales with the image; every line is wrapped at spaces to the width
    available, and the font shrinks (to 8 px at the least) only when a single word
    would not fit.  No text is cut off.
    """
    lines = caption_lines(finding)
    size = max(14, int(round(min(columns, 1.25 * rows) / 52)))
    while True:
        pad = max(4, size)
        legend_width = max(120, min(columns // 4, size * 12))
        beside = columns - legend_width - 3 * pad >= size * 22
        width = float(columns - legend_width - 3 * pad) if beside else float(columns - 2 * pad)
        wrapped: list[tuple[str, bool, tuple[int, int, int]]] = []
        fits = True
        for text, is_bold, colour in lines:
            parts = wrap_text(text, _font(size, bold=is_bold), width)
            if parts is None:
                fits = False
                break
            wrapped.extend((part, is_bold, colour) for part in parts)
        if fits or size <= 8:
            if not fits:
                raise ValueError(f"caption does not fit an image {columns} pixels wide")
            return CaptionLayout(size, int(round(size * 1.45)), pad, width,
                                 min(legend_width, columns - 2 * pad), beside, tuple(wrapped))
        size -= 1


def compose_secondary_capture(finding: ImageFinding, max_side: int) -> np.ndarray:
    """The pixels of the Secondary Capture: image with heat map, legend and caption.

    Returns an RGB uint8 array, (rows, columns, 3): the rendering of
    :func:`dicom_out.common.render_heatmap` on top, a black caption band below it
    (:func:`caption_layout`: every line whole).
    """
    target = max(256, int(max_side / 1.25))
    for _ in range(4):  # the band depends on the width: shrink until the whole fits
        image = render_heatmap(finding, target, min_side=min(MIN_SC_SIDE, target))
        image = _widen(image, MIN_CAPTION_WIDTH)
        rows, cols = image.shape[:2]
        layout = caption_layout(finding, cols, rows)
        excess = max(rows + layout.height, cols) - max_side
        if excess <= 0 or target <= 256:
            break
        target = max(256, target - excess - 8)
    pad, size = layout.pad, layout.font_size
    canvas = np.zeros((rows + layout.height, cols, 3), dtype=np.uint8)
    canvas[:rows] = image
    canvas[rows : rows + 2] = 90  # thin separator
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    small = _font(max(8, int(size * 0.8)))

    y = rows + pad
    for text, is_bold, colour in layout.lines:
        draw.text((pad, y), text, font=_font(size, bold=is_bold), fill=colour)
        y += layout.line_height

    legend_width = layout.legend_width
    if layout.legend_beside:
        x0, y0 = cols - legend_width - pad, rows + pad
    else:
        x0, y0 = pad, y + pad
    if shows_heatmap(finding.decision):
        draw.text((x0, y0), "Grad-CAM attention", font=small, fill=(235, 235, 235))
        bar_top = y0 + layout.line_height
        bar_h = max(8, size)
        bar = colour_bar(legend_width, bar_h)
        pil.paste(Image.fromarray(bar), (x0, bar_top))
        draw.rectangle(
            (x0 - 1, bar_top - 1, x0 + legend_width, bar_top + bar_h), outline=(200, 200, 200)
        )
        draw.text((x0, bar_top + bar_h + 4), "low", font=small, fill=(235, 235, 235))
        high_w = draw.textlength("high", font=small)
        draw.text(
            (x0 + legend_width - high_w, bar_top + bar_h + 4),
            "high",
            font=small,
            fill=(235, 235, 235),
        )
    else:
        draw.text((x0, y0), "No heat map shown:", font=small, fill=(235, 235, 235))
        draw.text((x0, y0 + layout.line_height), "no finding was made", font=small,
                  fill=(235, 235, 235))
    return np.asarray(pil, dtype=np.uint8)


BODY_PART_EXAMINED: dict[str, str] = {
    # router class -> PS3.16 Annex L defined term that dciodvfy knows and that means
    # exactly that part (LEG is the lower leg in Annex L)
    "ELBOW": "ELBOW", "FINGER": "FINGER", "HAND": "HAND", "HUMERUS": "HUMERUS",
    "SHOULDER": "SHOULDER", "WRIST": "WRIST", "KNEE": "KNEE", "ANKLE": "ANKLE",
    "FOOT": "FOOT", "HIP": "HIP", "PELVIS": "PELVIS", "LOWER_LEG": "LEG", "LEG": "LEG",
    "CLAVICLE": "CLAVICLE",
}
"""Body Part Examined written for a router answer.  FOREARM has no term in the Annex L
tables of dicom3tools (``dciodvfy`` warns "Unrecognized defined term <FOREARM>"): a
forearm SC carries the source's own term when the source names an arm, else none."""

_ARM_TERMS = {"ARM", "FOREARM", "UPPER LIMB", "UPPERLIMB", "EXTREMITY"}


def sc_body_part(finding: ImageFinding) -> str | None:
    """Body Part Examined (0018,0015) of the heat map of ``finding``: from its own
    decision, never the series' or the router's guess at another image."""
    part = finding.body_part.upper()
    if part in BODY_PART_EXAMINED:
        return BODY_PART_EXAMINED[part]
    source = finding.meta.body_part_examined.strip().upper()
    if part == "FOREARM" and source in _ARM_TERMS:
        return source
    return None


def series_body_part(findings: Sequence[ImageFinding]) -> str | None:
    """Body Part Examined of an SC series: a value only when all its images agree
    (it is a General Series attribute, PS3.3 C.7.3.1)."""
    values = {sc_body_part(f) for f in findings}
    return values.pop() if len(values) == 1 else None


def build_secondary_capture(
    finding: ImageFinding,
    source: pydicom.Dataset,
    settings: OutputSettings,
    *,
    instance_number: int | None = None,
    series_findings: Sequence[ImageFinding] | None = None,
) -> pydicom.Dataset:
    """Build the Grad-CAM Secondary Capture of one analysed radiograph.

    Parameters
    ----------
    finding
        The analysis of the radiograph (its normalised pixels and heat map).
    source
        The source instance as received; Patient and Study modules (and Specific
        Character Set) are copied from it exactly.
    settings
        Series, equipment and size settings.
    instance_number
        Instance Number within the SC series (unique per study: the caller numbers
        the heat maps in reading order); the source's own number when omitted.
    series_findings
        All findings whose heat maps share this series; Body Part Examined is
        written only when they agree (:func:`series_body_part`).

    Returns
    -------
    pydicom.Dataset
        A Secondary Capture Image (PS3.3 A.8.1), RGB 8 bit, Explicit VR Little
        Endian, with deterministic Series/SOP Instance UIDs.

    Raises
    ------
    ValueError
        If ``source`` is not the instance the finding was made on.
    """
    if source.SOPInstanceUID != finding.meta.sop_instance_uid:
        raise ValueError("source SOP Instance UID differs from the finding's")
    if source.StudyInstanceUID != finding.meta.study_instance_uid:
        raise ValueError("source Study Instance UID differs from the finding's")
    pixels = compose_secondary_capture(finding, settings.max_sc_side)
    models = finding_models(finding)
    laterality = finding.meta.laterality.upper()
    orientation = source.get("PatientOrientation")
    patient_orientation = (
        (str(orientation[0]), str(orientation[1]))
        if orientation is not None and len(orientation) == 2 and all(orientation)
        else None
    )
    ds = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=sc_series_uid(source.StudyInstanceUID, finding),
        series_number=settings.sc_series_number,
        sop_instance_uid=sc_instance_uid(finding),
        instance_number=instance_number or _instance_number(source),
        manufacturer=settings.manufacturer,
        laterality=laterality if laterality in ("L", "R") else None,
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        contributing_equipment=contributing_equipment(models, settings),
        series_description=series_description(settings.sc_series_description,
                                              wording.finding_name(finding.classifier)),
        manufacturer_model_name=settings.manufacturer_model_name,
        software_versions=settings.software_version,
        institution_name=settings.institution_name,
        # highdicom insists on a value; replaced below when the source has none
        patient_orientation=patient_orientation or ("A", "F"),
    )
    if patient_orientation is None:
        ds.PatientOrientation = None  # Type 2C: unknown, as in the source
    copy_patient_study(source, ds)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    body_part = finding.body_part.upper()
    examined = series_body_part(series_findings if series_findings is not None else [finding])
    if examined:
        ds.BodyPartExamined = examined
    elif "BodyPartExamined" in ds:
        del ds.BodyPartExamined
    if "Laterality" not in ds and body_part in PAIRED_BODY_PARTS:
        ds.Laterality = None  # Type 2C: paired structure, side unknown
    ds.DerivationDescription = ascii_text(
        f"Grad-CAM heat map of {finding.classifier.name} {finding.classifier.version} "
        f"blended over the source radiograph, with burned-in caption. "
        f"{NOT_FOR_DIAGNOSTIC_USE}."
    )[:1024]
    ds.ImageComments = ascii_text(wording.image_comment(finding))[:10240]
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(SOURCE_IMAGE_PURPOSE)]
    ds.SourceImageSequence = [item]
    if "SourceImageSequence" in ds and "ReferencedImageSequence" in ds:
        del ds.ReferencedImageSequence
    logger.debug(
        "built secondary capture %s for %s (%dx%d)",
        ds.SOPInstanceUID,
        finding.meta.sop_instance_uid,
        ds.Rows,
        ds.Columns,
    )
    return ds


def _instance_number(source: pydicom.Dataset) -> int:
    value = source.get("InstanceNumber")
    try:
        number = int(value) if value not in (None, "") else 1
    except (TypeError, ValueError):
        number = 1
    return number if number > 0 else 1


__all__ = ["build_secondary_capture", "compose_secondary_capture", "caption_lines"]

