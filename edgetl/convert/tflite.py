"""TFLite conversion: fp32 (:func:`float_to_tflite`), full-int8 from a QAT model (:func:`qat_to_tflite_int8`) and
post-training full-int8 (:func:`ptq_to_tflite_int8`).

Type choices of the int8 TFLite files: input ``uint8`` NHWC RGB 0..255 by default (scale 1, zero
point 0: the raw pixel bytes, then one DEQUANTIZE into the float stem), ``"int8"`` (pixel - 128)
or ``"float32"``; output ``float32`` probabilities (float SOFTMAX on the dequantized logits).
Hard-swish is ``ADD(+3, fused RELU6) -> MUL`` with its ``1/6`` pushed into the next conv's kernel, the SE
hard-sigmoid ``CONV(bias+3, fused RELU6) -> MUL(1/6)``: every int8 op is one XNNPACK runs in int8, and the int8
file is a single XNNPACK partition (docs/qat.md).
"""

from __future__ import annotations

import warnings

import numpy as np

from edgetl import tflite_fb
from edgetl._tfenv import tf
from edgetl.convert._serving import concrete
from edgetl.errors import ConfigError, ExportError
from edgetl.qat import flatten_for_qat, seven_bit

_TF = tf()


def _converter(model):
    fn, cf = concrete(model)
    return _TF.lite.TFLiteConverter.from_concrete_functions([cf], fn)


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
    return tflite_fb.finish_qat_int8(flat, input_type, seven_bit=seven_bit(qat_model))


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
