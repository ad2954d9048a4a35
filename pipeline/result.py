"""Typed values exchanged between the stages of fracture-node.

Data flows one way: ``node`` receives -> ``pipeline`` decides -> ``dicom_out`` builds
-> ``node`` delivers.  The stages exchange the frozen dataclasses defined here, never
strings or dicts, and never labels aligned by list position.

Outcome of one instance is either an :class:`ImageFinding` (the image was analysed)
or a :class:`Refusal` (it was not, with a reason code and text).  A study's outcome is
a :class:`StudyResult`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


class Decision(enum.StrEnum):
    """Answer for an image, a body part in a study, or a whole study."""

    POSITIVE = "positive"
    """Fracture / abnormality probability at or above the upper edge of the doubt band."""
    DOUBTFUL = "doubtful"
    """Probability inside the doubt band around the operating threshold."""
    NEGATIVE = "negative"
    """Probability below the lower edge of the doubt band."""
    NEEDS_REVIEW = "needs-review"
    """The models are not confident enough (below the confidence floor) to answer."""
    NOT_ANALYSED = "not-analysed"
    """The image was refused before or by the router; see the :class:`Refusal`."""


class RefusalCode(enum.StrEnum):
    """Why an instance was not analysed.  Values are stable: they appear in the SR,
    the PDF, the job database and the conformance statement."""

    NOT_AN_IMAGE = "not-an-image"
    """SOP class without pixel data (SR, PDF, presentation state, ...)."""
    OWN_OUTPUT = "own-output"
    """An object that fracture-node created itself (prevents routing loops)."""
    UNSUPPORTED_MODALITY = "unsupported-modality"
    """Not a projection radiograph (CT, MR, NM, US, ...)."""
    COLOUR_IMAGE = "colour-image"
    """A colour photograph, screenshot or colour-rendered image (HSV saturation check)."""
    DOCUMENT = "document"
    """A scanned page or document-like image."""
    UNSUPPORTED_PHOTOMETRIC = "unsupported-photometric"
    """A Photometric Interpretation we do not convert (PALETTE COLOR, YBR_* ...)."""
    BAD_PIXEL_ATTRIBUTES = "bad-pixel-attributes"
    """Missing or mutually inconsistent Rows/Columns/Bits*/Samples per Pixel."""
    ABSURD_SIZE = "absurd-size"
    """Declared matrix too small or too large to be a radiograph we handle."""
    DECODE_FAILED = "decode-failed"
    """The pixel data could not be decoded (truncated, corrupt, unknown syntax)."""
    UNSUPPORTED_BODY_PART = "unsupported-body-part"
    """The router says the image shows a body part without a validated classifier."""
    BODY_PART_CONFLICT = "body-part-conflict"
    """The DICOM header names a body part that contradicts the router: needs human
    review, not analysed as either (``pipeline/bodypart.py``)."""
    BODY_PART_UNCERTAIN = "body-part-uncertain"
    """The router is sure of neither a body part nor its family (below its confidence
    floor): needs human review, not analysed (``pipeline.classify.router_answer``)."""


@dataclass(frozen=True)
class ImageMetadata:
    """Identifying and routing attributes read from one source instance.

    Patient-identifying attributes are deliberately absent: this object is logged.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str = ""
    body_part_examined: str = ""
    study_description: str = ""
    series_description: str = ""
    view_position: str = ""
    laterality: str = ""
    """ImageLaterality, else Laterality of the series, else ``""``."""
    patient_age: str = ""
    rows: int = 0
    columns: int = 0
    number_of_frames: int = 1
    photometric_interpretation: str = ""
    transfer_syntax_uid: str = ""
    series_number: int | None = None
    """Series Number (0020,0011) of the source, how a reader finds the image in a viewer."""
    instance_number: int | None = None
    """Instance Number (0020,0013) of the source within its series."""
    protocol_name: str = ""
    """Protocol Name (0018,1030)."""
    anatomic_region: str = ""
    """Code meaning(s) of the Anatomic Region Sequence (0008,2218), ``"; "``-joined."""


@dataclass(frozen=True)
class NormalisedImage:
    """A decoded radiograph on one intensity scale (the contract of ``normalise.py``).

    ``pixels`` is float32, 2-D, in [0, 1], with bone bright (MONOCHROME1 inverted),
    after Modality LUT and VOI LUT (or a robust percentile window).  It may be a
    reduced-resolution version of the stored image (e.g. a JPEG 2000 resolution
    level): ``source_shape`` is the stored (Rows, Columns) and the ratio between the
    two is :attr:`decode_scale`.
    """

    meta: ImageMetadata
    pixels: np.ndarray
    source_shape: tuple[int, int]
    notes: tuple[str, ...] = ()
    """Things worth recording that are not errors ("first frame of 10 used", ...)."""

    @property
    def decode_scale(self) -> float:
        """``pixels.shape[0] / Rows`` (1.0 for a full-resolution decode)."""
        return float(self.pixels.shape[0]) / float(self.source_shape[0])


@dataclass(frozen=True)
class GridTransform:
    """Maps the square model grid back to the normalised image grid.

    The image was scaled by ``scale`` (aspect ratio kept) and padded by ``pad_top``
    / ``pad_left`` pixels into a ``size`` x ``size`` square.  A model-grid point
    (r, c) lies at ((r - pad_top) / scale, (c - pad_left) / scale) in the image grid
    ``image_shape``.
    """

    size: int
    scale: float
    pad_top: int
    pad_left: int
    image_shape: tuple[int, int]

    def to_image(self, model_map: np.ndarray) -> np.ndarray:
        """Resample a map on the model grid (any square resolution) to ``image_shape``.

        The padding is cut away first, so the map lines up with the image pixels.
        """
        import cv2

        k = model_map.shape[0] / float(self.size)
        rows, cols = self.image_shape
        top = self.pad_top * k
        left = self.pad_left * k
        height = rows * self.scale * k
        width = cols * self.scale * k
        r0, c0 = int(round(top)), int(round(left))
        r1 = max(r0 + 1, int(round(top + height)))
        c1 = max(c0 + 1, int(round(left + width)))
        crop = np.ascontiguousarray(model_map[r0:r1, c0:c1], dtype=np.float32)
        return cv2.resize(crop, (cols, rows), interpolation=cv2.INTER_LINEAR)


@dataclass(frozen=True)
class ModelInput:
    """What a model sees: a ``size`` x ``size`` float32 array in [0, 1] and the
    transform back to the :class:`NormalisedImage` it came from."""

    array: np.ndarray
    transform: GridTransform


@dataclass(frozen=True)
class ModelInfo:
    """Identity of one model as recorded in the registry and in every output."""

    name: str
    version: str
    architecture: str
    weights_sha256: str
    device_uid: str
    """A DICOM UID standing for this model version (Contributing Equipment)."""
    finding: str = ""
    """What the classifier's probability means, as every output names it: ``"fracture"``
    for a fracture-labelled output, ``"abnormality"`` for MURA's abnormal study
    (fracture, hardware, degenerative change, lesion).  Routers: ``"body part"``
    (``""`` where unknown)."""
    validated: tuple[str, ...] = ()
    """Plain sentences of the validated metrics from the registry ("Forearm: AUROC 0.89
    (95 % CI 0.83-0.94) on 133 validation studies")."""
    precision: str = "fp32"
    """The arithmetic the model is served in (``fp32``, ``bf16``): the same weights in
    bf16 are another model, with other numbers and other result UIDs."""


@dataclass(frozen=True)
class Refusal:
    """An instance that was not analysed, and why.  A value, not an exception."""

    meta: ImageMetadata
    code: RefusalCode
    text: str
    """Technical detail of the reason (kept in the SR comment and the job database)."""
    body_part: str = ""
    """For ``UNSUPPORTED_BODY_PART``, ``BODY_PART_CONFLICT`` and ``BODY_PART_UNCERTAIN``:
    the router's (first) answer
    (``"OTHER"`` for an out-of-scope region), so the wording can name it."""
    header: str = ""
    """For ``BODY_PART_CONFLICT``: the region the header names and where
    (``"lower limb (StudyDescription 'XR TIBIA')"``)."""


@dataclass(frozen=True)
class ImageFinding:
    """The analysis of one radiograph by the two models."""

    image: NormalisedImage
    transform: GridTransform
    body_part: str
    """Router answer, upper case as in BodyPartExamined (``"WRIST"``)."""
    body_part_probability: float
    body_part_probabilities: Mapping[str, float]
    fracture_probability: float
    """Calibrated probability of fracture / abnormality for this image."""
    threshold: float
    """Operating threshold of the body part (from the registry)."""
    doubt_band: tuple[float, float]
    """(low, high): below low is negative, at or above high is positive."""
    decision: Decision
    heatmap: np.ndarray
    """Grad-CAM, float32 in [0, 1], on the classifier's feature grid (24 x 24 for a
    384 px model) or on the model square (``transform.size``).  The node keeps the
    feature grid (2 KB an image instead of 0.6 MB while a study waits for its build);
    :func:`dicom_out.common.heatmap_on_image` resamples it onto the model square, as
    :meth:`pipeline.classify.Analyser.predict_classifier` does, then onto the image."""
    router: ModelInfo
    classifier: ModelInfo
    notes: tuple[str, ...] = ()
    """E.g. a BodyPartExamined that disagrees with the router."""

    @property
    def meta(self) -> ImageMetadata:
        return self.image.meta


ImageOutcome = ImageFinding | Refusal


@dataclass(frozen=True)
class BodyPartDecision:
    """Study-level answer for one body part.

    ``probability`` is the mean of its images' probabilities (MURA's validated rule)
    and ``mean_decision`` what that mean says against the operating point.  The
    ``decision`` is never less severe than the most severe image decision
    (:func:`pipeline.aggregate.aggregate_study`), so an added normal view cannot hide
    a suspicious one.
    """

    body_part: str
    probability: float
    threshold: float
    doubt_band: tuple[float, float]
    decision: Decision
    sop_instance_uids: tuple[str, ...]
    mean_decision: Decision = Decision.NOT_ANALYSED
    """The decision of the plain mean rule (reported beside ``decision``)."""
    image_decisions: Mapping[str, Decision] = field(default_factory=dict)
    """Decision of each image of the part, by SOP Instance UID."""
    classifier: ModelInfo | None = None
    """The model whose probability the part's images carry (the fracture classifier, or
    a head such as the abnormality head): what ``probability`` measures."""

    def count(self, *decisions: Decision) -> int:
        """How many of the part's images have one of ``decisions``."""
        return sum(1 for d in self.image_decisions.values() if d in decisions)


@dataclass(frozen=True)
class StudyResult:
    """Everything decided about one study."""

    study_instance_uid: str
    findings: tuple[ImageFinding, ...]
    refusals: tuple[Refusal, ...]
    by_body_part: Mapping[str, BodyPartDecision] = field(default_factory=dict)
    models: tuple[ModelInfo, ...] = ()
    """The models that produced the findings (router first, then classifier)."""
    decision: Decision = Decision.NOT_ANALYSED
    """Worst case over body parts and images: positive > doubtful > needs-review >
    negative; not-analysed when no image was analysed."""

    def outcomes(self) -> tuple[ImageFinding | Refusal, ...]:
        """Findings and refusals in reading order: by source Series Number, then
        Instance Number (unknown last), then SOP Instance UID."""
        return tuple(sorted((*self.findings, *self.refusals), key=lambda o: reading_order(o.meta)))


def reading_order(meta: ImageMetadata) -> tuple[int, int, str, str]:
    """Sort key of an instance as a viewer lists it (series, instance, UIDs)."""
    big = 2**31
    series = meta.series_number if meta.series_number is not None else big
    instance = meta.instance_number if meta.instance_number is not None else big
    return (series, instance, meta.series_instance_uid, meta.sop_instance_uid)


NODE_MANUFACTURER = "fracture-node"
"""Manufacturer (0008,0070) of every object fracture-node writes.  ``validate.py``
refuses any incoming instance that carries it, so a routing rule cannot make a loop."""

NODE_MODEL_NAME = "fracture-node AI results"
"""Manufacturer's Model Name (0008,1090) of every object fracture-node writes."""
