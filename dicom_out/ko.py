"""Key Object Selection of the images the AI flags (PS3.3 A.35.4), optional output.

A Key Object Selection Document (highdicom ``ko``) titled "Of Interest" (DCM 113000,
CID 7010) lists the source images with a positive or doubtful finding and their heat-map Secondary Captures,
so a viewer that honours key images can jump to them.  The description says the
selection was made by an unverified AI.  Nothing is built when no image is positive or doubtful.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from dicom_out.common import (
    OutputSettings,
    contributing_equipment,
    copy_patient_study,
    device_observer,
    evidence_dataset,
    finding_models,
    reference_dataset,
    series_description,
    study_head,
    study_output_uid,
    study_series_uid,
    unique_models,
)
from dicom_out import wording
from pipeline.result import Decision, ImageFinding, StudyResult

logger = logging.getLogger(__name__)

KEY_DECISIONS = frozenset({Decision.POSITIVE, Decision.DOUBTFUL})
"""Image decisions whose images are selected."""


def build_key_object_selection(
    result: StudyResult,
    sources: Mapping[str, pydicom.Dataset],
    secondary_captures: Sequence[pydicom.Dataset],
    settings: OutputSettings,
) -> pydicom.Dataset | None:
    """Build the Key Object Selection of the positive images of a study, if any.

    Parameters
    ----------
    result
        The study result; images whose decision is positive or doubtful are selected.
    sources
        Source instances keyed by SOP Instance UID (every analysed instance).
    secondary_captures
        Heat maps of the study; those derived from a selected image are selected
        too (matched through their Source Image Sequence).
    settings
        Series and equipment settings (``ko_series_number``/``description``).

    Returns
    -------
    pydicom.Dataset or None
        A Key Object Selection Document (SOP Class 1.2.840.10008.5.1.4.1.1.88.59),
        or ``None`` when no image is positive or doubtful.
    """
    head = study_head(result, sources)
    selected = [o for o in result.outcomes()
                if isinstance(o, ImageFinding) and o.decision in KEY_DECISIONS]
    if not selected:
        return None
    uids = {f.meta.sop_instance_uid for f in selected}
    objects = [evidence_dataset(sources[f.meta.sop_instance_uid]) for f in selected]
    for sc in secondary_captures:
        refs = {item.ReferencedSOPInstanceUID for item in sc.get("SourceImageSequence", [])}
        if refs & uids:
            objects.append(evidence_dataset(sc))
    models = unique_models(m for f in result.findings for m in finding_models(f))
    observer = device_observer(settings)
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=objects,
        observer_device_context=observer,
        description=wording.key_object_description(result),
    )
    ds = hd.ko.KeyObjectSelectionDocument(
        evidence=[reference_dataset(head), *objects],
        content=content,
        series_instance_uid=study_series_uid(result.study_instance_uid, models, "ko"),
        series_number=settings.ko_series_number,
        sop_instance_uid=study_output_uid(result.study_instance_uid, uids, models, "ko"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        institution_name=settings.institution_name,
        contributing_equipment=contributing_equipment(models, settings),
        series_description=series_description(settings.ko_series_description,
                                              wording.study_finding(result, "/")),
        manufacturer_model_name=settings.manufacturer_model_name,
        software_versions=settings.software_version,
    )
    for item in ds.ContentSequence:
        # TID 2010 row 8: an IMAGE item of a key object selection has no concept name
        # (highdicom writes "Source"; PixelMed's DicomSRValidator rejects it)
        if item.ValueType in ("IMAGE", "COMPOSITE") and "ConceptNameCodeSequence" in item:
            del item.ConceptNameCodeSequence
    copy_patient_study(head, ds)
    logger.debug("built key object selection %s: %d object(s)", ds.SOPInstanceUID, len(objects))
    return ds
