"""fp32 vs int8 latency, side by side, for LiteRT (XNNPACK) and onnxruntime, plus op/partition findings.

Usage::

    python benchmarks/int8_latency_probe.py [--backbone mobilenet_v3_small] [--size 224]
        [--weights ../shared/weights/weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5]
        [--data ../shared/data/trashnet] [--calib 64] [--runs 200]

Measures batch 1, one thread (LiteRT ``num_threads=1``; ORT intra/inter op threads 1), 20 warm-up
runs, then ``--runs`` timed runs; prints p50/p90 in ms. Variants:

* ``fp32``                  float model (TFLite / ONNX)
* ``int8 ptq stock``        post-training int8 of the unmodified graph (the converter fuses HARD_SWISH)
* ``int8 ptq rewrite``      post-training int8 of ``flatten_for_qat`` (ADD/RELU6/MUL forms)
* ``int8 qat``              ``quantize_for_training`` + ``calibrate`` -> ``qat_to_tflite_int8`` / ``qat_to_onnx``
                            (float stem, uint8 input; ``int8 in`` / ``f32 in``: the other ``input_type`` choices;
                            ``space_to_depth stem`` / ``int8 stem``: the earlier all-int8 stems)

For each TFLite file it prints the op histogram, the number of XNNPACK partitions (DELEGATE nodes
in the execution plan; 1 means the whole graph runs inside XNNPACK) and, when there is more than
one, the op types that feed a partition boundary, i.e. run outside XNNPACK. For ONNX it prints the op
histogram of the graph after onnxruntime's optimizer (QLinear*/QDQ fusions that happened or not).
Finally it fits the classifier head on ``--train`` images (linear probe on float features), and
reports top-1 accuracy and agreement with the fake-quant Keras model on ``--test`` held-out images
for float / fake-quant / int8 TFLite (XNNPACK and reference kernels) / int8 PTQ / int8 ONNX.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edgetl._tfenv import keras, tf  # noqa: E402

K = keras()
TF = tf()
from edgetl import qat as q  # noqa: E402
from edgetl.convert.onnx import float_to_onnx, qat_to_onnx  # noqa: E402
from edgetl.convert.tflite import float_to_tflite, ptq_to_tflite_int8, qat_to_tflite_int8  # noqa: E402
from edgetl.predict import tflite_predict  # noqa: E402
from edgetl.tflite_fb import xnnpack_partitions  # noqa: E402

BACKBONES = {
    "mobilenet_v3_small": lambda s, w: K.applications.MobileNetV3Small(
        input_shape=(s, s, 3), include_top=False, weights=w, include_preprocessing=True
    ),
    "mobilenet_v3_large": lambda s, w: K.applications.MobileNetV3Large(
        input_shape=(s, s, 3), include_top=False, weights=w, include_preprocessing=True
    ),
    "efficientnet_b0": lambda s, w: K.applications.EfficientNetB0(input_shape=(s, s, 3), include_top=False, weights=w),
}


def build(backbone, size, weights, num_classes=6):
    base = BACKBONES[backbone](size, weights)
    inp = K.Input((size, size, 3), name="image")
    x = base(inp, training=False)
    x = K.layers.GlobalAveragePooling2D(name="pool")(x)
    x = K.layers.Dropout(0.2, name="dropout")(x)
    out = K.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return K.Model(inp, out)


def load_images(folder, n, size, seed=0):
    files = sorted(glob.glob(os.path.join(folder, "*", "*.jp*g")) + glob.glob(os.path.join(folder, "*", "*.png")))
    rng = np.random.default_rng(seed)
    if not files:
        return rng.uniform(0, 255, (n, size, size, 3)).astype(np.float32)
    pick = rng.choice(len(files), size=min(n, len(files)), replace=False)
    out = []
    for i in pick:
        img = TF.image.decode_image(TF.io.read_file(files[i]), channels=3, expand_animations=False)
        out.append(TF.image.resize(TF.cast(img, TF.float32), (size, size)).numpy())
    return np.stack(out).astype(np.float32)


def load_labeled(folder, n, size, seed=0):
    """n images (float32 0..255) with integer labels from class sub-folders, shuffled."""
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    files = [(f, c) for c, d in enumerate(classes) for f in sorted(glob.glob(os.path.join(folder, d, "*.jp*g")))]
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(files))[:n]
    out = []
    for i in pick:
        img = TF.image.decode_image(TF.io.read_file(files[i][0]), channels=3, expand_animations=False)
        out.append(TF.image.resize(TF.cast(img, TF.float32), (size, size)).numpy())
    return np.stack(out).astype(np.float32), np.array([files[i][1] for i in pick])


def fit_head(model, x, y, epochs=60):
    """Train only the Dense head on frozen float features (fast, gives a meaningful classifier)."""
    feats = K.Model(model.inputs, model.get_layer("pool").output).predict(x, batch_size=16, verbose=0)
    head = model.get_layer("predictions")
    probe = K.Sequential([K.Input(feats.shape[1:]), K.layers.Dense(head.units, activation="softmax")])
    probe.compile(K.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    probe.fit(feats, y, epochs=epochs, batch_size=32, verbose=0)
    head.set_weights(probe.layers[-1].get_weights())


def tflite_findings(blob):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    raw = Interpreter(
        model_content=blob,
        num_threads=1,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    raw.allocate_tensors()
    ops = collections.Counter(o["op_name"] for o in raw._get_ops_details())
    return ops, xnnpack_partitions(blob)[0]


def non_delegated(blob):
    """Op types that run outside XNNPACK: the producers of tensors that flow *into* a DELEGATE node
    (a partition boundary) plus ops whose outputs are graph outputs outside any partition."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=blob, num_threads=1)
    it.allocate_tensors()
    details = it._get_ops_details()
    delegates = [o for o in details if o["op_name"] == "DELEGATE"]
    delegated_out = {t for d in delegates for t in d["outputs"]}
    producer = {t: o for o in details if o["op_name"] != "DELEGATE" for t in o["outputs"]}
    outside = collections.Counter()
    for d in delegates:
        for t in d["inputs"]:
            if t in producer and t not in delegated_out:
                outside[producer[t]["op_name"]] += 1
    return dict(outside)


def time_tflite(blob, x, runs):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=blob, num_threads=1)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    if d["dtype"] == np.uint8:
        x = np.clip(np.round(x), 0, 255).astype(np.uint8)
    elif d["dtype"] == np.int8:
        x = (np.clip(np.round(x), 0, 255) - 128).astype(np.int8)
    it.set_tensor(d["index"], x.astype(d["dtype"]))
    return _time(it.invoke, runs)


def _time(fn, runs):
    for _ in range(20):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts = np.array(ts) * 1e3
    return float(np.percentile(ts, 50)), float(np.percentile(ts, 90))


def ort_session(blob, optimized_path=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])


def ort_findings_and_time(blob, x, runs):
    import onnx

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "opt.onnx")
        sess = ort_session(blob, p)
        opt = onnx.load(p)
    ops = collections.Counter(n.op_type for n in opt.graph.node)
    name = sess.get_inputs()[0].name
    feed = {name: x.astype(np.float32)}
    return ops, _time(lambda: sess.run(None, feed), runs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="mobilenet_v3_small", choices=sorted(BACKBONES))
    ap.add_argument("--size", type=int, default=224)
    shared = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared")
    default_w = os.path.join(shared, "weights", "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5")
    ap.add_argument("--weights", default=default_w if os.path.exists(default_w) else None)
    ap.add_argument("--data", default=os.path.join(shared, "data", "trashnet"))
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--skip-stock", action="store_true")
    ap.add_argument("--train", type=int, default=240, help="images to fit the classifier head on (0: random head)")
    ap.add_argument("--test", type=int, default=120, help="held-out images for accuracy/agreement")
    a = ap.parse_args(argv)
    weights = a.weights if a.backbone == "mobilenet_v3_small" else None

    model = build(a.backbone, a.size, weights)
    images, labels = load_labeled(a.data, a.train + a.test, a.size)
    train_x, train_y = images[: a.train], labels[: a.train]
    test_x, test_y = images[a.train :], labels[a.train :]
    if a.train:
        fit_head(model, train_x, train_y)
    calib = (train_x if a.train else test_x)[: a.calib]
    x = test_x[:1]

    variants = {"fp32": float_to_tflite(model)}
    if not a.skip_stock:
        variants["int8 ptq stock"] = ptq_to_tflite_int8(model, calib, rewrite=False)
    variants["int8 ptq rewrite"] = ptq_to_tflite_int8(model, calib)
    qat = q.quantize_for_training(model)
    q.calibrate(qat, calib)
    variants["int8 qat"] = qat_to_tflite_int8(qat)
    variants["int8 qat, int8 in"] = qat_to_tflite_int8(qat, input_type="int8")
    variants["int8 qat, f32 in"] = qat_to_tflite_int8(qat, input_type="float32")
    for stem in ("space_to_depth", "int8"):  # the earlier, all-int8 stems (docs/qat.md)
        other = q.quantize_for_training(model, stem=stem)
        q.calibrate(other, calib)
        variants[f"int8 qat, {stem} stem"] = qat_to_tflite_int8(other)

    print(f"\n== LiteRT, {a.backbone} {a.size}px, batch 1, 1 thread, {a.runs} runs")
    fp = None
    for k, blob in variants.items():
        ops, parts = tflite_findings(blob)
        p50, p90 = time_tflite(blob, x, a.runs)
        fp = fp or p50
        print(
            f"{k:18s} p50 {p50:6.2f} ms  p90 {p90:6.2f} ms  x{p50 / fp:4.2f}  size {len(blob) / 1e6:5.2f} MB"
            f" ({len(blob) / len(variants['fp32']):.2f}x)  XNNPACK partitions {parts}"
        )
        print("    ops:", dict(sorted(ops.items())))
        if parts > 1:
            print("    ops feeding a partition boundary (outside XNNPACK):", non_delegated(blob))

    if not a.skip_onnx:
        print(f"\n== onnxruntime, {a.backbone} {a.size}px, batch 1, 1 thread, {a.runs} runs")
        onx = {"fp32": float_to_onnx(model), "int8 qat qdq": qat_to_onnx(qat)}
        fp = None
        for k, blob in onx.items():
            ops, (p50, p90) = ort_findings_and_time(blob, x, a.runs)
            fp = fp or p50
            print(f"{k:18s} p50 {p50:6.2f} ms  p90 {p90:6.2f} ms  x{p50 / fp:4.2f}  size {len(blob) / 1e6:5.2f} MB")
            print("    optimized graph ops:", dict(sorted(ops.items())))

    # accuracy / agreement on held-out images (rounded to integers: what a uint8 camera frame holds)
    tx = np.round(test_x)
    p_float = model.predict(tx, batch_size=16, verbose=0)
    p_fq = qat.predict(tx, batch_size=16, verbose=0)
    p_int8 = tflite_predict(variants["int8 qat"], tx)
    p_ptq = tflite_predict(variants["int8 ptq rewrite"], tx)
    rows = [
        ("float keras", p_float),
        ("fake-quant keras", p_fq),
        ("int8 qat tflite", p_int8),
        ("  same, no XNNPACK", tflite_predict(variants["int8 qat"], tx, xnnpack=False)),
        ("int8 ptq tflite", p_ptq),
    ]
    if not a.skip_onnx:
        sess = ort_session(onx["int8 qat qdq"])
        name = sess.get_inputs()[0].name
        rows.append(("int8 qat onnx", np.concatenate([sess.run(None, {name: t[None]})[0] for t in tx])))
    print(
        f"\n== accuracy on {len(tx)} held-out images ({'trained head' if a.train else 'random head'}; "
        f"no QAT epochs, calibrated on {len(calib)} images)"
    )
    for k, p in rows:
        acc = float((p.argmax(1) == test_y).mean())
        agree = float((p.argmax(1) == p_fq.argmax(1)).mean())
        dp = np.abs(p - p_fq)
        print(
            f"{k:18s} top-1 {acc:.3f}  agreement with fake-quant {agree:.3f}  |dp| mean {dp.mean():.4f} max {dp.max():.4f}"
        )


if __name__ == "__main__":
    main()
