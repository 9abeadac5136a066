"""``flatten_for_qat``: trace (:mod:`~edgetl.qat.trace`) -> passes (:mod:`~edgetl.qat.passes`) -> emit
(:mod:`~edgetl.qat.emit`). The float model becomes one flat functional graph made only of layers tfmot can
annotate; float outputs are unchanged (max abs diff ~1e-7)."""

from __future__ import annotations

from edgetl._tfenv import keras
from edgetl.errors import ConfigError
from edgetl.qat import passes
from edgetl.qat.emit import Plan, emit
from edgetl.qat.trace import Tracer

_K = keras()

#: How the stem (input preprocessing, the 3-channel first conv, its activation) is quantized.
STEMS = ("float", "space_to_depth", "int8")


def flatten(model, push_scales: bool = True, stem: str = "float") -> tuple["keras.Model", Plan]:
    """:func:`flatten_for_qat` and the :class:`~edgetl.qat.emit.Plan` that annotation reads."""
    if stem not in STEMS:
        raise ConfigError(f"unknown stem mode {stem!r}", f"use one of {', '.join(STEMS)}")
    if not isinstance(model, _K.Model):
        raise ConfigError("flatten_for_qat needs a tf_keras Model", "build the model with tf_keras")
    tr = Tracer()
    model_inputs, in_ids = [], []
    for kt in model.inputs:
        name = tr.uniq(kt.name.split(":")[0] if kt.name else "input")
        shape = tuple(kt.shape[1:])
        model_inputs.append(_K.Input(shape, name=name, dtype=kt.dtype))
        in_ids.append(tr.tid())
    out_ids = tr.trace(model, in_ids, inference=False)
    ops = passes.fold_affines(tr.ops, out_ids)
    ops = passes.fold_channel_permutation(ops, in_ids, out_ids)
    if stem == "float":
        ops = passes.float_stem(ops, in_ids, out_ids)
    if push_scales:
        ops = passes.push_scales(ops, out_ids)
    if stem == "space_to_depth":
        ops = passes.space_to_depth_stem(tr, ops, tr.shapes, out_ids)
    # output ids may have been taken over by a producer during folding (ids are preserved)
    return emit(ops, model_inputs, in_ids, out_ids, name=model.name + "_flat")


def flatten_for_qat(model, push_scales: bool = True, stem: str = "float") -> "keras.Model":
    """Return a flat functional copy of ``model`` that tfmot can annotate.

    Nested models are inlined; BatchNorm/Rescaling/Normalization and ``TFOpLambda`` constant
    arithmetic are folded into the preceding Conv/Dense or become :class:`~edgetl.qat.layers.ChannelAffine` /
    :class:`~edgetl.qat.layers.AddConst` / :class:`~edgetl.qat.layers.ScaleConst`; fused conv activations are
    split out and swish becomes ``sigmoid`` + ``Multiply``. Float outputs match the original to ~1e-7. Layer
    ``trainable`` flags are kept (a folded conv keeps the conv's flag).

    ``stem``: ``"float"`` (default) marks the input preprocessing, the first conv and its activation to stay
    float32 in the int8 files (:func:`~edgetl.qat.scheme.quantize_for_training` leaves them unannotated and
    quantizes their output); ``"space_to_depth"`` quantizes them too, with the stem conv rewritten as
    SpaceToDepth + 2x2 conv; ``"int8"`` quantizes them as they are. :func:`flatten` also returns which layers
    are the float stem.
    """
    return flatten(model, push_scales=push_scales, stem=stem)[0]
