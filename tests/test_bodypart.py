"""The header as a cross-check of the router (pipeline/bodypart.py): keyword tables
in a data file, and the real models on the demo's distal tibia under header variants."""

from __future__ import annotations

from dataclasses import replace

import pydicom
import pytest

from conftest import ROOT
from pipeline.bodypart import header_body_part, load_keywords, reassignment, regions_in
from pipeline.result import ImageFinding, ImageMetadata, Refusal, RefusalCode

TIBIA = ROOT / "demo" / "studies" / "tibia" / "tibia_rg3_j2k.dcm"


def _meta(**kw: str) -> ImageMetadata:
    return replace(ImageMetadata("1.2", "1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.1"), **kw)


@pytest.mark.parametrize(("text", "region"), [
    ("LEG", "LOWER_LIMB"), ("LOWER LEG", "LOWER_LIMB"), ("TIBIA", "LOWER_LIMB"),
    ("ANKLE", "LOWER_LIMB"), ("KNEE", "LOWER_LIMB"), ("XR TIBIA FIBULA", "LOWER_LIMB"),
    ("Non-ossifying fibroma of distal tibia", "LOWER_LIMB"), ("HAND", "HAND"),
    ("FINGER", "FINGER"), ("SHOULDER", "SHOULDER"), ("ARM", "ARM"), ("HIP JOINT", "HIP_PELVIS"),
    ("XR Distal radius", "WRIST"), ("LOWER_LEG", "LOWER_LIMB"),
])
def test_keywords_name_the_region(text: str, region: str) -> None:
    assert [r.name for r in regions_in(text)] == [region]


def test_words_are_whole_words_and_generic_terms_say_nothing() -> None:
    assert regions_in("HANDLING") == ()
    assert regions_in("ARMOUR") == ()
    assert header_body_part(_meta(body_part_examined="EXTREMITY")) is None
    assert header_body_part(_meta()) is None


def test_body_part_examined_first_then_the_descriptions() -> None:
    h = header_body_part(_meta(body_part_examined="EXTREMITY", series_description="Knee AP",
                               study_description="XR HAND"))
    assert h is not None and h.attribute == "SeriesDescription" and h.label == "lower limb"
    h = header_body_part(_meta(body_part_examined="HAND", study_description="XR KNEE"))
    assert h is not None and h.attribute == "BodyPartExamined" and h.agrees_with("WRIST")
    h = header_body_part(_meta(study_description="XR FOREARM AND WRIST"))
    assert h is not None and h.agrees_with("HAND") and h.agrees_with("ELBOW")
    assert not h.agrees_with("KNEE")


def test_reassignment_only_to_a_supported_part_in_the_router_s_top_answers() -> None:
    h = header_body_part(_meta(body_part_examined="HUMERUS"))
    assert h is not None
    assert reassignment(h, ["WRIST", "HUMERUS", "OTHER"], ["FOREARM", "HUMERUS"]) == "HUMERUS"
    assert reassignment(h, ["WRIST", "OTHER", "HUMERUS"], ["FOREARM", "HUMERUS"]) is None
    assert reassignment(h, ["WRIST", "HUMERUS"], ["FOREARM"]) is None


def test_the_table_is_consistent() -> None:
    table = load_keywords()
    assert len(table.by_keyword) == sum(len(r.keywords) for r in table.regions)
    for region in table.regions:
        assert not region.analyse_as or region.analyse_as in region.agrees


@pytest.fixture(scope="module")
def analyser():  # type: ignore[no-untyped-def]
    from pipeline.classify import Analyser

    return Analyser.load(ROOT / "models" / "registry.toml", "bodypart-router", "fracture-classifier")


def _tibia(**tags: str) -> object:
    from pipeline.normalise import prepare

    ds = pydicom.dcmread(TIBIA)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return prepare(ds)


@pytest.mark.parametrize("tags", [
    {},  # as shipped: Body Part Examined EXTREMITY, the study description names the tibia
    {"BodyPartExamined": "LEG"}, {"BodyPartExamined": "TIBIA"}, {"BodyPartExamined": "KNEE"},
    {"BodyPartExamined": "ANKLE"}, {"BodyPartExamined": "FOOT"},
    {"BodyPartExamined": "", "StudyDescription": "XR TIBIA FIBULA"},
    {"BodyPartExamined": "EXTREMITY", "StudyDescription": "XR KNEE"},
    {"BodyPartExamined": "", "StudyDescription": "", "SeriesDescription": "LOWER LEG 2 VIEWS"},
    {"BodyPartExamined": "HAND"}, {"BodyPartExamined": "FINGER"}, {"BodyPartExamined": "SHOULDER"},
])
def test_the_demo_tibia_is_never_analysed_as_an_upper_limb(analyser, tags: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    """Analysed as the lower limb it is (where the classifier supports LEG), refused as
    unsupported, or held for review when the header contradicts the router: never an
    upper-limb part."""
    [outcome] = analyser.analyse([_tibia(**tags)])
    if isinstance(outcome, Refusal):
        assert outcome.code in (RefusalCode.BODY_PART_CONFLICT, RefusalCode.UNSUPPORTED_BODY_PART)
        if outcome.code is RefusalCode.BODY_PART_CONFLICT:
            assert "needs human review" in outcome.text
    else:
        assert outcome.body_part == "LEG", (tags, outcome.body_part)
        assert "LEG" in analyser.classifier_entry.supported_body_parts


def test_agreeing_and_contradicting_headers_with_router_2(analyser) -> None:  # type: ignore[no-untyped-def]
    """Router 2.x sees a leg in the demo tibia (2.1.0: LEG p = 0.96 with no header help).
    A header that agrees (LEG) leaves the router's answer: analysed as the leg where the
    classifier supports it, else refused as an unsupported part; one naming the upper
    limb (ARM) contradicts it: needs human review, analysed as neither."""
    leg_supported = "LEG" in analyser.classifier_entry.supported_body_parts
    for tags in ({"BodyPartExamined": "", "StudyDescription": "", "SeriesDescription": ""},
                 {"BodyPartExamined": "LEG"}):
        [outcome] = analyser.analyse([_tibia(**tags)])
        assert outcome.body_part == "LEG"
        if leg_supported:
            assert isinstance(outcome, ImageFinding), (tags, outcome)
        else:
            assert isinstance(outcome, Refusal) and outcome.code is RefusalCode.UNSUPPORTED_BODY_PART
    [contra] = analyser.analyse([_tibia(BodyPartExamined="ARM", StudyDescription="XR ARM")])
    assert isinstance(contra, Refusal) and contra.code is RefusalCode.BODY_PART_CONFLICT
    assert contra.body_part == "LEG" and contra.header.startswith("arm")


# -- the router's answer below its confidence floor (pipeline.classify.router_answer) ----


def _p(**named: float) -> "object":
    import numpy as np

    from models.training.data import ROUTER_CLASSES

    q = np.full(len(ROUTER_CLASSES), 0.0)
    for part, value in named.items():
        q[ROUTER_CLASSES.index(part)] = value
    rest = [i for i, c in enumerate(ROUTER_CLASSES) if c not in named]
    q[rest] = (1.0 - sum(named.values())) / len(rest)
    return q


def test_below_the_floor_the_family_or_nothing() -> None:
    """A part is named at or above the floor; below it, its family when the family's
    parts together reach the floor (a finger or a wrist: the upper limb), else nothing:
    a single-part family (the leg) is that part, and OTHER is always OTHER."""
    from models.registry import load_registry
    from models.training.data import ROUTER_CLASSES
    from pipeline.classify import UNCERTAIN, router_answer

    entry = load_registry(ROOT / "models" / "registry.toml").get("fracture-classifier")
    families, classes = entry.families, ROUTER_CLASSES
    assert router_answer(_p(WRIST=0.55, FINGER=0.40), classes, families, 0.5).part == "WRIST"
    answer = router_answer(_p(WRIST=0.48, FINGER=0.41), classes, families, 0.5)
    assert (answer.part, answer.top) == ("UPPER_LIMB", "WRIST")
    assert answer.probability >= 0.89
    assert router_answer(_p(WRIST=0.30, LEG=0.29, HIP=0.28), classes, families, 0.5).part == UNCERTAIN
    assert router_answer(_p(LEG=0.45, HIP=0.40), classes, families, 0.5).part == UNCERTAIN
    assert router_answer(_p(OTHER=0.35, HIP=0.30), classes, families, 0.5).part == "OTHER"
    # arm and shoulder together: a family the classifier does not analyse
    assert router_answer(_p(HUMERUS=0.45, SHOULDER=0.40), classes, families, 0.5).part == "ARM_SHOULDER"
    assert "UPPER_LIMB" in entry.supported_answers and "ARM_SHOULDER" not in entry.supported_answers
    assert entry.operating_point("UPPER_LIMB") == entry.operating_point("WRIST")


def test_the_node_analyses_a_sure_family_and_refuses_an_unsure_part(analyser) -> None:  # type: ignore[no-untyped-def]
    """Through the Analyser's own routing: a wrist-or-finger answer below the floor is
    analysed with the finding site the upper limb (SNOMED CT 53120007) and the wrist's
    operating point, and says why; an answer sure of nothing is refused for review."""
    import numpy as np

    from dicom_out.common import body_part_code
    from pipeline.classify import _Route

    image = _tibia(BodyPartExamined="", StudyDescription="", SeriesDescription="")
    family = analyser._route(image, _p(WRIST=0.48, FINGER=0.41), _p(WRIST=0.48, FINGER=0.41), 1)
    assert isinstance(family, _Route) and family.part == "UPPER_LIMB"
    assert any("finding site the upper limb" in note for note in family.notes)
    finding = analyser._classified(image, None, family, 0.8, np.zeros((20, 20), np.float32))
    assert finding.body_part == "UPPER_LIMB" and finding.decision.value == "positive"
    assert finding.threshold == analyser.classifier_entry.operating_point("WRIST").threshold
    assert body_part_code("UPPER_LIMB").value == "53120007"
    unsure = analyser._route(image, _p(WRIST=0.30, LEG=0.29, HIP=0.28),
                             _p(WRIST=0.30, LEG=0.29, HIP=0.28), 1)
    assert isinstance(unsure, Refusal) and unsure.code is RefusalCode.BODY_PART_UNCERTAIN
    assert unsure.text.startswith("needs human review: the router is not sure of the body part")
