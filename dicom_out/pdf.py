"""Human-readable PDF report of a study, wrapped in an Encapsulated PDF (PS3.3 A.45.1).

The report follows seed 000, section VI.F (ReportLab Platypus): a colour status
banner (positive / doubtful / needs review / negative / not analysed), a patient
and study table, the original radiograph and its Grad-CAM heat map side by side
for every analysed image, a results table (per image and per body part), the
observation text with bullet findings, a recommendation box, the models with their
versions and thresholds, and the disclaimer.

The DICOM object is built with pydicom: Encapsulated PDF IOD with Modality DOC,
Conversion Type WSD, Burned In Annotation YES, Document Title, Concept Name
LOINC 18748-4 "Diagnostic imaging report", MIME Type of Encapsulated Document,
Encapsulated Document Length and a Source Instance Sequence pointing at the
analysed images (PS3.3 C.24.2).  The builder checks that the bytes are a PDF.
"""

from __future__ import annotations

import datetime
import functools
import io
import logging
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
from reportlab import rl_config
from reportlab.lib import colors
from reportlab.lib.enums import TA_CENTER
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    Image,
    KeepTogether,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

from dicom_out.common import (
    DECISION_COLOUR,
    DECISION_LABEL,
    NOT_FOR_DIAGNOSTIC_USE,
    REVIEW_NOTICE,
    OutputSettings,
    colour_bar,
    contributing_equipment,
    copy_patient_study,
    encode_image,
    finding_models,
    font_path,
    render_views,
    series_description,
    shows_heatmap,
    study_head,
    study_output_uid,
    study_series_uid,
    unique_models,
)
from dicom_out import wording
from pipeline.result import Decision, ImageFinding, ModelInfo, Refusal, StudyResult

logger = logging.getLogger(__name__)

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
"""SOP Class UID of Encapsulated PDF Storage (PS3.4 B.5)."""

DIAGNOSTIC_IMAGING_REPORT = Code("18748-4", "LN", "Diagnostic imaging report")
"""Concept Name Code Sequence of the document (PS3.3 C.24.2, LOINC)."""

def document_title(result: StudyResult) -> str:
    """Document Title (0042,0010): what the report is about, and that it is unverified."""
    return f"AI {wording.study_finding(result, ' and ')} report - UNVERIFIED, not for diagnostic use"

PDF_IMAGE_SIDE = 640
"""Longer side in pixels of each picture embedded in the PDF (about 200 dpi)."""

# --------------------------------------------------------------------------- fonts


@functools.lru_cache(maxsize=1)
def _fonts() -> tuple[str, str]:
    """(regular, bold) font names: DejaVu Sans (all Latin/Greek/Cyrillic names) if
    available, else the built-in Helvetica."""
    regular, bold = font_path(False), font_path(True)
    if regular is None or bold is None:
        return "Helvetica", "Helvetica-Bold"
    pdfmetrics.registerFont(TTFont("FNSans", str(regular)))
    pdfmetrics.registerFont(TTFont("FNSans-Bold", str(bold)))
    pdfmetrics.registerFontFamily("FNSans", normal="FNSans", bold="FNSans-Bold")
    return "FNSans", "FNSans-Bold"


@functools.lru_cache(maxsize=1)
def _styles() -> dict[str, ParagraphStyle]:
    regular, bold = _fonts()
    base = ParagraphStyle("base", fontName=regular, fontSize=9.5, leading=12.5)
    return {
        "base": base,
        "title": ParagraphStyle("title", parent=base, fontName=bold, fontSize=17, leading=21),
        "subtitle": ParagraphStyle(
            "subtitle", parent=base, fontSize=8.5, textColor=colors.HexColor("#555555")
        ),
        "h2": ParagraphStyle(
            "h2",
            parent=base,
            fontName=bold,
            fontSize=11.5,
            leading=15,
            spaceBefore=8,
            spaceAfter=4,
            textColor=colors.HexColor("#1F3A5F"),
        ),
        "banner": ParagraphStyle(
            "banner", parent=base, fontName=bold, fontSize=15, leading=19, textColor=colors.white
        ),
        "banner_small": ParagraphStyle(
            "banner_small", parent=base, fontSize=9.5, leading=12, textColor=colors.white
        ),
        "cell": ParagraphStyle("cell", parent=base, fontSize=8.5, leading=10.5),
        "cell_bold": ParagraphStyle("cell_bold", parent=base, fontName=bold, fontSize=8.5,
                                    leading=10.5),
        "cell_head": ParagraphStyle(
            "cell_head", parent=base, fontName=bold, fontSize=8.5, leading=10.5,
            textColor=colors.white,
        ),
        "caption": ParagraphStyle(
            "caption", parent=base, fontSize=8, leading=10, alignment=TA_CENTER,
            textColor=colors.HexColor("#333333"),
        ),
        "bullet": ParagraphStyle("bullet", parent=base, leftIndent=12, bulletIndent=2),
        "small": ParagraphStyle(
            "small", parent=base, fontSize=7.5, leading=9.5, textColor=colors.HexColor("#444444")
        ),
    }


def _rgb(decision: Decision) -> colors.Color:
    r, g, b = DECISION_COLOUR[decision]
    return colors.Color(r / 255.0, g / 255.0, b / 255.0)


def _p(text: str, style: str = "base") -> Paragraph:
    return Paragraph(text, _styles()[style])


def _e(value: object) -> str:
    """Escape a value for a ReportLab paragraph."""
    return escape(str(value))


# --------------------------------------------------------------------------- text


def _fmt_date(value: object) -> str:
    text = str(value or "")
    if len(text) == 8 and text.isdigit():
        return f"{text[0:4]}-{text[4:6]}-{text[6:8]}"
    return text


def _fmt_time(value: object) -> str:
    text = str(value or "").split(".")[0]
    if len(text) >= 4 and text[:4].isdigit():
        return f"{text[0:2]}:{text[2:4]}"
    return text


def _person(value: object) -> str:
    if value is None or str(value) == "":
        return ""
    name = pydicom.valuerep.PersonName(value) if not isinstance(
        value, pydicom.valuerep.PersonName
    ) else value
    parts = [name.given_name, name.middle_name, name.family_name]
    readable = " ".join(p for p in parts if p)
    return readable or str(value)


def _sex(value: object) -> str:
    return {"F": "female", "M": "male", "O": "other"}.get(str(value or ""), "")


def banner_text(result: StudyResult) -> tuple[str, str]:
    """(headline, sub-line) of the status banner (:func:`dicom_out.wording.headline`)."""
    return wording.headline(result)


def observation_text(result: StudyResult) -> tuple[str, list[str]]:
    """Observation paragraph and bullet findings (seed 000, VI.A), in reading order."""
    return wording.observation(result)


def recommendation_text(result: StudyResult) -> str:
    """The clinical recommendation for the study decision."""
    return wording.recommendation(result)


DISCLAIMER = (
    "This report was generated automatically by an artificial-intelligence research "
    "system (fracture-node). It is UNVERIFIED and NOT FOR DIAGNOSTIC USE: it does not "
    "replace the interpretation of the images by a qualified radiologist, who remains "
    "responsible for the diagnosis. Probabilities are model outputs, not clinical "
    "certainties; heat maps indicate model attention, not the location of a lesion."
)

# --------------------------------------------------------------------------- PDF


def _image_flowable(rgb: np.ndarray, width: float, height: float) -> Image:
    rows, cols = rgb.shape[:2]
    k = min(width / cols, height / rows)
    data = io.BytesIO(encode_image(rgb, ".jpg", 88))
    return Image(data, width=cols * k, height=rows * k)


def _patient_table(head: pydicom.Dataset, doc_width: float) -> Table:
    rows = [
        ("Patient", _person(head.get("PatientName")), "Patient ID", str(head.get("PatientID", ""))),
        (
            "Birth date",
            _fmt_date(head.get("PatientBirthDate")),
            "Sex",
            _sex(head.get("PatientSex")),
        ),
        (
            "Study date",
            f"{_fmt_date(head.get('StudyDate'))} {_fmt_time(head.get('StudyTime'))}".strip(),
            "Accession",
            str(head.get("AccessionNumber", "")),
        ),
        (
            "Study",
            str(head.get("StudyDescription", "")),
            "Referring",
            _person(head.get("ReferringPhysicianName")),
        ),
    ]
    data = [
        [_p(_e(a), "cell_bold"), _p(_e(b), "cell"), _p(_e(c), "cell_bold"), _p(_e(d), "cell")]
        for a, b, c, d in rows
    ]
    w = doc_width
    table = Table(data, colWidths=[0.14 * w, 0.38 * w, 0.14 * w, 0.34 * w])
    table.setStyle(
        TableStyle(
            [
                ("BACKGROUND", (0, 0), (0, -1), colors.HexColor("#EEF2F7")),
                ("BACKGROUND", (2, 0), (2, -1), colors.HexColor("#EEF2F7")),
                ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#B8C2CE")),
                ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
                ("TOPPADDING", (0, 0), (-1, -1), 3),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 3),
            ]
        )
    )
    return table


def _banner(result: StudyResult, doc_width: float) -> Table:
    headline, sub = banner_text(result)
    table = Table(
        [[_p(_e(headline), "banner")], [_p(_e(sub), "banner_small")]], colWidths=[doc_width]
    )
    table.setStyle(
        TableStyle(
            [
                ("BACKGROUND", (0, 0), (-1, -1), _rgb(result.decision)),
                ("LEFTPADDING", (0, 0), (-1, -1), 10),
                ("TOPPADDING", (0, 0), (-1, 0), 8),
                ("BOTTOMPADDING", (0, -1), (-1, -1), 8),
            ]
        )
    )
    return table


def _image_block(
    finding: ImageFinding, doc_width: float, heading: Paragraph | None = None
) -> KeepTogether:
    original, overlay = render_views(finding, PDF_IMAGE_SIDE)
    cell_w = doc_width / 2.0 - 6
    cell_h = 68 * mm
    label = DECISION_LABEL[finding.decision]
    colour = "#%02X%02X%02X" % DECISION_COLOUR[finding.decision]
    what = wording.finding_name(finding.classifier)
    part = wording.side_name(finding.meta) + wording.body_part_name(finding.body_part)
    title = _p(
        f"<b>{_e(wording.image_name(finding.meta))}</b> \u2014 {_e(part)}"
        f" \u2014 {_e(what)} probability <b>{finding.fracture_probability:.2f}</b> "
        f"\u2014 <font color='{colour}'><b>{_e(label)}</b></font>",
        "base",
    )
    if shows_heatmap(finding.decision):
        right_caption = "Grad-CAM heat map (blue = low, red = high attention)"
    else:
        right_caption = "No heat map shown: no finding was made"
    table = Table(
        [
            [_image_flowable(original, cell_w, cell_h), _image_flowable(overlay, cell_w, cell_h)],
            [_p("Original radiograph", "caption"), _p(_e(right_caption), "caption")],
        ],
        colWidths=[doc_width / 2.0, doc_width / 2.0],
    )
    table.setStyle(
        TableStyle(
            [
                ("ALIGN", (0, 0), (-1, -1), "CENTER"),
                ("VALIGN", (0, 0), (-1, 0), "MIDDLE"),
                ("BACKGROUND", (0, 0), (-1, 0), colors.black),
                ("BOX", (0, 0), (-1, -1), 0.4, colors.HexColor("#B8C2CE")),
            ]
        )
    )
    parts: list[object] = [title, Spacer(1, 3), table]
    if heading is not None:
        parts.insert(0, heading)
    if shows_heatmap(finding.decision):
        bar = colour_bar(256, 10)
        legend = Table(
            [[_p("low", "small"), _image_flowable(bar, 60 * mm, 3 * mm), _p("high", "small")]],
            colWidths=[12 * mm, 62 * mm, 14 * mm],
            hAlign="RIGHT",
        )
        legend.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "MIDDLE")]))
        parts.append(legend)
    parts.append(Spacer(1, 6))
    return KeepTogether(parts)


def _decision_cell(decision: Decision) -> Paragraph:
    return _p(
        f"<font color='#%02X%02X%02X'><b>{_e(DECISION_LABEL[decision])}</b></font>"
        % DECISION_COLOUR[decision],
        "cell",
    )


def _results_table(result: StudyResult, doc_width: float) -> Table:
    what = wording.study_finding(result)
    mixed = len(wording.study_findings(result)) > 1  # then each p names what it measures
    header = ["Image (series, instance)", "Body part (router p)", f"{what.capitalize()} p",
              "Doubtful band", "Decision"]
    data: list[list[object]] = [[_p(_e(h), "cell_head") for h in header]]
    for outcome in result.outcomes():
        name = _p(_e(wording.image_name(outcome.meta)), "cell")
        if isinstance(outcome, ImageFinding):
            part = wording.side_name(outcome.meta) + wording.body_part_name(outcome.body_part)
            data.append([
                name,
                _p(_e(f"{part} ({outcome.body_part_probability:.2f})"), "cell"),
                _p(f"{outcome.fracture_probability:.2f}"
                   + (f" {wording.finding_name(outcome.classifier)}" if mixed else ""), "cell"),
                _p(_e(wording.band_text(outcome.doubt_band)), "cell"),
                _decision_cell(outcome.decision),
            ])
        else:
            data.append([
                name,
                _p(_e(wording.refusal_reason(outcome)), "cell"),
                _p("\u2013", "cell"),
                _p("\u2013", "cell"),
                _decision_cell(Decision.NOT_ANALYSED),
            ])
    w = doc_width
    table = Table(
        data, colWidths=[0.28 * w, 0.32 * w, 0.12 * w, 0.12 * w, 0.16 * w], repeatRows=1
    )
    table.setStyle(
        TableStyle(
            [
                ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#1F3A5F")),
                ("TEXTCOLOR", (0, 0), (-1, 0), colors.white),
                ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#B8C2CE")),
                ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
                ("ROWBACKGROUNDS", (0, 1), (-1, -1), [colors.white, colors.HexColor("#F5F7FA")]),
            ]
        )
    )
    return table


def _body_part_table(result: StudyResult, doc_width: float) -> Table | None:
    if not result.by_body_part:
        return None
    what = wording.study_finding(result)
    mixed = len(wording.study_findings(result)) > 1
    data: list[list[object]] = [
        [
            _p(_e(h), "cell_bold")
            for h in ("Body part", "Images by decision", f"Mean {what} p (mean rule)",
                      "Study decision")
        ]
    ]
    for part, d in sorted(result.by_body_part.items()):
        data.append(
            [
                _p(_e(wording.body_part_name(part).capitalize()), "cell"),
                _p(_e(wording.part_counts(d)), "cell"),
                _p(_e(f"{d.probability:.2f}" + (f" {wording.part_finding(d)}" if mixed else "")
                      + f" ({wording.decision_word(d.mean_decision)})"), "cell"),
                _decision_cell(d.decision),
            ]
        )
    w = doc_width
    table = Table(data, colWidths=[0.18 * w, 0.42 * w, 0.22 * w, 0.18 * w])
    table.setStyle(
        TableStyle(
            [
                ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#EEF2F7")),
                ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#B8C2CE")),
                ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
            ]
        )
    )
    return table


def _recommendation_box(result: StudyResult, doc_width: float) -> Table:
    table = Table(
        [[_p("<b>Recommendation</b>")], [_p(_e(recommendation_text(result)))]],
        colWidths=[doc_width],
    )
    table.setStyle(
        TableStyle(
            [
                ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#FFF8E1")),
                ("BOX", (0, 0), (-1, -1), 1.2, colors.HexColor("#E0A100")),
                ("LEFTPADDING", (0, 0), (-1, -1), 8),
                ("TOPPADDING", (0, 0), (-1, 0), 6),
                ("BOTTOMPADDING", (0, -1), (-1, -1), 7),
            ]
        )
    )
    return table


def _models_table(models: Sequence[ModelInfo], doc_width: float) -> Table:
    data: list[list[object]] = [
        [_p(h, "cell_bold") for h in ("Model", "What its number means", "Validated")]
    ]
    for m in models:
        data.append(
            [
                _p(f"<b>{_e(m.name)}</b> {_e(m.version)}<br/>{_e(wording.model_role(m))}<br/>"
                   f"{_e(wording.architecture_name(m))}"
                   f"{', served in ' + _e(m.precision) if m.precision != 'fp32' else ''}"
                   f"<br/>SHA-256 {_e(m.weights_sha256[:12])}",
                   "cell"),
                _p(_e(wording.meaning(m)), "cell"),
                _p("<br/>".join(_e(v) for v in m.validated) or "not recorded", "cell"),
            ]
        )
    w = doc_width
    table = Table(data, colWidths=[0.28 * w, 0.36 * w, 0.36 * w])
    table.setStyle(
        TableStyle(
            [
                ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#EEF2F7")),
                ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#B8C2CE")),
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
            ]
        )
    )
    return table


def render_pdf(
    result: StudyResult,
    head: pydicom.Dataset,
    settings: OutputSettings,
    created: datetime.datetime,
) -> bytes:
    """Typeset the report (seed 000, VI.F) and return the PDF bytes.

    ``head`` supplies the patient and study attributes shown in the header table.
    """
    styles = _styles()
    regular, _ = _fonts()
    buf = io.BytesIO()
    doc = SimpleDocTemplate(
        buf,
        pagesize=A4,
        leftMargin=16 * mm,
        rightMargin=16 * mm,
        topMargin=14 * mm,
        bottomMargin=16 * mm,
        title=f"AI {wording.study_finding(result, ' and ')} report",
        author=settings.manufacturer,
        subject=NOT_FOR_DIAGNOSTIC_USE,
        creator=f"{settings.manufacturer} {settings.software_version}",
        invariant=0,  # a real creation date (invariant mode writes 2000-01-01)
    )
    width = doc.width
    models = unique_models(
        [*result.models, *(m for f in result.findings for m in finding_models(f))]
    )
    story: list[object] = [
        _p(_e(f"AI {wording.study_finding(result, ' and ').capitalize()} Detection Report"), "title"),
        _p(
            _e(
                f"{settings.manufacturer_model_name} {settings.software_version} \u2014 "
                f"created {created:%Y-%m-%d %H:%M} \u2014 {REVIEW_NOTICE}"
            ),
            "subtitle",
        ),
        Spacer(1, 6),
        _banner(result, width),
        Spacer(1, 8),
        _patient_table(head, width),
    ]
    story += [_p("Analysis results", "h2"), _results_table(result, width)]
    part_table = _body_part_table(result, width)
    if part_table is not None:
        story += [Spacer(1, 6), KeepTogether([part_table])]
    summary, bullets = observation_text(result)
    observation: list[object] = [_p("AI observation", "h2"), _p(_e(summary))]
    observation += [Paragraph(_e(b), styles["bullet"], bulletText="\u2022") for b in bullets]
    story += [KeepTogether(observation), Spacer(1, 8), _recommendation_box(result, width)]
    if result.findings:
        heading = _p("Images: original and heat map", "h2")
        shown = [o for o in result.outcomes() if isinstance(o, ImageFinding)]
        for i, finding in enumerate(shown):
            story.append(_image_block(finding, width, heading if i == 0 else None))
    if models:
        story += [_p("Models", "h2"), _models_table(models, width)]
        thresholds = sorted(
            {
                (f.body_part, f.threshold, f.doubt_band)
                for f in result.findings
            }
        )
        if thresholds:
            text = "; ".join(
                f"{wording.body_part_name(bp).capitalize()}: threshold {t:.2f}, "
                f"doubtful {lo:.2f}\u2013{hi:.2f}"
                for bp, t, (lo, hi) in thresholds
            )
            story += [Spacer(1, 3), _p("Operating points \u2014 " + _e(text), "small")]
    story += [_p("Disclaimer", "h2"), _p(_e(DISCLAIMER), "small")]

    def _footer(canvas: Canvas, doc_: SimpleDocTemplate) -> None:
        canvas.saveState()
        canvas.setFont(regular, 7)
        canvas.setFillColor(colors.HexColor("#666666"))
        canvas.drawString(
            doc_.leftMargin, 9 * mm, f"{REVIEW_NOTICE} \u2014 UNVERIFIED, not for diagnostic use"
        )
        canvas.drawRightString(doc_.leftMargin + doc_.width, 9 * mm, f"page {doc_.page}")
        canvas.restoreState()

    use_a85 = rl_config.useA85
    rl_config.useA85 = 0  # pure-Python ASCII85 of the images costs ~60 ms; binary is valid PDF
    try:
        doc.build(story, onFirstPage=_footer, onLaterPages=_footer)
    finally:
        rl_config.useA85 = use_a85
    return buf.getvalue()


def check_pdf(data: bytes) -> None:
    """Raise ``ValueError`` unless ``data`` looks like a complete PDF file."""
    if not data.startswith(b"%PDF-"):
        raise ValueError("encapsulated document does not start with %PDF-")
    if b"%%EOF" not in data[-1024:]:
        raise ValueError("encapsulated document has no %%EOF trailer")


# --------------------------------------------------------------------------- DICOM


def build_pdf_report(
    result: StudyResult,
    sources: Mapping[str, pydicom.Dataset],
    settings: OutputSettings,
) -> pydicom.Dataset:
    """Build the Encapsulated PDF report of a study (PS3.3 A.45.1).

    Parameters
    ----------
    result
        Findings and refusals of the study and the study-level decisions.
    sources
        Source instances keyed by SOP Instance UID; must hold every analysed
        instance (refused ones may be missing).  Patient and Study modules (and
        Specific Character Set) are copied exactly from the first analysed (else
        first refused) instance.
    settings
        Series and equipment settings.

    Returns
    -------
    pydicom.Dataset
        An Encapsulated PDF Storage instance (Explicit VR Little Endian).

    Raises
    ------
    ValueError
        If the result is empty, an analysed instance has no source, a source is
        of another study, or the typeset bytes are not a PDF.
    """
    head = study_head(result, sources)
    outcomes: list[ImageFinding | Refusal] = [*result.findings, *result.refusals]
    sop_uids = [o.meta.sop_instance_uid for o in outcomes]
    models = unique_models(
        [*result.models, *(m for f in result.findings for m in finding_models(f))]
    )
    now = datetime.datetime.now()
    data = render_pdf(result, head, settings, now)
    check_pdf(data)

    sop_instance_uid = study_output_uid(result.study_instance_uid, sop_uids, models, "pdf")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = pydicom.Dataset()
    ds.file_meta = meta
    copy_patient_study(head, ds)
    # SOP Common (C.12.1)
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.ContributingEquipmentSequence = contributing_equipment(models, settings)
    # Encapsulated Document Series (C.24.1)
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = study_series_uid(result.study_instance_uid, models, "pdf")
    ds.SeriesNumber = settings.pdf_series_number
    ds.SeriesDescription = series_description(settings.pdf_series_description,
                                              wording.study_finding(result, "/"))
    # General Equipment (C.7.5.1) and SC Equipment (C.8.6.1)
    ds.Manufacturer = settings.manufacturer
    ds.ManufacturerModelName = settings.manufacturer_model_name
    ds.SoftwareVersions = settings.software_version
    if settings.institution_name is not None:
        ds.InstitutionName = settings.institution_name
    ds.ConversionType = "WSD"
    # Encapsulated Document (C.24.2)
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.RecognizableVisualFeatures = "YES" if result.findings else "NO"
    ds.DocumentTitle = document_title(result)
    concept = pydicom.Dataset()
    concept.CodeValue = DIAGNOSTIC_IMAGING_REPORT.value
    concept.CodingSchemeDesignator = DIAGNOSTIC_IMAGING_REPORT.scheme_designator
    concept.CodeMeaning = DIAGNOSTIC_IMAGING_REPORT.meaning
    ds.ConceptNameCodeSequence = [concept]
    source_items = []
    for finding in (o for o in result.outcomes() if isinstance(o, ImageFinding)):
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = finding.meta.sop_class_uid
        item.ReferencedSOPInstanceUID = finding.meta.sop_instance_uid
        source_items.append(item)
    if source_items:
        ds.SourceInstanceSequence = source_items
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(data)
    ds.EncapsulatedDocument = data + (b"\x00" if len(data) % 2 else b"")
    logger.debug(
        "built PDF report %s: %d page bytes, study decision %s",
        sop_instance_uid,
        len(data),
        DECISION_LABEL[result.decision],
    )
    return ds


__all__ = ["build_pdf_report", "render_pdf", "check_pdf", "observation_text"]
