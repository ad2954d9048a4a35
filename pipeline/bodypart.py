"""The DICOM header's body part, as a cross-check on the router.

The header names a body part in Body Part Examined (0018,0015); where that is blank or
generic (``EXTREMITY``), in the Anatomic Region Sequence (0008,2218) code meaning, the
Series and Study Description and the Protocol Name.  :func:`header_body_part` reads them
in that order and returns the router classes that agree with the first one that names a
part (:class:`HeaderBodyPart`); :mod:`pipeline.classify` refuses an image whose router
answer is not among them ("needs human review: body part disagrees with the header").

The keyword tables are data, in ``bodypart_keywords.toml`` beside this module.
"""

from __future__ import annotations

import functools
import logging
import pathlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.result import ImageMetadata

logger = logging.getLogger(__name__)

KEYWORDS_PATH = pathlib.Path(__file__).with_name("bodypart_keywords.toml")


@dataclass(frozen=True)
class KeywordTable:
    """The parsed keyword file.

    Attributes
    ----------
    terms
        Upper-case phrase (words separated by one space) -> router classes that agree.
    generic
        Body Part Examined values that name no particular part.
    top_k, min_probability
        How far down the router's answers the header's part may be taken from.
    """

    terms: Mapping[str, frozenset[str]]
    generic: frozenset[str]
    top_k: int
    min_probability: float


@dataclass(frozen=True)
class HeaderBodyPart:
    """What the header says about the body part.

    Attributes
    ----------
    parts
        Router classes that agree with the header.
    source
        The attribute that named it (``BodyPartExamined``, ``SeriesDescription``, ...).
    terms
        The keywords found (upper case).
    """

    parts: frozenset[str]
    source: str
    terms: tuple[str, ...]

    def describe(self) -> str:
        """A short text for notes: ``StudyDescription 'TIBIA' -> LEG``."""
        return f"{self.source} {'/'.join(self.terms)} -> {', '.join(sorted(self.parts))}"


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^A-Z0-9]+", " ", text.upper()).split())


def parse_keywords(data: Mapping[str, object]) -> KeywordTable:
    """Build a :class:`KeywordTable` from the parsed TOML ``data`` (validated)."""
    raw_terms = data.get("terms")
    if not isinstance(raw_terms, Mapping) or not raw_terms:
        raise ValueError("keyword file needs a non-empty [terms] table")
    terms: dict[str, frozenset[str]] = {}
    for name, parts in raw_terms.items():
        if not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
            raise ValueError(f"terms.{name} must be a non-empty list of router classes")
        terms[_normalise(name.replace("_", " "))] = frozenset(p.upper() for p in parts)
    generic = data.get("generic", [])
    if not isinstance(generic, list):
        raise ValueError("generic must be a list")
    top_k = int(data.get("top_k", 2))  # type: ignore[call-overload]
    min_p = float(data.get("min_probability", 0.1))  # type: ignore[arg-type]
    if top_k < 1 or not 0.0 <= min_p <= 1.0:
        raise ValueError("top_k must be >= 1 and min_probability in [0, 1]")
    return KeywordTable(terms, frozenset(_normalise(str(g)) for g in generic), top_k, min_p)


@functools.lru_cache(maxsize=4)
def load_keywords(path: pathlib.Path = KEYWORDS_PATH) -> KeywordTable:
    """Read and parse a keyword file (cached)."""
    with path.open("rb") as fh:
        return parse_keywords(tomllib.load(fh))


def find_terms(text: str, table: KeywordTable) -> tuple[str, ...]:
    """Keywords of ``table`` in ``text`` (whole words, longest phrase first, no overlaps)."""
    words = _normalise(text).split()
    found: list[str] = []
    longest = max(len(t.split()) for t in table.terms)
    i = 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            phrase = " ".join(words[i : i + n])
            if phrase in table.terms:
                found.append(phrase)
                i += n
                break
        else:
            i += 1
    return tuple(dict.fromkeys(found))


def _from_text(text: str, source: str, table: KeywordTable) -> HeaderBodyPart | None:
    terms = find_terms(text, table)
    if not terms:
        return None
    parts = frozenset().union(*(table.terms[t] for t in terms))
    return HeaderBodyPart(parts, source, terms)


def header_body_part(meta: ImageMetadata, table: KeywordTable | None = None) -> HeaderBodyPart | None:
    """The body part the header names, or ``None`` when it names none.

    Body Part Examined decides when it is specific; when it is blank, generic or
    unknown to the table, the Anatomic Region Sequence code meaning, the Series
    Description, the Study Description and the Protocol Name are searched, in that order.
    """
    table = table or load_keywords()
    bpe = _normalise(meta.body_part_examined)
    if bpe and bpe not in table.generic:
        found = _from_text(bpe, "BodyPartExamined", table)
        if found is None and bpe.replace(" ", "") in table.terms:
            found = HeaderBodyPart(table.terms[bpe.replace(" ", "")], "BodyPartExamined", (bpe,))
        if found is not None:
            return found
    for source, text in (("AnatomicRegionSequence", meta.anatomic_region),
                         ("SeriesDescription", meta.series_description),
                         ("StudyDescription", meta.study_description),
                         ("ProtocolName", meta.protocol_name)):
        if text:
            found = _from_text(text, source, table)
            if found is not None:
                return found
    return None


def body_part_agrees(body_part_examined: str, router_part: str, table: KeywordTable | None = None) -> bool:
    """Whether a Body Part Examined value is compatible with the router's answer.

    Blank, generic and unknown values agree with everything (they say nothing).
    """
    table = table or load_keywords()
    meta_parts = header_body_part(
        ImageMetadata(study_instance_uid="", series_instance_uid="", sop_instance_uid="", sop_class_uid="",
                      body_part_examined=body_part_examined), table)
    return meta_parts is None or router_part.upper() in meta_parts.parts
