"""TFLite variants: fp32, fp16, dynamic_int8 (built here), ptq_int8 and qat_int8 (via edgetl.convert.tflite).

Every builder takes a :class:`~edgetl.export.context.BuildContext` and returns the raw flatbuffer; the export
driver then embeds the metadata (:func:`embed_metadata`) and records the actual I/O types (:func:`describe`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from edgetl.errors import ExportError
from edgetl.export.context import BuildContext, convert_module
from edgetl.export.metadata import TFLITE_LABELS_NAME, TFLITE_METADATA_NAME

EXTENSION = ".tflite"


def _converter(model):
    from edgetl._tfenv import tf

    return tf().lite.TFLiteConverter.from_keras_model(model)


def build_fp32(ctx: BuildContext) -> bytes:
    return bytes(_converter(ctx.float_model()).convert())


def build_fp16(ctx: BuildContext) -> bytes:
    from edgetl._tfenv import tf

    conv = _converter(ctx.float_model())
    conv.optimizations = [tf().lite.Optimize.DEFAULT]
    conv.target_spec.supported_types = [tf().float16]
    return bytes(conv.convert())


def build_dynamic_int8(ctx: BuildContext) -> bytes:
    """int8 weights, float32 activations and I/O (dynamic-range quantization: no calibration data)."""
    from edgetl._tfenv import tf

    conv = _converter(ctx.float_model())
    conv.optimizations = [tf().lite.Optimize.DEFAULT]
    return bytes(conv.convert())


def build_ptq_int8(ctx: BuildContext) -> bytes:
    """Full-int8 post-training quantization of the float model, calibrated on training images."""
    return bytes(convert_module("tflite").ptq_to_tflite_int8(ctx.float_model(), ctx.calibration_images()))


def build_qat_int8(ctx: BuildContext) -> bytes:
    """Full-int8 conversion of the QAT (fake-quant) model."""
    return bytes(convert_module("tflite").qat_to_tflite_int8(ctx.qat_model()))


# --- metadata --------------------------------------------------------------------------------------------------


def standard_metadata(meta: dict[str, Any]) -> bytes:
    """The standard TFLite Metadata (``TFLITE_METADATA``) for an artifact with edgetl metadata ``meta``."""
    from edgetl import tflite_metadata

    contract = meta["input"]
    if contract.get("color", "RGB") != "RGB" or contract.get("layout", "NHWC") != "NHWC":
        raise ExportError(
            f"TFLite Metadata describes NHWC RGB inputs; this model takes {contract.get('layout')} {contract.get('color')}",
            "export an NHWC RGB model",
        )
    height, width = int(contract["height"]), int(contract["width"])
    low, high = contract.get("range", [0, 255])
    labels = meta["labels"]
    backbone = meta.get("backbone") or "unknown backbone"
    dtype = contract.get("dtype", "float32")
    if dtype == "float32":
        feed = f"float32 RGB pixel values {low:g}..{high:g} (no scaling outside the model)"
    else:
        scale, zero_point = contract.get("quant", [1.0, 0])
        feed = f"{dtype} RGB bytes (quantization scale {scale:g}, zero point {zero_point}: real value = pixel)"
    shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
    return tflite_metadata.model_metadata(
        name=f"edgetl image classifier ({backbone}, {meta['quantization']})",
        description=(
            f"Classifies a {width}x{height} RGB image into {len(labels)} classes ({shown}). Made by edgetl "
            f"{meta['edgetl_version']} from run {meta['run_id']} ({meta['source']}); preprocessing is inside the model."
        ),
        version=str(meta["run_id"]),
        author=f"edgetl {meta['edgetl_version']}",
        height=height,
        width=width,
        value_range=(float(low), float(high)),
        input_description=f"Input image {width}x{height} (NHWC, batch 1): {feed}.",
        output_description=f"Softmax probabilities over the {len(labels)} labels (float32).",
        labels_file=tflite_metadata.LABELS_FILE,
    )


def embed_metadata(model: bytes, meta: dict[str, Any], labels_text: str) -> bytes:
    """Return ``model`` finished for apps: input ``image`` (batch 1), output ``probabilities``, one
    ``serving_default`` signature (:func:`edgetl.tflite_fb.standardize_io`); metadata entries ``edgetl`` (JSON),
    ``edgetl.labels`` and the standard ``TFLITE_METADATA`` (replacing older ones), written by edgetl's flatbuffer
    writer; then ``labels.txt`` packed after the flatbuffer (the TFLite Metadata associated file). Last step of
    every TFLite variant: the bundle checksums are taken after it."""
    from ai_edge_litert import schema_py_generated as schema

    from edgetl import tflite_fb, tflite_metadata

    obj = tflite_fb.read(model)
    tflite_fb.standardize_io(obj)
    if obj.buffers is None:
        obj.buffers = []
    ours = (TFLITE_METADATA_NAME, TFLITE_LABELS_NAME, tflite_metadata.METADATA_NAME)
    entries = [m for m in (obj.metadata or []) if tflite_fb.text(m.name) not in ours]
    payloads = {
        TFLITE_METADATA_NAME: json.dumps(meta, sort_keys=True).encode("utf-8"),
        TFLITE_LABELS_NAME: labels_text.encode("utf-8"),
        tflite_metadata.METADATA_NAME: standard_metadata(meta),
    }
    for name, payload in payloads.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(payload, dtype=np.uint8).copy()
        obj.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = name
        entry.buffer = len(obj.buffers) - 1
        entries.append(entry)
    obj.metadata = entries
    flat = tflite_fb.write(obj)  # same writer for every variant: shared quantization vectors, aligned buffers
    return tflite_metadata.append_associated_files(flat, {tflite_metadata.LABELS_FILE: labels_text.encode("utf-8")})


def _quant(detail: dict[str, Any]) -> list[float] | None:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if not scale:
        return None
    return [float(scale), int(zero_point)]


def describe(model: bytes) -> dict[str, Any]:
    """Actual I/O of a TFLite model (dtype names, [scale, zero_point] or None, names, shapes) via LiteRT."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=model)
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    return {
        "input_name": str(inp["name"]),
        "input_dtype": np.dtype(inp["dtype"]).name,
        "input_quant": _quant(inp),
        "input_shape": [int(x) for x in inp.get("shape_signature", inp["shape"])],
        "output_name": str(out["name"]),
        "output_dtype": np.dtype(out["dtype"]).name,
        "output_quant": _quant(out),
        "output_shape": [int(x) for x in out.get("shape_signature", out["shape"])],
    }
