"""Stage 1 (body-part router) and stage 2 (fracture classifier, and its heads) with Grad-CAM.

:class:`Analyser` loads the exported graphs of the two models named in
``config.toml`` from the registry once (hash verified; :mod:`models.runtime`, no
TensorFlow) and warms them up.  :meth:`Analyser.analyse` takes the normalised images of a study and
returns one :class:`~pipeline.result.ImageFinding` or
:class:`~pipeline.result.Refusal` per image, in order:

* the router's probabilities are pooled over the images of a study that share a
  BodyPartExamined (one examination of one part, seen in several projections; see
  :func:`pooled_router_probabilities`), except that an image the router itself calls
  ``OTHER`` with confidence stays out of the pool and is refused;
* router answer ``OTHER``, or a body part without validated classifier metrics ->
  ``Refusal(UNSUPPORTED_BODY_PART)`` naming the part;
* router probability below the router's confidence floor -> analysed as the part's
  family (its finding site) when the family's parts together reach the floor, else
  ``Refusal(BODY_PART_UNCERTAIN)`` "needs human review" (:func:`router_answer`);
* otherwise the calibrated probability ``sigmoid(logit / T)`` against the body
  part's doubt band: positive / doubtful / negative;
* a header that names a body part (BodyPartExamined; where blank or generic, the
  Anatomic Region Sequence, Series/Study Description, Protocol Name;
  :mod:`pipeline.bodypart`) the router's answer disagrees with -> analysed as the
  header's part if that part is supported and among the router's top answers, else
  ``Refusal`` "needs human review: body part disagrees with the header";
* an image that cannot be prepared or analysed -> a ``Refusal`` (never an exception).

Grad-CAM comes from the same forward pass (:mod:`pipeline.gradcam`).
"""

from __future__ import annotations

import logging
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.registry import ModelEntry, load_registry
from models.runtime import ServingGraph, load_graph, load_head
from pipeline.bodypart import header_body_part, reassignment
from pipeline.gradcam import gradcam_closed_form, upsample
from pipeline.resize import fit_square
from pipeline.result import (
    Decision,
    GridTransform,
    ImageFinding,
    ModelInfo,
    NormalisedImage,
    Refusal,
    RefusalCode,
)

logger = logging.getLogger(__name__)

OTHER = "OTHER"
MAX_BATCH = 16
"""Default images per model run (the graphs also see their mirrors): what the
evaluation uses.  The node sets its own (``[worker] batch_images``): the runtime keeps
the buffers of its largest run, so memory grows with the batch (``bench/batching.py``)."""


@dataclass(frozen=True)
class RawPredictions:
    """Model outputs for a batch, before decisions (used by the evaluation too)."""

    router_probabilities: np.ndarray
    """``(n, n_router_classes)`` softmax of the router."""
    classifier_logits: np.ndarray
    """``(n,)`` raw logits of the classifier."""
    fracture_probabilities: np.ndarray
    """``(n,)`` calibrated probabilities ``sigmoid(logit / T)``."""
    heatmaps: np.ndarray
    """``(n, size, size)`` Grad-CAM of the classifier logit on the classifier grid."""


@dataclass(frozen=True)
class _Route:
    """The router's answer for one image that goes on to the classifier."""

    part: str
    """A router class, or a family of them (:func:`router_answer`)."""
    probability: float
    probabilities: np.ndarray
    """Pooled router probabilities, in the router's class order."""
    notes: tuple[str, ...]


UNCERTAIN = ""
""":attr:`RouterAnswer.part` when the router is sure of neither a part nor a family."""


@dataclass(frozen=True)
class RouterAnswer:
    """What the node takes the router to say about one image (before the header)."""

    part: str
    """The router's first class when its probability reaches the confidence floor (or
    it is ``OTHER``); else the family of that class (:attr:`ModelEntry.families`: parts
    that share one operating point) when the family's parts together reach the floor;
    else :data:`UNCERTAIN`."""
    probability: float
    """Of ``part`` (the family's parts together for a family)."""
    top: str
    """The router's first class."""


def router_answer(probabilities: np.ndarray, classes: Sequence[str],
                  families: Mapping[str, Sequence[str]], floor: float) -> RouterAnswer:
    """The router's answer as the node takes it, from (pooled) probabilities.

    A part is named only when the router gives it at least ``floor``: below that, an
    image whose family is sure (e.g. a wrist or a finger, p = 0.48 and 0.41: the upper
    limb, 0.93) is analysed as the family, whose operating point is the same for all
    its parts, with the family as its finding site; one whose family is not sure either
    is not analysed.  The node (:class:`Analyser`), ``evaluate`` and ``register`` all
    take the router's answer from here."""
    q = np.asarray(probabilities, dtype=np.float64)
    i = int(np.argmax(q))
    top, p = classes[i], float(q[i])
    if top == OTHER or p >= floor:
        return RouterAnswer(top, p, top)
    for family, parts in families.items():
        if top in parts and len(parts) > 1:
            together = float(sum(q[classes.index(c)] for c in parts if c in classes))
            if together >= floor:
                return RouterAnswer(family, together, top)
    return RouterAnswer(UNCERTAIN, p, top)


def _family_label(family: str) -> str:
    """``"UPPER_LIMB"`` -> ``"upper limb"``."""
    return family.replace("_", " ").lower()


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


def _with_mirrors(x: np.ndarray, flip: bool) -> np.ndarray:
    """``(n, h, w, 1)`` squares, followed by their left-right mirrors when ``flip``."""
    return np.concatenate([x, x[:, :, ::-1]]) if flip else x


def _mean_with_mirrors(out: np.ndarray, n: int, flip: bool, spatial: bool) -> np.ndarray:
    """Undo :func:`_with_mirrors` on a model output: the mean of each image's answer and
    its mirror's (a ``spatial`` map is mirrored back first)."""
    if not flip:
        return out
    mirrored = out[n:, :, ::-1] if spatial else out[n:]
    return 0.5 * (out[:n] + mirrored)


class ClassifierGraph:
    """The classifier as the node runs it: the exported graph's last feature map
    (:class:`models.runtime.ServingGraph`), the mirrored squares in the same batch
    when ``test_time_flip``, and the GAP + dense head applied in NumPy to the (mean) map.

    The head is linear in the map, so the logit of the mean map is the mean of the
    image's and its mirror's logits, and the closed-form Grad-CAM of that logit is
    drawn on the mean map: still one forward pass.  :class:`Analyser` and the
    calibration (``models.training.register``) share this class, so the temperature is
    fitted on exactly the logits the node computes.  The head's kernel and bias are
    the graph's own (:attr:`models.runtime.ServingGraph.head_kernel`); ``heads`` adds
    further dense heads on the same pooled map (registry role ``head``), one column of
    :attr:`kernels` each after the graph's.
    """

    def __init__(self, graph: ServingGraph, test_time_flip: bool,
                 heads: Sequence[tuple[np.ndarray, float]] = ()) -> None:
        self.graph = graph
        self.test_time_flip = bool(test_time_flip)
        self.head_kernel = np.asarray(graph.head_kernel, dtype=np.float64)
        self.head_bias = float(np.asarray(graph.head_bias)[0])
        columns = [self.head_kernel[:, :1]] + [np.asarray(k, np.float64).reshape(-1, 1) for k, _ in heads]
        self.kernels = np.concatenate(columns, axis=1)
        """``(c, 1 + len(heads))``: the graph's head, then each added head."""
        self.biases = np.array([self.head_bias] + [float(b) for _, b in heads])

    @property
    def grid(self) -> int:
        """Side of the feature map, the grid Grad-CAM is computed on."""
        return int(self.graph.feature_grid)

    def features(self, squares: np.ndarray) -> np.ndarray:
        """The last feature map ``(n, h, w, c)`` of prepared squares ``(n, s, s)``."""
        x = np.asarray(squares, np.float32)[..., None]
        _, feats = self.graph.run(_with_mirrors(x, self.test_time_flip))
        return _mean_with_mirrors(np.asarray(feats), len(x), self.test_time_flip, spatial=True)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """The head's logit for each feature map (float64)."""
        return features.mean(axis=(1, 2), dtype=np.float64) @ self.head_kernel[:, 0] + self.head_bias

    def all_logits(self, features: np.ndarray) -> np.ndarray:
        """``(n, heads)``: every head's logit for each feature map (float64), column 0
        the graph's own (:meth:`logits`)."""
        return features.mean(axis=(1, 2), dtype=np.float64) @ self.kernels + self.biases


class RouterGraph:
    """The router as the node runs it: the softmax of the exported graph's logits, with
    ``test_time_flip`` the softmax of the mean of the image's and its mirror's logits.
    :class:`Analyser` and the fracture calibration (``models.training.register``) share it."""

    def __init__(self, graph: ServingGraph, test_time_flip: bool) -> None:
        self.graph = graph
        self.test_time_flip = bool(test_time_flip)

    def probabilities(self, squares: np.ndarray) -> np.ndarray:
        """Router softmax ``(n, classes)`` for prepared squares ``(n, s, s)`` in [0, 1]."""
        x = np.asarray(squares, np.float32)[..., None]
        logits, _ = self.graph.run(_with_mirrors(x, self.test_time_flip))
        r = np.asarray(logits).astype(np.float64)
        return _softmax(_mean_with_mirrors(r, len(x), self.test_time_flip, spatial=False))


def pooled_router_probabilities(probabilities: np.ndarray, groups: Sequence[str], other_index: int,
                                floor: float) -> np.ndarray:
    """Router probabilities pooled (mean) over the images of each group.

    A radiographic examination images one body part in several projections, and a
    single projection can be ambiguous (a forearm view that is mostly wrist); the
    mean over the examination's images decides for all of them, as MURA's rule does
    for the abnormality.  Images whose own answer is ``OTHER`` at or above ``floor``
    keep their own probabilities and do not enter the pool, so pooling never
    turns an out-of-scope image into an analysed one.

    Parameters
    ----------
    probabilities
        ``(n, k)`` router softmax per image.
    groups
        ``n`` group keys (the node uses study UID + BodyPartExamined).
    other_index, floor
        Index of the ``OTHER`` class and the router's confidence floor.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    out = p.copy()
    keys = np.asarray(list(groups), dtype=object)
    own_other = (p.argmax(axis=1) == other_index) & (p.max(axis=1) >= floor) if len(p) else np.zeros(0, bool)
    for key in dict.fromkeys(keys.tolist()):
        members = (keys == key) & ~own_other
        if members.sum() > 1:
            out[members] = p[members].mean(axis=0)
    return out


class Coverage:
    """The body parts the loaded classifier and its heads analyse, and which of them
    decides each: the classifier its own operating points' parts, every head
    (registry role ``head``, on the classifier's pooled features) the parts of its own.
    A family (the classifier's :attr:`~models.registry.ModelEntry.families`) is
    analysed when all its parts are, by one model."""

    def __init__(self, classifier: ModelEntry, heads: Sequence[ModelEntry] = ()) -> None:
        self.classifier = classifier
        self.heads = tuple(heads)
        self._column: dict[str, int] = {p: 0 for p in classifier.supported_body_parts}
        for k, head in enumerate(self.heads, start=1):
            for part in head.supported_body_parts:
                if part in self._column:
                    raise ValueError(f"{part} is decided by two models ({head.name} and another)")
                self._column[part] = k
        self.families = classifier.families
        self.supported_body_parts = tuple(sorted(self._column))
        """Every body part some model has a validated operating point for."""
        self.supported_answers = frozenset(set(self._column) | {
            f for f, members in self.families.items()
            if members and set(members) <= set(self._column)
            and len({self._column[m] for m in members}) == 1})
        """Router answers that are analysed: the parts, and the families whose parts are
        all decided by one model."""

    def _part(self, answer: str) -> str:
        members = self.families.get(answer)
        return members[0] if answer not in self._column and members else answer

    def column(self, answer: str) -> int:
        """Which head decides a router answer: 0 the classifier's own, k the k-th head."""
        return self._column[self._part(answer)]

    def model(self, answer: str) -> ModelEntry:
        """The registry entry whose operating point and meaning a router answer gets."""
        k = self.column(answer)
        return self.classifier if k == 0 else self.heads[k - 1]

    def operating_point(self, answer: str) -> Any:
        """The answer's operating point, from the model that decides it."""
        return self.model(answer).operating_point(answer)


class Analyser:
    """The two loaded models (and the classifier's heads) with their registry entries;
    see the module docstring."""

    def __init__(self, router: ModelEntry, classifier: ModelEntry, router_graph: ServingGraph,
                 classifier_graph: ServingGraph, max_batch: int = MAX_BATCH,
                 heads: Sequence[tuple[ModelEntry, np.ndarray, float]] = ()) -> None:
        if router.role != "router" or classifier.role != "classifier":
            raise ValueError("Analyser needs a router entry and a classifier entry")
        for head, _, _ in heads:
            if head.role != "head" or head.base != classifier.name:
                raise ValueError(f"{head.name} is not a head of {classifier.name}")
        for entry, graph in ((router, router_graph), (classifier, classifier_graph)):
            if graph.input_size != entry.input_size:
                raise ValueError(f"{entry.name}: graph input {graph.input_size} px, registry "
                                 f"{entry.input_size} px")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch
        """Images per model run."""
        self._router = router
        self._classifier = classifier
        self._router_graph = router_graph
        self._routing = RouterGraph(router_graph, router.test_time_flip)
        self._classifier_graph = ClassifierGraph(classifier_graph, classifier.test_time_flip,
                                                 [(k, b) for _, k, b in heads])
        self.coverage = Coverage(classifier, [h for h, _, _ in heads])
        """Which body parts are analysed, and by which model (:class:`Coverage`)."""
        self.heads = tuple(heads)
        """The classifier's heads as given: (entry, kernel, bias); another :class:`Analyser`
        of the same models (another runtime, the Keras reference) takes them as they are."""

    @classmethod
    def load(cls, registry_path: pathlib.Path, router: str, classifier: str,
             threads: int | None = None, max_batch: int = MAX_BATCH,
             streams: int = 1) -> Analyser:
        """Load both exported graphs from the registry (hash checked) and warm up.

        Parameters
        ----------
        registry_path, router, classifier
            The registry file and the names of the two models in it.
        threads
            Intra-op threads of each graph (default: the cores this process may use).
        max_batch
            Images per model run.
        streams
            Inference streams of each graph (:class:`models.runtime.OpenVinoGraph`): the
            images of a run go that many at a time.
        """
        registry = load_registry(pathlib.Path(registry_path))
        r_entry = registry.get(router, role="router")
        c_entry = registry.get(classifier, role="classifier")
        c_graph = load_graph(c_entry, threads, streams=streams)
        channels = int(np.asarray(c_graph.head_kernel).shape[0])
        heads = [(h, *load_head(h, channels)) for h in registry.heads_of(c_entry)]
        analyser = cls(r_entry, c_entry, load_graph(r_entry, threads, streams=streams), c_graph,
                       max_batch, heads)
        analyser.warm_up()
        return analyser

    @property
    def router_info(self) -> ModelInfo:
        """Identity of the router (for outputs)."""
        return self._router.info

    @property
    def classifier_info(self) -> ModelInfo:
        """Identity of the classifier (for outputs)."""
        return self._classifier.info

    @property
    def classifier_grid(self) -> int:
        """Side of the classifier's feature map, the grid Grad-CAM is computed on."""
        return self._classifier_graph.grid

    @property
    def router_entry(self) -> ModelEntry:
        """The router's registry entry."""
        return self._router

    @property
    def classifier_entry(self) -> ModelEntry:
        """The classifier's registry entry."""
        return self._classifier

    @property
    def head_entries(self) -> tuple[ModelEntry, ...]:
        """The registry entries of the classifier's heads (:class:`Coverage`)."""
        return self.coverage.heads

    def head_logits(self, classifier_inputs: np.ndarray) -> np.ndarray:
        """``(n, 1 + heads)`` logits of the classifier and each head for prepared squares."""
        graph = self._classifier_graph
        return graph.all_logits(graph.features(classifier_inputs))

    def _decide_on_grid(self, classifier_inputs: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logit, Grad-CAM on the feature grid) of head ``columns[i]`` for image ``i``."""
        graph = self._classifier_graph
        feats = graph.features(classifier_inputs)
        logits = graph.all_logits(feats)[np.arange(len(feats)), columns]
        return logits, gradcam_closed_form(feats, graph.kernels, columns)

    def warm_up(self) -> None:
        """Run both graphs once at batch 1 (the runtime plans its buffers on the first call),
        so the first study is not slow."""
        rs, cs = self._router.input_size, self._classifier.input_size
        self.predict(np.zeros((1, rs, rs), np.float32), np.zeros((1, cs, cs), np.float32))

    def predict_router(self, router_inputs: np.ndarray) -> np.ndarray:
        """Router softmax for prepared squares ``(n, s, s)`` float32 in [0, 1].

        With the registry's ``test_time_flip`` the softmax of the mean of the logits
        of the image and its mirror."""
        return self._routing.probabilities(router_inputs)

    def classifier_features(self, classifier_inputs: np.ndarray) -> np.ndarray:
        """The classifier's last feature map ``(n, h, w, c)`` for prepared squares: with
        the registry's ``test_time_flip``, the mean of the image's and its mirror's
        (see :class:`ClassifierGraph`)."""
        return self._classifier_graph.features(classifier_inputs)

    def predict_classifier(self, classifier_inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits, calibrated probabilities, Grad-CAM on the model grid) for prepared squares."""
        logits, probs, cams = self.classify_on_grid(classifier_inputs)
        return logits, probs, upsample(cams, self._classifier.input_size)

    def classify_on_grid(self, classifier_inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits, calibrated probabilities, Grad-CAM on the feature grid) for prepared
        squares: :meth:`predict_classifier` before the map is resampled onto the input."""
        logits, cams = self._decide_on_grid(classifier_inputs, np.zeros(len(classifier_inputs), int))
        return logits, _sigmoid(logits / self._classifier.temperature), cams

    def predict(self, router_inputs: np.ndarray, classifier_inputs: np.ndarray) -> RawPredictions:
        """Run both models on prepared squares (``(n, s, s)`` float32 in [0, 1])."""
        logits, probs, heatmaps = self.predict_classifier(classifier_inputs)
        return RawPredictions(
            router_probabilities=self.predict_router(router_inputs),
            classifier_logits=logits,
            fracture_probabilities=probs,
            heatmaps=heatmaps,
        )

    def _prepare(self, image: NormalisedImage) -> tuple[np.ndarray, np.ndarray, GridTransform]:
        pixels = np.asarray(image.pixels, dtype=np.float32)
        if pixels.ndim != 2 or min(pixels.shape) < 8:
            raise ValueError(f"pixels must be 2-D and at least 8x8, got shape {pixels.shape}")
        pixels = np.clip(np.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
        r_arr, _ = fit_square(pixels, self._router.input_size)
        c_arr, transform = fit_square(pixels, self._classifier.input_size)
        return r_arr, c_arr, transform

    def analyse(self, images: Sequence[NormalisedImage]) -> list[ImageFinding | Refusal]:
        """One finding or refusal per image, in order (batched; never raises per image).

        The router runs on every image first; the classifier (and its Grad-CAM) only on
        the images the router's answer lets through, since a refusal for the body part
        (unsupported, or in conflict with the header) never reads the classifier's
        output.  Each model runs in batches of at most :attr:`max_batch` images; a batch
        that fails is retried image by image."""
        outcomes: list[ImageFinding | Refusal | None] = [None] * len(images)
        prepared: list[tuple[int, np.ndarray, np.ndarray, GridTransform]] = []
        for i, image in enumerate(images):
            try:
                r_arr, c_arr, transform = self._prepare(image)
                prepared.append((i, r_arr, c_arr, transform))
            except Exception as exc:  # one bad image must not stop the study
                logger.warning("image %s not prepared: %s", image.meta.sop_instance_uid, exc)
                outcomes[i] = Refusal(image.meta, RefusalCode.BAD_PIXEL_ATTRIBUTES,
                                      f"image could not be prepared for the models: {exc}")

        def failed(i: int, exc: Exception) -> None:
            outcomes[i] = Refusal(images[i].meta, RefusalCode.BAD_PIXEL_ATTRIBUTES,
                                  f"model inference failed on this image: {exc}")

        routed = self._batched(lambda x, _: (self.predict_router(x),),
                               [(c[0], c[1]) for c in prepared], failed, self.max_batch)
        if not routed:
            return [o for o in outcomes if o is not None]
        by_index = {c[0]: c for c in prepared}
        own = np.stack([out[0] for _, out in routed])
        groups = [self.pooling_key(images[i]) for i, _ in routed]
        pooled = pooled_router_probabilities(own, groups, self._router.classes.index(OTHER),
                                             self._router.confidence_floor)
        to_classify: list[tuple[int, _Route]] = []
        for j, (i, _) in enumerate(routed):
            route = self._route(images[i], own[j], pooled[j], groups.count(groups[j]))
            if isinstance(route, Refusal):
                outcomes[i] = route
            else:
                to_classify.append((i, route))
        routes = dict(to_classify)
        column = {i: self.coverage.column(route.part) for i, route in to_classify}
        classified = self._batched(
            lambda x, idx: self._decide_on_grid(x, np.array([column[i] for i in idx])),
            [(i, by_index[i][2]) for i, _ in to_classify], failed, self.max_batch)
        for i, (logit, heatmap) in classified:
            model = self.coverage.model(routes[i].part)
            probability = float(_sigmoid(np.asarray(logit) / model.temperature))
            outcomes[i] = self._classified(images[i], by_index[i][3], routes[i], probability,
                                           heatmap)
        return [o for o in outcomes if o is not None]

    @staticmethod
    def _batched(run: Callable[[np.ndarray, list[int]], tuple[np.ndarray, ...]],
                 items: Sequence[tuple[int, np.ndarray]],
                 failed: Callable[[int, Exception], None],
                 max_batch: int) -> list[tuple[int, tuple[Any, ...]]]:
        """``run`` on the stacked arrays of ``items`` (and their indices) in chunks of
        ``max_batch``; each item's row of every output, in order.  A chunk that raises
        is retried item by item, and an item that still raises is passed to ``failed``
        and left out."""
        out: list[tuple[int, tuple[Any, ...]]] = []
        for start in range(0, len(items), max_batch):
            chunk = items[start : start + max_batch]
            try:
                outputs = run(np.stack([a for _, a in chunk]), [i for i, _ in chunk])
                out.extend((i, tuple(o[k] for o in outputs)) for k, (i, _) in enumerate(chunk))
                continue
            except Exception:
                logger.exception("batch inference failed; retrying image by image")
            for i, a in chunk:
                try:
                    outputs = run(a[None], [i])
                    out.append((i, tuple(o[0] for o in outputs)))
                except Exception as exc:
                    failed(i, exc)
        return out

    @staticmethod
    def pooling_key(image: NormalisedImage) -> str:
        """Images of one examination: same study, same BodyPartExamined (see the module docstring)."""
        return f"{image.meta.study_instance_uid}|{image.meta.body_part_examined.strip().upper()}"

    def _route(self, image: NormalisedImage, own: np.ndarray, probs: np.ndarray,
               group_size: int) -> _Route | Refusal:
        """The router's part of the decision: the body part (pooled, cross-checked with
        the header) or a refusal that needs no classifier output."""
        classes = self._router.classes
        top = int(np.argmax(probs))
        part, part_p = classes[top], float(probs[top])
        own_top = int(np.argmax(own))
        pooled_note = (
            f"body part from the {group_size} images of this examination (this image alone: "
            f"{classes[own_top]}, p={float(own[own_top]):.2f})"
        ) if own_top != top else ""
        supported = self.coverage.supported_body_parts
        header_note = ""
        header = header_body_part(image.meta)
        if header is not None and part != OTHER and not header.agrees_with(part):
            ranked = [classes[i] for i in np.argsort(-probs)]
            moved = reassignment(header, ranked, supported)
            if moved is not None and float(probs[classes.index(moved)]) < self._router.confidence_floor:
                moved = None  # the router must give the header's part at least its floor
            if moved is None:
                return Refusal(
                    image.meta, RefusalCode.BODY_PART_CONFLICT,
                    f"needs human review: the header names the {header.label} "
                    f"({header.attribute} {header.text!r}), the router the {part} "
                    f"(p={part_p:.2f}); not analysed as either",
                    body_part=part,
                    header=f"{header.label} ({header.attribute} '{header.text}')",
                )
            header_note = (f"analysed as {moved}, which the header names ({header.attribute} "
                           f"{header.text!r}) and the router ranks second; router's first "
                           f"answer: {part}, p={part_p:.2f}")
            part, part_p = moved, float(probs[classes.index(moved)])
        family_note = ""
        floor = self._router.confidence_floor
        if not header_note:
            answer = router_answer(probs, classes, self.coverage.families, floor)
            if answer.part == UNCERTAIN:
                second = int(np.argsort(-probs)[1])
                return Refusal(
                    image.meta, RefusalCode.BODY_PART_UNCERTAIN,
                    f"needs human review: the router is not sure of the body part ({part} "
                    f"p={part_p:.2f}, {classes[second]} p={float(probs[second]):.2f}; its "
                    f"confidence floor is {floor:.2f}); not analysed"
                    + (f"; {pooled_note}" if pooled_note else ""),
                    body_part=part,
                )
            if answer.part != part:  # a family: its parts together reach the floor
                family_note = (f"finding site the {_family_label(answer.part)}: the router's "
                               f"first answer {part} p={part_p:.2f} is below its floor "
                               f"{floor:.2f}, its parts of the {_family_label(answer.part)} "
                               f"together p={answer.probability:.2f}")
                part, part_p = answer.part, answer.probability
        if part == OTHER or part not in self.coverage.supported_answers:
            what = "a body part outside the supported set" if part == OTHER else f"the {part}"
            return Refusal(
                image.meta,
                RefusalCode.UNSUPPORTED_BODY_PART,
                f"not analysed: unsupported body part (router: {what}, p={part_p:.2f}; "
                f"supported: {', '.join(supported)})" + (f"; {pooled_note}" if pooled_note else ""),
                body_part=part,
            )
        return _Route(part=part, probability=part_p, probabilities=probs,
                      notes=tuple(n for n in (pooled_note, header_note, family_note) if n))

    def _classified(self, image: NormalisedImage, transform: GridTransform, route: _Route,
                    p: float, heatmap: np.ndarray) -> ImageFinding:
        """The decision for a routed image from the calibrated probability of the model
        that decides its body part (the classifier's fracture, or a head's)."""
        classes = self._router.classes
        part, part_p = route.part, route.probability
        probs = route.probabilities
        model = self.coverage.model(part)
        point = model.operating_point(part)
        notes: list[str] = list(route.notes)
        if not math.isfinite(p):
            decision = Decision.NEEDS_REVIEW
            notes.append("classifier output was not finite: needs human review")
        elif p >= point.doubt_high:
            decision = Decision.POSITIVE
        elif p < point.doubt_low:
            decision = Decision.NEGATIVE
        else:
            decision = Decision.DOUBTFUL
        return ImageFinding(
            image=image,
            transform=transform,
            body_part=part,
            body_part_probability=part_p,
            body_part_probabilities={c: float(v) for c, v in zip(classes, probs)},
            fracture_probability=p,
            threshold=point.threshold,
            doubt_band=point.doubt_band,
            decision=decision,
            heatmap=heatmap,
            router=self._router.info,
            classifier=model.info,
            notes=tuple(notes),
        )
