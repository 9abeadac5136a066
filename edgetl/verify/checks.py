"""Metrics and verdicts for one artifact (TensorFlow-free, numpy only).

Three questions, one check each, every failure collected (none short-circuits the others):

* ``fidelity``: does the artifact compute what the model it was converted FROM computes? fp32/fp16 variants are
  compared with the float model's outputs (max |Δp| per precision), int8 variants with their source's outputs
  (the float model for dynamic/PTQ/ORT-static int8, the QAT model for QAT int8): top-1 agreement and mean |Δp|.
* ``accuracy``: is the artifact non-inferior to the ORIGINAL float model on labelled images? A paired comparison on
  the same images (Newcombe's hybrid-score interval for a difference of paired proportions, method 10): the
  drop (float accuracy - artifact accuracy) passes when the upper end of its confidence interval is within
  ``margin_pp``, fails when the lower end is above it, and is *inconclusive* otherwise (too few images to tell).
* ``latency``: is each int8 artifact no slower than the fp32 artifact of the SAME runtime (p50 ratio measured
  interleaved in one run, plus a stated noise allowance)? Optional absolute budgets ``max_p50_ms``/``max_p99_ms``
  apply to every artifact.

The limits' defaults (and their help) live in :class:`edgetl.config.VerifyConfig`; :class:`Thresholds` takes them
from there, and so do the verify command's flags.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from edgetl.config import THRESHOLD_KEYS, VerifyConfig
from edgetl.errors import ConfigError

PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"

#: ``edgetl verify`` exit status per overall verdict (2: bad input, 3: internal error, as for every command).
EXIT_CODES = {PASS: 0, FAIL: 1, INCONCLUSIVE: 4}


_DEFAULT = {k: VerifyConfig.model_fields[k].default for k in THRESHOLD_KEYS}


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits (defaults: :class:`edgetl.config.VerifyConfig`'s fields, the one place they live).

    * ``margin_pp``: non-inferiority margin, percentage points: an artifact passes ``accuracy`` when the
      ``confidence`` interval of (float accuracy - artifact accuracy) on the same images lies below it.
    * ``confidence``: two-sided level of that interval (0.95: a PASS is wrong at most ~2.5% of the time).
    * ``fail_confidence``: the stricter level a FAIL needs (0.998: an artifact within the margin is called worse at
      most ~0.1% of the time). At 0.95 for both, 54 honest runs of benchmarks/verdict_matrix.py (108 int8 tests)
      gave one false FAIL: flowers, 60 images, 8 broken / 1 fixed (95% lower end +2.34 pp), while on the 4,017
      images that run never saw the same files were 0.05 and 0.57 pp below the float model.
    * ``float_tolerance``: max |Δp| of an fp32 artifact vs its source model (only rounding-order differences).
    * ``fp16_tolerance``: the same for fp16 (half-precision weights round at ~1e-3).
    * ``min_agreement``: int8 artifacts: share of images whose top-1 class equals the source model's.
    * ``max_mean_diff``: int8 artifacts: mean |Δp| over images and classes vs the source model.
      Measured on honest runs (benchmarks/verdict_matrix.py, trashnet/flowers subsets at 96 px, 1 QAT epoch, 25-30
      held-out images): QAT int8 vs qat.h5 agreed on 0.73-0.84 of the images (barely trained models: uncertain
      outputs flip top-1 on small |Δp|), mean |Δp| 0.029-0.046; a collapsed int8 file agrees only on the share of
      one class and a class-swapped one far less. So agreement >= 0.70 and mean |Δp| <= 0.06.
    * ``max_latency_ratio``: int8 p50 / the same runtime's fp32 p50, measured interleaved (1.0: no slower) ...
    * ``latency_noise``: ... plus this allowance for timing noise (0.10: 10%).
    * ``max_p50_ms`` / ``max_p99_ms``: optional absolute budgets for every artifact (None: not checked).
    """

    margin_pp: float = _DEFAULT["margin_pp"]
    confidence: float = _DEFAULT["confidence"]
    fail_confidence: float = _DEFAULT["fail_confidence"]
    float_tolerance: float = _DEFAULT["float_tolerance"]
    fp16_tolerance: float = _DEFAULT["fp16_tolerance"]
    min_agreement: float = _DEFAULT["min_agreement"]
    max_mean_diff: float = _DEFAULT["max_mean_diff"]
    max_latency_ratio: float = _DEFAULT["max_latency_ratio"]
    latency_noise: float = _DEFAULT["latency_noise"]
    max_p50_ms: float | None = _DEFAULT["max_p50_ms"]
    max_p99_ms: float | None = _DEFAULT["max_p99_ms"]

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if value is None and f.name in ("max_p50_ms", "max_p99_ms"):
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or value < 0:
                default = f.default if f.default is not None else 50
                raise ConfigError(f"{flag} must be a number >= 0 (got {value!r})", f"pass e.g. {flag} {default}")
        for name in ("min_agreement", "confidence", "fail_confidence"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be between 0 and 1 (got {getattr(self, name)!r})",
                    f"pass e.g. --{name.replace('_', '-')} {getattr(Thresholds, name)}",
                )
        if not 0.5 <= self.confidence < 1.0:
            raise ConfigError(
                f"--confidence must be in [0.5, 1) (got {self.confidence!r})", "pass e.g. --confidence 0.95"
            )
        if not self.confidence <= self.fail_confidence < 1.0:
            raise ConfigError(
                f"--fail-confidence must be in [--confidence, 1) (got {self.fail_confidence!r} with --confidence "
                f"{self.confidence!r})",
                "pass e.g. --fail-confidence 0.998",
            )
        for name in ("max_latency_ratio", "max_p50_ms", "max_p99_ms"):
            if getattr(self, name) == 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be > 0", f"pass e.g. --{name.replace('_', '-')} 1.0"
                )

    @property
    def latency_limit(self) -> float:
        """The int8/fp32 p50 ratio above which ``latency`` fails."""
        return self.max_latency_ratio + self.latency_noise

    def output_tolerance(self, quantization: str) -> float | None:
        """Max |Δp| vs the source for this quantization (None: int8, checked by agreement and mean |Δp|)."""
        if quantization == "fp32":
            return self.float_tolerance
        if quantization == "fp16":
            return self.fp16_tolerance
        return None

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


DEFAULTS = Thresholds()
assert {f.name for f in fields(Thresholds)} == set(THRESHOLD_KEYS), "Thresholds and VerifyConfig disagree"


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


# --- accuracy non-inferiority --------------------------------------------------------------------------------


def _z(confidence: float) -> float:
    """Two-sided standard-normal quantile (numpy only: bisection on erf)."""
    target = 1.0 - (1.0 - confidence) / 2.0
    lo, hi = 0.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _wilson(successes: int, n: int, z: float) -> tuple[float, float]:
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class PairedAccuracy:
    """Float model vs artifact on the same ``n`` images; ``drop_pp`` and its interval in percentage points."""

    n: int
    both_right: int
    only_reference_right: int  # the artifact broke these
    only_artifact_right: int  # the artifact fixed these
    both_wrong: int
    drop_pp: float
    ci_low_pp: float
    ci_high_pp: float
    confidence: float
    margin_pp: float
    verdict: str
    fail_confidence: float  # the level whose lower end decides FAIL
    fail_low_pp: float  # that lower end

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        pct = round(self.confidence * 100)
        return (
            f"drop {self.drop_pp:+.2f} pp, {pct}% CI [{self.ci_low_pp:+.2f}, {self.ci_high_pp:+.2f}] pp vs margin "
            f"{self.margin_pp:g} pp on {self.n} images ({self.only_reference_right} broken, "
            f"{self.only_artifact_right} fixed)"
        )


def paired_accuracy(
    reference_pred: np.ndarray,
    artifact_pred: np.ndarray,
    labels: np.ndarray,
    margin_pp: float,
    confidence: float,
    fail_confidence: float | None = None,
) -> PairedAccuracy:
    """Newcombe (1998) method 10 interval for p_ref - p_art on paired images; verdict against ``margin_pp``: PASS
    when the upper end at ``confidence`` is within it, FAIL when the lower end at ``fail_confidence`` (default: the
    same level) is above it, else INCONCLUSIVE."""
    ref_ok = np.asarray(reference_pred) == labels
    art_ok = np.asarray(artifact_pred) == labels
    n = int(labels.shape[0])
    a = int(np.sum(ref_ok & art_ok))
    b = int(np.sum(ref_ok & ~art_ok))
    c = int(np.sum(~ref_ok & art_ok))
    d = n - a - b - c
    low, high = _newcombe(a, b, c, d, confidence)
    fail_confidence = confidence if fail_confidence is None else fail_confidence
    fail_low = _newcombe(a, b, c, d, fail_confidence)[0]
    if high <= margin_pp + 1e-9:
        verdict = PASS
    elif fail_low > margin_pp:
        verdict = FAIL
    else:
        verdict = INCONCLUSIVE
    drop = 100.0 * (b - c) / n
    return PairedAccuracy(n, a, b, c, d, drop, low, high, confidence, margin_pp, verdict, fail_confidence, fail_low)


def _newcombe(a: int, b: int, c: int, d: int, confidence: float) -> tuple[float, float]:
    """The interval (pp) of p_ref - p_art from the paired counts (both right, only ref, only artifact, neither)."""
    n = a + b + c + d
    z = _z(confidence)
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = _wilson(a + b, n, z)
    l2, u2 = _wilson(a + c, n, z)
    denom = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(denom) if denom > 0 else 0.0
    theta = p1 - p2
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    eps = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return 100.0 * (theta - delta), 100.0 * (theta + eps)


# --- results -------------------------------------------------------------------------------------------------


@dataclass
class ArtifactResult:
    name: str
    file: str
    format: str
    quantization: str
    runtime: str
    accuracy: float
    accuracy_drop_pp: float
    top1_agreement: float  # vs the source model (fidelity)
    max_abs_diff: float  # vs the source model
    mean_abs_diff: float  # vs the source model
    latency: LatencyStats
    latency_ratio: float | None  # p50 / the same runtime's fp32 p50 (int8 artifacts; None otherwise)
    size_bytes: int
    source: str = "float.keras"  # the model it was converted from
    latency_baseline: str | None = None  # the fp32 artifact it was timed against
    paired: PairedAccuracy | None = None
    per_class: dict[str, Any] | None = None
    is_reference: bool = False
    failures: list[str] = field(default_factory=list)
    inconclusive: list[str] = field(default_factory=list)
    predictions: np.ndarray | None = field(default=None, repr=False)
    artifact: str | None = None  # the bundle artifact (``name`` is ``artifact@engine`` in a non-default runtime)
    engine: str | None = None  # onnxruntime / litert / openvino
    #: every --threads count -> latency / int8-vs-fp32 ratio; ``latency``/``latency_ratio`` are the deployment count's
    latency_by_threads: dict[int, LatencyStats] = field(default_factory=dict)
    latency_ratio_by_threads: dict[int, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def verdict(self) -> str:
        return FAIL if self.failures else INCONCLUSIVE if self.inconclusive else PASS

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "artifact": self.artifact or self.name,
            "engine": self.engine,
            "file": self.file,
            "format": self.format,
            "quantization": self.quantization,
            "runtime": self.runtime,
            "source": self.source,
            "is_reference": self.is_reference,
            "accuracy": self.accuracy,
            "accuracy_drop_pp": self.accuracy_drop_pp,
            "accuracy_test": self.paired.to_dict() if self.paired else None,
            "top1_agreement": self.top1_agreement,
            "max_abs_diff": _json_float(self.max_abs_diff),
            "mean_abs_diff": _json_float(self.mean_abs_diff),
            "latency_ms": self.latency.to_dict(),
            "latency_ratio": self.latency_ratio,
            "latency_baseline": self.latency_baseline,
            "latency_ms_by_threads": {str(t): s.to_dict() for t, s in self.latency_by_threads.items()},
            "latency_ratio_by_threads": {str(t): r for t, r in self.latency_ratio_by_threads.items()},
            "size_bytes": self.size_bytes,
            "per_class": self.per_class,
            "verdict": self.verdict,
            "passed": self.passed,
            "failures": list(self.failures),
            "inconclusive": list(self.inconclusive),
        }


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


def check(
    result: ArtifactResult, thresholds: Thresholds, baseline: LatencyStats | None = None
) -> tuple[list[str], list[str]]:
    """``(failures, inconclusive)`` for ``result`` as human strings, each starting with the check's name."""
    failures: list[str] = []
    undecided: list[str] = []
    t = thresholds
    # A bundle without its source model's outputs (an older export): verify records NaN differences and a
    # "fidelity: not checked" note (INCONCLUSIVE); that is not a NaN in the outputs (verify checks those itself).
    unchecked = any(note.startswith("fidelity: not checked") for note in result.inconclusive)
    if not unchecked and (not math.isfinite(result.max_abs_diff) or not math.isfinite(result.mean_abs_diff)):
        failures.append("fidelity: outputs contain NaN or Inf")
    tolerance = t.output_tolerance(result.quantization)
    if tolerance is not None:
        if math.isfinite(result.max_abs_diff) and result.max_abs_diff > tolerance:
            flag = "--fp16-tolerance" if result.quantization == "fp16" else "--float-tolerance"
            failures.append(
                f"fidelity: max |Δp| {result.max_abs_diff:.3g} vs {result.source} > {flag} {tolerance:g} "
                f"({result.quantization} outputs must match the model they were converted from)"
            )
    else:
        if result.top1_agreement < t.min_agreement - 1e-12:
            failures.append(
                f"fidelity: top-1 agreement with {result.source} {result.top1_agreement:.4f} < "
                f"--min-agreement {t.min_agreement:g}"
            )
        if math.isfinite(result.mean_abs_diff) and result.mean_abs_diff > t.max_mean_diff:
            failures.append(
                f"fidelity: mean |Δp| vs {result.source} {result.mean_abs_diff:.4f} > "
                f"--max-mean-diff {t.max_mean_diff:g}"
            )
    if result.paired is not None:
        if result.paired.verdict == FAIL:
            failures.append(
                f"accuracy: {result.paired.describe()}: {result.paired.fail_confidence:.1%} CI lower end "
                f"{result.paired.fail_low_pp:+.2f} > --margin-pp {result.paired.margin_pp:g}: worse than the float model"
            )
        elif result.paired.verdict == INCONCLUSIVE:
            undecided.append(
                f"accuracy: inconclusive: {result.paired.n} images ({result.paired.describe()}); "
                "pass --data DIR with more labelled images"
            )
    if result.latency_ratio is not None and result.latency_ratio > t.latency_limit:
        base = baseline.p50 if baseline is not None else float("nan")
        failures.append(
            f"latency: p50 {result.latency.p50:.3f} ms is {result.latency_ratio:.2f}x {result.latency_baseline} "
            f"({base:.3f} ms, same runtime) > {t.max_latency_ratio:g} + {t.latency_noise:g} noise allowance"
        )
    if t.max_p50_ms is not None and result.latency.p50 > t.max_p50_ms:
        failures.append(f"latency budget: p50 {result.latency.p50:.3f} ms > --max-p50-ms {t.max_p50_ms:g}")
    if t.max_p99_ms is not None and result.latency.p99 > t.max_p99_ms:
        failures.append(f"latency budget: p99 {result.latency.p99:.3f} ms > --max-p99-ms {t.max_p99_ms:g}")
    return failures, undecided


def per_class(labels_true: np.ndarray, predicted: np.ndarray, labels: tuple[str, ...]) -> dict[str, Any]:
    """Confusion matrix (rows true, columns predicted) and per-class precision/recall/support."""
    n = len(labels)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels_true), np.asarray(predicted)), 1)
    classes = {}
    for i, name in enumerate(labels):
        tp = int(matrix[i, i])
        support = int(matrix[i].sum())
        predicted_i = int(matrix[:, i].sum())
        classes[name] = {
            "precision": tp / predicted_i if predicted_i else None,
            "recall": tp / support if support else None,
            "support": support,
        }
    return {"classes": classes, "confusion": matrix.tolist()}
