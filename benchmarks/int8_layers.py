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

    python benchmarks/int8_layers.py RUN_DIR [--images 8]
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


def compare(data: bytes, images: np.ndarray) -> list[dict]:
    import onnxruntime as ort

    probed, named = int8_tensor_outputs(data)

    def session(level):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        return ort.InferenceSession(probed, options, providers=["CPUExecutionProvider"])

    fused = session(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    qdq = session(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    feed = fused.get_inputs()[0].name
    names = [name for name, _ in named]
    rows = [{"tensor": name, "op": op, "elements": 0, "differ": 0, "sum": 0, "max": 0} for name, op in named]
    for image in images:
        a = fused.run(names, {feed: image[None]})
        b = qdq.run(names, {feed: image[None]})
        for row, x, y in zip(rows, a, b):
            d = x.astype(np.int32) - y.astype(np.int32)
            row["elements"] += d.size
            row["differ"] += int(np.count_nonzero(d))
            row["sum"] += int(d.sum())
            row["max"] = max(row["max"], int(np.abs(d).max()))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="an edgetl finetune run directory (with qat.h5)")
    ap.add_argument("--images", type=int, default=8, help="validation images to run (default 8)")
    args = ap.parse_args(argv)

    from edgetl import qat
    from edgetl.convert.onnx import qat_to_onnx
    from edgetl.data import load_images
    from edgetl.rundir import read_run

    run = read_run(args.run)
    model = qat.load_qat_model(run.qat_model)
    size = int(model.input_shape[1])
    images = load_images(run.split_items("val", None)[: args.images], (size, size)).images.astype(np.float32)
    rows = compare(qat_to_onnx(model), images)
    print(
        f"{len(images)} validation images; int8 tensors in graph order, fused (ORT_ENABLE_ALL) vs QDQ (ORT_DISABLE_ALL)"
    )
    print(f"{'#':>4}  {'op feeding the Q':<20}{'elements':>10}{'differ %':>10}{'mean signed':>13}{'max':>6}")
    for i, r in enumerate(rows):
        share, mean = 100 * r["differ"] / r["elements"], r["sum"] / r["elements"]
        print(f"{i:>4}  {r['op']:<20}{r['elements']:>10}{share:>10.3f}{mean:>13.5f}{r['max']:>6}")
    first = next((i for i, r in enumerate(rows) if r["differ"]), None)
    print(f"first int8 tensor that differs: #{first}" if first is not None else "every int8 tensor is identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
