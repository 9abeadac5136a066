"""Save and load a QAT model (HDF5: architecture JSON + weights, no pickled code)."""

from __future__ import annotations

import os

from edgetl._tfenv import keras
from edgetl.errors import ConfigError, ModelFileError
from edgetl.qat.configs import custom_objects, scope

_K = keras()

QAT_MODEL_SUFFIX = ".h5"


def save_qat_model(model, path: str | os.PathLike) -> None:
    """Save a QAT model as HDF5 (``.h5``): architecture JSON + weights, no pickled code.

    The ``.keras`` format cannot round-trip tfmot models: ``QuantizeLayer`` tracks its min/max
    variables twice and loading fails with "expected 5 variables, but received 3".
    """
    path = os.fspath(path)
    if not path.endswith((".h5", ".hdf5")):
        raise ConfigError(f"QAT models are saved as HDF5, got {path!r}", "use a path ending in .h5")
    with scope():
        model.save(path, save_format="h5", include_optimizer=False)


def load_qat_model(path: str | os.PathLike):
    """Load a QAT model written by :func:`save_qat_model`; needs no user code (all edgetl and tfmot
    classes are registered here; the HDF5 holds no Lambda layers or pickles)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"QAT model file {path!r} does not exist", "check the run directory")
    try:
        with scope():
            return _K.models.load_model(path, custom_objects=custom_objects(), compile=False)
    except (OSError, ValueError, KeyError, TypeError) as e:  # h5/json errors
        raise ModelFileError(
            f"cannot load QAT model {path!r}: {e}".splitlines()[0], "re-run the QAT step to recreate it"
        ) from e
