"""Every sentence the node writes about a decision, rendered from the decision objects.

The burned-in caption of the Secondary Capture, the Structured Report's identifiers
and comments, the PDF's banner, tables, observations and recommendation, the Key
Object Selection's description and the texts recorded for ``status`` are all made
here, from the same :class:`~pipeline.result.StudyResult`, so they cannot disagree.

Two rules hold for every sentence:

* a number is named after what it measures: "fracture" only for a classifier whose
  registry entry says its output is a fracture probability, "abnormality" for
  MURA's abnormal study (:attr:`~pipeline.result.ModelInfo.finding`);
* an image is named the way a reader finds it in a viewer: the source's Series
  Number and Series Description and its Instance Number (PS3.3 C.7.3.1, C.7.6.1).
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.result import (
    BodyPartDecision,
    Decision,
    ImageFinding,
    ImageMetadata,
    ModelInfo,
    Refusal,
    RefusalCode,
    StudyResult,
)

REVIEW_NOTICE = "AI result \u2014 requires radiologist review"
"""Burned into every Secondary Capture and printed on every PDF page."""

NOT_FOR_DIAGNOSTIC_USE = "UNVERIFIED AI result, not for diagnostic use"
"""Appended to every description the node writes (series, derivation, document title)."""

DECISION_LABEL: dict[Decision, str] = {
    Decision.POSITIVE: "POSITIVE",
    Decision.DOUBTFUL: "DOUBTFUL",
    Decision.NEGATIVE: "NEGATIVE",
    Decision.NEEDS_REVIEW: "NEEDS REVIEW",
    Decision.NOT_ANALYSED: "NOT ANALYSED",
}
"""Short upper-case label of a decision, as burned in and printed."""

SEVERITY_ORDER = (
    Decision.POSITIVE,
    Decision.DOUBTFUL,
    Decision.NEEDS_REVIEW,
    Decision.NEGATIVE,
)
"""Order in which decisions are counted in a sentence (most severe first)."""

DEFAULT_FINDING = "fracture"
"""What a study without any analysed image is about (the product's finding)."""


# --------------------------------------------------------------------------- naming


def finding_name(model: ModelInfo | None) -> str:
    """What the classifier's probability measures: ``"fracture"`` or ``"abnormality"``."""
    if model is None or model.finding not in ("fracture", "abnormality"):
        return DEFAULT_FINDING
    return model.finding


FINDING_ORDER = ("fracture", "abnormality")
"""The order in which a study's findings are named."""


def study_findings(result: StudyResult) -> tuple[str, ...]:
    """The finding names of a study's analysed images (``("fracture", "abnormality")``
    when the abnormality head decided a body part beside the fracture classifier); a
    study without analysed images is named after its classifier."""
    names = {finding_name(f.classifier) for f in result.findings}
    if names:
        return tuple(n for n in FINDING_ORDER if n in names)
    classifiers = [m for m in result.models if m.finding in ("fracture", "abnormality")]
    return (finding_name(classifiers[0] if classifiers else None),)


def study_finding(result: StudyResult, joiner: str = " or ") -> str:
    """The finding name(s) of a study (see :func:`study_findings`), joined: ``"fracture"``,
    ``"fracture or abnormality"``."""
    return joiner.join(study_findings(result))


def article(word: str) -> str:
    """``"an"`` before a vowel (``"an abnormality"``), else ``"a"``."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def part_finding(part: BodyPartDecision) -> str:
    """What a body part's probability measures (the model that decided the part)."""
    return finding_name(part.classifier)


def _deciding(result: StudyResult, decision: Decision) -> str:
    """The finding names of the body parts whose study decision is ``decision`` (what a
    "suspected" headline is about), else of the whole study."""
    names = {part_finding(p) for p in result.by_body_part.values() if p.decision is decision}
    return " and ".join(n for n in FINDING_ORDER if n in names) or study_finding(result)


def meaning(model: ModelInfo) -> str:
    """One sentence saying what a model's number means."""
    if model.finding == "fracture":
        return ("p is the calibrated probability that the image shows a fracture "
                "(trained on fracture-labelled radiographs).")
    if model.finding == "abnormality":
        return ("p is the calibrated probability that the image belongs to a study a "
                "radiologist read as abnormal in the MURA data set's sense (fracture, "
                "orthopaedic hardware, degenerative change, lesion and others): it is "
                "not a fracture probability.")
    return "p is the router's probability for the body part it chose."


def body_part_name(body_part: str) -> str:
    """Readable lower-case name of a body part: ``"LOWER_LEG"`` -> ``"lower leg"``."""
    if not body_part or body_part.upper() == "OTHER":
        return "unidentified body part"
    return body_part.replace("_", " ").lower()


def side_name(meta: ImageMetadata) -> str:
    """``"left "``, ``"right "`` or ``""`` from the image's laterality."""
    return {"L": "left ", "R": "right "}.get(meta.laterality.upper(), "")


def decision_word(decision: Decision) -> str:
    """Lower-case decision: ``"positive"``, ``"needs review"`` ..."""
    return DECISION_LABEL[decision].lower()


def series_name(meta: ImageMetadata) -> str:
    """``"Series 1 (Forearm views)"`` as a viewer lists it."""
    name = f"Series {meta.series_number}" if meta.series_number is not None else "Unnumbered series"
    if meta.series_description.strip():
        name += f" ({meta.series_description.strip()})"
    return name


def image_name(meta: ImageMetadata) -> str:
    """``"Series 1 (Forearm views), image 2"``: how the reader finds the source image."""
    image = f"image {meta.instance_number}" if meta.instance_number is not None else "unnumbered image"
    return f"{series_name(meta)}, {image}"


def image_short(meta: ImageMetadata) -> str:
    """``"S1 I2"``: a compact image name for identifiers limited to 64 characters."""
    series = str(meta.series_number) if meta.series_number is not None else "?"
    instance = str(meta.instance_number) if meta.instance_number is not None else "?"
    return f"S{series} I{instance}"


def probability_text(p: float) -> str:
    """A probability with two decimals (``"0.70"``)."""
    return f"{p:.2f}"


def band_text(band: tuple[float, float]) -> str:
    """``"0.56\u20130.76"``."""
    return f"{band[0]:.2f}\u2013{band[1]:.2f}"


# --------------------------------------------------------------------------- images


def image_decision_text(finding: ImageFinding) -> str:
    """Plain words for one analysed image: the body part, the decision and its number.

    >>> "right forearm: abnormality doubtful, p = 0.70 (doubtful from 0.56 to 0.76)"  # doctest: +SKIP
    """
    what = finding_name(finding.classifier)
    part = side_name(finding.meta) + body_part_name(finding.body_part)
    p = probability_text(finding.fracture_probability)
    low, high = finding.doubt_band
    if finding.decision is Decision.POSITIVE:
        tail = f"at or above the positive limit {high:.2f}"
    elif finding.decision is Decision.DOUBTFUL:
        tail = f"inside the doubtful band {band_text(finding.doubt_band)}"
    elif finding.decision is Decision.NEGATIVE:
        tail = f"below the doubtful band, which starts at {low:.2f}"
    else:
        tail = "not decided: the body part was not recognised with enough confidence"
    return f"{part}: {what} {decision_word(finding.decision)}, p = {p} ({tail})"


def image_sentence(finding: ImageFinding) -> str:
    """``"Series 1 (Forearm views), image 2 \u2014 right forearm: ..."`` with its notes."""
    text = f"{image_name(finding.meta)} \u2014 {image_decision_text(finding)}."
    if finding.notes:
        text += " Note: " + "; ".join(finding.notes) + "."
    return text


def region_sentence(graphic_type: str, share: float) -> str:
    """What an image's region in the SR is (SCOORD graphic type ``POLYLINE`` or ``POINT``).

    >>> region_sentence("POLYLINE", 0.5)
    'outline: where the Grad-CAM heat map reaches at least 50% of its maximum'
    """
    if graphic_type == "POLYLINE":
        return f"outline: where the Grad-CAM heat map reaches at least {share:.0%} of its maximum"
    return "point: the maximum of the Grad-CAM heat map"


def refusal_reason(refusal: Refusal) -> str:
    """Why an instance was not analysed, in plain words."""
    meta = refusal.meta
    code = refusal.code
    if code is RefusalCode.UNSUPPORTED_BODY_PART:
        part = refusal.body_part.upper()
        if not part or part == "OTHER":
            return "radiograph of a body part this version does not analyse"
        return f"{body_part_name(part)} radiograph: body part not supported by this version"
    if code is RefusalCode.BODY_PART_CONFLICT:
        router = body_part_name(refusal.body_part)
        header = refusal.header or "another body part"
        return (f"needs human review: the DICOM header names the {header}, the AI's body-part "
                f"router saw a {router}; not analysed as either")
    if code is RefusalCode.BODY_PART_UNCERTAIN:
        return ("needs human review: the AI's body-part router is not sure which body part "
                f"this is (first answer: {body_part_name(refusal.body_part)}); not analysed")
    if code is RefusalCode.UNSUPPORTED_MODALITY:
        modality = meta.modality or "non-radiograph"
        return f"{modality} image: only projection radiographs are analysed"
    if code is RefusalCode.UNSUPPORTED_PHOTOMETRIC:
        pi = meta.photometric_interpretation or "this"
        return f"{pi} image: this photometric interpretation is not analysed"
    return {
        RefusalCode.NOT_AN_IMAGE: "not an image (a report, document or presentation state)",
        RefusalCode.OWN_OUTPUT: "a result object of fracture-node itself",
        RefusalCode.COLOUR_IMAGE: "colour image (a photograph or screenshot), not a greyscale radiograph",
        RefusalCode.DOCUMENT: "scanned document, not a radiograph",
        RefusalCode.BAD_PIXEL_ATTRIBUTES: "its image attributes are missing or inconsistent",
        RefusalCode.ABSURD_SIZE: "its image size is outside the range of radiographs analysed",
        RefusalCode.DECODE_FAILED: "its image data could not be read (damaged or not decodable)",
    }[code]


def refusal_sentence(refusal: Refusal) -> str:
    """``"Series 4 (Hip), image 1 \u2014 not analysed: hip radiograph: ..."``."""
    return f"{image_name(refusal.meta)} \u2014 not analysed: {refusal_reason(refusal)}."


def caption_lines(finding: ImageFinding) -> list[tuple[str, bool]]:
    """Lines of the burned-in caption of a Secondary Capture: (text, bold)."""
    low, high = finding.doubt_band
    what = finding_name(finding.classifier).capitalize()
    part = side_name(finding.meta) + body_part_name(finding.body_part)
    return [
        (f"{what}: {DECISION_LABEL[finding.decision]}   p = "
         f"{probability_text(finding.fracture_probability)}", True),
        (f"Threshold {finding.threshold:.2f}; doubtful from {low:.2f} to {high:.2f}", False),
        (f"Body part: {part}   p = {probability_text(finding.body_part_probability)}", False),
        (f"Source: {image_name(finding.meta)}", False),
        (f"Model: {finding.classifier.name} {finding.classifier.version}   "
         f"router: {finding.router.name} {finding.router.version}", False),
        (f"{REVIEW_NOTICE}. Not for diagnostic use.", True),
    ]


def image_comment(finding: ImageFinding) -> str:
    """Image Comments of the Secondary Capture (ASCII is applied by the builder)."""
    return (f"fracture-node Grad-CAM heat map. {NOT_FOR_DIAGNOSTIC_USE}. "
            f"{image_decision_text(finding)}. Requires radiologist review.")


# --------------------------------------------------------------------------- study


def count_phrase(counts: Sequence[tuple[Decision, int]], total: int, noun: str) -> str:
    """``"1 of 3 forearm images doubtful, 2 negative"`` (decisions most severe first)."""
    items = [(d, n) for d, n in counts if n]
    if not items:
        return f"{total} {noun}{'s' if total != 1 else ''}"
    first_decision, first_n = items[0]
    text = (f"{first_n} of {total} {noun}{'s' if total != 1 else ''} "
            f"{decision_word(first_decision)}")
    text += "".join(f", {n} {decision_word(d)}" for d, n in items[1:])
    return text


def part_counts(part: BodyPartDecision) -> str:
    """The images of one body part by decision: ``"1 of 2 forearm images doubtful, 1 negative"``."""
    counts = [(d, part.count(d)) for d in SEVERITY_ORDER]
    return count_phrase(counts, len(part.image_decisions),
                        f"{body_part_name(part.body_part)} image")


def _review_findings(result: StudyResult) -> list[ImageFinding]:
    return [f for f in result.findings if f.decision is Decision.NEEDS_REVIEW]


def _conflicts(result: StudyResult) -> list[Refusal]:
    return [r for r in result.refusals if r.code is RefusalCode.BODY_PART_CONFLICT]


def _uncertain(result: StudyResult) -> list[Refusal]:
    return [r for r in result.refusals if r.code is RefusalCode.BODY_PART_UNCERTAIN]


def flagged(result: StudyResult) -> list[ImageFinding]:
    """Analysed images whose own decision is positive or doubtful, in reading order."""
    return [o for o in result.outcomes()
            if isinstance(o, ImageFinding) and o.decision in (Decision.POSITIVE, Decision.DOUBTFUL)]


def not_analysed_phrase(result: StudyResult) -> str:
    """``"2 images not analysed"`` or ``""``."""
    n = len(result.refusals)
    if not n:
        return ""
    return f"{n} instance{'s' if n != 1 else ''} not analysed"


def headline(result: StudyResult) -> tuple[str, str]:
    """(headline, sub-line) of the study: the PDF banner, the KOS and ``status``.

    The headline follows the study decision, which is never milder than the most
    severe image; the sub-line counts the images per body part and names the
    flagged ones.
    """
    what = study_finding(result)
    d = result.decision
    parts = [part_counts(p) for _, p in sorted(result.by_body_part.items())]
    mixed = len(study_findings(result)) > 1
    review = _review_findings(result)
    if review:
        parts.append(f"{len(review)} image{'s' if len(review) != 1 else ''} needing human "
                     "review (the AI gave no finite output)")
    uncertain = _uncertain(result)
    if uncertain:
        parts.append(f"{len(uncertain)} image{'s' if len(uncertain) != 1 else ''} needing "
                     "human review (body part uncertain)")
    conflicts = _conflicts(result)
    if conflicts:
        parts.append(f"{len(conflicts)} image{'s' if len(conflicts) != 1 else ''} whose "
                     "header names another body part than the AI saw (needs human review)")
    missing = not_analysed_phrase(result)
    if missing:
        parts.append(missing)
    counts = "; ".join(parts)
    named = flagged(result)
    where = ""
    if named:
        where = " Flagged: " + "; ".join(
            f"{image_name(f.meta)} ({decision_word(f.decision)}, "
            + (f"{finding_name(f.classifier)} " if mixed else "")
            + f"p = {probability_text(f.fracture_probability)})" for f in named) + "."
    if d is Decision.POSITIVE:
        return f"{_deciding(result, d).upper()} SUSPECTED", f"{counts}.{where}"
    if d is Decision.DOUBTFUL:
        return f"DOUBTFUL {_deciding(result, d).upper()} RESULT", f"{counts}.{where}"
    if d is Decision.NEEDS_REVIEW:
        return "NEEDS HUMAN REVIEW", f"{counts}. The AI gives no {what} answer for these images."
    if d is Decision.NEGATIVE:
        n = len(result.findings)
        return (f"NO {what.upper()} DETECTED",
                f"All {n} analysed image{'s' if n != 1 else ''} below the doubtful band: {counts}.")
    n = len(result.refusals)
    return ("NOT ANALYSED",
            f"None of the {n} instance{'s' if n != 1 else ''} of this study could be analysed "
            "by the AI (reasons below).")


def part_sentence(part: BodyPartDecision, what: str) -> str:
    """One body part of the study: mean probability, mean rule and the study decision;
    the probability named after the part's own model (else ``what``)."""
    if part.classifier is not None:
        what = part_finding(part)
    text = (f"{body_part_name(part.body_part).capitalize()}: {part_counts(part)}; mean {what} "
            f"probability {probability_text(part.probability)} (doubtful band "
            f"{band_text(part.doubt_band)}, mean rule: {decision_word(part.mean_decision)})")
    if part.decision is not part.mean_decision:
        text += (f"; study decision {decision_word(part.decision)}, because an image is "
                 f"{decision_word(part.decision)}")
    else:
        text += f"; study decision {decision_word(part.decision)}"
    return text + "."


def observation(result: StudyResult) -> tuple[str, list[str]]:
    """Observation paragraph and one bullet per instance, in reading order."""
    what = study_finding(result)
    n_img = len(result.findings)
    n_ref = len(result.refusals)
    bullets = [image_sentence(o) if isinstance(o, ImageFinding) else refusal_sentence(o)
               for o in result.outcomes()]
    if n_img == 0:
        return (f"No radiograph of this study could be analysed by the AI "
                f"({n_ref} instance{'s' if n_ref != 1 else ''} not analysed; reasons below)."), bullets
    summary = (f"{n_img} radiograph{'s' if n_img != 1 else ''} of this study "
               f"{'were' if n_img != 1 else 'was'} analysed by the AI")
    if n_ref:
        summary += f"; {n_ref} instance{'s' if n_ref != 1 else ''} could not be analysed"
    summary += ". "
    summary += " ".join(part_sentence(p, what) for _, p in sorted(result.by_body_part.items()))
    summary += (" Heat maps show where the classifier looked (Grad-CAM); they are shown only "
                f"for positive or doubtful images and do not outline {article(what)} {what}.")
    return summary, bullets


def recommendation(result: StudyResult) -> str:
    """The recommendation for the study decision."""
    what = study_finding(result)
    n = len(result.findings)
    return {
        Decision.POSITIVE: (
            "Radiologist review of the flagged images is recommended with priority. "
            f"Correlate with the clinical findings; consider further views or follow-up "
            f"imaging if the {_deciding(result, Decision.POSITIVE)} is not confirmed."
        ),
        Decision.DOUBTFUL: (
            "At least one image is close to the operating threshold. A careful radiologist "
            "review of the flagged images is recommended; consider additional views or "
            "clinical follow-up."
        ),
        Decision.NEEDS_REVIEW: (
            "The AI could not reach a confident answer. The study requires a standard "
            "radiologist read without reliance on this result."
        ),
        Decision.NEGATIVE: (
            f"No {what} was detected by the AI in the {n} analysed image{'s' if n != 1 else ''}. "
            f"This does not exclude {article(what)} {what}: the study still requires the usual radiologist "
            "read, in particular for subtle or non-displaced fractures and for images the "
            "AI did not analyse."
        ),
        Decision.NOT_ANALYSED: (
            "The AI did not analyse this study. It requires the usual radiologist read."
        ),
    }[result.decision]


def key_object_description(result: StudyResult) -> str:
    """Key Object Description of the KOS (64 characters are not a limit here: UT)."""
    what = study_finding(result)
    title, _ = headline(result)
    return (f"{title.capitalize()}: images with a positive or doubtful AI {what} finding "
            f"and their heat maps. {NOT_FOR_DIAGNOSTIC_USE}.")


def outcome_record(outcome: ImageFinding | Refusal) -> tuple[str, str]:
    """(state, text) of one instance for the job database and ``status``."""
    if isinstance(outcome, ImageFinding):
        return "analysed", f"{outcome.decision.value}: {image_decision_text(outcome)}"
    return "refused", f"{outcome.code.value}: {refusal_reason(outcome)}"


def model_role(model: ModelInfo) -> str:
    """``"body-part router"`` or ``"fracture classifier"`` / ``"abnormality classifier"``."""
    if model.finding in ("fracture", "abnormality"):
        return f"{model.finding} classifier"
    return "body-part router"


def architecture_name(model: ModelInfo) -> str:
    """The architecture without training-pipeline detail (``"MobileNetV2"``)."""
    return model.architecture.split("(")[0].split(",")[0].strip() or model.architecture
