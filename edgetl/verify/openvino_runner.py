"""OpenVINO runner for edgetl's ONNX artifacts (Intel gateways; ``pip install 'edgetl[openvino]'``, TensorFlow-free).

OpenVINO's CPU plugin defaults are tuned for throughput on servers, not for the question verify asks, so the runner
sets them explicitly:

* **static batch-1 shapes**: the fp32 file has a dynamic batch dimension, which OpenVINO compiles slower kernels for;
  the model is reshaped to ``[1, H, W, 3]`` before compiling.
* **threads honoured**: ``INFERENCE_NUM_THREADS`` = ``--threads``, one stream, latency hint, and no CPU pinning
  (pinned threads fight other processes for the same cores on a shared or busy machine).
* **precision = the artifact's**: on CPUs with AMX/AVX-512 BF16 OpenVINO silently runs float graphs in bf16; the
  hint is set to ``f32`` so an fp32 check measures fp32 arithmetic. QDQ int8 graphs still run their int8 kernels
  (OpenVINO's low-precision transformations read the Q/DQ pairs); only the float parts are held to f32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgetl.errors import ConfigError, ModelFileError
from edgetl.verify.runners import (
    _REEXPORT,
    Runner,
    _check_claim,
    _check_classes,
    _check_hw,
    _check_io_count,
    _first_line,
    _onnx_metadata,
    _version,
)

_TYPES = {"f32": "float32", "f16": "float16", "u8": "uint8", "i8": "int8"}

#: OpenVINO's inference precision per artifact quantization: fp32 files are checked at fp32, and QDQ int8 files
#: hold their float parts (the Q/DQ scales, softmax) at f32 as onnxruntime does; their int8 kernels come from the
#: Q/DQ pairs, not from this hint. edgetl exports no fp16 ONNX file.
PRECISION = {"fp32": "f32", "qat_int8": "f32", "ort_static_int8": "f32", "ptq_int8": "f32", "dynamic_int8": "f32"}


def precision_hint(quantization: str | None) -> str:
    """The ``INFERENCE_PRECISION_HINT`` for an artifact of this quantization (never OpenVINO's silent bf16)."""
    if quantization not in PRECISION:
        raise ConfigError(
            f"the OpenVINO runner has no precision for {quantization!r} artifacts",
            f"verify it with onnxruntime (drop --runtime openvino); supported: {', '.join(PRECISION)}",
        )
    return PRECISION[quantization]


def _rt_metadata(model: Any) -> dict[str, str]:
    """The ONNX ``metadata_props`` as OpenVINO exposes them (``rt_info['framework']``), as plain strings."""
    info = model.get_rt_info()
    if "framework" not in info:
        return {}
    framework = info["framework"]
    items = framework.astype(dict) if hasattr(framework, "astype") else dict(framework)
    return {str(k): (v.astype(str) if hasattr(v, "astype") else str(v)) for k, v in items.items()}


class OpenVinoRunner(Runner):
    format = "onnx"

    def __init__(self, *args: Any, threads: int = 1, labels: tuple[str, ...] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        try:
            import openvino as ov
        except ImportError:
            raise ConfigError(
                f"cannot run {self.path.name} with OpenVINO: openvino is not installed",
                "pip install 'edgetl[openvino]'",
            ) from None
        precision = precision_hint(self.quantization or "fp32")
        self.runtime = f"openvino {_version('openvino')} (CPU, {precision} precision)"
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as exc:
            raise ModelFileError(
                f"{self.path.name} is not an ONNX model OpenVINO can read: {_first_line(exc)}", _REEXPORT
            ) from None
        _check_io_count(self.path, len(model.inputs), len(model.outputs))
        shape = [d.get_length() if d.is_static else None for d in model.inputs[0].get_partial_shape()]
        _check_hw(self.path, shape, self.contract)
        model.reshape({model.inputs[0]: [1, self.contract.height, self.contract.width, 3]})
        in_type = _TYPES.get(model.inputs[0].get_element_type().get_type_name(), "?")
        out_type = _TYPES.get(model.outputs[0].get_element_type().get_type_name(), "?")
        _check_claim(self.path, "input dtype", self.input_dtype, in_type)
        _check_claim(self.path, "output dtype", self.output_dtype, out_type)
        out_shape = list(model.outputs[0].get_partial_shape())
        _check_classes(
            self.path, out_shape[-1].get_length() if out_shape and out_shape[-1].is_static else None, self.n_classes
        )
        self.config = {
            "INFERENCE_NUM_THREADS": int(threads),
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,
            "INFERENCE_PRECISION_HINT": precision,
        }
        try:
            compiled = core.compile_model(model, "CPU", self.config)
        except Exception as exc:
            raise ModelFileError(
                f"OpenVINO could not compile {self.path.name}: {_first_line(exc)}", _REEXPORT
            ) from None
        got = compiled.get_property("INFERENCE_PRECISION_HINT")
        self.execution_precision = got.get_type_name() if hasattr(got, "get_type_name") else str(got)
        if self.execution_precision != precision:
            raise ModelFileError(
                f"OpenVINO compiled {self.path.name} at {self.execution_precision}, not the {precision} it was asked for",
                "update openvino (pip install -U 'edgetl[openvino]')",
            )
        self._request = compiled.create_infer_request()
        try:
            meta = _onnx_metadata(_rt_metadata(model))
        except ModelFileError as exc:
            raise ModelFileError(f"{self.path.name}: {exc.message}", exc.fix) from None
        self.apply_metadata(meta, labels)

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        self._request.infer({0: x})
        return self._request.get_output_tensor(0).data.copy()


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True
