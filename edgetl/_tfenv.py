"""Import TensorFlow the one way edgetl supports: Keras 2 (tf_keras) for tfmot.

Every module that needs TensorFlow imports it through :func:`tf` so that
``TF_USE_LEGACY_KERAS=1`` is set before TensorFlow is first imported. Nothing on
the device path (``edgetl verify`` on a bundle) may call this.
"""

from __future__ import annotations

import os


def _prepare_env() -> None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    # 3: only fatal C++ log lines (CUDA probing on CPU-only machines logs an "error" at every import);
    # Python-level errors still raise. Set TF_CPP_MIN_LOG_LEVEL yourself to see more.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def tf():
    """Return the ``tensorflow`` module, imported with legacy Keras enabled."""
    _prepare_env()
    import tensorflow

    return tensorflow


def keras():
    """Return ``tf_keras`` (Keras 2), the Keras edgetl builds every model with."""
    _prepare_env()
    import tf_keras

    return tf_keras
