"""Weights and biases exactly on the grids the int8 files store them on, so that the QAT model computes what the
int8 files do. Both snaps run once QAT training is done (:func:`snap_to_grid`).

**Kernels.** QAT with a straight-through rounding gradient drives many weights onto the rounding boundaries
between two grid points and keeps them there (they oscillate around it): in a MobileNetV3-Small trained on
trashnet, 2.5% of all weights (22,991 of 915,032) lay within 1e-6 of a half step. Which way such a weight rounds
then depends on how the float arithmetic of ``w / scale`` happens to come out: Keras in graph mode (``predict``),
eager mode and the exporters disagreed on them, so the ONNX file carried a kernel one step off from the one the QAT
model computed with in 0.5% of a layer's outputs. :func:`snap_kernels` stores each kernel as the grid values the
QAT model computes with (its quantizer in graph mode): every later computation of ``w / scale`` lands within float
rounding of an integer, so all of them agree, and the QAT model's outputs barely move (on that model: top-1 the same
for 99.8% of the images, mean |dp| 0.0018; numpy's ties-to-even moved them ten times as far). Each channel's largest
weight is a grid end point, so the scales stay as they were.

**Biases.** An int8 convolution (or dense layer) adds its bias in the int32 accumulator, as ``round(b / (s_in *
s_w))`` steps of ``s_in * s_w`` (input scale times the channel's weight scale): the TFLite converter and
onnxruntime's QDQ fusion both round the float bias that way. The fake-quant model adds the float bias itself. The
difference is at most half a step of ``s_in * s_w``, but wherever a conv output lies that close to an output
rounding boundary the int8 file rounds it the other way, and MobileNetV3's squeeze-excite gates and hard-swish
spread those one-step flips through the rest of the network (`benchmarks/int8_layers.py` measured 0.08% of the first
depthwise conv's outputs one step off in onnxruntime, and more than half of the last blocks' values).

:func:`snap_biases` rounds each bias to that grid, in the QAT model itself: from then on the
fake-quant model, the TFLite file and the ONNX file add the same bias. A bias already on the grid survives both
converters exactly (``round(k * step / step') == k`` for the nearly equal steps they compute, and for TFLite's
7-bit re-expression in :func:`edgetl.tflite_fb.seven_bit_weights`).
"""

from __future__ import annotations

import numpy as np

from edgetl.qat.configs import ChannelWeightsQuantizer

#: Weights whose names end so hold a quantizer's range of the layer's output (tfmot's ``Default8BitQuantizeConfig``
#: output quantizer, edgetl's ``OutputQuantizeConfig``; ``post_activation`` for a conv's own activation quantizer).
_OUTPUT_RANGES = (("output_min", "output_max"), ("post_activation_min", "post_activation_max"))

#: Layers an int8 tensor passes through unchanged (same scale in and out): look past them for the quantizer.
_PASS_THROUGH = ("ZeroPadding2D", "MaxPooling2D", "Reshape", "Dropout", "Flatten", "SpaceToDepth")


def _weights_by_suffix(layer) -> dict:
    return {w.name.split("/")[-1].split(":")[0]: w for w in layer.weights}


def _output_scale(layer) -> float | None:
    """The activation scale of ``layer``'s output as the converters compute it from its fake-quant range
    (``(max - min) / 255``), or None when the layer quantizes no output of its own."""
    weights = _weights_by_suffix(layer)
    for lo_name, hi_name in _OUTPUT_RANGES:
        if lo_name in weights and hi_name in weights:
            lo, hi = float(weights[lo_name].numpy()), float(weights[hi_name].numpy())
            return (hi - lo) / 255.0
    return None


def _inbound(layer) -> list:
    node = layer.inbound_nodes[0]
    layers = node.inbound_layers
    return list(layers) if isinstance(layers, (list, tuple)) else [layers]


def input_scale(layer) -> float | None:
    """The scale of the int8 tensor ``layer`` reads: the output range of the nearest layer upstream that quantizes
    its output, looking past pass-through layers; None when the input is not an int8 tensor (the float stem)."""
    (src,) = _inbound(layer)
    while True:
        scale = _output_scale(src)
        if scale is not None:
            return scale
        inner = type(getattr(src, "layer", src)).__name__
        if inner not in _PASS_THROUGH:
            return None
        (src,) = _inbound(src)


def _kernel(wrapper):
    """The kernel variable and edgetl weight quantizer of a QAT wrapper, or (None, None)."""
    config = getattr(wrapper, "quantize_config", None)
    quantizer = getattr(config, "weight_quantizer", None)
    if not isinstance(quantizer, ChannelWeightsQuantizer):
        return None, None
    weights = _weights_by_suffix(wrapper)
    return weights.get("depthwise_kernel", weights.get("kernel")), quantizer


def _grid(kernel, quantizer) -> tuple[np.ndarray, np.ndarray]:
    """The kernel as (channels-last flat values, each channel's step ``max|w| / levels``; 0 for a dead channel)."""
    k = kernel.numpy().astype(np.float64)
    flat = k.reshape(-1, quantizer._channels(k.shape))
    m = np.abs(flat).max(axis=0)
    return flat, np.where(m > 0, m / quantizer.levels, 0.0)


def _graph_mode_grid(tf, quantizer):
    """``quantizer`` (inference) as a graph function of a kernel."""
    return tf.function(lambda kernel: quantizer(kernel, training=False, weights={}))


def snap_kernels(qat_model) -> int:
    """Store every int8 Conv2D / DepthwiseConv2D / Dense kernel of ``qat_model`` as the grid values the QAT model
    computes with, in place; returns how many kernels changed.

    The values come from the layer's own weight quantizer run in graph mode, as ``predict`` and training run it,
    so a weight on a boundary keeps the side the trained model used (numpy's ties-to-even would flip some of
    them and change the model)."""
    from edgetl._tfenv import tf

    changed = 0
    for wrapper in qat_model.layers:
        kernel, quantizer = _kernel(wrapper)
        if kernel is None:
            continue
        snapped = _graph_mode_grid(tf(), quantizer)(kernel).numpy().astype(np.float32)
        flat, step = _grid(kernel, quantizer)
        moved = np.abs(snapped.reshape(flat.shape) - flat) > 1e-3 * step  # (float rounding aside: on the grid)
        if moved.any():
            kernel.assign(snapped)
            changed += 1
    return changed


def snap_to_grid(qat_model) -> dict:
    """:func:`snap_kernels` then :func:`snap_biases` (the bias grid uses the kernels' scales); the counts."""
    return {"kernels": snap_kernels(qat_model), "biases": snap_biases(qat_model)}


def _weight_step(wrapper) -> np.ndarray | None:
    """Each output channel's weight scale (the kernel's quantizer's ``max|w| / levels``), or None when the layer
    has no edgetl weight quantizer."""
    kernel, quantizer = _kernel(wrapper)
    return None if kernel is None else _grid(kernel, quantizer)[1]


def snap_biases(qat_model) -> int:
    """Round the bias of every int8 Conv2D / DepthwiseConv2D / Dense in ``qat_model`` to its int32 grid
    (``s_in * s_w`` per output channel), in place; returns how many layers it changed. Channels whose kernel is
    all zero (dead squeeze-excite units) keep their bias."""
    changed = 0
    for wrapper in qat_model.layers:
        bias = _weights_by_suffix(wrapper).get("bias")
        s_w = _weight_step(wrapper) if bias is not None else None  # None unless a QAT wrapper with edgetl's kernel
        s_in = input_scale(wrapper) if s_w is not None else None
        if s_in is None:
            continue
        b = bias.numpy().astype(np.float64)
        step = s_in * np.broadcast_to(s_w, b.shape)
        snapped = np.where(step > 0, np.round(b / np.where(step > 0, step, 1.0)) * step, b).astype(np.float32)
        if not np.array_equal(snapped, bias.numpy()):
            bias.assign(snapped)
            changed += 1
    return changed
