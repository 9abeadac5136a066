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
things. ``--against exact`` compares onnxruntime (default ORT_ENABLE_ALL) with the QDQ graph computed in float64
(``qdq_exact.py``): the rounding each of onnxruntime's kernels adds of its own.

    python benchmarks/int8_layers.py RUN_DIR [--images 8] [--against keras|exact [--level LEVEL]] [--snap]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qdq_exact  # noqa: E402


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


def _rows(tensors) -> list[dict]:
    """One empty tally row per (tensor name, op) pair."""
    return [{"tensor": name, "op": op, "elements": 0, "differ": 0, "sum": 0, "max": 0} for name, op in tensors]


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
    rows = _rows(named)
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
    rows = _rows((layer, op) for _, op, layer in kept)
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


def compare_with_exact(data: bytes, images: np.ndarray, level: str, local: bool = False) -> list[dict]:
    """Every int8 tensor: onnxruntime at ``level`` minus the QDQ graph computed in float64 (``qdq_exact``); with
    ``local``, each tensor of the float64 graph computed from onnxruntime's own int8 inputs (per operator)."""
    probed, named = int8_tensor_outputs(data)
    names = [name for name, _ in named]
    session = _session(probed, level)
    feed = session.get_inputs()[0].name
    rows = _rows(named)
    for image in images:
        theirs = session.run(names, {feed: image[None]})
        given = dict(zip(names, theirs)) if local else None
        _, exact = qdq_exact.evaluate(data, image[None], tensors=tuple(names), given=given)
        _tally(rows, theirs, [np.rint(v).astype(np.int32) for v in exact])
    return rows


def compare_tflite_with_exact(qat_model, images: np.ndarray, xnnpack: bool = True, local: bool = False) -> list[dict]:
    """Every int8 tensor of the QAT int8 TFLite file as LiteRT computes it (XNNPACK unless ``xnnpack`` is False)
    minus the same tensor of the QDQ graph in float64, in steps. Each int8 op output of the .tflite is made a graph
    output; it is paired with the next ONNX QuantizeLinear of the same scale, in graph order (TFLite fuses a
    ReLU/ReLU6 into its producer, so an ONNX tensor the TFLite graph does not have is skipped). With ``local``,
    LiteRT's tensors (NHWC) are given to the float64 graph (NCHW) transposed."""
    import onnx
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from onnx import numpy_helper

    from edgetl import tflite_fb
    from edgetl.convert.onnx import qat_to_onnx
    from edgetl.convert.tflite import qat_to_tflite_int8

    data = qat_to_onnx(qat_model)
    graph = onnx.load_from_string(data).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    quantized = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]

    obj = tflite_fb.read(qat_to_tflite_int8(qat_model))
    sub = obj.subgraphs[0]
    probes = []
    for op in sub.operators:
        t = sub.tensors[op.outputs[0]]
        q = t.quantization
        if t.type == 9 and q is not None and q.scale is not None and len(q.scale) == 1:  # INT8, per tensor
            probes.append((op.outputs[0], float(q.scale[0]), int(q.zeroPoint[0]), tflite_fb.op_name(obj, op)))
    sub.outputs = list(sub.outputs) + [index for index, _, _, _ in probes]
    kind = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = Interpreter(model_content=tflite_fb.write(obj), num_threads=1, experimental_op_resolver_type=kind)
    it.allocate_tensors()
    feed = it.get_input_details()[0]

    pairs, start = [], 0  # (tflite tensor, its zero point, op, onnx Q node)
    for index, scale, zero, op in probes:
        for k in range(start, len(quantized)):
            node = quantized[k]
            if abs(float(inits[node.input[1]]) - scale) <= 1e-7 * scale:
                pairs.append((index, zero, op, node))
                start = k + 1
                break
    names = tuple(node.output[0] for _, _, _, node in pairs)
    rows = _rows((node.output[0], op) for _, _, op, node in pairs)
    for image in images:
        it.set_tensor(feed["index"], np.clip(np.round(image[None]), 0, 255).astype(feed["dtype"]))
        it.invoke()
        theirs = [it.get_tensor(index).astype(np.int32) - zero for index, zero, _, _ in pairs]  # steps from zero
        given = None
        if local:  # LiteRT's int8 tensors in the ONNX graph's layout and zero points
            given = {}
            for t, (_, _, _, node) in zip(theirs, pairs):
                v = t.transpose(0, 3, 1, 2) if t.ndim == 4 else t
                given[node.output[0]] = v + int(inits[node.input[2]])
        _, exact = qdq_exact.evaluate(data, image[None], tensors=names, given=given)
        ours = []
        for t, (_, _, _, node), value in zip(theirs, pairs, exact):
            e = np.rint(value).astype(np.int32) - int(inits[node.input[2]])
            e = e.transpose(0, 2, 3, 1) if e.ndim == 4 else e
            ours.append(e.reshape(t.shape) if e.shape != t.shape else e)
        _tally(rows, theirs, ours)
    print(f"{len(pairs)} of the {len(probes)} int8 tensors of the .tflite paired with the ONNX file's")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="an edgetl finetune run directory (with qat.h5)")
    ap.add_argument("--images", type=int, default=8, help="validation images to run (default 8)")
    ap.add_argument(
        "--against",
        choices=("qdq", "keras", "exact", "tflite"),
        default="qdq",
        help="what is compared (tflite: LiteRT with XNNPACK, --level builtin for its own kernels, vs the exact graph)",
    )
    ap.add_argument(
        "--level",
        default=None,
        help="onnxruntime's optimization level for --against keras (default ORT_DISABLE_ALL) or exact (ORT_ENABLE_ALL)",
    )
    ap.add_argument(
        "--local",
        action="store_true",
        help="exact/tflite: compute each tensor of the float64 graph from the runtime's own int8 inputs (per operator)",
    )
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
        level = args.level or "ORT_DISABLE_ALL"
        rows = compare_with_keras(model, qat_to_onnx(model), images, level)
        what = f"onnxruntime ({level}) minus the QAT Keras model"
    elif args.against == "exact":
        level = args.level or "ORT_ENABLE_ALL"
        rows = compare_with_exact(qat_to_onnx(model), images, level, args.local)
        what = f"onnxruntime ({level}) minus the QDQ graph in float64"
    elif args.against == "tflite":
        rows = compare_tflite_with_exact(model, images, xnnpack=args.level != "builtin", local=args.local)
        what = f"LiteRT ({'builtin kernels' if args.level == 'builtin' else 'XNNPACK'}) minus the QDQ graph in float64"
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
