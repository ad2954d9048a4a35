"""Shared parts of the result-object builders (``sc.py``, ``sr.py``, ``pdf.py``).

Everything that two builders would otherwise write twice lives here:

* :class:`OutputSettings` - series numbers/descriptions and equipment identity of
  the objects fracture-node writes;
* :func:`output_uid` - deterministic UIDs, so reprocessing an image yields the same
  objects instead of duplicates (PS3.5 9.1, pydicom ``generate_uid``), and the
  per-study series and instance UIDs derived from it (:func:`study_series_uid`,
  :func:`study_output_uid`);
* :func:`device_observer` - the node as observer of its SR documents;
* :func:`copy_patient_study` - exact copy of the Patient and Study modules
  (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2) including Specific Character Set (C.12.1.1.2);
* :func:`render_heatmap` - the one rendering of the radiograph with its Grad-CAM
  heat map, used by the Secondary Capture and by the PDF report;
* coded concepts shared by the SR and the PDF (finding site codes from PS3.16
  CID 4031 / Annex L, decisions, the LOINC document title).

Nothing here opens a socket or runs a model.
"""

from __future__ import annotations

import functools
import logging
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import highdicom as hd
import highdicom._standard_utils as hd_standard_utils
import highdicom.base as hd_base
import highdicom.base_content as hd_base_content
from highdicom.coding_schemes import CodingSchemeIdentificationItem
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag, Tag
from pydicom.uid import generate_uid

from dicom_out import standard

# the wording lives in dicom_out.wording; these names stay importable from here
from dicom_out.wording import DECISION_LABEL, NOT_FOR_DIAGNOSTIC_USE, REVIEW_NOTICE  # noqa: F401
from pipeline.gradcam import upsample
from pipeline.result import (
    NODE_MANUFACTURER,
    NODE_MODEL_NAME,
    Decision,
    ImageFinding,
    ImageMetadata,
    ModelInfo,
    StudyResult,
)

logger = logging.getLogger(__name__)

SOFTWARE_VERSION = "0.1.0"
"""Version of fracture-node written into Software Versions (0018,1020)."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class OutputSettings:
    """How the result objects identify themselves and which series they go into.

    Parameters
    ----------
    manufacturer
        Manufacturer (0008,0070) of every output.  Must stay
        :data:`pipeline.result.NODE_MANUFACTURER` in production: the pipeline
        refuses incoming objects that carry it, so routing loops are impossible.
    manufacturer_model_name
        Manufacturer's Model Name (0008,1090).
    software_version
        Software Versions (0018,1020) of the node.
    institution_name
        Institution Name (0008,0080) of the node's equipment, or ``None``.
    sc_series_number, sc_series_description
        Series of the Grad-CAM Secondary Captures (PS3.3 A.8.1).
    sr_series_number, sr_series_description
        Series of the TID 1500 Structured Report.
    pdf_series_number, pdf_series_description
        Series of the Encapsulated PDF report (PS3.3 A.45.1).
    max_sc_side
        Longer side of a Secondary Capture is capped at this many pixels.
    ko_series_number, ko_series_description
        Series of the optional Key Object Selection of positive images (PS3.3
        A.35.4); added after the first API, with defaults.
    """

    manufacturer: str = NODE_MANUFACTURER
    manufacturer_model_name: str = NODE_MODEL_NAME
    software_version: str = SOFTWARE_VERSION
    institution_name: str | None = None
    sc_series_number: int = 9001
    sc_series_description: str = "AI {finding} heat map"
    sr_series_number: int = 9002
    sr_series_description: str = "AI {finding} findings SR"
    pdf_series_number: int = 9003
    pdf_series_description: str = "AI {finding} PDF report"
    max_sc_side: int = 2048
    ko_series_number: int = 9004
    ko_series_description: str = "AI {finding} key images"

    def __post_init__(self) -> None:
        for name in ("manufacturer", "manufacturer_model_name", "software_version"):
            value = getattr(self, name)
            if not value or len(value) > 64:
                raise ValueError(f"{name} must be 1 to 64 characters (VR LO)")
            if not value.isascii():
                raise ValueError(f"{name} must be ASCII (it is written in every character set)")
        if self.institution_name is not None and (
            not self.institution_name or len(self.institution_name) > 64
        ):
            raise ValueError("institution_name must be 1 to 64 characters (VR LO) or None")
        numbers = (
            self.sc_series_number,
            self.sr_series_number,
            self.pdf_series_number,
            self.ko_series_number,
        )
        for number in numbers:
            if not 0 < number < 2**31:
                raise ValueError("series numbers must be positive and fit VR IS")
        if len(set(numbers)) != len(numbers):
            raise ValueError("the SC, SR, PDF and KO series numbers must differ")
        for name in (
            "sc_series_description",
            "sr_series_description",
            "pdf_series_description",
            "ko_series_description",
        ):
            problem = series_description_problem(getattr(self, name))
            if problem:
                raise ValueError(f"{name} {problem}")
        if not 256 <= self.max_sc_side <= 8192:
            raise ValueError("max_sc_side must be between 256 and 8192 pixels")


_SERIES_SUFFIX = " - UNVERIFIED, not diagnostic"


FINDING_PLACEHOLDER = "{finding}"
"""In a series description, replaced by what the series' objects measure: "fracture",
"abnormality", or "fracture/abnormality" for the SR, PDF and KO of a study whose body
parts were decided by both."""
_LONGEST_FINDING = "fracture/abnormality"


def series_description_problem(description: object) -> str:
    """Why ``description`` cannot be a series description template, or ``""``: it must
    be ASCII, hold no placeholder but :data:`FINDING_PLACEHOLDER`, and fit VR LO (64)
    with the "not for diagnostic use" suffix and the longest finding."""
    if not isinstance(description, str) or not description or not description.isascii():
        return "must be ASCII text in quotes"
    rest = description.replace(FINDING_PLACEHOLDER, "")
    if "{" in rest or "}" in rest:
        return f"may hold no placeholder but {FINDING_PLACEHOLDER} (got {description!r})"
    longest = series_description(description, _LONGEST_FINDING)
    if len(longest) > 64:
        room = 64 - len(_SERIES_SUFFIX) - (len(_LONGEST_FINDING) - len(FINDING_PLACEHOLDER)) * (
            description.count(FINDING_PLACEHOLDER))
        return (f"must fit VR LO (64 characters) with the '{_SERIES_SUFFIX}' suffix"
                + (f" and {FINDING_PLACEHOLDER} as '{_LONGEST_FINDING}'"
                   if FINDING_PLACEHOLDER in description else "")
                + f": at most {room} characters here (got {len(description)})")
    return ""


def series_description(description: str, finding: str = "fracture") -> str:
    """Series Description (0008,103E): ``description`` with :data:`FINDING_PLACEHOLDER`
    replaced by ``finding``, and the "not for diagnostic use" suffix."""
    return f"{description.replace(FINDING_PLACEHOLDER, finding)}{_SERIES_SUFFIX}"


# --------------------------------------------------------------------------- UIDs


def output_uid(*parts: str) -> str:
    """A UID that depends only on ``parts`` (PS3.5 B.2, pydicom ``generate_uid``).

    Called with e.g. the source SOP Instance UID, the model weights hashes and the
    kind of output (``"sc"``), so the same input always yields the same UID and a
    reprocessed image replaces rather than duplicates its result in the archive.
    """
    if not parts or any(not isinstance(p, str) or not p for p in parts):
        raise ValueError("output_uid needs one or more non-empty strings")
    # pydicom concatenates the sources without a separator, so ("1.2.3", "45") and
    # ("1.2.34", "5") would collide; a unit separator between the parts prevents it.
    return str(generate_uid(entropy_srcs=["\x1f".join(parts)]))


def model_hashes(models: Iterable[ModelInfo]) -> list[str]:
    """What identifies ``models`` in the UIDs of their results, in a stable order,
    duplicates removed: the weights SHA-256 and the version (``<sha256>@2.1.1``), and a
    precision other than fp32 (``<sha256>/bf16@2.1.1-bf16``).  The same weights in bf16
    give other numbers, and the same weights at another operating point (a new version
    with another confidence floor or other thresholds) other answers, so their results
    must not take the other's UIDs: a result under a UID already in the archive would
    have to be the same object."""
    return sorted({(m.weights_sha256 if m.precision == "fp32" else f"{m.weights_sha256}/{m.precision}")
                   + f"@{m.version}" for m in models})


def study_series_uid(study_instance_uid: str, models: Iterable[ModelInfo], kind: str) -> str:
    """Series Instance UID of the ``kind`` outputs (``"sc"``, ``"sr"``, ``"pdf"``,
    ``"ko"``) of a study and model version: study UID, model hashes, ``"<kind>-series"``."""
    return output_uid(study_instance_uid, *model_hashes(models), f"{kind}-series")


def study_output_uid(
    study_instance_uid: str,
    sop_instance_uids: Iterable[str],
    models: Iterable[ModelInfo],
    kind: str,
) -> str:
    """SOP Instance UID of a study-level output (``"sr"``, ``"pdf"``, ``"ko"``): study
    UID, the sorted SOP Instance UIDs it reports on, model hashes, ``kind``."""
    return output_uid(
        study_instance_uid, *sorted(sop_instance_uids), *model_hashes(models), kind
    )


def finding_models(finding: ImageFinding) -> tuple[ModelInfo, ...]:
    """Router then classifier, or the classifier once when both are the same model."""
    if finding.router == finding.classifier:
        return (finding.classifier,)
    return (finding.router, finding.classifier)


# --------------------------------------------------------------------------- text


def ascii_text(text: str) -> str:
    """``text`` reduced to printable ASCII (dashes and accents folded, others ``?``).

    The character set of an output is the source's (PS3.3 C.12.1.1.2), which may
    be the default repertoire; everything the node itself writes into DICOM text
    attributes therefore stays within ASCII.
    """
    text = text.replace("\u2014", "-").replace("\u2013", "-").replace("\u2265", ">=")
    text = text.replace("\u2264", "<=").replace("\u00b1", "+/-")
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    cleaned = "".join(c if (c.isprintable() or c in "\r\n") else " " for c in folded)
    return cleaned


# --------------------------------------------------------------------------- patient/study

PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    # Patient module, PS3.3 C.7.1.1
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar",
    "PatientAlternativeCalendar",
    "PatientSex",
    "ReferencedPatientPhotoSequence",
    "QualityControlSubject",
    "ReferencedPatientSequence",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "EthnicGroup",
    "PatientComments",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "StrainDescription",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    # Clinical Trial Subject, C.7.1.3
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    # General Study, C.7.2.1
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingService",
    "ReferencedStudySequence",
    "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    # Patient Study, C.7.2.2
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
    "AdmissionID",
    "PatientSexNeutered",
    # Clinical Trial Study, C.7.2.3
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
)
"""Attributes copied verbatim from the source (Patient and Study IE modules)."""

_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


_PATIENT_STUDY_TAGS: tuple[BaseTag, ...] = tuple(
    Tag(keyword) for keyword in PATIENT_STUDY_KEYWORDS)
_TYPE2_PATIENT_STUDY_TAGS: tuple[tuple[str, BaseTag], ...] = tuple(
    (keyword, Tag(keyword)) for keyword in _TYPE2_PATIENT_STUDY)


def copy_patient_study(source: pydicom.Dataset, target: pydicom.Dataset) -> None:
    """Copy the Patient and Study modules of ``source`` into ``target`` exactly.

    Specific Character Set (0008,0005) is copied too, so names in ISO_IR 100,
    ISO_IR 192, ... are written in the source's own encoding.  Type 2 attributes
    absent from the source are written empty, as the IODs require.  Attributes of
    these modules that the source lacks are removed from ``target``.

    Looked up by tag (the tags computed once): every SC, KO and SR evidence item
    copies these ~45 attributes, 208 copies for a 50-image study, and a keyword
    lookup per attribute cost a quarter of it (``bench/build_cost.py --profile``).
    """
    for tag in _PATIENT_STUDY_TAGS:
        if tag in source:
            target[tag] = deepcopy(source[tag])
        elif tag in target:
            del target[tag]
    for keyword, tag in _TYPE2_PATIENT_STUDY_TAGS:
        if tag not in target:
            setattr(target, keyword, None)
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = deepcopy(source.SpecificCharacterSet)
    elif "SpecificCharacterSet" in target:
        del target.SpecificCharacterSet


standard.install()  # highdicom's table of module attributes in ~7 MB instead of 65-107 MB


_HD_DOES_IOD_HAVE_PIXEL_DATA = hd_standard_utils.does_iod_have_pixel_data
"""highdicom's own answer, which walks the IOD's modules at every call."""


@functools.lru_cache(maxsize=256)
def iod_has_pixel_data(sop_class_uid: str) -> bool:
    """Whether the IOD of ``sop_class_uid`` holds pixel data: highdicom's
    ``does_iod_have_pixel_data``, cached (its tables do not change while the node runs).

    Every Secondary Capture asks it once for its source (``SCImage.from_ref_dataset``
    -> ``ContributingEquipment.for_image_acquisition``), at ~2 ms a call: ~1 s of the
    study thread's critical path under ``bench/reliability.py`` (``py-spy``).  Installed
    as the name that function calls (below).  An unknown class raises ``KeyError``
    as before (an exception is not cached)."""
    return _HD_DOES_IOD_HAVE_PIXEL_DATA(str(sop_class_uid))


hd_base_content.does_iod_have_pixel_data = iod_has_pixel_data


_HD_IS_ATTRIBUTE_IN_IOD = hd_standard_utils.is_attribute_in_iod
"""highdicom's own answer, which walks every attribute of the IOD's modules at every call."""


@functools.lru_cache(maxsize=256)
def _attribute_in_iod(attribute: str, sop_class_uid: str) -> bool:
    return bool(_HD_IS_ATTRIBUTE_IN_IOD(attribute, sop_class_uid))


def attribute_in_iod(attribute: str, sop_class_uid: str,
                     exclude_path_elements: Sequence[str] | None = None) -> bool:
    """highdicom's ``is_attribute_in_iod``, cached for the queries without exclusions
    (its tables do not change while the node runs).

    Every object the node writes asks it twice at construction (``SOPClass.__init__``:
    Content Date, Content Time), each call walking the attributes of every module of
    the IOD: ~0.2 ms a call, ~0.4 ms an object.  Installed as the name
    ``highdicom.base`` calls (below).  A query with ``exclude_path_elements`` goes to
    highdicom's function uncached, and an unknown class raises ``KeyError`` as before
    (an exception is not cached)."""
    if exclude_path_elements is not None:
        return bool(_HD_IS_ATTRIBUTE_IN_IOD(attribute, sop_class_uid, exclude_path_elements))
    return _attribute_in_iod(str(attribute), str(sop_class_uid))


hd_base.is_attribute_in_iod = attribute_in_iod


def reference_dataset(source: pydicom.Dataset) -> pydicom.Dataset:
    """Identifying and Patient/Study attributes of ``source`` without its pixels.

    highdicom's SR constructor reads patient/study attributes and the UIDs from
    its evidence datasets; this keeps it from touching (or copying) Pixel Data.
    """
    ds = pydicom.Dataset()
    copy_patient_study(source, ds)
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "Rows",
        "Columns",
        "ImageLaterality",
        "Laterality",
        "ViewPosition",
        "BodyPartExamined",
        "InstanceNumber",
        "SeriesNumber",
    ):
        if keyword in source:
            ds[keyword] = deepcopy(source[keyword])
    return ds


_EVIDENCE_TAGS = tuple(Tag(k) for k in (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns"))


def evidence_dataset(source: pydicom.Dataset) -> pydicom.Dataset:
    """The attributes highdicom reads from an SR's or KO's evidence after the first:
    the four UIDs its evidence sequences list, and Rows/Columns (a KO item
    references an object with them as an image, without them as a composite).

    Only the first evidence dataset gives a document its Patient and Study
    (:func:`reference_dataset`); copying those ~45 attributes into every further one
    cost a 50-image study's SR and KO ~0.2 s (``bench/build_cost.py --profile``).
    The values are strings and integers, shared, not copied.
    """
    ds = pydicom.Dataset()
    for tag in _EVIDENCE_TAGS:
        if tag in source:
            elem = source[tag]
            ds.add_new(tag, elem.VR, elem.value)
    return ds


def study_head(result: StudyResult, sources: Mapping[str, pydicom.Dataset]) -> pydicom.Dataset:
    """Check ``sources`` against ``result`` and return the instance to copy Patient/Study from.

    Every analysed instance must be in ``sources``.  A refused instance may be
    missing (it may not even have been readable); it is then referenced from the
    UIDs in its :class:`~pipeline.result.Refusal`.  Every source present must
    belong to the study of ``result``.

    Raises
    ------
    ValueError
        If the result is empty, an analysed instance has no source, a source
        belongs to another study, or no source at all is available.
    """
    outcomes = [*result.findings, *result.refusals]
    if not outcomes:
        raise ValueError("a study result without findings or refusals has nothing to report")
    missing = [f.meta.sop_instance_uid for f in result.findings if f.meta.sop_instance_uid not in sources]
    if missing:
        raise ValueError(f"{len(missing)} analysed instance(s) are missing from sources")
    present = [sources[o.meta.sop_instance_uid] for o in outcomes if o.meta.sop_instance_uid in sources]
    for ds in present:
        if ds.StudyInstanceUID != result.study_instance_uid:
            raise ValueError(f"source {ds.SOPInstanceUID} belongs to another study")
    if not present:
        raise ValueError("no source instance of the study to copy Patient and Study from")
    absent = len(outcomes) - len(present)
    if absent:
        logger.debug("%d refused instance(s) without a source dataset", absent)
    return present[0]


def evidence_reference(meta: ImageMetadata) -> pydicom.Dataset | None:
    """The UIDs of an instance known only from its metadata (for SR evidence), or
    ``None`` when its SOP Class UID is unknown."""
    if not meta.sop_class_uid or not meta.series_instance_uid:
        return None
    ds = pydicom.Dataset()
    ds.SOPClassUID = meta.sop_class_uid
    ds.SOPInstanceUID = meta.sop_instance_uid
    ds.SeriesInstanceUID = meta.series_instance_uid
    ds.StudyInstanceUID = meta.study_instance_uid
    return ds


# --------------------------------------------------------------------------- equipment


def contributing_equipment(
    models: Sequence[ModelInfo], settings: OutputSettings
) -> list[hd.ContributingEquipment]:
    """Contributing Equipment Sequence items (PS3.3 C.12.1) for the node and its models.

    One Processing Equipment item per model (name, version, architecture, Device UID
    from the registry, weights hash) after one for the node itself.
    """
    items = [
        hd.ContributingEquipment(
            manufacturer=settings.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=settings.manufacturer_model_name,
            software_versions=settings.software_version,
            institution_name=settings.institution_name,
            contribution_description=ascii_text(
                "Grad-CAM heat map, structured report and PDF report"
            ),
        )
    ]
    for model in models:
        item = hd.ContributingEquipment(
            manufacturer=settings.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=ascii_text(model.name)[:64],
            software_versions=ascii_text(model.version)[:64],
            contribution_description=ascii_text(
                f"{model.architecture} model, weights SHA-256 {model.weights_sha256}"
            )[:1024],
        )
        item.DeviceUID = model.device_uid
        items.append(item)
    return items


def device_observer(settings: OutputSettings) -> hd.sr.ObserverContext:
    """The node as the Device observer of an SR document (TID 1004, CID 270).

    Its Device Observer UID depends only on the manufacturer and model name, so
    every document the node writes names the same observer.
    """
    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=output_uid(settings.manufacturer, settings.manufacturer_model_name, "device"),
            name=settings.manufacturer_model_name,
            manufacturer_name=settings.manufacturer,
            model_name=settings.manufacturer_model_name,
        ),
    )


def unique_models(models: Iterable[ModelInfo]) -> tuple[ModelInfo, ...]:
    """``models`` without repeats, first occurrence kept."""
    seen: dict[tuple[str, str, str], ModelInfo] = {}
    for model in models:
        seen.setdefault((model.name, model.version, model.weights_sha256), model)
    return tuple(seen.values())


# --------------------------------------------------------------------------- decisions

DECISION_COLOUR: dict[Decision, tuple[int, int, int]] = {
    Decision.POSITIVE: (200, 30, 30),
    Decision.DOUBTFUL: (230, 140, 0),
    Decision.NEGATIVE: (30, 140, 60),
    Decision.NEEDS_REVIEW: (60, 90, 170),
    Decision.NOT_ANALYSED: (110, 110, 110),
}
"""RGB colour of a decision (status banner, burned-in caption)."""


def shows_heatmap(decision: Decision) -> bool:
    """Whether a heat map may be drawn for ``decision``.

    Only positive and doubtful findings carry a map: a map on a negative (or
    undecided) image would suggest a finding that was not made.
    """
    return decision in (Decision.POSITIVE, Decision.DOUBTFUL)


FRACTURE = Code("125605004", "SCT", "Fracture of bone")
"""Finding type and qualitative-evaluation concept of a fracture output (SNOMED CT)."""

NOT_DONE = Code("385660001", "SCT", "Not done")
"""Qualitative evaluation value of an image that was not analysed."""

DECISION_EVALUATION: dict[Decision, Code] = {
    Decision.POSITIVE: codes.SCT.Present,
    Decision.DOUBTFUL: codes.SCT.Indeterminate,
    Decision.NEEDS_REVIEW: codes.SCT.Indeterminate,
    Decision.NEGATIVE: codes.SCT.Absent,
    Decision.NOT_ANALYSED: NOT_DONE,
}
"""Decision -> SNOMED CT value of the "Fracture of bone" qualitative evaluation."""

LOCAL_SCHEME = "99FRNODE"
"""Private coding scheme (PS3.3 8.2) for the node's own decision and refusal codes."""

AI_DECISION = Code("decision", LOCAL_SCHEME, "AI decision")
REFUSAL_REASON = Code("refusal", LOCAL_SCHEME, "Reason not analysed")

ABNORMALITY = Code("mura-abnormal", LOCAL_SCHEME, "Abnormal musculoskeletal radiograph (MURA)")
"""Finding type and qualitative-evaluation concept of an abnormality output: MURA's
abnormal study (fracture, hardware, degenerative change, lesion ...).  No SNOMED CT
concept means exactly that, so it is a local code rather than "Fracture of bone"."""


def finding_code(model: ModelInfo | None) -> Code:
    """The SR concept of what a classifier measures (:data:`FRACTURE` or :data:`ABNORMALITY`)."""
    if model is not None and model.finding == "abnormality":
        return ABNORMALITY
    return FRACTURE


def decision_code(decision: Decision) -> Code:
    """The node's own code for ``decision`` (keeps doubtful apart from needs-review)."""
    return Code(decision.value, LOCAL_SCHEME, DECISION_LABEL[decision].capitalize())


def local_coding_scheme() -> CodingSchemeIdentificationItem:
    """Coding Scheme Identification Sequence item declaring :data:`LOCAL_SCHEME`."""
    return CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME,
        name="fracture-node local codes",
        responsible_organization=NODE_MANUFACTURER,
    )


BODY_PART_CODES: dict[str, Code] = {
    # PS3.16 Annex L (Body Part Examined -> SNOMED CT), CID 4031
    "ELBOW": Code("16953009", "SCT", "Elbow joint"),
    "FINGER": Code("7569003", "SCT", "Finger"),
    "FOREARM": Code("14975008", "SCT", "Forearm"),
    "HAND": Code("85562004", "SCT", "Hand"),
    "HUMERUS": Code("85050009", "SCT", "Humerus"),
    "SHOULDER": Code("16982005", "SCT", "Shoulder region"),
    "WRIST": Code("74670003", "SCT", "Wrist joint"),
    "HIP": Code("29836001", "SCT", "Hip"),
    "KNEE": Code("72696002", "SCT", "Knee"),
    "ANKLE": Code("70258002", "SCT", "Ankle joint"),
    "FOOT": Code("56459004", "SCT", "Foot"),
    "EXTREMITY": Code("66019005", "SCT", "Limb"),
    "CLAVICLE": Code("51299004", "SCT", "Clavicle"),
    "FEMUR": Code("71341001", "SCT", "Femur"),
    "TIBIA": Code("12611008", "SCT", "Tibia"),
    "LEG": Code("61685007", "SCT", "Lower limb"),  # router 2.0.0's LEG: knee to foot
    # a family of router parts (pipeline.classify.router_answer): fingers to elbow
    "UPPER_LIMB": Code("53120007", "SCT", "Upper limb"),
}
"""BodyPartExamined value -> finding site (PS3.16 CID 4031 / Annex L)."""

PAIRED_BODY_PARTS = frozenset(
    {"ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST", "HIP", "KNEE",
     "ANKLE", "FOOT", "CLAVICLE", "FEMUR", "TIBIA", "EXTREMITY", "LEG", "UPPER_LIMB"}
)
"""Body parts with a left and a right (Laterality is then Type 2C / asked for)."""

LATERALITY_CODES: dict[str, Code] = {
    "L": codes.SCT.Left,
    "R": codes.SCT.Right,
    "B": codes.SCT.RightAndLeft,
}


def body_part_code(body_part: str) -> Code | None:
    """SNOMED CT finding site of ``body_part`` (upper case), or ``None`` if unknown."""
    return BODY_PART_CODES.get(body_part.upper())


def body_part_label(body_part: str) -> str:
    """Readable name of a body part: ``"WRIST"`` -> ``"Wrist"``."""
    return body_part.replace("_", " ").capitalize() if body_part else "Unknown"


# --------------------------------------------------------------------------- rendering


def _fit(pixels: np.ndarray, max_side: int, min_side: int) -> np.ndarray:
    rows, cols = pixels.shape
    longer = max(rows, cols)
    if longer > max_side:
        k = max_side / float(longer)
        interpolation = cv2.INTER_AREA
    elif longer < min_side:
        k = min_side / float(longer)
        interpolation = cv2.INTER_LINEAR
    else:
        return pixels
    size = (max(1, int(round(cols * k))), max(1, int(round(rows * k))))
    return cv2.resize(pixels, size, interpolation=interpolation)


def heatmap_on_image(finding: ImageFinding, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The Grad-CAM map of ``finding`` resampled onto its image grid (a map on the
    feature grid is first resampled onto the model square, bilinear, as the model's
    own :func:`pipeline.gradcam.upsample`).

    With ``shape`` (rows, columns) the map is resampled straight onto a scaled
    copy of the image grid (the same crop as ``GridTransform.to_image``, one resize
    instead of two), which is what the renderers need.
    """
    transform = finding.transform
    if shape is not None and tuple(shape) != tuple(transform.image_shape):
        rows = transform.image_shape[0]
        transform = replace(
            transform, image_shape=(int(shape[0]), int(shape[1])),
            scale=transform.scale * rows / float(shape[0]),
        )
    model_map = np.asarray(finding.heatmap, dtype=np.float32)
    if model_map.shape[0] != transform.size:  # the feature grid: onto the model square first
        model_map = upsample(model_map[None], transform.size)[0]
    heat = transform.to_image(model_map)
    return np.clip(heat, 0.0, 1.0)


HEAT_FLOOR = 0.25
"""Heat below this fraction of the map maximum is not coloured (keeps bone visible)."""

HEAT_ALPHA = 0.5
"""Opacity of the hottest part of the heat map."""


def colourise(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with the JET colour map (blue low, red high)."""
    v8 = cv2.convertScaleAbs(np.ascontiguousarray(values, dtype=np.float32), alpha=255.0)
    bgr = cv2.applyColorMap(v8, cv2.COLORMAP_JET)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def render_views(
    finding: ImageFinding, max_side: int, *, min_side: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(original, overlay) RGB uint8 renderings of ``finding`` at the same size.

    ``original`` is the radiograph alone; ``overlay`` has the heat map blended in
    where :func:`shows_heatmap` allows it (else it equals ``original``).
    """
    grey = np.asarray(finding.image.pixels, dtype=np.float32)
    grey = _fit(grey, max_side, min_side)
    grey8 = cv2.convertScaleAbs(np.ascontiguousarray(grey), alpha=255.0)
    base = cv2.cvtColor(grey8, cv2.COLOR_GRAY2RGB)
    if not shows_heatmap(finding.decision):
        return base, base
    return base, _blend(base, heatmap_on_image(finding, grey8.shape))


def _blend(base: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Blend ``heat`` (same grid as ``base``) over ``base`` with the JET colours."""
    peak = float(heat.max())
    if peak <= 0.0:
        return base
    heat = heat / peak
    hot = heat > HEAT_FLOOR
    if not hot.any():
        return base
    rows = np.flatnonzero(hot.any(axis=1))
    cols = np.flatnonzero(hot.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    h = heat[r0:r1, c0:c1]
    alpha = np.clip((h - HEAT_FLOOR) * (HEAT_ALPHA / (1.0 - HEAT_FLOOR)), 0.0, HEAT_ALPHA)
    alpha3 = cv2.merge([alpha, alpha, alpha])
    region = base[r0:r1, c0:c1].astype(np.float32)
    colour = colourise(h).astype(np.float32)
    blended = region + (colour - region) * alpha3
    out = base.copy()
    out[r0:r1, c0:c1] = cv2.convertScaleAbs(blended)
    return out


def render_heatmap(
    finding: ImageFinding,
    max_side: int,
    *,
    min_side: int = 0,
    with_heatmap: bool | None = None,
) -> np.ndarray:
    """The radiograph of ``finding`` as RGB uint8, with its heat map blended in colour.

    The normalised pixels (bone bright) are scaled so the longer side is at most
    ``max_side`` (and at least ``min_side``); the Grad-CAM map is resampled onto
    them and blended with the JET colour map, its opacity rising with the heat
    above :data:`HEAT_FLOOR`.  Where :func:`shows_heatmap` is false for the
    decision (or ``with_heatmap`` is False) the image stays grey.

    Used by the Secondary Capture (PS3.3 A.8) and the PDF report, so both show
    exactly the same picture.
    """
    original, overlay = render_views(finding, max_side, min_side=min_side)
    if with_heatmap is False:
        return original
    if with_heatmap and overlay is original:
        grey = original[:, :, 0]
        return _blend(original, heatmap_on_image(finding, grey.shape))
    return overlay


def colour_bar(width: int, height: int) -> np.ndarray:
    """Horizontal legend of the heat-map colours, low (left) to high (right), RGB uint8."""
    ramp = np.linspace(0.0, 1.0, max(2, width), dtype=np.float32)[None, :]
    return np.repeat(colourise(ramp), max(1, height), axis=0)


_FONT_DIRS = (
    Path("/usr/share/fonts/truetype/dejavu"),
    Path("/usr/share/fonts/dejavu"),
)


@functools.lru_cache(maxsize=4)
def font_path(bold: bool = False) -> Path | None:
    """Path of the DejaVu Sans TrueType font (covers Latin, Greek, Cyrillic), if any."""
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in _FONT_DIRS:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    try:
        import matplotlib

        candidate = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
        if candidate.is_file():
            return candidate
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        pass
    logger.warning("DejaVu Sans not found; falling back to built-in fonts")
    return None


def encode_image(rgb: np.ndarray, fmt: str = ".jpg", quality: int = 90) -> bytes:
    """Encode an RGB uint8 array as JPEG or PNG bytes (for the PDF)."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == ".jpg" else []
    ok, buf = cv2.imencode(fmt, bgr, params)
    if not ok:
        raise ValueError(f"could not encode image as {fmt}")
    return buf.tobytes()


# --------------------------------------------------------------------------- regions

HOT_REGION_SHARE = 0.5
"""The hot region of a heat map: where it reaches at least this share of its maximum."""

_REGION_GRID = 512
"""Longer side of the grid on which the hot region's contour is traced."""

_REGION_MAX_POINTS = 64
"""At most this many vertices in a region's polyline (simplified beyond it)."""


@dataclass(frozen=True)
class HeatRegion:
    """The hot region of a finding's heat map, in source-image pixel coordinates.

    Coordinates are (column, row) pairs in the stored image matrix (Rows x
    Columns of the source instance), with the top left corner of the top left
    pixel at (0, 0), as SCOORD Graphic Data is defined (PS3.3 C.18.6.1.1).

    Attributes
    ----------
    contour
        Closed polyline (first vertex repeated at the end) around the connected
        region, at ``share`` of the map's maximum, that holds the maximum; empty
        when the region is too small to outline (less than three vertices).
    peak
        (column, row) of the map's maximum.
    share
        The share of the maximum that defines the region.
    """

    contour: np.ndarray
    peak: tuple[float, float]
    share: float


def heat_region(finding: ImageFinding, share: float = HOT_REGION_SHARE) -> HeatRegion:
    """Outline the hot region of ``finding``'s heat map on its source image.

    The map is resampled from the model grid onto a reduced copy of the
    normalised image grid (``GridTransform``, see :func:`heatmap_on_image`), the
    connected region at or above ``share`` of the maximum that contains the
    maximum is traced, simplified to at most a few dozen vertices, and scaled to
    the stored Rows/Columns (``NormalisedImage.source_shape``).

    Parameters
    ----------
    finding
        An analysed image.
    share
        Share (0 to 1, exclusive) of the map's maximum that bounds the region.

    Returns
    -------
    HeatRegion
        Contour and peak in source pixel coordinates.

    Raises
    ------
    ValueError
        If ``share`` is not in (0, 1) or the map is empty (all zero).
    """
    if not 0.0 < share < 1.0:
        raise ValueError("share must lie strictly between 0 and 1")
    rows, cols = finding.transform.image_shape
    k = min(1.0, _REGION_GRID / float(max(rows, cols)))
    shape = (max(1, int(round(rows * k))), max(1, int(round(cols * k))))
    heat = heatmap_on_image(finding, shape)
    top = float(heat.max())
    if not np.isfinite(top) or top <= 0.0:
        raise ValueError("the heat map is empty")
    src_rows, src_cols = finding.image.source_shape
    sy = src_rows / float(shape[0])
    sx = src_cols / float(shape[1])
    peak_r, peak_c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    peak = (float((peak_c + 0.5) * sx), float((peak_r + 0.5) * sy))

    mask = (heat >= share * top).astype(np.uint8)
    count, labels = cv2.connectedComponents(mask, connectivity=8)
    mask = (labels == labels[peak_r, peak_c]).astype(np.uint8)
    found, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = np.zeros((0, 2), dtype=np.float64)
    if found:
        outline = max(found, key=cv2.contourArea)
        epsilon = 0.5
        simple = cv2.approxPolyDP(outline, epsilon, True)
        while len(simple) > _REGION_MAX_POINTS:
            epsilon *= 1.5
            simple = cv2.approxPolyDP(outline, epsilon, True)
        points = simple.reshape(-1, 2).astype(np.float64)
        if len(points) >= 3:
            # pixel centres of the reduced grid, scaled to the stored matrix
            points = np.column_stack(((points[:, 0] + 0.5) * sx, (points[:, 1] + 0.5) * sy))
            points[:, 0] = np.clip(points[:, 0], 0.0, float(src_cols))
            points[:, 1] = np.clip(points[:, 1], 0.0, float(src_rows))
            contour = np.vstack([points, points[:1]])
    return HeatRegion(contour=np.round(contour, 2), peak=(round(peak[0], 2), round(peak[1], 2)), share=share)
