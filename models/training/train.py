"""Fine-tune a ported ImageNet backbone as body-part router or abnormality classifier.

The backbone is MobileNetV2 (``--arch mobilenet_v2``, the default and every run before
the option existed: :mod:`models.training.mobilenet`) or EfficientNet-Lite0
(``--arch efficientnet_lite0``: :mod:`models.training.efficientnet_lite`); both
modules build the same two-output model and name their layers by block alike.

Runs on a CPU in the background: one ``model.fit`` epoch at a time, a checkpoint
(``last.keras`` with the optimiser state, ``state.json``) after every epoch, resumable
with ``--resume``, reproducible with ``--seed``, with an optional wall-clock budget
that stops before an epoch that would not finish in time.  The result is
``model.keras`` in the run folder: the inference model with two outputs
(``[logits, feature_map]``), no optimiser.

Inputs are built exactly as at inference: 8-bit JPEG / 255 -> :func:`fit_square`.
Augmentation (training only): horizontal flip, rotation +-10 degrees, zoom +-10 %,
shift +-5 %, contrast x[0.8, 1.2], brightness +-0.08, gamma [0.8, 1.25].

With ``--localisation-weight`` the classifier also learns *where*: positive images
with fracture boxes (any dataset of the manifest) add a second loss on the class
activation map, the dense head applied at every cell of the last feature map (which
is what Grad-CAM shows for a GAP + dense head).  The loss is the cross-entropy
between the softmax of that map over the cells and the share of each cell covered
by a box.  A softmax over cells does not change when every cell moves by the same
amount, so this loss leaves the image logit (the mean of the map) to the
classification loss; the boxed images themselves do not enter the classification
loss (see :func:`models.training.data.box_samples`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from models.registry import sha256_of
from models.training import data as mdata
from models.training import metrics as mm

logger = logging.getLogger(__name__)

_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
ARCHS = {"mobilenet_v2": "models.training.mobilenet", "efficientnet_lite0": "models.training.efficientnet_lite"}
"""``--arch`` -> the module with ``build_model``, ``load_backbone_weights``, ``block_of_layer``,
``FEATURE_LAYER``, ``BACKBONE_FILE`` and ``ARCHITECTURE``."""


RESUME_MAY_CHANGE = frozenset({"max_minutes", "data_dir", "out_dir", "epochs", "average_last"})
"""Settings a resumed run may give anew (a budget, where the same data and run are, more
epochs and which of them to average); every other one must be the run's own, since its
checkpoint holds the outputs and losses they made."""


def arch_module(arch: str) -> ModuleType:
    """The backbone module of ``arch`` (a key of :data:`ARCHS`)."""
    import importlib

    return importlib.import_module(ARCHS[arch])


def default_backbone(arch: str) -> Path:
    """The ported ImageNet backbone ``arch`` starts from when ``--backbone`` is not given."""
    return _WEIGHTS / arch_module(arch).BACKBONE_FILE


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (written to ``config.json``)."""

    task: str
    data_dir: str
    out_dir: str
    size: int
    epochs: int
    batch_size: int = 32
    learning_rate: float = 5e-4
    weight_decay: float = 1e-4
    freeze_blocks: int = 0
    """Backbone blocks 0..freeze_blocks-1 (layers ``f0_*`` ..; torchvision's ``features``
    index for MobileNetV2) stay frozen (BN in inference mode)."""
    seed: int = 0
    max_per_class: int | None = None
    limit: int | None = None
    """Smoke tests: keep only the first ``limit`` training and validation samples."""
    max_minutes: float | None = None
    backbone: str = ""
    """The ported ImageNet backbone (``.npz``); empty: the arch's (:func:`default_backbone`)."""
    dropout: float = 0.2
    label_smoothing: float = 0.0
    localisation_weight: float = 0.0
    """Weight of the box-supervised class-activation-map loss (classifier only; 0 = off)."""
    average_last: int = 1
    """Ship the mean of the last ``average_last`` epochs' weights (see :mod:`models.training.average`)."""
    output_stride: int = 32
    """32, or 16 for a feature grid (and Grad-CAM) twice as fine (see :func:`mobilenet.backbone`)."""
    class_weight_power: float = 1.0
    """Class weights ``(n / (k * n_c)) ** power``: 1 balances the classes, 0 weighs every image alike."""
    finding: str = "abnormality"
    """Classifier labels: ``abnormality`` (MURA's abnormal study) or ``fracture``
    (the fracture-labelled sets of :data:`models.training.data.FRACTURE_DATASETS`)."""
    normal_mura: bool = True
    """Fracture finding: MURA's normal images of the humerus, forearm and wrist are
    fracture negatives too (:func:`models.training.data.fracture_samples`)."""
    init_from: str | None = None
    """Start from the weights of an earlier run's ``model.keras`` (same task, size and
    output stride) instead of the ImageNet backbone: a second stage of fine-tuning."""
    label_audit: str = ""
    """SHA-256 of the :data:`models.training.data.LABEL_AUDIT` the run's labels were
    corrected with (empty: a run from before the audit)."""
    arch: str = "mobilenet_v2"
    """The backbone, a key of :data:`ARCHS` (runs from before the option: MobileNetV2)."""
    cache_below_block: int = 0
    """With ``N > 0`` blocks 0..N-1 are frozen and run once per augmentation draw of every
    training image (:data:`cache_variants` draws, cached on disk); only blocks N.. and the
    head are trained, on the cached feature maps (see :func:`_cached_features`)."""
    cache_variants: int = 2
    """Augmentation draws cached per training image with ``cache_below_block``; epoch ``e``
    trains on draw ``e % cache_variants``."""
    abnormality_weight: float = 0.0
    """Fracture finding: weight of a second, auxiliary output trained beside the fracture
    head on MURA's study-level *abnormal* labels (humerus, forearm, wrist; a dense layer
    on the same pooled features), so that the backbone also learns what MURA calls
    abnormal (hardware, degenerative change, lesions).  MURA's abnormal images enter only
    this loss, never the fracture loss; the output is not in the served graph (the
    registered abnormality head is fitted on the served features, ``head.py``).  0 = off."""

    def __post_init__(self) -> None:
        if self.task not in ("router", "classifier"):
            raise ValueError(f"task must be 'router' or 'classifier', not {self.task!r}")
        if self.size < 32 or self.size % 32:
            raise ValueError(f"size must be a multiple of 32 (>= 32), not {self.size}")
        if self.epochs < 1:
            raise ValueError("epochs must be at least 1")
        if not 1 <= self.average_last <= self.epochs:
            raise ValueError("average_last must be between 1 and the number of epochs")
        if self.localisation_weight < 0 or (self.localisation_weight and self.task != "classifier"):
            raise ValueError("localisation_weight must be >= 0, and only the classifier has one")
        if not 0.0 <= self.class_weight_power <= 1.0:
            raise ValueError(f"class_weight_power must be in [0, 1], not {self.class_weight_power}")
        if self.finding not in ("abnormality", "fracture"):
            raise ValueError(f"finding must be 'abnormality' or 'fracture', not {self.finding!r}")
        if self.output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, not {self.output_stride}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, not {self.arch!r}")
        if self.cache_below_block < 0 or self.cache_variants < 1:
            raise ValueError("cache_below_block must be >= 0 and cache_variants >= 1")
        if self.cache_below_block and self.freeze_blocks > self.cache_below_block:
            raise ValueError("freeze_blocks must not exceed cache_below_block")
        if self.abnormality_weight < 0 or (self.abnormality_weight and (
                self.task != "classifier" or self.finding != "fracture" or self.cache_below_block)):
            raise ValueError("abnormality_weight must be >= 0, and is for the fracture classifier "
                             "trained on whole images (not with cache_below_block)")
        if not self.backbone:  # frozen: the one place the default is filled in
            object.__setattr__(self, "backbone", str(default_backbone(self.arch)))


def _samples(cfg: TrainConfig, rows: list[mdata.Row], split: str) -> list[mdata.Sample]:
    part = mdata.in_split(rows, split)
    if cfg.task == "router":
        cap = cfg.max_per_class if split == "train" else None
        samples = mdata.router_samples(part, cap, cfg.seed)
    else:
        samples = (mdata.fracture_samples(part, normal_mura=cfg.normal_mura) if cfg.finding == "fracture"
                   else mdata.classifier_samples(part))
        if cfg.abnormality_weight and split == "train":
            samples += mdata.abnormality_only_samples(part, exclude=[s.row.path for s in samples])
        if cfg.localisation_weight and split == "train":
            samples += mdata.box_samples(part, exclude=[s.row.path for s in samples])
    if cfg.limit is not None:
        rng = np.random.default_rng(cfg.seed)
        idx = rng.permutation(len(samples))[: cfg.limit]
        samples = [samples[i] for i in sorted(idx)]
    return samples


def _augment_fn(size: int, seed: int, with_masks: bool = False, stride: int = 32) -> "object":
    """A batched tf.data map function doing the radiograph augmentation.

    With ``with_masks`` the function takes ``(x, y, w, mask, w_loc)``, moves each box
    mask with its image (same flip, rotation, zoom, shift) and returns it pooled to
    the feature grid (cells of ``stride`` pixels: share of each cell inside a box) as
    the ``"cam"`` target.  Two more inputs (abnormality target and weight) become the
    ``"abnormality"`` target of the auxiliary output.
    """
    import keras
    import tensorflow as tf

    rot = keras.layers.RandomRotation(10.0 / 360.0, fill_mode="constant", seed=seed)
    zoom = keras.layers.RandomZoom((-0.1, 0.1), fill_mode="constant", seed=seed + 1)
    shift = keras.layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=seed + 2)

    def geometric(x: tf.Tensor) -> tf.Tensor:
        x = tf.image.random_flip_left_right(x, seed=seed)
        return shift(zoom(rot(x, training=True), training=True), training=True)

    def photometric(x: tf.Tensor) -> tf.Tensor:
        b = tf.shape(x)[0]
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        contrast = tf.random.uniform([b, 1, 1, 1], 0.8, 1.2)
        bright = tf.random.uniform([b, 1, 1, 1], -0.08, 0.08)
        gamma = tf.exp(tf.random.uniform([b, 1, 1, 1], math.log(0.8), math.log(1.25)))
        x = tf.clip_by_value((x - mean) * contrast + mean + bright, 0.0, 1.0)
        return tf.pow(x + 1e-6, gamma)

    def augment(x: tf.Tensor, y: tf.Tensor, w: tf.Tensor, *abnormal: tf.Tensor) -> tuple:
        image = photometric(geometric(tf.cast(x, tf.float32)[..., None]))
        if abnormal:  # (target, weight) of the auxiliary abnormality output
            return image, {"logit": y, "abnormality": abnormal[0]}, {"logit": w, "abnormality": abnormal[1]}
        return image, y, w

    def augment_with_masks(x: tf.Tensor, y: tf.Tensor, w: tf.Tensor, mask: tf.Tensor, w_loc: tf.Tensor,
                           *abnormal: tf.Tensor) -> tuple:
        both = geometric(tf.stack([tf.cast(x, tf.float32), tf.cast(mask, tf.float32)], axis=-1))
        image, moved = both[..., :1], both[..., 1:]
        cells = tf.nn.avg_pool2d(moved, stride, stride, "VALID")
        targets, weights = {"logit": y, "cam": cells}, {"logit": w, "cam": w_loc}
        if abnormal:
            targets["abnormality"], weights["abnormality"] = abnormal
        return photometric(image), targets, weights

    return augment_with_masks if with_masks else augment


def set_cross_entropy(y_true: "object", y_pred: "object") -> "object":
    """Per image: ``-log sum_{c in S} softmax(y_pred)_c`` for the allowed set ``S``.

    ``y_true`` is ``(batch, k)`` with 1 for the classes the image may rightly be given
    (a partial label: FracAtlas ``HAND`` = fingers to elbow allows five classes) and 0
    elsewhere; ``y_pred`` the logits ``(batch, k)``.  With one allowed class this is the
    ordinary cross-entropy.  Computed as ``logsumexp(z) - logsumexp(z[S])``.
    """
    from keras import ops

    z = ops.cast(y_pred, "float32")
    mask = ops.cast(y_true, "float32") > 0.5
    inside = ops.where(mask, z, ops.full_like(z, -1e9))
    return ops.logsumexp(z, axis=-1) - ops.logsumexp(inside, axis=-1)


def spatial_cross_entropy(y_true: "object", y_pred: "object") -> "object":
    """Per image: cross-entropy of softmax(cells of ``y_pred``) against the box share ``y_true``.

    ``y_true`` is ``(batch, g, g, 1)`` (share of each cell inside a box), ``y_pred``
    the class activation map ``(batch, g, g, 1)``.  Images without boxes give 0.
    """
    import keras
    from keras import ops

    b = ops.shape(y_pred)[0]
    logp = ops.log_softmax(ops.reshape(y_pred, (b, -1)), axis=-1)
    q = ops.reshape(ops.cast(y_true, logp.dtype), (b, -1))
    total = ops.sum(q, axis=-1)
    ce = -ops.sum(q * logp, axis=-1) / ops.maximum(total, keras.config.epsilon())
    return ops.where(total > 0, ce, ops.zeros_like(ce))


def _set_loss(label_smoothing: float) -> "object":
    """The router's loss: :func:`set_cross_entropy`, mixed with ``label_smoothing`` times the
    cross-entropy against the uniform distribution."""
    if not label_smoothing:
        return set_cross_entropy

    def set_loss(y_true: "object", y_pred: "object") -> "object":
        from keras import ops

        z = ops.cast(y_pred, "float32")
        uniform = ops.logsumexp(z, axis=-1) - ops.mean(z, axis=-1)
        return (1.0 - label_smoothing) * set_cross_entropy(y_true, y_pred) + label_smoothing * uniform

    return set_loss


def _batches(arrays: np.ndarray, batch: int) -> Iterator[object]:
    """Float32 tensors of ``batch`` inputs: images ``(n, h, w)`` get their channel axis,
    cached feature maps ``(n, h, w, c)`` have theirs."""
    import tensorflow as tf

    for i in range(0, len(arrays), batch):
        x = arrays[i : i + batch].astype(np.float32)
        yield tf.constant(x[..., None] if x.ndim == 3 else x)


def _predict_logits(model: "object", arrays: np.ndarray, batch: int = 64) -> np.ndarray:
    import tensorflow as tf

    fn = tf.function(lambda x: _logits_of(model(x, training=False)), reduce_retracing=True)
    return np.concatenate([np.asarray(fn(x)) for x in _batches(arrays, batch)], axis=0)


def _validation_summary(cfg: TrainConfig, logits: np.ndarray, val: list[mdata.Sample]) -> dict:
    y = np.array([s.target for s in val])
    if cfg.task == "router":
        pred = logits.argmax(axis=1)
        other = mdata.ROUTER_CLASSES.index(mdata.OTHER)
        in_set = np.array([int(p) in s.allowed for p, s in zip(pred, val)])
        single = y >= 0
        return {
            "accuracy": float(np.mean(pred[single] == y[single])) if single.any() else float("nan"),
            "in_allowed_set": float(np.mean(in_set)),
            "in_allowed_set_multi": float(np.mean(in_set[~single])) if (~single).any() else float("nan"),
            "other_recall": float(np.mean(pred[y == other] == other)) if np.any(y == other) else float("nan"),
        }
    p = mm.sigmoid(logits[:, 0])
    keys = [s.row.study_key for s in val]
    _, sp, sy = mm.study_means(keys, p, y)
    return {"image_auroc": mm.auroc(y, p), "study_auroc": mm.auroc(sy, sp), "n_studies": len(sy)}


def _abnormality_targets(samples: list[mdata.Sample], power: float) -> tuple[np.ndarray, np.ndarray]:
    """Targets and weights of the auxiliary abnormality output: MURA's images of the
    humerus, forearm and wrist with their study's label in MURA (abnormal -> 1; the few
    normal images the Better-MURA list moves to abnormal, 67 of the train split, count as
    normal here, as in ``evaluate``'s MURA labels), the two classes weighed
    ``(n / (2 n_c)) ** power``; every other image weighs 0."""
    mura = np.array([mdata.mura_labelled(s.row) for s in samples])
    y = np.array([1.0 if m and s.row.label == "positive" else 0.0 for s, m in zip(samples, mura)],
                 dtype=np.float32)
    w = np.zeros(len(samples), dtype=np.float32)
    n = int(mura.sum())
    for c in (0.0, 1.0):
        count = int(np.sum(mura & (y == c)))
        if count:
            w[mura & (y == c)] = (n / (2 * count)) ** power
    logger.info("abnormality output: %d MURA images (%d abnormal)", n, int(y[mura].sum()))
    return y, w


def _abnormality_summary(model: "object", arrays: np.ndarray, samples: list[mdata.Sample]) -> dict:
    """Study-level AUROC of the auxiliary abnormality output on MURA's validation
    images, by body part (the mean probability of a study's images)."""
    import tensorflow as tf

    if not len(arrays):
        return {}
    fn = tf.function(lambda x: model(x, training=False)["abnormality"], reduce_retracing=True)
    p = mm.sigmoid(np.concatenate([np.asarray(fn(x)) for x in _batches(arrays, 64)])[:, 0])
    y = np.array([s.target for s in samples])
    out = {}
    for part in mdata.CLASSIFIER_PARTS:
        idx = [i for i, s in enumerate(samples) if s.row.body_part == part]
        if idx:
            _, sp, sy = mm.study_means([samples[i].row.study_key for i in idx], p[idx], y[idx])
            out[f"{part.lower()}_study_auroc"] = round(mm.auroc(sy, sp), 4)
    return out


def _logits_of(output: "object") -> "object":
    """The logits of a training model's output (a tensor, or ``{"logit", "cam"}``)."""
    return output["logit"] if isinstance(output, dict) else output


def _pointing_game(model: "object", arrays: np.ndarray, masks: np.ndarray) -> float:
    """Share of images whose activation-map maximum (upsampled to the mask's grid) lies in a box.

    ``arrays`` are the images, or the frozen blocks' cached maps of them for a model of
    the upper blocks (``cache_below_block``)."""
    import tensorflow as tf

    if not len(arrays):
        return float("nan")
    hits = []
    for i, x in zip(range(0, len(arrays), 32), _batches(arrays, 32)):
        cam = model(x, training=False)["cam"]
        up = tf.image.resize(cam, masks.shape[1:3], method="bilinear").numpy()[..., 0]
        for j, m in enumerate(masks[i : i + 32]):
            hits.append(bool(m.flat[int(np.argmax(up[j]))]))
    return round(float(np.mean(hits)), 4)


def _arch_of(model: "object") -> str:
    """The arch of a built or loaded model: the one whose :data:`FEATURE_LAYER` it has.

    (MobileNetV2's head activation is ``f18_relu``, EfficientNet-Lite0's ``f17_relu``;
    neither network has a layer of that name of the other.)
    """
    names = {layer.name for layer in model.layers}
    found = [a for a in ARCHS if arch_module(a).FEATURE_LAYER in names]
    if len(found) != 1:
        raise ValueError(f"{model.name}: not a network of {', '.join(ARCHS)} (matches {found})")
    return found[0]


def inference_model(train_model: "object") -> "object":
    """The two-output inference model (logits, feature map) sharing ``train_model``'s layers."""
    import keras

    features = train_model.get_layer(arch_module(_arch_of(train_model)).FEATURE_LAYER).output
    return keras.Model(train_model.input, [_logits_of(train_model.output), features], name=train_model.name)


def _split_layer(model: "object", block: int) -> str:
    """The name of the last layer of backbone block ``block - 1``: the tensor block ``block`` reads."""
    net = arch_module(_arch_of(model))
    names = [layer.name for layer in model.layers if net.block_of_layer(layer.name) == block - 1]
    if not names:
        raise ValueError(f"cache_below_block {block}: the model has no block {block - 1}")
    return names[-1]


def _cached_features(lower: "object", tensors: tuple, cfg: TrainConfig, variant: int,
                     folder: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The frozen blocks' feature maps of one augmentation draw of every training image.

    ``tensors`` are the training tensors of :func:`train` (images, targets, weights[,
    masks, box weights]) in sample order; the draw is the recipe's own augmentation
    (:func:`_augment_fn`, seeded by ``cfg.seed`` and ``variant``), its box masks moved
    with the images and pooled to the grid.  Written once to ``folder`` as float16
    ``features-<variant>.npy`` (+ ``cams-<variant>.npy``) and read back on a resumed run.
    Returns ``(features, cams or None)``, the features memory-mapped.
    """
    import tensorflow as tf

    localise = len(tensors) == 5
    feats_path = folder / f"features-{variant}.npy"
    cams_path = folder / f"cams-{variant}.npy"
    done = folder / f"draw-{variant}.json"
    if done.exists():
        logger.info("augmentation draw %d: cached features read from %s", variant, feats_path)
        return np.load(feats_path, mmap_mode="r"), (np.load(cams_path) if localise else None)
    folder.mkdir(parents=True, exist_ok=True)
    augment = _augment_fn(cfg.size, cfg.seed + 7919 * (variant + 1), with_masks=localise,
                          stride=cfg.output_stride)
    fwd = tf.function(lambda x: lower(x, training=False), reduce_retracing=True)
    ds = (tf.data.Dataset.from_tensor_slices(tensors).batch(cfg.batch_size)
          .map(augment, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2))
    n = len(tensors[0])
    feats = None
    grid = cfg.size // cfg.output_stride
    cams = np.zeros((n, grid, grid, 1), np.float32) if localise else None
    t0, i = time.monotonic(), 0
    for batch in ds:
        image = batch[0]
        out = np.asarray(fwd(image), dtype=np.float16)
        if feats is None:
            feats = np.lib.format.open_memmap(feats_path, mode="w+", dtype=np.float16, shape=(n, *out.shape[1:]))
        feats[i : i + len(out)] = out
        if cams is not None:
            cams[i : i + len(out)] = np.asarray(batch[1]["cam"])
        i += len(out)
    assert feats is not None and i == n
    feats.flush()
    if cams is not None:
        np.save(cams_path, cams)
    done.write_text(json.dumps({"variant": variant, "images": n, "shape": list(feats.shape[1:]),
                                "seconds": round(time.monotonic() - t0, 1)}))
    logger.info("augmentation draw %d: %d feature maps %s cached in %.0f s", variant, n,
                tuple(feats.shape[1:]), time.monotonic() - t0)
    del feats
    return np.load(feats_path, mmap_mode="r"), cams


def _cached_dataset(feats: np.ndarray, cams: np.ndarray | None, tensors: tuple, cfg: TrainConfig,
                    epoch: int) -> "object":
    """Shuffled batches ``(features, targets, weights)`` of one cached draw (as :func:`train`'s
    dataset gives images), read from the memory map batch by batch."""
    import tensorflow as tf

    n = len(feats)
    y, w = tensors[1], tensors[2]
    w_loc = tensors[4] if cams is not None else None

    def gather(index: np.ndarray) -> tuple:
        j = np.sort(index)
        out = [np.asarray(feats[j], dtype=np.float32), y[j].astype(np.float32), w[j]]
        if cams is not None:
            out += [cams[j], w_loc[j]]
        return tuple(out)

    kinds = [tf.float32] * (5 if cams is not None else 3)
    shape = (None, *feats.shape[1:])

    def as_batch(index: "object") -> tuple:
        parts = tf.numpy_function(gather, [index], kinds)
        x = tf.ensure_shape(parts[0], shape)
        target = tf.ensure_shape(parts[1], (None, *y.shape[1:]))
        weight = tf.ensure_shape(parts[2], (None,))
        if cams is None:
            return x, target, weight
        return (x, {"logit": target, "cam": tf.ensure_shape(parts[3], (None, *cams.shape[1:]))},
                {"logit": weight, "cam": tf.ensure_shape(parts[4], (None,))})

    return (tf.data.Dataset.range(n).shuffle(n, seed=cfg.seed + epoch)
            .batch(cfg.batch_size, drop_remainder=n > cfg.batch_size)
            .map(as_batch).prefetch(2))


def _predict_features(model: "object", arrays: np.ndarray, batch: int = 32) -> np.ndarray:
    """``model`` (the frozen blocks) on unaugmented images, float16 feature maps."""
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return np.concatenate([np.asarray(fn(x), dtype=np.float16) for x in _batches(arrays, batch)])


def _compile(model: "object", cfg: TrainConfig, steps: int, localise: bool) -> None:
    """AdamW with cosine decay after a warm-up, and the task's loss(es)."""
    import keras

    schedule = keras.optimizers.schedules.CosineDecay(
        cfg.learning_rate * 0.1, decay_steps=steps * cfg.epochs, alpha=0.02,
        warmup_target=cfg.learning_rate, warmup_steps=min(steps, 100),
    )
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay)
    if cfg.task == "router":
        loss = _set_loss(cfg.label_smoothing)
    else:
        loss = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=cfg.label_smoothing)
    losses: dict[str, object] = {"logit": loss}
    weights = {"logit": 1.0}
    if localise:
        losses["cam"], weights["cam"] = spatial_cross_entropy, cfg.localisation_weight
    if cfg.abnormality_weight:
        losses["abnormality"] = keras.losses.BinaryCrossentropy(from_logits=True)
        weights["abnormality"] = cfg.abnormality_weight
    if len(losses) > 1:
        model.compile(optimizer=optimizer, loss=losses, loss_weights=weights)
    else:
        model.compile(optimizer=optimizer, loss=loss)


def train(cfg: TrainConfig, resume: bool = False, verbose: int = 2) -> Path:
    """Run (or resume) a training run; returns the path of ``model.keras``."""
    import keras
    import tensorflow as tf

    net = arch_module(cfg.arch)
    out = Path(cfg.out_dir)
    if resume and (out / "config.json").exists():
        saved = json.loads((out / "config.json").read_text())
        earlier = saved.get("arch", "mobilenet_v2")
        if earlier != cfg.arch:
            raise SystemExit(f"--resume: {out} was trained with --arch {earlier}, not {cfg.arch}")
        if (out / "last.keras").exists():  # a checkpoint holds the outputs and losses it was made with
            now = asdict(cfg)
            changed = sorted(k for k, v in now.items()
                             if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != v)
            if changed:
                raise SystemExit(f"--resume: {out} was trained with other settings "
                                 f"({', '.join(f'{k} {saved[k]!r}, not {now[k]!r}' for k in changed)}); "
                                 "resume with the run's own settings or start a new --out")
    start_model = None
    resuming = resume and (out / "last.keras").exists() and (out / "state.json").exists()
    if cfg.init_from and not resuming:  # refused before anything is loaded or written
        start_model = keras.models.load_model(cfg.init_from, compile=False, safe_mode=True)
        start_arch = _arch_of(start_model)
        if start_arch != cfg.arch:
            raise SystemExit(f"--init-from: {cfg.init_from} was built with --arch {start_arch}, "
                             f"not {cfg.arch}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    keras.utils.set_random_seed(cfg.seed)
    start = time.monotonic()

    rows = mdata.read_manifest(Path(cfg.data_dir))
    train_s = _samples(cfg, rows, "train")
    val_s = _samples(cfg, rows, "val")
    if not train_s or not val_s:
        raise ValueError(f"no {cfg.task} samples in train ({len(train_s)}) or val ({len(val_s)})")
    logger.info("loading %d train + %d val images at %d px", len(train_s), len(val_s), cfg.size)
    x_train = mdata.load_arrays([s.row.path for s in train_s], cfg.size)
    x_val = mdata.load_arrays([s.row.path for s in val_s], cfg.size)
    y_train = np.array([s.target for s in train_s])
    classify = np.array([s.classify for s in train_s])
    n_classes = len(mdata.ROUTER_CLASSES) if cfg.task == "router" else 2
    if cfg.task == "router":
        # set-valued labels: a sample counts 1/|S| towards each class of its set S, and
        # weighs the mean of its classes' weights
        allowed = mdata.allowed_matrix(train_s, n_classes)
        frac = (allowed / allowed.sum(axis=1, keepdims=True)).sum(axis=0)
        counts = Counter({c: float(frac[c]) for c in range(n_classes) if frac[c] > 0})
        class_w = {c: (len(train_s) / (n_classes * counts[c])) ** cfg.class_weight_power for c in counts}
        cw = np.array([class_w.get(c, 0.0) for c in range(n_classes)], dtype=np.float32)
        w_train = ((allowed * cw).sum(axis=1) / allowed.sum(axis=1)).astype(np.float32)
    else:
        counts = Counter(y_train[classify].tolist())
        class_w = {c: (int(classify.sum()) / (n_classes * counts[c])) ** cfg.class_weight_power for c in counts}
        w_train = np.array([class_w[t] if c else 0.0 for t, c in zip(y_train, classify)], dtype=np.float32)
    localise = cfg.localisation_weight > 0
    logger.info("loaded in %.0f s; class weights %s", time.monotonic() - start,
                {k: round(v, 3) for k, v in sorted(class_w.items())})

    y_fit = y_train.astype(np.float32)[:, None] if cfg.task == "classifier" else allowed
    if localise:
        masks = mdata.load_masks(train_s, cfg.size)
        w_loc = np.array([1.0 if s.row.boxes else 0.0 for s in train_s], dtype=np.float32)
        logger.info("%d training images carry fracture boxes", int(w_loc.sum()))
        tensors: tuple = (x_train, y_fit, w_train, masks, w_loc)
    else:
        tensors = (x_train, y_fit, w_train)
    if cfg.abnormality_weight:
        y_abn, w_abn = _abnormality_targets(train_s, cfg.class_weight_power)
        tensors += (y_abn[:, None], w_abn)
    ds = (
        tf.data.Dataset.from_tensor_slices(tensors)
        .shuffle(len(x_train), seed=cfg.seed, reshuffle_each_iteration=True)
        .batch(cfg.batch_size, drop_remainder=len(x_train) > cfg.batch_size)
        .map(_augment_fn(cfg.size, cfg.seed, with_masks=localise, stride=cfg.output_stride),
             num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(2)
    )
    steps = max(1, len(x_train) // cfg.batch_size)

    state_path = out / "state.json"
    ckpt = out / "last.keras"
    history: list[dict] = []
    first_epoch = 0
    if resume and ckpt.exists() and state_path.exists():
        state = json.loads(state_path.read_text())
        train_model = keras.models.load_model(
            ckpt, safe_mode=True, custom_objects={"spatial_cross_entropy": spatial_cross_entropy,
                                         "set_cross_entropy": set_cross_entropy,
                                         "set_loss": _set_loss(cfg.label_smoothing)})
        first_epoch = int(state["epochs_done"])
        history = list(state.get("history", []))
        logger.info("resuming %s after epoch %d", out, first_epoch)
    else:
        n_out = len(mdata.ROUTER_CLASSES) if cfg.task == "router" else 1
        weights = net.load_backbone_weights(cfg.backbone)
        full = net.build_model(cfg.size, n_out, weights, cfg.dropout, name=f"{cfg.task}",
                               output_stride=cfg.output_stride)
        if start_model is not None:
            for layer in full.layers:
                if layer.weights:
                    src = start_model.get_layer(layer.name).get_weights()
                    if [w.shape for w in src] == [w.shape for w in layer.get_weights()]:
                        layer.set_weights(src)
                    else:  # a head with other classes: the backbone carries over, the head starts anew
                        logger.info("init-from: %s has other shapes; left at its initial weights", layer.name)
            logger.info("initialised from %s", cfg.init_from)
        outputs = {"logit": full.outputs[0]}
        if localise:  # the head at every cell: the CAM
            outputs["cam"] = full.get_layer("head")(full.outputs[1])
        if cfg.abnormality_weight:  # a second dense layer on the same pooled features
            outputs["abnormality"] = keras.layers.Dense(1, name="abnormality")(
                full.get_layer("dropout").output)
        train_model = keras.Model(full.input, outputs if len(outputs) > 1 else outputs["logit"],
                                  name=cfg.task)
        for layer in train_model.layers:
            block = net.block_of_layer(layer.name)
            if 0 <= block < max(cfg.freeze_blocks, cfg.cache_below_block):
                layer.trainable = False
        if not cfg.cache_below_block:
            _compile(train_model, cfg, steps, localise)

    fitted = train_model  # the model fit() runs on: the whole network, or its upper blocks
    if cfg.cache_below_block:
        split = train_model.get_layer(_split_layer(train_model, cfg.cache_below_block)).output
        lower = keras.Model(train_model.input, split, name="frozen_blocks")
        fitted = keras.Model(split, train_model.output, name="upper_blocks")
        _compile(fitted, cfg, steps, localise)
        if first_epoch:  # the schedule goes on where it stopped (Adam's moments start anew)
            fitted.optimizer.build(fitted.trainable_variables)
            fitted.optimizer.iterations.assign(first_epoch * steps)
        cache = out / "feature-cache"
        draws = [_cached_features(lower, tensors, cfg, v, cache) for v in range(min(cfg.cache_variants, cfg.epochs))]
        val_features = _predict_features(lower, x_val)

    if cfg.abnormality_weight:  # MURA's validation images, for the auxiliary output's AUROC
        abn_val = mdata.classifier_samples([r for r in mdata.in_split(rows, "val")
                                            if r.body_part in mdata.CLASSIFIER_PARTS])[: cfg.limit]
        x_abn_val = mdata.load_arrays([s.row.path for s in abn_val], cfg.size)
    if localise:  # validation images with boxes, for the pointing game of every epoch
        boxed_val = mdata.box_samples(mdata.in_split(rows, "val"))[: cfg.limit]
        x_boxed = mdata.load_arrays([s.row.path for s in boxed_val], cfg.size)
        boxed_masks = mdata.load_masks(boxed_val, cfg.size)
        if cfg.cache_below_block:
            boxed_features = _predict_features(lower, x_boxed)

    epoch_seconds: list[float] = []
    for epoch in range(first_epoch, cfg.epochs):
        if cfg.max_minutes is not None and epoch_seconds:
            elapsed = (time.monotonic() - start) / 60.0
            if elapsed + max(epoch_seconds) / 60.0 > cfg.max_minutes:
                logger.warning("stopping before epoch %d: budget of %.0f min would be exceeded",
                               epoch + 1, cfg.max_minutes)
                break
        t0 = time.monotonic()
        if cfg.cache_below_block:
            feats, cams = draws[epoch % len(draws)]
            fit = fitted.fit(_cached_dataset(feats, cams, tensors, cfg, epoch), epochs=epoch + 1,
                             initial_epoch=epoch, verbose=verbose)
            val_logits = _predict_logits(fitted, val_features)
        else:
            fit = train_model.fit(ds, epochs=epoch + 1, initial_epoch=epoch, verbose=verbose)
            val_logits = _predict_logits(train_model, x_val)
        summary = _validation_summary(cfg, val_logits, val_s)
        dt = time.monotonic() - t0
        epoch_seconds.append(dt)
        losses = {k: round(float(v[-1]), 4) for k, v in fit.history.items() if k.endswith("loss")}
        if localise:
            summary["pointing_game"] = _pointing_game(
                fitted, boxed_features if cfg.cache_below_block else x_boxed, boxed_masks)
        if cfg.abnormality_weight:
            summary["abnormality"] = _abnormality_summary(train_model, x_abn_val, abn_val)
        entry = {"epoch": epoch + 1, **losses, "seconds": round(dt, 1),
                 "images_per_second": round(len(x_train) / dt, 1), **summary}
        history.append(entry)
        logger.info("epoch %d/%d %s", epoch + 1, cfg.epochs, json.dumps(entry))
        train_model.save(ckpt)
        if epoch + 1 > cfg.epochs - cfg.average_last:
            shutil.copyfile(ckpt, out / f"epoch-{epoch + 1}.keras")
        state_path.write_text(json.dumps({"epochs_done": epoch + 1, "history": history}, indent=2))

    model_path = out / "model.keras"
    snapshots = sorted(out.glob("epoch-*.keras"), key=lambda p: int(p.stem.split("-")[1]))[-cfg.average_last:]
    if cfg.average_last > 1 and len(snapshots) > 1:
        from models.training.average import average_checkpoints

        train_model = average_checkpoints(snapshots)
    inference_model(train_model).save(model_path)
    logger.info("wrote %s after %.1f min", model_path, (time.monotonic() - start) / 60.0)
    return model_path


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``fracture-node train``."""
    p = argparse.ArgumentParser(prog="fracture-node train", description="Train the router or the classifier.")
    p.add_argument("--task", choices=("router", "classifier"), required=True)
    p.add_argument("--data", required=True, type=Path, help="folder with manifest.csv (msk format)")
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, model.keras)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--freeze-blocks", type=int, default=0)
    p.add_argument("--max-per-class", type=int, default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--localisation-weight", type=float, default=0.0,
                   help="classifier: weight of the box-supervised activation-map loss (0 = off)")
    p.add_argument("--arch", choices=tuple(ARCHS), default="mobilenet_v2",
                   help="ImageNet backbone: MobileNetV2 (default) or EfficientNet-Lite0")
    p.add_argument("--backbone", type=Path, default=None,
                   help="ported ImageNet backbone .npz (default: the arch's in models/weights)")
    p.add_argument("--average-last", type=int, default=1,
                   help="ship the mean of the last N epochs' weights (1 = the last epoch)")
    p.add_argument("--output-stride", type=int, choices=(16, 32), default=32,
                   help="16: dilate the last stage for a feature grid (Grad-CAM) twice as fine")
    p.add_argument("--class-weight-power", type=float, default=1.0,
                   help="class weights (n / (k n_c)) ** POWER: 1 balanced, 0.5 milder, 0 none")
    p.add_argument("--finding", choices=("abnormality", "fracture"), default="abnormality",
                   help="classifier labels: MURA abnormal study, or the fracture-labelled sets")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from an earlier run's model.keras (second-stage fine-tuning)")
    p.add_argument("--cache-below-block", type=int, default=0, metavar="N",
                   help="freeze blocks 0..N-1, run them once per augmentation draw and train blocks N.. "
                        "and the head on their cached feature maps (fast on a CPU; with --init-from)")
    p.add_argument("--cache-variants", type=int, default=2,
                   help="augmentation draws cached per image with --cache-below-block (epoch e uses draw e %% V)")
    p.add_argument("--abnormality-weight", type=float, default=0.0,
                   help="fracture classifier: weight of an auxiliary output trained on MURA's "
                        "abnormal labels beside the fracture head (0 = off)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true", help="one line per epoch instead of a progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """``fracture-node train ...``"""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig(
        task=args.task, data_dir=str(args.data), out_dir=str(args.out), size=args.size,
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
        freeze_blocks=args.freeze_blocks, seed=args.seed, max_per_class=args.max_per_class,
        limit=args.limit, max_minutes=args.max_minutes, backbone=str(args.backbone or ""),
        label_smoothing=args.label_smoothing, localisation_weight=args.localisation_weight,
        average_last=args.average_last, output_stride=args.output_stride,
        class_weight_power=args.class_weight_power, finding=args.finding,
        init_from=str(args.init_from) if args.init_from else None,
        label_audit=sha256_of(mdata.LABEL_AUDIT), arch=args.arch,
        cache_below_block=args.cache_below_block, cache_variants=args.cache_variants,
        abnormality_weight=args.abnormality_weight,
    )
    verbose = 2 if (args.quiet or not sys.stdout.isatty()) else 1
    path = train(cfg, resume=args.resume, verbose=verbose)
    print(f"model written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
