"""edgetl's tfmot QuantizeConfigs, weight quantizer and wrapper (module-level classes, registered as
``edgetl>Name``), the weight grid (:data:`WEIGHT_LEVELS`) and :func:`custom_objects` for loading a QAT model.

Importing this module imports tfmot (after :mod:`edgetl._tfenv` has set up TensorFlow).
"""

from __future__ import annotations

import contextlib

from edgetl._tfenv import keras, tf
from edgetl.qat.layers import LAYERS

_K = keras()
_TF = tf()  # environment first

import tensorflow_model_optimization as tfmot  # noqa: E402
from tensorflow_model_optimization.python.core.quantization.keras import quantize as _quantize  # noqa: E402
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (  # noqa: E402
    default_8bit_quantize_registry as registry,
)
from tensorflow_model_optimization.python.core.quantization.keras.quantize_layer import QuantizeLayer  # noqa: E402

#: Symmetric weight grid per layer type: weights are int8 in -levels..levels. Conv2D (pointwise/regular) and Dense
#: use **7-bit** weights (-63..63): onnxruntime's x86 u8 x s8 kernels on CPUs without VNNI (AVX2, AVX-512 without
#: VNNI) add pairs of u8*s8 products in int16 with saturation (vpmaddubsw); 255*(|w0|+|w1|) > 32767 needs
#: |w0|+|w1| > 128, which 7-bit weights can never reach, so every x86 and ARM core computes the same exact int32
#: sums (measured: ORT_ENABLE_ALL moved from agreement 0.933 / mean |dp| 0.021 to the BASIC level 0.963 / 0.017 on
#: an AVX2 EPYC; docs/qat.md). Depthwise convs keep 8 bits (onnxruntime's depthwise kernel does not saturate:
#: measured). QAT trains on exactly this grid, and both exporters write it exactly (scale max|w|/63).
WEIGHT_LEVELS = {"Conv2D": 63, "Dense": 63, "DepthwiseConv2D": 127}

QuantizeConfig = tfmot.quantization.keras.QuantizeConfig
MovingAverageQuantizer = tfmot.quantization.keras.quantizers.MovingAverageQuantizer
LastValueQuantizer = tfmot.quantization.keras.quantizers.LastValueQuantizer
QuantizeWrapperV2 = tfmot.quantization.keras.QuantizeWrapperV2


@_K.utils.register_keras_serializable(package="edgetl")
class OutputQuantizeConfig(QuantizeConfig):
    """No weights to quantize; fake-quantize the layer output (asymmetric, per tensor).

    Used for Multiply, ScaleConst, ChannelAffine, Activation (but sigmoid), the float stem output and AddConst when
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


#: TFLite's int8 LOGISTIC writes its output on a fixed grid: scale 1/256, zero point -128 (0 .. 255/256).
SIGMOID_RANGE = (0.0, 255.0 / 256.0)


@_K.utils.register_keras_serializable(package="edgetl")
class SigmoidQuantizeConfig(OutputQuantizeConfig):
    """A sigmoid's output on TFLite's fixed int8 LOGISTIC grid (:data:`SIGMOID_RANGE`: scale 1/256, zero point
    -128). With a learned range the converter follows LOGISTIC with a QUANTIZE from that grid to the learned one:
    two roundings where the QAT model has one, which left 10-70% of EfficientNet-B0's swish and squeeze-excite
    gate values one step off the QAT model in LiteRT (``benchmarks/int8_layers.py --against tflite --local``), and
    one extra op per sigmoid. onnxruntime computes its int8 sigmoid as a table for any output grid."""

    def get_output_quantizers(self, layer):
        lo, hi = SIGMOID_RANGE
        return [tfmot.quantization.keras.quantizers.FixedQuantizer(8, lo, hi, narrow_range=False)]


@_K.utils.register_keras_serializable(package="edgetl")
class NoOpQuantizeConfig(OutputQuantizeConfig):
    """Nothing is quantized: used for AddConst feeding a ReLU (the converter fuses ADD+RELU6 into
    one int8 ADD whose output range is the ReLU's) and for range-preserving layers."""

    def get_output_quantizers(self, layer):
        return []


@_K.utils.register_keras_serializable(package="edgetl")
class AffineQuantizeConfig(OutputQuantizeConfig):
    """ChannelAffine: per-tensor symmetric int8 scale and offset (so the converter emits int8
    MUL/ADD with constant operands instead of a float island with DEQUANTIZE/QUANTIZE around it),
    output fake-quantized."""

    def get_weights_and_quantizers(self, layer):
        q = lambda: LastValueQuantizer(num_bits=8, per_axis=False, symmetric=True, narrow_range=True)  # noqa: E731
        return [(layer.scale, q()), (layer.offset, q())]

    def set_quantize_weights(self, layer, quantize_weights):
        layer.scale, layer.offset = quantize_weights


@_K.utils.register_keras_serializable(package="edgetl")
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


@_K.utils.register_keras_serializable(package="edgetl")
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


@_K.utils.register_keras_serializable(package="edgetl")
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
            self._trainable_weights
            + self.layer.trainable_weights
            + self.layer.non_trainable_weights
            + self._non_trainable_weights
        )


#: The weight QuantizeConfig of each layer class with a kernel, by its output activations to fake-quantize
#: (``["activation"]``, or ``[]`` when a FusedReLU after it quantizes the fused output).
WEIGHT_CONFIGS = {
    "Conv2D": lambda acts: ChannelQuantizeConfig(["kernel"], acts, False, WEIGHT_LEVELS["Conv2D"]),
    "DepthwiseConv2D": lambda acts: ChannelQuantizeConfig(
        ["depthwise_kernel"], acts, False, WEIGHT_LEVELS["DepthwiseConv2D"]
    ),
    "Dense": lambda acts: ChannelQuantizeConfig(["kernel"], acts, False, WEIGHT_LEVELS["Dense"], per_tensor=True),
}


def _by_names(*classes) -> dict:
    return {name: cls for cls in classes for name in (cls.__name__, f"edgetl>{cls.__name__}")}


def custom_objects() -> dict:
    """Every class needed to deserialize a QAT model (edgetl layers/configs + tfmot wrappers)."""
    scope = _quantize.quantize_scope()
    objs = {}
    for d in scope.custom_objects if hasattr(scope, "custom_objects") else []:
        objs.update(d)
    objs.update(LAYERS)
    objs.update(
        _by_names(
            OutputQuantizeConfig,
            SigmoidQuantizeConfig,
            NoOpQuantizeConfig,
            AffineQuantizeConfig,
            QATWrapper,
            ChannelWeightsQuantizer,
            ChannelQuantizeConfig,
        )
    )
    objs.update(
        {
            "Default8BitConvQuantizeConfig": registry.Default8BitConvQuantizeConfig,
            "Default8BitQuantizeConfig": registry.Default8BitQuantizeConfig,
        }
    )
    # tfmot public objects (explicit, in case quantize_scope changes what it exposes)
    objs.update(
        {
            "QuantizeWrapper": tfmot.quantization.keras.QuantizeWrapper,
            "QuantizeWrapperV2": tfmot.quantization.keras.QuantizeWrapperV2,
            "QuantizeLayer": QuantizeLayer,
            "MovingAverageQuantizer": tfmot.quantization.keras.quantizers.MovingAverageQuantizer,
            "LastValueQuantizer": tfmot.quantization.keras.quantizers.LastValueQuantizer,
            "AllValuesQuantizer": tfmot.quantization.keras.quantizers.AllValuesQuantizer,
        }
    )
    return objs


@contextlib.contextmanager
def scope():
    """tfmot's ``quantize_scope`` with :func:`custom_objects`: (de)serializing a QAT model needs it."""
    with tfmot.quantization.keras.quantize_scope(custom_objects()):
        yield


def wrappers(model) -> list:
    """The QuantizeWrappers of ``model``."""
    return [layer for layer in model.layers if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper)]


def seven_bit(qat_model) -> bool:
    """Whether ``qat_model`` trained 7-bit kernels (:data:`WEIGHT_LEVELS`; QAT models saved before have none)."""
    for w in wrappers(qat_model):
        for _, quantizer, _ in getattr(w, "_weight_vars", []):
            if getattr(quantizer, "levels", 127) == 63:
                return True
    return False
