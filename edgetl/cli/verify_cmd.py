"""``edgetl verify``: TensorFlow-free on a bundle, so it runs on the edge device itself."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgetl.cli._common import console, handle_errors, option, out, print_json
from edgetl.config import VerifyConfig
from edgetl.errors import ConfigError

HELP = """Prove each exported artifact is as good as the model it came from, and as fast, on THIS CPU.

TARGET is a bundle folder (what `edgetl export` wrote; it needs no TensorFlow: copy it to the device and run this there) or a run directory (on the host: its bundle is RUN/export/, the original float.keras and qat.h5 are run, and the run's whole validation split is used when its images are reachable).

Three checks per artifact, every failure listed: FIDELITY against the model it was converted from (float.keras for fp32/fp16/dynamic/PTQ/ORT-static, qat.h5 for QAT int8; fp32 max |dp| <= --float-tolerance, fp16 <= --fp16-tolerance, int8 top-1 agreement >= --min-agreement and mean |dp| <= --max-mean-diff); ACCURACY non-inferiority against the original float model on the same labelled images (paired Newcombe interval of the drop: PASS when its upper end is <= --margin-pp, FAIL when its lower end is above it, INCONCLUSIVE when too few images to tell: pass --data DIR); LATENCY: each int8 artifact's p50 <= (--max-latency-ratio + --latency-noise) x the fp32 artifact of the same runtime, timed interleaved in one run at the (first) --threads count, and optional budgets --max-p50-ms/--max-p99-ms. The Keras model's latency is shown as information. With --runtime onnxruntime,openvino every ONNX artifact is checked in each runtime (one row each).

Exit status: 0 PASS (every check passed), 1 FAIL (a check failed), 4 INCONCLUSIVE (nothing failed but a check could not decide, e.g. too few images), 2 bad input (missing or tampered bundle, bad flag), 3 internal error. Reports (report.json, report.md, latency.png, confusion.png, misclassified.png) go to BUNDLE/verify/ or --report DIR.
"""


def register(app: typer.Typer) -> None:
    @app.command("verify", help=HELP, no_args_is_help=True)
    @handle_errors
    def verify_cmd(
        target: Path = typer.Argument(..., help="Bundle folder (device) or run directory (host).", show_default=False),
        data: Optional[Path] = option(VerifyConfig, "data", metavar="DIR"),
        threads: str = option(
            VerifyConfig,
            "threads",
            default=str(VerifyConfig.model_fields["threads"].default),
            metavar="N[,M...]",
            help="A comma list (e.g. 1,2 or 1,all; all = this machine's cores) times every model at each count side "
            "by side in the same run; the FIRST is your deployment count: the latency check uses it.",
        ),
        runtime: Optional[list[str]] = typer.Option(
            None,
            "--runtime",
            metavar="NAME",
            help="Run the ONNX artifacts in this runtime: onnxruntime (default) or openvino (Intel CPUs; pip install "
            "'edgetl\\[openvino]'); repeat or comma-separate for both, side by side (OpenVINO rows are NAME@openvino: "
            "static batch 1, f32 precision, no CPU pinning). TFLite files always run in LiteRT.",
        ),
        runs: int = option(VerifyConfig, "runs", min=1),
        warmup: int = option(VerifyConfig, "warmup", min=0),
        margin_pp: float = option(VerifyConfig, "margin_pp", metavar="PP"),
        confidence: float = option(VerifyConfig, "confidence", metavar="C"),
        fail_confidence: float = option(VerifyConfig, "fail_confidence", metavar="C"),
        min_agreement: float = option(VerifyConfig, "min_agreement", metavar="F"),
        max_mean_diff: float = option(VerifyConfig, "max_mean_diff", metavar="D"),
        float_tolerance: float = option(VerifyConfig, "float_tolerance", metavar="T"),
        fp16_tolerance: float = option(VerifyConfig, "fp16_tolerance", metavar="T"),
        max_latency_ratio: float = option(VerifyConfig, "max_latency_ratio", metavar="R"),
        latency_noise: float = option(VerifyConfig, "latency_noise", metavar="N"),
        max_p50_ms: Optional[float] = option(VerifyConfig, "max_p50_ms", metavar="MS"),
        max_p99_ms: Optional[float] = option(VerifyConfig, "max_p99_ms", metavar="MS"),
        bundle_sample: bool = option(VerifyConfig, "bundle_sample"),
        report: Optional[Path] = option(VerifyConfig, "report", metavar="DIR"),
        as_json: bool = typer.Option(
            False, "--json", help="Print the report JSON on stdout (the table goes to stderr)."
        ),
        only: Optional[list[str]] = typer.Option(
            None, "--only", metavar="NAME", help="Verify only this artifact (repeat, or comma-separate, for several)."
        ),
    ) -> None:
        from edgetl.verify import Thresholds, default_report_dir, parse_runtimes, parse_threads, verify

        thread_counts = parse_threads(threads)  # bad values: one line, exit 2, before anything is loaded
        runtimes = parse_runtimes(runtime)

        thresholds = Thresholds(
            margin_pp=margin_pp,
            confidence=confidence,
            fail_confidence=fail_confidence,
            min_agreement=min_agreement,
            max_mean_diff=max_mean_diff,
            float_tolerance=float_tolerance,
            fp16_tolerance=fp16_tolerance,
            max_latency_ratio=max_latency_ratio,
            latency_noise=latency_noise,
            max_p50_ms=max_p50_ms,
            max_p99_ms=max_p99_ms,
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
                threads=thread_counts,
                runtimes=runtimes,
                runs=runs,
                warmup=warmup,
                thresholds=thresholds,
                artifacts=only,
                bundle_sample=bundle_sample,
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
        if result.exit_code:
            raise typer.Exit(result.exit_code)
