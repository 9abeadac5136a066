"""What a variant builder gets: the run, lazily loaded models and calibration images, a scratch folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgetl.errors import ExportError, ModelFileError
from edgetl.rundir import RunInfo


def quantize_module():
    """``edgetl.quantize`` (written alongside export), imported lazily; ExportError if it is not there."""
    try:
        from edgetl import quantize
    except ModuleNotFoundError as exc:
        if exc.name != "edgetl.quantize":
            raise
        raise ExportError(
            "int8 QAT/PTQ export needs edgetl.quantize, which this installation lacks",
            "reinstall edgetl, or export only fp32/fp16/dynamic_int8/ort_static_int8 variants",
        ) from None
    return quantize


def _custom_objects() -> dict[str, Any]:
    try:
        from edgetl import quantize
    except ModuleNotFoundError as exc:
        if exc.name != "edgetl.quantize":
            raise
        return {}
    getter = getattr(quantize, "custom_objects", None)
    return dict(getter()) if getter is not None else {}


def load_float_model(path: Path):
    from edgetl._tfenv import keras

    k = keras()
    try:
        return k.models.load_model(str(path), custom_objects=_custom_objects(), compile=False, safe_mode=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFileError(
            f"cannot load the float model {path}: {reason}", "re-run `edgetl finetune` to rewrite it"
        ) from None


@dataclass
class BuildContext:
    run: RunInfo
    workdir: Path
    calibration_loader: Callable[[], np.ndarray]
    cache: dict[str, Any] = field(default_factory=dict)

    def float_model(self):
        if "float_model" not in self.cache:
            self.cache["float_model"] = load_float_model(self.run.float_model)
        return self.cache["float_model"]

    def qat_model(self):
        if self.run.qat_model is None:
            raise ExportError(
                f"run {self.run.path} has no QAT model (qat.keras)",
                "run `edgetl finetune` with QAT enabled, or pick --quantization ptq_int8 / ort_static_int8",
            )
        if "qat_model" not in self.cache:
            quantize = quantize_module()
            try:
                self.cache["qat_model"] = quantize.load_qat_model(self.run.qat_model)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ModelFileError(
                    f"cannot load the QAT model {self.run.qat_model}: {reason}",
                    "re-run `edgetl finetune` with QAT to rewrite it",
                ) from None
        return self.cache["qat_model"]

    def calibration_images(self) -> np.ndarray:
        """uint8 (N, H, W, 3) training images for calibration (loaded once)."""
        if "calibration" not in self.cache:
            self.cache["calibration"] = self.calibration_loader()
        return self.cache["calibration"]
