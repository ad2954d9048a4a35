"""What the DICOM header says about the body part, as a cross-check that can stop a
wrong router answer.

The keyword tables are data (``bodypart_keywords.toml`` beside this file).  The header
is read in order of specificity: Body Part Examined (0018,0015); when it is blank or
generic (``EXTREMITY``), the Anatomic Region Sequence (0008,2218) code meaning, Series
Description (0008,103E), Protocol Name (0018,1030) and Study Description (0008,1030).
The first of these that names a region decides; several regions named by one
attribute ("XR FOREARM AND WRIST") are all accepted.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.result import ImageMetadata

KEYWORDS_FILE = Path(__file__).with_name("bodypart_keywords.toml")


@dataclass(frozen=True)
class Region:
    """One region the header can name."""

    name: str
    keywords: tuple[str, ...]
    agrees: frozenset[str]
    """Router classes compatible with the region."""
    analyse_as: str = ""
    """The body part to analyse the image as when the router has it among its top
    answers (``""``: never re-assigned)."""


@dataclass(frozen=True)
class HeaderBodyPart:
    """The regions the header names and where it says so."""

    regions: tuple[Region, ...]
    attribute: str
    """DICOM keyword the regions were read from (``"StudyDescription"``)."""
    text: str
    """That attribute's value."""

    def agrees_with(self, router_part: str) -> bool:
        """Whether the router's answer is compatible with any named region."""
        return any(router_part in r.agrees for r in self.regions)

    @property
    def label(self) -> str:
        """Readable names of the regions: ``"lower limb"``."""
        return " or ".join(r.name.replace("_", " ").lower() for r in self.regions)


@dataclass(frozen=True)
class KeywordTable:
    """The parsed keyword file."""

    regions: tuple[Region, ...]
    generic: frozenset[str]
    pattern: re.Pattern[str]
    by_keyword: dict[str, Region]


@functools.lru_cache(maxsize=4)
def load_keywords(path: Path = KEYWORDS_FILE) -> KeywordTable:
    """Read the keyword table (once per path)."""
    raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    regions = tuple(
        Region(name=name, keywords=tuple(k.upper() for k in spec["keywords"]),
               agrees=frozenset(a.upper() for a in spec["agrees"]),
               analyse_as=str(spec.get("analyse_as", "")).upper())
        for name, spec in raw["regions"].items()
    )
    by_keyword: dict[str, Region] = {}
    for region in regions:
        for keyword in region.keywords:
            if keyword in by_keyword and by_keyword[keyword] is not region:
                raise ValueError(f"{path}: keyword {keyword!r} is in two regions")
            by_keyword[keyword] = region
    words = sorted(by_keyword, key=len, reverse=True)
    pattern = re.compile(r"(?<![A-Z0-9])(" + "|".join(re.escape(w) for w in words) + r")(?![A-Z0-9])")
    return KeywordTable(regions, frozenset(g.upper() for g in raw.get("generic", [])), pattern,
                        by_keyword)


def _normalise(text: str) -> str:
    return re.sub(r"[\s_^\-/,.;:()]+", " ", text.upper()).strip()


def regions_in(text: str, table: KeywordTable | None = None) -> tuple[Region, ...]:
    """Regions named in ``text`` (whole words, longest keyword first)."""
    table = table or load_keywords()
    found: dict[str, Region] = {}
    for match in table.pattern.finditer(_normalise(text)):
        region = table.by_keyword[match.group(1)]
        found.setdefault(region.name, region)
    return tuple(found.values())


def header_body_part(meta: ImageMetadata, table: KeywordTable | None = None) -> HeaderBodyPart | None:
    """What the header of ``meta`` says about the body part, or ``None`` if nothing."""
    table = table or load_keywords()
    sources: Sequence[tuple[str, str]] = (
        ("BodyPartExamined", meta.body_part_examined),
        ("AnatomicRegionSequence", meta.anatomic_region),
        ("SeriesDescription", meta.series_description),
        ("ProtocolName", meta.protocol_name),
        ("StudyDescription", meta.study_description),
    )
    for attribute, value in sources:
        text = (value or "").strip()
        if not text or _normalise(text) in table.generic:
            continue
        regions = regions_in(text, table)
        if regions:
            return HeaderBodyPart(regions, attribute, text)
    return None


def reassignment(header: HeaderBodyPart, ranked: Sequence[str], supported: Sequence[str],
                 top: int = 2) -> str | None:
    """The supported part the header names, if the router ranks it in its ``top``
    answers; else ``None``."""
    candidates = {r.analyse_as for r in header.regions if r.analyse_as in supported}
    for part in ranked[:top]:
        if part in candidates:
            return part
    return None
