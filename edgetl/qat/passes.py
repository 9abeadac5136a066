"""The rewrites between tracing and emitting, in the order :func:`edgetl.qat.flatten.flatten` runs them:

1. :func:`fold_affines`: BatchNorm / Rescaling / Normalization affines and constant add/scale go into the
   Conv/Depthwise/Dense before them (or into the affine before them).
2. :func:`fold_channel_permutation`: caffe-style RGB->BGR + mean (a 1x1 permutation conv on the input) goes into the
   first real conv.
3. :func:`float_stem` (stem ``"float"``): marks input preprocessing -> first conv -> its activation as float32.
4. :func:`push_scales`: the ``1/6`` of hard-swish goes into the kernels downstream.
5. :func:`space_to_depth_stem` (stem ``"space_to_depth"``): the 3x3/2 stem conv becomes SpaceToDepth + 2x2 conv.

Each takes and returns the op list (:mod:`edgetl.qat.ir`); all are exact in float (outputs unchanged to ~1e-7).
Pure numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edgetl.qat.ir import LINEAR_PRODUCERS, Op, OpKind, consumers, op_class

if TYPE_CHECKING:
    from edgetl.qat.trace import Tracer


def fold_affines(ops: list[Op], outputs: list[str]) -> list[Op]:
    """Fold affine / add_const ops into the linear layer that produces their input."""
    changed = True
    while changed:
        changed = False
        cons = consumers(ops)
        prod = {op.out: op for op in ops}
        for op in ops:
            if op.kind not in (OpKind.AFFINE, OpKind.ADD_CONST, OpKind.SCALE_CONST):
                continue
            p = prod.get(op.inputs[0])
            if p is None or len(cons.get(p.out, [])) != 1 or p.out in outputs:
                continue
            if op.kind is OpKind.SCALE_CONST and not (
                p.kind is OpKind.LAYER and type(p.layer).__name__ in LINEAR_PRODUCERS
            ):
                continue  # a lone ScaleConst (1/6 after ReLU6) stays: it is a quantization point
            if p.kind is OpKind.AFFINE and op.kind in (OpKind.AFFINE, OpKind.ADD_CONST):
                if op.kind is OpKind.AFFINE:
                    p.params["offset"] = p.params["offset"] * op.params["scale"] + op.params["offset"]
                    p.params["scale"] = p.params["scale"] * op.params["scale"]
                else:
                    p.params["offset"] = p.params["offset"] + op.params["value"]
            elif (
                p.kind is OpKind.LAYER
                and type(p.layer).__name__ in LINEAR_PRODUCERS
                and p.config.get("activation") == "linear"
            ):
                ch = int(
                    p.weights[0].shape[-1]
                    * (p.weights[0].shape[-2] if type(p.layer).__name__ == "DepthwiseConv2D" else 1)
                )
                if op.kind is OpKind.AFFINE:
                    scale, offset = op.params["scale"], op.params["offset"]
                elif op.kind is OpKind.ADD_CONST:
                    scale, offset = np.ones(ch, np.float32), np.full(ch, op.params["value"], np.float32)
                else:
                    scale, offset = np.full(ch, op.params["value"], np.float32), np.zeros(ch, np.float32)
                _fold_into(p, scale.astype(np.float64), offset.astype(np.float64))
            else:
                continue
            # rewire: consumers of op.out read p.out; p takes over op's output id
            p.out = op.out
            ops.remove(op)
            changed = True
            break
    return ops


_PASS_THROUGH = ("ZeroPadding2D", "Dropout", "Reshape", "GlobalAveragePooling2D", "Flatten", "AveragePooling2D")


def push_scales(ops: list[Op], outputs: list[str]) -> list[Op]:
    """Remove ``ScaleConst(k)`` (k > 0) by pushing the factor downstream into the kernels of the
    Conv/Depthwise/Dense layers that consume it, through linear zero-preserving layers (padding,
    pooling, reshape, dropout), ReLU and one side of Multiply. ``hard_swish = x * relu6(x+3) / 6``
    then becomes ``ADD(+3, RELU6) -> MUL`` in int8 (2 ops instead of 3) and the converter cannot
    re-fuse it into HARD_SWISH, which XNNPACK does not run in int8."""
    changed = True
    while changed:
        changed = False
        cons = consumers(ops)
        for s in ops:
            if s.kind is not OpKind.SCALE_CONST or s.params["value"] <= 0 or s.float_:
                continue  # in the float stem the 1/6 stays so that the converter fuses a float HARD_SWISH
            plan: list[Op] = []
            seen: set[int] = set()
            if not _plan_push(s.out, cons, outputs, plan, seen):
                continue
            k = s.params["value"]
            for c in plan:
                w = list(c.weights)
                w[0] = (np.asarray(w[0], np.float64) * k).astype(np.float32)
                c.weights = w
            for c in cons.get(s.out, []):
                c.inputs = [s.inputs[0] if t == s.out else t for t in c.inputs]
            ops.remove(s)
            changed = True
            break
    return ops


def _plan_push(t, cons, outputs, plan, seen) -> bool:
    if t in outputs:
        return False
    users = cons.get(t, [])
    if not users:
        return False
    for c in users:
        if id(c) in seen:
            return False
        seen.add(id(c))
        cls = op_class(c)
        if cls in LINEAR_PRODUCERS:
            if len(c.inputs) != 1:
                return False
            plan.append(c)
        elif cls in _PASS_THROUGH or (c.kind is OpKind.RELU and c.params["max_value"] is None):
            if not _plan_push(c.out, cons, outputs, plan, seen):
                return False
        elif c.kind is OpKind.MULTIPLY and c.inputs.count(t) == 1:
            if not _plan_push(c.out, cons, outputs, plan, seen):
                return False
        else:
            return False
    return True


def space_to_depth_stem(tr: Tracer, ops: list[Op], shapes: dict, outputs: list[str]) -> list[Op]:
    """Rewrite ``Conv2D(k=3, stride 2, 'same')`` on a <= 4-channel, even-sized input as
    ``SpaceToDepth(2) -> Conv2D(k=2, stride 1, 'same')`` (exact: the 3x3/2 taps map onto a 2x2
    kernel over 2x2 pixel blocks, the unused taps are zero, and the bottom/right zero padding lines up).
    A per-channel affine (input Rescaling) feeding only that conv moves behind the SpaceToDepth with its
    scale/offset tiled. In int8 XNNPACK the 3-channel stride-2 stem conv (+ the 3-channel 1x1 affine)
    cost 0.77 ms at 224 px vs 0.51 ms for this form (fp32 has a dedicated 3-channel kernel; int8 not).
    """
    cons = consumers(ops)
    prod = {op.out: op for op in ops}
    for conv in list(ops):
        if conv.kind is not OpKind.LAYER or type(conv.layer).__name__ != "Conv2D":
            continue
        cfg = conv.config
        if (
            tuple(cfg.get("kernel_size", ())) != (3, 3)
            or tuple(cfg.get("strides", ())) != (2, 2)
            or cfg.get("padding") != "same"
            or tuple(cfg.get("dilation_rate", (1, 1))) != (1, 1)
            or cfg.get("groups", 1) != 1
            or cfg.get("data_format", "channels_last") not in (None, "channels_last")
        ):
            continue
        shape = shapes.get(conv.inputs[0])
        if shape is None or len(shape) != 4 or None in shape[1:]:
            continue
        h, w, c = shape[1:]
        if h % 2 or w % 2 or c > 4:
            continue
        kernel = np.asarray(conv.weights[0], np.float32)
        k2 = np.zeros((2, 2, 4 * c, kernel.shape[-1]), np.float32)
        for dp in range(2):
            for dq in range(2):
                for a in range(2):
                    for b in range(2):
                        di, dj = 2 * dp + a, 2 * dq + b
                        if di < 3 and dj < 3:
                            k2[dp, dq, (2 * a + b) * c : (2 * a + b + 1) * c, :] = kernel[di, dj]
        src = conv.inputs[0]
        aff = prod.get(src)
        move_affine = (
            aff is not None and aff.kind is OpKind.AFFINE and len(cons.get(src, [])) == 1 and src not in outputs
        )
        s2d_in = aff.inputs[0] if move_affine else src
        s2d = Op(OpKind.S2D, [s2d_in], tr.tid(), tr.uniq(conv.name + "_space_to_depth"), trainable=False)
        idx = ops.index(aff if move_affine else conv)
        ops.insert(idx, s2d)
        if move_affine:
            aff.inputs = [s2d.out]
            aff.params["scale"] = np.tile(aff.params["scale"], 4)
            aff.params["offset"] = np.tile(aff.params["offset"], 4)
        else:
            conv.inputs = [s2d.out]
        conv.config = {**cfg, "kernel_size": (2, 2), "strides": (1, 1)}
        conv.weights = [k2] + list(conv.weights[1:])
    return ops


def _is_permutation(w) -> bool:
    w = np.asarray(w)
    return (
        w.ndim == 2
        and w.shape[0] == w.shape[1]
        and bool(np.all((w == 0) | (w == 1)))
        and bool(np.all(w.sum(0) == 1))
        and bool(np.all(w.sum(1) == 1))
    )


def fold_channel_permutation(ops: list[Op], in_ids: list[str], outputs: list[str]) -> list[Op]:
    """Fold a 1x1 channel-permutation Conv2D on the model input (caffe-style RGB->BGR + mean subtraction, the
    ``input_preprocess`` layer edgetl puts in front of ResNet50/VGG16) into the first real conv.

    ``y = P x + b`` with P a permutation is ``P (x + P^T b)``; zero padding commutes with a channel permutation, so
    ``conv_K(pad0(y)) == conv_K'(pad0(x + P^T b))`` with K' = K with its input channels permuted (exact: the kernel
    is only reordered). The permutation conv becomes a per-channel affine (scale 1, offset P^T b), which the float
    stem keeps in fp32 (one broadcast ADD) and int8 stems emit as a 1x1 depthwise conv; the 3-channel 7x7/3x3 stem
    conv stays the first conv, so the float stem (:func:`float_stem`) is the same as for the other backbones.
    """
    cons = consumers(ops)
    for op in list(ops):
        if op.kind is not OpKind.LAYER or type(op.layer).__name__ != "Conv2D" or op.inputs[0] not in in_ids:
            continue
        cfg = op.config
        kernel = np.asarray(op.weights[0])
        if (
            tuple(cfg.get("kernel_size", ())) != (1, 1)
            or tuple(cfg.get("strides", (1, 1))) != (1, 1)
            or cfg.get("groups", 1) != 1
            or cfg.get("activation", "linear") != "linear"
            or kernel.shape[:2] != (1, 1)
            or not _is_permutation(kernel[0, 0])
            or op.out in outputs
        ):
            continue
        # follow ZeroPadding2D (single consumers) to the conv that reads it
        t, path = op.out, []
        while True:
            users = cons.get(t, [])
            if len(users) != 1 or t in outputs:
                users = None
                break
            u = users[0]
            if u.kind is OpKind.LAYER and type(u.layer).__name__ == "ZeroPadding2D":
                path.append(u)
                t = u.out
                continue
            break
        if not users or u.kind is not OpKind.LAYER or type(u.layer).__name__ != "Conv2D" or len(u.inputs) != 1:
            continue
        perm = kernel[0, 0].astype(np.float64)  # [in, out]
        bias = (
            np.asarray(op.weights[1], np.float64)
            if cfg.get("use_bias", True) and len(op.weights) > 1
            else np.zeros(perm.shape[1])
        )
        k = np.asarray(u.weights[0], np.float64)
        u.weights = [np.einsum("ic,hwco->hwio", perm, k).astype(np.float32)] + list(u.weights[1:])
        offset = perm @ bias
        op.kind, op.layer, op.weights, op.config = OpKind.AFFINE, None, None, None
        op.params = {"scale": np.ones(perm.shape[0], np.float32), "offset": offset.astype(np.float32)}
        op.trainable = False
    return ops


_STEM_BEFORE = (OpKind.AFFINE, OpKind.ADD_CONST, OpKind.SCALE_CONST)
_STEM_AFTER = (OpKind.ADD_CONST, OpKind.SCALE_CONST, OpKind.RELU, OpKind.SIGMOID, OpKind.MULTIPLY)


def float_stem(ops: list[Op], in_ids: list[str], outputs: list[str]) -> list[Op]:
    """Mark the stem (input preprocessing -> first Conv2D -> its activation) as float.

    The stem conv reads the 3-channel full-resolution image: XNNPACK has a dedicated fp32 kernel for it, while its
    int8 form is 2-3x slower than fp32 (no fast int8 kernel for 3 or 12 input channels; docs/qat.md). Keeping
    these few ops float (the conv has ~0.1% of the weights) and quantizing right after the activation is what
    makes the int8 file faster than fp32. The first quantized tensor is the stem output. A ReLU/ReLU6 right after
    the stem conv becomes the conv's own activation (one float CONV_2D with a fused RELU6; a standalone int8 RELU6
    after a float conv would run outside XNNPACK).
    """
    tensors = set(in_ids)
    conv_seen = False
    for op in ops:
        if not op.inputs or not all(t in tensors for t in op.inputs):
            continue
        cls = op_class(op)
        if not conv_seen and cls == "Conv2D":
            conv_seen = True
        elif not (cls in _STEM_AFTER if conv_seen else (cls in _STEM_BEFORE or cls == "ZeroPadding2D")):
            continue
        op.float_ = True
        tensors.add(op.out)
    if not conv_seen:  # no conv stem: quantize everything
        for op in ops:
            op.float_ = False
        return ops
    cons = consumers(ops)
    for aff in list(ops):
        # input scaling right before the stem conv: y = s*x + o with one s and one o for all channels (MobileNetV3's
        # Rescaling). conv(pad0(s*x + o)) == conv_with_kernel*s(pad0(x + o/s)) exactly (zero padding commutes with
        # the scale), so the scale goes into the kernel and a scalar ADD is left (XNNPACK's broadcast of a
        # 3-element vector costs ~0.4 ms at 224 px, a scalar ADD 0.03 ms).
        if not (aff.float_ and aff.kind is OpKind.AFFINE):
            continue
        users = cons.get(aff.out, [])
        scale, offset = aff.params["scale"], aff.params["offset"]
        conv = users[0] if len(users) == 1 else None
        if (
            conv is None
            or conv.kind is not OpKind.LAYER
            or type(conv.layer).__name__ != "Conv2D"
            or aff.out in outputs
            or not np.all(scale == scale[0])
            or not np.all(offset == offset[0])
            or scale[0] == 0
        ):
            continue
        conv.weights = [(np.asarray(conv.weights[0], np.float64) * float(scale[0])).astype(np.float32)] + list(
            conv.weights[1:]
        )
        aff.kind, aff.params = OpKind.ADD_CONST, {"value": float(offset[0]) / float(scale[0])}
    for conv in ops:
        if conv.float_ and conv.kind is OpKind.LAYER and type(conv.layer).__name__ == "Conv2D":
            users = cons.get(conv.out, [])
            relu = users[0] if len(users) == 1 else None
            if (
                relu is not None
                and relu.kind is OpKind.RELU
                and relu.params["max_value"] in (None, 6.0)
                and conv.out not in outputs
                and conv.config.get("activation") == "linear"
            ):
                conv.config = {**conv.config, "activation": "relu" if relu.params["max_value"] is None else "relu6"}
                conv.out = relu.out
                ops.remove(relu)
            break
    return ops


def _fold_into(p: Op, scale, offset):
    cls = type(p.layer).__name__
    w = [np.asarray(a, np.float64) for a in p.weights]
    kernel = w[0]
    has_bias = p.config.get("use_bias", True) and len(w) > 1
    if cls == "DepthwiseConv2D":
        kh, kw, cin, mult = kernel.shape
        kernel = kernel * scale.reshape(cin, mult)
        ch = cin * mult
    else:
        kernel = kernel * scale
        ch = kernel.shape[-1]
    bias = w[1] if has_bias else np.zeros(ch)
    bias = bias * scale + offset
    p.config = dict(p.config)
    p.config["use_bias"] = True
    p.weights = [kernel.astype(np.float32), bias.astype(np.float32)]
