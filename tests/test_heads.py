"""The abnormality head: a second dense head on the fracture classifier's pooled
features that decides the humerus, named "abnormality" wherever its number is shown.

* the registry: the shipped head loads beside exactly the classifier it was fitted on
  and refuses any other; its file's hash is checked;
* the served number: on real MURA humerus radiographs the node's probability is the
  head's logistic regression of the classifier's own pooled map, computed here
  independently from the head file, and its Grad-CAM is the head's;
* the outputs of a study with fracture and abnormality parts: every caption, SR group,
  study answer, PDF sentence and series description names the model that decided it;
  the SR and KOS validate (PixelMed, dciodvfy);
* fitting: :mod:`models.training.head` on features with a known answer.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from conftest import pixelmed_sr_errors
from dicom_out import wording
from dicom_out.common import DECISION_EVALUATION, OutputSettings, finding_code, series_description_problem
from dicom_out.ko import build_key_object_selection
from dicom_out.pdf import build_pdf_report
from dicom_out.sc import build_secondary_capture
from dicom_out.sr import build_structured_report
from models.registry import RegistryError, WeightsIntegrityError, load_registry
from models.runtime import decode_array, load_head
from models.training import data as mdata
from models.training import head as mhead
from node.config import ConfigError, OutputConfig
from pipeline.aggregate import aggregate_study, decide
from pipeline.classify import Analyser
from pipeline.gradcam import gradcam_closed_form
from pipeline.result import Decision, ImageFinding, ModelInfo
from test_truthful import BAND, ROUTER, _pdf_text, analysed, source

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "models" / "registry.toml"
MSK = ROOT.parent / "shared" / "data" / "msk"
SETTINGS = OutputSettings()
FRACTURE = ModelInfo("fracture-classifier", "9.9.9", "MobileNetV2 (test)", "2" * 64, "2.25.2",
                     finding="fracture")
ABNORMALITY = ModelInfo("abnormality-head", "9.9.9", "Dense head (test)", "3" * 64, "2.25.3",
                        finding="abnormality")


# ----------------------------------------------------------------------------- registry


def test_the_shipped_head_decides_the_humerus_beside_its_own_classifier() -> None:
    registry = load_registry(REGISTRY)
    classifier = registry.get("fracture-classifier", role="classifier")
    (head,) = registry.heads_of(classifier)
    assert head.name == "abnormality-head" and head.finding == "abnormality"
    assert head.base_sha256 == classifier.sha256
    assert head.supported_body_parts == ("HUMERUS",)
    assert "HUMERUS" not in classifier.supported_body_parts
    # the bf16 classifier is another model: it has a head of its own, fitted on its features
    (bf16,) = registry.heads_of(registry.get("fracture-classifier-bf16"))
    assert bf16.name == "abnormality-head-bf16" and bf16.sha256 != head.sha256
    assert bf16.supported_body_parts == ("HUMERUS",)


def _copy_registry(tmp_path: Path) -> Path:
    (tmp_path / "weights").mkdir()
    registry = load_registry(REGISTRY)
    for entry in registry.models.values():
        for path in (entry.weights, entry.graph):
            if path is not None and not (tmp_path / "weights" / path.name).exists():
                (tmp_path / "weights" / path.name).symlink_to(path)
    head = registry.get("abnormality-head")
    (tmp_path / "weights" / head.weights.name).unlink()
    shutil.copy(head.weights, tmp_path / "weights" / head.weights.name)
    target = tmp_path / "registry.toml"
    shutil.copy(REGISTRY, target)
    return target


def test_a_head_of_other_weights_or_with_a_taken_part_is_refused(tmp_path: Path) -> None:
    path = _copy_registry(tmp_path)
    text = path.read_text()
    classifier_sha = load_registry(REGISTRY).get("fracture-classifier").sha256
    stale = text.replace(f'base_sha256 = "{classifier_sha}"', f'base_sha256 = "{"0" * 64}"')
    path.write_text(stale)
    registry = load_registry(path)
    with pytest.raises(RegistryError, match="fit the head again"):
        registry.heads_of(registry.get("fracture-classifier"))
    # the same weights, served with the other test-time flip: other features, so other logits
    start = text.index("[models.abnormality-head]")
    served = load_registry(REGISTRY).get("abnormality-head").test_time_flip
    flip = f"test_time_flip = {str(served).lower()}"
    at = text.index(flip, start)
    path.write_text(text[:at] + f"test_time_flip = {str(not served).lower()}" + text[at + len(flip):])
    registry = load_registry(path)
    with pytest.raises(RegistryError, match="the mirrored image.*fit the head again"):
        registry.heads_of(registry.get("fracture-classifier"))
    taken = text.replace("[models.abnormality-head.operating_points.HUMERUS]",
                         "[models.abnormality-head.operating_points.FOREARM]")
    path.write_text(taken)
    registry = load_registry(path)
    with pytest.raises(RegistryError, match="FOREARM, which fracture-classifier already decides"):
        registry.heads_of(registry.get("fracture-classifier"))


def test_check_config_names_a_stale_head_in_one_line(tmp_path: Path) -> None:
    """An administrator who swaps the classifier's weights under a head: check-config and
    serve refuse with one line naming the key and the fix."""
    from conftest import free_port, write_config
    from test_admin import _cli, _one_line_error

    registry = _copy_registry(tmp_path)
    classifier_sha = load_registry(REGISTRY).get("fracture-classifier").sha256
    registry.write_text(registry.read_text().replace(f'base_sha256 = "{classifier_sha}"',
                                                     f'base_sha256 = "{"0" * 64}"'))
    path = write_config(tmp_path, free_port())
    path.write_text(path.read_text().replace(str(REGISTRY), str(registry)))
    for command in ("check-config", "serve"):
        line = _one_line_error(_cli(path, command))
        assert "models.classifier = 'fracture-classifier'" in line and "fit the head again" in line


def test_a_head_file_is_hash_checked_before_it_is_read(tmp_path: Path) -> None:
    path = _copy_registry(tmp_path)
    head = load_registry(path).get("abnormality-head")
    raw = json.loads(head.weights.read_text())
    kernel = decode_array(raw["kernel"])
    assert load_head(head, kernel.shape[0])[0].shape == (kernel.shape[0],)
    with head.weights.open("a") as fh:
        fh.write(" ")
    with pytest.raises(WeightsIntegrityError, match="SHA-256"):
        load_head(head, kernel.shape[0])


# ----------------------------------------------------------------------------- served number


@pytest.fixture(scope="module")
def analyser() -> Analyser:
    return Analyser.load(REGISTRY, "bodypart-router", "fracture-classifier")


def _mura(part: str, n: int) -> list[mdata.Row]:
    rows = [r for r in mdata.read_manifest(MSK) if r.dataset == "MURA-v1.1" and r.split == "val"
            and r.body_part == part]
    return rows[:n]


def test_the_head_probability_and_heat_map_are_its_own(analyser: Analyser) -> None:
    """Independently of :class:`pipeline.classify.ClassifierGraph`'s head columns: the
    head file's kernel on the served pooled map, the registry's temperature."""
    head = analyser.head_entries[0]
    raw = json.loads(head.weights.read_text())
    kernel = decode_array(raw["kernel"]).reshape(-1).astype(np.float64)
    bias = float(decode_array(raw["bias"])[0])
    rows = _mura("HUMERUS", 6)
    x = mdata.load_arrays([r.path for r in rows], head.input_size).astype(np.float32)
    feats = analyser.classifier_features(x)
    expected = 1 / (1 + np.exp(-(feats.mean(axis=(1, 2), dtype=np.float64) @ kernel + bias)
                               / head.temperature))
    logits, cams = analyser._decide_on_grid(x, np.ones(len(x), dtype=int))
    np.testing.assert_allclose(1 / (1 + np.exp(-logits / head.temperature)), expected, atol=1e-6)
    np.testing.assert_allclose(cams, gradcam_closed_form(feats, kernel[:, None], 0), atol=1e-5)
    fracture_cams = gradcam_closed_form(feats, analyser._classifier_graph.head_kernel, 0)
    assert np.abs(cams - fracture_cams).max() > 0.05  # another head, another map
    # the graph's own head is column 0: the fracture logit as before
    np.testing.assert_allclose(analyser.head_logits(x)[:, 0], analyser.predict_classifier(x)[0],
                               atol=1e-6)


def test_the_node_analyses_a_humerus_for_abnormality_and_a_forearm_for_fracture(
        analyser: Analyser) -> None:
    from pipeline.result import ImageMetadata, NormalisedImage

    images = []
    for part, rows in (("HUMERUS", _mura("HUMERUS", 2)), ("FOREARM", _mura("FOREARM", 2))):
        for k, row in enumerate(rows):
            pixels = mdata.load_pixels(row.path)
            meta = ImageMetadata(sop_instance_uid=f"1.2.3.{part}.{k}".replace("HUMERUS", "1")
                                 .replace("FOREARM", "2"), study_instance_uid="1.2.3",
                                 series_instance_uid="1.2.3.9", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                                 modality="CR", body_part_examined=part)
            images.append((part, NormalisedImage(meta, pixels, pixels.shape)))
    outcomes = analyser.analyse([im for _, im in images])
    seen = {}
    for (part, _), outcome in zip(images, outcomes):
        if isinstance(outcome, ImageFinding):
            seen.setdefault(outcome.body_part, set()).add(outcome.classifier.finding)
            point = (analyser.head_entries[0] if outcome.body_part == "HUMERUS"
                     else analyser.classifier_entry).operating_point(outcome.body_part)
            assert outcome.threshold == point.threshold
    assert seen.get("HUMERUS") == {"abnormality"}, outcomes
    assert all(v == {"fracture"} for k, v in seen.items() if k != "HUMERUS")


# ----------------------------------------------------------------------------- outputs


def _mixed(images: list[tuple[str, float]]) -> tuple:
    study_uid = generate_uid(entropy_srcs=[repr(images)])
    outcomes, sources = [], {}
    for i, (part, p) in enumerate(images):
        ds = source(study_uid, 1 + i % 2, 1 + i, f"{study_uid}-{i}")
        sources[ds.SOPInstanceUID] = ds
        model = ABNORMALITY if part == "HUMERUS" else FRACTURE
        outcomes.append(analysed(ds, part, p, decide(p, BAND), model))
    return aggregate_study(study_uid, outcomes, (ROUTER, FRACTURE)), sources


def _study_groups(sr: pydicom.Dataset) -> dict[str, dict[str, str]]:
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    parsed = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(buf.getvalue())))
    return {g.tracking_identifier: {q.name.value: q.value.value for q in g.get_qualitative_evaluations()}
            for g in parsed.content.get_image_measurement_groups()}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(images=st.lists(st.tuples(st.sampled_from(["FOREARM", "HUMERUS", "WRIST"]), st.floats(0.0, 1.0)),
                       min_size=1, max_size=5))
def test_each_statement_names_the_model_that_decided_it(images: list[tuple[str, float]],
                                                        tmp_path: Path) -> None:
    result, sources = _mixed(images)
    kinds = wording.study_findings(result)
    assert set(kinds) == {"abnormality" if part == "HUMERUS" else "fracture" for part, _ in images}
    for f in result.findings:
        own = f.classifier.finding
        assert wording.caption_lines(f)[0][0].startswith(f"{own.capitalize()}: ")
        sc = build_secondary_capture(f, sources[f.meta.sop_instance_uid], SETTINGS)
        assert sc.SeriesDescription.startswith(f"AI {own} heat map")
    groups = _study_groups(build_structured_report(result, sources, [], SETTINGS))
    for f in result.findings:
        (values,) = [v for ident, v in groups.items() if wording.image_short(f.meta) + ":" in ident]
        assert values[finding_code(f.classifier).value] == DECISION_EVALUATION[f.decision].value
    for part in result.by_body_part.values():
        values = groups[f"Study: {wording.body_part_name(part.body_part)}"]
        assert values[finding_code(part.classifier).value] == DECISION_EVALUATION[part.decision].value
    if len(kinds) == 1:
        assert groups["Study"] == {finding_code(result.findings[0].classifier).value:
                                   DECISION_EVALUATION[result.decision].value,
                                   "decision": result.decision.value}
    else:
        assert "Study" not in groups
        for model in (FRACTURE, ABNORMALITY):
            own = [p.decision for p in result.by_body_part.values() if p.classifier == model]
            worst = min(own, key=lambda d: [Decision.POSITIVE, Decision.DOUBTFUL, Decision.NEEDS_REVIEW,
                                            Decision.NEGATIVE].index(d))
            assert groups[f"Study: {model.finding}"][finding_code(model).value] == \
                DECISION_EVALUATION[worst].value
    title, _ = wording.headline(result)
    if result.decision in (Decision.POSITIVE, Decision.DOUBTFUL):
        driving = {p.classifier.finding for p in result.by_body_part.values()
                   if p.decision is result.decision}
        for name in ("fracture", "abnormality"):
            assert (name.upper() in title) == (name in driving), (title, driving)
    pdf = build_pdf_report(result, sources, SETTINGS)
    assert pdf.SeriesDescription.startswith(f"AI {'/'.join(kinds)} PDF report")
    text = _pdf_text(pdf, tmp_path)
    assert title in text
    for name in ("fracture", "abnormality"):
        if name not in kinds:  # (the model table still names the classifier whose features it is)
            for claim in (f"{name.upper()} SUSPECTED", f"NO {name.upper()}", f"{name.capitalize()} p",
                          f"mean {name} probability", f"Doubtful {name}"):
                assert claim not in text, claim
    assert "a abnormality" not in text


def test_a_humerus_abnormality_does_not_make_a_fracture_headline(tmp_path: Path) -> None:
    result, sources = _mixed([("FOREARM", 0.1), ("HUMERUS", 0.9)])
    assert result.decision is Decision.POSITIVE
    title, sub = wording.headline(result)
    assert title == "ABNORMALITY SUSPECTED"
    assert "(positive, abnormality p = 0.90)" in sub
    assert wording.recommendation(result).endswith("if the abnormality is not confirmed.")
    text = _pdf_text(build_pdf_report(result, sources, SETTINGS), tmp_path)
    assert "FRACTURE SUSPECTED" not in text and "ABNORMALITY SUSPECTED" in text
    assert "mean abnormality probability 0.90" in text and "mean fracture probability 0.10" in text
    negative, _ = _mixed([("FOREARM", 0.1), ("HUMERUS", 0.1)])
    assert wording.headline(negative)[0] == "NO FRACTURE OR ABNORMALITY DETECTED"
    groups = _study_groups(build_structured_report(result, sources, [], SETTINGS))
    assert groups["Study: fracture"]["decision"] == "negative"
    assert groups["Study: abnormality"]["decision"] == "positive"


def test_a_review_reason_no_part_carries_reaches_both_study_answers() -> None:
    """A positive humerus beside a negative forearm and an image whose header names another
    part: the study is positive, and neither study answer may read as if nothing needs a
    human (the conflict belongs to no part)."""
    from pipeline.result import Refusal, RefusalCode
    from pipeline.validate import read_metadata

    result, sources = _mixed([("FOREARM", 0.1), ("HUMERUS", 0.9)])
    extra = source(result.study_instance_uid, 3, 9, "conflict")
    sources[extra.SOPInstanceUID] = extra
    conflict = Refusal(read_metadata(extra), RefusalCode.BODY_PART_CONFLICT, "header KNEE", body_part="FOREARM")
    result = aggregate_study(result.study_instance_uid, [*result.findings, conflict], (ROUTER, FRACTURE))
    assert result.decision is Decision.POSITIVE
    groups = _study_groups(build_structured_report(result, sources, [], SETTINGS))
    assert groups["Study: fracture"]["decision"] == "needs-review"
    assert groups["Study: abnormality"]["decision"] == "positive"


def test_a_mixed_sr_and_kos_validate(tmp_path: Path) -> None:
    result, sources = _mixed([("FOREARM", 0.8), ("HUMERUS", 0.45), ("HUMERUS", 0.1)])
    sr = build_structured_report(result, sources, [], SETTINGS)
    assert sr.SeriesDescription.startswith("AI fracture/abnormality findings SR")
    ko = build_key_object_selection(result, sources, [], SETTINGS)
    assert ko is not None
    for name, ds in (("sr", sr), ("ko", ko)):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert pixelmed_sr_errors(path) == [], name
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        assert [x for x in (out.stdout + out.stderr).splitlines() if x.startswith("Error")] == []


def test_a_series_description_template_is_checked_with_its_longest_finding() -> None:
    assert series_description_problem("AI {finding} findings SR") == ""
    assert "at most" in series_description_problem("AI {finding} findings (SR)")
    assert "placeholder" in series_description_problem("AI {result} heat map")
    with pytest.raises(ConfigError, match=r"outputs.sr_series_description .*\{finding\}"):
        OutputConfig(sr_series_description="AI {finding} structured report findings")
    with pytest.raises(ValueError, match="sc_series_description"):
        replace(SETTINGS, sc_series_description="{findings}")


# ----------------------------------------------------------------------------- fitting


def test_fitting_recovers_a_known_head() -> None:
    """Features where one direction carries the label: the fitted head ranks by it, the
    out-of-fold threshold separates the studies, the kernel is in feature units."""
    rng = np.random.default_rng(3)
    n, c = 400, 12
    y = (rng.random(n) < 0.4).astype(float)
    x = rng.normal(size=(n, c)) * 2.0 + 5.0
    x[:, 3] += 5.0 * y  # the signal, in raw (unstandardised) units
    rows = [mdata.Row(path=Path(f"{i}.jpg"), dataset="MURA-v1.1", split="train", body_part="HUMERUS",
                      label="positive" if y[i] else "negative", label_meaning="abnormal-study",
                      patient_id=f"p{i // 2}", study_id=f"s{i // 2}", group_id="", boxes=())
            for i in range(n)]
    y = np.array([1.0 if r.label == "positive" else 0.0 for r in rows])
    fit = mhead.fit_head(x, y, rows, ["HUMERUS"])
    assert fit["lambda"] in mhead.LAMBDAS and fit["temperature"] in mhead.TEMPERATURES
    assert int(np.argmax(np.abs(fit["kernel"]))) == 3
    z = x @ fit["kernel"] + fit["bias"]
    from models.training import metrics as mm
    assert mm.auroc(y, z) > 0.9 and mm.auroc(y, z) >= mm.auroc(y, x[:, 3]) - 0.02  # the oracle
    assert fit["points"]["HUMERUS"]["kappa_oof"] > 0.6
    assert 0.05 <= fit["points"]["HUMERUS"]["threshold"] <= 0.95
