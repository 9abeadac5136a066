"""Typed configuration for every stage, shared by CLI flags and YAML recipes (pydantic, TF-free).

Unknown or misspelt keys fail with a suggestion; wrong types fail naming the key and the expected type.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgetl.errors import ConfigError
from edgetl.schema import Format


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class Augment(_Strict):
    flip: bool = Field(True, description="random horizontal flips")
    rotation: float = Field(0.05, ge=0, le=0.5, description="max rotation, fraction of a full turn")
    zoom: float = Field(0.1, ge=0, le=0.5, description="max zoom in/out fraction")
    contrast: float = Field(0.1, ge=0, le=1, description="max contrast change fraction")


class FinetuneConfig(_Strict):
    data: str = Field(..., description="folder with one sub-folder of images per class")
    val_data: Optional[str] = Field(None, description="separate labelled validation folder (else --val-split)")
    val_split: float = Field(0.2, gt=0, lt=1, description="stratified validation fraction")
    backbone: str = "mobilenet_v3_small"
    weights: str = Field("imagenet", description="imagenet | none | PATH to a Keras .h5 file")
    weights_dir: Optional[str] = Field(None, description="folder searched first for Keras's imagenet weight files")
    image_size: Optional[int] = Field(None, description="square input size in pixels (default: the backbone's)")
    epochs: int = Field(15, ge=1, le=1000, description="head-phase epochs (early stopping on val accuracy)")
    fine_tune_epochs: int = Field(0, ge=0, le=1000, description="epochs training the unfrozen top of the backbone")
    head_lr: float = Field(1e-3, gt=0, le=1)
    fine_tune_lr: Optional[float] = Field(
        None, gt=0, le=1, description="default: 5e-5 (10-100x lower than head_lr) with pretrained weights, 2e-3 with weights none"
    )
    freeze: str = Field("auto", description="auto | all | none | early/mid/late | LAYER_NAME | fraction 0..1")
    domain: Literal["similar", "different"] = Field("similar", description="how close your photos are to ImageNet")
    batch_size: int = Field(32, ge=1, le=4096)
    dropout: float = Field(0.2, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: Augment = Field(default_factory=Augment)
    feature_views: int = Field(2, ge=0, le=20, description="augmented views per image cached for the head phase")
    patience: int = Field(4, ge=1, le=100, description="early-stopping patience (epochs)")
    qat: bool = Field(True, description="run quantization-aware training (phase 3)")
    qat_epochs: int = Field(6, ge=1, le=100, description="QAT epochs (early stopping keeps the best)")
    qat_lr: float = Field(3e-5, gt=0, le=1)
    calibration_images: int = Field(256, ge=8, le=10000, description="training images used to calibrate int8 ranges")
    seed: int = Field(0, ge=0, lt=2**32, description="random seed, 0 .. 2**32-1 (NumPy's range)")
    out: Optional[str] = Field(None, description="run directory (default models/<name>)")
    name: Optional[str] = None
    skip_bad_images: bool = False

    @field_validator("val_split", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("must be a number")
        return v


class ExportConfig(_Strict):
    format: Literal[Format, "all"] = "all"
    quantization: list[str] = Field(default_factory=lambda: ["default"])
    samples: int = Field(200, ge=1, le=100000)
    out: Optional[str] = None


class VerifyConfig(_Strict):
    data: Optional[str] = None
    threads: int = Field(1, ge=1, le=256)
    runs: int = Field(100, ge=1, le=100000)
    warmup: int = Field(10, ge=0, le=10000)
    # Check limits: None = the default in edgetl.verify.checks.Thresholds (the one place they live).
    margin_pp: Optional[float] = Field(None, ge=0)
    confidence: Optional[float] = Field(None, ge=0.5, lt=1)
    min_agreement: Optional[float] = Field(None, ge=0, le=1)
    max_mean_diff: Optional[float] = Field(None, ge=0)
    float_tolerance: Optional[float] = Field(None, gt=0)
    fp16_tolerance: Optional[float] = Field(None, gt=0)
    max_latency_ratio: Optional[float] = Field(None, gt=0)
    latency_noise: Optional[float] = Field(None, ge=0)
    max_p50_ms: Optional[float] = Field(None, gt=0)
    max_p99_ms: Optional[float] = Field(None, gt=0)
    bundle_sample: bool = False
    report: Optional[str] = None


    def thresholds(self):
        """The recipe's check limits, the defaults for those it does not set."""
        from edgetl.verify.checks import Thresholds

        keys = ("margin_pp", "confidence", "min_agreement", "max_mean_diff", "float_tolerance", "fp16_tolerance",
                "max_latency_ratio", "latency_noise", "max_p50_ms", "max_p99_ms")
        return Thresholds(**{k: getattr(self, k) for k in keys if getattr(self, k) is not None})


class Recipe(_Strict):
    name: Optional[str] = None
    stages: list[Literal["finetune", "export", "verify"]] = Field(
        default_factory=lambda: ["finetune", "export", "verify"]
    )
    finetune: FinetuneConfig
    export: ExportConfig = Field(default_factory=ExportConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys at the location of an error (to suggest the nearest)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        for arg in getattr(ann, "__args__", ()):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def explain(exc: ValidationError, model: type[BaseModel], where: str) -> ConfigError:
    """Turn pydantic's report into one line: the first problem, with a suggestion."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        valid = _fields_at(model, loc)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
        more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
        return ConfigError(f"{where}: unknown key {key!r}{more}", hint)
    if err["type"] == "missing":
        return ConfigError(f"{where}: required key {key!r} is missing", f"add {key}: ... to it")
    got = err.get("input")
    got_text = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    if len(got_text) > 60:
        got_text = got_text[:57] + "..."
    return ConfigError(f"{where}: {key} = {got_text} is invalid ({err['msg'].lower()})", f"fix {key} in it")


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe safely (yaml.safe_load) and validate it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist" if not path.exists() else f"recipe {path} is not a file",
                          "pass the path of a YAML recipe, e.g. recipes/quickstart.yaml")
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not UTF-8 text", "save it as a UTF-8 YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"recipe {path} is not valid YAML{at}", "fix the YAML syntax") from None
    return parse_recipe(raw, str(path), base_dir=path.parent)


def parse_recipe(raw: Any, where: str = "recipe", base_dir: Path | None = None) -> Recipe:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a YAML mapping of stage settings", "see recipes/quickstart.yaml")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise explain(exc, Recipe, where) from None
    except (TypeError, ValueError) as exc:  # pydantic can raise these for exotic inputs
        raise ConfigError(f"{where} is invalid: {exc}", "see recipes/quickstart.yaml") from None
    return recipe


def validate(model: type[BaseModel], values: dict, where: str) -> Any:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise explain(exc, model, where) from None
