"""Typed configuration for every stage, shared by CLI flags and YAML recipes (pydantic, TF-free).

Unknown or misspelt keys fail with a suggestion; wrong types fail naming the key and the expected type.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgetl.backbones import BACKBONES
from edgetl.errors import ConfigError
from edgetl.schema import Format

#: Training images used to calibrate int8 ranges, in finetune (QAT ranges, the PTQ file it measures) and in export
#: (ptq_int8, ort_static_int8): one count, so export's PTQ files see as many images as the one finetune measured.
CALIBRATION_IMAGES = 256

#: The head phase's cached features are held in memory up to this many bytes per dataset (the training split with
#: all its views is one, the validation split another) and read from their files above it: peak memory stays
#: bounded on large data sets, while small ones train from RAM (a tf.data gather per batch, not a Python read).
FEATURES_IN_MEMORY_BYTES = 64 * 2**20

#: Images per forward pass when the head phase caches features (or the batch size, if larger): inference only,
#: so a larger batch is cheaper per image and its memory is still bounded.
FEATURE_BATCH = 64

#: Batches the head phase runs per call into TensorFlow: its steps are tiny (a dense layer on cached features), so
#: Keras' per-step overhead would dominate them.
HEAD_STEPS_PER_EXECUTION = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class Augment(_Strict):
    flip: bool = Field(True, description="Random horizontal flips.")
    rotation: float = Field(0.05, ge=0, le=0.5, description="Max random rotation, fraction of a full turn.")
    zoom: float = Field(0.1, ge=0, le=0.5, description="Max random zoom in/out, fraction.")
    contrast: float = Field(0.1, ge=0, le=1, description="Max random contrast change, fraction.")


class FinetuneConfig(_Strict):
    """`edgetl finetune`'s settings. Each key is a flag of the command (augment.rotation: --augment-rotation); the
    flags' defaults and help are these fields' (edgetl/cli/_common.py: option)."""

    data: str = Field(..., description="Folder with one sub-folder of images per class.")
    val_data: Optional[str] = Field(None, description="Separate labelled validation folder (instead of val_split).")
    val_split: float = Field(0.2, gt=0, lt=1, description="Stratified, seeded validation fraction.")
    backbone: str = Field("mobilenet_v3_small", description="Pretrained backbone: " + " | ".join(BACKBONES) + ".")
    weights: str = Field(
        "imagenet",
        description="imagenet (looks in weights_dir / $EDGETL_WEIGHTS_DIR first) | none | PATH to a Keras .h5 file.",
    )
    weights_dir: Optional[str] = Field(
        None, description="Folder searched first for Keras's imagenet weight files (by their own names)."
    )
    image_size: Optional[int] = Field(None, description="Square input size in pixels (default: the backbone's).")
    epochs: int = Field(15, ge=1, le=1000, description="Head-phase epochs (early stopping on val accuracy).")
    fine_tune_epochs: int = Field(0, ge=0, le=1000, description="Epochs fine-tuning the unfrozen top of the backbone.")
    head_lr: float = Field(1e-3, gt=0, le=1, description="Learning rate of the head phase.")
    fine_tune_lr: Optional[float] = Field(
        None,
        gt=0,
        le=1,
        description="Fine-tune learning rate (default: 5e-5, 10-100x below head_lr, with "
        "pretrained weights; 2e-3 with weights none: training from scratch).",
    )
    freeze: str = Field(
        "auto",
        description="auto | all | none | early | mid | late | LAYER_NAME | fraction 0..1 "
        "(with weights none, auto freezes nothing).",
    )
    domain: Literal["similar", "different"] = Field(
        "similar", description="similar | different: how close your photos are to ImageNet (for freeze auto)."
    )
    batch_size: int = Field(32, ge=1, le=4096, description="Batch size.")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout rate before the classifier layer.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy loss.")
    augment: Augment = Field(default_factory=Augment)
    feature_views: int = Field(2, ge=0, le=20, description="Augmented views per image cached for the head phase.")
    patience: int = Field(4, ge=1, le=100, description="Early-stopping patience (epochs).")
    qat: bool = Field(True, description="Quantization-aware training (phase 3).")
    qat_epochs: int = Field(6, ge=1, le=100, description="QAT epochs; early stopping keeps the best.")
    qat_lr: float = Field(3e-5, gt=0, le=1, description="QAT learning rate.")
    calibration_images: int = Field(
        CALIBRATION_IMAGES,
        ge=8,
        le=10000,
        description="Training images that initialise the QAT model's int8 ranges "
        "(and calibrate the PTQ int8 file whose accuracy finetune reports).",
    )
    seed: int = Field(0, ge=0, lt=2**32, description="Random seed, 0 .. 2**32-1 (recorded in the manifest).")
    out: Optional[str] = Field(
        None, description="Run directory (default models/NAME, or models/<data folder>-<backbone>)."
    )
    name: Optional[str] = Field(None, description="Run name: the run directory is models/NAME unless out is set.")
    skip_bad_images: bool = Field(False, description="Skip unreadable images (counted) instead of failing.")

    @field_validator("val_split", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("must be a number")
        return v


class ExportConfig(_Strict):
    """`edgetl export`'s settings (recipe keys = flags, defaults and help from here)."""

    format: Literal[Format, "all"] = Field("all", description="tflite, onnx or all (repeat or comma-separate).")
    quantization: list[str] = Field(
        default_factory=lambda: ["default"],
        description="Variants to build: default, fp32, fp16, dynamic_int8, ptq_int8, qat_int8, ort_static_int8, all "
        "(repeat or comma-separate; each applies to the chosen formats that offer it). default: fp32 + qat_int8 "
        "(ptq_int8 / ort_static_int8 when the run has no QAT model).",
    )
    samples: int = Field(
        200, ge=1, le=100000, description="Held-out validation images stored in the bundle (stratified, seeded)."
    )
    calibration_images: int = Field(
        CALIBRATION_IMAGES,
        ge=1,
        le=100000,
        description="Training images used to calibrate ptq_int8 and "
        "ort_static_int8. QAT int8 variants use none: their ranges were learnt in finetune's QAT phase.",
    )
    out: Optional[str] = Field(
        None,
        description="Bundle folder (default RUN_DIR/export). Replaced as a whole, and "
        "only with --force when it already holds a bundle.",
    )


class VerifyConfig(_Strict):
    """`edgetl verify`'s settings (recipe keys = flags). The check limits' defaults live here; Thresholds
    (edgetl.verify.checks) takes its defaults from these fields."""

    data: Optional[str] = Field(
        None,
        description="Evaluate on this labelled folder (one sub-folder per class, names = the bundle labels) "
        "instead of the bundle sample; reference outputs then come from running the reference model.",
    )
    threads: int = Field(1, ge=1, le=256, description="CPU threads per inference for every runtime.")
    runs: int = Field(100, ge=1, le=100000, description="Timed batch-1 inferences per model.")
    warmup: int = Field(10, ge=0, le=10000, description="Untimed inferences per model before timing.")
    margin_pp: float = Field(
        2.0,
        ge=0,
        description="Accuracy non-inferiority margin: an artifact passes when the confidence interval of "
        "(float accuracy - its accuracy) on the same images lies below PP percentage points.",
    )
    confidence: float = Field(0.95, ge=0.5, lt=1, description="Two-sided level of that interval (0.5..1).")
    fail_confidence: float = Field(
        0.998,
        ge=0.5,
        lt=1,
        description="An artifact fails the accuracy check only when the lower end of the interval at this stricter "
        "two-sided level is above the margin (0.998: an honest artifact is called worse at most ~0.1% of the time; "
        "between the two: inconclusive).",
    )
    min_agreement: float = Field(
        0.70,
        ge=0,
        le=1,
        description="int8 artifacts fail when their top-1 class equals their source model's on less than this share.",
    )
    max_mean_diff: float = Field(
        0.06,
        ge=0,
        description="int8 artifacts fail when their mean |probability difference| to their source model exceeds D.",
    )
    float_tolerance: float = Field(
        1e-4,
        gt=0,
        description="fp32 artifacts fail if any output probability differs from their source model's by more than T.",
    )
    fp16_tolerance: float = Field(
        1e-2,
        gt=0,
        description="fp16 artifacts fail if any output probability differs from their source model's by more than T.",
    )
    max_latency_ratio: float = Field(
        1.0,
        gt=0,
        description="int8 artifacts fail when their p50 exceeds (R + latency noise) x the same runtime's fp32 p50.",
    )
    latency_noise: float = Field(
        0.10, ge=0, description="Allowance for timing noise added to the max latency ratio (0.10: 10%)."
    )
    max_p50_ms: Optional[float] = Field(None, gt=0, description="Fail any artifact whose p50 exceeds MS.")
    max_p99_ms: Optional[float] = Field(None, gt=0, description="Fail any artifact whose p99 exceeds MS.")
    bundle_sample: bool = Field(
        False, description="On a run directory: evaluate on the bundle sample, not the whole validation split."
    )
    report: Optional[str] = Field(
        None, description="Write report.json, report.md and plots here (default: BUNDLE/verify/)."
    )

    def thresholds(self):
        """The recipe's check limits."""
        from edgetl.verify.checks import Thresholds

        return Thresholds(**{k: getattr(self, k) for k in THRESHOLD_KEYS})


#: The VerifyConfig keys that are check limits (the fields of edgetl.verify.checks.Thresholds).
THRESHOLD_KEYS = (
    "margin_pp",
    "confidence",
    "fail_confidence",
    "min_agreement",
    "max_mean_diff",
    "float_tolerance",
    "fp16_tolerance",
    "max_latency_ratio",
    "latency_noise",
    "max_p50_ms",
    "max_p99_ms",
)


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
        raise ConfigError(
            f"recipe {path} does not exist" if not path.exists() else f"recipe {path} is not a file",
            "pass the path of a YAML recipe, e.g. recipes/quickstart.yaml",
        )
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
