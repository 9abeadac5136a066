"""``edgetl verify``: TensorFlow-free on a bundle, so it runs on the edge device itself."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgetl.cli._common import console, handle_errors, out, print_json
from edgetl.errors import ConfigError

HELP = """Prove each exported artifact is as accurate and as fast as the original model, on THIS CPU.

TARGET is a bundle folder (what `edgetl export` wrote; it needs no TensorFlow: copy it to the device and run this there) or a run directory (on the host: its bundle is RUN/export/ and the original float.keras is run as the reference).

Every artifact runs at batch 1 on the bundle's held-out sample (or --data) and is compared with the reference: the original model's outputs (sample/reference_outputs.npy, or float.keras on the host) for accuracy, top-1 agreement and probability differences, and the float32 ONNX artifact named in bundle.json (float.keras on the host) for latency, timed interleaved in the same run. Every failed check is listed, not just the first.

Exit status: 0 all checks pass, 1 a check failed, 2 bad input (missing or tampered bundle, bad flag). Reports (report.json, report.md, latency.png, confusion.png) go to BUNDLE/verify/ or --report DIR.
"""


def register(app: typer.Typer) -> None:
    @app.command("verify", help=HELP, no_args_is_help=True)
    @handle_errors
    def verify_cmd(
        target: Path = typer.Argument(..., help="Bundle folder (device) or run directory (host).", show_default=False),
        data: Optional[Path] = typer.Option(
            None, "--data", metavar="DIR",
            help="Evaluate on this labelled folder (one sub-folder per class, names = the bundle labels) instead of "
            "the bundle sample; reference outputs then come from running the reference model.",
        ),
        threads: int = typer.Option(1, "--threads", min=1, help="CPU threads per inference for every runtime."),
        runs: int = typer.Option(100, "--runs", min=1, help="Timed batch-1 inferences per model."),
        warmup: int = typer.Option(10, "--warmup", min=0, help="Untimed inferences per model before timing."),
        max_accuracy_drop: float = typer.Option(
            1.0, "--max-accuracy-drop", metavar="PP",
            help="Fail an artifact whose top-1 accuracy is more than PP percentage points below the reference's "
            "on the same images. With N images one flipped prediction is 100/N pp.",
        ),
        min_agreement: float = typer.Option(
            0.95, "--min-agreement", metavar="F",
            help="Fail an artifact whose top-1 class equals the reference's on less than this share of images "
            "(0..1). 0.95 suits int8; float artifacts are also held to the output tolerances below.",
        ),
        max_latency_ratio: float = typer.Option(
            1.0, "--max-latency-ratio", metavar="R",
            help="Fail an artifact whose p50 latency is more than R times the reference's p50 measured in the same "
            "run (1.0: no slower than the original). Raise slightly (e.g. 1.1) for tiny models where timing noise "
            "dominates.",
        ),
        float_tolerance: float = typer.Option(
            1e-4, "--float-tolerance", metavar="T",
            help="fp32 artifacts fail if any output probability differs from the reference by more than T.",
        ),
        fp16_tolerance: float = typer.Option(
            1e-2, "--fp16-tolerance", metavar="T",
            help="fp16 artifacts fail if any output probability differs from the reference by more than T "
            "(looser: half precision rounds at ~1e-3).",
        ),
        report: Optional[Path] = typer.Option(
            None, "--report", metavar="DIR", help="Write report.json, report.md and plots here (default: BUNDLE/verify/)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the report JSON on stdout (the table goes to stderr)."),
        only: Optional[list[str]] = typer.Option(
            None, "--only", metavar="NAME", help="Verify only this artifact (repeat, or comma-separate, for several)."
        ),
    ) -> None:
        from edgetl.verify import Thresholds, default_report_dir, verify

        thresholds = Thresholds(
            max_accuracy_drop=max_accuracy_drop,
            min_agreement=min_agreement,
            max_latency_ratio=max_latency_ratio,
            float_tolerance=float_tolerance,
            fp16_tolerance=fp16_tolerance,
        )
        report_dir = report if report is not None else default_report_dir(target)
        from edgetl.verify.report import check_report_dir

        check_report_dir(report_dir)  # a symlinked or foreign report folder: refused before measuring anything
        status = console.status("verifying...", spinner="dots") if console.is_terminal else None
        if status is not None:
            status.start()
        try:
            result = verify(
                target,
                data=data,
                threads=threads,
                runs=runs,
                warmup=warmup,
                thresholds=thresholds,
                artifacts=only,
                progress=(lambda msg: status.update(msg)) if status is not None else None,
            )
        finally:
            if status is not None:
                status.stop()
        written = None
        try:
            written = result.write(report_dir)
        except ConfigError as exc:
            if report is not None:  # the user asked for this folder: a bad --report is bad input
                raise
            # A read-only bundle on a device must not hide the verdict: say so and carry on.
            result.warnings.append(f"{exc.one_line()[:-1]}; reports were not written")
        from edgetl.verify.report import render

        render(result, console if as_json else out)
        if written is not None:
            console.print(f"report: {written / 'report.md'}", highlight=False)
        if as_json:
            print_json(result.to_dict())
        if not result.passed:
            raise typer.Exit(1)
