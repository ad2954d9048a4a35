"""The exported serving graphs (OpenVINO, fp32) against the TensorFlow reference.

On real MURA validation radiographs (read in place from ../shared/data/msk) the
node's Analyser on the exported graphs and the same Analyser on the Keras models
(:class:`models.training.export.KerasGraph`, a ``tf.function``) agree within
ROUTER_ATOL (router probabilities), LOGIT_ATOL (classifier logits), PROB_ATOL
(calibrated probabilities) and HEATMAP_ATOL (the upsampled Grad-CAM map), and no
decision on a fixed subset changes (``bench/parity.py`` does the whole split).  The
processing path runs without importing TensorFlow, and a graph whose hash differs
from the registry's is refused before it is parsed.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import MSK_DATA, ROOT
from models.registry import WeightsIntegrityError, load_registry, sha256_of
from pipeline.classify import Analyser
from pipeline.resize import fit_square
from pipeline.result import ImageFinding, ImageMetadata, NormalisedImage, Refusal

REGISTRY = ROOT / "models" / "registry.toml"
ROUTER, CLASSIFIER = "bodypart-router", "fracture-classifier"
ROUTER_ATOL = 1e-4
LOGIT_ATOL = 1e-3
PROB_ATOL = 1e-4
HEATMAP_ATOL = 2e-3
"""Tolerances against TensorFlow (measured on the 24 images below: router 3e-6,
logits 1.5e-4, probabilities 2e-5, heat map 2e-4; the feature map itself 3e-4)."""


def _rows(**match: str) -> list[dict[str, str]]:
    with (MSK_DATA / "manifest.csv").open() as fh:
        return [r for r in csv.DictReader(fh) if all(r[k] == v for k, v in match.items())]


def _pixels(row: dict[str, str]) -> np.ndarray:
    return cv2.imread(str(MSK_DATA / row["path"]), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0


def _subset() -> list[dict[str, str]]:
    """A fixed subset: MURA forearm and humerus, positive and negative, and OTHER images."""
    picked: list[dict[str, str]] = []
    for part in ("FOREARM", "HUMERUS"):
        for label in ("positive", "negative"):
            picked += _rows(dataset="MURA-v1.1", split="val", body_part=part, label=label)[:5]
    picked += _rows(dataset="UNIFESP-bodypart", split="val", body_part="CHEST")[:2]
    picked += _rows(dataset="MURA-v1.1", split="val", body_part="WRIST")[:2]
    return picked


@pytest.fixture(scope="module")
def served() -> Analyser:
    return Analyser.load(REGISTRY, ROUTER, CLASSIFIER)


@pytest.fixture(scope="module")
def reference(served: Analyser) -> Iterator[Analyser]:
    from models.registry import load_keras_model
    from models.training.export import KerasGraph

    r, c = served.router_entry, served.classifier_entry
    yield Analyser(r, c, KerasGraph(load_keras_model(r), r.input_size),
                   KerasGraph(load_keras_model(c), c.input_size), heads=served.heads)


def test_the_registry_records_a_verified_graph_for_each_model() -> None:
    registry = load_registry(REGISTRY)
    for name in (ROUTER, CLASSIFIER):
        entry = registry.get(name)
        assert entry.graph is not None and entry.graph_format == "onnx"
        assert entry.graph.parent == entry.weights.parent
        assert sha256_of(entry.graph) == entry.graph_sha256 != entry.sha256


def test_exported_graphs_equal_tensorflow_on_real_radiographs(served: Analyser, reference: Analyser) -> None:
    rows = _subset()
    pixels = [_pixels(r) for r in rows]
    rs, cs = served.router_entry.input_size, served.classifier_entry.input_size
    router_x = np.stack([fit_square(p, rs)[0] for p in pixels])
    classifier_x = np.stack([fit_square(p, cs)[0] for p in pixels])
    got = served.predict(router_x, classifier_x)
    want = reference.predict(router_x, classifier_x)
    np.testing.assert_allclose(got.router_probabilities, want.router_probabilities, atol=ROUTER_ATOL)
    np.testing.assert_allclose(got.classifier_logits, want.classifier_logits, atol=LOGIT_ATOL)
    np.testing.assert_allclose(got.fracture_probabilities, want.fracture_probabilities, atol=PROB_ATOL)
    np.testing.assert_allclose(got.heatmaps, want.heatmaps, atol=HEATMAP_ATOL)
    np.testing.assert_allclose(served.classifier_features(classifier_x[:4]),
                               reference.classifier_features(classifier_x[:4]), atol=1e-3)
    assert served.classifier_grid == reference.classifier_grid == cs // 16  # output stride 16
    # the subset is not degenerate: both labels, a spread of probabilities, real maps
    assert got.fracture_probabilities.min() < 0.3 and got.fracture_probabilities.max() > 0.7
    assert (got.heatmaps.reshape(len(rows), -1).max(axis=1) > 0.95).all()  # bilinear: a peak near 1


def test_no_decision_changes_on_a_fixed_validation_subset(served: Analyser, reference: Analyser) -> None:
    """Study by study, as the node calls it: same outcome type, body part, decision
    (or refusal code) for every image."""
    by_study: dict[str, list[dict[str, str]]] = {}
    for r in _subset():
        by_study.setdefault(r["study_id"] or r["path"], []).append(r)
    compared = 0
    for s, rows in enumerate(by_study.values()):
        images = [NormalisedImage(ImageMetadata("1.2.9", "1.2.9.1", f"1.2.9.{s}.{i}",
                                                "1.2.840.10008.5.1.4.1.1.1", modality="CR"),
                                  _pixels(r), _pixels(r).shape) for i, r in enumerate(rows)]
        for a, b in zip(served.analyse(images), reference.analyse(images)):
            assert type(a) is type(b)
            if isinstance(a, ImageFinding) and isinstance(b, ImageFinding):
                assert (a.body_part, a.decision) == (b.body_part, b.decision)
                assert abs(a.fracture_probability - b.fracture_probability) < PROB_ATOL
            else:
                assert isinstance(a, Refusal) and isinstance(b, Refusal) and a.code == b.code
            compared += 1
    assert compared == len(_subset())


def test_one_thread_runs_a_batch_one_image_at_a_time_with_the_same_outputs(served: Analyser) -> None:
    """With one thread (the worker's model thread) the fixed model takes one image and a
    batch runs image by image, so the runtime keeps one image's buffers: the outputs equal
    one run of the whole batch with two threads."""
    from models.runtime import OpenVinoGraph

    entry = served.classifier_entry
    rows = _subset()[:3]
    x = np.stack([fit_square(_pixels(r), entry.input_size)[0] for r in rows])[..., None]
    one, two = OpenVinoGraph(entry.graph, 1, "fp32"), OpenVinoGraph(entry.graph, 2, "fp32")
    assert one._static_batch == 1 and two._static_batch == 2
    logits1, feats1 = one.run(x.astype(np.float32))
    logits2, feats2 = two.run(x.astype(np.float32))
    assert logits1.shape == logits2.shape == (3, 1) and feats1.shape == feats2.shape
    assert np.abs(logits1 - logits2).max() < 1e-4
    assert np.abs(feats1 - feats2).max() < 1e-4

def test_two_streams_run_the_images_of_a_call_side_by_side_with_the_same_outputs(
        served: Analyser) -> None:
    """Two streams of one thread each (``[worker] model_streams = 2``): one fixed model of
    batch 1 with an infer request per stream, the images of a call two at a time (three
    images: one wave of two, one of one). The outputs are those of one stream image by
    image, and no dynamic model is compiled."""
    from models.runtime import GraphError, OpenVinoGraph

    entry = served.classifier_entry
    rows = _subset()[:3]
    x = np.stack([fit_square(_pixels(r), entry.input_size)[0] for r in rows])[..., None]
    x = x.astype(np.float32)
    one, two = OpenVinoGraph(entry.graph, 1, "fp32"), OpenVinoGraph(entry.graph, 1, "fp32", streams=2)
    assert two._static_batch == 1 and len(two._fixed) == 2
    logits1, feats1 = one.run(x)
    logits2, feats2 = two.run(x)
    assert two._dynamic is None
    assert logits2.shape == logits1.shape == (3, 1) and feats2.shape == feats1.shape
    assert np.abs(logits1 - logits2).max() < 1e-5
    assert np.abs(feats1 - feats2).max() < 1e-5
    assert len({round(float(v), 3) for v in logits2[:, 0]}) == 3  # three images, not one thrice
    with pytest.raises(GraphError, match="streams must be a positive integer"):
        OpenVinoGraph(entry.graph, 1, "fp32", streams=0)



def test_the_fixed_batch_is_one_call_of_the_model_with_or_without_its_flip(served: Analyser) -> None:
    """With two threads the fixed model takes what one image costs the model: the image
    and its mirror with a test-time flip, the image alone without one. A model without a
    flip then never compiles the dynamic one for a single image (it did until session 27:
    every call of 2.3.0's classifier and 2.2.0's router ran the slower dynamic batch)."""
    import dataclasses

    from models.runtime import load_graph

    entry = served.classifier_entry
    rows = _subset()[:1]
    x = np.stack([fit_square(_pixels(r), entry.input_size)[0] for r in rows])[..., None].astype(np.float32)
    for flip in (False, True):
        graph = load_graph(dataclasses.replace(entry, test_time_flip=flip), threads=2)
        assert graph._static_batch == (2 if flip else 1)  # type: ignore[attr-defined]
        graph.run(np.concatenate([x, x[:, :, ::-1]]) if flip else x)
        assert graph._dynamic is None  # type: ignore[attr-defined]


def test_the_node_serves_fp32_in_openvino_f32_equal_to_onnx_runtime(served: Analyser) -> None:
    """The node's runtime (OpenVINO, precision hint f32 read back) and ONNX Runtime, the
    runtime that served fp32 before, compute the same network: logits within 1e-4 and
    the feature map within 1e-4 on real radiographs (measured: 2e-6 and 4e-5)."""
    import openvino as ov

    from models.runtime import OnnxGraph, OpenVinoGraph

    graph = served._classifier_graph.graph
    assert isinstance(graph, OpenVinoGraph) and graph.precision == "fp32"
    assert graph._fixed[0].get_compiled_model().get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert isinstance(served._router_graph, OpenVinoGraph)
    entry = served.classifier_entry
    x = np.stack([fit_square(_pixels(r), entry.input_size)[0] for r in _subset()[:4]])[..., None]
    x = x.astype(np.float32)
    got_logits, got_feats = graph.run(x)
    want_logits, want_feats = OnnxGraph(entry.graph).run(x)
    assert np.abs(got_logits - want_logits).max() < 1e-4
    assert np.abs(got_feats - want_feats).max() < 1e-4


def test_a_tampered_graph_is_refused_before_it_is_loaded(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "models" / "weights", tmp_path / "weights")
    registry = tmp_path / "registry.toml"
    registry.write_text(REGISTRY.read_text())
    entry = load_registry(registry).get(CLASSIFIER)
    assert entry.graph is not None
    data = bytearray(entry.graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.graph.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="SHA-256"):
        Analyser.load(registry, ROUTER, CLASSIFIER)


def test_a_model_without_an_exported_graph_names_the_command(tmp_path: Path) -> None:
    text = "\n".join(line for line in REGISTRY.read_text().splitlines()
                     if not line.startswith(("graph =", "graph_sha256 =", "graph_format =")))
    registry = tmp_path / "registry.toml"
    registry.write_text(text.replace('"weights/', f'"{ROOT}/models/weights/'))
    with pytest.raises(WeightsIntegrityError, match="fracture-node export"):
        Analyser.load(registry, ROUTER, CLASSIFIER)


def test_the_processing_path_runs_without_tensorflow() -> None:
    """A fresh process loads the node's modules and models, processes a real DICOM
    study from demo/studies/forearm into SC/SR/PDF outputs, and never imports TensorFlow."""
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        import pydicom
        import node.cli, node.service, node.worker
        from node.config import load_config
        from node.jobs import InstanceRecord, StudyJob
        from node.processing import processor_factory
        config = load_config(Path({str(ROOT / 'config.toml')!r}), environ={{}})
        process = processor_factory(config)()
        files = sorted(Path({str(ROOT / 'demo' / 'studies' / 'forearm')!r}).glob("forearm_*.dcm"))
        records = []
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            records.append(InstanceRecord(ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                          ds.SOPClassUID, ds.file_meta.TransferSyntaxUID, str(f),
                                          f.stat().st_size, "TEST", "127.0.0.1"))
        done = process(StudyJob(records[0].study_instance_uid, 1, tuple(records), None))
        print(json.dumps({{"outputs": len(done.outputs), "outcomes": done.outcomes,
                          "tensorflow": sorted(m for m in sys.modules if m.split(".")[0] in
                                               ("tensorflow", "keras", "tf2onnx"))}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tensorflow"] == []
    assert result["outputs"] >= 3  # an SC per image, the SR and the PDF
    assert all(state == "analysed" for state, _ in result["outcomes"].values()), result["outcomes"]


def test_register_exports_the_model_it_registers(tmp_path: Path) -> None:
    """Registering a run writes the serving graph beside the weights and records its
    hash, so re-registering (new weights) re-exports; the node then loads that graph."""
    from models.training.register import main as register_main

    shipped = load_registry(REGISTRY).get(ROUTER)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(shipped.weights, run / "model.keras")
    (run / "config.json").write_text(json.dumps({"size": shipped.input_size, "seed": 1, "learning_rate": 5e-4,
                                                 "freeze_blocks": 2}))
    (run / "state.json").write_text(json.dumps({"history": [{"loss": 0.1}]}))
    registry = tmp_path / "models" / "registry.toml"
    registry.parent.mkdir()
    assert register_main(["--task", "router", "--run", str(run), "--name", "router-under-test",
                          "--version", "9.9.9", "--registry", str(registry), "--test-time-flip"]) == 0
    entry = load_registry(registry).get("router-under-test")
    assert entry.graph == registry.parent / "weights" / "router-under-test-9.9.9.onnx"
    assert entry.sha256 == shipped.sha256 and sha256_of(entry.graph) == entry.graph_sha256

    from models.runtime import load_graph

    graph = load_graph(entry)
    x = np.stack([fit_square(_pixels(r), entry.input_size)[0] for r in _subset()[:2]])[..., None]
    shipped_logits, _ = load_graph(shipped).run(x)
    np.testing.assert_allclose(graph.run(x)[0], shipped_logits, atol=1e-5)
