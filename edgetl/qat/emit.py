"""Emit the op list (:mod:`edgetl.qat.ir`) as a flat functional Keras model, plus the :class:`Plan` that
annotation (:mod:`edgetl.qat.scheme`) reads: which layers belong to the float stem, which one ends it, which
conv has a fused ReLU after it and what consumes each layer. TensorFlow, no tfmot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgetl._tfenv import keras
from edgetl.qat.ir import LINEAR_PRODUCERS, Op, OpKind, consumers
from edgetl.qat.layers import AddConst, ChannelAffine, FusedReLU, ScaleConst, SpaceToDepth

_K = keras()


@dataclass(frozen=True)
class LayerPlan:
    """What annotation needs to know about one emitted layer."""

    next: tuple[str, ...] = ()  # what reads its output: op kind values ("relu", ...) or Keras class names
    float_: bool = False  # part of the float stem: stays float32 in the int8 files
    stem_out: bool = False  # a last float op: its output is the first quantized tensor
    relu_after: bool = False  # a Conv/Depthwise/Dense whose ReLU is a FusedReLU (it quantizes the fused output)


@dataclass
class Plan:
    """:class:`LayerPlan` by layer name of the flat model (layer names are unique in a Keras model)."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)

    def of(self, layer) -> LayerPlan:
        return self.layers.get(layer.name, LayerPlan())


def _fused_relu_source(op: Op, prod: dict[str, Op], cons: dict[str, list[Op]]) -> Op | None:
    """The Conv/Depthwise/Dense a quantized ReLU op fuses into (the ReLU is its only consumer), else None."""
    src = prod.get(op.inputs[0])
    fused = (
        src is not None
        and not op.float_
        and src.kind is OpKind.LAYER
        and type(src.layer).__name__ in LINEAR_PRODUCERS
        and src.config.get("activation", "linear") == "linear"
        and len(cons.get(src.out, [])) == 1
    )
    return src if fused else None


def _emit_op(op: Op, xs: list, fused: bool):
    """The Keras layer for ``op`` and its output on ``xs``."""
    L = _K.layers
    if op.kind is OpKind.LAYER:
        cfg = dict(op.config)
        cfg["name"] = op.name
        new = type(op.layer).from_config(cfg)
        y = new(xs if op.list_input else xs[0])
        new.set_weights(op.weights)
    elif op.kind is OpKind.AFFINE and len(xs[0].shape) == 4 and not op.float_:
        # per-channel affine on NHWC == 1x1 depthwise conv: tfmot quantizes it per channel and
        # the converter emits one int8 DEPTHWISE_CONV_2D that XNNPACK runs (a MUL+ADD pair with
        # constant vectors stays float with DEQUANTIZE/QUANTIZE around it).
        ch = len(op.params["scale"])
        new = L.DepthwiseConv2D(1, use_bias=True, name=op.name)
        y = new(xs[0])
        new.set_weights([op.params["scale"].reshape(1, 1, ch, 1), op.params["offset"]])
    elif op.kind is OpKind.AFFINE:
        new = ChannelAffine(channels=len(op.params["scale"]), name=op.name)
        y = new(xs[0])
        new.set_weights([op.params["scale"], op.params["offset"]])
    elif op.kind is OpKind.ADD_CONST:
        new = AddConst(op.params["value"], name=op.name)
        y = new(xs[0])
    elif op.kind is OpKind.SCALE_CONST:
        new = ScaleConst(op.params["value"], name=op.name)
        y = new(xs[0])
    elif op.kind is OpKind.RELU:
        new = (FusedReLU if fused else L.ReLU)(max_value=op.params["max_value"], name=op.name)
        y = new(xs[0])
    elif op.kind is OpKind.SIGMOID:
        new = L.Activation("sigmoid", name=op.name)
        y = new(xs[0])
    elif op.kind is OpKind.SOFTMAX:
        new = L.Activation("softmax", name=op.name)
        y = new(xs[0])
    elif op.kind is OpKind.MULTIPLY:
        new = L.Multiply(name=op.name)
        y = new(xs)
    elif op.kind is OpKind.S2D:
        new = SpaceToDepth(2, name=op.name)
        y = new(xs[0])
    else:  # pragma: no cover - internal
        raise AssertionError(op.kind)
    return new, y


def emit(ops: list[Op], model_inputs, in_ids, out_ids, name) -> tuple[Any, Plan]:
    """The flat Keras model of ``ops`` (inputs ``model_inputs`` for ``in_ids``, outputs ``out_ids``) and its plan."""
    tmap = dict(zip(in_ids, model_inputs))
    cons = consumers(ops)
    prod = {op.out: op for op in ops}
    relu_after: set[int] = set()  # ids of the ops a FusedReLU follows
    emitted: list[tuple[Op, Any]] = []
    for op in ops:
        xs = [tmap[t] for t in op.inputs]
        src = _fused_relu_source(op, prod, cons) if op.kind is OpKind.RELU else None
        if src is not None:
            relu_after.add(id(src))
        new, y = _emit_op(op, xs, fused=src is not None)
        new.trainable = op.trainable
        emitted.append((op, new))
        tmap[op.out] = y
    plan = Plan()
    for op, new in emitted:
        plan.layers[new.name] = LayerPlan(
            next=tuple(
                c.kind.value if c.kind is not OpKind.LAYER else type(c.layer).__name__ for c in cons.get(op.out, [])
            ),
            float_=op.float_,
            # the last float op(s): their output is the first quantized tensor
            stem_out=op.float_ and (op.out in out_ids or any(not c.float_ for c in cons.get(op.out, []))),
            relu_after=id(op) in relu_after,
        )
    outs = [tmap[t] for t in out_ids]
    return _K.Model(model_inputs, outs if len(outs) > 1 else outs[0], name=name), plan
