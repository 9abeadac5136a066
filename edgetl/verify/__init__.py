"""``edgetl verify``: prove each exported artifact is as good as the model it came from, and as fast, on this CPU.

Three checks per artifact (see :mod:`edgetl.verify.checks`): *fidelity* against the model the artifact was
converted from (float.keras, or qat.h5 for QAT int8 files), *accuracy* non-inferiority against the original float
model on labelled images (a paired test with a margin and a confidence interval; *inconclusive* when the images are
too few to tell), and *latency* of each int8 file against the fp32 file of the same runtime (plus optional budgets).

Device path (a bundle folder): imports only numpy, onnxruntime, ai_edge_litert (and rich/matplotlib for output).
Source outputs come from the bundle sample (``sample/reference_outputs.npy`` for float.keras,
``sample/qat_outputs.npy`` for qat.h5); with ``--data`` the float model's outputs come from the bundle's fp32
reference artifact.

Host path (a run directory): float.keras (and qat.h5) are loaded (TensorFlow, lazily) and run; the run's whole
validation split is used when its images are reachable (else the bundle sample), unless ``data`` is given.

    from edgetl.verify import verify, Thresholds
    report = verify("models/flowers/export", threads=4, thresholds=Thresholds(margin_pp=1.0))
    report.verdict, report.failures, report.to_dict()
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgetl.errors import BundleError, ConfigError, RunDirError
from edgetl.rundir import read_run
from edgetl.verify.bundle import SOURCE_FLOAT, SOURCE_QAT, ArtifactSpec, Bundle, InputContract, Sample, load_bundle
from edgetl.verify.checks import (
    EXIT_CODES,
    FAIL,
    INCONCLUSIVE,
    PASS,
    ArtifactResult,
    LatencyStats,
    Thresholds,
    accuracy,
    check,
    compare_outputs,
    paired_accuracy,
    per_class,
)
from edgetl.verify.report import ReferenceInfo, Report, machine_info
from edgetl.verify.runners import DEFAULT_ENGINE, ENGINES, KerasRunner, Runner, make_runner, measure_latencies

#: timed inferences per model per interleaved round
LATENCY_BLOCK = 10

__all__ = [
    "EXIT_CODES",
    "paired_ratio",
    "FAIL",
    "INCONCLUSIVE",
    "PASS",
    "ArtifactResult",
    "ArtifactSpec",
    "Bundle",
    "InputContract",
    "Report",
    "Sample",
    "Thresholds",
    "load_bundle",
    "parse_runtimes",
    "parse_threads",
    "resolve_target",
    "default_report_dir",
    "verify",
]


def resolve_target(target: str | Path) -> tuple[Path, Path | None]:
    """Return ``(bundle_dir, run_dir_or_None)`` for a bundle folder, its bundle.json, or a run directory."""
    path = Path(target)
    if path.is_file() and path.name == "bundle.json":
        return path.parent, None
    if not path.exists():
        raise BundleError(f"{path} does not exist", "pass a bundle folder (with bundle.json) or a run directory")
    if not path.is_dir():
        raise BundleError(
            f"{path} is a file, not a bundle folder", "pass a bundle folder (with bundle.json) or a run directory"
        )
    if (path / "bundle.json").is_file():
        return path, None
    if (path / "manifest.json").is_file():
        bundle_dir = path / "export"
        if not (bundle_dir / "bundle.json").is_file():
            raise RunDirError(
                f"run directory {path} has no export bundle ({bundle_dir}/bundle.json)",
                f"run `edgetl export {path}` first",
            )
        return bundle_dir, path
    raise BundleError(
        f"{path} is neither a bundle (no bundle.json) nor a run directory (no manifest.json)",
        "pass the folder `edgetl export` wrote, or a run directory",
    )


def _load_run(run_dir: Path, bundle: Bundle) -> Path:
    """The run's float.keras, once the run directory (edgetl.rundir) and the bundle exported from it agree."""
    run = read_run(run_dir)
    if run.labels != bundle.labels:
        raise RunDirError(
            f"the bundle in {run_dir}/export has labels {list(bundle.labels)} but the run has {list(run.labels)}",
            f"re-run `edgetl export {run_dir}`",
        )
    run_id = run.manifest.get("run_id")
    if run_id and bundle.run_id and run_id != bundle.run_id:
        raise RunDirError(
            f"the bundle in {run_dir}/export was exported from run {bundle.run_id!r}, not this run ({run_id!r})",
            f"re-run `edgetl export {run_dir}`",
        )
    return run.float_model


def _select(bundle: Bundle, only: Sequence[str] | None) -> list[ArtifactSpec]:
    if not only:
        return list(bundle.artifacts)
    names = [n.strip() for item in only for n in str(item).split(",") if n.strip()]
    known = [a.name for a in bundle.artifacts]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(
            f"--only: no artifact named {', '.join(unknown)} in the bundle", f"choose from: {', '.join(known)}"
        )
    return [a for a in bundle.artifacts if a.name in names]


def _load_data(data: str | Path, bundle: Bundle) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from edgetl.data import load_images, scan_folder

    folder = scan_folder(data, classes=bundle.labels)
    loaded = load_images(folder.items, (bundle.input.height, bundle.input.width))
    return loaded.images, loaded.labels, [str(p) for p in loaded.paths]


def _load_val_split(run_dir: Path, bundle: Bundle) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """The run's whole validation split, when splits.json and its images are reachable (else None)."""
    from edgetl.data import load_images
    from edgetl.errors import DataError
    from edgetl.rundir import read_run

    try:
        run = read_run(run_dir, verify_checksums=False)
        items = run.split_items("val")
    except (RunDirError, DataError):
        return None
    items = [(p, label) for p, label in items if p.is_file()]
    if not items:
        return None
    try:
        loaded = load_images(items, (bundle.input.height, bundle.input.width), skip_bad=True)
    except DataError:
        return None
    return loaded.images, loaded.labels, [str(p) for p in loaded.paths]


def _baseline(bundle: Bundle, spec: ArtifactSpec) -> ArtifactSpec | None:
    """The fp32 artifact of the same runtime an int8 artifact is timed against."""
    if not spec.is_int8:
        return None
    return next((a for a in bundle.artifacts if a.format == spec.format and a.quantization == "fp32"), None)


def parse_threads(value: int | str | Sequence[int | str]) -> tuple[int, ...]:
    """``--threads``: one count or a comma list (``"1,2"``, ``"1,all"``; ``all`` = this machine's cores).

    The first is the deployment count: the latency check and every verdict use it; the others are timed in the same
    interleaved run and shown beside it (information). Duplicates are dropped, order kept."""
    items = [value] if isinstance(value, (int, str)) else list(value)
    parts = [
        p
        for item in items
        for p in (str(item).split(",") if isinstance(item, str) else [item])
        if not (isinstance(p, str) and not p.strip())
    ]
    counts: list[int] = []
    fix = "pass e.g. --threads 1 or --threads 1,all (the first is the deployment count the latency check uses)"
    for part in parts:
        if isinstance(part, str):
            text = part.strip().lower()
            if text == "all":
                part = os.cpu_count() or 1
            elif text.isdigit():
                part = int(text)
            else:
                raise ConfigError(f"--threads: {part.strip()!r} is not a thread count", fix)
        if not isinstance(part, int) or isinstance(part, bool) or part < 1:
            raise ConfigError(f"--threads must be integers >= 1 (got {part!r})", fix)
        counts.append(part)
    if not counts:
        raise ConfigError("--threads is empty", fix)
    return tuple(dict.fromkeys(counts))


def parse_runtimes(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``--runtime``: the ONNX runtimes to run every ONNX artifact in (``onnxruntime``, ``openvino``; comma list or
    repeated; default onnxruntime). TFLite artifacts always run in LiteRT. OpenVINO needs ``edgetl[openvino]``."""
    if value is None:
        return (DEFAULT_ENGINE["onnx"],)
    items = [value] if isinstance(value, str) else list(value)
    names = [n.strip().lower() for item in items for n in str(item).split(",") if n.strip()]
    onnx_engines = [e for e, f in ENGINES.items() if f == "onnx"]
    unknown = [n for n in names if n not in onnx_engines]
    if unknown or not names:
        raise ConfigError(
            f"--runtime: unknown runtime {', '.join(unknown) or '(none)'}",
            f"use {' or '.join(onnx_engines)} (comma list for both; TFLite files always run in LiteRT)",
        )
    if "openvino" in names:
        from edgetl.verify.openvino_runner import openvino_available

        if not openvino_available():
            raise ConfigError("--runtime openvino: OpenVINO is not installed", "pip install 'edgetl[openvino]'")
    return tuple(dict.fromkeys(names))


def _key(spec: ArtifactSpec, engine: str) -> str:
    """A result row's name: the artifact's, plus ``@engine`` when it runs in a runtime other than its format's."""
    return spec.name if engine == DEFAULT_ENGINE[spec.format] else f"{spec.name}@{engine}"


def verify(
    target: str | Path,
    *,
    data: str | Path | None = None,
    threads: int | str | Sequence[int | str] = 1,
    runtimes: str | Sequence[str] | None = None,
    runs: int = 100,
    warmup: int = 10,
    thresholds: Thresholds | None = None,
    artifacts: Sequence[str] | None = None,
    report_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    bundle_sample: bool = False,
) -> Report:
    """Verify every artifact of a bundle (or of a run directory's ``export/`` bundle) and return a :class:`Report`.

    ``threads``: one count or several (:func:`parse_threads`): the first is the deployment count every check uses, the
    others are timed beside it. ``runtimes``: the ONNX runtimes (:func:`parse_runtimes`); each ONNX artifact gets one
    row per runtime (``NAME@openvino`` for OpenVINO's), fidelity-, accuracy- and latency-checked alike.
    ``artifacts`` limits the check to those names. ``bundle_sample`` evaluates a run directory on the bundle sample
    instead of its whole validation split. ``report_dir`` (optional) also writes report.json/report.md/plots.
    Raises BundleError/ModelFileError/RunDirError/DataError/ConfigError for bad input; failing checks do *not*
    raise: they are listed in ``report.failures`` and ``report.verdict`` is FAIL (INCONCLUSIVE when a check
    could not decide).

    The stages, in order: open a runner per (artifact, runtime) and its latency baseline (:func:`_open`), pick the
    images (:func:`_pick_images`), get the source models' outputs on them (:func:`_sources`), check each artifact's
    outputs (:func:`_check_outputs`), then time everything interleaved and check latency (:func:`_time_and_judge`).
    """
    thresholds = thresholds or Thresholds()
    thread_counts = parse_threads(threads)
    engines = parse_runtimes(runtimes)
    for flag, value, low in (("--runs", runs, 1), ("--warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{flag} must be an integer >= {low} (got {value!r})", f"pass e.g. {flag} {max(low, 1)}")
    say = progress or (lambda _msg: None)

    bundle_dir, run_dir = resolve_target(target)
    bundle = load_bundle(bundle_dir)
    selected = _select(bundle, artifacts)
    keras_path = _load_run(run_dir, bundle) if run_dir is not None else None
    plan = _open(bundle, selected, engines, thread_counts[0], limited=artifacts is not None, say=say)
    images = _pick_images(bundle, run_dir if keras_path is not None else None, data, bundle_sample, plan.warnings, say)
    ref = _sources(plan, images, run_dir, keras_path, selected, data, thresholds, say)
    results = _check_outputs(plan, images, ref, thresholds, is_host=keras_path is not None, say=say)
    stats = _time_and_judge(plan, results, ref, thread_counts, images.images[0], warmup, runs, thresholds, say)

    threads_used = thread_counts[0]
    float_pred = np.argmax(ref.float_outputs, axis=1)
    report = Report(
        target=str(target),
        bundle=str(bundle.root),
        run_id=bundle.run_id,
        labels=bundle.labels,
        reference=ReferenceInfo(
            ref.name,
            ref.kind,
            accuracy(ref.float_outputs, images.labels),
            stats.get((KERAS_KEY, threads_used)),
            ref.outputs_source,
        ),
        artifacts=results,
        thresholds=thresholds,
        machine=machine_info(threads_used, thread_counts),
        samples=int(images.images.shape[0]),
        data=images.desc,
        labels_true=images.labels,
        warnings=plan.warnings,
        reference_per_class=per_class(images.labels, float_pred, bundle.labels),
        images=images.images,
        image_names=images.names,
    )
    if report_dir is not None:
        report.write(report_dir)
    return report


#: the timing table's key for the original Keras model (not an artifact name)
KERAS_KEY = "\0keras"


@dataclass
class _Plan:
    """What verify runs: a runner per (artifact, runtime) row, keyed ``NAME`` or ``NAME@engine``, and the rows'
    latency baselines (the same runtime's fp32 file; timed even when not selected)."""

    bundle: Bundle
    threads: int
    units: list[tuple[str, ArtifactSpec, str]]
    runners: dict[str, Runner]
    specs: dict[str, tuple[ArtifactSpec, str]]
    baselines: dict[str, str]
    extra: dict[str, Runner]  # timed only
    warnings: list[str] = field(default_factory=list)


def _open(
    bundle: Bundle,
    selected: list[ArtifactSpec],
    engines: tuple[str, ...],
    threads: int,
    *,
    limited: bool,
    say: Callable[[str], None],
) -> _Plan:
    units = [
        (_key(spec, engine), spec, engine)
        for spec in selected
        for engine in (engines if spec.format == "onnx" else (DEFAULT_ENGINE[spec.format],))
    ]
    if engines != (DEFAULT_ENGINE["onnx"],) and not any(spec.format == "onnx" for spec in selected):
        raise ConfigError(
            f"--runtime {','.join(engines)}: no ONNX artifact to run "
            f"({'the selection' if limited else 'the bundle'} has {', '.join(s.name for s in selected)})",
            "verify a bundle exported with --format onnx (or all), or drop --runtime",
        )
    plan = _Plan(bundle, threads, units, {}, {}, {}, {})
    for key, spec, engine in units:
        say(f"loading {key}")
        plan.runners[key] = make_runner(spec, bundle.input, bundle.labels, threads, engine=engine)
        plan.specs[key] = (spec, engine)
    for key, spec, engine in units:
        base = _baseline(bundle, spec)
        if spec.is_int8 and base is None:
            note = f"{spec.name}: the bundle has no fp32 {spec.format} artifact: latency ratio not checked"
            if note not in plan.warnings:
                plan.warnings.append(note)
        elif base is not None:
            base_key = _key(base, engine)
            plan.baselines[key] = base_key
            if base_key not in plan.runners and base_key not in plan.extra:
                plan.extra[base_key] = make_runner(base, bundle.input, bundle.labels, threads, engine=engine)
                plan.specs[base_key] = (base, engine)
    return plan


@dataclass
class _Images:
    images: np.ndarray
    labels: np.ndarray
    names: list[str] | None
    desc: str

    @property
    def on_sample(self) -> bool:
        return self.desc == "bundle sample"


def _pick_images(
    bundle: Bundle,
    run_dir: Path | None,
    data: str | Path | None,
    bundle_sample: bool,
    warnings: list[str],
    say: Callable[[str], None],
) -> _Images:
    """--data, else (host: ``run_dir`` given) the run's whole validation split, else the bundle sample."""
    if data is not None:
        say(f"loading images from {data}")
        return _Images(*_load_data(data, bundle), str(data))
    if run_dir is not None and not bundle_sample:
        say("loading the run's validation split")
        split = _load_val_split(run_dir, bundle)
        if split is not None:
            return _Images(*split, "the run's validation split")
        warnings.append("the run's validation images are not reachable: verified on the bundle sample")
    return _Images(bundle.sample.images, bundle.sample.labels, None, "bundle sample")


@dataclass
class _Reference:
    """The original float model's outputs on the images (or its stand-in's) and every source model's."""

    name: str
    kind: str
    outputs_source: str
    float_outputs: np.ndarray
    sources: dict[str, np.ndarray]
    keras_runner: Runner | None = None


def _sources(
    plan: _Plan,
    images: _Images,
    run_dir: Path | None,
    keras_path: Path | None,
    selected: list[ArtifactSpec],
    data: str | Path | None,
    thresholds: Thresholds,
    say: Callable[[str], None],
) -> _Reference:
    bundle = plan.bundle
    if keras_path is not None:  # the host: run float.keras (and qat.h5)
        say("loading the original Keras model")
        keras_runner = KerasRunner("float.keras", keras_path, bundle.input, len(bundle.labels), threads=plan.threads)
        say("running the original Keras model")
        float_outputs = keras_runner.predict(images.images)
        ref = _Reference(
            "float.keras",
            "keras",
            f"float.keras on {images.desc}",
            float_outputs,
            {SOURCE_FLOAT: float_outputs},
            keras_runner,
        )
        if images.on_sample:
            stale = float(np.max(np.abs(float_outputs - bundle.sample.reference_outputs)))
            if stale > thresholds.float_tolerance:
                plan.warnings.append(
                    f"bundle sample/reference_outputs.npy differs from float.keras by up to {stale:.3g}: "
                    f"the bundle may be stale (re-run `edgetl export {run_dir}`)"
                )
        if any(s.source == SOURCE_QAT for s in selected):
            if (run_dir / "qat.h5").is_file():  # type: ignore[operator]
                say("running the QAT model")
                ref.sources[SOURCE_QAT] = _qat_outputs(run_dir, images.images)  # type: ignore[arg-type]
            else:
                plan.warnings.append("the run has no qat.h5: QAT artifacts' fidelity is checked on the bundle sample")
        return ref
    if data is not None:  # a device with --data: the fp32 reference artifact stands in for the float model
        ref_spec = bundle.reference_artifact or next((a for a in bundle.artifacts if a.quantization == "fp32"), None)
        if ref_spec is None:
            raise ConfigError(
                "--data needs a float32 artifact to stand in for the float model, and this bundle has none",
                "verify on the bundle sample (drop --data), or verify the run directory on the host",
            )
        ref_runner = plan.runners.get(ref_spec.name) or plan.extra.get(ref_spec.name)
        if ref_runner is None:
            ref_runner = plan.extra[ref_spec.name] = make_runner(ref_spec, bundle.input, bundle.labels, plan.threads)
            plan.specs[ref_spec.name] = (ref_spec, DEFAULT_ENGINE[ref_spec.format])
        say(f"running {ref_spec.name} (the float model's stand-in)")
        return _Reference(
            ref_spec.name,
            ref_spec.format,
            f"{ref_spec.name} on --data (fp32, checked against float.keras on the bundle sample)",
            ref_runner.predict(images.images),
            {},
        )
    return _Reference(
        "reference_outputs.npy",
        "bundle",
        "sample/reference_outputs.npy (the original Keras model)",
        bundle.sample.reference_outputs,
        dict(bundle.sample.source_outputs),
    )


def _check_outputs(
    plan: _Plan, images: _Images, ref: _Reference, thresholds: Thresholds, *, is_host: bool, say: Callable[[str], None]
) -> list[ArtifactResult]:
    """Each row's outputs on the images: fidelity against its source model, accuracy against the float model."""
    bundle, labels = plan.bundle, images.labels
    float_pred = np.argmax(ref.float_outputs, axis=1)
    results: list[ArtifactResult] = []
    for key, spec, engine in plan.units:
        say(f"running {key} on {images.images.shape[0]} images")
        outputs = plan.runners[key].predict(images.images)
        fidelity_note = None
        if spec.source in ref.sources:
            fid = compare_outputs(outputs, ref.sources[spec.source], labels)
        elif spec.source in bundle.sample.source_outputs:  # --data on a device, or no qat.h5 on the host
            sample_out = plan.runners[key].predict(bundle.sample.images)
            fid = compare_outputs(sample_out, bundle.sample.source_outputs[spec.source], bundle.sample.labels)
        else:
            fid = compare_outputs(outputs, outputs, labels)
            fidelity_note = (
                f"fidelity: not checked: the bundle carries no {spec.source} outputs "
                "(exported by an older edgetl; re-export it)"
            )
        pred = np.argmax(outputs, axis=1)
        paired = paired_accuracy(
            float_pred, pred, labels, thresholds.margin_pp, thresholds.confidence, thresholds.fail_confidence
        )
        classes = per_class(labels, pred, bundle.labels)
        wrong = np.flatnonzero(pred != labels)
        classes["misclassified"] = [
            {
                "image": images.names[i] if images.names else f"{images.desc} #{i}",
                "index": int(i),
                "true": bundle.labels[int(labels[i])],
                "predicted": bundle.labels[int(pred[i])],
                "probability": float(outputs[i, pred[i]]),
            }
            for i in wrong[:MAX_MISCLASSIFIED]
        ]
        classes["misclassified_count"] = int(wrong.size)
        result = ArtifactResult(
            name=key,
            file=spec.file,
            format=spec.format,
            quantization=spec.quantization,
            runtime=plan.runners[key].runtime,
            accuracy=accuracy(outputs, labels),
            accuracy_drop_pp=paired.drop_pp,
            top1_agreement=fid.top1_agreement,
            max_abs_diff=fid.max_abs_diff if fidelity_note is None else float("nan"),
            mean_abs_diff=fid.mean_abs_diff if fidelity_note is None else float("nan"),
            latency=LatencyStats.from_ms(np.empty(0)),
            latency_ratio=None,
            size_bytes=spec.path.stat().st_size,
            source=spec.source,
            latency_baseline=plan.baselines.get(key),
            paired=paired,
            per_class=classes,
            is_reference=(not is_host and key == bundle.reference),
            predictions=outputs,
            artifact=spec.name,
            engine=engine,
        )
        if fidelity_note is not None:
            result.inconclusive.append(fidelity_note)
        if not bool(np.all(np.isfinite(outputs))):
            result.failures.append("fidelity: outputs contain NaN or Inf")
        results.append(result)
    return results


def _time_and_judge(
    plan: _Plan,
    results: list[ArtifactResult],
    ref: _Reference,
    thread_counts: tuple[int, ...],
    image: np.ndarray,
    warmup: int,
    runs: int,
    thresholds: Thresholds,
    say: Callable[[str], None],
) -> dict:
    """Every model at every thread count, timed in one interleaved run (the Keras original at the deployment count
    only: TensorFlow fixes its thread pools once per process); then every check of each row. Returns the stats."""
    threads = plan.threads
    timed: dict[tuple[str, int], Runner] = {(key, threads): r for key, r in {**plan.runners, **plan.extra}.items()}
    for count in thread_counts[1:]:
        for key in [*plan.runners, *plan.extra]:
            spec, engine = plan.specs[key]
            say(f"loading {key} at {count} threads")
            timed[(key, count)] = make_runner(spec, plan.bundle.input, plan.bundle.labels, count, engine=engine)
    if ref.keras_runner is not None:
        timed[(KERAS_KEY, threads)] = ref.keras_runner
    say(f"timing {len(timed)} model(s): {warmup} warm-up + {runs} runs each, interleaved")
    times = measure_latencies(timed, image, warmup=warmup, runs=runs, block=LATENCY_BLOCK)
    stats = {name: LatencyStats.from_ms(t) for name, t in times.items()}
    for result in results:
        result.latency = stats[(result.name, threads)]
        for count in thread_counts:
            result.latency_by_threads[count] = stats[(result.name, count)]
            base_t = stats.get((result.latency_baseline, count)) if result.latency_baseline else None
            if base_t is not None and base_t.p50 > 0:
                result.latency_ratio_by_threads[count] = paired_ratio(
                    times[(result.name, count)], times[(result.latency_baseline, count)]
                )
        base = stats.get((result.latency_baseline, threads)) if result.latency_baseline else None
        result.latency_ratio = result.latency_ratio_by_threads.get(threads)
        failures, undecided = check(result, thresholds, base)
        result.failures = list(dict.fromkeys(result.failures + failures))
        result.inconclusive += undecided
    for runner in list(timed.values()):
        runner.close()
    return stats


def paired_ratio(times: np.ndarray, baseline: np.ndarray, block: int = LATENCY_BLOCK) -> float:
    """Median over the interleaved rounds of (median of this round's block / median of the baseline's block).

    Both were timed in the same rounds (:func:`measure_latencies`), so a neighbour's load that slows one round
    slows both sides of that round's ratio; the median over rounds then ignores the rounds it hit hardest.
    """
    n = min(len(times), len(baseline)) // block
    if n == 0:
        return float(np.median(times) / np.median(baseline))
    a = np.median(np.asarray(times[: n * block]).reshape(n, block), axis=1)
    b = np.median(np.asarray(baseline[: n * block]).reshape(n, block), axis=1)
    return float(np.median(a / b))


#: misclassified images listed per artifact in report.json
MAX_MISCLASSIFIED = 50


def _qat_outputs(run_dir: Path, images: np.ndarray) -> np.ndarray:
    """qat.h5's outputs on ``images`` (host only: TensorFlow + tfmot, loaded with export's safety checks)."""
    from edgetl.export import _predict
    from edgetl.export.context import BuildContext
    from edgetl.rundir import read_run

    ctx = BuildContext(run=read_run(run_dir), workdir=run_dir, calibration_loader=lambda: np.empty(0))
    return _predict(ctx.qat_model(), images)


def default_report_dir(target: str | Path) -> Path:
    """``<bundle>/verify/`` for a bundle or a run directory (``RUN/export/verify/``)."""
    bundle_dir, _ = resolve_target(target)
    return Path(bundle_dir) / "verify"
