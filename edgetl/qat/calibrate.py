"""Ranges of a QAT model: weight ranges from the weights, the input range pinned to :data:`INPUT_RANGE`, every
activation range from data (:func:`calibrate`; tfmot's moving averages start at +-6 with EMA 0.999 and barely
move in a short fine-tune)."""

from __future__ import annotations

import numpy as np

from edgetl._tfenv import tf
from edgetl.errors import ConfigError
from edgetl.qat.configs import QuantizeLayer, wrappers

_TF = tf()

#: The value range of the model input (RGB pixels); the int8 input is quantized with exactly it.
INPUT_RANGE = (0.0, 255.0)


def init_weight_ranges(model):
    """Set the weight quantizers' min/max from the current weights (tfmot does it in the first
    training step only, so an untrained QAT model would otherwise quantize weights to +-6)."""
    for w in wrappers(model):
        for weight, quantizer, qvars in getattr(w, "_weight_vars", []):
            quantizer(weight, True, weights=qvars)


def set_input_range(model):
    for layer in model.layers:
        if isinstance(layer, QuantizeLayer) and getattr(layer, "quantizer", None):
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

    init_weight_ranges(qat_model)
    set_input_range(qat_model)
    stats: dict[int, list] = {}
    orig = quant_ops.MovingAvgQuantize

    def recording(
        inputs,
        min_var,
        max_var,
        per_channel=False,
        ema_decay=0.999,
        name_prefix="",
        is_training=True,
        num_bits=8,
        narrow_range=False,
        symmetric=False,
    ):
        if per_channel:
            return orig(
                inputs, min_var, max_var, per_channel, ema_decay, name_prefix, False, num_bits, narrow_range, symmetric
            )
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
        return _TF.quantization.fake_quant_with_min_max_vars(
            inputs, lo, hi, num_bits=num_bits, narrow_range=narrow_range
        )

    quant_ops.MovingAvgQuantize = recording
    try:
        for i in range(0, len(images), batch_size):
            qat_model(_TF.constant(images[i : i + batch_size]), training=False)
    finally:
        quant_ops.MovingAvgQuantize = orig
    for min_var, max_var, los, his in stats.values():
        min_var.assign(float(np.mean(los)))
        max_var.assign(float(np.mean(his)))
