"""Where the time goes inside XNNPACK: per-op cost of a .tflite by prefix timing, optionally next to a second file.

LiteRT's Python API has no op profiler and XNNPACK runs the whole graph as one delegate node, so this cuts the
graph after op k (outputs = op k's output, later ops dropped), times every prefix (batch 1, fixed threads, warm-up,
p40 of --runs) and prints the cumulative time and its increase per op. Increases are noisy (+-0.02 ms here) but
stage sums are reliable; this is how the int8 stem was found to cost 0.38 ms against 0.23 ms in fp32 (docs/qat.md).

    python benchmarks/tflite_op_profile.py RUN/export/model_qat_int8.tflite [--compare RUN/export/model_fp32.tflite]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edgetl import tflite_fb  # noqa: E402


def prefix(model: bytes, k: int) -> bytes:
    obj = tflite_fb.read(model)
    graph = obj.subgraphs[0]
    graph.operators = graph.operators[: k + 1]
    graph.outputs = np.array([graph.operators[k].outputs[0]], dtype=np.int32)
    obj.signatureDefs = []
    return tflite_fb.write(obj)


def time_model(model: bytes, runs: int, threads: int) -> float:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model, num_threads=threads)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    x = np.random.default_rng(0).integers(0, 256, d["shape"]).astype(d["dtype"])
    times = []
    for _ in range(runs + 15):
        t0 = time.perf_counter()
        it.set_tensor(d["index"], x)
        it.invoke()
        times.append(time.perf_counter() - t0)
    return float(np.percentile(np.array(times[15:]) * 1e3, 40))


def profile(path: str, runs: int, threads: int) -> list[tuple[str, str, float]]:
    model = open(path, "rb").read()
    obj = tflite_fb.read(model)
    graph = obj.subgraphs[0]
    rows = []
    for k, op in enumerate(graph.operators):
        shape = [int(v) for v in graph.tensors[int(op.outputs[0])].shape]
        rows.append(
            (tflite_fb.op_name(obj, op), "x".join(map(str, shape[1:])), time_model(prefix(model, k), runs, threads))
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--compare", help="a second .tflite (e.g. the fp32 file), printed beside the first")
    ap.add_argument("--runs", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    tables = [profile(args.model, args.runs, args.threads)]
    if args.compare:
        tables.append(profile(args.compare, args.runs, args.threads))
    names = [args.model] + ([args.compare] if args.compare else [])
    print(" | ".join(f"{os.path.basename(n)}: op, output HxWxC, cumulative ms (+ this op)" for n in names))
    for k in range(max(len(t) for t in tables)):
        cells = []
        for t in tables:
            if k < len(t):
                prev = t[k - 1][2] if k else 0.0
                cells.append(f"{k:3d} {t[k][0]:<18}{t[k][1]:>12} {t[k][2]:7.3f} ({t[k][2] - prev:+.3f})")
            else:
                cells.append(" " * 52)
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
