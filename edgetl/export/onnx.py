"""ONNX variants: fp32 (tf2onnx), qat_int8 (QDQ, via edgetl.convert.onnx) and ort_static_int8 (onnxruntime
post-training static quantization, QDQ, per-channel; kept as a comparison for QAT).

Builders return serialized ModelProto bytes; :func:`finalize` renames the I/O to ``image``/``probabilities``,
names the batch dimension and writes the ``edgetl.*`` metadata_props plus the plain ``labels`` and ONNX image
metadata keys (:func:`edgetl.export.metadata.onnx_standard_props`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import ExportError
from edgetl.export.context import BuildContext, convert_module
from edgetl.export.metadata import to_onnx_props

EXTENSION = ".onnx"
#: Opset of the fp32 (and ort_static_int8) export; QDQ per-channel needs >= 13.
OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"


def _quiet_tf2onnx() -> None:
    for name in ("tf2onnx", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)


def build_fp32(ctx: BuildContext) -> bytes:
    if "onnx_fp32" in ctx.cache:
        return ctx.cache["onnx_fp32"]
    from edgetl._tfenv import tf

    tfm = tf()
    _quiet_tf2onnx()
    import tf2onnx

    height, width = ctx.run.image_size
    spec = (tfm.TensorSpec((None, height, width, 3), tfm.float32, name=INPUT_NAME),)
    model_proto, _ = tf2onnx.convert.from_keras(ctx.float_model(), input_signature=spec, opset=OPSET)
    data = rename_io(model_proto.SerializeToString())
    ctx.cache["onnx_fp32"] = data
    return data


def build_qat_int8(ctx: BuildContext) -> bytes:
    return bytes(convert_module("onnx").qat_to_onnx(ctx.qat_model()))


class _CalibrationReader:
    """onnxruntime CalibrationDataReader over the run's training images (float32 0..255, batch 1)."""

    def __init__(self, images: np.ndarray, input_name: str):
        self._images = images
        self._input = input_name
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._images):
            return None
        batch = self._images[self._i : self._i + 1].astype(np.float32)
        self._i += 1
        return {self._input: batch}

    def rewind(self) -> None:
        self._i = 0


def build_ort_static_int8(ctx: BuildContext) -> bytes:
    """Static int8 (QDQ, per-channel weights, uint8 activations) of the fp32 ONNX, MinMax-calibrated.

    The fp32 graph is first run through onnxruntime's ``quant_pre_process`` (shape inference + graph
    optimization), as onnxruntime recommends; if that fails the raw graph is quantized.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    CalibrationDataReader.register(_CalibrationReader)
    src = ctx.workdir / "ort_static_src.onnx"
    pre = ctx.workdir / "ort_static_pre.onnx"
    dst = ctx.workdir / "ort_static_int8.onnx"
    src.write_bytes(build_fp32(ctx))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime.quantization warns on the root logger
    try:
        try:
            quant_pre_process(str(src), str(pre))
            source = pre
        except Exception:  # pre-processing is an optimization; quantize the raw graph instead
            source = src
        reader = _CalibrationReader(ctx.calibration_images(), INPUT_NAME)
        quantize_static(
            str(source),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    except Exception as exc:  # onnxruntime raises plain exceptions for unsupported graphs
        raise ExportError(
            f"onnxruntime static quantization failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            "skip ort_static_int8 (it is only a comparison) or export qat_int8",
        ) from exc
    finally:
        root.setLevel(level)
    data = dst.read_bytes()
    for p in (src, pre, dst):
        p.unlink(missing_ok=True)
    return data


# --- finishing -------------------------------------------------------------------------------------------------


def rename_io(data: bytes, input_name: str = INPUT_NAME, output_name: str = OUTPUT_NAME) -> bytes:
    """Rename the single graph input/output (and every reference to them); name the batch dimension ``batch``."""
    import onnx

    model = onnx.load_from_string(data)
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    existing = {n for node in graph.node for n in list(node.input) + list(node.output)}
    renames: dict[str, str] = {}
    if len(inputs) == 1 and inputs[0].name != input_name and input_name not in existing:
        renames[inputs[0].name] = input_name
    if len(graph.output) == 1 and graph.output[0].name != output_name and output_name not in existing:
        renames[graph.output[0].name] = output_name
    if renames:
        for node in graph.node:
            node.input[:] = [renames.get(n, n) for n in node.input]
            node.output[:] = [renames.get(n, n) for n in node.output]
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            value.name = renames.get(value.name, value.name)
    for value in list(inputs) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    return model.SerializeToString()


def short_names(model) -> None:
    """Give every internal tensor and node a short name (``t12``, ``Conv_7``) and drop unused initializers, in place.

    tf2onnx names each tensor after its TF op path, and a QDQ graph has three tensors per quantized value: in the
    int8 MobileNetV3-Small file the names were 210 KB, 17% of the file, against 924 KB of int8 weights. The graph
    input and output keep their contract names; graphs with subgraphs (If/Loop) are left as they are.
    """
    import onnx

    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return
    used = {n for node in graph.node for n in node.input} | {v.name for v in graph.output}
    unused = [init for init in graph.initializer if init.name not in used]  # tf2onnx leaves a few behind
    for init in unused:
        graph.initializer.remove(init)
    keep = {v.name for v in graph.input if v.name not in {i.name for i in graph.initializer}}
    keep |= {v.name for v in graph.output} | {""}
    renames: dict[str, str] = {}

    def new(name: str) -> str:
        if name in keep:
            return name
        if name not in renames:
            renames[name] = f"t{len(renames)}"
        return renames[name]

    for init in graph.initializer:
        init.name = new(init.name)
    for i, node in enumerate(graph.node):
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]
        node.name = f"{node.op_type}_{i}"
    for value in list(graph.input) + list(graph.value_info):
        value.name = new(value.name)


def finalize(data: bytes, meta: dict[str, Any]) -> bytes:
    """Rename I/O and set ``edgetl.*`` metadata_props (replacing older edgetl keys)."""
    import onnx

    from edgetl import __version__

    model = onnx.load_from_string(rename_io(data))
    short_names(model)
    _denote_image_input(model)
    ours = set(to_onnx_props(meta))
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith("edgetl.") and p.key not in ours]
    del model.metadata_props[:]
    for key, value in keep + sorted(to_onnx_props(meta).items()):
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    model.producer_name = "edgetl"
    model.producer_version = __version__
    model.doc_string = (
        f"edgetl {meta['quantization']} classifier ({meta.get('backbone') or 'unknown backbone'}); input "
        f"'{INPUT_NAME}' NHWC RGB 0..255, output '{OUTPUT_NAME}' softmax over {len(meta['labels'])} labels"
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _denote_image_input(model) -> None:
    """Mark the NHWC input as an image (type denotation ``IMAGE``, dimension denotations), which the ONNX image
    metadata keys (``Image.*``) refer to (onnx docs: MetadataProps.md, TypeDenotation.md, DimensionDenotation.md)."""
    initializers = {init.name for init in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        value.type.denotation = "IMAGE"
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4:
            for dim, denotation in zip(dims, ("DATA_BATCH", "DATA_FEATURE", "DATA_FEATURE", "DATA_CHANNEL")):
                dim.denotation = denotation


_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 10: "float16", 6: "int32", 7: "int64", 11: "float64"}


def describe(data: bytes) -> dict[str, Any]:
    import onnx

    model = onnx.load_from_string(data)
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inp = [i for i in graph.input if i.name not in initializers][0]
    out = graph.output[0]

    def shape(value) -> list[int | str]:
        return [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or -1) for d in value.type.tensor_type.shape.dim
        ]

    return {
        "input_name": inp.name,
        "input_dtype": _ONNX_DTYPES.get(inp.type.tensor_type.elem_type, str(inp.type.tensor_type.elem_type)),
        "input_quant": None,
        "input_shape": shape(inp),
        "output_name": out.name,
        "output_dtype": _ONNX_DTYPES.get(out.type.tensor_type.elem_type, str(out.type.tensor_type.elem_type)),
        "output_quant": None,
        "output_shape": shape(out),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
    }


def check_loads(path: Path) -> None:
    """Fail the export (not verify, later) if onnxruntime cannot load the artifact."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: graph-optimizer notices are not the user's business
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(
            f"onnxruntime cannot load the exported {path.name}: {str(exc).splitlines()[0]}",
            "report this with the run's manifest.json (try another --quantization meanwhile)",
        ) from exc
