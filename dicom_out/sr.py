"""TID 1500 Measurement Report of a study, in a Comprehensive 3D SR (PS3.3 A.35.13).

One document per study, as the IHE AI Results (AIR) profile asks, built with
highdicom:

* observer context: the node as a device (TID 1004);
* per analysed image one measurement group (TID 1501): tracking identifier and
  UID, finding type "Fracture of bone", the finding site coded in SNOMED CT for the
  body part (PS3.16 CID 4031 / Annex L) with laterality where known, the
  qualitative evaluation (present / absent / indeterminate, plus the node's own
  decision code keeping "doubtful" apart from "needs review"), the fracture
  probability as a numeric measurement (TID 300, UCUM "no units"), the body-part
  probability, the algorithm identification (TID 4019: name, version, threshold and
  doubt band as parameters), the source image reference and a Comment with the
  decision in words; for a positive or doubtful image the probability is INFERRED
  FROM an SCOORD (TID 320) outlining the heat map's hot region on the source image,
  and these groups come first (what OHIF v3 needs to draw and list them: see
  :func:`_image_group` and docs/conformance.md 8.1.2);
* per refused instance a group whose evaluation is "Not done", with the reason as
  a code and as text;
* per body part and for the whole study a group with the study-level decision;
* evidence (Current Requested Procedure Evidence Sequence) listing every source
  instance and every heat-map Secondary Capture;
* Verification Flag UNVERIFIED, Preliminary Flag PRELIMINARY, and a Predecessor
  Documents Sequence when an earlier version of the report is replaced.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Mapping, Sequence

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr.templates import _get_coded_modality
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_out.common import (
    AI_DECISION,
    DECISION_EVALUATION,
    DECISION_LABEL,
    LATERALITY_CODES,
    LOCAL_SCHEME,
    REFUSAL_REASON,
    OutputSettings,
    ascii_text,
    body_part_code,
    contributing_equipment,
    copy_patient_study,
    decision_code,
    device_observer,
    finding_models,
    local_coding_scheme,
    model_hashes,
    output_uid,
    evidence_reference,
    finding_code,
    HOT_REGION_SHARE,
    heat_region,
    iod_has_pixel_data,
    shows_heatmap,
    evidence_dataset,
    reference_dataset,
    series_description,
    study_head,
    study_output_uid,
    study_series_uid,
    unique_models,
)
from dicom_out import wording
from pipeline.aggregate import needs_review, worst
from pipeline.result import (
    BodyPartDecision,
    Decision,
    ImageFinding,
    ModelInfo,
    Refusal,
    StudyResult,
)

logger = logging.getLogger(__name__)

IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
"""Procedure reported (TID 1500 row 3): a member of CID 100, as PixelMed's validator
checks ("Plain radiography", 168537006, is not in CID 100)."""

FRACTURE_PROBABILITY = codes.DCM.Probability
"""Concept name (DCM 122157) of the classifier's calibrated probability (0 to 1) of the
finding named by the group's finding type (fracture, or MURA abnormality)."""

BODY_PART_PROBABILITY = Code("body-part-probability", LOCAL_SCHEME, "Body part probability")
"""Concept name of the router's probability for the body part it chose."""

SR_IMAGE_REGIONS = True
"""Whether positive and doubtful images' fracture probability is INFERRED FROM an
SCOORD around the heat map's hot region (see :func:`_image_group`)."""

UNIT_PROBABILITY = codes.UCUM.NoUnits
"""Probabilities are unitless fractions in [0, 1] (UCUM "1")."""


def _models_of(result: StudyResult) -> tuple[ModelInfo, ...]:
    models = list(result.models)
    for finding in result.findings:
        models.extend(finding_models(finding))
    return unique_models(models)


def _algorithm(classifier: ModelInfo, router: ModelInfo | None, parameters: list[str]) -> (
    hd.sr.AlgorithmIdentification
):
    """TID 4019 Algorithm Identification of the classifier, router named as parameter."""
    params = list(parameters)
    if router is not None and router != classifier:
        params.append(f"body part router: {router.name} {router.version}")
    return hd.sr.AlgorithmIdentification(
        name=ascii_text(classifier.name)[:64],
        version=ascii_text(classifier.version)[:64],
        parameters=[ascii_text(p)[:64] for p in params],
    )


def _finding_sites(body_part: str, laterality: str = "") -> list[hd.sr.FindingSite]:
    code = body_part_code(body_part)
    if code is None:
        return []
    side = LATERALITY_CODES.get(laterality.upper())
    return [hd.sr.FindingSite(anatomic_location=code, laterality=side)]


OHIF_TOOL_PREFIX = {
    hd.sr.GraphicTypeValues.POLYLINE: "Cornerstone3DTools@^0.1.0:PlanarFreehandROI",
    hd.sr.GraphicTypeValues.POINT: "Cornerstone3DTools@^0.1.0:Probe",
}
"""Tracking Identifier prefix, by the region's graphic type, that OHIF v3 (its
Cornerstone3D SR adapters) needs to restore a region it did not make as a measurement
(``isRehydratable``, ``MeasurementReport.getAdapterForTrackingIdentifier``): a closed
POLYLINE as a freehand ROI, a POINT as a probe.  Without it OHIF only previews the
region in its SR viewport and lists nothing in its measurements panel."""


def _hot_region(finding: ImageFinding) -> hd.sr.CoordinatesForMeasurement | None:
    """SCOORD (TID 320, INFERRED FROM) around the heat map's hot region.

    A closed POLYLINE along the contour at ``HOT_REGION_SHARE`` of the map's
    maximum, or a POINT at the maximum when the region is too small to outline;
    ``None`` for an empty map.  Coordinates are in the source image's stored
    pixel matrix (PS3.3 C.18.6.1.1); the SCOORD's IMAGE child (SELECTED FROM)
    references the source image.
    """
    meta = finding.meta
    try:
        region = heat_region(finding)
    except ValueError as exc:
        logger.warning("no region for %s: %s", meta.sop_instance_uid, exc)
        return None
    source = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=meta.sop_class_uid,
        referenced_sop_instance_uid=meta.sop_instance_uid,
    )
    if len(region.contour) >= 4:
        return hd.sr.CoordinatesForMeasurement(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=region.contour,
            source_image=source,
        )
    return hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.array([region.peak], dtype=np.float64),
        source_image=source,
    )


def _image_group(finding: ImageFinding) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of an analysed image.

    Every analysed image gets the same template.  A positive or doubtful image's
    fracture probability (TID 300) is INFERRED FROM an SCOORD (TID 320) outlining
    the heat map's hot region on the source image, and its Tracking Identifier
    starts with the OHIF tool name of that region (:data:`OHIF_TOOL_PREFIX`), so
    OHIF draws the region on the radiograph and lists it as a measurement.  A
    Comment (DCM 121106) holds the image's decision in words, which OHIF shows as
    the measurement's label.
    """
    meta = finding.meta
    concept = finding_code(finding.classifier)
    low, high = finding.doubt_band
    algorithm = _algorithm(
        finding.classifier,
        finding.router,
        [f"threshold={finding.threshold:.4g}", f"doubt band={low:.4g}..{high:.4g}"],
    )
    reference = hd.sr.SourceImageForMeasurement(
        referenced_sop_class_uid=meta.sop_class_uid,
        referenced_sop_instance_uid=meta.sop_instance_uid,
    )
    region = _hot_region(finding) if SR_IMAGE_REGIONS and shows_heatmap(finding.decision) else None
    sites = _finding_sites(finding.body_part, meta.laterality)
    measurements = [
        # algorithm and finding site are stated once, on the group (TID 1501 rows 7-8);
        # the probability comes first: OHIF reads the region from the first NUM
        hd.sr.Measurement(
            name=FRACTURE_PROBABILITY,
            value=round(float(finding.fracture_probability), 6),
            unit=UNIT_PROBABILITY,
            # TID 320: an IMAGE or an SCOORD (which references the image), not both
            referenced_images=[reference] if region is None else None,
            referenced_coordinates=[region] if region is not None else None,
        ),
        hd.sr.Measurement(
            name=BODY_PART_PROBABILITY,
            value=round(float(finding.body_part_probability), 6),
            unit=UNIT_PROBABILITY,
            referenced_images=[reference],
        ),
    ]
    identifier = f"{wording.image_short(meta)}: {wording.body_part_name(finding.body_part)}"
    if region is not None:
        identifier = f"{OHIF_TOOL_PREFIX[hd.sr.GraphicTypeValues(region.GraphicType)]} {identifier}"
    tracking = hd.sr.TrackingIdentifier(
        uid=output_uid(meta.sop_instance_uid, *model_hashes(finding_models(finding)), "track"),
        identifier=identifier[:64],
    )
    evaluations = [
        hd.sr.QualitativeEvaluation(concept, DECISION_EVALUATION[finding.decision]),
        hd.sr.QualitativeEvaluation(AI_DECISION, decision_code(finding.decision)),
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=concept,
        algorithm_id=algorithm,
        finding_sites=sites or None,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=meta.sop_class_uid,
                referenced_sop_instance_uid=meta.sop_instance_uid,
            )
        ],
    )
    comment = wording.image_decision_text(finding)
    if region is not None:
        comment += "; " + wording.region_sentence(str(region.GraphicType), HOT_REGION_SHARE)
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=ascii_text(comment)[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def _has_region(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> bool:
    """Whether a group's measurements are inferred from an SCOORD region."""
    return any(
        inner.ValueType == "SCOORD"
        for item in group[0].ContentSequence if item.ValueType == "NUM"
        for inner in getattr(item, "ContentSequence", [])
    )


def _classifier_of(result: StudyResult) -> ModelInfo | None:
    """The classifier among the study's models (for a study without findings)."""
    for model in result.models:
        if model.finding in ("fracture", "abnormality"):
            return model
    return None


_coded_modality = functools.lru_cache(maxsize=64)(_get_coded_modality)
"""highdicom's CID 29 modality of a SOP class, cached (it rebuilds its table per call)."""


def _is_image(sop_class_uid: str) -> bool:
    """Whether the SOP class is an image IOD (unknown classes are not)."""
    try:
        return iod_has_pixel_data(sop_class_uid)
    except KeyError:
        return False


def _refusal_group(refusal: Refusal, concept: Code) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    meta = refusal.meta
    sources = None
    if evidence_reference(meta) is not None and _is_image(meta.sop_class_uid):
        sources = [
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=meta.sop_class_uid,
                referenced_sop_instance_uid=meta.sop_instance_uid,
            )
        ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=output_uid(meta.sop_instance_uid, refusal.code.value, "track-refused"),
            identifier=f"{wording.image_short(meta)}: not analysed"[:64],
        ),
        finding_type=concept,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(concept, DECISION_EVALUATION[Decision.NOT_ANALYSED]),
            hd.sr.QualitativeEvaluation(AI_DECISION, decision_code(Decision.NOT_ANALYSED)),
            hd.sr.QualitativeEvaluation(
                REFUSAL_REASON,
                Code(refusal.code.value, LOCAL_SCHEME, refusal.code.value.replace("-", " ")),
            ),
        ],
        source_images=sources,
    )
    detail = ascii_text(refusal.text).strip()
    text = ascii_text(wording.refusal_reason(refusal)) + (f" ({detail})" if detail else "")
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=text[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def _body_part_group(
    decision: BodyPartDecision, classifier: ModelInfo, router: ModelInfo | None, study_uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    low, high = decision.doubt_band
    algorithm = _algorithm(
        classifier,
        router,
        [
            f"threshold={decision.threshold:.4g}",
            f"doubt band={low:.4g}..{high:.4g}",
            "study probability: mean of image probabilities",
            f"mean rule decision: {decision.mean_decision.value}",
            "study decision: at least the most severe image decision",
        ],
    )
    sites = _finding_sites(decision.body_part)
    concept = finding_code(classifier)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=output_uid(study_uid, decision.body_part, *model_hashes([classifier]), "track-part"),
            identifier=f"Study: {wording.body_part_name(decision.body_part)}"[:64],
        ),
        finding_type=concept,
        algorithm_id=algorithm,
        finding_sites=sites or None,
        measurements=[
            hd.sr.Measurement(
                name=FRACTURE_PROBABILITY,
                value=round(float(decision.probability), 6),
                unit=UNIT_PROBABILITY,
            )
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(concept, DECISION_EVALUATION[decision.decision]),
            hd.sr.QualitativeEvaluation(AI_DECISION, decision_code(decision.decision)),
        ],
    )


def _deciders(result: StudyResult) -> list[ModelInfo]:
    """The models that decided the study's body parts (classifier, heads), in the order
    their findings are named (:data:`dicom_out.wording.FINDING_ORDER`)."""
    models = list(dict.fromkeys(p.classifier for p in result.by_body_part.values()
                                if p.classifier is not None))
    return sorted(models, key=lambda m: wording.FINDING_ORDER.index(wording.finding_name(m)))


def _kind_decision(result: StudyResult, model: ModelInfo) -> Decision:
    """The study decision over the body parts ``model`` decided: the worst of theirs,
    and needs-review when the study needs review for a reason no part carries (an image
    without a finite output, a body part in doubt or in conflict with the header)."""
    own = [p.decision for p in result.by_body_part.values() if p.classifier == model]
    if needs_review(result.findings, result.refusals):
        own.append(Decision.NEEDS_REVIEW)
    return worst(own)


def _study_group(
    result: StudyResult, classifier: ModelInfo | None, models: Sequence[ModelInfo],
    kind_of: bool = False,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The study's answer (TID 1501); with ``kind_of`` the answer over the body parts
    ``classifier`` decided, in a study whose parts were decided by several models."""
    decision = _kind_decision(result, classifier) if kind_of and classifier else result.decision
    what = wording.finding_name(classifier)
    algorithm = None
    if classifier is not None:
        algorithm = _algorithm(
            classifier,
            None,
            ["study decision: worst case over body parts and images"],
        )
    concept = finding_code(classifier)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=output_uid(result.study_instance_uid, *model_hashes(models), "track-study",
                           *((what,) if kind_of else ())),
            identifier=f"Study: {what}" if kind_of else "Study",
        ),
        finding_type=concept,
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(concept, DECISION_EVALUATION[decision]),
            hd.sr.QualitativeEvaluation(AI_DECISION, decision_code(decision)),
        ],
    )


def _image_library(images: Sequence[pydicom.Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library of the analysed images, tolerant of missing descriptors.

    highdicom's ``ImageLibrary`` requires Patient Orientation and Imager Pixel
    Spacing of every projection radiograph (TID 1603); real CR/DX files often
    lack them.  Here TID 1601 descriptors are written only when present.
    """
    mm = codes.UCUM.Millimeter
    pixels = hd.sr.CodedConcept(value="{pixels}", meaning="Pixels", scheme_designator="UCUM")
    acq = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    groups: dict[tuple[str, str], list[hd.sr.ImageContentItem]] = {}
    modalities: dict[tuple[str, str], Code] = {}
    for ds in images:
        modality = _coded_modality(ds.SOPClassUID)
        item = hd.sr.ImageContentItem(
            name=hd.sr.CodedConcept(value="260753009", meaning="Source", scheme_designator="SCT"),
            referenced_sop_class_uid=ds.SOPClassUID,
            referenced_sop_instance_uid=ds.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        descriptors: list[hd.sr.ContentItem] = [
            hd.sr.NumContentItem(
                name=codes.DCM.PixelDataRows, value=int(ds.Rows), unit=pixels, relationship_type=acq
            ),
            hd.sr.NumContentItem(
                name=codes.DCM.PixelDataColumns,
                value=int(ds.Columns),
                unit=pixels,
                relationship_type=acq,
            ),
        ]
        orientation = ds.get("PatientOrientation")
        if orientation is not None and len(orientation) == 2 and all(orientation):
            descriptors += [
                hd.sr.TextContentItem(
                    name=codes.DCM.PatientOrientationRow,
                    value=str(orientation[0]),
                    relationship_type=acq,
                ),
                hd.sr.TextContentItem(
                    name=codes.DCM.PatientOrientationColumn,
                    value=str(orientation[1]),
                    relationship_type=acq,
                ),
            ]
        spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
        if spacing is not None and len(spacing) == 2:
            descriptors += [
                hd.sr.NumContentItem(
                    name=codes.DCM.HorizontalPixelSpacing,
                    value=float(spacing[1]),
                    unit=mm,
                    relationship_type=acq,
                ),
                hd.sr.NumContentItem(
                    name=codes.DCM.VerticalPixelSpacing,
                    value=float(spacing[0]),
                    unit=mm,
                    relationship_type=acq,
                ),
            ]
        item.ContentSequence = hd.sr.ContentSequence(descriptors)
        key = (modality.value, modality.scheme_designator)
        modalities[key] = modality
        groups.setdefault(key, []).append(item)
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence()
    for key, items in groups.items():
        group = hd.sr.ContainerContentItem(
            name=codes.DCM.ImageLibraryGroup,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        group.ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.CodeContentItem(
                    name=codes.DCM.Modality, value=modalities[key], relationship_type=acq
                ),
                *items,
            ]
        )
        library.ContentSequence.append(group)
    return library


def build_structured_report(
    result: StudyResult,
    sources: Mapping[str, pydicom.Dataset],
    secondary_captures: Sequence[pydicom.Dataset],
    settings: OutputSettings,
    predecessor: pydicom.Dataset | None = None,
) -> pydicom.Dataset:
    """Build the TID 1500 Measurement Report of a study (Comprehensive 3D SR).

    Parameters
    ----------
    result
        Findings and refusals of the study and the study-level decisions.
    sources
        Source instances keyed by SOP Instance UID; must hold every analysed
        instance and should hold the refused ones (a refused instance without a
        source, e.g. an unreadable file, is referenced from its Refusal's UIDs).
        Patient and Study modules are copied from the first analysed (else first
        refused) instance.
    secondary_captures
        The heat-map Secondary Captures built for the study; listed as evidence.
    settings
        Series and equipment settings.
    predecessor
        An earlier SR of the same study that this one replaces (for instance after
        late instances arrived); recorded in the Predecessor Documents Sequence
        (PS3.3 C.17.2).

    Returns
    -------
    pydicom.Dataset
        A Comprehensive 3D SR (PS3.3 A.35.13) whose content is TID 1500.

    Raises
    ------
    ValueError
        If the result is empty, an analysed instance has no source, or an
        instance belongs to another study.
    """
    head = study_head(result, sources)
    outcomes: list[ImageFinding | Refusal] = [*result.findings, *result.refusals]
    sop_uids = [o.meta.sop_instance_uid for o in outcomes]
    for sc in secondary_captures:
        if sc.StudyInstanceUID != result.study_instance_uid:
            raise ValueError("a secondary capture belongs to another study")
    if predecessor is not None and predecessor.StudyInstanceUID != result.study_instance_uid:
        raise ValueError("the predecessor SR belongs to another study")

    models = _models_of(result)
    classifier = result.findings[0].classifier if result.findings else None
    router = result.findings[0].router if result.findings else None

    drawn: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    concept = finding_code(classifier if classifier is not None else _classifier_of(result))
    for outcome in result.outcomes():
        if isinstance(outcome, ImageFinding):
            group = _image_group(outcome)
            (drawn if _has_region(group) else groups).append(group)
        else:
            groups.append(_refusal_group(outcome, concept))
    # groups with a region first: OHIF's SR viewport opens on the first group and stays
    # black when that one has nothing to draw
    groups = drawn + groups
    if classifier is not None:
        for part in sorted(result.by_body_part):
            decision = result.by_body_part[part]
            groups.append(
                _body_part_group(
                    decision, decision.classifier or classifier, router, result.study_instance_uid
                )
            )
    deciders = _deciders(result)
    if len(deciders) > 1:  # fracture and abnormality parts: one study answer for each
        groups.extend(_study_group(result, model, models, kind_of=True) for model in deciders)
    else:
        groups.append(_study_group(result, classifier or _classifier_of(result), models))

    library = [
        sources[o.meta.sop_instance_uid]
        for o in result.outcomes() if isinstance(o, ImageFinding)
    ]
    observer = device_observer(settings)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    if library:
        # TID 1600 Image Library goes right after Procedure Reported (TID 1500 row 5)
        root = report[0].ContentSequence
        at = max(
            i for i, item in enumerate(root)
            if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ProcedureReported.value
        )
        root.insert(at + 1, _image_library(library))

    evidence = [reference_dataset(head)]
    for outcome in outcomes:
        uid = outcome.meta.sop_instance_uid
        if uid == head.SOPInstanceUID:
            continue
        if uid in sources:
            evidence.append(evidence_dataset(sources[uid]))
        else:
            reference = evidence_reference(outcome.meta)
            if reference is not None:
                evidence.append(reference)
    evidence.extend(evidence_dataset(sc) for sc in secondary_captures)
    content = report[0]
    with _adopted(content):
        ds = _comprehensive_3d_sr(evidence, content, result, models, sop_uids, settings,
                                  predecessor)
    copy_patient_study(head, ds)
    logger.debug(
        "built SR %s: %d finding(s), %d refusal(s), study decision %s",
        ds.SOPInstanceUID,
        len(result.findings),
        len(result.refusals),
        DECISION_LABEL[result.decision],
    )
    return ds


_HD_FIND_CONTENT_ITEMS = hd.sr.utils.find_content_items
"""highdicom's own search, kept for the queries :func:`_find_content_items` hands back."""


def _find_content_items(
    dataset: pydicom.Dataset,
    name: Code | hd.sr.CodedConcept | None = None,
    value_type: hd.sr.ValueTypeValues | str | None = None,
    relationship_type: hd.sr.RelationshipTypeValues | str | None = None,
    recursive: bool = False,
) -> list[pydicom.Dataset]:
    """:func:`highdicom.sr.utils.find_content_items` without building a highdicom
    ``ContentItem`` and ``CodedConcept`` for every node it passes.

    ``Comprehensive3DSR.__init__`` finds the SR's references (``collect_evidence``:
    every IMAGE and COMPOSITE item of the tree) with that function, which for a
    query by value type alone constructs and validates two objects per content item
    only to compare the value type: about a third of the SR's CPU time
    (``bench/build_cost.py``).  For that query this returns the same items in the
    same (pre-)order, comparing ``ValueType`` directly; any other query goes to
    highdicom's function.  Installed as highdicom's at import (below), so every SR
    the node builds uses it (``tests/test_dicom_out.py::
    test_fast_evidence_search_finds_what_highdicom_finds``).
    """
    if name is not None or relationship_type is not None or value_type is None:
        return _HD_FIND_CONTENT_ITEMS(dataset, name=name, value_type=value_type,
                                      relationship_type=relationship_type, recursive=recursive)
    wanted = hd.sr.ValueTypeValues(value_type).value
    found: list[pydicom.Dataset] = []

    def walk(node: pydicom.Dataset) -> None:
        for item in node.ContentSequence:
            if item.ValueType == wanted:
                found.append(item)
            if recursive and hasattr(item, "ContentSequence"):
                walk(item)

    walk(dataset)
    return found


hd.sr.utils.find_content_items = _find_content_items  # what collect_evidence calls


_ADOPTED: set[int] = set()
"""``id`` of the content trees :func:`_adopted` is handing to highdicom's SR constructor."""

_HD_FROM_DATASET_DERIVED = hd.sr.ContentItem._from_dataset_derived.__func__
"""highdicom's own parse of a content item, kept for every tree not being adopted."""


def _from_dataset_derived(cls: type, dataset: pydicom.Dataset) -> pydicom.Dataset:
    """highdicom's ``ContentItem._from_dataset_derived``, but a tree being adopted
    (:func:`_adopted`) is returned as it is instead of being parsed again."""
    if id(dataset) in _ADOPTED:
        return dataset
    return _HD_FROM_DATASET_DERIVED(cls, dataset)


hd.sr.ContentItem._from_dataset_derived = classmethod(_from_dataset_derived)  # type: ignore[method-assign]


def _typed(item: pydicom.Dataset) -> bool:
    """Whether every node of the content tree under ``item`` (itself included) is
    already a highdicom content item of the class its Value Type names (or of one of
    highdicom's subclasses of it, such as ``FindingSite``), with a highdicom
    ``ContentSequence`` and ``CodedConcept`` name: what highdicom's parse would make."""
    cls = hd.sr.value_types._get_content_item_class(hd.sr.ValueTypeValues(item.ValueType))
    if not isinstance(item, cls) or not isinstance(item.ConceptNameCodeSequence[0], hd.sr.CodedConcept):
        return False
    if "ContentSequence" not in item:
        return True
    children = item.ContentSequence
    return isinstance(children, hd.sr.ContentSequence) and all(_typed(c) for c in children)


@contextlib.contextmanager
def _adopted(content: pydicom.Dataset) -> Iterator[None]:
    """Let highdicom's SR constructor adopt ``content`` instead of copying and parsing it.

    ``Comprehensive3DSR.__init__`` deep-copies its ``content`` so that the caller's
    tree stays untouched, then parses the copy into highdicom content items, node by
    node (together about two fifths of the SR's CPU time for a 50-image study).  The
    tree passed here is built by :func:`build_structured_report` from highdicom's own
    content items, for this one document, and never used again: within this block
    ``deepcopy(content)`` returns ``content`` itself, and, when every node of it is
    already the content item the parse would make (:func:`_typed`), the parse
    returns it as it is.  The document written is the same
    (``tests/test_dicom_out.py::test_structured_report_same_without_copy``,
    ``bench/build_cost.py --compare``).
    """
    object.__setattr__(content, "__deepcopy__", lambda memo: content)
    key = id(content) if _typed(content) else None
    if key is not None:
        _ADOPTED.add(key)
    try:
        yield
    finally:
        object.__delattr__(content, "__deepcopy__")
        _ADOPTED.discard(key)


def _comprehensive_3d_sr(
    evidence: list[pydicom.Dataset],
    content: pydicom.Dataset,
    result: StudyResult,
    models: Sequence[ModelInfo],
    sop_uids: list[str],
    settings: OutputSettings,
    predecessor: pydicom.Dataset | None,
) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=content,
        series_instance_uid=study_series_uid(result.study_instance_uid, models, "sr"),
        series_number=settings.sr_series_number,
        sop_instance_uid=study_output_uid(result.study_instance_uid, sop_uids, models, "sr"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=settings.institution_name,
        previous_versions=[predecessor] if predecessor is not None else None,
        contributing_equipment=contributing_equipment(models, settings),
        series_description=series_description(settings.sr_series_description,
                                              wording.study_finding(result, "/")),
        manufacturer_model_name=settings.manufacturer_model_name,
        software_versions=settings.software_version,
        coding_schemes=[local_coding_scheme()],
    )
