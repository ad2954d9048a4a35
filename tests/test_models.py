"""The shipped models: hash-checked loading, real radiographs through the real
Analyser, Grad-CAM in closed form equal to tf.GradientTape, a training smoke run and
the evaluation CLI's metrics.json contract."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from conftest import MSK_DATA, ROOT
from models.registry import load_registry, sha256_of
from models.training.data import box_mask
from pipeline.classify import Analyser, pooled_router_probabilities
from pipeline.gradcam import gradcam_closed_form, gradcam_tape
from pipeline.result import (
    Decision,
    ImageFinding,
    ImageMetadata,
    NormalisedImage,
    Refusal,
    RefusalCode,
)
from pipeline.resize import fit_square

REGISTRY = ROOT / "models" / "registry.toml"
ROUTER, CLASSIFIER = "bodypart-router", "fracture-classifier"


def _rows(**match: str) -> list[dict[str, str]]:
    with (MSK_DATA / "manifest.csv").open() as fh:
        return [r for r in csv.DictReader(fh) if all(r[k] == v for k, v in match.items())]


def _image(path: Path, uid: str, body_part: str = "") -> NormalisedImage:
    pixels = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0
    meta = ImageMetadata("1.2.3", "1.2.3.1", uid, "1.2.840.10008.5.1.4.1.1.1",
                         modality="CR", body_part_examined=body_part)
    return NormalisedImage(meta, pixels, pixels.shape)


@pytest.fixture(scope="module")
def analyser() -> Iterator[Analyser]:
    yield Analyser.load(REGISTRY, ROUTER, CLASSIFIER)


@pytest.fixture(scope="module")
def keras_classifier() -> Any:
    """The registered classifier's Keras model (the TensorFlow reference; hash checked)."""
    from models.registry import load_keras_model

    return load_keras_model(load_registry(REGISTRY).get(CLASSIFIER))


def test_registry_hashes_match_the_shipped_weights() -> None:
    registry = load_registry(REGISTRY)
    total = 0
    for name in (ROUTER, CLASSIFIER):
        entry = registry.get(name)
        assert sha256_of(entry.weights) == entry.sha256
        assert entry.graph is not None and sha256_of(entry.graph) == entry.graph_sha256
        total += entry.weights.stat().st_size + entry.graph.stat().st_size
    assert total < 40 * 2**20, "shipped weights and graphs must stay within ~40 MB"


def test_the_shipped_evaluation_is_of_the_registered_models(analyser: Analyser) -> None:
    """models/eval/metrics.json (and the metrics copied into the registry) were produced
    for exactly the registered weights, and describe them as the node runs them."""
    metrics = json.loads((ROOT / "models" / "eval" / "metrics.json").read_text())
    registry = load_registry(REGISTRY)
    for role, name in (("router", ROUTER), ("classifier", CLASSIFIER)):
        entry = registry.get(name)
        assert metrics["models"][role]["sha256"] == entry.sha256
        assert metrics["models"][role]["test_time_flip"] == entry.test_time_flip
        assert metrics["models"][role]["version"] == entry.version
        assert entry.metrics["source"] == "models/eval/metrics.json"
    assert registry.get(CLASSIFIER).metrics["pointing_game"] == metrics["localisation"]["pointing_game"]
    heads = registry.heads_of(registry.get(CLASSIFIER))
    assert [h["sha256"] for h in metrics["models"]["heads"]] == [h.sha256 for h in heads]
    for head in heads:  # the head's registry figures are its served parts' in metrics.json
        assert head.metrics["source"] == "models/eval/metrics.json"
        for part in head.supported_body_parts:
            study = metrics["heads"][head.name]["by_body_part"][part]["study"]
            assert head.metrics[f"{part.lower()}_study_auroc"] == study["auroc"]
            assert head.metrics[f"{part.lower()}_study_kappa"] == study["kappa"]
    entry = analyser.classifier_entry
    stride = 16 if "output stride 16" in entry.architecture else 32
    assert metrics["models"]["classifier"]["feature_grid"] == analyser.classifier_grid == entry.input_size // stride


def test_a_tampered_weights_file_is_refused(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "models" / "weights", tmp_path / "weights")
    text = REGISTRY.read_text()
    registry = tmp_path / "registry.toml"
    registry.write_text(text)
    victim = tmp_path / "weights" / load_registry(REGISTRY).get(CLASSIFIER).weights.name
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.write_bytes(bytes(data))
    from models.registry import load_keras_model

    with pytest.raises(Exception, match="(?i)sha-?256|hash"):
        load_keras_model(load_registry(registry).get(CLASSIFIER))  # as export and training load it


def test_real_radiographs_get_typed_findings(analyser: Analyser) -> None:
    forearm = _rows(dataset="MURA-v1.1", split="val", body_part="FOREARM")[:3]
    chest = _rows(dataset="UNIFESP-bodypart", split="val", body_part="CHEST")[:2]
    images = [_image(MSK_DATA / r["path"], f"1.2.3.{i}", "ARM") for i, r in enumerate(forearm)]
    images += [_image(MSK_DATA / r["path"], f"1.2.4.{i}", "CHEST") for i, r in enumerate(chest)]
    outcomes = analyser.analyse(images)
    assert len(outcomes) == len(images)
    for image, outcome in zip(images, outcomes):
        assert outcome.meta.sop_instance_uid == image.meta.sop_instance_uid
    findings = [o for o in outcomes[:3] if isinstance(o, ImageFinding)]
    assert findings, "no MURA forearm was analysed"
    for f in findings:
        assert 0.0 <= f.fracture_probability <= 1.0
        grid = analyser.classifier_grid  # the finding keeps Grad-CAM on the feature grid
        assert f.heatmap.shape == (grid, grid) and grid < f.transform.size
        assert f.heatmap.dtype == np.float32 and 0.0 <= f.heatmap.min() <= f.heatmap.max() <= 1.0
        assert f.classifier.weights_sha256 == load_registry(REGISTRY).get(CLASSIFIER).sha256
        assert f.decision in set(Decision)
        assert abs(sum(f.body_part_probabilities.values()) - 1.0) < 1e-4
    for outcome in outcomes[3:]:
        assert isinstance(outcome, Refusal) and outcome.code is RefusalCode.UNSUPPORTED_BODY_PART


def test_one_examination_gets_one_body_part(analyser: Analyser) -> None:
    """Three views of one MURA forearm study, BodyPartExamined ARM: the pooled router
    answer is the same for all three, and it is the forearm."""
    by_study: dict[str, list[dict[str, str]]] = {}
    for r in _rows(dataset="MURA-v1.1", split="val", body_part="FOREARM"):
        by_study.setdefault(r["study_id"], []).append(r)
    study = next(rows for rows in by_study.values() if len(rows) >= 3)[:3]
    outcomes = analyser.analyse([_image(MSK_DATA / r["path"], f"1.2.5.{i}", "ARM") for i, r in enumerate(study)])
    parts = {o.body_part for o in outcomes if isinstance(o, ImageFinding)}
    assert parts == {"FOREARM"} and len(outcomes) == 3


def test_pooling_keeps_examinations_apart_and_other_out() -> None:
    p = np.array([
        [0.6, 0.3, 0.1],  # exam a: ambiguous view
        [0.1, 0.8, 0.1],  # exam a
        [0.0, 0.9, 0.1],  # exam a
        [0.1, 0.1, 0.8],  # exam a, but OTHER on its own: stays out, stays OTHER
        [0.7, 0.2, 0.1],  # exam b: alone, unchanged
    ])
    pooled = pooled_router_probabilities(p, ["a", "a", "a", "a", "b"], other_index=2, floor=0.5)
    np.testing.assert_allclose(pooled[:3], np.tile(p[:3].mean(axis=0), (3, 1)))
    assert pooled[:3].argmax(axis=1).tolist() == [1, 1, 1]
    np.testing.assert_array_equal(pooled[3:], p[3:])
    # below the floor, an OTHER answer is pooled like any other
    low = pooled_router_probabilities(p[:2], ["a", "a"], other_index=0, floor=0.65)
    np.testing.assert_allclose(low, np.tile(p[:2].mean(axis=0), (2, 1)))


def test_box_masks_follow_the_node_square_geometry() -> None:
    """A box on a landscape image lands where fit_square puts those pixels."""
    image = np.zeros((50, 100), np.float32)
    image[10:20, 60:80] = 1.0  # the box [0.6, 0.2, 0.8, 0.4] in normalised x0, y0, x1, y1
    square, _ = fit_square(image, 64)
    mask = box_mask([(0.6, 0.2, 0.8, 0.4)], image.shape, 64)
    inside = square > 0.5
    assert inside.any() and mask[inside].all()
    assert mask.sum() <= inside.sum() + 2 * 64  # no more than a pixel border of rounding


def test_gradcam_closed_form_equals_gradient_tape(keras_classifier: Any) -> None:
    """With GAP + dense, d(logit)/d(feature map) is the head kernel / (h*w): the
    closed form must equal tf.GradientTape's Grad-CAM on the same model and image."""
    rows = _rows(dataset="MURA-v1.1", split="val", body_part="HUMERUS", label="positive")[:2]
    size = load_registry(REGISTRY).get(CLASSIFIER).input_size
    batch = np.stack([fit_square(cv2.imread(str(MSK_DATA / r["path"]), cv2.IMREAD_GRAYSCALE)
                                 .astype(np.float32) / 255.0, size)[0] for r in rows])[..., None]
    model = keras_classifier
    logits, feats = model(batch, training=False)
    kernel = np.asarray(model.get_layer("head").kernel)
    fast = gradcam_closed_form(np.asarray(feats), kernel, 0)
    reference = gradcam_tape(model, batch, 0)
    assert fast.shape == reference.shape
    np.testing.assert_allclose(fast, reference, atol=1e-4)
    assert fast.max() > 0.99  # normalised maps, not all zero


def test_test_time_flip_is_one_head_on_the_mean_map(analyser: Analyser, keras_classifier: Any) -> None:
    """With test_time_flip the logit is the mean of the logits of the image and its
    mirror, and the heat map is the tf.GradientTape Grad-CAM of that mean logit, the
    mirror's map mirrored back before the two are added."""
    import dataclasses

    import tensorflow as tf

    from models.training.export import KerasGraph

    entry = dataclasses.replace(analyser.classifier_entry, test_time_flip=True)
    keras_graph = KerasGraph(keras_classifier, entry.input_size)
    flipping = Analyser(analyser.router_entry, entry, analyser._router_graph, keras_graph)
    rows = _rows(dataset="MURA-v1.1", split="val", body_part="FOREARM", label="positive")[:2]
    size = entry.input_size
    squares = np.stack([fit_square(cv2.imread(str(MSK_DATA / r["path"]), cv2.IMREAD_GRAYSCALE)
                                   .astype(np.float32) / 255.0, size)[0] for r in rows])
    logits, probs, heat = flipping.predict_classifier(squares)
    model = keras_classifier
    x = tf.constant(squares[..., None])
    with tf.GradientTape() as tape:
        l1, a1 = model(x, training=False)
        l2, a2 = model(x[:, :, ::-1], training=False)
        tape.watch([a1, a2])
        score = tf.reduce_sum(0.5 * (l1[:, 0] + l2[:, 0]))
    g1, g2 = tape.gradient(score, [a1, a2])
    np.testing.assert_allclose(logits, 0.5 * (l1[:, 0] + l2[:, 0]).numpy(), atol=1e-4)
    cam = tf.nn.relu(tf.einsum("bhwc,bc->bhw", a1, tf.reduce_mean(g1, axis=(1, 2)))
                     + tf.einsum("bhwc,bc->bhw", a2, tf.reduce_mean(g2, axis=(1, 2)))[:, :, ::-1]).numpy()
    cam = cam / cam.reshape(len(cam), -1).max(axis=1)[:, None, None]
    reference = np.stack([cv2.resize(c.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
                          for c in cam])
    np.testing.assert_allclose(heat, np.clip(reference, 0, 1), atol=1e-4)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits / entry.temperature)), atol=1e-9)
    unflipped = dataclasses.replace(analyser.classifier_entry, test_time_flip=False)
    plain = Analyser(analyser.router_entry, unflipped, analyser._router_graph, keras_graph)
    np.testing.assert_allclose(plain.predict_classifier(squares)[0], l1[:, 0].numpy(), atol=1e-4)
    assert not np.allclose(l1[:, 0].numpy(), logits, atol=1e-3)  # the mirror did change the answer


def test_output_stride_16_keeps_the_weights_and_doubles_the_grid() -> None:
    """The atrous backbone (last stage dilated) has the same layers and weights as
    torchvision's, so the ported ImageNet weights load unchanged, and a feature grid
    twice as fine; away from the borders, where the zero padding of the dilated
    convolutions differs, it sees the same things: its map, pooled back to the coarse
    grid, correlates with the stride-32 map on the same image."""
    from models.training import mobilenet

    weights = mobilenet.load_backbone_weights(str(ROOT / "models" / "weights" / "mobilenet_v2_imagenet_backbone.npz"))
    coarse = mobilenet.build_model(128, 1, weights, output_stride=32)
    fine = mobilenet.build_model(128, 1, weights, output_stride=16)
    assert [w.shape for w in coarse.weights] == [w.shape for w in fine.weights]
    assert coarse.count_params() == fine.count_params()
    row = _rows(dataset="MURA-v1.1", split="val", body_part="FOREARM")[0]
    x = fit_square(cv2.imread(str(MSK_DATA / row["path"]), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0,
                   128)[0][None, ..., None]
    a = np.asarray(coarse(x, training=False)[1])[0]
    b = np.asarray(fine(x, training=False)[1])[0]
    assert a.shape == (4, 4, 1280) and b.shape == (8, 8, 1280)
    pooled = b.reshape(4, 2, 4, 2, 1280).mean(axis=(1, 3))
    r = np.corrcoef(a[1:3, 1:3].ravel(), pooled[1:3, 1:3].ravel())[0, 1]
    assert r > 0.8, r  # measured 0.94 (0.33 against another forearm)
    with pytest.raises(ValueError, match="output_stride"):
        mobilenet.build_model(128, 1, None, output_stride=8)


def test_training_smoke_run_on_a_tiny_subset(tmp_path: Path) -> None:
    from models.cli import train_main

    out = tmp_path / "run"
    code = train_main(["--task", "classifier", "--data", str(MSK_DATA), "--out", str(out),
                       "--size", "64", "--epochs", "1", "--limit", "32", "--batch-size", "16",
                       "--quiet"])
    assert code == 0
    assert (out / "model.keras").exists() and (out / "state.json").exists()
    state = json.loads((out / "state.json").read_text())
    assert state["history"] and np.isfinite(state["history"][-1]["loss"])


def test_fracture_samples_are_fracture_labels_with_both_classes() -> None:
    from models.training import data as mdata

    rows = mdata.in_split(mdata.read_manifest(MSK_DATA), "val")
    samples = mdata.fracture_samples(rows)
    mura = [s for s in samples if s.row.dataset == "MURA-v1.1"]
    assert mura and all(s.target == 0 and s.row.label == "negative" and s.row.label_better_mura != "positive"
                        for s in mura), "MURA's normal images only, as fracture negatives"
    samples = [s for s in samples if s.row.dataset != "MURA-v1.1"]
    assert {s.row.label_meaning for s in samples} == {"fracture"}
    assert {s.row.dataset for s in samples} <= set(mdata.FRACTURE_DATASETS)
    assert "bone-break-classification" not in {s.row.dataset for s in samples}  # positives only
    atlas = [s for s in samples if s.row.dataset == "FracAtlas"]
    assert {s.target for s in atlas} == {0, 1} and all(s.row.boxes for s in atlas if s.target == 1)


def test_router_targets_cover_the_lower_limb_and_hip() -> None:
    from models.training import data as mdata

    rows = mdata.read_manifest(MSK_DATA)
    by = {(r.dataset, r.body_part): mdata.router_target(r) for r in rows}
    assert by[("FracAtlas", "LEG")] == "LEG" and by[("UNIFESP-bodypart", "ANKLE")] == "LEG"
    assert by[("knee-kl-crops", "KNEE")] == "LEG" and by[("UNIFESP-bodypart", "PELVIS")] == "HIP"
    assert by[("uci-shoulder-implant", "SHOULDER")] == "SHOULDER"
    assert by[("FracAtlas", "HAND")] is None  # fingers to elbow: no finer label
    assert by[("UNIFESP-bodypart", "CHEST")] == "OTHER"
    hand = next(r for r in rows if r.dataset == "FracAtlas" and r.body_part == "HAND")
    assert mdata.region_parts(hand) == {"FINGER", "HAND", "WRIST", "FOREARM", "ELBOW"}


def test_the_label_audit_corrects_exactly_the_images_it_lists(tmp_path: Path) -> None:
    """models/training/label_audit.csv: every row names a manifest image with the label it
    corrects; read_manifest applies it and keeps the manifest's label; a row whose label
    is not the manifest's (another version of the data) is not applied."""
    from models.training import data as mdata

    audit = mdata.read_label_audit(mdata.LABEL_AUDIT)
    plain = {(r.dataset, r.path): r for r in mdata.read_manifest(MSK_DATA, None)}
    fixed = {(r.dataset, r.path): r for r in mdata.read_manifest(MSK_DATA)}
    assert len(audit) >= 60
    for (dataset, rel), (was, now) in audit.items():
        key = (dataset, MSK_DATA / rel)
        assert plain[key].body_part == was and plain[key].manifest_body_part == ""
        assert fixed[key].body_part == now and fixed[key].manifest_body_part == was
    assert mdata.region_parts(fixed[key]) == {"FOREARM", "WRIST"}
    changed = [k for k in plain if plain[k] != fixed[k]]
    assert len(changed) == len(audit)
    # the pkdarabi FINGER images of both splits were looked at; the corrected ones are in both
    assert {fixed[k].split for k in changed} == {"train", "val"}
    (dataset, rel), (was, now) = next(iter(audit.items()))
    wrong = tmp_path / "audit.csv"
    wrong.write_text("path,dataset,split,manifest_body_part,audited_body_part\n"
                     f"{rel},{dataset},val,ELBOW,{now}\n")
    row = next(r for r in mdata.read_manifest(MSK_DATA, wrong) if r.path == MSK_DATA / rel)
    assert row.body_part == was and row.manifest_body_part == ""


def test_set_valued_router_loss_is_minus_log_of_the_allowed_mass() -> None:
    """-log sum_{c in S} softmax(z)_c: its value, the ordinary cross-entropy for one class,
    and a gradient that moves mass into the set without choosing inside it."""
    import tensorflow as tf

    from models.training.train import set_cross_entropy

    z = np.array([[2.0, 0.5, -1.0, 0.0], [0.3, 0.3, 0.3, 0.3]], dtype=np.float32)
    s = np.array([[0, 1, 1, 0], [1, 0, 0, 0]], dtype=np.float32)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    zt = tf.Variable(z)
    with tf.GradientTape() as tape:
        loss = set_cross_entropy(tf.constant(s), zt)
        total = tf.reduce_sum(loss)
    got = loss.numpy()
    assert got == pytest.approx([-np.log(p[0, 1] + p[0, 2]), -np.log(0.25)], rel=1e-5)
    # one allowed class: the sparse cross-entropy keras would compute
    sparse = tf.keras.losses.sparse_categorical_crossentropy(np.array([0]), z[1:], from_logits=True).numpy()
    assert got[1] == pytest.approx(float(sparse[0]), rel=1e-5)
    g = tape.gradient(total, zt).numpy()
    # d/dz_c = p_c - [c in S] p_c / sum_S p: negative inside the set, positive outside
    q = p[0] * s[0] / (p[0] * s[0]).sum()
    assert g[0] == pytest.approx(p[0] - q, abs=1e-6)
    assert g[0, 1] < 0 and g[0, 2] < 0 and g[0, 0] > 0 and g[0, 3] > 0
    # inside the set the gradient keeps the classes' ratio: it does not pick a part
    assert g[0, 1] / g[0, 2] == pytest.approx(p[0, 1] / p[0, 2], rel=1e-4)


def test_every_fracatlas_region_teaches_the_router_a_set() -> None:
    """FracAtlas HAND (fingers to elbow) and +-joined regions become set-valued router
    samples (union of their parts) instead of being skipped; single parts stay single."""
    from models.training import data as mdata

    rows = mdata.in_split(mdata.read_manifest(MSK_DATA), "val")
    samples = mdata.router_samples(rows, None, 0)
    names = {s.row.path: {mdata.ROUTER_CLASSES[i] for i in s.allowed} for s in samples}
    atlas = [r for r in rows if r.dataset == "FracAtlas"]
    assert atlas and all(r.path in names for r in atlas)  # no FracAtlas region is skipped
    upper = {"FINGER", "HAND", "WRIST", "FOREARM", "ELBOW"}
    for r in atlas:
        if r.body_part == "HAND":
            assert names[r.path] == upper
        elif r.body_part == "HAND+SHOULDER":
            assert names[r.path] == upper | {"SHOULDER"}
        elif r.body_part == "LEG+HIP":
            assert names[r.path] == {"LEG", "HIP"}
        elif r.body_part == "LEG":
            assert names[r.path] == {"LEG"}
    by_target = {s.row.path: s.target for s in samples}
    assert all(by_target[r.path] == -1 for r in atlas if r.body_part == "HAND")
    implant = next(s for s in samples if s.row.dataset == "uci-shoulder-implant")
    assert implant.target == mdata.ROUTER_CLASSES.index("SHOULDER") and len(implant.allowed) == 1
    matrix = mdata.allowed_matrix(samples, len(mdata.ROUTER_CLASSES))
    assert matrix.shape == (len(samples), len(mdata.ROUTER_CLASSES))
    assert (matrix.sum(axis=1) == [len(s.allowed) for s in samples]).all()


def test_router_training_smoke_run_with_set_labels(tmp_path: Path) -> None:
    """The router trains on set-valued labels (FracAtlas regions included) and resumes."""
    from models.cli import train_main

    out = tmp_path / "router"
    args = ["--task", "router", "--data", str(MSK_DATA), "--out", str(out), "--size", "64",
            "--limit", "48", "--batch-size", "16", "--quiet"]
    assert train_main(args + ["--epochs", "1"]) == 0
    assert train_main(args + ["--epochs", "2", "--resume"]) == 0
    history = json.loads((out / "state.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["loss"]) and 0.0 <= h["in_allowed_set"] <= 1.0 for h in history)


def test_localisation_training_smoke_run(tmp_path: Path) -> None:
    """The box-supervised activation-map loss trains and reports a pointing game; the
    shipped model is the mean of the last two epochs' weights."""
    from models.cli import train_main

    out = tmp_path / "run"
    code = train_main(["--task", "classifier", "--data", str(MSK_DATA), "--out", str(out),
                       "--size", "64", "--epochs", "2", "--limit", "48", "--batch-size", "16",
                       "--localisation-weight", "0.3", "--average-last", "2", "--finding", "fracture",
                       "--quiet"])
    assert code == 0
    assert sorted(p.name for p in out.glob("epoch-*.keras")) == ["epoch-1.keras", "epoch-2.keras"]
    last = json.loads((out / "state.json").read_text())["history"][-1]
    assert np.isfinite(last["cam_loss"]) and np.isfinite(last["logit_loss"])
    assert 0.0 <= last["pointing_game"] <= 1.0

    # a second stage starts from the first stage's weights, not from ImageNet's
    import keras

    second = tmp_path / "second"
    code = train_main(["--task", "classifier", "--data", str(MSK_DATA), "--out", str(second),
                       "--size", "64", "--epochs", "1", "--limit", "16", "--batch-size", "16",
                       "--localisation-weight", "1.0", "--lr", "1e-12", "--init-from", str(out / "model.keras"),
                       "--quiet"])
    assert code == 0
    before = keras.models.load_model(out / "model.keras", compile=False).get_layer("f1_c0_conv").get_weights()[0]
    after = keras.models.load_model(second / "model.keras", compile=False).get_layer("f1_c0_conv").get_weights()[0]
    np.testing.assert_allclose(after, before, atol=1e-6)  # a learning rate of 1e-12 moves nothing


def test_abnormality_output_trains_beside_the_fracture_head_and_stays_out_of_the_graph(
        tmp_path: Path) -> None:
    """``--abnormality-weight``: MURA's abnormal images train only the auxiliary output
    (never the fracture loss), whose study AUROC by part is reported each epoch; the
    inference model keeps the two outputs the node serves; a resumed run goes on."""
    from models.cli import train_main
    from models.training import data as mdata
    from models.training import train as mtrain

    rows = mdata.in_split(mdata.read_manifest(MSK_DATA), "train")
    fracture = mdata.fracture_samples(rows)
    extra = mdata.abnormality_only_samples(rows, exclude=[s.row.path for s in fracture])
    assert extra and all(not s.classify and s.row.dataset == "MURA-v1.1" for s in extra)
    assert not any(s.row.dataset == "MURA-v1.1" and s.row.label == "positive" for s in fracture), \
        "a MURA abnormal image is a fracture sample"
    y, w = mtrain._abnormality_targets(fracture + extra, 0.5)
    mura = [s.row.dataset == "MURA-v1.1" for s in fracture + extra]
    assert all(wi == 0 for wi, m in zip(w, mura) if not m), "a non-MURA image weighs in the abnormality loss"
    assert set(y[np.array(mura)]) == {0.0, 1.0} and all(w[np.array(mura)] > 0)

    out = tmp_path / "run"
    args = ["--task", "classifier", "--data", str(MSK_DATA), "--out", str(out), "--size", "64",
            "--epochs", "2", "--limit", "64", "--batch-size", "16", "--finding", "fracture",
            "--localisation-weight", "0.3", "--abnormality-weight", "0.5", "--max-minutes", "0.01",
            "--quiet"]
    assert train_main(args) == 0  # the budget stops it after the first epoch
    state = json.loads((out / "state.json").read_text())
    assert state["epochs_done"] == 1
    changed = [a if a != "0.5" else "0.7" for a in args] + ["--resume"]
    with pytest.raises(SystemExit, match=r"other settings \(abnormality_weight 0\.5, not 0\.7\)"):
        train_main(changed)  # a checkpoint holds the losses it was made with
    assert train_main([a for a in args if a not in ("--max-minutes", "0.01")] + ["--resume"]) == 0
    history = json.loads((out / "state.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    last = history[-1]
    assert np.isfinite(last["abnormality_loss"]) and np.isfinite(last["logit_loss"])
    assert set(last["abnormality"]) <= {"forearm_study_auroc", "humerus_study_auroc", "wrist_study_auroc"}
    assert last["abnormality"], "no abnormality AUROC reported"
    import keras

    served = keras.models.load_model(out / "model.keras", compile=False)
    assert len(served.outputs) == 2 and "abnormality" not in {layer.name for layer in served.layers}
    with pytest.raises(ValueError, match="abnormality_weight"):
        mtrain.TrainConfig(task="classifier", data_dir="d", out_dir="o", size=64, epochs=1,
                           abnormality_weight=0.5)  # the abnormality finding has no second output


def test_top_blocks_train_on_cached_feature_maps_and_resume(tmp_path: Path) -> None:
    """--cache-below-block N: blocks 0..N-1 stay exactly as they started, blocks N.. move;
    each augmentation draw is cached once and read back on a resumed run."""
    from models.cli import train_main
    import keras

    start = load_registry(REGISTRY).get(CLASSIFIER).weights  # the shipped classifier, at 64 px
    common = ["--task", "classifier", "--data", str(MSK_DATA), "--size", "64", "--limit", "40",
              "--batch-size", "16", "--localisation-weight", "1.0", "--finding", "fracture",
              "--output-stride", "16", "--quiet"]
    out = tmp_path / "top"
    top = common + ["--out", str(out), "--init-from", str(start), "--cache-below-block", "17",
                    "--cache-variants", "2", "--lr", "1e-2"]
    assert train_main(top + ["--epochs", "1"]) == 0
    assert sorted(p.name for p in (out / "feature-cache").glob("draw-*.json")) == ["draw-0.json"]
    assert train_main(top + ["--epochs", "2", "--resume"]) == 0
    draws = sorted(p.name for p in (out / "feature-cache").glob("draw-*.json"))
    assert draws == ["draw-0.json", "draw-1.json"]
    history = json.loads((out / "state.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["cam_loss"]) and 0.0 <= h["pointing_game"] <= 1.0 for h in history)
    before = keras.models.load_model(start, compile=False)
    after = keras.models.load_model(out / "model.keras", compile=False)
    for frozen in ("f1_c0_conv", "f16_c2_conv", "f16_c2_bn"):
        for a, b in zip(before.get_layer(frozen).get_weights(), after.get_layer(frozen).get_weights()):
            np.testing.assert_array_equal(a, b)
    moved = [not np.allclose(a, b) for name in ("f17_c0_conv", "f18_conv", "head")
             for a, b in zip(before.get_layer(name).get_weights()[:1], after.get_layer(name).get_weights()[:1])]
    assert all(moved)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["cache_below_block"] == 17 and cfg["cache_variants"] == 2


def test_a_second_stage_records_the_registered_model_it_started_from(tmp_path: Path) -> None:
    """The starting weights leave the tree with the new version, so the registry text
    keeps their name, version, hash and training."""
    from models.training.register import lineage

    registry = load_registry(REGISTRY)
    entry = registry.get(CLASSIFIER)
    registered = {CLASSIFIER: {"version": entry.version, "sha256": entry.sha256,
                               "training_data": "stage one text"}}
    text = lineage(str(entry.weights), registered)
    assert f"{CLASSIFIER} {entry.version}" in text and entry.sha256[:12] in text and "stage one text" in text
    other = tmp_path / "other.keras"
    other.write_bytes(b"not the registered weights")
    assert lineage(str(other), registered) == f"; second stage, initialised from other.keras (sha256 {sha256_of(other)[:12]}...)"
    assert lineage(None, registered) == ""


def test_sensitivity_threshold_is_the_highest_that_keeps_the_target() -> None:
    """The fracture operating point: the highest threshold at which at least 90 % of the
    fractured images score at or above it, never on a data point."""
    from models.training.metrics import threshold_for_sensitivity

    rng = np.random.default_rng(3)
    for _ in range(50):
        y = rng.integers(0, 2, 60)
        y[:2] = (0, 1)
        p = rng.random(60)
        t = threshold_for_sensitivity(y, p, 0.9)
        assert (p[y == 1] >= t).mean() >= 0.9
        # just above the next score up, the target is lost
        assert (p[y == 1] > p[p > t].min()).mean() < 0.9
        assert t not in set(p.tolist())
    with pytest.raises(ValueError):
        threshold_for_sensitivity(np.zeros(5), np.linspace(0, 1, 5), 0.9)


def test_crossfit_sensitivity_is_measured_on_the_half_it_was_not_chosen_on() -> None:
    """A score that separates perfectly cross-fits to sensitivity and specificity 1; a
    score of pure noise cross-fits to about the target sensitivity and a specificity
    near 1 - target, not to the in-sample figures."""
    from models.training.evaluate import _crossfit_sensitivity

    rng = np.random.default_rng(4)
    n = 400
    y = rng.integers(0, 2, n)
    groups = np.array([f"g{i}" for i in range(n)])
    family = np.array(["UPPER_LIMB"] * n)
    every = np.ones(n, dtype=bool)
    perfect = _crossfit_sensitivity(y, y * 0.5 + 0.25, family, groups, every, every, 0.9, seed=0)
    assert perfect["sensitivity"] == 1.0 and perfect["specificity"] == 1.0
    noise = _crossfit_sensitivity(y, rng.random(n), family, groups, every, every, 0.9, seed=0)
    assert 0.8 <= noise["sensitivity"] <= 0.97 and noise["specificity"] <= 0.2
    assert noise["halvings"] == 20


def test_threshold_spread_is_wide_when_few_fractured_images_carry_the_rule() -> None:
    """The rule's threshold on bootstrap resamples: the same scores with 300 fractured
    images give a narrow range around the in-sample threshold, with 30 a wide one; a
    family without a fractured image is left out, and the registered threshold is
    reported as given."""
    from models.training.evaluate import _threshold_spread

    rng = np.random.default_rng(7)

    def family_of(n_pos: int, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = np.r_[np.ones(n_pos), np.zeros(4 * n_pos)].astype(int)
        p = np.r_[rng.beta(5, 2, n_pos), rng.beta(2, 5, 4 * n_pos)]
        return y, p, np.array([name] * len(y))

    parts = [family_of(300, "MANY"), family_of(30, "FEW")]
    y = np.concatenate([x[0] for x in parts] + [np.zeros(50, dtype=int)])
    p = np.concatenate([x[1] for x in parts] + [rng.random(50)])
    family = np.concatenate([x[2] for x in parts] + [np.array(["NONE"] * 50)])
    thr = np.where(family == "MANY", 0.5, np.where(family == "FEW", 0.6, 0.7))
    groups = np.array([f"g{i}" for i in range(len(y))])
    spread = _threshold_spread(y, p, family, thr, groups, np.ones(len(y), dtype=bool), 0.9, seed=0)
    assert set(spread) == {"MANY", "FEW"}
    assert spread["FEW"]["registered"] == 0.6 and spread["FEW"]["fractured"] == 30
    width = {k: v["ci95"][1] - v["ci95"][0] for k, v in spread.items()}
    assert width["FEW"] > 2 * width["MANY"]
    for v in spread.values():
        assert v["ci95"][0] <= v["median"] <= v["ci95"][1] and v["resamples"] == 200


def test_evaluate_cli_writes_the_metrics_contract(tmp_path: Path) -> None:
    """``fracture-node evaluate`` on any folder in the manifest format."""
    from models.cli import evaluate_main

    data = tmp_path / "data"
    data.mkdir()
    picked = []
    for part in ("FOREARM", "HUMERUS"):
        for label in ("positive", "negative"):
            picked += _rows(dataset="MURA-v1.1", split="val", body_part=part, label=label)[:6]
    with (MSK_DATA / "manifest.csv").open() as fh:
        fields = csv.DictReader(fh).fieldnames
    assert fields is not None
    with (data / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in picked:
            target = data / row["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(MSK_DATA / row["path"], target)
            writer.writerow(row)
    out = tmp_path / "eval"
    assert evaluate_main(["--data", str(data), "--out", str(out), "--n-boot", "50",
                          "--router", ROUTER, "--classifier", CLASSIFIER]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["router"]["accuracy"] <= 1.0
    assert "per_class" in metrics["router"]
    assert "auroc" in metrics["fracture"]["image"]
    for key in ("auroc", "kappa", "sensitivity", "specificity", "n"):
        assert key in metrics["fracture"]["study"]
    assert set(metrics["fracture"]["by_body_part"]) <= {"FOREARM", "HUMERUS"}
    for block in metrics["fracture"]["by_body_part"].values():
        for key in ("auroc", "sensitivity", "specificity", "n"):
            assert key in block["image"]
    assert 0.0 <= metrics["router"]["unsupported_analysed_rate"] <= 1.0
    assert "pointing_game" in metrics["localisation"]
    assert (out / "report.md").exists() and list(out.glob("*.png"))


def _folder(tmp_path: Path, picked: list[dict[str, str]]) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    with (MSK_DATA / "manifest.csv").open() as fh:
        fields = csv.DictReader(fh).fieldnames
    assert fields is not None
    with (data / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in picked:
            target = data / row["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(MSK_DATA / row["path"], target)
            writer.writerow(row)
    return data


def test_evaluate_on_lower_limbs_only_reports_the_router(tmp_path: Path) -> None:
    """A folder without one image of a supported part: no exit; the router's behaviour,
    the refusal counts and the fracture-labelled image metrics are reported."""
    from models.cli import evaluate_main

    picked = (_rows(dataset="FracAtlas", split="val", body_part="LEG", label="positive")[:4]
              + _rows(dataset="FracAtlas", split="val", body_part="LEG", label="negative")[:4]
              + _rows(dataset="UNIFESP-bodypart", split="val", body_part="KNEE")[:2])
    data = _folder(tmp_path, picked)
    out = tmp_path / "eval"
    assert evaluate_main(["--data", str(data), "--out", str(out), "--n-boot", "50",
                          "--router", ROUTER, "--classifier", CLASSIFIER]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    router = metrics["router"]
    assert router["n_known_region"] == len(picked)
    assert router["analysed"] + router["refused_unsupported"] == len(picked)
    assert router["unsupported_analysed"] == round(router["unsupported_analysed_rate"] * len(picked))
    assert metrics["fracture"]["study"]["n"] == 0
    leg = metrics["fracture"]["fracture_labelled"]["by_region"]["LEG"]
    assert leg["n"] == 8 and 0.0 <= leg["auroc"] <= 1.0
    assert "safety" in (out / "report.md").read_text()
    # what each confidence floor would trade; the router's own floor is the headline figure
    from models.training.evaluate import FLOOR_GRID

    sweep = router["floor_sweep"]
    assert [t["floor"] for t in sweep["table"]] == list(FLOOR_GRID)
    at = next(t for t in sweep["table"] if t["floor"] == sweep["shipped_floor"])
    assert at["unsupported_analysed"] == router["unsupported_analysed"] and at["analysed"] == router["analysed"]
    assert at["refused_uncertain"] == router["refused_uncertain"]
    table = sweep["table"]
    assert all(a["refused_uncertain"] <= b["refused_uncertain"] for a, b in zip(table, table[1:]))
    assert "What the confidence floor trades" in (out / "report.md").read_text()
    # the shipped classifier is a fracture one, measured as served: the legs routed to
    # LEG (a supported part) are analysed, with the LEG operating point
    assert metrics["models"]["classifier"]["finding"] == "fracture"
    served = metrics["fracture"]["by_body_part"]["LEG"]["image"]
    assert served["routed"] == 8 and served["n"] + served["refused"] == 8
    for key in ("auroc", "sensitivity", "specificity", "n"):
        assert key in served
    assert "Fracture classifier, as served" in (out / "report.md").read_text()


def test_evaluate_reports_the_safety_figure_on_the_audited_and_the_manifest_labels(tmp_path: Path) -> None:
    """Images the label audit corrects: the safety figure is on the audited labels, and
    the same figure on the manifest's labels is reported beside it (metrics and report)."""
    from models.cli import evaluate_main
    from models.training import data as mdata

    audited = {rel for (_, rel) in mdata.read_label_audit(mdata.LABEL_AUDIT)}
    picked = [r for r in _rows(dataset="pkdarabi-bone-fracture-detection", split="val", body_part="FINGER")
              if r["path"] in audited][:3]
    picked += _rows(dataset="FracAtlas", split="val", body_part="LEG", label="negative")[:2]
    data = _folder(tmp_path, picked)
    for flag, expect in (([], 3), (["--manifest-labels"], 0)):
        out = tmp_path / f"eval{len(flag)}"
        assert evaluate_main(["--data", str(data), "--out", str(out), "--n-boot", "20",
                              "--router", ROUTER, "--classifier", CLASSIFIER, *flag]) == 0
        router = json.loads((out / "metrics.json").read_text())["router"]
        assert router["n_known_region"] == 5
        if expect:
            ml = router["manifest_labels"]
            assert ml["n_corrected"] == 3 and ml["n_known_region"] == 5
            assert "label_audit.csv" in (out / "report.md").read_text()
            audited_wrong = router["unsupported_analysed"]
        else:
            assert "manifest_labels" not in router
            manifest_wrong = router["unsupported_analysed"]
    # wrists labelled FINGER, routed to WRIST: wrong on the manifest's label, right on the audited one
    assert manifest_wrong == ml["unsupported_analysed"] > audited_wrong

if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
