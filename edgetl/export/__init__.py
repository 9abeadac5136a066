"""``edgetl export``: turn a run directory into a self-contained, TF-free verification bundle.

One table (:data:`VARIANTS`) says which (format, quantization) variants exist, which builder makes each, whether
it needs the QAT model or calibration images, and when it is a default. :func:`export_run` reads the run
(:mod:`edgetl.rundir`), picks variants (:func:`select_variants`), builds every artifact with its metadata into a
temp folder beside ``out`` and swaps the finished bundle in (:func:`edgetl.fsutil.atomic_dir`).

Importing this package does not import TensorFlow; building does.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgetl import __version__
from edgetl.config import ExportConfig
from edgetl.errors import ConfigError, DataError, ExportError
from edgetl.export import onnx as onnx_export
from edgetl.export import tflite as tflite_export
from edgetl.export.context import BuildContext
from edgetl.export.metadata import artifact_metadata
from edgetl.export.model_card import model_card
from edgetl.fsutil import PID_FILE, atomic_dir, atomic_write_json, check_target, sha256_file
from edgetl.manifest import BUNDLE_FOLDER, BUNDLE_SCHEMA
from edgetl.rundir import RunInfo, read_run
from edgetl.schema import FORMATS, QUANTIZATIONS, ArtifactRecord, Bundle, Format, Quantization

#: Defaults of export_run's keywords: ExportConfig's (the one place the CLI, recipes and the API read them).
DEFAULT_SAMPLES: int = ExportConfig.model_fields["samples"].default
DEFAULT_CALIBRATION: int = ExportConfig.model_fields["calibration_images"].default
_WORK_DIR = ".edgetl-work"


@dataclass(frozen=True)
class Variant:
    """One row of the export table."""

    format: Format
    quantization: Quantization
    builder: Callable[[BuildContext], bytes]
    needs_qat: bool
    default: str | None  # "always", "qat" (default when the run has QAT), "no_qat" (default without QAT), None
    description: str

    @property
    def name(self) -> str:
        return f"{self.format}_{self.quantization}"

    @property
    def file(self) -> str:
        ext = tflite_export.EXTENSION if self.format == "tflite" else onnx_export.EXTENSION
        return f"model_{self.quantization}{ext}"


#: The export table: every variant edgetl can produce, in build order (fp32 first: it is the size baseline and
#: ort_static_int8 quantizes the fp32 ONNX).
VARIANTS: tuple[Variant, ...] = (
    Variant("tflite", "fp32", tflite_export.build_fp32, False, "always", "float32 reference (input float32 0..255)"),
    Variant("tflite", "fp16", tflite_export.build_fp16, False, None, "float16 weights, float32 compute and I/O"),
    Variant(
        "tflite",
        "dynamic_int8",
        tflite_export.build_dynamic_int8,
        False,
        None,
        "int8 weights, float activations and I/O (no calibration)",
    ),
    Variant(
        "tflite",
        "ptq_int8",
        tflite_export.build_ptq_int8,
        False,
        "no_qat",
        "full int8 post-training quantization, uint8 input, calibrated on training images",
    ),
    Variant(
        "tflite", "qat_int8", tflite_export.build_qat_int8, True, "qat", "full int8 from the QAT model, uint8 input"
    ),
    Variant(
        "onnx",
        "fp32",
        onnx_export.build_fp32,
        False,
        "always",
        f"float32 reference via tf2onnx (opset {onnx_export.OPSET}); the bundle's reference",
    ),
    Variant("onnx", "qat_int8", onnx_export.build_qat_int8, True, "qat", "QDQ int8 from the QAT model (float32 input)"),
    Variant(
        "onnx",
        "ort_static_int8",
        onnx_export.build_ort_static_int8,
        False,
        "no_qat",
        "onnxruntime static int8 (QDQ, per-channel), calibrated on training images; a comparison",
    ),
)
assert {v.quantization for v in VARIANTS} == set(QUANTIZATIONS), "edgetl.schema.QUANTIZATIONS and VARIANTS disagree"


def variant(fmt: str, quantization: str) -> Variant:
    for v in VARIANTS:
        if v.format == fmt and v.quantization == quantization:
            return v
    raise KeyError((fmt, quantization))


def variants_help() -> str:
    """The variant table as plain text (for --help)."""
    lines = []
    for v in VARIANTS:
        default = {"always": "default", "qat": "default with QAT", "no_qat": "default without QAT"}.get(
            v.default or "", ""
        )
        lines.append(f"{v.format:<7}{v.quantization:<16}{default:<20}{v.description}")
    return "\n".join(lines)


# --- selection -------------------------------------------------------------------------------------------------


def _split(values: str | Iterable[str] | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip().lower().replace("-", "_")
            if part and part not in out:
                out.append(part)
    return out


def parse_formats(formats: str | Iterable[str] | None) -> list[str]:
    names = _split(formats) or ["all"]
    if "all" in names:
        return list(FORMATS)
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise ConfigError(
            f"unknown export format {', '.join(unknown)}", f"use one of: {', '.join(FORMATS)}, all (comma list ok)"
        )
    return [f for f in FORMATS if f in names]


def select_variants(
    formats: str | Iterable[str] | None, quantizations: str | Iterable[str] | None, has_qat: bool
) -> tuple[list[Variant], list[str]]:
    """Variants to build (table order) and notes for the user. ConfigError/ExportError on bad requests."""
    fmts = parse_formats(formats)
    quants = _split(quantizations)
    if quants == ["default"]:
        quants = []
    elif "default" in quants:
        raise ConfigError(
            "--quantization default cannot be combined with other names", "use default alone, or list names"
        )
    notes: list[str] = []
    chosen: list[Variant] = []
    if not quants:
        for v in VARIANTS:
            if v.format not in fmts:
                continue
            if v.default == "always" or (v.default == "qat" and has_qat) or (v.default == "no_qat" and not has_qat):
                chosen.append(v)
        if not has_qat:
            extra = ", ".join(v.name for v in chosen if v.default == "no_qat")
            notes.append(
                f"this run has no QAT model: exporting {extra} (post-training int8) instead of qat_int8; "
                "run `edgetl finetune` with QAT for better int8 accuracy"
            )
        return chosen, notes
    if "all" in quants:
        for v in VARIANTS:
            if v.format in fmts:
                if v.needs_qat and not has_qat:
                    notes.append(f"skipped {v.name}: this run has no QAT model (qat.h5)")
                    continue
                chosen.append(v)
        return chosen, notes
    unknown = [q for q in quants if q not in QUANTIZATIONS]
    if unknown:
        raise ConfigError(
            f"unknown quantization {', '.join(unknown)}",
            f"use one of: {', '.join(QUANTIZATIONS)}, all, default (comma list or repeat --quantization)",
        )
    for q in quants:
        matches = [v for v in VARIANTS if v.quantization == q and v.format in fmts]
        if not matches:
            offered = {f: [v.quantization for v in VARIANTS if v.format == f] for f in fmts}
            raise ConfigError(
                f"quantization {q} is not available for {'/'.join(fmts)}",
                "; ".join(f"{f} offers {', '.join(qs)}" for f, qs in offered.items()),
            )
        if any(v.needs_qat for v in matches) and not has_qat:
            raise ExportError(
                f"{q} needs the run's QAT model, and this run has none (no qat.h5)",
                "run `edgetl finetune` with QAT enabled, or use --quantization ptq_int8 (tflite) / ort_static_int8 (onnx)",
            )
        chosen.extend(v for v in matches if v not in chosen)
    if not any(v.quantization == "fp32" for v in chosen):
        ref = variant("onnx" if "onnx" in fmts else fmts[0], "fp32")
        chosen.append(ref)
        notes.append(f"added {ref.name}: every bundle carries a float32 reference artifact")
    order = {v: i for i, v in enumerate(VARIANTS)}
    return sorted(chosen, key=order.__getitem__), notes


# --- results ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactResult:
    name: str
    file: str
    path: Path
    format: str
    quantization: str
    size_bytes: int
    ratio_to_fp32: float | None  # size / the same format's fp32 artifact size (None without one)
    input_dtype: str
    input_quant: list[float] | None
    output_dtype: str
    output_quant: list[float] | None
    sha256: str
    seconds: float


@dataclass(frozen=True)
class ExportResult:
    out: Path
    run_dir: Path
    run_id: str
    reference: str
    artifacts: tuple[ArtifactResult, ...]
    sample_count: int
    calibration_count: int
    notes: tuple[str, ...] = field(default=())
    seconds: float = 0.0

    @property
    def bundle_json(self) -> Path:
        return self.out / "bundle.json"

    @property
    def bundle_dir(self) -> Path:
        return self.out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["bundle_json"] = str(self.bundle_json)
        return data


# --- samples and calibration -----------------------------------------------------------------------------------


def stratified_sample(items: Sequence[tuple[Path, int]], n: int, seed: int) -> list[tuple[Path, int]]:
    """Up to ``n`` items keeping each class's share (every class with items gets >= 1), seeded and sorted."""
    items = sorted(items, key=lambda it: (it[1], str(it[0])))
    if n >= len(items):
        return list(items)
    by_class: dict[int, list[tuple[Path, int]]] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    total = len(items)
    quota = {c: max(1, int(n * len(g) / total)) for c, g in by_class.items()}
    rng = np.random.default_rng(seed)
    # hand out the remainder to the largest fractional shares (ties broken by the seed)
    while sum(quota.values()) < n:
        spare = [c for c in by_class if quota[c] < len(by_class[c])]
        frac = {c: n * len(by_class[c]) / total - quota[c] for c in spare}
        best = max(frac.values())
        pick = [c for c in spare if frac[c] == best]
        quota[pick[int(rng.integers(len(pick)))]] += 1
    while sum(quota.values()) > n:  # more classes than n: drop from the largest quotas
        c = max(quota, key=lambda k: (quota[k], -k))
        quota[c] -= 1
    chosen: list[tuple[Path, int]] = []
    for c in sorted(by_class):
        group = by_class[c]
        idx = sorted(rng.permutation(len(group))[: quota[c]].tolist())
        chosen.extend(group[i] for i in idx)
    return chosen


def _load(items: list[tuple[Path, int]], size: tuple[int, int], what: str):
    from edgetl.data import load_images

    missing = [p for p, _ in items if not p.exists()]
    if len(missing) == len(items):
        raise DataError(
            f"the run's {what} images are not where splits.json says (e.g. {missing[0]})",
            "pass --data-root DIR pointing at the folder the run was trained on",
        )
    return load_images(items, size, skip_bad=True)


def _predict(model, images: np.ndarray, batch: int = 32) -> np.ndarray:
    outs = [
        np.asarray(model(images[i : i + batch].astype(np.float32), training=False), dtype=np.float32)
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(outs, axis=0)


# --- bundle folder safety --------------------------------------------------------------------------------------


def _check_out(out: Path, run: RunInfo, force: bool) -> None:
    resolved = out.resolve()
    if resolved == run.path or resolved in run.path.parents:
        raise ConfigError(f"--out {out} would replace the run directory itself", "pick a new folder, e.g. <run>/export")
    # the one ownership scheme of edgetl.fsutil: only an edgetl bundle holding only edgetl's files, with --force
    check_target(out, BUNDLE_FOLDER, force, "--out")


# --- export ----------------------------------------------------------------------------------------------------

ProgressFn = Callable[[str, int, int], None]


def export_run(
    run_dir: str | Path,
    formats: str | Iterable[str] | None = None,
    quantizations: str | Iterable[str] | None = None,
    out: str | Path | None = None,
    samples: int = DEFAULT_SAMPLES,
    seed: int | None = None,
    *,
    calibration: int = DEFAULT_CALIBRATION,
    data_root: str | Path | None = None,
    progress: ProgressFn | None = None,
    reporter: Any = None,
    format: str | Iterable[str] | None = None,
    quantization: str | Iterable[str] | None = None,
    force: bool = False,
) -> ExportResult:
    """Export ``run_dir`` to a bundle at ``out`` (default ``<run>/export``); see docs/formats.md.

    ``formats``: "tflite", "onnx", "all" (comma lists/iterables ok, default all). ``quantizations``: names from
    :data:`QUANTIZATIONS` or "all"; default fp32 + qat_int8 (ptq_int8/ort_static_int8 without QAT).
    ``samples``: held-out val images in the bundle; ``seed``: their (and the calibration set's) selection seed,
    default the run's seed. ``calibration``: training images for PTQ/static calibration. ``progress`` gets
    (message, step, total_steps); ``reporter`` (an :class:`edgetl.progress.Reporter`) gets one task advanced per
    step and ``info`` for each note. ``format``/``quantization`` are aliases of ``formats``/``quantizations``.
    An existing bundle at ``out`` is replaced only with ``force`` (and never a folder that is not an edgetl bundle,
    or one holding files edgetl did not write).
    """
    if format is not None:
        formats = format
    if quantization is not None:
        quantizations = quantization
    if reporter is None:
        from edgetl.progress import NullReporter

        reporter = NullReporter()
    started = time.time()
    run = read_run(run_dir)
    chosen, notes = select_variants(formats, quantizations, run.has_qat)
    notes = list(run.notes) + notes
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1 (got {samples})", "use e.g. --samples 200")
    if calibration < 1:
        raise ConfigError(f"--calibration-images must be >= 1 (got {calibration})", f"use e.g. {DEFAULT_CALIBRATION}")
    if seed is None:
        try:
            seed = int(run.manifest.get("seed") or 0)
        except (TypeError, ValueError):
            seed = 0
    out_path = Path(out).expanduser() if out is not None else run.path / "export"
    _check_out(out_path, run, force)
    job = _Job(run, chosen, notes, out_path, samples, seed, calibration, data_root, force, started)
    with reporter.task(f"export {run.run_id}", len(chosen) + 2) as task:
        result = _build(job, _Steps(len(chosen) + 2, progress, task))
    for note in result.notes:
        reporter.info(f"note: {note}")
    return result


@dataclass
class _Job:
    """What one export makes: the run, the chosen variants, where, and the sample/calibration selection."""

    run: RunInfo
    chosen: list[Variant]
    notes: list[str]
    out: Path
    samples: int
    seed: int
    calibration: int
    data_root: str | Path | None
    force: bool
    started: float
    calibration_count: int = 0


@dataclass
class _Steps:
    """Progress: ``progress(message, step, total)`` and the reporter task, one step per artifact plus two."""

    total: int
    progress: ProgressFn | None
    task: Any
    step: int = 0

    def tick(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message, self.step, self.total)
        if self.step:
            self.task.advance(1)
        self.task.update(step=message)
        self.step += 1

    def done(self) -> None:
        if self.progress is not None:
            self.progress("done", self.total, self.total)
        self.task.advance(1)
        self.task.update(step="done")


def _build(job: _Job, steps: _Steps) -> ExportResult:
    run = job.run

    def load_calibration() -> np.ndarray:
        picked = stratified_sample(run.split_items("train", job.data_root), job.calibration, job.seed + 1)
        loaded = _load(picked, run.image_size, "training")
        job.calibration_count = len(loaded.images)
        return loaded.images

    val_items = stratified_sample(run.split_items("val", job.data_root), job.samples, job.seed)
    with atomic_dir(job.out, BUNDLE_FOLDER, job.force) as tmp:
        # scratch space inside the partial bundle: a killed export leaves it where the next export's stale-partial
        # cleanup removes it (a system temp dir would stay behind in /tmp)
        work = tmp / _WORK_DIR
        work.mkdir()
        ctx = BuildContext(run=run, workdir=work, calibration_loader=load_calibration)
        sample_count, source_outputs = _write_sample(job, ctx, val_items, tmp, steps)
        labels_text = "".join(f"{label}\n" for label in run.labels)
        (tmp / "labels.txt").write_text(labels_text, encoding="utf-8")
        artifacts, records, fp32_size = [], [], {}
        for v in job.chosen:
            steps.tick(f"{v.format} {v.quantization}")
            artifact, record = _write_artifact(job, ctx, v, tmp, labels_text, fp32_size)
            artifacts.append(artifact)
            records.append(record)
        steps.tick("bundle.json")
        reference = _reference(job.chosen)
        shutil.rmtree(work)
        _write_bundle_json(job, tmp, reference, records, sample_count, source_outputs)
        steps.done()

    return ExportResult(
        out=job.out,
        run_dir=run.path,
        run_id=run.run_id,
        reference=reference,
        artifacts=tuple(artifacts),
        sample_count=sample_count,
        calibration_count=job.calibration_count,
        notes=tuple(job.notes),
        seconds=round(time.time() - job.started, 2),
    )


def _write_sample(
    job: _Job, ctx: BuildContext, val_items: list[tuple[Path, int]], tmp: Path, steps: _Steps
) -> tuple[int, dict[str, str]]:
    """sample/: held-out images, labels, and each source model's outputs on them (verify's evidence on a device)."""
    steps.tick(f"sample: {len(val_items)} held-out images + reference outputs")
    loaded = _load(val_items, job.run.image_size, "validation")
    if loaded.skipped:
        job.notes.append(f"{len(loaded.skipped)} unreadable sample image(s) skipped")
    reference_outputs = _predict(ctx.float_model(), loaded.images)
    (tmp / "sample").mkdir()
    np.save(tmp / "sample" / "images.npy", loaded.images, allow_pickle=False)
    np.save(tmp / "sample" / "labels.npy", loaded.labels.astype(np.int64), allow_pickle=False)
    np.save(tmp / "sample" / "reference_outputs.npy", reference_outputs.astype(np.float32), allow_pickle=False)
    source_outputs = {"float.keras": "sample/reference_outputs.npy"}
    if any(v.needs_qat for v in job.chosen):  # verify checks QAT int8 files against the model they came from
        qat_outputs = _predict(ctx.qat_model(), loaded.images)
        np.save(tmp / "sample" / "qat_outputs.npy", qat_outputs.astype(np.float32), allow_pickle=False)
        source_outputs["qat.h5"] = "sample/qat_outputs.npy"
    return int(len(loaded.images)), source_outputs


def _write_artifact(
    job: _Job, ctx: BuildContext, v: Variant, tmp: Path, labels_text: str, fp32_size: dict[str, int]
) -> tuple[ArtifactResult, dict[str, Any]]:
    """Build one variant, embed its metadata, write it and check that it loads; its result and bundle record."""
    run = job.run
    t0 = time.time()
    raw = v.builder(ctx)
    io = tflite_export.describe(raw) if v.format == "tflite" else onnx_export.describe(onnx_export.rename_io(raw))
    contract = dict(run.input_contract)
    contract["dtype"] = io["input_dtype"]
    if io["input_quant"] is not None:
        contract["quant"] = io["input_quant"]
    meta = artifact_metadata(
        edgetl_version=__version__,
        run_id=run.run_id,
        backbone=run.backbone,
        labels=run.labels,
        input_contract=contract,
        quantization=v.quantization,
        fmt=v.format,
        source="qat.h5" if v.needs_qat else "float.keras",
    )
    if v.format == "tflite":
        data = tflite_export.embed_metadata(raw, meta, labels_text)
    else:
        data = onnx_export.finalize(raw, meta)
    path = tmp / v.file
    path.write_bytes(data)
    if v.format == "onnx":
        onnx_export.check_loads(path)
    else:
        io = tflite_export.describe(data)  # the finished file loads; its names are the standard ones
    if v.quantization == "fp32":
        fp32_size[v.format] = len(data)
    base = fp32_size.get(v.format)
    digest = sha256_file(path)
    artifact = ArtifactResult(
        name=v.name,
        file=v.file,
        path=job.out / v.file,
        format=v.format,
        quantization=v.quantization,
        size_bytes=len(data),
        ratio_to_fp32=(len(data) / base) if base else None,
        input_dtype=io["input_dtype"],
        input_quant=io["input_quant"],
        output_dtype=io["output_dtype"],
        output_quant=io["output_quant"],
        sha256=digest,
        seconds=round(time.time() - t0, 2),
    )
    record = ArtifactRecord(
        name=v.name,
        file=v.file,
        format=v.format,
        quantization=v.quantization,
        input_name=io["input_name"],
        input_shape=io["input_shape"],
        input_dtype=io["input_dtype"],
        input_quant=io["input_quant"],
        output_name=io["output_name"],
        output_dtype=io["output_dtype"],
        output_quant=io["output_quant"],
        size_bytes=len(data),
        sha256=digest,
        source=meta["source"],
        **({"opset": io["opset"]} if "opset" in io else {}),
    ).dump()
    return artifact, record


def _write_bundle_json(
    job: _Job,
    tmp: Path,
    reference: str,
    records: list[dict[str, Any]],
    sample_count: int,
    source_outputs: dict[str, str],
) -> None:
    """The model card, then bundle.json (validated by schema.Bundle) with every file's checksum, written last."""
    run = job.run
    bundle = {
        "schema": BUNDLE_SCHEMA,
        "edgetl_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_id": run.run_id,
        "backbone": run.backbone,
        "labels": list(run.labels),
        "input": run.input_contract,
        "output": {"kind": "probabilities", "softmax": True, "classes": len(run.labels)},
        "reference": reference,
        "artifacts": records,
        "sample": {
            "images": "sample/images.npy",
            "labels": "sample/labels.npy",
            "reference_outputs": "sample/reference_outputs.npy",
            "count": sample_count,
            "split": "val",
            "seed": job.seed,
            "reference_model": "float.keras",
            "source_outputs": source_outputs,
        },
        "calibration": {"split": "train", "count": job.calibration_count, "seed": job.seed + 1},
        "source_run": {"path": str(run.path), "manifest_sha256": sha256_file(run.path / "manifest.json")},
        "notes": job.notes,
    }
    (tmp / "README.md").write_text(model_card(bundle, run.manifest), encoding="utf-8")
    bundle["files"] = {
        p.relative_to(tmp).as_posix(): sha256_file(p)
        for p in sorted(tmp.rglob("*"))
        if p.is_file() and p.name not in ("bundle.json", PID_FILE)
    }
    atomic_write_json(tmp / "bundle.json", Bundle.model_validate(bundle).dump())
    os.chmod(tmp / "bundle.json", 0o666 & ~_umask())


def _reference(chosen: Sequence[Variant]) -> str:
    names = [v.name for v in chosen]
    for candidate in ("onnx_fp32", "tflite_fp32"):
        if candidate in names:
            return candidate
    raise ExportError(
        "the bundle needs a float32 reference artifact (onnx fp32 or tflite fp32), and none was selected",
        "add fp32 to --quantization (e.g. --quantization fp32,qat_int8)",
    )


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


__all__ = [
    "VARIANTS",
    "QUANTIZATIONS",
    "FORMATS",
    "Variant",
    "ArtifactResult",
    "ExportResult",
    "export_run",
    "select_variants",
    "parse_formats",
    "variant",
    "variants_help",
    "stratified_sample",
]
