"""Quantization-aware training (QAT) for the stock ``tf_keras.applications`` classifiers.

Stock ``tfmot.quantization.keras.quantize_model`` refuses MobileNetV3 (``TFOpLambda`` ``x + 3`` and
``* 1/6`` inside hard-sigmoid / hard-swish), EfficientNet (``Rescaling``, ``Normalization``, swish,
squeeze-excite ``Multiply``) and any model nested inside another. This package, in pipeline order:

1. :func:`flatten_for_qat` (:mod:`~edgetl.qat.flatten`) rewrites the float model into one flat functional graph
   made only of layers tfmot can annotate: :mod:`~edgetl.qat.trace` turns the Keras model into ops
   (:mod:`~edgetl.qat.ir`), :mod:`~edgetl.qat.passes` folds BatchNorm into the preceding convolution (so it is in
   inference mode by construction), pushes scales, folds the caffe channel permutation and marks the float stem,
   and :mod:`~edgetl.qat.emit` writes the flat model with :class:`AddConst` / :class:`ScaleConst` /
   :class:`ChannelAffine` layers (:mod:`~edgetl.qat.layers`) instead of ``TFOpLambda`` arithmetic, swish as
   ``sigmoid`` + ``Multiply`` and fused conv activations split out. Float outputs are unchanged (max abs diff
   ~1e-7).
2. :func:`quantize_for_training` (:mod:`~edgetl.qat.scheme`) annotates that graph by an ordered rule table
   (edgetl's per-channel weight config for Conv/Depthwise on the converter's exact grid, ``FusedReLU`` after them
   so that tfmot's ``LayerReLUQuantize`` cannot drop their weight quantization, tfmot defaults for Dense/ReLU/Add/
   pooling, edgetl QuantizeConfigs (:mod:`~edgetl.qat.configs`) for the rest) and calls ``quantize_apply``.
3. :func:`calibrate` (:mod:`~edgetl.qat.calibrate`) sets every activation range from data (tfmot's moving
   averages start at +-6 with EMA 0.999 and barely move in a short fine-tune).
4. :func:`snap_to_grid` (:mod:`~edgetl.qat.snap`) stores each int8 layer's kernel and bias as the grid values the
   int8 files hold, once training is done, so that the QAT model computes with the same weights and biases as the
   TFLite and ONNX files.
5. :func:`save_qat_model` / :func:`load_qat_model` (:mod:`~edgetl.qat.saving`): HDF5, no pickled code.

Conversion to int8 TFLite / QDQ ONNX is :mod:`edgetl.convert`. See ``docs/qat.md``.

Importing this package imports TensorFlow and tfmot: only the training/conversion side does (the verify and
device paths never import it).
"""

from __future__ import annotations

from edgetl.qat.calibrate import INPUT_RANGE, calibrate
from edgetl.qat.configs import WEIGHT_LEVELS, custom_objects, seven_bit
from edgetl.qat.flatten import STEMS, flatten, flatten_for_qat
from edgetl.qat.layers import AddConst, ChannelAffine, FusedReLU, ScaleConst, SpaceToDepth
from edgetl.qat.saving import QAT_MODEL_SUFFIX, load_qat_model, save_qat_model
from edgetl.qat.scheme import quantize_for_training
from edgetl.qat.snap import snap_biases, snap_kernels, snap_to_grid

__all__ = [
    "AddConst",
    "ScaleConst",
    "ChannelAffine",
    "SpaceToDepth",
    "FusedReLU",
    "flatten_for_qat",
    "flatten",
    "quantize_for_training",
    "calibrate",
    "snap_biases",
    "snap_kernels",
    "snap_to_grid",
    "custom_objects",
    "save_qat_model",
    "load_qat_model",
    "seven_bit",
    "INPUT_RANGE",
    "WEIGHT_LEVELS",
    "STEMS",
    "QAT_MODEL_SUFFIX",
]
