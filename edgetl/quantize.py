"""Quantization-aware training (QAT) for the stock ``tf_keras.applications`` classifiers.

Stock ``tfmot.quantization.keras.quantize_model`` refuses MobileNetV3 (``TFOpLambda`` ``x + 3`` and
``* 1/6`` inside hard-sigmoid / hard-swish), EfficientNet (``Rescaling``, ``Normalization``, swish,
squeeze-excite ``Multiply``) and any model nested inside another. This module:

1. :func:`flatten_for_qat` rewrites the float model into one flat functional graph made only of
   layers tfmot can annotate: nested models are inlined, BatchNorm is folded into the preceding
   convolution (so it is in inference mode by construction), ``TFOpLambda`` arithmetic becomes
   :class:`AddConst` / :class:`ScaleConst` / :class:`ChannelAffine` layers, swish becomes
   ``sigmoid`` + ``Multiply`` and fused conv activations are split out. Float outputs are
   unchanged (max abs diff ~1e-7).
2. :func:`quantize_for_training` annotates that graph (edgetl's per-channel weight config for
   Conv/Depthwise on the converter's exact grid, ``FusedReLU`` after them so that tfmot's
   ``LayerReLUQuantize`` cannot drop their weight quantization, tfmot defaults for Dense/ReLU/Add/
   pooling, edgetl QuantizeConfigs for the rest) and calls ``quantize_apply``.
3. :func:`calibrate` sets every activation range from data (tfmot's moving averages start at
   +-6 with EMA 0.999 and barely move in a short fine-tune).
4. :func:`qat_to_tflite_int8` / :func:`qat_to_onnx` convert. Every quantized tensor carries a
   fake-quant range, so the converter never has to guess statistics. Hard-swish is expressed as
   ``ADD(+3, fused RELU6) -> MUL`` with its ``1/6`` pushed into the next conv's kernel, the SE
   hard-sigmoid as ``CONV(bias+3, fused RELU6) -> MUL(1/6)``: every int8 op is one XNNPACK runs
   in int8 (the converter's fused ``HARD_SWISH``, ``MINIMUM`` and standalone ``RELU``/``RELU6``
   are not, and split the graph into ~20 partitions). The *stem* (input scaling, the 3-channel
   first conv and its activation) stays float32: XNNPACK has a fast fp32 kernel for it and no
   fast int8 one. The int8 TFLite file is a single XNNPACK partition. See ``docs/qat.md``.

Type choices of the int8 TFLite files: input ``uint8`` NHWC RGB 0..255 by default (scale 1, zero
point 0: the raw pixel bytes, then one DEQUANTIZE into the float stem), ``"int8"`` (pixel - 128)
or ``"float32"``; output ``float32`` probabilities (float SOFTMAX on the dequantized logits).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgetl import tflite_fb
from edgetl._tfenv import keras, tf
from edgetl.errors import ConfigError, ExportError, ModelFileError

__all__ = [
    "AddConst",
    "ScaleConst",
    "ChannelAffine",
    "SpaceToDepth",
    "flatten_for_qat",
    "quantize_for_training",
    "calibrate",
    "custom_objects",
    "save_qat_model",
    "load_qat_model",
    "qat_to_tflite_int8",
    "ptq_to_tflite_int8",
    "qat_to_onnx",
    "float_to_tflite",
    "float_to_onnx",
    "INPUT_RANGE",
    "WEIGHT_LEVELS",
]

_UNSUPPORTED_FIX = "use a backbone from edgetl's table (edgetl finetune --help lists them) or export without int8"

#: The value range of the model input (RGB pixels); the int8 input is quantized with exactly it.
INPUT_RANGE = (0.0, 255.0)

#: Symmetric weight grid per layer type: weights are int8 in -levels..levels. Conv2D (pointwise/regular) and Dense
#: use **7-bit** weights (-63..63): onnxruntime's x86 u8 x s8 kernels on CPUs without VNNI (AVX2, AVX-512 without
#: VNNI) add pairs of u8*s8 products in int16 with saturation (vpmaddubsw); 255*(|w0|+|w1|) > 32767 needs
#: |w0|+|w1| > 128, which 7-bit weights can never reach, so every x86 and ARM core computes the same exact int32
#: sums (measured: ORT_ENABLE_ALL moved from agreement 0.933 / mean |dp| 0.021 to the BASIC level 0.963 / 0.017 on
#: an AVX2 EPYC; docs/qat.md). Depthwise convs keep 8 bits (onnxruntime's depthwise kernel does not saturate:
#: measured). QAT trains on exactly this grid, and both exporters write it exactly (scale max|w|/63).
WEIGHT_LEVELS = {"Conv2D": 63, "Dense": 63, "DepthwiseConv2D": 127}

_K = keras()
_TF = tf()


# --------------------------------------------------------------------------------------------
# Serializable layers that replace TFOpLambda / preprocessing arithmetic
# --------------------------------------------------------------------------------------------


@_K.utils.register_keras_serializable(package="edgetl")
class AddConst(_K.layers.Layer):
    """``y = x + value`` for a scalar constant (the ``x + 3`` of hard-sigmoid)."""

    def __init__(self, value: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.value = float(value)

    def call(self, inputs):
        return inputs + _TF.constant(self.value, dtype=inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "value": self.value}


@_K.utils.register_keras_serializable(package="edgetl")
class ScaleConst(_K.layers.Layer):
    """``y = x * value`` for a scalar constant (the ``* 1/6`` of hard-sigmoid)."""

    def __init__(self, value: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.value = float(value)

    def call(self, inputs):
        return inputs * _TF.constant(self.value, dtype=inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "value": self.value}


@_K.utils.register_keras_serializable(package="edgetl")
class SpaceToDepth(_K.layers.Layer):
    """``tf.nn.space_to_depth`` (NHWC): used to turn the 3-channel stride-2 stem conv into a
    12-channel stride-1 2x2 conv, which XNNPACK runs much faster in int8."""

    def __init__(self, block_size: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.block_size = int(block_size)

    def call(self, inputs):
        return _TF.nn.space_to_depth(inputs, self.block_size)

    def compute_output_shape(self, input_shape):
        b = self.block_size
        n, h, w, c = input_shape
        return (n, None if h is None else h // b, None if w is None else w // b, None if c is None else c * b * b)

    def get_config(self):
        return {**super().get_config(), "block_size": self.block_size}


@_K.utils.register_keras_serializable(package="edgetl")
class FusedReLU(_K.layers.ReLU):
    """A ReLU/ReLU6 right after a Conv2D/DepthwiseConv2D/Dense (the converter fuses them into one int8 op).

    Its own class name keeps tfmot's ``LayerReLUQuantize`` transform away: that transform matches ``ReLU`` after a
    ``Conv2D|DepthwiseConv2D|Dense`` and replaces the *conv's* QuantizeConfig with a no-op, so the conv's weights
    were not fake-quantized during QAT (20 of 40 convs and 3 of 11 depthwise convs in MobileNetV3Small) while the
    converter quantizes them anyway: the fake-quant model then overstated int8 accuracy."""


@_K.utils.register_keras_serializable(package="edgetl")
class ChannelAffine(_K.layers.Layer):
    """``y = x * scale + offset`` per channel (last axis); frozen Rescaling/Normalization/BN."""

    def __init__(self, channels: int = 1, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.channels = int(channels)

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(self.channels,), initializer="ones", trainable=False
        )
        self.offset = self.add_weight(
            name="offset", shape=(self.channels,), initializer="zeros", trainable=False
        )
        super().build(input_shape)

    def call(self, inputs):
        return inputs * self.scale + self.offset

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


# --------------------------------------------------------------------------------------------
# QuantizeConfigs
# --------------------------------------------------------------------------------------------

_tfmot_cache: dict[str, Any] = {}


def _tfmot():
    if "m" not in _tfmot_cache:
        tf()  # environment first
        import tensorflow_model_optimization as tfmot

        _tfmot_cache["m"] = tfmot
    return _tfmot_cache["m"]


def _QuantizeLayer():
    _tfmot()
    from tensorflow_model_optimization.python.core.quantization.keras.quantize_layer import QuantizeLayer

    return QuantizeLayer


def _make_configs():
    if "configs" in _tfmot_cache:
        return _tfmot_cache["configs"]
    tfmot = _tfmot()
    QuantizeConfig = tfmot.quantization.keras.QuantizeConfig
    MovingAverageQuantizer = tfmot.quantization.keras.quantizers.MovingAverageQuantizer

    class OutputQuantizeConfig(QuantizeConfig):
        """No weights to quantize; fake-quantize the layer output (asymmetric, per tensor).

        Used for Multiply, ScaleConst, ChannelAffine, Activation(sigmoid), the float stem output and AddConst when
        it is not followed by a ReLU: each of these is its own int8 op in TFLite, so its output is
        a quantization point whose range the converter must know.
        """

        def get_weights_and_quantizers(self, layer):
            return []

        def get_activations_and_quantizers(self, layer):
            return []

        def set_quantize_weights(self, layer, quantize_weights):
            pass

        def set_quantize_activations(self, layer, quantize_activations):
            pass

        def get_output_quantizers(self, layer):
            return [MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False, narrow_range=False)]

        def get_config(self):
            return {}

    class NoOpQuantizeConfig(OutputQuantizeConfig):
        """Nothing is quantized: used for AddConst feeding a ReLU (the converter fuses ADD+RELU6 into
        one int8 ADD whose output range is the ReLU's) and for range-preserving layers."""

        def get_output_quantizers(self, layer):
            return []

    LastValueQuantizer = tfmot.quantization.keras.quantizers.LastValueQuantizer

    class AffineQuantizeConfig(OutputQuantizeConfig):
        """ChannelAffine: per-tensor symmetric int8 scale and offset (so the converter emits int8
        MUL/ADD with constant operands instead of a float island with DEQUANTIZE/QUANTIZE around it),
        output fake-quantized."""

        def get_weights_and_quantizers(self, layer):
            q = lambda: LastValueQuantizer(num_bits=8, per_axis=False, symmetric=True, narrow_range=True)  # noqa: E731
            return [(layer.scale, q()), (layer.offset, q())]

        def set_quantize_weights(self, layer, quantize_weights):
            layer.scale, layer.offset = quantize_weights

    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_registry as registry,
    )

    class ChannelWeightsQuantizer(tfmot.quantization.keras.quantizers.Quantizer):
        """Per-output-channel symmetric int8 (narrow range) weight quantization on the int8 file's grid
        (scale max|w_c|/127; for a depthwise kernel (kh, kw, cin, mult) the channels are cin*mult).

        Plain arithmetic with a straight-through gradient, not a FakeQuant op: the converter folds the on-grid
        kernel and quantizes it per channel itself, which reproduces these int8 values exactly (checked). Two
        things went wrong with tfmot's FakeQuant weight quantizer: for a depthwise kernel with mult 1 it has one
        range for the whole kernel (the int8 file has one per channel), and an all-zero output channel (the
        shared MobileNetV3 weights have dead squeeze-excite units) gets the range [0, 0], from which the converter
        makes a weight scale of 4e-9 and an int32 bias that saturates (gate 0.47 instead of 6.0 on flowers)."""

        def __init__(self, depthwise: bool = False, levels: int = 127, per_tensor: bool = False):
            self.depthwise = bool(depthwise)
            self.levels = int(levels)  # 127: int8 -127..127; 63: 7-bit weights -63..63 (WEIGHT_LEVELS)
            self.per_tensor = bool(per_tensor)

        def _channels(self, shape) -> int:
            if self.per_tensor:
                return 1
            return int(shape[2]) * int(shape[3]) if self.depthwise else int(shape[-1])

        def build(self, tensor_shape, name, layer):
            n = self._channels(tensor_shape)
            init = _K.initializers.Constant
            lo = layer.add_weight(name + "_min", shape=(n,), initializer=init(-6.0), trainable=False)
            hi = layer.add_weight(name + "_max", shape=(n,), initializer=init(6.0), trainable=False)
            return {"min_var": lo, "max_var": hi}

        def __call__(self, inputs, training, weights, **kwargs):
            flat = _TF.reshape(inputs, (-1, self._channels(inputs.shape)))
            # always from the current kernel (also in inference): after the last optimizer step the stored range is
            # one step old, and both exporters anchor the grid at the kernel's max (else they re-round it)
            m = _TF.reduce_max(_TF.abs(flat), axis=0)
            if training:
                weights["max_var"].assign(m)
                weights["min_var"].assign(-m)
            n = float(self.levels)
            scale = _TF.where(m > 0, m / n, _TF.ones_like(m))
            q = _TF.clip_by_value(_TF.round(flat / scale), -n, n) * scale
            return _TF.reshape(flat + _TF.stop_gradient(q - flat), inputs.shape)

        def get_config(self):
            return {"depthwise": self.depthwise, "levels": self.levels, "per_tensor": self.per_tensor}

        def __eq__(self, other):
            return isinstance(other, ChannelWeightsQuantizer) and other.get_config() == self.get_config()

        def __ne__(self, other):
            return not self.__eq__(other)

    class ChannelQuantizeConfig(registry.Default8BitQuantizeConfig):
        """tfmot's Conv2D/DepthwiseConv2D/Dense config with :class:`ChannelWeightsQuantizer` for the kernel.

        ``weight_levels`` 127 (int8) or 63 (7-bit, see :data:`WEIGHT_LEVELS`); QAT models saved before it existed
        load as 127. ``per_tensor``: one scale for the whole kernel (Dense: the converter's FULLY_CONNECTED grid)."""

        def __init__(self, weight_attrs, activation_attrs, quantize_output, weight_levels=127, per_tensor=False):
            super().__init__(weight_attrs, activation_attrs, quantize_output)
            self.weight_levels = int(weight_levels)
            self.per_tensor = bool(per_tensor)
            self.weight_quantizer = ChannelWeightsQuantizer(
                depthwise=list(weight_attrs) == ["depthwise_kernel"], levels=self.weight_levels, per_tensor=self.per_tensor
            )

        def get_config(self):
            return {**super().get_config(), "weight_levels": self.weight_levels, "per_tensor": self.per_tensor}

    QuantizeWrapperV2 = tfmot.quantization.keras.QuantizeWrapperV2

    class QATWrapper(QuantizeWrapperV2):
        """QuantizeWrapperV2 that honours ``trainable=False``.

        tfmot's wrapper always lists the quantized kernel among its trainable weights, so a frozen
        conv would still be updated by the optimizer. Same config/weights as QuantizeWrapperV2."""

        @property
        def trainable_weights(self):
            if not self.trainable:
                return []
            return super().trainable_weights

        @property
        def non_trainable_weights(self):
            if self.trainable:
                return super().non_trainable_weights
            return self._dedup_weights(
                self._trainable_weights + self.layer.trainable_weights + self.layer.non_trainable_weights
                + self._non_trainable_weights
            )

    for cls in (OutputQuantizeConfig, NoOpQuantizeConfig, AffineQuantizeConfig, QATWrapper, ChannelWeightsQuantizer,
                ChannelQuantizeConfig):
        cls.__module__ = __name__
        _K.utils.register_keras_serializable(package="edgetl")(cls)
    _tfmot_cache["weight_configs"] = {
        "Conv2D": lambda acts: ChannelQuantizeConfig(["kernel"], acts, False, WEIGHT_LEVELS["Conv2D"]),
        "DepthwiseConv2D": lambda acts: ChannelQuantizeConfig(["depthwise_kernel"], acts, False,
                                                              WEIGHT_LEVELS["DepthwiseConv2D"]),
        "Dense": lambda acts: ChannelQuantizeConfig(["kernel"], acts, False, WEIGHT_LEVELS["Dense"], per_tensor=True),
    }
    _tfmot_cache["extra_objects"] = {
        "ChannelWeightsQuantizer": ChannelWeightsQuantizer,
        "edgetl>ChannelWeightsQuantizer": ChannelWeightsQuantizer,
        "ChannelQuantizeConfig": ChannelQuantizeConfig,
        "edgetl>ChannelQuantizeConfig": ChannelQuantizeConfig,
        "Default8BitConvQuantizeConfig": registry.Default8BitConvQuantizeConfig,
        "Default8BitQuantizeConfig": registry.Default8BitQuantizeConfig,
    }
    _tfmot_cache["configs"] = (OutputQuantizeConfig, NoOpQuantizeConfig, AffineQuantizeConfig)
    _tfmot_cache["wrapper"] = QATWrapper
    return _tfmot_cache["configs"]


def custom_objects() -> dict:
    """Every class needed to deserialize a QAT model (edgetl layers/configs + tfmot wrappers)."""
    tfmot = _tfmot()
    out_cfg, noop_cfg, aff_cfg = _make_configs()
    from tensorflow_model_optimization.python.core.quantization.keras import quantize as _q

    scope = _q.quantize_scope()
    objs = {}
    for d in scope.custom_objects if hasattr(scope, "custom_objects") else []:
        objs.update(d)
    objs.update(
        {
            "AddConst": AddConst,
            "ScaleConst": ScaleConst,
            "ChannelAffine": ChannelAffine,
            "SpaceToDepth": SpaceToDepth,
            "FusedReLU": FusedReLU,
            "edgetl>FusedReLU": FusedReLU,
            "edgetl>SpaceToDepth": SpaceToDepth,
            "edgetl>AddConst": AddConst,
            "edgetl>ScaleConst": ScaleConst,
            "edgetl>ChannelAffine": ChannelAffine,
            "OutputQuantizeConfig": out_cfg,
            "NoOpQuantizeConfig": noop_cfg,
            "edgetl>OutputQuantizeConfig": out_cfg,
            "edgetl>NoOpQuantizeConfig": noop_cfg,
            "AffineQuantizeConfig": aff_cfg,
            "edgetl>AffineQuantizeConfig": aff_cfg,
            "QATWrapper": _tfmot_cache["wrapper"],
            "edgetl>QATWrapper": _tfmot_cache["wrapper"],
            **_tfmot_cache["extra_objects"],
        }
    )
    # tfmot public objects (explicit, in case quantize_scope changes what it exposes)
    objs.update(
        {
            "QuantizeWrapper": tfmot.quantization.keras.QuantizeWrapper,
            "QuantizeWrapperV2": tfmot.quantization.keras.QuantizeWrapperV2,
            "QuantizeLayer": _QuantizeLayer(),
            "MovingAverageQuantizer": tfmot.quantization.keras.quantizers.MovingAverageQuantizer,
            "LastValueQuantizer": tfmot.quantization.keras.quantizers.LastValueQuantizer,
            "AllValuesQuantizer": tfmot.quantization.keras.quantizers.AllValuesQuantizer,
        }
    )
    return objs


# --------------------------------------------------------------------------------------------
# Graph flattening / rewriting
# --------------------------------------------------------------------------------------------


@dataclass
class _Op:
    kind: str  # layer | add_const | scale_const | affine | relu | sigmoid | multiply
    inputs: list  # tensor ids (str)
    out: str
    name: str
    layer: Any = None  # original layer (kind == "layer")
    list_input: bool = False
    trainable: bool = True
    params: dict = field(default_factory=dict)
    float_: bool = False  # part of the float stem (stays float32 in the int8 files)
    weights: list | None = None  # float weights for the new layer (kind == "layer")
    config: dict | None = None


_LINEAR_PRODUCERS = ("Conv2D", "DepthwiseConv2D", "Dense")


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


class _Tracer:
    def __init__(self):
        self.ops: list[_Op] = []
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

    def add(self, op: _Op) -> str:
        op.name = self.uniq(op.name)
        self.ops.append(op)
        return op.out

    # ---- affine helper -------------------------------------------------------------------
    def affine(self, x, scale, offset, name, channels):
        scale = np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (channels,)).copy()
        offset = np.broadcast_to(np.asarray(offset, np.float32).reshape(-1), (channels,)).copy()
        return self.add(_Op("affine", [x], self.tid(), name, params={"scale": scale, "offset": offset}, trainable=False))

    # ---- activations ---------------------------------------------------------------------
    def activation(self, x, act: str, name: str, channels: int, trainable: bool):
        if act in ("linear", None):
            return x
        if act == "relu":
            return self.add(_Op("relu", [x], self.tid(), name, params={"max_value": None}, trainable=trainable))
        if act == "relu6":
            return self.add(_Op("relu", [x], self.tid(), name, params={"max_value": 6.0}, trainable=trainable))
        if act == "sigmoid":
            return self.add(_Op("sigmoid", [x], self.tid(), name, trainable=trainable))
        if act in ("swish", "silu"):
            s = self.add(_Op("sigmoid", [x], self.tid(), name + "_sigmoid", trainable=trainable))
            return self.add(_Op("multiply", [x, s], self.tid(), name, trainable=trainable))
        if act == "hard_swish":  # keras 'hard_silu'
            return self._hard_swish(x, name, trainable)
        if act == "softmax":
            return self.add(_Op("softmax", [x], self.tid(), name, trainable=trainable))
        raise ExportError(
            f"activation {act!r} (layer {name}) is not supported by edgetl QAT",
            "use relu, relu6, sigmoid, swish, hard_swish or softmax",
        )

    def _hard_swish(self, x, name, trainable):
        a = self.add(_Op("add_const", [x], self.tid(), name + "_add3", params={"value": 3.0}, trainable=trainable))
        r = self.add(_Op("relu", [a], self.tid(), name + "_relu6", params={"max_value": 6.0}, trainable=trainable))
        s = self.add(_Op("scale_const", [r], self.tid(), name + "_div6", params={"value": 1.0 / 6.0}, trainable=trainable))
        return self.add(_Op("multiply", [x, s], self.tid(), name, trainable=trainable))

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
                    raise ExportError(f"layer {layer.name} has an unexpected number of outputs", _UNSUPPORTED_FIX)
                for k, r in zip(outs, res):
                    tmap[id(k)] = r
                    self.shapes.setdefault(r, tuple(k.shape))
        return [tmap[id(k)] for k in _TF.nest.flatten(model.outputs)]

    def convert(self, layer, node, ins, inference) -> list:
        L = _K.layers
        cls = type(layer).__name__
        tr = layer.trainable
        if isinstance(layer, _K.Model):
            return self.trace(layer, ins, inference)
        if cls == "TFOpLambda":
            return [self._op_lambda(layer, node, ins)]
        if cls == "Rescaling":
            ch = int(layer.input_shape[-1]) if layer.input_shape else 3
            return [self.affine(ins[0], layer.scale, layer.offset, layer.name, ch)]
        if cls == "Normalization":
            mean = np.asarray(layer.mean.numpy() if hasattr(layer.mean, "numpy") else layer.mean, np.float32)
            var = np.asarray(layer.variance.numpy() if hasattr(layer.variance, "numpy") else layer.variance, np.float32)
            if layer.invert:
                raise ExportError("Normalization(invert=True) is not supported by edgetl QAT", _UNSUPPORTED_FIX)
            ch = int(node.outputs.shape[-1])
            std = np.maximum(np.sqrt(var), _K.backend.epsilon())
            return [self.affine(ins[0], 1.0 / std, -mean / std, layer.name, ch)]
        if isinstance(layer, L.BatchNormalization):
            ax = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
            if ax not in (-1, len(node.outputs.shape) - 1):
                raise ExportError("BatchNormalization on a non-channel axis is not supported", _UNSUPPORTED_FIX)
            ch = int(node.outputs.shape[-1])
            gamma = layer.gamma.numpy() if layer.scale else np.ones(ch, np.float32)
            beta = layer.beta.numpy() if layer.center else np.zeros(ch, np.float32)
            s = gamma / np.sqrt(layer.moving_variance.numpy() + layer.epsilon)
            return [self.affine(ins[0], s, beta - layer.moving_mean.numpy() * s, layer.name, ch)]
        if isinstance(layer, L.Dropout) and inference:
            return [ins[0]]  # called with training=False inside the base: identity, keep it that way
        if isinstance(layer, L.Activation):
            return [self.activation(ins[0], _activation_name(layer), layer.name, int(node.outputs.shape[-1]), tr)]
        if isinstance(layer, L.ReLU):
            if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
                raise ExportError(f"ReLU {layer.name} with slope/threshold is not supported by edgetl QAT", _UNSUPPORTED_FIX)
            mv = None if layer.max_value is None else float(layer.max_value)
            return [self.add(_Op("relu", ins, self.tid(), layer.name, params={"max_value": mv}, trainable=tr))]
        if isinstance(layer, L.Multiply):
            return [self.add(_Op("multiply", ins, self.tid(), layer.name, trainable=tr))]
        if isinstance(layer, L.Softmax):
            return [self.add(_Op("softmax", ins, self.tid(), layer.name, trainable=tr))]
        if cls in _LINEAR_PRODUCERS and layer.get_config().get("activation", "linear") != "linear":
            cfg = layer.get_config()
            act = cfg["activation"]
            cfg["activation"] = "linear"
            y = self._layer(layer, node, ins, config=cfg)
            ch = int(node.outputs.shape[-1])
            return [self.activation(y, act, layer.name + "_act", ch, tr)]
        return [self._layer(layer, node, ins)]

    def _layer(self, layer, node, ins, config=None):
        args = node.call_args
        list_input = bool(args) and isinstance(args[0], (list, tuple))
        op = _Op(
            "layer",
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

    def _op_lambda(self, layer, node, ins):
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
            raise ExportError(f"TensorFlow op {fn!r} (layer {name}) is not supported by edgetl QAT", _UNSUPPORTED_FIX)
        if val.size == 1:
            v = float(val.reshape(()))
            if kind == "add":
                return self.add(_Op("add_const", ins, self.tid(), name, params={"value": v}))
            return self.add(_Op("scale_const", ins, self.tid(), name, params={"value": v}))
        if val.size != ch:
            raise ExportError(f"op {fn!r} (layer {name}) broadcasts a non per-channel constant", _UNSUPPORTED_FIX)
        if kind == "add":
            return self.affine(ins[0], 1.0, val, name, ch)
        return self.affine(ins[0], val, 0.0, name, ch)


def _consumers(ops: list[_Op]) -> dict[str, list[_Op]]:
    cons: dict[str, list[_Op]] = {}
    for op in ops:
        for t in op.inputs:
            cons.setdefault(t, []).append(op)
    return cons


def _fold(ops: list[_Op], outputs: list[str]) -> list[_Op]:
    """Fold affine / add_const ops into the linear layer that produces their input."""
    changed = True
    while changed:
        changed = False
        cons = _consumers(ops)
        prod = {op.out: op for op in ops}
        for op in ops:
            if op.kind not in ("affine", "add_const", "scale_const"):
                continue
            p = prod.get(op.inputs[0])
            if p is None or len(cons.get(p.out, [])) != 1 or p.out in outputs:
                continue
            if op.kind == "scale_const" and not (p.kind == "layer" and type(p.layer).__name__ in _LINEAR_PRODUCERS):
                continue  # a lone ScaleConst (1/6 after ReLU6) stays: it is a quantization point
            if p.kind == "affine" and op.kind in ("affine", "add_const"):
                if op.kind == "affine":
                    p.params["offset"] = p.params["offset"] * op.params["scale"] + op.params["offset"]
                    p.params["scale"] = p.params["scale"] * op.params["scale"]
                else:
                    p.params["offset"] = p.params["offset"] + op.params["value"]
            elif p.kind == "layer" and type(p.layer).__name__ in _LINEAR_PRODUCERS and p.config.get("activation") == "linear":
                ch = int(p.weights[0].shape[-1] * (p.weights[0].shape[-2] if type(p.layer).__name__ == "DepthwiseConv2D" else 1))
                if op.kind == "affine":
                    scale, offset = op.params["scale"], op.params["offset"]
                elif op.kind == "add_const":
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


def _push_scales(ops: list[_Op], outputs: list[str]) -> list[_Op]:
    """Remove ``ScaleConst(k)`` (k > 0) by pushing the factor downstream into the kernels of the
    Conv/Depthwise/Dense layers that consume it, through linear zero-preserving layers (padding,
    pooling, reshape, dropout), ReLU and one side of Multiply. ``hard_swish = x * relu6(x+3) / 6``
    then becomes ``ADD(+3, RELU6) -> MUL`` in int8 (2 ops instead of 3) and the converter cannot
    re-fuse it into HARD_SWISH, which XNNPACK does not run in int8."""
    changed = True
    while changed:
        changed = False
        cons = _consumers(ops)
        for s in ops:
            if s.kind != "scale_const" or s.params["value"] <= 0 or s.float_:
                continue  # in the float stem the 1/6 stays so that the converter fuses a float HARD_SWISH
            plan: list[_Op] = []
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
        cls = type(c.layer).__name__ if c.kind == "layer" else c.kind
        if cls in _LINEAR_PRODUCERS:
            if len(c.inputs) != 1:
                return False
            plan.append(c)
        elif cls in _PASS_THROUGH or (c.kind == "relu" and c.params["max_value"] is None):
            if not _plan_push(c.out, cons, outputs, plan, seen):
                return False
        elif c.kind == "multiply" and c.inputs.count(t) == 1:
            if not _plan_push(c.out, cons, outputs, plan, seen):
                return False
        else:
            return False
    return True


def _space_to_depth_stem(tr: "_Tracer", ops: list[_Op], shapes: dict, outputs: list[str]) -> list[_Op]:
    """Rewrite ``Conv2D(k=3, stride 2, 'same')`` on a <= 4-channel, even-sized input as
    ``SpaceToDepth(2) -> Conv2D(k=2, stride 1, 'same')`` (exact: the 3x3/2 taps map onto a 2x2
    kernel over 2x2 pixel blocks, the unused taps are zero, and the bottom/right zero padding lines up).
    A per-channel affine (input Rescaling) feeding only that conv moves behind the SpaceToDepth with its
    scale/offset tiled. In int8 XNNPACK the 3-channel stride-2 stem conv (+ the 3-channel 1x1 affine)
    cost 0.77 ms at 224 px vs 0.51 ms for this form (fp32 has a dedicated 3-channel kernel; int8 not).
    """
    cons = _consumers(ops)
    prod = {op.out: op for op in ops}
    for conv in list(ops):
        if conv.kind != "layer" or type(conv.layer).__name__ != "Conv2D":
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
        move_affine = aff is not None and aff.kind == "affine" and len(cons.get(src, [])) == 1 and src not in outputs
        s2d_in = aff.inputs[0] if move_affine else src
        s2d = _Op("s2d", [s2d_in], tr.tid(), tr.uniq(conv.name + "_space_to_depth"), trainable=False)
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
    return (w.ndim == 2 and w.shape[0] == w.shape[1] and bool(np.all((w == 0) | (w == 1)))
            and bool(np.all(w.sum(0) == 1)) and bool(np.all(w.sum(1) == 1)))


def _fold_channel_permutation(ops: list[_Op], in_ids: list[str], outputs: list[str]) -> list[_Op]:
    """Fold a 1x1 channel-permutation Conv2D on the model input (caffe-style RGB->BGR + mean subtraction, the
    ``input_preprocess`` layer edgetl puts in front of ResNet50/VGG16) into the first real conv.

    ``y = P x + b`` with P a permutation is ``P (x + P^T b)``; zero padding commutes with a channel permutation, so
    ``conv_K(pad0(y)) == conv_K'(pad0(x + P^T b))`` with K' = K with its input channels permuted (exact: the kernel
    is only reordered). The permutation conv becomes a per-channel affine (scale 1, offset P^T b), which the float
    stem keeps in fp32 (one broadcast ADD) and int8 stems emit as a 1x1 depthwise conv; the 3-channel 7x7/3x3 stem
    conv stays the first conv, so the float stem (:func:`_float_stem`) is the same as for the other backbones.
    """
    cons = _consumers(ops)
    for op in list(ops):
        if op.kind != "layer" or type(op.layer).__name__ != "Conv2D" or op.inputs[0] not in in_ids:
            continue
        cfg = op.config
        kernel = np.asarray(op.weights[0])
        if (tuple(cfg.get("kernel_size", ())) != (1, 1) or tuple(cfg.get("strides", (1, 1))) != (1, 1)
                or cfg.get("groups", 1) != 1 or cfg.get("activation", "linear") != "linear"
                or kernel.shape[:2] != (1, 1) or not _is_permutation(kernel[0, 0]) or op.out in outputs):
            continue
        # follow ZeroPadding2D (single consumers) to the conv that reads it
        t, path = op.out, []
        while True:
            users = cons.get(t, [])
            if len(users) != 1 or t in outputs:
                users = None
                break
            u = users[0]
            if u.kind == "layer" and type(u.layer).__name__ == "ZeroPadding2D":
                path.append(u)
                t = u.out
                continue
            break
        if not users or u.kind != "layer" or type(u.layer).__name__ != "Conv2D" or len(u.inputs) != 1:
            continue
        perm = kernel[0, 0].astype(np.float64)  # [in, out]
        bias = np.asarray(op.weights[1], np.float64) if cfg.get("use_bias", True) and len(op.weights) > 1 \
            else np.zeros(perm.shape[1])
        k = np.asarray(u.weights[0], np.float64)
        u.weights = [np.einsum("ic,hwco->hwio", perm, k).astype(np.float32)] + list(u.weights[1:])
        offset = perm @ bias
        op.kind, op.layer, op.weights, op.config = "affine", None, None, None
        op.params = {"scale": np.ones(perm.shape[0], np.float32), "offset": offset.astype(np.float32)}
        op.trainable = False
    return ops


_STEM_BEFORE = ("affine", "add_const", "scale_const")
_STEM_AFTER = ("add_const", "scale_const", "relu", "sigmoid", "multiply")


def _float_stem(ops: list[_Op], in_ids: list[str], outputs: list[str]) -> list[_Op]:
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
        cls = type(op.layer).__name__ if op.kind == "layer" else op.kind
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
    cons = _consumers(ops)
    for aff in list(ops):
        # input scaling right before the stem conv: y = s*x + o with one s and one o for all channels (MobileNetV3's
        # Rescaling). conv(pad0(s*x + o)) == conv_with_kernel*s(pad0(x + o/s)) exactly (zero padding commutes with
        # the scale), so the scale goes into the kernel and a scalar ADD is left (XNNPACK's broadcast of a
        # 3-element vector costs ~0.4 ms at 224 px, a scalar ADD 0.03 ms).
        if not (aff.float_ and aff.kind == "affine"):
            continue
        users = cons.get(aff.out, [])
        scale, offset = aff.params["scale"], aff.params["offset"]
        conv = users[0] if len(users) == 1 else None
        if (conv is None or conv.kind != "layer" or type(conv.layer).__name__ != "Conv2D" or aff.out in outputs
                or not np.all(scale == scale[0]) or not np.all(offset == offset[0]) or scale[0] == 0):
            continue
        conv.weights = [(np.asarray(conv.weights[0], np.float64) * float(scale[0])).astype(np.float32)] + list(conv.weights[1:])
        aff.kind, aff.params = "add_const", {"value": float(offset[0]) / float(scale[0])}
    for conv in ops:
        if conv.float_ and conv.kind == "layer" and type(conv.layer).__name__ == "Conv2D":
            users = cons.get(conv.out, [])
            relu = users[0] if len(users) == 1 else None
            if (relu is not None and relu.kind == "relu" and relu.params["max_value"] in (None, 6.0)
                    and conv.out not in outputs and conv.config.get("activation") == "linear"):
                conv.config = {**conv.config, "activation": "relu" if relu.params["max_value"] is None else "relu6"}
                conv.out = relu.out
                ops.remove(relu)
            break
    return ops


def _fold_into(p: _Op, scale, offset):
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


def _emit(ops: list[_Op], model_inputs, in_ids, out_ids, name):
    L = _K.layers
    tmap = dict(zip(in_ids, model_inputs))
    cons = _consumers(ops)
    prod = {op.out: op for op in ops}
    emitted: dict[int, Any] = {}
    for op in ops:
        xs = [tmap[t] for t in op.inputs]
        if op.kind == "layer":
            cfg = dict(op.config)
            cfg["name"] = op.name
            new = type(op.layer).from_config(cfg)
            y = new(xs if op.list_input else xs[0])
            new.set_weights(op.weights)
        elif op.kind == "affine" and len(xs[0].shape) == 4 and not op.float_:
            # per-channel affine on NHWC == 1x1 depthwise conv: tfmot quantizes it per channel and
            # the converter emits one int8 DEPTHWISE_CONV_2D that XNNPACK runs (a MUL+ADD pair with
            # constant vectors stays float with DEQUANTIZE/QUANTIZE around it).
            ch = len(op.params["scale"])
            new = L.DepthwiseConv2D(1, use_bias=True, name=op.name)
            y = new(xs[0])
            new.set_weights([op.params["scale"].reshape(1, 1, ch, 1), op.params["offset"]])
        elif op.kind == "affine":
            new = ChannelAffine(channels=len(op.params["scale"]), name=op.name)
            y = new(xs[0])
            new.set_weights([op.params["scale"], op.params["offset"]])
        elif op.kind == "add_const":
            new = AddConst(op.params["value"], name=op.name)
            y = new(xs[0])
        elif op.kind == "scale_const":
            new = ScaleConst(op.params["value"], name=op.name)
            y = new(xs[0])
        elif op.kind == "relu":
            src = prod.get(op.inputs[0])
            fused = (src is not None and not op.float_ and src.kind == "layer" and type(src.layer).__name__ in _LINEAR_PRODUCERS
                     and src.config.get("activation", "linear") == "linear" and len(cons.get(src.out, [])) == 1)
            new = (FusedReLU if fused else L.ReLU)(max_value=op.params["max_value"], name=op.name)
            y = new(xs[0])
            if fused:
                emitted[id(src)]._edgetl_relu_after = True
        elif op.kind == "sigmoid":
            new = L.Activation("sigmoid", name=op.name)
            y = new(xs[0])
        elif op.kind == "softmax":
            new = L.Activation("softmax", name=op.name)
            y = new(xs[0])
        elif op.kind == "multiply":
            new = L.Multiply(name=op.name)
            y = new(xs)
        elif op.kind == "s2d":
            new = SpaceToDepth(2, name=op.name)
            y = new(xs[0])
        else:  # pragma: no cover - internal
            raise AssertionError(op.kind)
        new.trainable = op.trainable
        new._edgetl_next = [c.kind if c.kind != "layer" else type(c.layer).__name__ for c in cons.get(op.out, [])]
        emitted[id(op)] = new
        new._edgetl_float = op.float_
        # the last float op(s): their output is the first quantized tensor
        new._edgetl_stem_out = op.float_ and (op.out in out_ids or any(not c.float_ for c in cons.get(op.out, [])))
        tmap[op.out] = y
    outs = [tmap[t] for t in out_ids]
    return _K.Model(model_inputs, outs if len(outs) > 1 else outs[0], name=name)


STEMS = ("float", "space_to_depth", "int8")


def flatten_for_qat(model, push_scales: bool = True, stem: str = "float") -> "keras.Model":
    """Return a flat functional copy of ``model`` that tfmot can annotate.

    Nested models are inlined; BatchNorm/Rescaling/Normalization and ``TFOpLambda`` constant
    arithmetic are folded into the preceding Conv/Dense or become :class:`ChannelAffine` /
    :class:`AddConst` / :class:`ScaleConst`; fused conv activations are split out and swish
    becomes ``sigmoid`` + ``Multiply``. Float outputs match the original to ~1e-7. Layer
    ``trainable`` flags are kept (a folded conv keeps the conv's flag).

    ``stem``: ``"float"`` (default) marks the input preprocessing, the first conv and its activation to stay
    float32 in the int8 files (:func:`quantize_for_training` leaves them unannotated and quantizes their
    output); ``"space_to_depth"`` quantizes them too, with the stem conv rewritten as SpaceToDepth + 2x2 conv;
    ``"int8"`` quantizes them as they are.
    """
    if stem not in STEMS:
        raise ConfigError(f"unknown stem mode {stem!r}", f"use one of {', '.join(STEMS)}")
    if not isinstance(model, _K.Model):
        raise ConfigError("flatten_for_qat needs a tf_keras Model", "build the model with tf_keras")
    tr = _Tracer()
    model_inputs, in_ids = [], []
    for kt in model.inputs:
        name = tr.uniq(kt.name.split(":")[0] if kt.name else "input")
        shape = tuple(kt.shape[1:])
        model_inputs.append(_K.Input(shape, name=name, dtype=kt.dtype))
        in_ids.append(tr.tid())
    out_ids = tr.trace(model, in_ids, inference=False)
    ops = _fold(tr.ops, out_ids)
    ops = _fold_channel_permutation(ops, in_ids, out_ids)
    if stem == "float":
        ops = _float_stem(ops, in_ids, out_ids)
    if push_scales:
        ops = _push_scales(ops, out_ids)
    if stem == "space_to_depth":
        ops = _space_to_depth_stem(tr, ops, tr.shapes, out_ids)
    # output ids may have been taken over by a producer during folding (ids are preserved)
    return _emit(ops, model_inputs, in_ids, out_ids, name=model.name + "_flat")


# --------------------------------------------------------------------------------------------
# QAT model
# --------------------------------------------------------------------------------------------

_TFMOT_DEFAULT = (
    "Conv2D",
    "DepthwiseConv2D",
    "Dense",
    "ReLU",
    "Add",
    "GlobalAveragePooling2D",
    "AveragePooling2D",
    "MaxPooling2D",
    "ZeroPadding2D",
    "Reshape",
    "Dropout",
    "Flatten",
    "Concatenate",
)


@contextlib.contextmanager
def _scope():
    tfmot = _tfmot()
    with tfmot.quantization.keras.quantize_scope(custom_objects()):
        yield


def _activation_name(layer) -> str:
    act = _K.activations.serialize(layer.activation)
    return act if isinstance(act, str) else str(act.get("config", {}).get("name", act.get("class_name", "")))


def quantize_for_training(model, stem: str = "float") -> "keras.Model":
    """Flatten, annotate and ``quantize_apply`` ``model``; returns a trainable QAT model.

    Weights are copied, ``trainable`` flags kept. Weight ranges are initialised from the weights;
    activation ranges still need :func:`calibrate` (or a long fine-tune).
    """
    tfmot = _tfmot()
    out_cfg, noop_cfg, aff_cfg = _make_configs()
    weight_configs = _tfmot_cache["weight_configs"]
    flat = flatten_for_qat(model, stem=stem)
    flags = {layer.name: layer.trainable for layer in flat.layers}

    def annotate(layer):
        cls = type(layer).__name__
        nxt = getattr(layer, "_edgetl_next", [])
        if isinstance(layer, _K.layers.InputLayer):
            return layer
        if getattr(layer, "_edgetl_float", False):  # float stem: only its output is quantized
            if getattr(layer, "_edgetl_stem_out", False):
                return tfmot.quantization.keras.quantize_annotate_layer(layer, out_cfg())
            return layer
        if cls == "Activation" and _activation_name(layer) == "softmax":
            return layer  # float SOFTMAX on the dequantized logits: XNNPACK runs it, int8 SOFTMAX it does not
        if cls in weight_configs:
            # weights fake-quantized on the int8 file's grid; no output fake-quant when a FusedReLU follows (it
            # quantizes the fused output, like the converter's CONV_2D+RELU)
            acts = [] if getattr(layer, "_edgetl_relu_after", False) else ["activation"]
            return tfmot.quantization.keras.quantize_annotate_layer(layer, weight_configs[cls](acts))
        if cls == "FusedReLU":
            return tfmot.quantization.keras.quantize_annotate_layer(layer, out_cfg())
        if cls in _TFMOT_DEFAULT:
            return tfmot.quantization.keras.quantize_annotate_layer(layer)
        if cls == "AddConst":
            cfg = noop_cfg() if nxt == ["relu"] or nxt == ["ReLU"] else out_cfg()
            return tfmot.quantization.keras.quantize_annotate_layer(layer, cfg)
        if cls == "ChannelAffine":
            return tfmot.quantization.keras.quantize_annotate_layer(layer, aff_cfg())
        if cls == "SpaceToDepth":  # pure data movement: int8 in, same scale out
            return tfmot.quantization.keras.quantize_annotate_layer(layer, noop_cfg())
        if cls in ("ScaleConst", "Multiply", "Activation"):
            return tfmot.quantization.keras.quantize_annotate_layer(layer, out_cfg())
        raise ExportError(
            f"layer {layer.name} ({cls}) has no quantization rule in edgetl",
            _UNSUPPORTED_FIX,
        )

    with _scope():
        annotated = _K.models.clone_model(flat, clone_function=annotate)
        annotated.set_weights(flat.get_weights())
        qat = tfmot.quantization.keras.quantize_apply(annotated)
    wrapper_cls = _tfmot_cache["wrapper"]
    for layer in qat.layers:
        inner = getattr(layer, "layer", None)
        if inner is not None and inner.name in flags:
            if type(layer) is tfmot.quantization.keras.QuantizeWrapperV2:
                layer.__class__ = wrapper_cls
            if layer.trainable != flags[inner.name]:
                raise AssertionError(f"trainable flag of {inner.name} lost in quantize_apply")
    _init_weight_ranges(qat)
    _set_input_range(qat)
    return qat


def _wrappers(model):
    tfmot = _tfmot()
    return [layer for layer in model.layers if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper)]


def _init_weight_ranges(model):
    """Set the weight quantizers' min/max from the current weights (tfmot does it in the first
    training step only, so an untrained QAT model would otherwise quantize weights to +-6)."""
    for w in _wrappers(model):
        for weight, quantizer, qvars in getattr(w, "_weight_vars", []):
            quantizer(weight, True, weights=qvars)


def _set_input_range(model):
    for layer in model.layers:
        if isinstance(layer, _QuantizeLayer()) and getattr(layer, "quantizer", None):
            layer.quantizer_vars["min_var"].assign(INPUT_RANGE[0])
            layer.quantizer_vars["max_var"].assign(INPUT_RANGE[1])


def calibrate(qat_model, images: np.ndarray, batch_size: int = 32) -> None:
    """Set every activation range of ``qat_model`` from ``images`` (float32 0..255 NHWC).

    Runs the model in inference mode batch by batch; each moving-average fake-quant records the
    batch min/max of its input (downstream layers see the data quantized with the batch range) and
    the final range is the mean over batches. The input range is pinned to 0..255 and weight
    ranges are refreshed from the weights.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ConfigError(f"calibrate needs NHWC images, got shape {images.shape}", "pass a non-empty (N,H,W,3) array")
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

    _init_weight_ranges(qat_model)
    _set_input_range(qat_model)
    stats: dict[int, list] = {}
    orig = quant_ops.MovingAvgQuantize

    def recording(inputs, min_var, max_var, per_channel=False, ema_decay=0.999, name_prefix="", is_training=True,
                  num_bits=8, narrow_range=False, symmetric=False):
        if per_channel:
            return orig(inputs, min_var, max_var, per_channel, ema_decay, name_prefix, False, num_bits, narrow_range, symmetric)
        lo = min(float(_TF.reduce_min(inputs)), 0.0)
        hi = max(float(_TF.reduce_max(inputs)), 0.0)
        if symmetric:
            m = max(abs(lo), abs(hi))
            lo, hi = -m, m
        if hi - lo < 1e-6:
            hi = lo + 1e-6
        entry = stats.setdefault(id(min_var), [min_var, max_var, [], []])
        entry[2].append(lo)
        entry[3].append(hi)
        return _TF.quantization.fake_quant_with_min_max_vars(inputs, lo, hi, num_bits=num_bits, narrow_range=narrow_range)

    quant_ops.MovingAvgQuantize = recording
    try:
        for i in range(0, len(images), batch_size):
            qat_model(_TF.constant(images[i : i + batch_size]), training=False)
    finally:
        quant_ops.MovingAvgQuantize = orig
    for min_var, max_var, los, his in stats.values():
        min_var.assign(float(np.mean(los)))
        max_var.assign(float(np.mean(his)))


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


QAT_MODEL_SUFFIX = ".h5"


def save_qat_model(model, path: str | os.PathLike) -> None:
    """Save a QAT model as HDF5 (``.h5``): architecture JSON + weights, no pickled code.

    The ``.keras`` format cannot round-trip tfmot models: ``QuantizeLayer`` tracks its min/max
    variables twice and loading fails with "expected 5 variables, but received 3".
    """
    path = os.fspath(path)
    if not path.endswith((".h5", ".hdf5")):
        raise ConfigError(f"QAT models are saved as HDF5, got {path!r}", "use a path ending in .h5")
    with _scope():
        model.save(path, save_format="h5", include_optimizer=False)


def load_qat_model(path: str | os.PathLike):
    """Load a QAT model written by :func:`save_qat_model`; needs no user code (all edgetl and tfmot
    classes are registered here; the HDF5 holds no Lambda layers or pickles)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"QAT model file {path!r} does not exist", "check the run directory")
    try:
        with _scope():
            return _K.models.load_model(path, custom_objects=custom_objects(), compile=False)
    except (OSError, ValueError, KeyError, TypeError) as e:  # h5/json errors
        raise ModelFileError(f"cannot load QAT model {path!r}: {e}".splitlines()[0], "re-run the QAT step to recreate it") from e


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _concrete(model, batch=1):
    shape = [batch] + list(model.inputs[0].shape[1:])

    @_TF.function(input_signature=[_TF.TensorSpec(shape, _TF.float32, name="image")])
    def serve(x):
        return model(x, training=False)

    return serve, serve.get_concrete_function()


def _converter(model):
    fn, cf = _concrete(model)
    return _TF.lite.TFLiteConverter.from_concrete_functions([cf], fn)


def tflite_predict(content: bytes, images: np.ndarray, threads: int = 1, xnnpack: bool = True) -> np.ndarray:
    """Run a .tflite flatbuffer with LiteRT at batch 1, as a device would; returns float32 outputs (N, C).

    Inputs are 0..255 pixels; a quantized input tensor gets ``round(x / scale + zero_point)`` from the model's own
    quantization parameters (so uint8, int8 and float32 inputs are all fed correctly).
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kind = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = Interpreter(model_content=content, num_threads=threads, experimental_op_resolver_type=kind)
    it.allocate_tensors()
    d, o = it.get_input_details()[0], it.get_output_details()[0]
    out = []
    for img in np.asarray(images, dtype=np.float32):
        x = img[None]
        if d["dtype"] != np.float32:
            scale, zero = d["quantization"]
            info = np.iinfo(d["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        it.set_tensor(d["index"], x.astype(d["dtype"]))
        it.invoke()
        out.append(it.get_tensor(o["index"])[0].astype(np.float32))
    return np.stack(out)


def float_to_tflite(model) -> bytes:
    """fp32 TFLite (batch 1, float32 input 0..255, float32 output)."""
    return _converter(model).convert()


def _rep_gen(images):
    images = np.asarray(images, np.float32)

    def gen():
        for x in images:
            yield [x[None]]

    return gen


_INPUT_TYPES = (*tflite_fb.INPUT_TYPES, "float32")


def _input_dtype(input_type: str):
    if input_type not in _INPUT_TYPES:
        raise ConfigError(f"unknown int8 TFLite input type {input_type!r}", f"use one of {', '.join(_INPUT_TYPES)}")
    return {"uint8": _TF.uint8, "int8": _TF.int8, "float32": _TF.float32}[input_type]


def qat_to_tflite_int8(qat_model, input_type: str = "uint8") -> bytes:
    """Full-int8 TFLite from a (calibrated/trained) QAT model; output ``float32`` probabilities.

    ``input_type``:

    * ``"uint8"`` (default): RGB bytes 0..255 as they are (scale 1, zero point 0), followed by one
      DEQUANTIZE to the float stem (XNNPACK runs it; the converter's own uint8->int8 QUANTIZE it does not).
    * ``"int8"``: the same bytes minus 128 (scale 1, zero point -128; ``(px ^ 0x80).view(int8)``).
    * ``"float32"``: float pixels 0..255, like the fp32 model.

    The file is converted with a float32 input, then given its quantized input and float softmax by
    :func:`edgetl.tflite_fb.finish_qat_int8` and written with shared quantization vectors
    (:func:`edgetl.tflite_fb.write`). Every quantized tensor has a fake-quant range from QAT and no
    representative data is given to the converter on purpose: with it, the converter also
    post-training-quantizes the float stem (int8 stem and HARD_SWISH outside XNNPACK: 2.2x slower).
    """
    _input_dtype(input_type)  # validate before the (slow) conversion
    conv = _converter(qat_model)
    conv.optimizations = [_TF.lite.Optimize.DEFAULT]
    conv.inference_input_type = _TF.float32
    conv.inference_output_type = _TF.float32
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            flat = conv.convert()
    except Exception as e:  # converter errors are opaque; report them as export errors
        raise ExportError(f"int8 TFLite conversion failed: {e}".splitlines()[0], "check the QAT model") from e
    return tflite_fb.finish_qat_int8(flat, input_type, seven_bit=_seven_bit(qat_model))


def _seven_bit(qat_model) -> bool:
    """Whether ``qat_model`` trained 7-bit kernels (:data:`WEIGHT_LEVELS`; QAT models saved before have none)."""
    for w in _wrappers(qat_model):
        for _, quantizer, _ in getattr(w, "_weight_vars", []):
            if getattr(quantizer, "levels", 127) == 63:
                return True
    return False


def ptq_to_tflite_int8(
    float_model, representative: np.ndarray, rewrite: bool = True, input_type: str = "uint8"
) -> bytes:
    """Post-training full-int8 TFLite of a float model (for comparison with QAT).

    ``rewrite=True`` converts :func:`flatten_for_qat` of the model (same op forms as QAT). Input
    type as in :func:`qat_to_tflite_int8` but its scale/zero point come from the representative
    data; output ``float32``.
    """
    if representative is None or len(representative) == 0:
        raise ConfigError("post-training quantization needs representative images", "pass some training images")
    m = flatten_for_qat(float_model, stem="space_to_depth") if rewrite else float_model
    conv = _converter(m)
    conv.optimizations = [_TF.lite.Optimize.DEFAULT]
    conv.representative_dataset = _rep_gen(representative)
    conv.target_spec.supported_ops = [_TF.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = _input_dtype(input_type)
    conv.inference_output_type = _TF.float32
    with warnings.catch_warnings():
        # about the legacy quantized_input_stats flag; the input scale/zero point come from the representative data
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return conv.convert()


def _to_onnx(model, opset):
    import tf2onnx

    if not 13 <= int(opset) <= 17:
        raise ConfigError(f"ONNX opset {opset} is not supported", "use an opset between 13 and 17")
    spec = (_TF.TensorSpec([1] + list(model.inputs[0].shape[1:]), _TF.float32, name="image"),)
    fn, _ = _concrete(model)
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
            helper.make_node("DequantizeLinear", [base + "_q", base + "_scale", base + "_zp"], [base], name=base, **attrs)
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
                    "DequantizeLinear", [base + "_value", base + "_scale", base + "_zp"], [base + "_dq"], name=base + "_dq"
                )
            )
            n.input[k] = base + "_dq"
            count += 1
    # DequantizeLinear nodes only read initializers: put them first to keep topological order
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return count
