"""Runners: one per artifact format, all with the same tiny interface.

A runner takes ``uint8`` RGB images (N, H, W, 3) and applies the artifact's *recorded* input contract
itself, so every format is fed exactly what it claims to take:

* float inputs get ``float32`` in the contract's range (``[0, 255]`` for edgetl models);
* quantized inputs (``uint8``/``int8`` with ``input_quant`` [scale, zero_point]) get
  ``clip(round(x / scale) + zero_point)``;
* quantized outputs are dequantized with ``output_quant`` to float probabilities.

Each runner also reads the dtypes/quantization parameters from the model file and refuses
(:class:`~edgetl.errors.ModelFileError`) when they contradict the bundle's claim, or when the file is not a
loadable model at all. ONNX and TFLite runners import only onnxruntime / ai_edge_litert (lazily); the Keras
runner (host only) is the one place verify touches TensorFlow.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgetl.errors import ConfigError, ModelFileError
from edgetl.verify.bundle import ArtifactSpec, InputContract

_REEXPORT = "re-export the bundle with `edgetl export RUN`"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


class Runner:
    """Base runner. Subclasses implement :meth:`_invoke` (one prepared batch-1 input → raw output)."""

    format = "?"
    runtime = "?"

    def __init__(
        self,
        name: str,
        path: Path,
        contract: InputContract,
        n_classes: int,
        *,
        input_dtype: str = "float32",
        input_quant: tuple[float, int] | None = None,
        output_dtype: str = "float32",
        output_quant: tuple[float, int] | None = None,
        quantization: str | None = None,
    ):
        self.name = name
        self.quantization = quantization
        self.metadata: dict[str, Any] | None = None
        self.path = Path(path)
        self.contract = contract
        self.n_classes = n_classes
        self.input_dtype = input_dtype
        self.input_quant = input_quant
        self.output_dtype = output_dtype
        self.output_quant = output_quant

    # -- contract -------------------------------------------------------------------------------------
    def prepare(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) → what the model takes, per the recorded contract."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"runner expects uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
        low, high = self.contract.range
        if self.contract.color == "BGR":
            images = images[..., ::-1]
        x = images.astype(np.float32)
        if (low, high) != (0.0, 255.0):
            x = low + x * np.float32((high - low) / 255.0)
        if self.input_dtype in ("uint8", "int8"):
            assert self.input_quant is not None
            scale, zero_point = self.input_quant
            info = np.iinfo(self.input_dtype)
            q = np.round(x / np.float32(scale)) + zero_point
            return np.clip(q, info.min, info.max).astype(self.input_dtype)
        return x.astype(self.input_dtype)

    def finish(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw)
        if self.output_quant is not None and np.issubdtype(raw.dtype, np.integer):
            scale, zero_point = self.output_quant
            return ((raw.astype(np.float32) - zero_point) * np.float32(scale)).astype(np.float32)
        return raw.astype(np.float32)

    def apply_metadata(self, meta: dict[str, Any] | None, labels: tuple[str, ...] | None) -> None:
        """Check the artifact's embedded edgetl metadata against the bundle; adopt its own input contract.

        docs/formats.md: the bundle ``input`` applies to every artifact "unless an artifact's own metadata says
        otherwise", so an artifact whose metadata records another value range or channel order is fed that.
        """
        self.metadata = meta
        if not meta:
            return
        where = f"{self.path.name}: its embedded edgetl metadata"
        stored = meta.get("labels")
        if labels and isinstance(stored, list) and stored and list(stored) != list(labels):
            raise ModelFileError(f"{where} has labels {stored}, bundle.json has {list(labels)}", _REEXPORT)
        for key, claimed in (("quantization", self.quantization), ("format", self.format)):
            value = meta.get(key)
            if claimed and isinstance(value, str) and value and value != claimed:
                raise ModelFileError(f"{where} says {key} {value}, bundle.json says {claimed}", _REEXPORT)
        contract = meta.get("input")
        if not isinstance(contract, dict):
            return
        dtype = contract.get("dtype")
        if isinstance(dtype, str) and dtype != self.input_dtype:
            raise ModelFileError(f"{where} says input dtype {dtype}, bundle.json says {self.input_dtype}", _REEXPORT)
        quant = contract.get("quant")
        if isinstance(quant, (list, tuple)) and len(quant) == 2:
            _check_quant(
                self.path,
                "input quantization [scale, zero_point] (embedded metadata vs bundle.json)",
                self.input_quant,
                (float(quant[0]), int(quant[1])),
            )
        for key, expected in (("height", self.contract.height), ("width", self.contract.width)):
            if key in contract and contract[key] != expected:
                raise ModelFileError(
                    f"{where} says input {key} {contract[key]}, bundle.json says {expected}", _REEXPORT
                )
        if contract.get("layout", "NHWC") != "NHWC":
            raise ModelFileError(f"{where} says input layout {contract.get('layout')}; verify supports NHWC", _REEXPORT)
        changes: dict[str, Any] = {}
        value_range = contract.get("range")
        if (
            isinstance(value_range, (list, tuple))
            and len(value_range) == 2
            and all(isinstance(v, (int, float)) for v in value_range)
            and value_range[0] < value_range[1]
        ):
            changes["range"] = (float(value_range[0]), float(value_range[1]))
        if contract.get("color") in ("RGB", "BGR"):
            changes["color"] = contract["color"]
        if changes:
            self.contract = self.contract.model_copy(update=changes)

    # -- execution ------------------------------------------------------------------------------------
    def _invoke(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, C) outputs, one image at a time (batch 1, as on the device)."""
        x = self.prepare(images)
        out = np.empty((x.shape[0], self.n_classes), dtype=np.float32)
        for i in range(x.shape[0]):
            y = self.finish(self._invoke(x[i : i + 1]))
            if y.size != self.n_classes:
                raise ModelFileError(
                    f"{self.path.name} returned {y.shape} outputs for one image; expected {self.n_classes} classes",
                    _REEXPORT,
                )
            out[i] = y.reshape(-1)
        return out

    def latency(self, image: np.ndarray, warmup: int = 10, runs: int = 100) -> np.ndarray:
        """Milliseconds per batch-1 inference (run + read the output; the input is converted once, untimed),
        after ``warmup`` untimed runs."""
        image = np.asarray(image)
        if image.ndim == 3:
            image = image[None]
        x = self.prepare(image[:1])
        for _ in range(warmup):
            self._invoke(x)
        times = np.empty(runs, dtype=np.float64)
        clock = time.perf_counter
        for i in range(runs):
            start = clock()
            self._invoke(x)
            times[i] = (clock() - start) * 1000.0
        return times

    def close(self) -> None:
        pass


def _check_claim(path: Path, what: str, claimed: Any, actual: Any) -> None:
    if claimed != actual:
        raise ModelFileError(
            f"{path.name}: bundle.json says its {what} is {claimed}, but the model has {actual}", _REEXPORT
        )


def _check_quant(path: Path, what: str, claimed: tuple[float, int] | None, actual: tuple[float, int] | None) -> None:
    if (claimed is None) != (actual is None):
        _check_claim(path, what, claimed, actual)
    if claimed is not None and actual is not None:
        c_scale, c_zp = claimed
        a_scale, a_zp = actual
        if c_zp != a_zp or not np.isclose(c_scale, a_scale, rtol=1e-5, atol=0.0):
            _check_claim(path, what, [c_scale, c_zp], [a_scale, a_zp])


def _check_io_count(path: Path, n_inputs: int, n_outputs: int) -> None:
    if n_inputs != 1 or not n_outputs:
        raise ModelFileError(
            f"{path.name} has {n_inputs} inputs and {n_outputs} outputs; expected 1 image input", _REEXPORT
        )


def _check_classes(path: Path, classes: int | None, n_classes: int) -> None:
    """``classes``: the model's static output width (None when it is dynamic or unknown)."""
    if classes is not None and classes > 0 and classes != n_classes:
        raise ModelFileError(f"{path.name} outputs {classes} classes but the bundle has {n_classes} labels", _REEXPORT)


def _check_hw(path: Path, shape: list[Any], contract: InputContract) -> None:
    if len(shape) != 4:
        raise ModelFileError(f"{path.name}: model input has rank {len(shape)}; expected NHWC (rank 4)", _REEXPORT)
    dims = [d if isinstance(d, (int, np.integer)) and d > 0 else None for d in shape[1:]]
    expected = [contract.height, contract.width, 3]
    if any(d is not None and d != e for d, e in zip(dims, expected)):
        raise ModelFileError(
            f"{path.name}: model input is {shape[1:]} but the bundle contract is {expected} (H, W, C)", _REEXPORT
        )


def _onnx_metadata(props: dict[str, str]) -> dict[str, Any] | None:
    """The ``edgetl.*`` metadata_props of an exported ONNX model as a dict (None when it carries none)."""
    if not any(key.startswith("edgetl.") for key in props):
        return None
    meta: dict[str, Any] = {}
    for key in ("labels", "input"):
        if f"edgetl.{key}" in props:
            try:
                meta[key] = json.loads(props[f"edgetl.{key}"])
            except ValueError:
                raise ModelFileError(f"metadata edgetl.{key} is not valid JSON", _REEXPORT) from None
    for key in ("quantization", "format", "run_id", "backbone", "source"):
        if f"edgetl.{key}" in props:
            meta[key] = props[f"edgetl.{key}"]
    return meta


def _tflite_metadata(path: Path) -> dict[str, Any] | None:
    """The ``edgetl`` metadata entry of an exported TFLite model (None when it carries none)."""
    try:  # a TF-free flatbuffer reader shared with the exporter
        from edgetl.export.metadata import TFLITE_METADATA_NAME, tflite_metadata_entries
    except ImportError:  # pragma: no cover - trimmed installs: checks fall back to the tensors' own details
        return None
    try:
        entries = tflite_metadata_entries(path.read_bytes())
    except (ValueError, struct.error) as exc:
        raise ModelFileError(f"{path.name} has an unreadable TFLite metadata table: {exc}", _REEXPORT) from None
    if TFLITE_METADATA_NAME not in entries:
        return None
    try:
        meta = json.loads(entries[TFLITE_METADATA_NAME].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ModelFileError(f"{path.name} has unreadable edgetl metadata (not JSON)", _REEXPORT) from None
    return meta if isinstance(meta, dict) else None


# ---------------------------------------------------------------------------------------------------------
class OnnxRunner(Runner):
    format = "onnx"

    _TYPES = {
        "tensor(float)": "float32",
        "tensor(float16)": "float16",
        "tensor(uint8)": "uint8",
        "tensor(int8)": "int8",
    }

    def __init__(self, *args: Any, threads: int = 1, labels: tuple[str, ...] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(
                f"cannot run {self.path.name}: onnxruntime is not installed", "pip install 'edgetl[device]'"
            ) from None
        self.runtime = f"onnxruntime {ort.__version__} (CPUExecutionProvider)"
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several private exception types
            raise ModelFileError(
                f"{self.path.name} is not a loadable ONNX model: {_first_line(exc)}", _REEXPORT
            ) from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        _check_io_count(self.path, len(inputs), len(outputs))
        self._input_name = inputs[0].name
        self._output_name = outputs[0].name
        in_type = self._TYPES.get(inputs[0].type, inputs[0].type)
        out_type = self._TYPES.get(outputs[0].type, outputs[0].type)
        _check_claim(self.path, "input dtype", self.input_dtype, in_type)
        _check_claim(self.path, "output dtype", self.output_dtype, out_type)
        _check_hw(self.path, list(inputs[0].shape), self.contract)
        out_shape = list(outputs[0].shape)
        _check_classes(
            self.path, out_shape[-1] if out_shape and isinstance(out_shape[-1], int) else None, self.n_classes
        )
        try:
            props = dict(self.session.get_modelmeta().custom_metadata_map)
        except Exception:  # pragma: no cover - metadata is optional
            props = {}
        try:
            meta = _onnx_metadata(props)
        except ModelFileError as exc:
            raise ModelFileError(f"{self.path.name}: {exc.message}", exc.fix) from None
        self.apply_metadata(meta, labels)

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self._output_name], {self._input_name: x})[0]


class TfliteRunner(Runner):
    format = "tflite"

    def __init__(self, *args: Any, threads: int = 1, labels: tuple[str, ...] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise ConfigError(
                f"cannot run {self.path.name}: ai-edge-litert is not installed", "pip install 'edgetl[device]'"
            ) from None
        self.runtime = f"ai_edge_litert {_version('ai-edge-litert')}"
        try:
            self.interpreter = Interpreter(model_path=str(self.path), num_threads=int(threads))
            inp = self.interpreter.get_input_details()
            outp = self.interpreter.get_output_details()
            _check_io_count(self.path, len(inp), len(outp))
            _check_hw(self.path, [int(d) for d in inp[0]["shape"]], self.contract)
            if int(inp[0]["shape"][0]) != 1:
                self.interpreter.resize_tensor_input(
                    inp[0]["index"], [1, self.contract.height, self.contract.width, 3], strict=False
                )
            self.interpreter.allocate_tensors()
        except ModelFileError:
            raise
        except Exception as exc:
            raise ModelFileError(
                f"{self.path.name} is not a loadable TFLite model: {_first_line(exc)}", _REEXPORT
            ) from None
        inp = self.interpreter.get_input_details()[0]
        out = self.interpreter.get_output_details()[0]
        self._in_index, self._out_index = inp["index"], out["index"]
        _check_claim(self.path, "input dtype", self.input_dtype, np.dtype(inp["dtype"]).name)
        _check_claim(self.path, "output dtype", self.output_dtype, np.dtype(out["dtype"]).name)
        _check_quant(self.path, "input quantization [scale, zero_point]", self.input_quant, self._quant(inp))
        _check_quant(self.path, "output quantization [scale, zero_point]", self.output_quant, self._quant(out))
        if int(np.prod(out["shape"])) != self.n_classes:
            raise ModelFileError(
                f"{self.path.name} outputs shape {list(out['shape'])} but the bundle has {self.n_classes} labels",
                _REEXPORT,
            )
        self.apply_metadata(_tflite_metadata(self.path), labels)

    @staticmethod
    def _quant(details: dict[str, Any]) -> tuple[float, int] | None:
        if np.dtype(details["dtype"]).name not in ("uint8", "int8"):
            return None
        scale, zero_point = details.get("quantization", (0.0, 0))
        return (float(scale), int(zero_point)) if scale else None

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self._in_index, x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._out_index).copy()


class KerasRunner(Runner):
    """The original float model of a run directory (host only: imports TensorFlow lazily)."""

    format = "keras"

    def __init__(self, *args: Any, threads: int = 1, labels: tuple[str, ...] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        from edgetl._tfenv import keras, tf

        try:
            tensorflow = tf()
            keras()  # both must import: the original model is a tf_keras model
        except ImportError:
            raise ConfigError(
                "verifying a run directory runs the original Keras model and needs TensorFlow, which is not installed",
                "on a device, verify the bundle folder (RUN/export) instead",
            ) from None
        try:
            tensorflow.config.threading.set_intra_op_parallelism_threads(int(threads))
            tensorflow.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TF already initialised in this process; keep its settings
            pass
        self.runtime = f"tf_keras {_version('tf_keras')} (tensorflow {_version('tensorflow')})"
        from edgetl.export.context import load_float_model  # zip-only, safe mode: never runs code from the file

        self.model = load_float_model(self.path)
        shape = list(self.model.input_shape) if not isinstance(self.model.input_shape, list) else []
        _check_hw(self.path, shape, self.contract)
        if int(self.model.output_shape[-1]) != self.n_classes:
            raise ModelFileError(
                f"{self.path.name} outputs {self.model.output_shape[-1]} classes but there are {self.n_classes} labels",
                "re-run `edgetl finetune`",
            )
        spec = tensorflow.TensorSpec([1, self.contract.height, self.contract.width, 3], tensorflow.float32)
        model = self.model
        self._fn: Callable[[Any], Any] = tensorflow.function(lambda x: model(x, training=False), input_signature=[spec])

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        return self._fn(x).numpy()


RUNNERS: dict[str, type[Runner]] = {"onnx": OnnxRunner, "tflite": TfliteRunner, "keras": KerasRunner}

#: The runtime each artifact format runs in by default, and the others ``edgetl verify --runtime`` can add.
DEFAULT_ENGINE = {"onnx": "onnxruntime", "tflite": "litert", "keras": "tf_keras"}
ENGINES = {"onnxruntime": "onnx", "openvino": "onnx", "litert": "tflite"}  # engine -> the format it reads


def make_runner(
    spec: ArtifactSpec, contract: InputContract, labels: tuple[str, ...], threads: int = 1, engine: str | None = None
) -> Runner:
    """Build the runner for one bundle artifact (checks the model against the bundle's claims).

    ``engine``: the runtime (default: the format's, :data:`DEFAULT_ENGINE`); ``"openvino"`` runs an ONNX file in
    OpenVINO (:mod:`edgetl.verify.openvino_runner`, imported only then)."""
    engine = engine or DEFAULT_ENGINE[spec.format]
    if ENGINES.get(engine) != spec.format:
        raise ConfigError(
            f"runtime {engine} cannot run {spec.format} artifacts ({spec.name})",
            f"use --runtime {' or '.join(e for e, f in ENGINES.items() if f == spec.format)}",
        )
    if engine == "openvino":
        from edgetl.verify.openvino_runner import OpenVinoRunner

        cls: type[Runner] = OpenVinoRunner
    else:
        cls = RUNNERS[spec.format]
    return cls(
        spec.name,
        spec.path,
        contract,
        len(labels),
        input_dtype=spec.input_dtype,
        input_quant=spec.input_quant,
        output_dtype=spec.output_dtype,
        output_quant=spec.output_quant,
        quantization=spec.quantization,
        threads=threads,
        labels=labels,
    )


def measure_latencies(
    runners: dict[str, Runner], image: np.ndarray, warmup: int, runs: int, block: int = 10
) -> dict[str, np.ndarray]:
    """Time every runner on the same image, interleaved in blocks so slow drift (thermal, neighbours) hits all alike."""
    for runner in runners.values():
        runner.latency(image, warmup=warmup, runs=0)
    results: dict[str, list[np.ndarray]] = {name: [] for name in runners}
    names = list(runners)
    done = 0
    round_no = 0
    while done < runs:
        n = min(block, runs - done)
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for name in order:
            results[name].append(runners[name].latency(image, warmup=0, runs=n))
        done += n
        round_no += 1
    return {name: np.concatenate(parts) if parts else np.empty(0) for name, parts in results.items()}
