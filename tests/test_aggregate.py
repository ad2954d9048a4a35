"""Study-level aggregation: MURA's mean rule per body part, three-state decisions,
and the worst-case study answer."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.aggregate import aggregate_study, decide, worst
from pipeline.result import (
    Decision,
    GridTransform,
    ImageFinding,
    ImageMetadata,
    ModelInfo,
    NormalisedImage,
    Refusal,
    RefusalCode,
)

MODEL = ModelInfo("m", "1", "MobileNetV2", "0" * 64, "1.2.3")


def _finding(part: str, p: float, decision: Decision | None = None, uid: str = "1.2") -> ImageFinding:
    meta = ImageMetadata("1.1", "1.1.1", uid, "1.2.840.10008.5.1.4.1.1.1")
    image = NormalisedImage(meta, np.zeros((8, 8), np.float32), (8, 8))
    band = (0.4, 0.6)
    return ImageFinding(
        image=image, transform=GridTransform(8, 1.0, 0, 0, (8, 8)), body_part=part,
        body_part_probability=0.99, body_part_probabilities={part: 0.99},
        fracture_probability=p, threshold=0.5, doubt_band=band,
        decision=decision or decide(p, band), heatmap=np.zeros((8, 8), np.float32),
        router=MODEL, classifier=MODEL)


@pytest.mark.parametrize(("p", "expected"), [(0.39, Decision.NEGATIVE), (0.4, Decision.DOUBTFUL),
                                             (0.59, Decision.DOUBTFUL), (0.6, Decision.POSITIVE)])
def test_three_state_decision_edges(p: float, expected: Decision) -> None:
    assert decide(p, (0.4, 0.6)) is expected


def test_mean_per_body_part_and_worst_study_answer() -> None:
    outcomes = [
        _finding("FOREARM", 0.9, uid="1.1"), _finding("FOREARM", 0.5, uid="1.2"),  # mean 0.7
        _finding("HUMERUS", 0.1, uid="1.3"),
        Refusal(ImageMetadata("1.1", "1.1.2", "1.4", "1.2.840.10008.5.1.4.1.1.1"),
                RefusalCode.UNSUPPORTED_BODY_PART, "unsupported body part: KNEE"),
    ]
    result = aggregate_study("1.1", outcomes)
    assert result.by_body_part["FOREARM"].probability == pytest.approx(0.7)
    assert result.by_body_part["FOREARM"].decision is Decision.POSITIVE
    assert result.by_body_part["HUMERUS"].decision is Decision.NEGATIVE
    assert result.decision is Decision.POSITIVE
    assert len(result.refusals) == 1 and len(result.findings) == 3


def test_needs_review_images_stay_out_of_the_mean() -> None:
    result = aggregate_study("1.1", [_finding("FOREARM", 0.1, uid="1.1"),
                                     _finding("FOREARM", 0.99, Decision.NEEDS_REVIEW, uid="1.2")])
    assert result.by_body_part["FOREARM"].probability == pytest.approx(0.1)
    assert result.decision is Decision.NEEDS_REVIEW


def test_nothing_analysed() -> None:
    assert aggregate_study("1.1", []).decision is Decision.NOT_ANALYSED
    assert worst([]) is Decision.NOT_ANALYSED
