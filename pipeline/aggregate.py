"""Study-level aggregation of the image findings.

MURA labels studies, not images, and its validated rule is the mean of the image
probabilities; we keep that mean as the study *probability* of each body part (a
study may hold a wrist and a forearm) and compare it with the part's operating
threshold and doubt band (the *mean decision*).  The study *decision* of a part is
never less severe than the most severe decision of its images: one positive view
makes the part positive and one doubtful view at least doubtful, whatever normal
views are added to the study.  Adding a normal second view can therefore never turn
a suspicious study into a negative one (it could under the plain mean: 0.70 and 0.41
average to 0.55, below a 0.56 doubt band).  ``scripts/eval_study_rule.py`` measures
both rules on the validation split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.result import (
    BodyPartDecision,
    Decision,
    ImageFinding,
    ModelInfo,
    Refusal,
    RefusalCode,
    StudyResult,
)

#: Worst first: the study answer is the worst of its parts.
SEVERITY = (
    Decision.POSITIVE,
    Decision.DOUBTFUL,
    Decision.NEEDS_REVIEW,
    Decision.NEGATIVE,
    Decision.NOT_ANALYSED,
)


def decide(probability: float, doubt_band: tuple[float, float]) -> Decision:
    """Three-state answer: positive at or above the band, negative below it,
    doubtful inside it."""
    low, high = doubt_band
    if probability >= high:
        return Decision.POSITIVE
    if probability < low:
        return Decision.NEGATIVE
    return Decision.DOUBTFUL


def worst(decisions: Sequence[Decision]) -> Decision:
    """The most severe decision (positive > doubtful > needs-review > negative >
    not-analysed)."""
    if not decisions:
        return Decision.NOT_ANALYSED
    return min(decisions, key=SEVERITY.index)


def part_decision(probabilities: Sequence[float], image_decisions: Sequence[Decision],
                  doubt_band: tuple[float, float]) -> tuple[float, Decision, Decision]:
    """(mean probability, mean decision, study decision) of one body part.

    The study decision is the worst of the mean rule's decision and the images' own
    decisions (see the module docstring)."""
    mean = float(np.mean(probabilities))
    by_mean = decide(mean, doubt_band)
    return mean, by_mean, worst([by_mean, *image_decisions])


def needs_review(findings: Sequence[ImageFinding], refusals: Sequence[Refusal]) -> bool:
    """Whether a study needs human review for a reason no body part's decision carries:
    an image without a finite output, or one whose body part the router is not sure of
    (``body-part-uncertain``) or the header contradicts (``body-part-conflict``)."""
    return any(f.decision is Decision.NEEDS_REVIEW for f in findings) or any(
        r.code in (RefusalCode.BODY_PART_CONFLICT, RefusalCode.BODY_PART_UNCERTAIN)
        for r in refusals)


def aggregate_study(
    study_instance_uid: str,
    outcomes: Sequence[ImageFinding | Refusal],
    models: tuple[ModelInfo, ...] = (),
) -> StudyResult:
    """Combine the per-image outcomes of one study.

    Findings without a decision (``needs-review``: a classifier output that was not
    finite) do not enter a body part's mean; they make the study ``needs-review``
    unless another part is positive or doubtful; so does an image whose header
    contradicts the router (``body-part-conflict``) or whose body part the router is
    not sure of (``body-part-uncertain``).
    """
    findings = tuple(o for o in outcomes if isinstance(o, ImageFinding))
    refusals = tuple(o for o in outcomes if isinstance(o, Refusal))
    by_part: dict[str, list[ImageFinding]] = {}
    for finding in findings:
        if finding.decision is Decision.NEEDS_REVIEW:
            continue
        by_part.setdefault(finding.body_part, []).append(finding)
    parts: dict[str, BodyPartDecision] = {}
    for part, items in sorted(by_part.items()):
        band = items[0].doubt_band
        mean, by_mean, decision = part_decision(
            [f.fracture_probability for f in items], [f.decision for f in items], band)
        parts[part] = BodyPartDecision(
            body_part=part,
            probability=mean,
            threshold=items[0].threshold,
            doubt_band=band,
            decision=decision,
            sop_instance_uids=tuple(f.meta.sop_instance_uid for f in items),
            mean_decision=by_mean,
            image_decisions={f.meta.sop_instance_uid: f.decision for f in items},
            classifier=items[0].classifier,
        )
    decisions = [p.decision for p in parts.values()]
    if needs_review(findings, refusals):
        decisions.append(Decision.NEEDS_REVIEW)
    if not models and findings:
        models = (findings[0].router, findings[0].classifier)
    # a head (the abnormality head) decides some parts from the classifier's features:
    # the study's models are then the router, the classifier and the heads it used
    models = tuple(dict.fromkeys([*models, *(f.classifier for f in findings)]))
    return StudyResult(
        study_instance_uid=study_instance_uid,
        findings=findings,
        refusals=refusals,
        by_body_part=parts,
        models=models,
        decision=worst(decisions),
    )
