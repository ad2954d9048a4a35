"""The bf16 models (issue 15: reduced precision only as an honestly evaluated model).

``bodypart-router-bf16`` and ``fracture-classifier-bf16`` are the shipped fp32 weights
and graphs served in bfloat16 by OpenVINO (:class:`models.runtime.OpenVinoGraph`).
Their outputs are not the fp32 outputs rounded: on the 24 real radiographs below the
router's probabilities move by up to 0.012 and the classifier's logits by up to 1.0, so
they are models of their own, with their own version and Device UID, the classifier's
operating points chosen again on bf16 outputs, and their own evaluation
(``models/eval/bf16``).  The node runs them only as a pair, and only on a CPU that can
run bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, write_config
from models.registry import RegistryError, load_registry
from models.runtime import bf16_supported
from node.config import load_config
from node.errors import ConfigError
from pipeline.classify import Analyser
from pipeline.resize import fit_square
from pipeline.result import ImageFinding
from test_runtime import REGISTRY, _pixels, _subset

ROUTER, CLASSIFIER = "bodypart-router-bf16", "fracture-classifier-bf16"
ROUTER_PROB_ATOL = 0.1
LOGIT_ATOL = 2.5
"""bf16 against fp32 on the 24 images (measured: router probabilities up to 0.012, logits
up to 1.02, correlation of the logits 0.997): loose, because bf16 keeps 8 bits of
mantissa; the test is that it is the same network, not the same numbers."""
CORRELATION = 0.99

needs_bf16 = pytest.mark.skipif(
    not bf16_supported(),
    reason="this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX): the bf16 models are refused here")


@pytest.fixture(scope="module")
def bf16() -> Analyser:
    return Analyser.load(REGISTRY, ROUTER, CLASSIFIER)


@pytest.fixture(scope="module")
def fp32() -> Analyser:
    """The shipped fp32 graphs run with the bf16 pair's test-time flips (today the same:
    neither router 2.2.0 nor 2.2.0-bf16 runs the mirrored image), so that a comparison
    with the bf16 pair compares the arithmetic alone, whatever either registers next."""
    return fp32_like_bf16()


def fp32_like_bf16() -> Analyser:
    import dataclasses

    from models.runtime import load_graph

    shipped = Analyser.load(REGISTRY, "bodypart-router", "fracture-classifier")
    registry = load_registry(REGISTRY)
    r = dataclasses.replace(shipped.router_entry, test_time_flip=registry.get(ROUTER).test_time_flip)
    c = dataclasses.replace(shipped.classifier_entry, test_time_flip=registry.get(CLASSIFIER).test_time_flip)
    return Analyser(r, c, load_graph(r), load_graph(c), heads=shipped.heads)


def test_the_bf16_models_are_versions_of_their_own_with_their_own_evaluation() -> None:
    registry = load_registry(REGISTRY)
    metrics = json.loads((ROOT / "models" / "eval" / "bf16" / "metrics.json").read_text())
    for name, base, role in ((ROUTER, "bodypart-router", "router"),
                             (CLASSIFIER, "fracture-classifier", "classifier")):
        entry, fp = registry.get(name), registry.get(base)
        assert entry.precision == "bf16" and fp.precision == "fp32"
        assert (entry.sha256, entry.graph_sha256) == (fp.sha256, fp.graph_sha256)  # same files
        assert entry.version != fp.version and entry.device_uid != fp.device_uid
        assert "bf16" in entry.version and "bf16" in entry.architecture
        # its numbers are its own: measured on the bf16 graph, not copied from fp32
        assert entry.metrics["source"] == "models/eval/bf16/metrics.json"
        measured = metrics["models"][role]
        assert (measured["name"], measured["precision"], measured["sha256"]) == (name, "bf16", entry.sha256)
    c, fp = registry.get(CLASSIFIER), registry.get("fracture-classifier")
    # chosen again on bf16 outputs: the operating points move (the temperature is fitted
    # on a 1 % grid, so both precisions may land on the same grid value, as 2.2.0 does)
    assert any(c.operating_point(part).threshold != fp.operating_point(part).threshold
               for part in ("HAND", "LEG"))
    assert c.supported_body_parts == fp.supported_body_parts
    assert c.metrics["image_auroc"] == metrics["fracture"]["image"]["auroc"]
    assert registry.get(ROUTER).metrics["unsupported_analysed_rate"] == \
        metrics["router"]["unsupported_analysed_rate"]


@needs_bf16
def test_the_bf16_graphs_run_in_bf16_and_are_the_same_network(bf16: Analyser, fp32: Analyser) -> None:
    import openvino as ov

    for graph in (bf16._router_graph, bf16._classifier_graph.graph):
        assert graph._fixed[0].get_compiled_model().get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    pixels = [_pixels(r) for r in _subset()]
    rs, cs = bf16.router_entry.input_size, bf16.classifier_entry.input_size
    router_x = np.stack([fit_square(p, rs)[0] for p in pixels])
    classifier_x = np.stack([fit_square(p, cs)[0] for p in pixels])
    got, want = bf16.predict(router_x, classifier_x), fp32.predict(router_x, classifier_x)
    np.testing.assert_allclose(got.router_probabilities, want.router_probabilities, atol=ROUTER_PROB_ATOL)
    np.testing.assert_allclose(got.classifier_logits, want.classifier_logits, atol=LOGIT_ATOL)
    assert np.corrcoef(got.classifier_logits.ravel(), want.classifier_logits.ravel())[0, 1] > CORRELATION
    assert (got.router_probabilities.argmax(1) == want.router_probabilities.argmax(1)).mean() > 0.9
    # not bit-identical: this really is another arithmetic
    assert np.abs(got.classifier_logits - want.classifier_logits).max() > 1e-3


@needs_bf16
def test_the_fixed_batch_and_the_dynamic_batch_compute_the_same(bf16: Analyser) -> None:
    """A graph compiled for pairs (an image and its mirror, a model with test-time flip)
    runs a pair on its fixed-shape model and other batches on the dynamic one, and a
    graph compiled for one image runs a batch image by image: an image's logits must not
    depend on which way it went (measured: within 1e-3), and every compiled model runs
    in bf16."""
    import openvino as ov

    from models.runtime import OpenVinoGraph

    path = bf16.classifier_entry.graph
    x = np.stack([fit_square(_pixels(r), bf16._classifier_graph.graph.input_size)[0]
                  for r in _subset()[:3]])[..., None]
    pairs = OpenVinoGraph(path, threads=2, precision="bf16", images_per_call=2)
    pair, _ = pairs.run(x[:2])
    assert pairs._dynamic is None
    three, _ = pairs.run(x)
    assert pairs._dynamic is not None
    assert pairs._dynamic.get_compiled_model().get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    served = bf16._classifier_graph.graph
    single, _ = served.run(x[:1])
    rows, _ = served.run(x)
    assert served._dynamic is None  # the served classifier (no flip) never compiles the dynamic model
    assert served._fixed[0].get_compiled_model().get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    np.testing.assert_allclose(pair, three[:2], atol=1e-3)
    np.testing.assert_allclose(pair[:1], single, atol=1e-3)
    np.testing.assert_allclose(rows, three, atol=1e-3)


@needs_bf16
def test_one_thread_runs_a_batch_one_image_at_a_time_with_the_same_outputs(bf16: Analyser) -> None:
    """With one thread (the worker's model thread) the fixed-shape model takes one image
    and a batch runs image by image: an image's logits and features equal those of the
    two-thread graph run on the batch at once."""
    from models.runtime import OpenVinoGraph

    graph = bf16._classifier_graph.graph
    x = np.stack([fit_square(_pixels(r), graph.input_size)[0] for r in _subset()[:2]])[..., None]
    one = OpenVinoGraph(bf16.classifier_entry.graph, threads=1)
    logits1, feats1 = one.run(x)
    logits2, feats2 = graph.run(x)
    assert one._static_batch == 1 and one._dynamic is None
    np.testing.assert_allclose(logits1, logits2, atol=1e-3)
    np.testing.assert_allclose(feats1, feats2, atol=1e-2)


@needs_bf16
def test_the_findings_name_the_bf16_model_version(bf16: Analyser) -> None:
    from pipeline.result import ImageMetadata, NormalisedImage

    rows = [r for r in _subset() if r["body_part"] == "FOREARM"][:2]
    images = [NormalisedImage(ImageMetadata("1.2.9", "1.2.9.1", f"1.2.9.1.{i}", "1.2.840.10008.5.1.4.1.1.1",
                                            modality="CR"), _pixels(r), _pixels(r).shape)
              for i, r in enumerate(rows)]
    results = bf16.analyse(images)
    assert any(isinstance(r, ImageFinding) for r in results)
    assert bf16.classifier_info.version == "2.3.1-bf16" and bf16.router_info.version == "2.2.0-bf16"
    assert bf16.classifier_info.device_uid == load_registry(REGISTRY).get(CLASSIFIER).device_uid


def _config(tmp_path: Path, router: str, classifier: str) -> Path:
    path = write_config(tmp_path, 11112)
    path.write_text(path.read_text().replace('router = "bodypart-router"', f'router = "{router}"')
                    .replace('classifier = "fracture-classifier"', f'classifier = "{classifier}"'))
    return path


@needs_bf16
def test_preflight_accepts_the_bf16_pair_and_refuses_a_mixed_pair(tmp_path: Path) -> None:
    from node.cli import preflight

    preflight(load_config(_config(tmp_path, ROUTER, CLASSIFIER)))
    with pytest.raises(ConfigError, match=r"^models\.router = 'bodypart-router' is served in fp32 but "
                                          r"models\.classifier = 'fracture-classifier-bf16' in bf16"):
        preflight(load_config(_config(tmp_path, "bodypart-router", CLASSIFIER)))


def test_a_cpu_without_bf16_refuses_the_bf16_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What OpenVINO reports on a CPU without AVX-512 BF16 or AMX (it would then quietly
    run fp32, not the arithmetic the entries were evaluated in)."""
    import models.runtime as runtime
    from node.cli import preflight

    monkeypatch.setattr(runtime, "_cpu_capabilities", lambda: ("FP32", "INT8", "BIN", "EXPORT_IMPORT"))
    with pytest.raises(ConfigError, match="no bfloat16 instructions; name the fp32 models"):
        preflight(load_config(_config(tmp_path, ROUTER, CLASSIFIER)))
    with pytest.raises(runtime.GraphError, match="no bfloat16 instructions"):
        Analyser.load(REGISTRY, ROUTER, CLASSIFIER)
    preflight(load_config(_config(tmp_path, "bodypart-router", "fracture-classifier")))


@pytest.mark.parametrize("capabilities", [("FP32", "BF16", "INT8"), ("FP32", "INT8")])
def test_check_config_points_at_the_bf16_pair_only_where_the_cpu_runs_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        capabilities: tuple[str, ...]) -> None:
    """With the fp32 pair active, ``check-config`` (and serve's log) names the bf16 pair
    of the same weights and where its own evaluation is, on a CPU that runs bf16 only;
    with the bf16 pair active it says nothing more."""
    import models.runtime as runtime
    from node.cli import bf16_note, main

    monkeypatch.setattr(runtime, "_cpu_capabilities", lambda: capabilities)
    fp32_config = _config(tmp_path, "bodypart-router", "fracture-classifier")
    assert main(["--config", str(fp32_config), "check-config"]) == 0
    err = capsys.readouterr().err
    registry = load_registry(REGISTRY)
    if "BF16" in capabilities:
        r, c = registry.get(ROUTER), registry.get(CLASSIFIER)
        assert (f"note: this CPU runs bfloat16: {ROUTER} {r.version} and {CLASSIFIER} {c.version} "
                f"are the active models' weights served in bf16") in err
        assert "(models/eval/bf16/)" in err and f"models.classifier = '{CLASSIFIER}'" in err
        (tmp_path / "b").mkdir()
        assert bf16_note(load_config(_config(tmp_path / "b", ROUTER, CLASSIFIER)), registry) is None
    else:
        assert "bfloat16" not in err
        assert bf16_note(load_config(fp32_config), registry) is None


def test_register_makes_a_variant_without_the_other_precision_s_metrics(tmp_path: Path) -> None:
    from models.training.register import main as register_main

    registry = tmp_path / "registry.toml"
    registry.write_text(REGISTRY.read_text().replace('"weights/', f'"{ROOT}/models/weights/'))
    assert register_main(["--task", "router", "--name", "router-variant", "--version", "2.1.0-bf16-test",
                          "--variant-of", "bodypart-router", "--precision", "bf16",
                          "--registry", str(registry)]) == 0
    entry = load_registry(registry).get("router-variant")
    shipped = load_registry(REGISTRY).get("bodypart-router")
    assert entry.precision == "bf16" and entry.metrics == {} and entry.sha256 == shipped.sha256
    assert entry.device_uid not in (shipped.device_uid, load_registry(REGISTRY).get(ROUTER).device_uid)
    # the fp32 evaluation is not this model's
    with pytest.raises(SystemExit, match="not produced for .* served in bf16"):
        register_main(["--task", "router", "--name", "router-variant", "--version", "2.1.0-bf16-test",
                       "--skip-copy", "--registry", str(registry),
                       "--attach-metrics", str(ROOT / "models" / "eval" / "metrics.json")])
    with pytest.raises(SystemExit, match="already served in fp32"):
        register_main(["--task", "router", "--name", "again", "--version", "x", "--variant-of",
                       "bodypart-router", "--precision", "fp32", "--registry", str(registry)])


def test_a_new_operating_point_of_the_same_weights_is_a_new_version(tmp_path: Path) -> None:
    """``register --skip-copy --confidence-floor`` (or ``--recalibrate``) changes what the
    node answers, so it takes a new version with a Device UID of its own; in place it
    is refused with the fix named."""
    from models.training.register import main as register_main

    registry = tmp_path / "registry.toml"
    registry.write_text(REGISTRY.read_text().replace('"weights/', f'"{ROOT}/models/weights/'))
    shipped = load_registry(registry).get("bodypart-router")
    with pytest.raises(SystemExit, match="give bodypart-router a new --version"):
        register_main(["--task", "router", "--name", "bodypart-router", "--version", shipped.version,
                       "--skip-copy", "--confidence-floor", "0.8", "--registry", str(registry)])
    assert register_main(["--task", "router", "--name", "bodypart-router", "--version", "9.9.9",
                          "--skip-copy", "--confidence-floor", "0.8", "--registry", str(registry)]) == 0
    entry = load_registry(registry).get("bodypart-router")
    assert entry.version == "9.9.9" and entry.confidence_floor == 0.8 and entry.sha256 == shipped.sha256
    assert entry.device_uid != shipped.device_uid
    assert f"The weights and graph of bodypart-router {shipped.version}." in entry.notes
    with pytest.raises(SystemExit, match="needs a new operating point"):
        register_main(["--task", "router", "--name", "bodypart-router", "--version", "9.9.10",
                       "--skip-copy", "--registry", str(registry)])
    with pytest.raises(SystemExit, match=r"must be in \[0, 1\)"):
        register_main(["--task", "router", "--name", "bodypart-router", "--version", "9.9.10",
                       "--skip-copy", "--confidence-floor", "1.5", "--registry", str(registry)])
    with pytest.raises(SystemExit, match="not a router"):
        register_main(["--task", "classifier", "--name", "fracture-classifier", "--version", "9.9.9",
                       "--skip-copy", "--confidence-floor", "0.8", "--registry", str(registry)])
    # serving with or without the mirrored image is a new version too, its metrics its own
    flip = not shipped.test_time_flip
    assert register_main(["--task", "router", "--name", "bodypart-router", "--version", "9.9.11",
                          "--skip-copy", "--test-time-flip" if flip else "--no-test-time-flip",
                          "--registry", str(registry)]) == 0
    entry = load_registry(registry).get("bodypart-router")
    assert entry.test_time_flip is flip and entry.metrics == {} and entry.sha256 == shipped.sha256
    assert f"served {'with' if flip else 'without'} the mirrored image" in entry.notes
    with pytest.raises(SystemExit, match="measured bodypart-router .*, not 9.9.11"):
        register_main(["--task", "router", "--name", "bodypart-router", "--version", "9.9.11",
                       "--skip-copy", "--registry", str(registry),
                       "--attach-metrics", str(ROOT / "models" / "eval" / "metrics.json")])
    classifier = load_registry(registry).get("fracture-classifier")
    with pytest.raises(SystemExit, match="add --recalibrate"):
        register_main(["--task", "classifier", "--name", "fracture-classifier", "--version", "9.9.9",
                       "--skip-copy", "--no-test-time-flip" if classifier.test_time_flip else "--test-time-flip",
                       "--registry", str(registry)])


def test_an_unknown_precision_is_a_registry_error(tmp_path: Path) -> None:
    registry = tmp_path / "registry.toml"
    registry.write_text(REGISTRY.read_text().replace('"weights/', f'"{ROOT}/models/weights/')
                        .replace('precision = "bf16"', 'precision = "int4"', 1))
    with pytest.raises(RegistryError, match="precision must be one of fp32, bf16, not 'int4'"):
        load_registry(registry)


def _process_demo_forearm(config_path: Path) -> dict[str, object]:
    import pydicom

    from node.jobs import InstanceRecord, StudyJob
    from node.processing import processor_factory

    config = load_config(config_path, environ={})
    process = processor_factory(config)()
    records = []
    for f in sorted((ROOT / "demo" / "studies" / "forearm").glob("forearm_*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        records.append(InstanceRecord(ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                      ds.SOPClassUID, ds.file_meta.TransferSyntaxUID, str(f),
                                      f.stat().st_size, "TEST", "127.0.0.1"))
    done = process(StudyJob(records[0].study_instance_uid, 1, tuple(records), None))
    return {"outputs": {kind + ":" + ds.SOPInstanceUID: ds for kind, ds in done.outputs},
            "outcomes": done.outcomes}


@needs_bf16
def test_bf16_results_are_new_objects_that_name_the_bf16_models(tmp_path: Path) -> None:
    """The demo forearm through the processing path with each pair: every bf16 result
    object has a UID of its own (the same weights, another arithmetic: it must not
    replace the fp32 result in the archive), names 2.3.1-bf16 and its Device UID, and
    passes dciodvfy."""
    from test_e2e import dciodvfy_errors

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fp32 = _process_demo_forearm(_config(tmp_path / "a", "bodypart-router", "fracture-classifier"))
    bf16 = _process_demo_forearm(_config(tmp_path / "b", ROUTER, CLASSIFIER))
    assert all(state == "analysed" for state, _ in bf16["outcomes"].values()), bf16["outcomes"]
    uids = lambda r: {k.split(":")[1] for k in r["outputs"]}  # noqa: E731
    assert len(bf16["outputs"]) == len(fp32["outputs"]) >= 4
    assert not uids(fp32) & uids(bf16)
    device_uid = load_registry(REGISTRY).get(CLASSIFIER).device_uid
    for key, ds in bf16["outputs"].items():
        equipment = [str(item.get("DeviceUID", "")) for item in ds.get("ContributingEquipmentSequence", [])]
        versions = [str(item.get("SoftwareVersions", "")) for item in ds.get("ContributingEquipmentSequence", [])]
        assert device_uid in equipment and "2.3.1-bf16" in versions, key
        path = tmp_path / f"{key.replace(':', '_')}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], key
