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

import logging

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.sr.coding import Code

from dicom_out.common import (
    DECISION_COLOUR,
    DECISION_LABEL,
    NOT_FOR_DIAGNOSTIC_USE,
    PAIRED_BODY_PARTS,
    REVIEW_NOTICE,
    OutputSettings,
    ascii_text,
    body_part_label,
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


def sc_series_uid(study_instance_uid: str, finding: ImageFinding) -> str:
    """Series Instance UID shared by the heat maps of one study and model version."""
    return study_series_uid(study_instance_uid, finding_models(finding), "sc")


def sc_instance_uid(finding: ImageFinding) -> str:
    """SOP Instance UID of the heat map of ``finding`` (source UID + model hashes)."""
    return output_uid(finding.meta.sop_instance_uid, *model_hashes(finding_models(finding)), "sc")


def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = font_path(bold)
    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(path), size=size)


def caption_lines(finding: ImageFinding) -> list[tuple[str, bool, tuple[int, int, int]]]:
    """Text of the burned-in caption: (line, bold, RGB colour), top to bottom."""
    label = DECISION_LABEL[finding.decision]
    low, high = finding.doubt_band
    white = (235, 235, 235)
    laterality = {"L": "left ", "R": "right "}.get(finding.meta.laterality.upper(), "")
    lines = [
        (f"Fracture: {label}   p = {finding.fracture_probability:.2f}", True, _caption_colour(finding)),
        (
            f"Threshold {finding.threshold:.2f}; doubtful from {low:.2f} to {high:.2f}",
            False,
            white,
        ),
        (
            f"Body part: {laterality}{body_part_label(finding.body_part).lower()}   "
            f"p = {finding.body_part_probability:.2f}",
            False,
            white,
        ),
        (
            f"Model: {finding.classifier.name} {finding.classifier.version}   "
            f"router: {finding.router.name} {finding.router.version}",
            False,
            white,
        ),
        (f"{REVIEW_NOTICE}. Not for diagnostic use.", True, (255, 255, 255)),
    ]
    return lines


def _caption_colour(finding: ImageFinding) -> tuple[int, int, int]:
    r, g, b = DECISION_COLOUR[finding.decision]
    # brighter variant of the banner colour, readable on black
    return (min(255, r + 55), min(255, g + 55), min(255, b + 55))


def compose_secondary_capture(finding: ImageFinding, max_side: int) -> np.ndarray:
    """The pixels of the Secondary Capture: image with heat map, legend and caption.

    Returns an RGB uint8 array, (rows, columns, 3): the rendering of
    :func:`dicom_out.common.render_heatmap` on top, a black caption band below it.
    """
    band_guess = 0.2
    image = render_heatmap(
        finding,
        max(256, int(max_side / (1.0 + band_guess))),
        min_side=MIN_SC_SIDE,
    )
    rows, cols = image.shape[:2]
    font_size = max(14, int(round(min(cols, 1.25 * rows) / 52)))
    line_height = int(round(font_size * 1.45))
    lines = caption_lines(finding)
    legend_height = font_size * 3
    pad = font_size
    band = pad * 2 + max(line_height * len(lines), legend_height + line_height)
    canvas = np.zeros((rows + band, cols, 3), dtype=np.uint8)
    canvas[:rows] = image
    canvas[rows : rows + 2] = 90  # thin separator
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    regular = _font(font_size)
    bold = _font(font_size, bold=True)
    small = _font(max(12, int(font_size * 0.8)))

    legend_width = max(120, min(cols // 4, font_size * 12))
    text_right = cols - legend_width - 2 * pad
    y = rows + pad
    for text, is_bold, colour in lines:
        font = bold if is_bold else regular
        draw.text((pad, y), _fit_text(draw, text, font, text_right - pad), font=font, fill=colour)
        y += line_height

    x0 = cols - legend_width - pad
    y0 = rows + pad
    if shows_heatmap(finding.decision):
        draw.text((x0, y0), "Grad-CAM attention", font=small, fill=(235, 235, 235))
        bar_top = y0 + line_height
        bar_h = max(8, font_size)
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
        draw.text(
            (x0, y0 + line_height),
            _fit_text(draw, "no finding was made", small, legend_width + pad),
            font=small,
            fill=(235, 235, 235),
        )
    return np.asarray(pil, dtype=np.uint8)


def _fit_text(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    width: float,
) -> str:
    """``text`` shortened with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 4 and draw.textlength(text + "\u2026", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "\u2026"


def build_secondary_capture(
    finding: ImageFinding, source: pydicom.Dataset, settings: OutputSettings
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
        instance_number=_instance_number(source),
        manufacturer=settings.manufacturer,
        laterality=laterality if laterality in ("L", "R") else None,
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        contributing_equipment=contributing_equipment(models, settings),
        series_description=series_description(settings.sc_series_description),
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
    if body_part:
        ds.BodyPartExamined = body_part[:16]
    if "Laterality" not in ds and body_part in PAIRED_BODY_PARTS:
        ds.Laterality = None  # Type 2C: paired structure, side unknown
    ds.DerivationDescription = ascii_text(
        f"Grad-CAM heat map of {finding.classifier.name} {finding.classifier.version} "
        f"blended over the source radiograph, with burned-in caption. "
        f"{NOT_FOR_DIAGNOSTIC_USE}."
    )[:1024]
    ds.ImageComments = ascii_text(
        f"fracture-node Grad-CAM heat map. {NOT_FOR_DIAGNOSTIC_USE}. Fracture {DECISION_LABEL[finding.decision].lower()}, "
        f"p={finding.fracture_probability:.3f}, threshold {finding.threshold:.3f}. "
        f"Requires radiologist review."
    )[:10240]
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

