"""The inference runtime: run an exported serving graph without TensorFlow.

:mod:`models.training.export` writes each registered model as an ONNX graph with one
input ``input`` ``(n, s, s, 1)`` float32 in [0, 1] and two outputs, ``logits``
``(n, k)`` and ``features`` ``(n, h, w, c)`` (the last convolutional activation, the
map the closed-form Grad-CAM of :mod:`pipeline.gradcam` uses).  The registry records
the file and its SHA-256 beside the Keras weights; :func:`load_graph` verifies that
hash before the file is parsed and returns a :class:`ServingGraph`, the small protocol
:mod:`pipeline.classify` calls.  Nothing here imports TensorFlow.

The node serves every graph with OpenVINO's CPU plugin (:data:`SERVING_RUNTIME`): fp32
entries with ``INFERENCE_PRECISION_HINT`` f32, set and read back after compiling, since
OpenVINO would otherwise run bf16 on a CPU that has it.  Chosen by measurement: until
session 23 ONNX Runtime served fp32 (``bench/runtimes.py`` had found the runtimes equal
within noise at 320 px); at 384 px, side by side on real radiographs, the whole decision
took 37.6 ms with OpenVINO and 44.2 ms with ONNX Runtime at two threads, 62.4 and 68.1
ms at one, probabilities within 2e-6, no decision changed (``docs/benchmarks.md``).
:class:`OnnxGraph` stays for export's check against Keras (an independent runtime) and
the benchmarks.

A registry entry with ``precision = "bf16"`` is served by OpenVINO in bfloat16
(:class:`OpenVinoGraph`, the same hash-checked ONNX file): twice as fast on a CPU with
AVX-512 BF16, but its outputs differ from fp32 by more than a rounding error, so such an
entry is its own model version with its own temperature, thresholds and evaluation
(``models/eval/bf16``).  On a CPU without bfloat16 instructions OpenVINO would quietly
run fp32 instead, which is not the arithmetic the entry was evaluated in: the graph is
refused.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from models.registry import ModelEntry, WeightsIntegrityError, verify_graph, verify_weights

logger = logging.getLogger(__name__)

OUTPUTS = ("logits", "features")
"""Output names of every exported graph, in the order :meth:`ServingGraph.run` returns them."""
HEAD_KERNEL_KEY = "fracture_node.head_kernel"
HEAD_BIAS_KEY = "fracture_node.head_bias"
"""ONNX metadata keys holding the dense head (``logits = mean(features) @ kernel + bias``)
as ``"c,k;<base64 float32 little-endian>"``: the closed-form Grad-CAM needs the kernel,
and the graph file (hash-checked) carries it, so nothing else is loaded."""


def encode_array(a: np.ndarray) -> str:
    """``"d0,d1,...;base64"`` of a float32 array (the format of :data:`HEAD_KERNEL_KEY`)."""
    a = np.ascontiguousarray(a, dtype="<f4")
    return ",".join(str(d) for d in a.shape) + ";" + base64.b64encode(a.tobytes()).decode("ascii")


def decode_array(text: str) -> np.ndarray:
    """Inverse of :func:`encode_array`."""
    shape_text, _, data = text.partition(";")
    shape = tuple(int(d) for d in shape_text.split(",") if d)
    return np.frombuffer(base64.b64decode(data), dtype="<f4").reshape(shape).astype(np.float32)


class GraphError(Exception):
    """An exported graph cannot be loaded or does not have the node's contract."""


HEAD_FORMAT = "fracture-node dense head 1"
"""``format`` of a head file (:func:`load_head`)."""


def write_head(path: Path, kernel: np.ndarray, bias: float, about: str) -> None:
    """Write a dense head (``logit = mean(features) @ kernel + bias``) as JSON, its
    kernel in :func:`encode_array`'s format; ``about`` says what it was fitted on."""
    kernel = np.asarray(kernel, dtype=np.float32).reshape(-1, 1)
    Path(path).write_text(json.dumps({
        "format": HEAD_FORMAT, "about": about, "kernel": encode_array(kernel),
        "bias": encode_array(np.asarray([bias], dtype=np.float32)),
    }, indent=1) + "\n", encoding="utf-8")


def load_head(entry: ModelEntry, channels: int) -> tuple[np.ndarray, float]:
    """The ``(kernel (channels,), bias)`` of a head entry, after its file's SHA-256 is
    checked (:func:`models.registry.verify_weights`).

    Raises
    ------
    models.registry.WeightsIntegrityError
        The file is missing or its hash differs.
    GraphError
        The file is not a head of ``channels`` features."""
    verify_weights(entry)
    try:
        raw = json.loads(Path(entry.weights).read_text(encoding="utf-8"))
        if raw.get("format") != HEAD_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {HEAD_FORMAT!r}")
        kernel = decode_array(raw["kernel"]).reshape(-1)
        bias = float(decode_array(raw["bias"]).reshape(-1)[0])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GraphError(f"head {entry.name} {entry.version} ({entry.weights}) cannot be read: {exc}") from exc
    if kernel.shape != (channels,):
        raise GraphError(f"head {entry.name} {entry.version} has {kernel.size} weights, its base "
                         f"classifier's features have {channels} channels")
    if not (np.isfinite(kernel).all() and np.isfinite(bias)):
        raise WeightsIntegrityError(f"head {entry.name} {entry.version} holds non-finite weights")
    logger.info("loaded head %s %s on %s (%s, sha256 %s...)", entry.name, entry.version, entry.base,
                Path(entry.weights).name, entry.sha256[:12])
    return kernel, bias


@runtime_checkable
class ServingGraph(Protocol):
    """One exported model as :mod:`pipeline.classify` uses it."""

    @property
    def input_size(self) -> int:
        """Side of the square input."""
        ...

    @property
    def feature_grid(self) -> int:
        """Side of the ``features`` map."""
        ...

    @property
    def head_kernel(self) -> np.ndarray:
        """``(c, k)`` kernel of the dense head after global average pooling."""
        ...

    @property
    def head_bias(self) -> np.ndarray:
        """``(k,)`` bias of the dense head."""
        ...

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, features)`` float32 for ``x`` ``(n, s, s, 1)`` float32 in [0, 1]."""
        ...


def default_threads() -> int:
    """Threads per session: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class OnnxGraph:
    """An ONNX graph in an ONNX Runtime CPU session (fp32).

    The session runs with ``intra_op_num_threads`` threads and spinning off
    (``session.intra_op.allow_spinning = 0``): with two sessions in one process
    (router and classifier) spinning threads of the idle one steal the cores of the
    busy one (measured 63 ms instead of 44 ms per image, ``shared/NOTES.md``).

    Parameters
    ----------
    path
        The ``.onnx`` file (callers verify its hash first: :func:`load_graph`).
    threads
        Intra-op threads; default :func:`default_threads`.
    cpu_memory_arena
        ONNX Runtime's CPU memory arena: buffers of a run are kept for the next, so the
        process keeps the peak of its largest batch (``bench/batching.py``).
    """

    def __init__(self, path: Path, threads: int | None = None,
                 cpu_memory_arena: bool = True) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.enable_cpu_mem_arena = cpu_memory_arena
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.path = Path(path)
        self._session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        inputs = self._session.get_inputs()
        names = [o.name for o in self._session.get_outputs()]
        if len(inputs) != 1 or names != list(OUTPUTS):
            raise GraphError(f"{self.path}: expected one input and outputs {OUTPUTS}, found "
                                f"{[i.name for i in inputs]} -> {names}")
        self._input = inputs[0].name
        self.input_size = int(inputs[0].shape[1])
        self.feature_grid = int(self._session.get_outputs()[1].shape[1])
        meta = self._session.get_modelmeta().custom_metadata_map
        if HEAD_KERNEL_KEY not in meta or HEAD_BIAS_KEY not in meta:
            raise GraphError(f"{self.path}: no dense head in the graph's metadata (re-export it)")
        self.head_kernel = decode_array(meta[HEAD_KERNEL_KEY])
        self.head_bias = decode_array(meta[HEAD_BIAS_KEY])

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, features)`` for ``x`` ``(n, s, s, 1)`` float32 in [0, 1]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (self.input_size, self.input_size, 1):
            raise ValueError(f"input must be (n, {self.input_size}, {self.input_size}, 1), "
                             f"got {x.shape}")
        logits, features = self._session.run(list(OUTPUTS), {self._input: x})
        return logits, features


def _cpu_capabilities() -> tuple[str, ...]:
    import openvino as ov

    return tuple(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def bf16_supported() -> bool:
    """Whether OpenVINO's CPU plugin can run bfloat16 here (AVX-512 BF16 or AMX)."""
    return "BF16" in _cpu_capabilities()


def no_bf16_reason() -> str:
    """Why the bf16 models are refused on this CPU, in words (for a CPU without
    :func:`bf16_supported`)."""
    return ("this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX; OpenVINO capabilities: "
            f"{', '.join(_cpu_capabilities())})")


_OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16"}
"""Registry precision -> OpenVINO ``INFERENCE_PRECISION_HINT``."""


class OpenVinoGraph:
    """An ONNX graph compiled by OpenVINO's CPU plugin in f32 or bfloat16.

    One model compiled for the batch of one image (``images_per_call``: 2 for an image and
    its mirror when the model has a test-time flip, else 1; what the node runs with
    ``[worker] batch_images = 1``: ~15 % faster than a dynamic batch), and one with
    a dynamic batch compiled on the first call of another size (``evaluate``,
    ``register``, larger ``batch_images``), so a node that never needs it does not hold
    its memory.  With one thread (the worker's model thread) the static model takes one
    image and a batch is run image by image: a larger run has no cores to spread over,
    and the compiled model keeps one image's buffers (the 384 px classifier's pair in
    bf16: 16.9–17.1 instead of 18.1–18.2 ms, 69 instead of 87 MB; in f32: 40.1–42.3
    against 42.8 ms, 76 instead of 102 MB).  ``INFERENCE_PRECISION_HINT`` is set explicitly and read back after
    compiling.

    Parameters
    ----------
    path
        The ``.onnx`` file (callers verify its hash first: :func:`load_graph`).
    threads
        ``INFERENCE_NUM_THREADS``; default :func:`default_threads`.
    precision
        The registry's ``fp32`` (hint f32) or ``bf16`` (refused on a CPU without it).
    images_per_call
        The batch the fixed model is compiled for with more than one thread: 2 (an image
        and its mirror) or 1 (a model without test-time flip).
    streams
        OpenVINO's ``NUM_STREAMS``: the fixed model (batch 1) runs that many images at
        once, each on its own ``threads`` threads, with one infer request per stream.
        The streams share the model's weights; each keeps its own buffers (router +
        classifier in f32 at two streams: 13 MB more for the node at rest than at one,
        ``bench/reliability.py``).  What lets the worker's model thread use the second core
        while the study thread has nothing to build (``[worker] model_streams``).
    """

    def __init__(self, path: Path, threads: int | None = None, precision: str = "bf16",
                 images_per_call: int = 2, streams: int = 1) -> None:
        import openvino as ov

        self.path = Path(path)
        core = ov.Core()
        if precision not in _OPENVINO_PRECISION:
            raise GraphError(f"{self.path}: OpenVINO serves fp32 and bf16 graphs here, not {precision!r}")
        self.precision = precision
        if precision == "bf16" and not bf16_supported():
            raise GraphError(f"{self.path}: {no_bf16_reason()}; serve the fp32 models instead "
                             "([models] router and classifier)")
        model = core.read_model(str(self.path))
        names = [o.get_any_name() for o in model.outputs]
        if len(model.inputs) != 1 or names != list(OUTPUTS):
            raise GraphError(f"{self.path}: expected one input and outputs {OUTPUTS}, found {names}")
        shape = model.inputs[0].get_partial_shape()
        self.input_size = int(shape[1].get_length())
        self.feature_grid = int(model.outputs[1].get_partial_shape()[1].get_length())
        framework = model.get_rt_info(["framework"]).astype(dict) if model.has_rt_info(["framework"]) else {}
        if HEAD_KERNEL_KEY not in framework or HEAD_BIAS_KEY not in framework:
            raise GraphError(f"{self.path}: no dense head in the graph's metadata (re-export it)")
        self.head_kernel = decode_array(framework[HEAD_KERNEL_KEY].astype(str))
        self.head_bias = decode_array(framework[HEAD_BIAS_KEY].astype(str))
        self._core, self._model = core, model
        n_threads = threads or default_threads()
        if not isinstance(streams, int) or streams < 1:
            raise GraphError(f"{self.path}: streams must be a positive integer, not {streams!r}")
        self._config = {"INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[precision],
                        "INFERENCE_NUM_THREADS": str(n_threads * streams),
                        "NUM_STREAMS": str(streams), "PERFORMANCE_HINT": "LATENCY"}
        if images_per_call not in (1, 2):
            raise GraphError(f"{self.path}: images_per_call must be 1 or 2, not {images_per_call}")
        self._static_batch = 1 if n_threads == 1 or streams > 1 else images_per_call
        fixed = model.clone()
        fixed.reshape([self._static_batch, self.input_size, self.input_size, 1])
        self._fixed = self._compile(fixed, streams)
        self._dynamic: Any = None
        self._lock = threading.Lock()

    def _compile(self, model: Any, requests: int = 1) -> list[Any]:
        """``requests`` infer requests of ``model`` compiled with the graph's settings."""
        import openvino as ov

        compiled = self._core.compile_model(model, "CPU", self._config)
        got = compiled.get_property("INFERENCE_PRECISION_HINT")
        if got != getattr(ov.Type, _OPENVINO_PRECISION[self.precision]):
            raise GraphError(f"{self.path}: OpenVINO compiled it in {got}, not {self.precision}")
        return [compiled.create_infer_request() for _ in range(requests)]

    def _request(self, n: int) -> Any:
        """The infer request for a batch of ``n`` (under ``self._lock``)."""
        if n == self._static_batch:
            return self._fixed[0]
        if self._dynamic is None:
            self._dynamic = self._compile(self._model)[0]
        return self._dynamic

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, features)`` for ``x`` ``(n, s, s, 1)`` float32 in [0, 1]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (self.input_size, self.input_size, 1):
            raise ValueError(f"input must be (n, {self.input_size}, {self.input_size}, 1), "
                             f"got {x.shape}")
        with self._lock:  # an infer request serves one call at a time (ONNX Runtime's run is re-entrant)
            if self._static_batch == 1 and len(x) > 1:
                return self._infer_rows(x)
            return self._infer(self._request(len(x)), x)

    def _infer_rows(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x`` image by image on the fixed model, as many at once as it has streams
        (under ``self._lock``)."""
        runs: list[tuple[np.ndarray, np.ndarray]] = []
        for start in range(0, len(x), len(self._fixed)):
            wave = list(zip(self._fixed, range(start, min(start + len(self._fixed), len(x)))))
            if len(wave) == 1:
                runs.append(self._infer(self._fixed[0], x[start : start + 1]))
                continue
            started = []
            try:
                for request, i in wave:
                    request.start_async([x[i : i + 1]])
                    started.append(request)
            finally:
                for request in started:  # every started request is waited for, even on error
                    request.wait()
            runs.extend(self._outputs(request) for request, _ in wave)
        return (np.concatenate([r[0] for r in runs]), np.concatenate([r[1] for r in runs]))

    @classmethod
    def _infer(cls, request: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        request.infer([x])
        return cls._outputs(request)

    @staticmethod
    def _outputs(request: Any) -> tuple[np.ndarray, np.ndarray]:
        return (request.get_output_tensor(0).data.copy(), request.get_output_tensor(1).data.copy())


SERVING_RUNTIME = "openvino"
"""What the node, ``evaluate`` and ``register``'s calibration serve every graph with:
OpenVINO's CPU plugin, fp32 entries in f32 and bf16 entries in bf16 (the hint read back
after compiling).  ``onnxruntime`` is kept for export's check against Keras (an
independent runtime) and the side-by-side benchmarks."""

RUNTIMES = ("openvino", "onnxruntime")


def load_graph(entry: ModelEntry, threads: int | None = None,
               cpu_memory_arena: bool = True, runtime: str = SERVING_RUNTIME,
               streams: int = 1) -> ServingGraph:
    """Verify the exported graph's SHA-256 (:func:`models.registry.verify_graph`), then
    load it in ``runtime`` (:data:`SERVING_RUNTIME`; ``cpu_memory_arena`` is ONNX
    Runtime's, ``streams`` OpenVINO's: :class:`OpenVinoGraph`).

    Raises
    ------
    models.registry.WeightsIntegrityError
        The registry records no graph, the file is missing or its hash differs.
    GraphError
        The graph does not have the node's contract (input size, outputs).
    """
    if runtime not in RUNTIMES:
        raise GraphError(f"{entry.name}: runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if streams != 1 and runtime != "openvino":
        raise GraphError(f"{entry.name}: inference streams are OpenVINO's; {runtime} runs one")
    verify_graph(entry)
    if entry.graph_format != "onnx":
        raise GraphError(f"{entry.name}: graph format {entry.graph_format!r} is not served")
    graph: ServingGraph
    if runtime == "openvino":
        graph = OpenVinoGraph(entry.graph, threads, entry.precision,  # type: ignore[arg-type]
                              images_per_call=2 if entry.test_time_flip else 1, streams=streams)
    elif entry.precision == "fp32":
        graph = OnnxGraph(entry.graph, threads, cpu_memory_arena)  # type: ignore[arg-type]
    else:
        raise GraphError(f"{entry.name}: ONNX Runtime serves fp32 graphs here, not {entry.precision}")
    if graph.input_size != entry.input_size:
        raise GraphError(f"{entry.name}: graph input {graph.input_size} px, registry {entry.input_size} px")
    logger.info("loaded %s %s graph (%s, %s in %s%s, sha256 %s...)", entry.name, entry.version,
                entry.graph.name if entry.graph else "?", entry.precision, runtime,
                f", {streams} streams" if streams > 1 else "", entry.graph_sha256[:12])
    return graph
