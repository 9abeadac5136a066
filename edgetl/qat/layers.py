"""The serializable layers edgetl's flat QAT graph is made of, besides stock Keras layers.

They replace ``TFOpLambda`` / preprocessing arithmetic (:class:`AddConst`, :class:`ScaleConst`,
:class:`ChannelAffine`), the space-to-depth stem (:class:`SpaceToDepth`) and mark a ReLU fused into the conv
before it (:class:`FusedReLU`). All are registered as ``edgetl>Name``; a QAT model file names nothing else of
edgetl's besides the QuantizeConfigs (:mod:`edgetl.qat.configs`). TensorFlow, no tfmot.
"""

from __future__ import annotations

from edgetl._tfenv import keras, tf

_K = keras()
_TF = tf()


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
        self.scale = self.add_weight(name="scale", shape=(self.channels,), initializer="ones", trainable=False)
        self.offset = self.add_weight(name="offset", shape=(self.channels,), initializer="zeros", trainable=False)
        super().build(input_shape)

    def call(self, inputs):
        return inputs * self.scale + self.offset

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


#: Every layer class of this module by the names a model file may use for it.
LAYERS = {
    name: cls
    for cls in (AddConst, ScaleConst, ChannelAffine, SpaceToDepth, FusedReLU)
    for name in (cls.__name__, f"edgetl>{cls.__name__}")
}


def activation_name(layer) -> str:
    """The name of a Keras ``Activation`` layer's function (``"relu"``, ``"hard_swish"``, ``"softmax"``, ...)."""
    act = _K.activations.serialize(layer.activation)
    return act if isinstance(act, str) else str(act.get("config", {}).get("name", act.get("class_name", "")))
