"""The stage: ``finetune(cfg)`` checks the target, scans and splits the data, resumes or starts the hidden work
folder, runs the phases (edgetl.finetune.phases) and writes the run directory: labels, splits, curves, manifest,
then swaps it in."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgetl import __version__
from edgetl.backbones import check_image_size, get_backbone
from edgetl.config import FinetuneConfig
from edgetl.data import ImageFolder, scan_folder, stratified_split
from edgetl.finetune.curves import plot_curves
from edgetl.finetune.phases import RunContext, Trained, run_phases
from edgetl.finetune.resume import _read_state
from edgetl.fsutil import (
    atomic_write_json,
    atomic_write_text,
    check_target,
    clean_stale,
    commit_dir,
    resume_dir,
    sha256_file,
)
from edgetl.manifest import RUN_FOLDER, RUN_SCHEMA, config_hash, new_run_id, now_iso, package_versions
from edgetl.progress import NullReporter, Reporter
from edgetl.schema import RunManifest
from edgetl.weights import keras_download_path, resolve_weights, weights_record


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    manifest: dict
    chief: bool = True  # False: a multi-worker run's other worker (the chief wrote run_dir)


def default_run_dir(cfg: FinetuneConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    name = cfg.name or f"{Path(cfg.data).resolve().name}-{cfg.backbone}"
    return Path("models") / name


def _scan_split(cfg: FinetuneConfig) -> tuple[ImageFolder, list, list]:
    """Scan the folders and split them (cheap: no image is decoded). Raises DataError for a bad layout."""
    folder = scan_folder(cfg.data)
    if cfg.val_data:
        val_folder = scan_folder(cfg.val_data, classes=folder.classes)
        train_items, val_items = list(folder.items), list(val_folder.items)
    else:
        train_items, val_items = stratified_split(folder.items, cfg.val_split, cfg.seed)
    return folder, train_items, val_items


def _rel(path: Path, root: Path) -> str:
    """A split entry: the path relative to its data root (portable: the data may move, see --data-root)."""
    try:
        return Path(os.path.abspath(path)).relative_to(root).as_posix()
    except ValueError:
        return os.path.abspath(path)


def finetune(cfg: FinetuneConfig, reporter: Reporter | None = None, force: bool = False) -> RunResult:
    """Run all configured phases and write the run directory. Returns its path and manifest.

    An existing ``--out`` is only replaced when it is an edgetl run holding nothing edgetl did not write, and only
    with ``force``. A killed run resumes (same config and data) from its hidden ``.NAME.partial`` work folder.

    With ``TF_CONFIG`` naming several workers (multi-worker training), only the chief (``chief`` task, else worker
    0) writes the run directory; the other workers train in a temporary folder they delete at the end.
    """
    import tempfile

    from edgetl.distribute import cluster_role

    reporter = reporter or NullReporter()
    role = cluster_role()
    backbone = get_backbone(cfg.backbone)
    image_size = cfg.image_size or backbone.default_size
    check_image_size(backbone, image_size)
    weights = resolve_weights(backbone, cfg.weights, image_size, cfg.weights_dir)
    run_dir = default_run_dir(cfg)
    scratch = None
    if role.chief:
        target = Path(os.path.abspath(run_dir))
        clean_stale(target, RUN_FOLDER)  # a run killed mid-swap: its old run is put back first
        # only ever replace an edgetl run holding nothing but edgetl's files, and only with --force
        replacing = check_target(target, RUN_FOLDER, force)
    else:  # another worker: the same training, written to a private temporary folder
        scratch = Path(tempfile.mkdtemp(prefix=f"edgetl-worker{role.index}-"))
        target, replacing = scratch / "run", False

    try:
        # Cheap checks first (no image decoded, no TensorFlow): folder layout, classes, split.
        folder, train_items, val_items = _scan_split(cfg)
        config = cfg.model_dump()
        config["image_size"] = image_size
        # the data's classes and per-class counts too: a resume must never continue on a changed data set
        chash = config_hash(
            {
                **{k: v for k, v in config.items() if k not in ("out", "name")},
                "data_classes": list(folder.classes),
                "data_counts": folder.counts,
                "split_sizes": [len(train_items), len(val_items)],
            }
        )

        from edgetl.distribute import select_strategy

        strategy = select_strategy(role)  # before the work folder: a cluster that never forms leaves nothing
        work = resume_dir(target)
        state = _read_state(work, chash)
        fresh = state is None
        if state is None:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            state = {"config_hash": chash, "run_id": new_run_id(), "created": now_iso(), "completed": [], "phases": {}}
        else:
            reporter.info(f"resuming {run_dir} after phase(s): {', '.join(state['completed'])}")
        if replacing:
            reporter.info(f"--force: the earlier run in {run_dir} will be replaced when this one is complete")
        try:
            ctx = RunContext(
                cfg=cfg,
                reporter=reporter,
                backbone=backbone,
                image_size=image_size,
                weights=weights,
                run_dir=target if scratch else run_dir,
                folder=folder,
                train_items=train_items,
                val_items=val_items,
                config=config,
                work=work,
                state=state,
                force=force,
                strategy=strategy,
                role=role,
            )
            result = _write_run(ctx, run_phases(ctx))
        except BaseException as exc:
            if fresh and not state["completed"]:  # nothing worth resuming: leave no trace
                shutil.rmtree(work, ignore_errors=True)
            from edgetl.distribute import cluster_failure

            failure = cluster_failure(exc, role)
            if failure is not None:
                raise failure from None
            raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if scratch is not None:
        return RunResult(run_dir, result.manifest, chief=False)
    return result


def _log_files(work: Path) -> dict[str, str]:
    """The training logs (RUN/logs/PHASE/history.csv and TensorBoard events) with their checksums."""
    logs = work / "logs"
    if not logs.is_dir():
        return {}
    return {p.relative_to(work).as_posix(): sha256_file(p) for p in sorted(logs.rglob("*")) if p.is_file()}


def _write_run(ctx: RunContext, trained: Trained) -> RunResult:
    """labels.txt, splits.json, curves.png and manifest.json into the work folder, then the work folder swapped in."""
    cfg, work = ctx.cfg, ctx.work
    atomic_write_text(work / "labels.txt", "\n".join(ctx.folder.classes) + "\n")
    data_root = Path(os.path.abspath(cfg.data))
    val_root = Path(os.path.abspath(cfg.val_data)) if cfg.val_data else data_root
    splits = {
        "data_root": str(data_root),
        "val_root": str(val_root) if cfg.val_data else None,
        "train": [[_rel(p, data_root), int(label)] for p, label in trained.train.items],
        "val": [[_rel(p, val_root), int(label)] for p, label in trained.val.items],
        "skipped": [str(p) for p in trained.train.skipped + trained.val.skipped],
    }
    atomic_write_json(work / "splits.json", splits)
    plot_curves(trained.phases, work / "curves.png")
    manifest = _manifest(ctx, trained, skipped_images=len(splits["skipped"]))
    atomic_write_json(work / "manifest.json", RunManifest.model_validate(manifest).dump())
    # the target checked again (nothing foreign may have appeared in it while training) while progress.json still
    # lets a rerun resume; then progress.json goes and the work folder is swapped in
    commit_dir(work, ctx.run_dir, RUN_FOLDER, ctx.force, scratch=("progress.json",))
    return RunResult(ctx.run_dir, manifest)


def _manifest(ctx: RunContext, trained: Trained, skipped_images: int) -> dict:
    """manifest.json (docs/formats.md), its ``files`` the checksums of what is in the work folder now."""
    backbone, weights, work, state, image_size = ctx.backbone, ctx.weights, ctx.work, ctx.state, ctx.image_size
    strategy, role = ctx.strategy, ctx.role
    loaded = weights.path or (keras_download_path(backbone) if weights.source == "imagenet" else None)
    files = {
        p.name: sha256_file(p)
        for p in sorted(work.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name not in ("manifest.json", "progress.json")
    }
    files.update(_log_files(work))
    distribution = {"strategy": type(strategy).__name__, "replicas": int(strategy.num_replicas_in_sync)}
    if role.workers > 1:  # (TensorFlow's class behind MultiWorkerMirroredStrategy is CollectiveAllReduceStrategy)
        distribution.update(
            {"strategy": "MultiWorkerMirroredStrategy", "workers": role.workers, "chief": role.chief_name}
        )
    return {
        "schema": RUN_SCHEMA,
        "edgetl_version": __version__,
        "run_id": state["run_id"],
        "created": state["created"],
        "finished": now_iso(),
        "backbone": backbone.name,
        "image_size": [image_size, image_size],
        "labels": list(ctx.folder.classes),
        "input": {
            "layout": "NHWC",
            "height": image_size,
            "width": image_size,
            "channels": 3,
            "color": "RGB",
            "dtype": "float32",
            "range": [0, 255],
            "preprocessing": backbone.preprocessing,
        },
        "weights": weights_record(weights, loaded),
        "freeze": trained.freeze,
        "seed": ctx.cfg.seed,
        "determinism": trained.determinism,
        "distribution": distribution,
        "config": ctx.config,
        "versions": package_versions(),
        "data": {
            "classes": ctx.folder.counts,
            "train_images": int(len(trained.train)),
            "val_images": int(len(trained.val)),
            "skipped_images": skipped_images,
        },
        "phases": {name: {k2: v for k2, v in rec.items() if k2 != "history"} for name, rec in trained.phases.items()},
        "metrics": trained.metrics,
        "completed_phases": list(state["completed"]),
        "files": files,
    }
