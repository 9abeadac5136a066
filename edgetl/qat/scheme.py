"""Annotation and ``quantize_apply``: :func:`quantize_for_training` turns a float model into a trainable QAT model.

What is quantized how is one ordered table, :data:`SCHEME` (the first rule that matches a layer of the flat model
decides). Besides the rules, two transforms happen and are named here on purpose:

* edgetl's graph rewrite before annotation (:func:`edgetl.qat.flatten.flatten`: trace, the passes of
  :mod:`edgetl.qat.passes`, emit), whose :class:`~edgetl.qat.emit.Plan` the rules read;
* tfmot's default 8-bit layout transforms inside ``quantize_apply``. Of those, ``LayerReLUQuantize`` (``ReLU``
  after ``Conv2D|DepthwiseConv2D|Dense``: it gives the conv a no-op config, so its weights would stay float in
  QAT while the converter quantizes them) must not run: emit writes such a ReLU as
  :class:`~edgetl.qat.layers.FusedReLU`, whose class name the transform does not match, and the rules quantize
  the fused output at the FusedReLU instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from edgetl._tfenv import keras
from edgetl.errors import ExportError
from edgetl.qat import configs
from edgetl.qat.calibrate import init_weight_ranges, set_input_range
from edgetl.qat.emit import LayerPlan
from edgetl.qat.flatten import flatten
from edgetl.qat.layers import activation_name
from edgetl.qat.trace import UNSUPPORTED_FIX

_K = keras()
_tfmot = configs.tfmot

#: Layer classes annotated with tfmot's default 8-bit registry config.
TFMOT_DEFAULT = (
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

#: Rule outcomes besides a QuantizeConfig: leave the layer float (unannotated) / tfmot's default config.
FLOAT = "float"
DEFAULT = "tfmot default"


@dataclass(frozen=True)
class Rule:
    what: str  # the layers it matches, in words
    matches: Callable[[Any, LayerPlan], bool]
    config: Callable[[Any, LayerPlan], Any]  # a QuantizeConfig, FLOAT or DEFAULT


def _cls(layer) -> str:
    return type(layer).__name__


def _is(*names: str) -> Callable[[Any, LayerPlan], bool]:
    return lambda layer, plan: _cls(layer) in names


def _weight_config(layer, plan: LayerPlan):
    # weights fake-quantized on the int8 file's grid; no output fake-quant when a FusedReLU follows (it
    # quantizes the fused output, like the converter's CONV_2D+RELU)
    acts = [] if plan.relu_after else ["activation"]
    return configs.WEIGHT_CONFIGS[_cls(layer)](acts)


def _add_const_config(layer, plan: LayerPlan):
    # ADD+RELU6 fuse into one int8 ADD whose output range is the ReLU's
    return configs.NoOpQuantizeConfig() if plan.next in (("relu",), ("ReLU",)) else configs.OutputQuantizeConfig()


#: The annotation rules, in order; a layer no rule matches is an ExportError.
SCHEME: tuple[Rule, ...] = (
    Rule("input", lambda layer, plan: isinstance(layer, _K.layers.InputLayer), lambda layer, plan: FLOAT),
    Rule(
        "float stem: only its output is quantized",
        lambda layer, plan: plan.float_,
        lambda layer, plan: configs.OutputQuantizeConfig() if plan.stem_out else FLOAT,
    ),
    Rule(
        "softmax: float SOFTMAX on the dequantized logits (XNNPACK runs it, int8 SOFTMAX it does not)",
        lambda layer, plan: _cls(layer) == "Activation" and activation_name(layer) == "softmax",
        lambda layer, plan: FLOAT,
    ),
    Rule("Conv2D/DepthwiseConv2D/Dense: edgetl's weight grid", _is(*configs.WEIGHT_CONFIGS), _weight_config),
    Rule("FusedReLU: the fused conv output", _is("FusedReLU"), lambda layer, plan: configs.OutputQuantizeConfig()),
    Rule("tfmot's defaults", _is(*TFMOT_DEFAULT), lambda layer, plan: DEFAULT),
    Rule("AddConst: its output, unless a ReLU follows", _is("AddConst"), _add_const_config),
    Rule(
        "ChannelAffine: int8 scale/offset and output",
        _is("ChannelAffine"),
        lambda layer, plan: configs.AffineQuantizeConfig(),
    ),
    Rule(
        "SpaceToDepth: pure data movement, int8 in, same scale out",
        _is("SpaceToDepth"),
        lambda layer, plan: configs.NoOpQuantizeConfig(),
    ),
    Rule(
        "sigmoid: its output on TFLite's fixed LOGISTIC grid (one rounding in every runtime, no requantize)",
        lambda layer, plan: _cls(layer) == "Activation" and activation_name(layer) == "sigmoid",
        lambda layer, plan: configs.SigmoidQuantizeConfig(),
    ),
    Rule(
        "ScaleConst/Multiply/Activation: their output",
        _is("ScaleConst", "Multiply", "Activation"),
        lambda layer, plan: configs.OutputQuantizeConfig(),
    ),
)


def annotate(layer, plan: LayerPlan):
    """``layer`` annotated (or not) by the first rule of :data:`SCHEME` that matches it."""
    for rule in SCHEME:
        if rule.matches(layer, plan):
            config = rule.config(layer, plan)
            if config is FLOAT:
                return layer
            return _tfmot.quantization.keras.quantize_annotate_layer(layer, None if config is DEFAULT else config)
    raise ExportError(f"layer {layer.name} ({_cls(layer)}) has no quantization rule in edgetl", UNSUPPORTED_FIX)


def quantize_for_training(model, stem: str = "float") -> "keras.Model":
    """Flatten, annotate and ``quantize_apply`` ``model``; returns a trainable QAT model.

    Weights are copied, ``trainable`` flags kept. Weight ranges are initialised from the weights;
    activation ranges still need :func:`~edgetl.qat.calibrate.calibrate` (or a long fine-tune).
    """
    tfmot = _tfmot
    flat, plan = flatten(model, stem=stem)
    flags = {layer.name: layer.trainable for layer in flat.layers}
    with configs.scope():
        annotated = _K.models.clone_model(flat, clone_function=lambda layer: annotate(layer, plan.of(layer)))
        annotated.set_weights(flat.get_weights())
        qat = tfmot.quantization.keras.quantize_apply(annotated)
    for layer in qat.layers:
        inner = getattr(layer, "layer", None)
        if inner is not None and inner.name in flags:
            if type(layer) is tfmot.quantization.keras.QuantizeWrapperV2:
                layer.__class__ = configs.QATWrapper
            if layer.trainable != flags[inner.name]:
                raise AssertionError(f"trainable flag of {inner.name} lost in quantize_apply")
    init_weight_ranges(qat)
    set_input_range(qat)
    return qat
