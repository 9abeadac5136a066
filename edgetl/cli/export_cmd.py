"""``edgetl export``: run directory → TFLite/ONNX artifacts + a TF-free verification bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from edgetl.cli._common import console, handle_errors, option, out, print_json
from edgetl.config import ExportConfig

_EXPORT_DEFAULTS = ExportConfig()

HELP = """Export a fine-tuned run to TFLite and/or ONNX, as a self-contained verification bundle.

RUN_DIR is the folder `edgetl finetune` wrote (manifest.json, float.keras, qat.h5 when QAT ran, splits.json). The bundle (default RUN_DIR/export/) holds the artifacts, labels.txt, sample/ (held-out images, their labels and the original Keras model's outputs) and bundle.json with every file's sha256; copy it to the device and run `edgetl verify BUNDLE` there (no TensorFlow needed).

Every artifact takes NHWC RGB pixels 0..255 (preprocessing is inside the model) and outputs softmax probabilities; full-int8 TFLite variants take uint8 pixels directly, the rest float32. Labels, input contract, run id, backbone and quantization are embedded in each file's metadata.

Default variants: fp32 (reference) + qat_int8 per format; a run without QAT gets ptq_int8 (TFLite) and ort_static_int8 (ONNX) instead. The bundle is built beside the target and swapped in only when complete; an earlier bundle there is replaced only with --force, and a folder that is not an edgetl bundle never.
"""


def _epilog() -> str:
    from edgetl.export import variants_help

    rows = variants_help().splitlines()
    return "Variants (format, --quantization, when default, what):\n\n" + "\n\n".join(rows)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def render_export(result: Any, as_json: bool) -> None:
    """Print the artifact table (stderr when ``as_json``, so stdout stays pure JSON) and notes."""
    from rich.table import Table

    if as_json:
        print_json(result.to_dict())
    table = Table(title=f"bundle {result.out}", title_justify="left")
    table.add_column("variant")
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("vs fp32", justify="right")
    table.add_column("input")
    for a in result.artifacts:
        ratio = "-" if a.ratio_to_fp32 is None else f"{a.ratio_to_fp32:.2f}x"
        inp = a.input_dtype + (f" (scale {a.input_quant[0]:g}, zp {a.input_quant[1]})" if a.input_quant else "")
        name = a.name + (" (reference)" if a.name == result.reference else "")
        table.add_row(name, a.file, _size(a.size_bytes), ratio, inp)
    target = console if as_json else out
    target.print(table)
    target.print(
        f"{len(result.artifacts)} artifact(s), {result.sample_count} sample images, "
        f"{result.calibration_count} calibration images, {result.seconds:.1f}s. "
        f"Next: edgetl verify {result.out}",
        highlight=False,
    )
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("export", help=HELP, epilog=_epilog(), no_args_is_help=True)
    @handle_errors
    def export_cmd(
        run_dir: Path = typer.Argument(..., help="Run directory written by `edgetl finetune`.", show_default=False),
        fmt: list[str] = option(
            ExportConfig, "format", "--format", "-f", default=[_EXPORT_DEFAULTS.format], metavar="FORMAT"
        ),
        quantization: list[str] = option(ExportConfig, "quantization", "--quantization", "-q", metavar="NAME"),
        out_dir: Optional[Path] = option(ExportConfig, "out", "--out", "-o", metavar="DIR"),
        force: bool = typer.Option(
            False,
            "--force",
            help="Replace an earlier bundle at --out (with its verify reports). Refused anyway if "
            "the folder is not an edgetl bundle or holds files edgetl did not write.",
        ),
        samples: int = option(ExportConfig, "samples", min=1),
        seed: Optional[int] = typer.Option(
            None, "--seed", help="Seed for picking sample/calibration images (default: the run's seed)."
        ),
        calibration: int = option(ExportConfig, "calibration_images", min=1, metavar="N"),
        data_root: Optional[Path] = typer.Option(
            None,
            "--data-root",
            metavar="DIR",
            help="Where the run's images are now, if the data folder moved since finetune (paths in splits.json "
            "are relative to it).",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout (table to stderr)."),
    ) -> None:
        from edgetl.export import export_run
        from edgetl.progress import RichReporter

        reporter = RichReporter(console)
        result = export_run(
            run_dir,
            fmt,
            quantization,
            out_dir,
            samples,
            seed,
            calibration=calibration,
            data_root=data_root,
            reporter=_Quiet(reporter),
            force=force,
        )
        render_export(result, as_json)


class _Quiet:
    """Pass progress through; notes are printed once, after the table, by :func:`render_export`."""

    def __init__(self, inner: Any):
        self._inner = inner

    def task(self, description: str, total: int | None):
        return self._inner.task(description, total)

    def info(self, message: str) -> None:
        pass
