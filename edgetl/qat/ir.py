"""The graph IR between tracing and emitting: a list of :class:`Op` in topological order, tensors named by ids.

:mod:`edgetl.qat.trace` builds it from a Keras model, :mod:`edgetl.qat.passes` rewrites it,
:mod:`edgetl.qat.emit` turns it back into a flat Keras model. Pure Python + numpy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class OpKind(enum.Enum):
    """What an :class:`Op` computes. ``LAYER`` is a copy of a Keras layer (``Op.layer``, ``Op.config``,
    ``Op.weights``); the others are edgetl's own ops (``Op.params`` holds their constants)."""

    LAYER = "layer"  # a Keras layer, re-created from its config and weights
    AFFINE = "affine"  # per-channel y = x * scale + offset (params: scale, offset)
    ADD_CONST = "add_const"  # y = x + value (params: value)
    SCALE_CONST = "scale_const"  # y = x * value (params: value)
    RELU = "relu"  # ReLU / ReLU6 (params: max_value None or 6.0)
    SIGMOID = "sigmoid"
    SOFTMAX = "softmax"
    MULTIPLY = "multiply"  # elementwise product of two tensors
    S2D = "s2d"  # space-to-depth, block 2


@dataclass
class Op:
    kind: OpKind
    inputs: list  # tensor ids (str)
    out: str
    name: str
    layer: Any = None  # original layer (kind LAYER)
    list_input: bool = False
    trainable: bool = True
    params: dict = field(default_factory=dict)
    float_: bool = False  # part of the float stem (stays float32 in the int8 files)
    weights: list | None = None  # float weights for the new layer (kind LAYER)
    config: dict | None = None


#: Keras layer classes that are linear (a kernel, a bias) and can absorb a scale/offset.
LINEAR_PRODUCERS = ("Conv2D", "DepthwiseConv2D", "Dense")


def op_class(op: Op) -> str | OpKind:
    """The Keras class name of a ``LAYER`` op, else its kind."""
    return type(op.layer).__name__ if op.kind is OpKind.LAYER else op.kind


def consumers(ops: list[Op]) -> dict[str, list[Op]]:
    cons: dict[str, list[Op]] = {}
    for op in ops:
        for t in op.inputs:
            cons.setdefault(t, []).append(op)
    return cons
