"""`edgetl finetune`: parse flags -> FinetuneConfig -> edgetl.finetune.finetune -> render."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgetl.cli._common import handle_errors, option, out, print_json
from edgetl.config import Augment, FinetuneConfig

_DATA = "Data"
_MODEL = "Model"
_TRAINING = "Training"
_AUGMENTATION = "Augmentation"
_QAT = "QAT (phase 3)"
_OUTPUT = "Output"


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
            out.print(
                f"worker done ({d['strategy']}, {d['workers']} workers): the chief ({d['chief']}) writes "
                f"the run directory {result.run_dir}"
            )
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
    out.print(
        f"freeze: {f['frozen_layers']} frozen / {f['trainable_layers']} trainable layers with weights, "
        f"boundary {f['boundary_layer']} — {f['reason']}"
    )


def register(app: typer.Typer) -> None:
    @app.command(
        help=(
            "Fine-tune a pretrained backbone on a folder of class sub-folders: train the head on cached features of the "
            "frozen backbone, optionally fine-tune the top of the backbone at a 10-100x lower learning rate, then run "
            "quantization-aware training. Writes a run directory (model, labels, curves, manifest.json)."
        )
    )
    @handle_errors
    def finetune(
        data: Path = option(FinetuneConfig, "data", show_default=False, rich_help_panel=_DATA),
        val_data: Optional[Path] = option(FinetuneConfig, "val_data", rich_help_panel=_DATA),
        val_split: float = option(FinetuneConfig, "val_split", rich_help_panel=_DATA),
        backbone: str = option(FinetuneConfig, "backbone", rich_help_panel=_MODEL),
        weights: str = option(FinetuneConfig, "weights", rich_help_panel=_MODEL),
        weights_dir: Optional[Path] = option(FinetuneConfig, "weights_dir", rich_help_panel=_MODEL),
        image_size: Optional[int] = option(FinetuneConfig, "image_size", rich_help_panel=_MODEL),
        epochs: int = option(FinetuneConfig, "epochs", rich_help_panel=_TRAINING),
        fine_tune_epochs: int = option(FinetuneConfig, "fine_tune_epochs", rich_help_panel=_TRAINING),
        head_lr: float = option(FinetuneConfig, "head_lr", rich_help_panel=_TRAINING),
        fine_tune_lr: Optional[float] = option(FinetuneConfig, "fine_tune_lr", rich_help_panel=_TRAINING),
        freeze: str = option(FinetuneConfig, "freeze", rich_help_panel=_MODEL),
        domain: str = option(FinetuneConfig, "domain", rich_help_panel=_MODEL),
        batch_size: int = option(FinetuneConfig, "batch_size", rich_help_panel=_TRAINING),
        dropout: float = option(FinetuneConfig, "dropout", rich_help_panel=_MODEL),
        label_smoothing: float = option(FinetuneConfig, "label_smoothing", rich_help_panel=_TRAINING),
        augment_flip: bool = option(Augment, "flip", "--augment-flip/--no-augment-flip", rich_help_panel=_AUGMENTATION),
        augment_rotation: float = option(Augment, "rotation", "--augment-rotation", rich_help_panel=_AUGMENTATION),
        augment_zoom: float = option(Augment, "zoom", "--augment-zoom", rich_help_panel=_AUGMENTATION),
        augment_contrast: float = option(Augment, "contrast", "--augment-contrast", rich_help_panel=_AUGMENTATION),
        feature_views: int = option(FinetuneConfig, "feature_views", rich_help_panel=_TRAINING),
        patience: int = option(FinetuneConfig, "patience", rich_help_panel=_TRAINING),
        qat: bool = option(FinetuneConfig, "qat", "--qat/--no-qat", rich_help_panel=_QAT),
        qat_epochs: int = option(FinetuneConfig, "qat_epochs", rich_help_panel=_QAT),
        qat_lr: float = option(FinetuneConfig, "qat_lr", rich_help_panel=_QAT),
        calibration_images: int = option(FinetuneConfig, "calibration_images", rich_help_panel=_QAT),
        seed: int = option(FinetuneConfig, "seed", rich_help_panel=_TRAINING),
        name: Optional[str] = option(FinetuneConfig, "name", rich_help_panel=_OUTPUT),
        out_dir: Optional[Path] = option(
            FinetuneConfig,
            "out",
            "--out",
            help="Built in a hidden .NAME.partial folder beside it and swapped in "
            "when complete; a killed run resumes from its last finished phase when the same command is rerun. An "
            "existing folder is never replaced unless it is an edgetl run and --force is given.",
            rich_help_panel=_OUTPUT,
        ),
        force: bool = typer.Option(
            False,
            "--force",
            help="Replace an earlier edgetl run at --out (with its export/ "
            "bundle and verify reports). Refused anyway if the folder is not an edgetl run "
            "or holds files edgetl did not write.",
            rich_help_panel=_OUTPUT,
        ),
        skip_bad_images: bool = option(FinetuneConfig, "skip_bad_images", rich_help_panel=_DATA),
        as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON.", rich_help_panel=_OUTPUT),
    ) -> None:
        from edgetl.finetune import finetune as run_finetune
        from edgetl.progress import RichReporter

        cfg = finetune_config_from_flags(
            dict(
                data=str(data),
                val_data=str(val_data) if val_data else None,
                val_split=val_split,
                backbone=backbone,
                weights=weights,
                weights_dir=str(weights_dir) if weights_dir else None,
                image_size=image_size,
                epochs=epochs,
                fine_tune_epochs=fine_tune_epochs,
                head_lr=head_lr,
                fine_tune_lr=fine_tune_lr,
                freeze=freeze,
                domain=domain,
                batch_size=batch_size,
                dropout=dropout,
                label_smoothing=label_smoothing,
                augment=dict(
                    flip=augment_flip, rotation=augment_rotation, zoom=augment_zoom, contrast=augment_contrast
                ),
                feature_views=feature_views,
                patience=patience,
                qat=qat,
                qat_epochs=qat_epochs,
                qat_lr=qat_lr,
                calibration_images=calibration_images,
                seed=seed,
                name=name,
                out=str(out_dir) if out_dir else None,
                skip_bad_images=skip_bad_images,
            )
        )
        result = run_finetune(cfg, RichReporter(), force=force)
        render_run(result, as_json)
