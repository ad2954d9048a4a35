"""The model registry: ``models/registry.toml`` read into frozen dataclasses.

Each ``[models.<name>]`` table names one model version: role (``router``,
``classifier``, or ``head``: a second dense head on a classifier's pooled features, its
``base`` the classifier's name and ``base_sha256`` its weights), architecture, input size, classes, weights file (relative to the
registry file) and its SHA-256, the exported serving graph and its SHA-256 (what the
node runs, :mod:`models.runtime`), training data, Device UID, calibration temperature,
confidence floor, per-body-part operating points (threshold and doubt band) and the
metrics it shipped with.  :func:`load_keras_model` verifies the SHA-256 of the weights
*before* handing the file to Keras, and loads with ``safe_mode=True`` (no arbitrary
code from a model file); :func:`verify_graph` does the same for the exported graph
before :func:`models.runtime.load_graph` parses it.  Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pipeline.result import ModelInfo

logger = logging.getLogger(__name__)

ROLES = ("router", "classifier", "head")
FINDINGS = ("fracture", "abnormality")
PRECISIONS = ("fp32", "bf16")
"""Arithmetic a model's graph is served in (by OpenVINO): ``fp32`` or ``bf16`` (on a
CPU with bfloat16 instructions).  A bf16 entry is its own model version,
calibrated and evaluated on its own outputs (:mod:`models.runtime`)."""
"""What a classifier output may mean: fracture-labelled training, or MURA's abnormal study."""
DEFAULT_PART = "DEFAULT"
"""Operating point used for a body part without its own entry (e.g. needs-review images)."""


class RegistryError(Exception):
    """The registry file is missing, malformed, or names something that is not there."""


class WeightsIntegrityError(RegistryError):
    """A weights file does not have the SHA-256 the registry records."""


@dataclass(frozen=True)
class OperatingPoint:
    """Threshold and doubt band of one body part (calibrated probabilities)."""

    threshold: float
    doubt_low: float
    doubt_high: float

    def __post_init__(self) -> None:
        if not (0.0 <= self.doubt_low <= self.threshold <= self.doubt_high <= 1.0):
            raise RegistryError(
                "operating point must satisfy 0 <= doubt_low <= threshold <= doubt_high <= 1, "
                f"got {self.doubt_low}, {self.threshold}, {self.doubt_high}"
            )

    @property
    def doubt_band(self) -> tuple[float, float]:
        """(low, high) as in :class:`~pipeline.result.ImageFinding`."""
        return (self.doubt_low, self.doubt_high)


@dataclass(frozen=True)
class ModelEntry:
    """One registered model version."""

    name: str
    version: str
    role: str
    architecture: str
    input_size: int
    classes: tuple[str, ...]
    weights: Path
    sha256: str
    device_uid: str
    training_data: str = ""
    feature_layer: str = "f18_relu"
    temperature: float = 1.0
    confidence_floor: float = 0.0
    operating_points: Mapping[str, OperatingPoint] = field(default_factory=dict)
    test_time_flip: bool = False
    """Also run the mirrored image: the classifier averages the two feature maps (the
    logit and Grad-CAM then come from the mean map), the router the two logits (see
    :mod:`pipeline.classify`)."""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    notes: str = ""
    finding: str = ""
    """What a classifier's probability means (``fracture`` or ``abnormality``), named
    so in every output; a router's is ``body part``."""
    graph: Path | None = None
    """The exported serving graph (``models.training.export``), relative to the registry
    file in the TOML; ``None`` for an entry registered before graphs were exported."""
    graph_sha256: str = ""
    graph_format: str = ""
    precision: str = "fp32"
    """What the graph is served in (:data:`PRECISIONS`); its thresholds and metrics were
    chosen and measured in that arithmetic."""
    families: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """A classifier's families of router parts that share one operating point
    (``UPPER_LIMB`` = fingers to elbow): an image whose router answer is sure of the
    family but of none of its parts is analysed as the family
    (:func:`pipeline.classify.router_answer`)."""
    base: str = ""
    """A head's classifier (registry name): the head reads that classifier's pooled
    features and decides the body parts of its own operating points."""
    base_sha256: str = ""
    """The SHA-256 of the base classifier's weights the head was fitted on: a head
    is loaded only beside exactly that classifier."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise RegistryError(f"model {self.name}: role must be one of {ROLES}, not {self.role!r}")
        if self.role in ("classifier", "head") and self.finding not in FINDINGS:
            raise RegistryError(
                f"model {self.name}: finding must be one of {', '.join(FINDINGS)} "
                f"(what its probability means), not {self.finding!r}"
            )
        if self.input_size < 32:
            raise RegistryError(f"model {self.name}: input_size must be >= 32")
        if len(self.sha256) != 64:
            raise RegistryError(f"model {self.name}: sha256 must be 64 hex digits")
        if not self.device_uid or len(self.device_uid) > 64:
            raise RegistryError(f"model {self.name}: device_uid must be a DICOM UID (<= 64 chars)")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise RegistryError(f"model {self.name}: temperature must be positive")
        if not 0.0 <= self.confidence_floor < 1.0:
            raise RegistryError(f"model {self.name}: confidence_floor must be in [0, 1)")
        if self.precision not in PRECISIONS:
            raise RegistryError(f"model {self.name}: precision must be one of {', '.join(PRECISIONS)}, "
                                f"not {self.precision!r}")
        if self.role == "head" and (not self.base or len(self.base_sha256) != 64):
            raise RegistryError(f"model {self.name}: a head needs base (a classifier's name) and "
                                "base_sha256 (64 hex digits, that classifier's weights)")
        if self.graph is not None and len(self.graph_sha256) != 64:
            raise RegistryError(f"model {self.name}: graph_sha256 must be 64 hex digits")
        for family, parts in self.families.items():
            if len({self.operating_points.get(part) for part in parts}) > 1:
                raise RegistryError(
                    f"model {self.name}: the parts of family {family} "
                    f"({', '.join(parts)}) must share one operating point or have none")

    @property
    def info(self) -> ModelInfo:
        """The identity recorded in every output."""
        return ModelInfo(
            name=self.name,
            version=self.version,
            architecture=self.architecture,
            weights_sha256=self.sha256,
            device_uid=self.device_uid,
            finding=self.finding or "body part",
            validated=validation_summary(self),
            precision=self.precision,
        )

    @property
    def supported_body_parts(self) -> tuple[str, ...]:
        """Body parts with a validated operating point (classifier or head)."""
        return tuple(sorted(p for p in self.operating_points if p != DEFAULT_PART))

    @property
    def supported_answers(self) -> frozenset[str]:
        """Router answers the classifier analyses: its supported parts, and the families
        whose parts are all supported."""
        parts = set(self.supported_body_parts)
        return frozenset(parts | {f for f, members in self.families.items()
                                  if members and set(members) <= parts})

    def operating_point(self, body_part: str) -> OperatingPoint:
        """The body part's operating point (a family's is its parts'), else the
        ``DEFAULT`` one."""
        if body_part in self.families and self.families[body_part]:
            body_part = self.families[body_part][0]
        if body_part in self.operating_points:
            return self.operating_points[body_part]
        if DEFAULT_PART in self.operating_points:
            return self.operating_points[DEFAULT_PART]
        raise RegistryError(f"model {self.name}: no operating point for {body_part} and no DEFAULT")


@dataclass(frozen=True)
class Registry:
    """All models of one registry file."""

    path: Path
    models: Mapping[str, ModelEntry]

    def heads_of(self, classifier: ModelEntry) -> tuple[ModelEntry, ...]:
        """The heads registered on ``classifier`` (by name), in name order.

        Raises
        ------
        RegistryError
            A head names this classifier but was fitted on other weights, or decides a
            body part the classifier (or another head) already decides."""
        heads = tuple(e for _, e in sorted(self.models.items())
                      if e.role == "head" and e.base == classifier.name)
        taken = {p: classifier.name for p in classifier.supported_body_parts}
        for head in heads:
            if head.base_sha256 != classifier.sha256:
                raise RegistryError(
                    f"head {head.name} {head.version} was fitted on {head.base} weights "
                    f"{head.base_sha256[:12]}..., the registry's {classifier.name} is "
                    f"{classifier.sha256[:12]}...: fit the head again (python -m "
                    "models.training.head) or remove it from the registry")
            if head.test_time_flip != classifier.test_time_flip:
                with_mirror = "with" if head.test_time_flip else "without"
                raise RegistryError(
                    f"head {head.name} {head.version} was fitted on {head.base} features {with_mirror} "
                    f"the mirrored image, the registry's {classifier.name} {classifier.version} serves "
                    f"test_time_flip = {str(classifier.test_time_flip).lower()}: fit the head again "
                    "(python -m models.training.head) or remove it from the registry")
            for part in head.supported_body_parts:
                if part in taken:
                    raise RegistryError(f"head {head.name} decides {part}, which {taken[part]} "
                                        "already decides: give each body part one model")
                taken[part] = head.name
        return heads

    def get(self, name: str, role: str | None = None) -> ModelEntry:
        """The entry called ``name`` (optionally checking its role)."""
        if name not in self.models:
            raise RegistryError(
                f"model {name!r} is not in {self.path} (registered: {', '.join(sorted(self.models))})"
            )
        entry = self.models[name]
        if role is not None and entry.role != role:
            raise RegistryError(f"model {name!r} is a {entry.role}, not a {role}")
        return entry


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, not {value!r}")
    return value


def _entry(name: str, raw: Mapping[str, Any], base: Path) -> ModelEntry:
    try:
        points = {
            part: OperatingPoint(float(p["threshold"]), float(p["doubt_band"][0]), float(p["doubt_band"][1]))
            for part, p in raw.get("operating_points", {}).items()
        }
        return ModelEntry(
            name=name,
            version=str(raw["version"]),
            role=str(raw["role"]),
            architecture=str(raw["architecture"]),
            input_size=int(raw["input_size"]),
            classes=tuple(str(c) for c in raw["classes"]),
            weights=(base / str(raw["weights"])).resolve(),
            sha256=str(raw["sha256"]).lower(),
            device_uid=str(raw["device_uid"]),
            training_data=str(raw.get("training_data", "")),
            feature_layer=str(raw.get("feature_layer", "f18_relu")),
            temperature=float(raw.get("temperature", 1.0)),
            confidence_floor=float(raw.get("confidence_floor", 0.0)),
            operating_points=MappingProxyType(points),
            test_time_flip=_bool(raw.get("test_time_flip", False), "test_time_flip"),
            metrics=MappingProxyType(dict(raw.get("metrics", {}))),
            notes=str(raw.get("notes", "")),
            finding=str(raw.get("finding", "abnormality" if raw.get("role") in ("classifier", "head") else "")),
            graph=(base / str(raw["graph"])).resolve() if "graph" in raw else None,
            graph_sha256=str(raw.get("graph_sha256", "")).lower(),
            graph_format=str(raw.get("graph_format", "onnx" if "graph" in raw else "")),
            precision=str(raw.get("precision", "fp32")),
            families=MappingProxyType({str(f): tuple(str(p) for p in parts)
                                       for f, parts in raw.get("families", {}).items()}),
            base=str(raw.get("base", "")),
            base_sha256=str(raw.get("base_sha256", "")).lower(),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise RegistryError(f"model {name!r} in registry is malformed: {exc!r}") from exc


FRACATLAS_REGIONS = {
    "hand": "Fingers to elbow (FracAtlas HAND region)", "leg": "Knee to foot (FracAtlas LEG region)",
    "shoulder": "Shoulder (FracAtlas SHOULDER region)", "hip": "Hip (FracAtlas HIP region)",
}
"""Labels of the per-region fracture metrics (``fracatlas_<region>_image_auroc``, ...)."""


def _interval(metrics: Mapping[str, Any], key: str) -> str:
    ci = metrics.get(f"{key}_ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return f" (95 % CI {float(ci[0]):.2f}\u2013{float(ci[1]):.2f})"
    return ""


def validation_summary(entry: ModelEntry) -> tuple[str, ...]:
    """Plain sentences of an entry's validated metrics, for the reports.

    Classifier: per FracAtlas region (``fracatlas_<region>_image_*``, a fracture
    classifier), then per supported body part, the study-level AUROC (``<part>_study_auroc``,
    its ``_ci95`` and ``<part>_studies``) and kappa, or the image-level AUROC
    (``<part>_image_auroc``, ``<part>_images``) with sensitivity and specificity at
    the operating point where recorded.  Router: accuracy on the supported parts.
    Keys that are absent are left out; nothing is made up.
    """
    m = entry.metrics
    split = str(m.get("split", "validation"))
    split = "validation" if split == "val" else split
    lines: list[str] = []
    if entry.role == "router":
        for key, what in (("pooled_accuracy_supported", "pooled per examination"),
                          ("accuracy_supported", "image by image")):
            if key in m:
                lines.append(f"Body-part accuracy on the supported parts {float(m[key]):.3f} "
                             f"({what}, {split} split)")
        return tuple(lines)
    keys = [(part.lower(), part.replace("_", " ").capitalize()) for part in entry.supported_body_parts]
    keys = [(f"fracatlas_{r}", label) for r, label in FRACATLAS_REGIONS.items()] + keys
    for low, name in keys:
        for level, unit in (("study", "studies"), ("image", "images")):
            key = f"{low}_{level}_auroc"
            if key not in m:
                continue
            text = f"{name}: AUROC {float(m[key]):.2f}{_interval(m, key)}"
            count = m.get(f"{low}_{unit}")
            if count is not None:
                text += f" on {int(count)} {split} {unit}"
            extras = [f"{label} {float(m[f'{low}_{level}_{k}']):.2f}"
                      for k, label in (("kappa", "kappa"), ("sensitivity", "sensitivity"),
                                       ("specificity", "specificity"))
                      if f"{low}_{level}_{k}" in m]
            if extras:
                text += "; " + ", ".join(extras)
            lines.append(text)
            break
    return tuple(lines)


def load_registry(path: Path) -> Registry:
    """Read and check a registry TOML file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RegistryError(f"cannot read model registry {path}: {exc}") from exc
    tables = raw.get("models")
    if not isinstance(tables, dict) or not tables:
        raise RegistryError(f"{path} has no [models.<name>] tables")
    models = {name: _entry(name, t, path.parent) for name, t in tables.items()}
    return Registry(path=path, models=MappingProxyType(models))


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_file(entry: ModelEntry, what: str, path: Path, expected: str) -> None:
    """Raise :class:`WeightsIntegrityError` unless ``path`` exists and has ``expected``."""
    if not path.is_file():
        raise WeightsIntegrityError(f"{what} of {entry.name} not found: {path}")
    actual = sha256_of(path)
    if actual != expected:
        verb = "have" if what == "weights" else "has"
        raise WeightsIntegrityError(
            f"{what} of {entry.name} {entry.version} at {path} {verb} SHA-256 {actual}, "
            f"the registry records {expected}"
        )


def verify_weights(entry: ModelEntry) -> None:
    """Raise :class:`WeightsIntegrityError` unless the weights file has the recorded hash."""
    _verify_file(entry, "weights", entry.weights, entry.sha256)


def verify_graph(entry: ModelEntry) -> None:
    """Raise :class:`WeightsIntegrityError` unless the exported graph exists and has the
    recorded hash (the runtime's counterpart of :func:`verify_weights`)."""
    if entry.graph is None:
        raise WeightsIntegrityError(
            f"{entry.name} {entry.version} has no exported graph in the registry: run "
            "`fracture-node export` (python -m models.training.export)"
        )
    _verify_file(entry, "graph", entry.graph, entry.graph_sha256)


def load_keras_model(entry: ModelEntry) -> Any:
    """Verify the hash, then load the ``.keras`` file with ``safe_mode=True``."""
    verify_weights(entry)
    import keras

    model = keras.models.load_model(entry.weights, compile=False, safe_mode=True)
    logger.info("loaded %s %s (%s, sha256 %s...)", entry.name, entry.version,
                entry.weights.name, entry.sha256[:12])
    return model


def device_uid_for(name: str, version: str, sha256: str) -> str:
    """A stable 2.25 UUID-derived DICOM UID for one model version."""
    import uuid

    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, f"fracture-node/{name}/{version}/{sha256}").int)
