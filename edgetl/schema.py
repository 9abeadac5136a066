"""The files edgetl writes, as pydantic models (TF-free): the run manifest, ``bundle.json`` with its artifact
records, and the verify ``report.json`` (docs/formats.md).

Writers build or validate a model and write :meth:`Doc.dump`; readers call :func:`parse`, which turns pydantic's
report into the caller's typed error (edgetl.errors) as one line naming the field. What cannot be checked from the
document alone (paths on disk, checksums, the sample arrays) is checked by the readers (edgetl.rundir,
edgetl.verify.bundle). The formats and quantizations are defined here, once; export's variant table uses them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from edgetl.errors import EdgetlError

RUN_SCHEMA = "edgetl.run/1"
BUNDLE_SCHEMA = "edgetl.bundle/1"
REPORT_SCHEMA = "edgetl.verify/2"

Format = Literal["tflite", "onnx"]
Quantization = Literal["fp32", "fp16", "dynamic_int8", "ptq_int8", "qat_int8", "ort_static_int8"]
IODtype = Literal["float32", "float16", "uint8", "int8"]
Source = Literal["float.keras", "qat.h5"]  # the model an artifact was converted from

FORMATS: tuple[str, ...] = get_args(Format)
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
#: Quantizations whose outputs must match the reference to ``float_tolerance``/``fp16_tolerance``.
FLOAT_QUANTIZATIONS = ("fp32", "fp16")
QUANTIZED_DTYPES = ("uint8", "int8")
SOURCE_FLOAT, SOURCE_QAT = get_args(Source)

Int = Annotated[int, Strict()]  # JSON true/false and 3.0 are not integers here
Finite = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # (a JSON integer is a float too)
Positive = Annotated[int, Strict(), Field(gt=0)]
#: [scale, zero_point] of a quantized input/output
Quant = tuple[Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)], Int]


def _sha256(value: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise ValueError(f"is not a sha256 hex digest (got {value[:70]!r})")
    return value


Sha256 = Annotated[str, AfterValidator(_sha256)]


class Doc(BaseModel):
    """Unknown keys are ignored (a later edgetl may add some); :meth:`dump` writes what was set, in field order."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True, by_alias=True)


class InputContract(Doc):
    """What the model takes: NHWC float32 RGB in ``range``."""

    layout: Literal["NHWC"] = "NHWC"
    height: Positive
    width: Positive
    channels: Literal[3] = 3
    color: Literal["RGB"] = "RGB"  # an artifact's own metadata may say BGR (verify.runners adopts it)
    dtype: Literal["float32"] = "float32"
    range: tuple[Finite, Finite] = (0.0, 255.0)
    preprocessing: str | None = None  # run manifests: how the network sees 0..255 (for people; not in bundles)

    @field_validator("range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"must be [low, high] with low < high (got {list(value)})")
        return value


class ArtifactRecord(Doc):
    """One entry of ``bundle.json`` ``artifacts``: the *claim*; verify's runners check it against the model."""

    name: Annotated[str, Field(min_length=1)]
    file: str
    format: Format
    quantization: Quantization
    input_name: str | None = None
    input_shape: list[Any] | None = None
    input_dtype: IODtype = "float32"
    input_quant: Quant | None = None
    output_name: str | None = None
    output_dtype: IODtype = "float32"
    output_quant: Quant | None = None
    size_bytes: Int | None = None
    sha256: Sha256 | None = None
    #: default: qat.h5 for qat_int8, else float.keras (bundles that do not say)
    source: Source | None = Field(None, validate_default=True)
    opset: Int | None = None

    @field_validator("source")
    @classmethod
    def _source(cls, value: str | None, info: Any) -> str:
        return value or (SOURCE_QAT if info.data.get("quantization") == "qat_int8" else SOURCE_FLOAT)

    @model_validator(mode="after")
    def _quant_matches_dtype(self) -> ArtifactRecord:
        for key in ("input", "output"):
            dtype, quant = getattr(self, f"{key}_dtype"), getattr(self, f"{key}_quant")
            if (dtype in QUANTIZED_DTYPES) != (quant is not None):
                need = "needs" if quant is None else "must not have"
                raise ValueError(
                    f"artifact {self.name!r} has a {dtype} {key}, so it {need} {key}_quant [scale, zero_point]"
                )
        return self

    @property
    def is_float(self) -> bool:
        return self.quantization in FLOAT_QUANTIZATIONS

    @property
    def is_int8(self) -> bool:
        return "int8" in self.quantization


class SampleRecord(Doc):
    """``bundle.json`` ``sample``: held-out images, labels and the source models' outputs (relative .npy paths)."""

    images: str
    labels: str
    reference_outputs: str
    count: Int | None = None
    split: str | None = None
    seed: Int | None = None
    reference_model: str | None = None
    source_outputs: dict[Source, str] | None = None


class Bundle(Doc):
    """``bundle.json``: everything verify needs to check the artifacts beside it."""

    schema_: str = Field(alias="schema")
    edgetl_version: str | None = None
    created: str | None = None
    run_id: str | None = None
    backbone: str | None = None
    labels: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=2)]
    input: InputContract
    output: dict[str, Any] | None = None
    reference: str | None = None
    artifacts: Annotated[list[ArtifactRecord], Field(min_length=1)]
    sample: SampleRecord
    calibration: dict[str, Any] | None = None
    source_run: dict[str, Any] | None = None
    notes: list[str] | None = None
    files: Annotated[dict[str, Sha256], Field(min_length=1)]  # relpath -> sha256 of every file but bundle.json

    @model_validator(mode="after")
    def _consistent(self) -> Bundle:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("`labels` has duplicate class names")
        names = [a.name for a in self.artifacts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate artifact name(s) {', '.join(dupes)}")
        if self.reference is not None:
            if self.reference not in names:
                raise ValueError(f"reference {self.reference!r} is not one of the artifacts ({', '.join(names)})")
            ref = self.artifacts[names.index(self.reference)]
            if ref.quantization != "fp32":  # the float32 ONNX artifact, or tflite fp32 when no ONNX was exported
                raise ValueError(
                    f"reference {self.reference!r} is a {ref.quantization} {ref.format} artifact; "
                    "it must be a float32 (fp32) artifact"
                )
        return self


class RunManifest(Doc):
    """``manifest.json`` of a run directory. The fields export and verify read are typed; finetune's other records
    (weights, freeze, config, versions, data, metrics...) are kept as written."""

    model_config = ConfigDict(extra="allow")

    schema_: str = Field(alias="schema")
    edgetl_version: str | None = None
    run_id: str | None = None
    backbone: str | None = None
    image_size: tuple[Positive, Positive] | None = None  # [height, width]; a single number means square
    labels: list[str] | None = None  # (else labels.txt)
    input: InputContract | None = None
    seed: Int | None = None
    phases: dict[str, dict[str, Any]] | None = None
    files: dict[str, str] | None = None  # file name -> sha256 ("" for a file that must not be checked)

    @field_validator("image_size", mode="before")
    @classmethod
    def _square(cls, value: Any) -> Any:
        return [value, value] if isinstance(value, int) and not isinstance(value, bool) else value

    @property
    def size(self) -> tuple[int, int] | None:
        """(height, width) from ``image_size``, else from ``input``."""
        if self.image_size is None and self.input is not None:
            return self.input.height, self.input.width
        return self.image_size


class Report(Doc):
    """``report.json`` of ``edgetl verify``. The per-artifact and reference records are ArtifactResult.to_dict and
    ReferenceInfo.to_dict (edgetl.verify)."""

    schema_: Literal["edgetl.verify/2"] = Field(alias="schema")
    verdict: Literal["PASS", "FAIL", "INCONCLUSIVE"]
    exit_code: Literal[0, 1, 4]
    passed: bool
    created: str
    target: str
    bundle: str
    run_id: str | None
    data: str
    samples: Int
    labels: list[str]
    reference: dict[str, Any]
    artifacts: list[dict[str, Any]]
    failures: list[str]
    inconclusive: list[str]
    reference_per_class: dict[str, Any] | None
    thresholds: dict[str, Any]
    machine: dict[str, Any]
    warnings: list[str]


M = TypeVar("M", bound=Doc)


def _where(loc: tuple[Any, ...]) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc if p != "[key]"]
    return "".join(parts).lstrip(".").replace("schema_", "schema")


def read_json(path: Path, error: Callable[[str], EdgetlError]) -> dict[str, Any]:
    """The JSON object in ``path``; anything else (unreadable, not JSON, not an object) is ``error(one line)``."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # (JSONDecodeError, UnicodeDecodeError, an integer of 5,000 digits)
        raise error(
            f"{path} is not valid JSON ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    except RecursionError:
        raise error(f"{path} is nested too deeply to be an edgetl file") from None
    if not isinstance(raw, dict):
        raise error(f"{path} is not a JSON object")
    return raw


def parse(model: type[M], raw: Any, what: str, error: Callable[[str], EdgetlError]) -> M:
    """Validate ``raw`` (parsed JSON) as ``model``; the first problem becomes ``error("WHAT: `field` ...")``."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where, message = _where(first["loc"]), first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            raise error(f"{what}: `{where}` is missing") from None
        if first["type"] != "value_error":  # pydantic's "Input should be ...", "List should have ..."
            message = f"{message.split(' ', 1)[1]} (got {first['input']!r:.60})"
        raise error(f"{what}: `{where}` {message}" if where else f"{what}: {message}") from None
