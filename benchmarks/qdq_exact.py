"""The QAT graph computed (nearly) exactly: a float64 numpy evaluation of a QDQ ONNX file.

Every int8 implementation of a QAT model rounds somewhere else: the QAT Keras model sums float32 products in
oneDNN's order, onnxruntime's QDQ graph in MLAS's, its fused kernels requantize int32 sums with a float32
multiplier, XNNPACK with its own. A value that lands within a few float32 ulps of a rounding boundary goes one way in
one and the other way in another, and in a deep int8 network one such step spreads. To tell "the file computes
something else" from "two faithful roundings of the same graph", `benchmarks/int8_fidelity.py` compares each of
them with this evaluation of the graph the QAT model defines (as `edgetl export` writes it: `qat_to_onnx`), whose
float64 sums are ~1e9 times further from a boundary than float32's.

Rounding follows ONNX QuantizeLinear (half to even, saturating); TF's FakeQuant rounds half up. No tie was met in
float64 on the shared data (both rules gave identical outputs), so the choice does not show.

    from qdq_exact import evaluate
    probs = evaluate(onnx_bytes, images)        # images NHWC float32, as the file takes them

Only the operators `qat_to_onnx` emits for the supported backbones are implemented; any other raises
NotImplementedError naming it.
"""

from __future__ import annotations

import numpy as np


def _attributes(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, attrs: dict) -> np.ndarray:
    """NCHW convolution, group 1 or depthwise, as a sum over kernel taps."""
    if attrs.get("dilations", [1, 1]) != [1, 1] or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise NotImplementedError("Conv with dilations or auto_pad")
    sh, sw = attrs.get("strides", [1, 1])
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, h, wd = x.shape
    o, ci, kh, kw = w.shape
    group = attrs.get("group", 1)
    oh, ow = (h - kh) // sh + 1, (wd - kw) // sw + 1
    out = np.zeros((n, o, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            tap = x[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
            if group == 1:
                out += np.einsum("nchw,oc->nohw", tap, w[:, :, i, j], optimize=True)
            elif group == c == o and ci == 1:
                out += tap * w[:, 0, i, j][None, :, None, None]
            else:
                raise NotImplementedError(f"Conv with group {group}")
    return out if b is None else out + b[None, :, None, None]


def _per_axis(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if v.size == 1:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _node(op: str, x: list, attrs: dict) -> np.ndarray:  # noqa: C901 (one branch per operator)
    if op == "QuantizeLinear":
        zp = x[2]
        lo, hi = (0, 255) if zp.dtype == np.uint8 else (-128, 127)
        axis = attrs.get("axis", 1)
        scale, zero = _per_axis(x[1].astype(np.float64), x[0].ndim, axis), _per_axis(zp, x[0].ndim, axis)
        return np.clip(np.rint(x[0] / scale) + zero.astype(np.float64), lo, hi)
    if op == "DequantizeLinear":
        axis, q = attrs.get("axis", 1), x[0].astype(np.float64)
        scale, zero = _per_axis(x[1].astype(np.float64), q.ndim, axis), _per_axis(x[2], q.ndim, axis)
        return (q - zero.astype(np.float64)) * scale
    if op == "Conv":
        return _conv(x[0], x[1], x[2] if len(x) > 2 else None, attrs)
    if op == "Mul":
        return x[0] * x[1]
    if op == "Add":
        return x[0] + x[1]
    if op == "Relu":
        return np.maximum(x[0], 0.0)
    if op == "Clip":
        return np.clip(x[0], x[1] if len(x) > 1 else -np.inf, x[2] if len(x) > 2 else np.inf)
    if op == "GlobalAveragePool":
        return x[0].mean(axis=(2, 3), keepdims=True)
    if op == "Reshape":
        shape = [int(s) for s in x[1]]
        shape = [x[0].shape[k] if s == 0 else s for k, s in enumerate(shape)]
        if -1 not in shape and int(np.prod(shape)) != x[0].size and shape[0] == 1:
            shape[0] = x[0].shape[0]  # the file's batch is 1; this evaluates a batch
        return x[0].reshape(shape)
    if op == "Pad":
        if attrs.get("mode", b"constant") not in (b"constant", "constant"):
            raise NotImplementedError("Pad other than constant")
        pads, rank = [int(p) for p in x[1]], x[0].ndim
        return np.pad(x[0], [(pads[k], pads[k + rank]) for k in range(rank)])
    if op == "Transpose":
        return np.transpose(x[0], attrs["perm"])
    if op == "Squeeze":
        axes = attrs.get("axes") or ([int(v) for v in x[1]] if len(x) > 1 and x[1] is not None else None)
        return np.squeeze(x[0], axis=tuple(axes) if axes else None)
    if op == "Gemm":
        a = x[0].T if attrs.get("transA") else x[0]
        b = x[1].T if attrs.get("transB") else x[1]
        y = attrs.get("alpha", 1.0) * (a @ b)
        return y if len(x) < 3 or x[2] is None else y + attrs.get("beta", 1.0) * x[2]
    if op == "MatMul":
        return x[0] @ x[1]
    if op == "Sigmoid":
        return 1.0 / (1.0 + np.exp(-x[0]))
    if op == "Softmax":
        axis = attrs.get("axis", -1)
        e = np.exp(x[0] - x[0].max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)
    raise NotImplementedError(f"operator {op}")


def evaluate(
    model, images: np.ndarray, batch: int = 16, tensors: tuple[str, ...] = (), given: dict | None = None
) -> np.ndarray:
    """The graph's first output for ``images`` (the file's input layout), computed in float64. With ``tensors``:
    a tuple of that output and a list of those tensors' values, each over all images.

    ``given`` ({tensor name: its values over all images}, e.g. another runtime's int8 tensors) replaces each of those
    tensors once computed, so what follows is computed from them: ``tensors`` then reports, for a given tensor, the
    value this evaluation computed from the given inputs: a per-operator comparison that no earlier difference
    reaches."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    graph = proto.graph
    constants = {}
    for init in graph.initializer:
        value = numpy_helper.to_array(init)
        constants[init.name] = value.astype(np.float64) if value.dtype.kind == "f" else value
    plan = [(n.op_type, list(n.input), n.output[0], _attributes(n)) for n in graph.node]
    feed, result = graph.input[0].name, graph.output[0].name
    wanted = {name: k for k, name in enumerate(tensors)}
    given = given or {}
    outputs, kept = [], [[] for _ in tensors]
    for start in range(0, len(images), batch):
        env = dict(constants)
        env[feed] = np.asarray(images[start : start + batch], dtype=np.float64)
        for op, inputs, output, attrs in plan:
            env[output] = _node(op, [env[i] if i else None for i in inputs], attrs)
            if output in wanted:
                kept[wanted[output]].append(env[output])
            if output in given:
                env[output] = np.asarray(given[output][start : start + batch], dtype=np.float64)
        outputs.append(env[result])
    if tensors:
        return np.concatenate(outputs), [np.concatenate(v) for v in kept]
    return np.concatenate(outputs)


def evaluate_apart(model: bytes, images: np.ndarray) -> np.ndarray:
    """:func:`evaluate` in a fresh Python process. One benchmark process that had trained in TensorFlow before got
    float64 outputs 0.18 (mean |dp|) away from this evaluation of the same file and images (not reproduced); a
    process of its own keeps the reference apart from whatever state training leaves behind."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="edgetl-exact-") as tmp:
        work = Path(tmp)
        (work / "model.onnx").write_bytes(model)
        np.save(work / "images.npy", np.asarray(images, dtype=np.float32))
        subprocess.run([sys.executable, __file__, str(work)], check=True)
        return np.load(work / "out.npy")


if __name__ == "__main__":  # evaluate_apart's worker: DIR with model.onnx and images.npy -> out.npy
    import sys
    from pathlib import Path

    _work = Path(sys.argv[1])
    np.save(_work / "out.npy", evaluate((_work / "model.onnx").read_bytes(), np.load(_work / "images.npy")))
