"""ONNX conversion (tf2onnx): fp32 (:func:`float_to_onnx`) and QDQ from a QAT model (:func:`qat_to_onnx`), with the
QDQ fix-ups: int8 weights behind DequantizeLinear (:func:`_quantize_weights`, on the QAT grid of
:data:`edgetl.qat.WEIGHT_LEVELS`) and quantized constants for Add/Mul (:func:`_qdq_constants`)."""

from __future__ import annotations

import numpy as np

from edgetl._tfenv import tf
from edgetl.convert._serving import concrete
from edgetl.errors import ConfigError

_TF = tf()


def _to_onnx(model, opset):
    import tf2onnx

    if not 13 <= int(opset) <= 17:
        raise ConfigError(f"ONNX opset {opset} is not supported", "use an opset between 13 and 17")
    spec = (_TF.TensorSpec([1] + list(model.inputs[0].shape[1:]), _TF.float32, name="image"),)
    fn, _ = concrete(model)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=int(opset))
    return proto.SerializeToString()


def float_to_onnx(model, opset: int = 13) -> bytes:
    """fp32 ONNX (batch 1, input ``image`` float32 0..255, output float32 probabilities)."""
    return _to_onnx(model, opset)


def qat_to_onnx(qat_model, opset: int = 13) -> bytes:
    """QDQ ONNX (QuantizeLinear/DequantizeLinear from the fake-quant ops); float32 in/out.

    Float constants feeding Add/Mul between quantized tensors (the ``+3`` of hard-swish, ...) get
    their own exact uint8 QuantizeLinear->DequantizeLinear pair so that onnxruntime can fuse the
    node into QLinearAdd/QLinearMul instead of running it in float between DQ/Q pairs.
    """
    import onnx

    proto = onnx.load_from_string(_to_onnx(qat_model, opset))
    _qdq_constants(proto)
    _quantize_weights(proto)
    return proto.SerializeToString()


def _quantize_weights(proto) -> int:
    """Store Conv/MatMul/Gemm weights as int8 with a DequantizeLinear in front.

    tf2onnx constant-folds the QAT weight quantizer, so the file would hold float weights that
    merely lie on the QAT grid (4x larger, and onnxruntime would have to re-derive scales). QAT
    quantizes weights symmetric (per output channel for conv, per tensor for Dense) on
    ``scale = max|w| / levels`` with levels 63 (7-bit: Conv2D, Dense) or 127 (depthwise), see
    :data:`WEIGHT_LEVELS`; the grid is recognised from the already rounded weights
    (:func:`_weight_levels`) and re-expressed exactly, so the int8 values reproduce the fake-quant
    model bit for bit. Only layers that read a quantized activation are touched.
    """
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    quantized: set[int] = set()  # nodes downstream of an activation QuantizeLinear
    todo = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    while todo:
        n = todo.pop()
        if id(n) in quantized:
            continue
        quantized.add(id(n))
        todo.extend(c for o in n.output for c in consumers.get(o, []))
    new_nodes, done = [], {}
    for n in g.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm") or len(n.input) < 2:
            continue
        if id(n) not in quantized:
            continue  # before the first quantized activation (the float stem conv): weights stay float, as in QAT
        name = n.input[1]
        if name not in inits:
            continue
        if name in done:
            n.input[1] = done[name]
            continue
        raw = numpy_helper.to_array(inits[name])
        if raw.dtype.kind != "f" or raw.size == 0:
            continue
        w = raw.astype(np.float64)
        if n.op_type == "Conv":  # OIHW, per output channel
            m = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
            shape = (-1, *([1] * (w.ndim - 1)))
            attrs = {"axis": 0}
        else:  # per tensor
            m = np.array(float(np.abs(w).max()))
            shape = ()
            attrs = {}
        levels = _weight_levels(w, m, shape)
        scale = np.where(m > 0, m / levels, 1.0)
        q = np.clip(np.round(w / scale.reshape(shape)), -levels, levels).astype(np.int8)
        zp = np.zeros(scale.shape, np.int8)
        base = f"{name}_edgetl_w"
        g.initializer.extend(
            [
                numpy_helper.from_array(q, base + "_q"),
                numpy_helper.from_array(scale.astype(np.float32), base + "_scale"),
                numpy_helper.from_array(zp, base + "_zp"),
            ]
        )
        new_nodes.append(
            helper.make_node(
                "DequantizeLinear", [base + "_q", base + "_scale", base + "_zp"], [base], name=base, **attrs
            )
        )
        n.input[1] = base
        done[name] = base
        if len(consumers.get(name, ())) == 1:
            g.initializer.remove(inits[name])
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return len(done)


def _weight_levels(w: np.ndarray, m: np.ndarray, shape) -> int:
    """63 when every weight lies on the 7-bit grid ``m*j/63`` of its channel (what QAT trained, WEIGHT_LEVELS), else
    127. Exact either way: a weight off the 7-bit grid is never written with 63 levels."""
    scale = np.where(m > 0, m / 63.0, 1.0).reshape(shape)
    j = w / scale
    return 63 if np.all(np.abs(j - np.round(j)) < 1e-3) else 127


def _qdq_constants(proto) -> int:
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    consts = {}
    for n in g.node:  # tf2onnx may emit constants as Constant nodes
        if n.op_type == "Constant" and n.attribute and n.attribute[0].t.dims is not None:
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    producer = {o: n for n in g.node for o in n.output}
    new_nodes, count, done = [], 0, set()
    for n in list(g.node):
        if n.op_type not in ("Add", "Mul") or len(n.input) != 2:
            continue
        srcs = [producer.get(i) for i in n.input]
        for k in range(2):
            other = srcs[1 - k]
            name = n.input[k]
            if other is None or other.op_type != "DequantizeLinear":
                continue
            if name in inits:
                c = numpy_helper.to_array(inits[name])
            elif name in consts:
                c = consts[name]
            else:
                continue
            if c.dtype != np.float32 or c.size > 4096:
                continue
            base = f"{name}_edgetl_q"
            if base in done:
                n.input[k] = base + "_dq"
                continue
            done.add(base)
            lo, hi = min(float(c.min()), 0.0), max(float(c.max()), 0.0)
            scale = (hi - lo) / 255.0 or 1.0
            zp = int(round(-lo / scale))
            q = np.clip(np.round(c / scale) + zp, 0, 255).astype(np.uint8)
            g.initializer.extend(
                [
                    numpy_helper.from_array(q, base + "_value"),
                    numpy_helper.from_array(np.array(scale, np.float32), base + "_scale"),
                    numpy_helper.from_array(np.array(zp, np.uint8), base + "_zp"),
                ]
            )
            new_nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [base + "_value", base + "_scale", base + "_zp"],
                    [base + "_dq"],
                    name=base + "_dq",
                )
            )
            n.input[k] = base + "_dq"
            count += 1
    # DequantizeLinear nodes only read initializers: put them first to keep topological order
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return count
