"""The verification report: data, ``report.json``/``report.md``/plots (written atomically) and the rich table."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgetl import schema
from edgetl.errors import ConfigError
from edgetl.fsutil import atomic_dir, atomic_path, atomic_write_json, atomic_write_text, check_target
from edgetl.manifest import REPORT_FOLDER
from edgetl.verify.checks import EXIT_CODES, FAIL, INCONCLUSIVE, PASS, ArtifactResult, LatencyStats, Thresholds

LATENCY_PLOT = "latency.png"
CONFUSION_PLOT = "confusion.png"
MISCLASSIFIED_PLOT = "misclassified.png"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            info = fh.read()
    except OSError:
        info = ""
    keys = ("model name", "Model", "Hardware", "cpu model", "Processor")
    for key in keys:
        for line in info.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def _dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(threads: int, timed: tuple[int, ...] | list[int] | None = None) -> dict[str, Any]:
    """What this report's numbers were measured on (no TensorFlow import). ``threads``: the deployment count the
    checks use; ``timed``: every thread count timed (default just that one)."""
    return {
        "cpu": _cpu_model(),
        "arch": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "threads_timed": list(timed or [threads]),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": _dist_version("onnxruntime"),
        "ai_edge_litert": _dist_version("ai-edge-litert"),
        "openvino": _dist_version("openvino"),
        "os": platform.platform(),
        "hostname": platform.node(),
    }


@dataclass
class ReferenceInfo:
    name: str
    kind: str  # "keras" (run dir: the original), "bundle" (its stored outputs) or the fp32 stand-in's format
    accuracy: float
    latency: LatencyStats | None
    outputs_source: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "accuracy": self.accuracy,
            "latency_ms": self.latency.to_dict() if self.latency else None,
            "outputs_source": self.outputs_source,
        }


@dataclass
class Report:
    target: str
    bundle: str
    run_id: str | None
    labels: tuple[str, ...]
    reference: ReferenceInfo
    artifacts: list[ArtifactResult]
    thresholds: Thresholds
    machine: dict[str, Any]
    samples: int
    data: str
    labels_true: np.ndarray | None = field(default=None, repr=False)
    warnings: list[str] = field(default_factory=list)
    reference_per_class: dict[str, Any] | None = None
    images: np.ndarray | None = field(default=None, repr=False)
    image_names: list[str] | None = field(default=None, repr=False)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def verdict(self) -> str:
        """FAIL if any check failed, else INCONCLUSIVE if any could not decide, else PASS."""
        verdicts = {a.verdict for a in self.artifacts}
        return FAIL if FAIL in verdicts else INCONCLUSIVE if INCONCLUSIVE in verdicts else PASS

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    @property
    def failures(self) -> list[str]:
        return [f"{a.name}: {f}" for a in self.artifacts for f in a.failures]

    @property
    def undecided(self) -> list[str]:
        return [f"{a.name}: {f}" for a in self.artifacts for f in a.inconclusive]

    def to_dict(self) -> dict[str, Any]:
        """``report.json`` (:class:`edgetl.schema.Report`)."""
        return schema.Report(
            schema=schema.REPORT_SCHEMA,
            verdict=self.verdict,
            exit_code=self.exit_code,
            passed=self.passed,
            created=self.created,
            target=self.target,
            bundle=self.bundle,
            run_id=self.run_id,
            data=self.data,
            samples=self.samples,
            labels=list(self.labels),
            reference=self.reference.to_dict(),
            artifacts=[a.to_dict() for a in self.artifacts],
            failures=self.failures,
            inconclusive=self.undecided,
            reference_per_class=self.reference_per_class,
            thresholds=self.thresholds.to_dict(),
            machine=self.machine,
            warnings=list(self.warnings),
        ).dump()

    # -- files ----------------------------------------------------------------------------------------
    def write(self, directory: str | Path) -> Path:
        """Write report.json, report.md and the two plots into ``directory`` as one set.

        They are written in a fresh private temp folder beside ``directory`` (created by mkdtemp: nothing planted
        can be followed) and swapped in whole, so a killed run never mixes a new report.md with an old report.json
        and leaves no partial file in ``directory``. A symlinked ``directory``, or one holding files that are not
        edgetl reports, is refused (:func:`check_report_dir`).
        """
        directory = Path(directory)
        check_report_dir(directory)
        try:
            with atomic_dir(directory, REPORT_FOLDER, force=True, flag="--report") as tmp:
                plots = write_plots(self, tmp)
                atomic_write_text(tmp / "report.md", to_markdown(self, plots))
                atomic_write_json(tmp / "report.json", self.to_dict())
        except OSError as exc:
            raise ConfigError(
                f"cannot write the verify report to {directory}: {exc.strerror or exc}",
                "pass --report DIR (a writable folder)",
            ) from None
        return directory


def check_report_dir(directory: str | Path) -> None:
    """Refuse (ConfigError, before any measuring) a report folder that is a symbolic link, a file, or holds files
    that are not edgetl's reports. A folder edgetl cannot write to is left to :meth:`Report.write`."""
    directory = Path(directory)
    if directory.is_file() and not directory.is_symlink():
        return  # like a read-only bundle: Report.write says so (a warning for the default folder)
    check_target(directory, REPORT_FOLDER, force=True, flag="--report", writable=False)


def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return format(value, spec)


def _row(a: ArtifactResult, threads: list[int] | None = None) -> list[str]:
    """One table row; ``threads`` (the report's timed counts, deployment count first) adds the extra counts' columns."""
    ci = f" [{a.paired.ci_low_pp:+.1f},{a.paired.ci_high_pp:+.1f}]" if a.paired else ""
    kind = f"{a.format} {a.quantization} <- {a.source}"
    if a.engine == "openvino":
        kind = f"{a.format}/openvino {a.quantization} <- {a.source}"
    cells = [
        a.name + (" (ref)" if a.is_reference else ""),
        kind,
        _fmt(a.accuracy, ".4f"),
        _fmt(a.accuracy_drop_pp, "+.2f") + ci,
        _fmt(a.top1_agreement, ".4f"),
        _fmt(a.max_abs_diff, ".1e"),
        _fmt(a.latency.p50, ".3f"),
        _fmt(a.latency.p99, ".3f"),
        _fmt(a.latency_ratio, ".2f"),
    ]
    for t in (threads or [])[1:]:
        stats = a.latency_by_threads.get(t)
        cells += [_fmt(stats.p50 if stats else None, ".3f"), _fmt(a.latency_ratio_by_threads.get(t), ".2f")]
    return cells + [f"{a.size_bytes / 1024:.1f}", a.verdict]


#: "agree"/"max Δp": vs the source model (fidelity); "drop pp [CI]": vs the float model (accuracy);
#: "int8/fp32": p50 ratio to the same runtime's fp32 artifact (latency)
HEADERS = [
    "artifact",
    "type",
    "acc",
    "drop pp [CI]",
    "agree",
    "max Δp",
    "p50 ms",
    "p99 ms",
    "int8/fp32",
    "KiB",
    "verdict",
]


def _threads(report: Report) -> list[int]:
    timed = report.machine.get("threads_timed") or [report.machine.get("threads")]
    return [int(t) for t in timed if t is not None]


def headers(report: Report) -> list[str]:
    """:data:`HEADERS`, with the latency columns per thread count when several were timed (``@1t`` = 1 thread; the
    first is the deployment count the latency check used)."""
    threads = _threads(report)
    if len(threads) <= 1:
        return list(HEADERS)
    first = threads[0]
    cols = HEADERS[:6] + [f"p50 ms @{first}t", f"p99 ms @{first}t", f"int8/fp32 @{first}t"]
    for t in threads[1:]:
        cols += [f"p50 ms @{t}t", f"int8/fp32 @{t}t"]
    return cols + HEADERS[-2:]


def _threads_line(report: Report) -> str:
    threads = _threads(report)
    first = threads[0] if threads else report.machine.get("threads")
    line = f"threads {first} (the deployment count: the latency check uses it)"
    if len(threads) > 1:
        line += f"; also timed at {', '.join(map(str, threads[1:]))} in the same interleaved run (information)"
    return line


def to_markdown(report: Report, plots: dict[str, str] | None = None) -> str:
    ref = report.reference
    lines = [
        f"# edgetl verify: {report.verdict}",
        "",
        f"- bundle: `{report.bundle}`" + (f" (run `{report.run_id}`)" if report.run_id else ""),
        f"- data: {report.data} ({report.samples} images)",
        f"- float model: `{ref.name}` ({ref.outputs_source}), accuracy {ref.accuracy:.4f}"
        + (f", p50 {ref.latency.p50:.3f} ms / p99 {ref.latency.p99:.3f} ms (information only)" if ref.latency else ""),
        f"- checks: fidelity vs the model each file was converted from (`<-`); accuracy: paired non-inferiority vs "
        f"the float model, margin {report.thresholds.margin_pp:g} pp, {report.thresholds.confidence:.0%} CI to pass, "
        f"{report.thresholds.fail_confidence:.1%} CI to fail (Newcombe); latency: int8 p50 / the same runtime's "
        f"fp32 p50 <= {report.thresholds.latency_limit:g}",
        f"- machine: {report.machine.get('cpu')} ({report.machine.get('arch')}), "
        f"python {report.machine.get('python')}, onnxruntime {report.machine.get('onnxruntime')}, "
        f"ai_edge_litert {report.machine.get('ai_edge_litert')}"
        + (
            f", openvino {report.machine.get('openvino')}"
            if any(a.engine == "openvino" for a in report.artifacts)
            else ""
        )
        + f", {report.machine.get('os')}",
        f"- {_threads_line(report)}",
        f"- created: {report.created}",
        "",
        "| " + " | ".join(headers(report)) + " |",
        "|" + "|".join("---" for _ in headers(report)) + "|",
    ]
    lines += ["| " + " | ".join(_row(a, _threads(report))) + " |" for a in report.artifacts]
    lines += ["", "## Thresholds", ""]
    lines += [f"- `{k}`: {'-' if v is None else format(v, 'g')}" for k, v in report.thresholds.to_dict().items()]
    lines += ["", "## Failures", ""]
    lines += [f"- {f}" for f in report.failures] or ["- none"]
    lines += ["", "## Inconclusive", ""]
    lines += [f"- {f}" for f in report.undecided] or ["- none"]
    lines += _per_class_markdown(report)
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report.warnings]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{title}]({name})" for title, name in plots.items()]
    return "\n".join(lines) + "\n"


def _pr(entry: dict[str, Any]) -> str:
    p, r = entry.get("precision"), entry.get("recall")
    return f"{_fmt(p, '.3f')} / {_fmt(r, '.3f')}"


def _per_class_markdown(report: Report) -> list[str]:
    arts = [a for a in report.artifacts if a.per_class]
    if not arts or report.reference_per_class is None:
        return []
    head = ["class", "images", f"{report.reference.name} P / R"] + [f"{a.name} P / R" for a in arts]
    lines = [
        "",
        "## Per class (precision / recall)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for name in report.labels:
        ref = report.reference_per_class["classes"][name]
        cells = [name, str(ref["support"]), _pr(ref)] + [_pr(a.per_class["classes"][name]) for a in arts]  # type: ignore[index]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Confusion matrices (rows true, columns predicted, order {', '.join(report.labels)}) are in "
        "report.json (`artifacts[].per_class.confusion`).",
        "",
    ]
    chosen = _confusion_artifact(report)
    if chosen is not None and chosen.per_class:
        wrong = chosen.per_class.get("misclassified", [])
        lines += [f"### Misclassified by {chosen.name} ({chosen.per_class.get('misclassified_count', 0)} images)", ""]
        lines += [
            f"- `{w['image']}`: true {w['true']}, predicted {w['predicted']} (p {w['probability']:.2f})"
            for w in wrong[:20]
        ] or ["- none"]
    return lines


def _confusion_artifact(report: Report) -> ArtifactResult | None:
    candidates = [a for a in report.artifacts if a.predictions is not None]
    int8 = [a for a in candidates if "int8" in a.quantization]
    if int8:
        return max(int8, key=lambda a: a.accuracy)  # max keeps the first on ties
    return candidates[0] if candidates else None


def write_plots(report: Report, directory: Path) -> dict[str, str]:
    """Latency bar chart and a confusion matrix; returns {title: filename}. Matplotlib is imported lazily."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        report.warnings.append("matplotlib is not installed: no plots were written")
        return {}
    plots: dict[str, str] = {}

    names, p50, p90 = [], [], []
    if report.reference.latency and report.reference.kind == "keras":
        names.append(f"{report.reference.name} (ref)")
        p50.append(report.reference.latency.p50)
        p90.append(report.reference.latency.p99)
    for a in report.artifacts:
        names.append(a.name + (" (ref)" if a.is_reference else ""))
        p50.append(a.latency.p50)
        p90.append(a.latency.p99)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.5))
    x = np.arange(len(names))
    bars = ax.bar(x - 0.2, p50, 0.4, label="p50")
    ax.bar(x + 0.2, p90, 0.4, label="p99")
    ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
    if report.thresholds.max_p50_ms is not None:
        ax.axhline(report.thresholds.max_p50_ms, color="red", linestyle="--", linewidth=1, label="--max-p50-ms")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("ms per image (batch 1)")
    ax.set_title(f"Latency, {report.machine.get('threads')} thread(s): {report.machine.get('cpu')}"[:90], fontsize=9)
    ax.legend()
    fig.tight_layout()
    with atomic_path(directory / LATENCY_PLOT) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    plots["latency p50/p99"] = LATENCY_PLOT

    chosen = _confusion_artifact(report)
    if chosen is not None and report.labels_true is not None:
        n = len(report.labels)
        matrix = np.zeros((n, n), dtype=np.int64)
        np.add.at(matrix, (report.labels_true, np.argmax(chosen.predictions, axis=1)), 1)
        size = min(max(4.0, 0.45 * n + 2), 16.0)
        fig, ax = plt.subplots(figsize=(size, size))
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(report.labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticklabels(report.labels, fontsize=8)
        if n <= 30:
            for i in range(n):
                for j in range(n):
                    ax.text(
                        j,
                        i,
                        str(matrix[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black",
                    )
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"Confusion: {chosen.name} (accuracy {chosen.accuracy:.3f})", fontsize=9)
        fig.tight_layout()
        with atomic_path(directory / CONFUSION_PLOT) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        plots[f"confusion matrix ({chosen.name})"] = CONFUSION_PLOT
        wrong = np.flatnonzero(np.argmax(chosen.predictions, axis=1) != report.labels_true)[:16]
        if report.images is not None and wrong.size:
            cols = min(4, wrong.size)
            rows = -(-wrong.size // cols)
            fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
            for ax in axes.flat:
                ax.axis("off")
            for ax, i in zip(axes.flat, wrong):
                ax.imshow(report.images[i])
                pred = int(np.argmax(chosen.predictions[i]))
                ax.set_title(
                    f"#{i} true {report.labels[int(report.labels_true[i])]}\npred {report.labels[pred]}", fontsize=7
                )
            fig.suptitle(f"Misclassified by {chosen.name}", fontsize=9)
            fig.tight_layout()
            with atomic_path(directory / MISCLASSIFIED_PLOT) as tmp:
                fig.savefig(tmp, dpi=100, format="png")
            plt.close(fig)
            plots[f"misclassified ({chosen.name})"] = MISCLASSIFIED_PLOT
    return plots


def render(report: Report, console: Any) -> None:
    """Print the rich table (one row per artifact, coloured verdict), then every failure and warning."""
    from rich import box
    from rich.table import Table

    ref = report.reference
    title = f"edgetl verify — {report.samples} images from {report.data}"
    table = Table(
        title=title, title_style="bold", header_style="bold", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False
    )
    # Narrow terminals (a device's serial console): keep the columns that decide the verdict.
    narrow = getattr(console, "width", 200) < 118
    cols = headers(report)
    threads = _threads(report)
    extra_ratios = {f"int8/fp32 @{t}t" for t in threads[1:]}  # narrow: the other counts keep their p50 only
    keep = [
        i
        for i, h in enumerate(cols)
        if not (narrow and (h in ("type", "KiB", "agree", "max Δp") or h.startswith("p99 ms") or h in extra_ratios))
    ]
    for i in keep:
        header = cols[i]
        if header in ("artifact", "type"):
            table.add_column(header, justify="left", overflow="fold", min_width=8 if header == "type" else 15)
        else:
            table.add_column(header, justify="left" if header == "verdict" else "right", no_wrap=True)
    if ref.kind == "keras":
        lat = ref.latency
        cells = [
            f"{ref.name} (original)",
            "keras fp32",
            f"{ref.accuracy:.4f}",
            "",
            "",
            "",
            _fmt(lat.p50 if lat else None, ".3f"),
            _fmt(lat.p99 if lat else None, ".3f"),
            "",
        ]
        cells += ["-", ""] * (len(threads) - 1) + ["", "info"]
        table.add_row(*[cells[i] for i in keep], style="dim")
    for a in report.artifacts:
        cells = _row(a, threads)
        cells[-1] = {PASS: "[bold green]PASS[/]", FAIL: "[bold red]FAIL[/]"}.get(
            a.verdict, "[bold yellow]INCONCLUSIVE[/]"
        )
        table.add_row(*[cells[i] for i in keep])
    console.print(table)
    t = report.thresholds
    console.print(
        f"float model: {ref.name} ({ref.outputs_source}); accuracy: margin {t.margin_pp:g} pp at {t.confidence:.0%} "
        f"(fail at {t.fail_confidence:.1%}); "
        f"latency: int8/fp32 same runtime <= {t.latency_limit:g}; machine: {report.machine.get('cpu')}; "
        f"{_threads_line(report)}",
        highlight=False,
    )
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if report.failures:
        console.print(f"[bold red]{len(report.failures)} check(s) failed:[/]")
        for failure in report.failures:
            console.print(f"  [red]✗[/] {failure}", highlight=False, soft_wrap=True)
    if report.undecided:
        console.print(f"[bold yellow]{len(report.undecided)} check(s) inconclusive:[/]")
        for item in report.undecided:
            console.print(f"  [yellow]?[/] {item}", highlight=False, soft_wrap=True)
    if report.verdict == PASS:
        console.print("[bold green]verdict: PASS (all checks passed)[/]")
    else:
        console.print(f"verdict: {report.verdict} (exit {report.exit_code})", highlight=False)
