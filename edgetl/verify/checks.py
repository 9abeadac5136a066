"""Metrics and pass/fail checks for one artifact against the reference (TensorFlow-free, numpy only).

Every check that fails adds one human-readable string naming the check, the measured value and the
threshold; all failures are collected (none short-circuits the others) so one run shows everything wrong.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgetl.errors import ConfigError


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits. Defaults are deliberately strict: an export should not be worse than the original.

    * ``max_accuracy_drop`` (percentage points): reference top-1 accuracy minus the artifact's, on the same images.
    * ``min_agreement`` (0..1): share of images where the artifact's top-1 class equals the reference's.
      0.95 suits int8 (quantization flips a few borderline images); float artifacts are held to the much
      stricter output tolerances below, which imply agreement except on exact ties.
    * ``max_latency_ratio``: artifact p50 latency / reference p50 latency, measured in the same run.
      1.0 means "no slower than the original"; raise it (e.g. 1.2) to tolerate timing noise on tiny models.
    * ``float_tolerance``: max |probability difference| vs the reference for fp32 artifacts (only rounding-order
      differences are expected).
    * ``fp16_tolerance``: the same for fp16 artifacts (half precision weights/activations: ~1e-3 typical).
    """

    max_accuracy_drop: float = 1.0
    min_agreement: float = 0.95
    max_latency_ratio: float = 1.0
    float_tolerance: float = 1e-4
    fp16_tolerance: float = 1e-2

    def __post_init__(self) -> None:
        for name in ("max_accuracy_drop", "max_latency_ratio", "float_tolerance", "fp16_tolerance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be a number >= 0 (got {value!r})", f"pass e.g. {flag} {getattr(Thresholds, name)}")
        if not isinstance(self.min_agreement, (int, float)) or not 0.0 <= self.min_agreement <= 1.0:
            raise ConfigError(
                f"--min-agreement must be between 0 and 1 (got {self.min_agreement!r})", "pass e.g. --min-agreement 0.95"
            )
        if self.max_latency_ratio == 0:
            raise ConfigError("--max-latency-ratio must be > 0", "pass e.g. --max-latency-ratio 1.0")

    def output_tolerance(self, quantization: str) -> float | None:
        """Max abs diff allowed for this quantization (None: not checked, e.g. int8)."""
        if quantization == "fp32":
            return self.float_tolerance
        if quantization == "fp16":
            return self.fp16_tolerance
        return None

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class LatencyStats:
    p50: float
    p90: float
    p99: float
    mean: float
    runs: int

    @classmethod
    def from_ms(cls, times: np.ndarray) -> LatencyStats:
        times = np.asarray(times, dtype=np.float64)
        if times.size == 0:
            return cls(float("nan"), float("nan"), float("nan"), float("nan"), 0)
        p50, p90, p99 = np.percentile(times, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(times.mean()), int(times.size))

    def to_dict(self) -> dict[str, float]:
        return {"p50": self.p50, "p90": self.p90, "p99": self.p99, "mean": self.mean, "runs": self.runs}


@dataclass(frozen=True)
class OutputMetrics:
    accuracy: float
    top1_agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    finite: bool


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(outputs, axis=1) == labels))


def compare_outputs(outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> OutputMetrics:
    """Top-1 accuracy on ``labels``, top-1 agreement and probability differences vs ``reference``."""
    outputs = np.asarray(outputs, dtype=np.float32)
    reference = np.asarray(reference, dtype=np.float32)
    finite = bool(np.all(np.isfinite(outputs)))
    diff = np.abs(outputs.astype(np.float64) - reference.astype(np.float64))
    if not finite:
        diff = np.where(np.isfinite(diff), diff, np.inf)
    return OutputMetrics(
        accuracy=accuracy(outputs, labels),
        top1_agreement=float(np.mean(np.argmax(outputs, axis=1) == np.argmax(reference, axis=1))),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        finite=finite,
    )


@dataclass
class ArtifactResult:
    name: str
    file: str
    format: str
    quantization: str
    runtime: str
    accuracy: float
    accuracy_drop_pp: float
    top1_agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    latency: LatencyStats
    latency_ratio: float | None
    size_bytes: int
    is_reference: bool = False
    failures: list[str] = field(default_factory=list)
    predictions: np.ndarray | None = field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "format": self.format,
            "quantization": self.quantization,
            "runtime": self.runtime,
            "is_reference": self.is_reference,
            "accuracy": self.accuracy,
            "accuracy_drop_pp": self.accuracy_drop_pp,
            "top1_agreement": self.top1_agreement,
            "max_abs_diff": _json_float(self.max_abs_diff),
            "mean_abs_diff": _json_float(self.mean_abs_diff),
            "latency_ms": self.latency.to_dict(),
            "latency_ratio": self.latency_ratio,
            "size_bytes": self.size_bytes,
            "passed": self.passed,
            "failures": list(self.failures),
        }


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


def check(
    result: ArtifactResult, metrics: OutputMetrics, reference_latency: LatencyStats | None, thresholds: Thresholds
) -> list[str]:
    """Return every failed check for ``result`` as a human string (empty list: it passes)."""
    failures: list[str] = []
    if not metrics.finite:
        failures.append("outputs: contain NaN or Inf")
    if result.accuracy_drop_pp > thresholds.max_accuracy_drop + 1e-9:
        failures.append(
            f"accuracy_drop_pp: {result.accuracy_drop_pp:.2f} pp > max {thresholds.max_accuracy_drop:g} pp "
            f"(accuracy {result.accuracy:.4f})"
        )
    if result.top1_agreement < thresholds.min_agreement - 1e-12:
        failures.append(f"top1_agreement: {result.top1_agreement:.4f} < min {thresholds.min_agreement:g}")
    tolerance = thresholds.output_tolerance(result.quantization)
    if tolerance is not None and not result.max_abs_diff <= tolerance:
        which = "--fp16-tolerance" if result.quantization == "fp16" else "--float-tolerance"
        failures.append(
            f"max_abs_diff: {result.max_abs_diff:.3g} > {which} {tolerance:g} ({result.quantization} outputs must match the reference)"
        )
    if result.latency_ratio is not None and result.latency_ratio > thresholds.max_latency_ratio:
        ref = reference_latency.p50 if reference_latency else float("nan")
        failures.append(
            f"latency_ratio: {result.latency_ratio:.2f} > max {thresholds.max_latency_ratio:g} "
            f"(p50 {result.latency.p50:.3f} ms vs reference {ref:.3f} ms)"
        )
    return failures
