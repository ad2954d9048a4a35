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
    body_part_label,
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
from pipeline.result import Decision, ImageFinding, ModelInfo, Refusal, StudyResult

logger = logging.getLogger(__name__)

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
"""SOP Class UID of Encapsulated PDF Storage (PS3.4 B.5)."""

DIAGNOSTIC_IMAGING_REPORT = Code("18748-4", "LN", "Diagnostic imaging report")
"""Concept Name Code Sequence of the document (PS3.3 C.24.2, LOINC)."""

DOCUMENT_TITLE = "AI fracture report - UNVERIFIED, not for diagnostic use"

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
    """(headline, sub-line) of the status banner."""
    parts_by_decision: dict[Decision, list[str]] = {}
    for part, decision in sorted(result.by_body_part.items()):
        parts_by_decision.setdefault(decision.decision, []).append(body_part_label(part).lower())
    d = result.decision
    if d is Decision.POSITIVE:
        where = ", ".join(parts_by_decision.get(d, [])) or "the study"
        return "FRACTURE SUSPECTED", f"The AI flags a probable fracture / abnormality: {where}."
    if d is Decision.DOUBTFUL:
        where = ", ".join(parts_by_decision.get(d, [])) or "the study"
        return "DOUBTFUL RESULT", f"Probability close to the operating threshold: {where}."
    if d is Decision.NEEDS_REVIEW:
        return "NEEDS HUMAN REVIEW", "The models were not confident enough to give an answer."
    if d is Decision.NEGATIVE:
        return "NO FRACTURE DETECTED", "No image reached the operating threshold."
    return "NOT ANALYSED", "No image of this study could be analysed by the AI."


def observation_text(result: StudyResult) -> tuple[str, list[str]]:
    """Rule-based observation paragraph and bullet findings (seed 000, VI.A)."""
    n_img = len(result.findings)
    n_ref = len(result.refusals)
    if n_img == 0:
        summary = (
            f"No radiograph of this study could be analysed by the AI "
            f"({n_ref} instance{'s' if n_ref != 1 else ''} refused; reasons below)."
        )
        bullets = [
            f"Instance {j} ({r.meta.modality or 'instance'}): not analysed \u2014 {r.text}"
            for j, r in enumerate(result.refusals, start=1)
        ]
        return summary, bullets
    summary = (
        f"{n_img} radiograph{'s' if n_img != 1 else ''} of this study "
        f"{'were' if n_img != 1 else 'was'} analysed by the AI"
    )
    if n_ref:
        summary += f"; {n_ref} instance{'s' if n_ref != 1 else ''} could not be analysed"
    summary += ". "
    if result.by_body_part:
        descr = []
        for part, decision in sorted(result.by_body_part.items()):
            descr.append(
                f"{body_part_label(part).lower()}: mean fracture probability "
                f"{decision.probability:.2f} against a threshold of {decision.threshold:.2f} "
                f"({DECISION_LABEL[decision.decision].lower()})"
            )
        summary += "Per body part, " + "; ".join(descr) + ". "
    summary += (
        "Heat maps show where the classifier looked (Grad-CAM); they are shown only for "
        "positive or doubtful images and do not delineate a fracture line."
    )
    bullets: list[str] = []
    for i, f in enumerate(result.findings, start=1):
        side = {"L": "left ", "R": "right "}.get(f.meta.laterality.upper(), "")
        text = (
            f"Image {i} ({side}{body_part_label(f.body_part).lower()}, body part p = "
            f"{f.body_part_probability:.2f}): fracture probability "
            f"{f.fracture_probability:.2f} \u2014 {DECISION_LABEL[f.decision].lower()}."
        )
        if f.notes:
            text += " Note: " + "; ".join(f.notes) + "."
        if f.meta.body_part_examined and f.meta.body_part_examined.upper() != f.body_part.upper():
            text += (
                f" The DICOM header says {f.meta.body_part_examined.upper()}; the AI routed "
                f"the image as {f.body_part.upper()}."
            )
        bullets.append(text)
    for j, r in enumerate(result.refusals, start=n_img + 1):
        what = r.meta.modality or "instance"
        bullets.append(f"Instance {j} ({what}): not analysed \u2014 {r.text}")
    return summary, bullets


def recommendation_text(result: StudyResult) -> str:
    """The clinical recommendation for the study decision."""
    return {
        Decision.POSITIVE: (
            "Radiologist review of the flagged images is recommended with priority. "
            "Correlate with the clinical findings; consider further views or follow-up "
            "imaging if the fracture is not confirmed."
        ),
        Decision.DOUBTFUL: (
            "The result is close to the operating threshold. A careful radiologist review "
            "is recommended; consider additional views or clinical follow-up."
        ),
        Decision.NEEDS_REVIEW: (
            "The AI could not reach a confident answer. The study requires a standard "
            "radiologist read without reliance on this result."
        ),
        Decision.NEGATIVE: (
            "No fracture was detected by the AI. This does not exclude a fracture: "
            "the study still requires the usual radiologist read, in particular for "
            "subtle or non-displaced fractures."
        ),
        Decision.NOT_ANALYSED: (
            "The AI did not analyse this study. It requires the usual radiologist read."
        ),
    }[result.decision]


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
    finding: ImageFinding, number: int, doc_width: float, heading: Paragraph | None = None
) -> KeepTogether:
    original, overlay = render_views(finding, PDF_IMAGE_SIDE)
    cell_w = doc_width / 2.0 - 6
    cell_h = 68 * mm
    side = {"L": "left ", "R": "right "}.get(finding.meta.laterality.upper(), "")
    label = DECISION_LABEL[finding.decision]
    colour = "#%02X%02X%02X" % DECISION_COLOUR[finding.decision]
    title = _p(
        f"<b>Image {number}</b> \u2014 {_e(side + body_part_label(finding.body_part).lower())}"
        f" \u2014 fracture probability <b>{finding.fracture_probability:.2f}</b> "
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


def _results_table(result: StudyResult, doc_width: float) -> Table:
    header = ["#", "Body part (router p)", "Fracture p", "Threshold", "Doubt band", "Decision"]
    data: list[list[object]] = [[_p(_e(h), "cell_head") for h in header]]
    for i, f in enumerate(result.findings, start=1):
        low, high = f.doubt_band
        data.append(
            [
                _p(str(i), "cell"),
                _p(
                    _e(f"{body_part_label(f.body_part)} ({f.body_part_probability:.2f})"), "cell"
                ),
                _p(f"{f.fracture_probability:.2f}", "cell"),
                _p(f"{f.threshold:.2f}", "cell"),
                _p(f"{low:.2f}\u2013{high:.2f}", "cell"),
                _p(
                    f"<font color='#%02X%02X%02X'><b>{_e(DECISION_LABEL[f.decision])}</b></font>"
                    % DECISION_COLOUR[f.decision],
                    "cell",
                ),
            ]
        )
    for j, r in enumerate(result.refusals, start=len(result.findings) + 1):
        data.append(
            [
                _p(str(j), "cell"),
                _p(_e(r.meta.modality or "-"), "cell"),
                _p("\u2013", "cell"),
                _p("\u2013", "cell"),
                _p("\u2013", "cell"),
                _p(_e(f"NOT ANALYSED: {r.text}"), "cell"),
            ]
        )
    w = doc_width
    table = Table(
        data, colWidths=[0.06 * w, 0.27 * w, 0.13 * w, 0.13 * w, 0.14 * w, 0.27 * w], repeatRows=1
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
    data: list[list[object]] = [
        [
            _p(h, "cell_bold")
            for h in ("Body part", "Images", "Mean fracture p", "Threshold", "Study decision")
        ]
    ]
    for part, d in sorted(result.by_body_part.items()):
        data.append(
            [
                _p(_e(body_part_label(part)), "cell"),
                _p(str(len(d.sop_instance_uids)), "cell"),
                _p(f"{d.probability:.2f}", "cell"),
                _p(f"{d.threshold:.2f}", "cell"),
                _p(
                    f"<font color='#%02X%02X%02X'><b>{_e(DECISION_LABEL[d.decision])}</b></font>"
                    % DECISION_COLOUR[d.decision],
                    "cell",
                ),
            ]
        )
    w = doc_width
    table = Table(data, colWidths=[0.27 * w, 0.13 * w, 0.2 * w, 0.13 * w, 0.27 * w])
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


def _models_table(
    result: StudyResult, models: Sequence[ModelInfo], doc_width: float
) -> Table:
    data: list[list[object]] = [
        [_p(h, "cell_bold") for h in ("Role", "Model", "Version", "Architecture", "Weights SHA-256")]
    ]
    router = result.findings[0].router if result.findings else None
    for m in models:
        role = "body-part router" if router is not None and m == router else "fracture classifier"
        data.append(
            [
                _p(role, "cell"),
                _p(_e(m.name), "cell"),
                _p(_e(m.version), "cell"),
                _p(_e(m.architecture), "cell"),
                _p(_e(m.weights_sha256[:16] + "\u2026"), "cell"),
            ]
        )
    w = doc_width
    table = Table(data, colWidths=[0.2 * w, 0.25 * w, 0.12 * w, 0.18 * w, 0.25 * w])
    table.setStyle(
        TableStyle(
            [
                ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#EEF2F7")),
                ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#B8C2CE")),
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
        title="AI fracture report",
        author=settings.manufacturer,
        subject=NOT_FOR_DIAGNOSTIC_USE,
        creator=f"{settings.manufacturer} {settings.software_version}",
        invariant=1,
    )
    width = doc.width
    models = unique_models(
        [*result.models, *(m for f in result.findings for m in finding_models(f))]
    )
    story: list[object] = [
        _p("AI Fracture Detection Report", "title"),
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
        for i, finding in enumerate(result.findings, start=1):
            story.append(_image_block(finding, i, width, heading if i == 1 else None))
    if models:
        story += [_p("Models", "h2"), _models_table(result, models, width)]
        thresholds = sorted(
            {
                (f.body_part, f.threshold, f.doubt_band)
                for f in result.findings
            }
        )
        if thresholds:
            text = "; ".join(
                f"{body_part_label(bp)}: threshold {t:.2f}, doubtful {lo:.2f}\u2013{hi:.2f}"
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
    ds.SeriesDescription = series_description(settings.pdf_series_description)
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
    ds.DocumentTitle = DOCUMENT_TITLE
    concept = pydicom.Dataset()
    concept.CodeValue = DIAGNOSTIC_IMAGING_REPORT.value
    concept.CodingSchemeDesignator = DIAGNOSTIC_IMAGING_REPORT.scheme_designator
    concept.CodeMeaning = DIAGNOSTIC_IMAGING_REPORT.meaning
    ds.ConceptNameCodeSequence = [concept]
    source_items = []
    for finding in result.findings:
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
