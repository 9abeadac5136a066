"""Trace a functional Keras model into the IR (:mod:`edgetl.qat.ir`): nested models inlined, preprocessing and
BatchNorm as per-channel affines, ``TFOpLambda`` constant arithmetic as ``ADD_CONST`` / ``SCALE_CONST`` /
``AFFINE``, activations split into the ops the int8 files run (swish = sigmoid * x, hard-swish =
``(x + 3) -> relu6 -> * 1/6 -> * x``), every other layer copied as it is.

Which layer becomes which ops is one table, :data:`HANDLERS` (by exact class name) and :data:`HANDLERS_BY_TYPE`
(by class, subclasses included), looked up in that order; a layer in neither is copied.
"""

from __future__ import annotations

import numpy as np

from edgetl._tfenv import keras, tf
from edgetl.errors import ExportError
from edgetl.qat.ir import LINEAR_PRODUCERS, Op, OpKind
from edgetl.qat.layers import activation_name

_K = keras()
_TF = tf()

UNSUPPORTED_FIX = "use a backbone from edgetl's table (edgetl finetune --help lists them) or export without int8"


def _is_kt(v) -> bool:
    from tf_keras.src.engine.keras_tensor import KerasTensor

    return isinstance(v, KerasTensor)


def _const_value(v):
    if isinstance(v, (int, float, np.number)):
        return np.asarray(v, dtype=np.float32)
    if isinstance(v, np.ndarray):
        return v.astype(np.float32)
    if _TF.is_tensor(v) and not _is_kt(v):
        return np.asarray(v.numpy(), dtype=np.float32)
    return None


class Tracer:
    """Walks a model's nodes depth by depth; ``ops`` is the IR, ``shapes`` the Keras shape of each tensor id.
    Also the allocator of tensor ids (:meth:`tid`) and unique layer names (:meth:`uniq`) for the passes."""

    def __init__(self):
        self.ops: list[Op] = []
        self.shapes: dict[str, tuple] = {}
        self.n = 0
        self.names: set[str] = set()

    def tid(self) -> str:
        self.n += 1
        return f"t{self.n}"

    def uniq(self, name: str) -> str:
        base, i = name, 1
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def add(self, op: Op) -> str:
        op.name = self.uniq(op.name)
        self.ops.append(op)
        return op.out

    # ---- affine helper -------------------------------------------------------------------
    def affine(self, x, scale, offset, name, channels):
        scale = np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (channels,)).copy()
        offset = np.broadcast_to(np.asarray(offset, np.float32).reshape(-1), (channels,)).copy()
        return self.add(
            Op(OpKind.AFFINE, [x], self.tid(), name, params={"scale": scale, "offset": offset}, trainable=False)
        )

    # ---- activations ---------------------------------------------------------------------
    def activation(self, x, act: str, name: str, channels: int, trainable: bool):
        if act in ("linear", None):
            return x
        if act == "relu":
            return self.add(Op(OpKind.RELU, [x], self.tid(), name, params={"max_value": None}, trainable=trainable))
        if act == "relu6":
            return self.add(Op(OpKind.RELU, [x], self.tid(), name, params={"max_value": 6.0}, trainable=trainable))
        if act == "sigmoid":
            return self.add(Op(OpKind.SIGMOID, [x], self.tid(), name, trainable=trainable))
        if act in ("swish", "silu"):
            s = self.add(Op(OpKind.SIGMOID, [x], self.tid(), name + "_sigmoid", trainable=trainable))
            return self.add(Op(OpKind.MULTIPLY, [x, s], self.tid(), name, trainable=trainable))
        if act == "hard_swish":  # keras 'hard_silu'
            return self._hard_swish(x, name, trainable)
        if act == "softmax":
            return self.add(Op(OpKind.SOFTMAX, [x], self.tid(), name, trainable=trainable))
        raise ExportError(
            f"activation {act!r} (layer {name}) is not supported by edgetl QAT",
            "use relu, relu6, sigmoid, swish, hard_swish or softmax",
        )

    def _hard_swish(self, x, name, trainable):
        a = self.add(Op(OpKind.ADD_CONST, [x], self.tid(), name + "_add3", params={"value": 3.0}, trainable=trainable))
        r = self.add(Op(OpKind.RELU, [a], self.tid(), name + "_relu6", params={"max_value": 6.0}, trainable=trainable))
        s = self.add(
            Op(OpKind.SCALE_CONST, [r], self.tid(), name + "_div6", params={"value": 1.0 / 6.0}, trainable=trainable)
        )
        return self.add(Op(OpKind.MULTIPLY, [x, s], self.tid(), name, trainable=trainable))

    # ---- main walk -----------------------------------------------------------------------
    def trace(self, model, in_ids: list, inference: bool) -> list:
        if not getattr(model, "_is_graph_network", False):
            raise ExportError(
                f"model {model.name!r} is a subclassed model; QAT needs a functional graph",
                "build the classifier with the functional tf_keras API",
            )
        tmap: dict[int, str] = {}
        for kt, t in zip(model.inputs, in_ids):
            tmap[id(kt)] = t
            self.shapes.setdefault(t, tuple(kt.shape))
        for depth in sorted(model._nodes_by_depth.keys(), reverse=True):
            for node in model._nodes_by_depth[depth]:
                layer = node.layer
                if isinstance(layer, _K.layers.InputLayer) or node.is_input:
                    continue
                kins = _TF.nest.flatten(node.keras_inputs)
                ins = [tmap[id(k)] for k in kins]
                outs = _TF.nest.flatten(node.outputs)
                call_kw = node.call_kwargs or {}
                inner_inference = inference or (call_kw.get("training", None) is False)
                res = self.convert(layer, node, ins, inner_inference)
                if len(res) != len(outs):
                    raise ExportError(f"layer {layer.name} has an unexpected number of outputs", UNSUPPORTED_FIX)
                for k, r in zip(outs, res):
                    tmap[id(k)] = r
                    self.shapes.setdefault(r, tuple(k.shape))
        return [tmap[id(k)] for k in _TF.nest.flatten(model.outputs)]

    def convert(self, layer, node, ins, inference) -> list:
        """The IR tensor ids of ``layer``'s outputs, from the handler :func:`handler_for` picks."""
        return handler_for(layer)(self, layer, node, ins, inference)

    def copy_layer(self, layer, node, ins, config=None):
        args = node.call_args
        list_input = bool(args) and isinstance(args[0], (list, tuple))
        op = Op(
            OpKind.LAYER,
            ins,
            self.tid(),
            layer.name,
            layer=layer,
            list_input=list_input,
            trainable=layer.trainable,
            weights=[w.copy() for w in layer.get_weights()],
            config=config or layer.get_config(),
        )
        return self.add(op)


# --- one handler per layer class: (tracer, layer, node, input ids, inference) -> output ids --------------------


def _model(tr: Tracer, layer, node, ins, inference) -> list:
    return tr.trace(layer, ins, inference)


def _op_lambda(tr: Tracer, layer, node, ins, inference) -> list:
    fn = layer.get_config()["function"]
    args = list(node.call_args) + list((node.call_kwargs or {}).values())
    tensors = [a for a in args if _is_kt(a)]
    consts = [c for c in (_const_value(a) for a in args if not _is_kt(a)) if c is not None]
    if len(tensors) != 1 or len(consts) != 1 or len(ins) != 1:
        raise ExportError(
            f"TensorFlow op {fn!r} (layer {layer.name}) is not supported by edgetl QAT",
            "only tensor (+,-,*,/) constant arithmetic can be rewritten",
        )
    c = consts[0]
    x_first = _is_kt(args[0])
    ch = int(node.outputs.shape[-1])
    name = layer.name
    if fn in ("__operators__.add", "math.add", "__operators__.radd"):
        kind, val = "add", c
    elif fn in ("math.subtract", "__operators__.sub") and x_first:
        kind, val = "add", -c
    elif fn in ("math.multiply", "__operators__.mul", "__operators__.rmul"):
        kind, val = "mul", c
    elif fn in ("math.truediv", "math.divide", "__operators__.truediv") and x_first:
        kind, val = "mul", 1.0 / c
    else:
        raise ExportError(f"TensorFlow op {fn!r} (layer {name}) is not supported by edgetl QAT", UNSUPPORTED_FIX)
    if val.size == 1:
        v = float(val.reshape(()))
        if kind == "add":
            return [tr.add(Op(OpKind.ADD_CONST, ins, tr.tid(), name, params={"value": v}))]
        return [tr.add(Op(OpKind.SCALE_CONST, ins, tr.tid(), name, params={"value": v}))]
    if val.size != ch:
        raise ExportError(f"op {fn!r} (layer {name}) broadcasts a non per-channel constant", UNSUPPORTED_FIX)
    if kind == "add":
        return [tr.affine(ins[0], 1.0, val, name, ch)]
    return [tr.affine(ins[0], val, 0.0, name, ch)]


def _rescaling(tr: Tracer, layer, node, ins, inference) -> list:
    ch = int(layer.input_shape[-1]) if layer.input_shape else 3
    return [tr.affine(ins[0], layer.scale, layer.offset, layer.name, ch)]


def _normalization(tr: Tracer, layer, node, ins, inference) -> list:
    mean = np.asarray(layer.mean.numpy() if hasattr(layer.mean, "numpy") else layer.mean, np.float32)
    var = np.asarray(layer.variance.numpy() if hasattr(layer.variance, "numpy") else layer.variance, np.float32)
    if layer.invert:
        raise ExportError("Normalization(invert=True) is not supported by edgetl QAT", UNSUPPORTED_FIX)
    ch = int(node.outputs.shape[-1])
    std = np.maximum(np.sqrt(var), _K.backend.epsilon())
    return [tr.affine(ins[0], 1.0 / std, -mean / std, layer.name, ch)]


def _batch_norm(tr: Tracer, layer, node, ins, inference) -> list:
    ax = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
    if ax not in (-1, len(node.outputs.shape) - 1):
        raise ExportError("BatchNormalization on a non-channel axis is not supported", UNSUPPORTED_FIX)
    ch = int(node.outputs.shape[-1])
    gamma = layer.gamma.numpy() if layer.scale else np.ones(ch, np.float32)
    beta = layer.beta.numpy() if layer.center else np.zeros(ch, np.float32)
    s = gamma / np.sqrt(layer.moving_variance.numpy() + layer.epsilon)
    return [tr.affine(ins[0], s, beta - layer.moving_mean.numpy() * s, layer.name, ch)]


def _dropout(tr: Tracer, layer, node, ins, inference) -> list:
    if inference:
        return [ins[0]]  # called with training=False inside the base: identity, keep it that way
    return [tr.copy_layer(layer, node, ins)]


def _activation(tr: Tracer, layer, node, ins, inference) -> list:
    return [tr.activation(ins[0], activation_name(layer), layer.name, int(node.outputs.shape[-1]), layer.trainable)]


def _relu(tr: Tracer, layer, node, ins, inference) -> list:
    if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
        raise ExportError(f"ReLU {layer.name} with slope/threshold is not supported by edgetl QAT", UNSUPPORTED_FIX)
    mv = None if layer.max_value is None else float(layer.max_value)
    return [tr.add(Op(OpKind.RELU, ins, tr.tid(), layer.name, params={"max_value": mv}, trainable=layer.trainable))]


def _multiply(tr: Tracer, layer, node, ins, inference) -> list:
    return [tr.add(Op(OpKind.MULTIPLY, ins, tr.tid(), layer.name, trainable=layer.trainable))]


def _softmax(tr: Tracer, layer, node, ins, inference) -> list:
    return [tr.add(Op(OpKind.SOFTMAX, ins, tr.tid(), layer.name, trainable=layer.trainable))]


def _linear(tr: Tracer, layer, node, ins, inference) -> list:
    """Conv2D / DepthwiseConv2D / Dense: a fused activation is split out into its own ops."""
    if layer.get_config().get("activation", "linear") == "linear":
        return [tr.copy_layer(layer, node, ins)]
    cfg = layer.get_config()
    act = cfg["activation"]
    cfg["activation"] = "linear"
    y = tr.copy_layer(layer, node, ins, config=cfg)
    ch = int(node.outputs.shape[-1])
    return [tr.activation(y, act, layer.name + "_act", ch, layer.trainable)]


def _copy(tr: Tracer, layer, node, ins, inference) -> list:
    return [tr.copy_layer(layer, node, ins)]


#: Handlers by exact class name (a subclass, e.g. Conv2DTranspose, is not matched).
HANDLERS = {
    "TFOpLambda": _op_lambda,
    "Rescaling": _rescaling,
    "Normalization": _normalization,
    **{cls: _linear for cls in LINEAR_PRODUCERS},
}

#: Handlers by class, subclasses included (the nearest class in the layer's MRO wins).
HANDLERS_BY_TYPE = {
    _K.layers.BatchNormalization: _batch_norm,
    _K.layers.Dropout: _dropout,
    _K.layers.Activation: _activation,
    _K.layers.ReLU: _relu,
    _K.layers.Multiply: _multiply,
    _K.layers.Softmax: _softmax,
}


def handler_for(layer):
    """The handler of ``layer``: a nested model first, then by exact class name, then by class; else a copy."""
    if isinstance(layer, _K.Model):
        return _model
    by_name = HANDLERS.get(type(layer).__name__)
    if by_name is not None:
        return by_name
    for cls in type(layer).__mro__:
        if cls in HANDLERS_BY_TYPE:
            return HANDLERS_BY_TYPE[cls]
    return _copy
