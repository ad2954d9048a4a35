"""The header body-part cross-check (:mod:`pipeline.bodypart` and ``Analyser._decide``):
keyword tables read from data, header variants, and the demo's distal tibia, which must
never be analysed as an upper limb."""

from __future__ import annotations

import dataclasses

import pydicom
import pytest

from conftest import ROOT
from pipeline.bodypart import (
    body_part_agrees,
    find_terms,
    header_body_part,
    load_keywords,
    parse_keywords,
)
from pipeline.classify import Analyser
from pipeline.normalise import load_image
from pipeline.result import ImageFinding, ImageMetadata, NormalisedImage, Refusal, RefusalCode
from pipeline.validate import read_metadata

TIBIA = ROOT / "demo" / "study" / "tibia_rg3_j2k.dcm"
REGISTRY = ROOT / "models" / "registry.toml"
UPPER_LIMB = {"FINGER", "HAND", "WRIST", "FOREARM", "ELBOW", "HUMERUS", "SHOULDER"}


def _meta(**kw: str) -> ImageMetadata:
    return ImageMetadata("1.2.3", "1.2.3.1", "1.2.3.1.1", "1.2.840.10008.5.1.4.1.1.1", modality="CR", **kw)


@pytest.mark.parametrize(
    ("bpe", "expected"),
    [
        ("LEG", {"LEG"}), ("LOWER LEG", {"LEG"}), ("LOWERLEG", {"LEG"}), ("TIBIA", {"LEG"}),
        ("ANKLE", {"LEG"}), ("KNEE", {"LEG"}), ("FOOT", {"LEG"}), ("HIP", {"HIP"}),
        ("HAND", {"HAND", "FINGER", "WRIST"}), ("FINGER", {"FINGER", "HAND"}),
        ("SHOULDER", {"SHOULDER", "HUMERUS"}), ("ARM", {"HUMERUS", "FOREARM", "ELBOW", "WRIST"}),
        ("UPPER ARM", {"HUMERUS", "SHOULDER", "ELBOW"}), ("CHEST", {"OTHER"}),
    ],
)
def test_body_part_examined_variants(bpe: str, expected: set[str]) -> None:
    found = header_body_part(_meta(body_part_examined=bpe))
    assert found is not None and found.parts == expected and found.source == "BodyPartExamined"


def test_generic_or_blank_body_part_falls_back_to_the_free_text() -> None:
    meta = _meta(body_part_examined="EXTREMITY", study_description="Non-ossifying fibroma of distal tibia")
    found = header_body_part(meta)
    assert found is not None and found.parts == {"LEG"} and found.source == "StudyDescription"
    assert header_body_part(_meta(series_description="XR TIBIA FIBULA 2 VIEWS")).parts == {"LEG"}
    assert header_body_part(_meta(protocol_name="XR KNEE LT")).parts == {"LEG"}
    assert header_body_part(_meta(anatomic_region="Wrist joint")).parts == {"WRIST", "HAND", "FOREARM"}
    assert header_body_part(_meta(body_part_examined="EXTREMITY")) is None
    assert header_body_part(_meta()) is None
    # Body Part Examined, when specific, wins over the descriptions
    assert header_body_part(_meta(body_part_examined="KNEE", study_description="XR HAND")).parts == {"LEG"}


def test_phrases_match_whole_words_longest_first() -> None:
    table = load_keywords()
    assert find_terms("XR LOWER LEG RT", table) == ("LOWER LEG",)
    assert find_terms("R/L-Wrist & hand", table) == ("WRIST", "HAND")
    assert find_terms("ARMAMENTARIUM HIPPO", table) == ()  # no partial words


def test_agreement_of_body_part_examined_with_the_router() -> None:
    assert body_part_agrees("ARM", "FOREARM") and body_part_agrees("KNEE", "LEG")
    assert not body_part_agrees("KNEE", "FOREARM") and not body_part_agrees("LOWER LEG", "HUMERUS")
    assert body_part_agrees("", "FOREARM") and body_part_agrees("EXTREMITY", "FOREARM")


def test_a_keyword_file_is_validated() -> None:
    with pytest.raises(ValueError):
        parse_keywords({"terms": {}})
    with pytest.raises(ValueError):
        parse_keywords({"terms": {"KNEE": "LEG"}})
    table = parse_keywords({"terms": {"LOWER_LEG": ["leg"]}, "generic": ["extremity"]})
    assert table.terms == {"LOWER LEG": frozenset({"LEG"})} and table.generic == {"EXTREMITY"}


def test_metadata_reads_protocol_name_and_anatomic_region() -> None:
    ds = pydicom.dcmread(TIBIA)
    ds.ProtocolName = "XR TIB FIB"
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-12402", "SRT", "Tibia"
    ds.AnatomicRegionSequence = pydicom.Sequence([item])
    meta = read_metadata(ds)
    assert meta.protocol_name == "XR TIB FIB" and meta.anatomic_region == "Tibia"


@pytest.fixture(scope="module")
def analyser() -> Analyser:
    return Analyser.load(REGISTRY, "bodypart-router", "fracture-classifier")


@pytest.fixture(scope="module")
def tibia() -> NormalisedImage:
    image = load_image(pydicom.dcmread(TIBIA))
    assert isinstance(image, NormalisedImage)
    assert image.meta.body_part_examined == "EXTREMITY"
    return image


@pytest.mark.parametrize(
    "bpe", ["", "EXTREMITY", "LEG", "LOWER LEG", "TIBIA", "ANKLE", "KNEE", "HAND", "FINGER", "SHOULDER", "ARM"]
)
def test_the_demo_tibia_is_never_analysed_as_an_upper_limb(analyser: Analyser, tibia: NormalisedImage,
                                                         bpe: str) -> None:
    image = dataclasses.replace(tibia, meta=dataclasses.replace(tibia.meta, body_part_examined=bpe))
    (outcome,) = analyser.analyse([image])
    if isinstance(outcome, ImageFinding):
        assert outcome.body_part not in UPPER_LIMB, outcome.notes
    else:
        assert isinstance(outcome, Refusal) and outcome.code is RefusalCode.UNSUPPORTED_BODY_PART


def test_a_lower_limb_header_stops_an_upper_limb_answer(analyser: Analyser, tibia: NormalisedImage) -> None:
    """Whatever the router says, a KNEE header and an upper-limb answer are never analysed together."""
    image = dataclasses.replace(tibia, meta=dataclasses.replace(tibia.meta, body_part_examined="KNEE"))
    (outcome,) = analyser.analyse([image])
    assert not (isinstance(outcome, ImageFinding) and outcome.body_part in UPPER_LIMB)
    if isinstance(outcome, Refusal) and "header" in outcome.text:
        assert outcome.text.startswith("needs human review: body part disagrees with the header")
