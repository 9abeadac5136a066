"""Layer by layer: where do onnxruntime's fused int8 kernels depart from the QDQ graph of a QAT int8 ONNX file?

Takes an `edgetl finetune` run, writes its QAT model as QDQ ONNX (`qat_to_onnx`, what `edgetl export` ships) with
every QuantizeLinear output (each int8 tensor of the graph) made a graph output, and runs validation images through
it twice: onnxruntime's default optimizations (ORT_ENABLE_ALL: QLinearConv and friends, integer arithmetic), and
optimizations off (ORT_DISABLE_ALL: each DequantizeLinear -> float op -> QuantizeLinear as written, i.e. the QAT
model's arithmetic in float32). Per int8 tensor, in graph order: the share of elements that differ, their mean
signed difference (a bias would show here) and the largest difference, in quantization steps.

A fused kernel that computed something else would show up as the first tensor with many or large differences (or a
mean signed difference far from 0) while its inputs agree; rounding of values that lie on a step boundary shows up
as a few one-step differences that later layers then spread.

``--against keras`` compares the QAT Keras model itself (each quantizing layer's output, put on the ONNX file's grid
for that tensor) with onnxruntime at ``--level`` instead: where the QAT model and the file compute different
things.

    python benchmarks/int8_layers.py RUN_DIR [--images 8] [--against keras --level ORT_DISABLE_ALL] [--snap]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def int8_tensor_outputs(data: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    """The model with every QuantizeLinear output as a graph output; (tensor name, op that feeds its Q) in order."""
    import onnx

    model = onnx.load_from_string(data)
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    zero_point_type = {init.name: init.data_type for init in graph.initializer}
    named = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        src = producer.get(node.input[0])
        dtype = zero_point_type.get(node.input[2], onnx.TensorProto.UINT8) if len(node.input) > 2 else 2
        graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], dtype, None))
        named.append((node.output[0], src.op_type if src is not None else "input"))
    return model.SerializeToString(), named


def _session(probed: bytes, level: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(probed, options, providers=["CPUExecutionProvider"])


def _tally(rows: list[dict], a: list[np.ndarray], b: list[np.ndarray]) -> None:
    for row, x, y in zip(rows, a, b):
        d = x.astype(np.int32) - y.astype(np.int32)
        row["elements"] += d.size
        row["differ"] += int(np.count_nonzero(d))
        row["sum"] += int(d.sum())
        row["max"] = max(row["max"], int(np.abs(d).max()))


def compare(data: bytes, images: np.ndarray) -> list[dict]:
    """Every int8 tensor: onnxruntime's fused kernels (ORT_ENABLE_ALL) minus the QDQ graph (ORT_DISABLE_ALL)."""
    probed, named = int8_tensor_outputs(data)
    fused, qdq = _session(probed, "ORT_ENABLE_ALL"), _session(probed, "ORT_DISABLE_ALL")
    feed = fused.get_inputs()[0].name
    names = [name for name, _ in named]
    rows = [{"tensor": name, "op": op, "elements": 0, "differ": 0, "sum": 0, "max": 0} for name, op in named]
    for image in images:
        _tally(rows, fused.run(names, {feed: image[None]}), qdq.run(names, {feed: image[None]}))
    return rows


def compare_with_keras(qat_model, data: bytes, images: np.ndarray, level: str) -> list[dict]:
    """Every int8 tensor: onnxruntime at ``level`` minus the QAT Keras model's output of the layer whose fake-quant
    made it (tf2onnx names each QuantizeLinear after that layer), on the tensor's int8 grid."""
    import onnx
    from onnx import numpy_helper

    from edgetl._tfenv import keras

    probed, named = int8_tensor_outputs(data)
    graph = onnx.load_from_string(data).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    quantize = {n.output[0]: n for n in graph.node if n.op_type == "QuantizeLinear"}
    layer_names = {layer.name for layer in qat_model.layers}
    kept = []
    for name, op in named:
        layer = name.split("/MovingAvgQuantize")[0].split("/")[1:]  # <model>/<layer name, may hold '/'>/...
        layer = "/".join(layer)
        if layer in layer_names:
            kept.append((name, op, layer))
    outputs = keras().Model(qat_model.input, [qat_model.get_layer(layer).output for _, _, layer in kept])
    session = _session(probed, level)
    feed = session.get_inputs()[0].name
    names = [name for name, _, _ in kept]
    rows = [{"tensor": layer, "op": op, "elements": 0, "differ": 0, "sum": 0, "max": 0} for _, op, layer in kept]
    for image in images:
        ours = outputs.predict(image[None], verbose=0)
        ours = ours if isinstance(ours, list) else [ours]
        theirs = session.run(names, {feed: image[None]})
        on_grid = []
        for name, value, their in zip(names, ours, theirs):
            q = quantize[name]
            step, zero = float(inits[q.input[1]]), int(inits[q.input[2]])
            k = np.round(value / step).astype(np.int32) + zero
            on_grid.append(k.transpose(0, 3, 1, 2) if k.ndim == 4 and k.shape != their.shape else k)
        _tally(rows, theirs, on_grid)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="an edgetl finetune run directory (with qat.h5)")
    ap.add_argument("--images", type=int, default=8, help="validation images to run (default 8)")
    ap.add_argument("--against", choices=("qdq", "keras"), default="qdq", help="what onnxruntime is compared with")
    ap.add_argument("--level", default="ORT_DISABLE_ALL", help="onnxruntime's optimization level for --against keras")
    ap.add_argument("--snap", action="store_true", help="snap_to_grid first (runs QAT'd before finetune did it)")
    args = ap.parse_args(argv)

    from edgetl import qat
    from edgetl.convert.onnx import qat_to_onnx
    from edgetl.data import load_images
    from edgetl.rundir import read_run

    run = read_run(args.run)
    model = qat.load_qat_model(run.qat_model)
    size = int(model.input_shape[1])
    images = load_images(run.split_items("val", None)[: args.images], (size, size)).images.astype(np.float32)
    if args.snap:
        print(f"snap_to_grid: {qat.snap_to_grid(model)} layers changed")
    if args.against == "keras":
        rows = compare_with_keras(model, qat_to_onnx(model), images, args.level)
        what = f"onnxruntime ({args.level}) minus the QAT Keras model"
    else:
        rows = compare(qat_to_onnx(model), images)
        what = "fused (ORT_ENABLE_ALL) minus QDQ (ORT_DISABLE_ALL)"
    print(f"{len(images)} validation images; int8 tensors in graph order, {what}")
    print(f"{'#':>4}  {'op feeding the Q':<20}{'elements':>10}{'differ %':>10}{'mean signed':>13}{'max':>6}")
    for i, r in enumerate(rows):
        share, mean = 100 * r["differ"] / r["elements"], r["sum"] / r["elements"]
        print(f"{i:>4}  {r['op']:<20}{r['elements']:>10}{share:>10.3f}{mean:>13.5f}{r['max']:>6}")
    first = next((i for i, r in enumerate(rows) if r["differ"]), None)
    print(f"first int8 tensor that differs: #{first}" if first is not None else "every int8 tensor is identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
