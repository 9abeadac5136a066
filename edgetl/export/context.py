"""What a variant builder gets: the run, lazily loaded models and calibration images, a scratch folder."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgetl.errors import EdgetlError, ExportError, ModelFileError
from edgetl.rundir import RunInfo


def qat_module():
    """``edgetl.qat`` (written alongside export), imported lazily; ExportError if it is not there."""
    try:
        from edgetl import qat
    except ModuleNotFoundError as exc:
        if exc.name != "edgetl.qat":
            raise
        raise ExportError(
            "int8 QAT/PTQ export needs edgetl.qat, which this installation lacks",
            "reinstall edgetl, or export only fp32/fp16/dynamic_int8/ort_static_int8 variants",
        ) from None
    return qat


def convert_module(fmt: str):
    """``edgetl.convert.tflite`` / ``edgetl.convert.onnx`` (they need :func:`qat_module`), imported lazily."""
    qat_module()
    return importlib.import_module(f"edgetl.convert.{fmt}")


def _custom_objects() -> dict[str, Any]:
    try:
        from edgetl import qat
    except ModuleNotFoundError as exc:
        if exc.name != "edgetl.qat":
            raise
        return {}
    getter = getattr(qat, "custom_objects", None)
    return dict(getter()) if getter is not None else {}


def _unloadable(what: str, path: Path, exc: BaseException, fix: str) -> ModelFileError:
    text = str(exc)
    if "safe_mode" in text or "Lambda" in text:
        return ModelFileError(
            f"refusing to load the {what} {path}: it contains Python code (e.g. a Lambda layer), which edgetl never "
            "runs (Keras safe mode)",
            "only use run directories written by `edgetl finetune`; re-run it to rewrite the model",
        )
    reason = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if len(reason) > 200:
        reason = reason[:197] + "..."
    return ModelFileError(f"cannot load the {what} {path}: {reason}", fix)


def load_float_model(path: Path):
    """Load a run's ``float.keras`` in Keras safe mode (no Python code from the file is ever run).

    Only the zip-based ``.keras`` format is accepted: tf_keras silently falls back to its legacy HDF5 loader for
    any other file, and that loader ignores ``safe_mode`` (an HDF5 file renamed to ``float.keras`` would run the
    bytecode of its Lambda layers).
    """
    import zipfile

    from edgetl._tfenv import keras

    path = Path(path)
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as exc:
        raise ModelFileError(
            f"cannot read the float model {path}: {exc.strerror or exc}", "check the run directory"
        ) from None
    if not is_zip:
        raise ModelFileError(
            f"cannot load the float model {path}: it is not a .keras (zip) archive (truncated, corrupt, or another "
            "format such as HDF5, which edgetl does not load because it bypasses Keras safe mode)",
            "re-run `edgetl finetune` to rewrite it",
        )
    from edgetl.modelcheck import check_keras_file

    check_keras_file(path, "float model")  # before Keras reads it: nothing the file names is imported
    k = keras()
    try:
        return k.models.load_model(str(path), custom_objects=_custom_objects(), compile=False, safe_mode=True)
    except EdgetlError:
        raise
    except Exception as exc:  # Keras/h5py/zipfile raise many types for truncated or garbage files
        raise _unloadable("float model", path, exc, "re-run `edgetl finetune` to rewrite it") from None


def refuse_code_in_h5(path: Path, what: str) -> None:
    """tf_keras's HDF5 loader ignores safe mode: check the HDF5 model's config against edgetl's allow-list
    (:mod:`edgetl.modelcheck`) before Keras deserializes anything from it."""
    import zipfile

    from edgetl.modelcheck import check_h5_config, check_keras_file

    try:
        if zipfile.is_zipfile(path):
            check_keras_file(path, what, qat=True)
            return
        import h5py

        with h5py.File(path, "r") as fh:
            raw = fh.attrs.get("model_config")
    except (OSError, ValueError) as exc:
        raise ModelFileError(
            f"cannot read the {what} {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}",
            "re-run `edgetl finetune` to rewrite it",
        ) from None
    if raw is None:
        raise ModelFileError(
            f"cannot load the {what} {path}: it holds no readable model config",
            "re-run `edgetl finetune` to rewrite it",
        )
    check_h5_config(raw, path, what)


def check_model_fits(model: Any, run: RunInfo, path: Path) -> None:
    """The model's input size and class count must match the run's manifest/labels (both can be edited by hand)."""
    try:
        in_shape = tuple(model.input_shape)
        n_out = int(model.output_shape[-1])
    except (AttributeError, TypeError, ValueError, IndexError):
        raise ModelFileError(
            f"{path} is not a single-input, single-output classifier", "re-run `edgetl finetune`"
        ) from None
    if n_out != len(run.labels):
        raise ModelFileError(
            f"{path.name} outputs {n_out} classes but the run lists {len(run.labels)} labels (labels.txt / manifest.json)",
            "restore the run's labels.txt and manifest.json, or re-run `edgetl finetune`",
        )
    height, width = run.image_size
    if len(in_shape) == 4 and (in_shape[1] not in (None, height) or in_shape[2] not in (None, width)):
        raise ModelFileError(
            f"{path.name} takes {in_shape[1]}x{in_shape[2]} images but the run's manifest says {height}x{width}",
            "restore the run's manifest.json, or re-run `edgetl finetune`",
        )


@dataclass
class BuildContext:
    run: RunInfo
    workdir: Path
    calibration_loader: Callable[[], np.ndarray]
    cache: dict[str, Any] = field(default_factory=dict)

    def float_model(self):
        if "float_model" not in self.cache:
            model = load_float_model(self.run.float_model)
            check_model_fits(model, self.run, self.run.float_model)
            self.cache["float_model"] = model
        return self.cache["float_model"]

    def qat_model(self):
        if self.run.qat_model is None:
            raise ExportError(
                f"run {self.run.path} has no QAT model (qat.h5)",
                "run `edgetl finetune` with QAT enabled, or pick --quantization ptq_int8 / ort_static_int8",
            )
        if "qat_model" not in self.cache:
            qat = qat_module()
            refuse_code_in_h5(self.run.qat_model, "QAT model")
            try:
                model = qat.load_qat_model(self.run.qat_model)
            except EdgetlError:
                raise
            except Exception as exc:  # Keras/h5py/zipfile raise many types for truncated or garbage files
                raise _unloadable(
                    "QAT model", self.run.qat_model, exc, "re-run `edgetl finetune` with QAT to rewrite it"
                ) from None
            check_model_fits(model, self.run, self.run.qat_model)
            self.cache["qat_model"] = model
        return self.cache["qat_model"]

    def calibration_images(self) -> np.ndarray:
        """uint8 (N, H, W, 3) training images for calibration (loaded once)."""
        if "calibration" not in self.cache:
            self.cache["calibration"] = self.calibration_loader()
        return self.cache["calibration"]
