"""`edgetl finetune`: parse flags -> FinetuneConfig -> edgetl.finetune.finetune -> render."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgetl.backbones import BACKBONES
from edgetl.cli._common import handle_errors, out, print_json


def finetune_config_from_flags(values: dict):
    from edgetl.config import FinetuneConfig, validate

    given = {k: v for k, v in values.items() if v is not None}
    return validate(FinetuneConfig, given, "options")


def render_run(result, as_json: bool) -> None:
    m = result.manifest
    if not result.chief:  # a multi-worker run's other worker: its copy is deleted, the chief wrote the run
        d = m["distribution"]
        if as_json:
            print_json({"run_dir": None, "chief_run_dir": str(result.run_dir), "distribution": d})
        else:
            out.print(f"worker done ({d['strategy']}, {d['workers']} workers): the chief ({d['chief']}) writes "
                      f"the run directory {result.run_dir}")
        return
    if as_json:
        print_json({"run_dir": str(result.run_dir), "manifest": m})
        return
    from rich.table import Table

    t = Table(title=f"run {m['run_id']}  ->  {result.run_dir}", show_header=True)
    t.add_column("phase")
    t.add_column("status")
    t.add_column("val accuracy", justify="right")
    t.add_column("seconds", justify="right")
    for name, rec in m["phases"].items():
        acc = rec.get("val_accuracy")
        secs = rec.get("seconds", (rec.get("train_seconds") or 0) + (rec.get("cache_seconds") or 0))
        t.add_row(name, rec["status"], f"{acc:.4f}" if acc is not None else "-", f"{secs:.1f}" if secs else "-")
    out.print(t)
    for key, value in m["metrics"].items():
        out.print(f"  {key:>24}: {value:.4f}")
    w = m["weights"]
    out.print(f"weights: {w['source']}" + (f" ({w['path']}, sha256 {w['sha256'][:12]}…)" if w.get("sha256") else ""))
    f = m["freeze"]
    out.print(f"freeze: {f['frozen_layers']} frozen / {f['trainable_layers']} trainable layers with weights, "
              f"boundary {f['boundary_layer']} — {f['reason']}")


def register(app: typer.Typer) -> None:
    @app.command(help=(
        "Fine-tune a pretrained backbone on a folder of class sub-folders: train the head on cached features of the "
        "frozen backbone, optionally fine-tune the top of the backbone at a 10-100x lower learning rate, then run "
        "quantization-aware training. Writes a run directory (model, labels, curves, manifest.json)."))
    @handle_errors
    def finetune(
        data: Path = typer.Option(..., "--data", help="Folder with one sub-folder of images per class."),
        val_data: Optional[Path] = typer.Option(None, help="Separate labelled validation folder (instead of --val-split)."),
        val_split: Optional[float] = typer.Option(None, help="Stratified, seeded validation fraction (default 0.2)."),
        backbone: Optional[str] = typer.Option(None, help=" | ".join(BACKBONES) + "."),
        weights: Optional[str] = typer.Option(None, help="imagenet (looks in --weights-dir / $EDGETL_WEIGHTS_DIR first) | none | PATH.h5."),
        weights_dir: Optional[Path] = typer.Option(None, help="Folder holding Keras's weight files by their own names."),
        image_size: Optional[int] = typer.Option(None, help="Square input size in pixels (default: the backbone's, 224)."),
        epochs: Optional[int] = typer.Option(None, help="Head-phase epochs (early stopping on val accuracy) (default 15)."),
        fine_tune_epochs: Optional[int] = typer.Option(None, help="Epochs fine-tuning the unfrozen backbone top (default 0)."),
        fine_tune_lr: Optional[float] = typer.Option(None, help="Fine-tune learning rate, 10-100x below the head's 1e-3 (default 5e-5; 2e-3 with --weights none: training from scratch)."),
        freeze: Optional[str] = typer.Option(None, help="auto | all | none | early | mid | late | LAYER_NAME | fraction 0..1 (default auto; with --weights none auto freezes nothing)."),
        domain: Optional[str] = typer.Option(None, help="similar | different: how close your photos are to ImageNet (for --freeze auto)."),
        batch_size: Optional[int] = typer.Option(None, help="Batch size (default 32)."),
        feature_views: Optional[int] = typer.Option(None, help="Augmented views per image cached for the head phase (default 2)."),
        qat: Optional[bool] = typer.Option(None, "--qat/--no-qat", help="Quantization-aware training (phase 3) (default on)."),
        qat_epochs: Optional[int] = typer.Option(None, help="QAT epochs; early stopping keeps the best (default 6)."),
        qat_lr: Optional[float] = typer.Option(None, help="QAT learning rate (default 3e-5)."),
        seed: Optional[int] = typer.Option(None, help="Random seed (recorded in the manifest) (default 0)."),
        out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default models/<data>-<backbone>). "
                                               "Built in a hidden .NAME.partial folder beside it and swapped in when "
                                               "complete; a killed run resumes from its last finished phase when the "
                                               "same command is rerun. An existing folder is never replaced unless it "
                                               "is an edgetl run and --force is given."),
        force: bool = typer.Option(False, "--force", help="Replace an earlier edgetl run at --out (with its export/ "
                                   "bundle and verify reports). Refused anyway if the folder is not an edgetl run "
                                   "or holds files edgetl did not write."),
        skip_bad_images: Optional[bool] = typer.Option(None, "--skip-bad-images", help="Skip unreadable images (counted) instead of failing."),
        as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    ) -> None:
        from edgetl.finetune import finetune as run_finetune
        from edgetl.progress import RichReporter

        cfg = finetune_config_from_flags(dict(
            data=str(data), val_data=str(val_data) if val_data else None, val_split=val_split, backbone=backbone,
            weights=weights, weights_dir=str(weights_dir) if weights_dir else None, image_size=image_size,
            epochs=epochs, fine_tune_epochs=fine_tune_epochs, fine_tune_lr=fine_tune_lr, freeze=freeze,
            domain=domain, batch_size=batch_size, feature_views=feature_views, qat=qat, qat_epochs=qat_epochs, qat_lr=qat_lr,
            seed=seed, out=str(out_dir) if out_dir else None, skip_bad_images=skip_bad_images))
        result = run_finetune(cfg, RichReporter(), force=force)
        render_run(result, as_json)
