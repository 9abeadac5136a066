"""``edgetl verify``: prove each exported artifact is as accurate and as fast as the original, on this CPU.

Device path (a bundle folder): imports only numpy, onnxruntime, ai_edge_litert (and rich/matplotlib for output).
The reference for agreement/accuracy is ``sample/reference_outputs.npy`` (the original Keras model's outputs);
the reference for latency is the float32 ONNX artifact named by ``bundle.json`` ``reference``.

Host path (a run directory): the bundle is ``RUN/export/`` and the original ``float.keras`` is loaded (TensorFlow,
lazily) and run for both reference outputs and reference latency.

    from edgetl.verify import verify, Thresholds
    report = verify("models/flowers/export", threads=4, thresholds=Thresholds(max_latency_ratio=1.1))
    report.passed, report.failures, report.to_dict()
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
import numpy as np

from edgetl import __version__
from edgetl.errors import BundleError, ConfigError, RunDirError
from edgetl.fsutil import sha256_file
from edgetl.manifest import RUN_SCHEMA
from edgetl.verify.bundle import ArtifactSpec, Bundle, InputContract, Sample, load_bundle
from edgetl.verify.checks import ArtifactResult, LatencyStats, Thresholds, accuracy, check, compare_outputs
from edgetl.verify.report import Report, ReferenceInfo, machine_info
from edgetl.verify.runners import KerasRunner, Runner, make_runner, measure_latencies

__all__ = [
    "ArtifactResult",
    "ArtifactSpec",
    "Bundle",
    "InputContract",
    "Report",
    "Sample",
    "Thresholds",
    "load_bundle",
    "resolve_target",
    "default_report_dir",
    "verify",
]

#: Below this many images a single flipped prediction moves accuracy by more than 1 pp.
SMALL_SAMPLE = 100


def resolve_target(target: str | Path) -> tuple[Path, Path | None]:
    """Return ``(bundle_dir, run_dir_or_None)`` for a bundle folder, its bundle.json, or a run directory."""
    path = Path(target)
    if path.is_file() and path.name == "bundle.json":
        return path.parent, None
    if not path.exists():
        raise BundleError(f"{path} does not exist", "pass a bundle folder (with bundle.json) or a run directory")
    if not path.is_dir():
        raise BundleError(f"{path} is a file, not a bundle folder", "pass a bundle folder (with bundle.json) or a run directory")
    if (path / "bundle.json").is_file():
        return path, None
    if (path / "manifest.json").is_file():
        bundle_dir = path / "export"
        if not (bundle_dir / "bundle.json").is_file():
            raise RunDirError(f"run directory {path} has no export bundle ({bundle_dir}/bundle.json)", f"run `edgetl export {path}` first")
        return bundle_dir, path
    raise BundleError(
        f"{path} is neither a bundle (no bundle.json) nor a run directory (no manifest.json)",
        "pass the folder `edgetl export` wrote, or a run directory",
    )


def _load_run(run_dir: Path, bundle: Bundle) -> Path:
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{run_dir}/manifest.json is unreadable ({str(exc).splitlines()[0]})", "re-run `edgetl finetune`") from None
    if not isinstance(manifest, dict):
        raise RunDirError(f"{run_dir}/manifest.json is not a JSON object", "re-run `edgetl finetune`")
    schema = manifest.get("schema")
    if schema != RUN_SCHEMA:
        raise RunDirError(
            f"{run_dir} has run schema {schema!r} (written by edgetl {manifest.get('edgetl_version', 'unknown')}), "
            f"not {RUN_SCHEMA!r} (this is edgetl {__version__})",
            f"use edgetl {manifest.get('edgetl_version', 'of that version')} to verify it, or re-run `edgetl finetune`"
        )
    model = run_dir / "float.keras"
    if not model.is_file():
        raise RunDirError(f"run directory {run_dir} has no float.keras", "re-run `edgetl finetune`")
    files = manifest.get("files") or {}
    if isinstance(files, dict) and "float.keras" in files and sha256_file(model) != str(files["float.keras"]).lower():
        raise RunDirError(f"{run_dir}/float.keras does not match its checksum in manifest.json", "re-run `edgetl finetune`")
    labels = manifest.get("labels")
    if isinstance(labels, list) and tuple(labels) != bundle.labels:
        raise RunDirError(
            f"the bundle in {run_dir}/export has labels {list(bundle.labels)} but the run has {labels}",
            f"re-run `edgetl export {run_dir}`",
        )
    run_id = manifest.get("run_id")
    if run_id and bundle.run_id and run_id != bundle.run_id:
        raise RunDirError(
            f"the bundle in {run_dir}/export was exported from run {bundle.run_id!r}, not this run ({run_id!r})",
            f"re-run `edgetl export {run_dir}`",
        )
    return model


def _select(bundle: Bundle, only: Sequence[str] | None) -> list[ArtifactSpec]:
    if not only:
        return list(bundle.artifacts)
    names = [n.strip() for item in only for n in str(item).split(",") if n.strip()]
    known = [a.name for a in bundle.artifacts]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--only: no artifact named {', '.join(unknown)} in the bundle", f"choose from: {', '.join(known)}")
    return [a for a in bundle.artifacts if a.name in names]


def _load_data(data: str | Path, bundle: Bundle) -> tuple[np.ndarray, np.ndarray]:
    from edgetl.data import load_images, scan_folder

    folder = scan_folder(data, classes=bundle.labels)
    loaded = load_images(folder.items, (bundle.input.height, bundle.input.width))
    return loaded.images, loaded.labels


def verify(
    target: str | Path,
    *,
    data: str | Path | None = None,
    threads: int = 1,
    runs: int = 100,
    warmup: int = 10,
    thresholds: Thresholds | None = None,
    artifacts: Sequence[str] | None = None,
    report_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Verify every artifact of a bundle (or of a run directory's ``export/`` bundle) and return a :class:`Report`.

    ``artifacts`` limits the check to those names. ``report_dir`` (optional) also writes report.json/report.md/plots.
    Raises BundleError/ModelFileError/RunDirError/DataError/ConfigError for bad input; failing checks do *not*
    raise: they are listed in ``report.failures`` and ``report.passed`` is False.
    """
    thresholds = thresholds or Thresholds()
    for flag, value, low in (("--threads", threads, 1), ("--runs", runs, 1), ("--warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{flag} must be an integer >= {low} (got {value!r})", f"pass e.g. {flag} {max(low, 1)}")
    say = progress or (lambda _msg: None)

    bundle_dir, run_dir = resolve_target(target)
    bundle = load_bundle(bundle_dir)
    selected = _select(bundle, artifacts)
    keras_path = _load_run(run_dir, bundle) if run_dir is not None else None
    n_classes = len(bundle.labels)
    warnings: list[str] = []

    runners: dict[str, Runner] = {}
    for spec in selected:
        say(f"loading {spec.name}")
        runners[spec.name] = make_runner(spec, bundle.input, bundle.labels, threads)

    # Reference runner (latency, and outputs when they cannot come from the bundle sample).
    ref_runner: Runner | None
    if keras_path is not None:
        say("loading the original Keras model")
        ref_runner = KerasRunner("float.keras", keras_path, bundle.input, n_classes, threads=threads)
        ref_name, ref_kind = "float.keras", "keras"
    else:
        ref_spec = bundle.reference_artifact
        if ref_spec is None:
            ref_spec = next((a for a in bundle.artifacts if a.quantization == "fp32"), None)
            if ref_spec is not None:
                warnings.append(
                    f"bundle.json names no reference; using {ref_spec.name!r} (fp32 {ref_spec.format}) for latency"
                )
        if ref_spec is None:
            ref_runner = None
            ref_name, ref_kind = "reference_outputs.npy", "none"
            warnings.append("bundle has no float32 artifact: latency_ratio was not checked")
        else:
            ref_runner = runners.get(ref_spec.name) or make_runner(ref_spec, bundle.input, bundle.labels, threads)
            ref_name, ref_kind = ref_spec.name, ref_spec.format

    if data is not None:
        if ref_runner is None:
            raise ConfigError(
                "--data needs a reference model to compute reference outputs, and this bundle has no float32 artifact",
                "verify on the bundle sample (drop --data), or verify the run directory on the host",
            )
        say(f"loading images from {data}")
        images, labels = _load_data(data, bundle)
        say(f"running the reference {ref_name}")
        ref_outputs = ref_runner.predict(images)
        data_desc, outputs_source = str(data), f"{ref_name} on --data"
    else:
        images, labels = bundle.sample.images, bundle.sample.labels
        if keras_path is not None:
            say("running the original Keras model")
            ref_outputs = ref_runner.predict(images)  # type: ignore[union-attr]
            outputs_source = "float.keras on the bundle sample"
            stale = float(np.max(np.abs(ref_outputs - bundle.sample.reference_outputs)))
            if stale > thresholds.float_tolerance:
                warnings.append(
                    f"bundle sample/reference_outputs.npy differs from float.keras by up to {stale:.3g}: "
                    f"the bundle may be stale (re-run `edgetl export {run_dir}`)"
                )
        else:
            ref_outputs = bundle.sample.reference_outputs
            outputs_source = "sample/reference_outputs.npy (the original Keras model)"
        data_desc = "bundle sample"
    ref_accuracy = accuracy(ref_outputs, labels)
    n = int(images.shape[0])
    if n < SMALL_SAMPLE:
        warnings.append(
            f"only {n} images: one flipped prediction moves accuracy by {100.0 / n:.2f} pp; pass --data DIR for more"
        )

    results: list[ArtifactResult] = []
    metrics = {}
    for spec in selected:
        say(f"running {spec.name} on {n} images")
        outputs = runners[spec.name].predict(images)
        metrics[spec.name] = compare_outputs(outputs, ref_outputs, labels)
        m = metrics[spec.name]
        results.append(
            ArtifactResult(
                name=spec.name,
                file=spec.file,
                format=spec.format,
                quantization=spec.quantization,
                runtime=runners[spec.name].runtime,
                accuracy=m.accuracy,
                accuracy_drop_pp=(ref_accuracy - m.accuracy) * 100.0,
                top1_agreement=m.top1_agreement,
                max_abs_diff=m.max_abs_diff,
                mean_abs_diff=m.mean_abs_diff,
                latency=LatencyStats.from_ms(np.empty(0)),
                latency_ratio=None,
                size_bytes=spec.path.stat().st_size,
                is_reference=(keras_path is None and spec.name == ref_name),
                predictions=outputs,
            )
        )

    say(f"timing {len(runners) + (ref_runner is not None and ref_name not in runners)} model(s): {warmup} warm-up + {runs} runs each")
    timed: dict[str, Runner] = dict(runners)
    ref_key = None
    if ref_runner is not None:
        ref_key = ref_name if ref_name in runners and keras_path is None else "\0reference"
        timed.setdefault(ref_key, ref_runner)
    times = measure_latencies(timed, images[0], warmup=warmup, runs=runs)
    ref_latency = LatencyStats.from_ms(times[ref_key]) if ref_key is not None else None
    for result in results:
        result.latency = LatencyStats.from_ms(times[result.name])
        if ref_latency is not None and ref_latency.p50 > 0:
            result.latency_ratio = 1.0 if result.name == ref_key else result.latency.p50 / ref_latency.p50
        result.failures = check(result, metrics[result.name], ref_latency, thresholds)

    for runner in list(timed.values()):
        runner.close()

    report = Report(
        target=str(target),
        bundle=str(bundle.root),
        run_id=bundle.run_id,
        labels=bundle.labels,
        reference=ReferenceInfo(ref_name, ref_kind, ref_accuracy, ref_latency, outputs_source),
        artifacts=results,
        thresholds=thresholds,
        machine=machine_info(threads),
        samples=n,
        data=data_desc,
        labels_true=labels,
        warnings=warnings,
    )
    if report_dir is not None:
        report.write(report_dir)
    return report


def default_report_dir(target: str | Path) -> Path:
    """``<bundle>/verify/`` for a bundle or a run directory (``RUN/export/verify/``)."""
    bundle_dir, _ = resolve_target(target)
    return Path(bundle_dir) / "verify"

