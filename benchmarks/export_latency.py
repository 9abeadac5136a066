"""Latency and size of every exported artifact against the original Keras model, per backbone, side by side.

For each backbone this runs the real pipeline on a small real subset (finetune with a short QAT phase, export
fp32 + int8 TFLite and ONNX), then times the original Keras model and every artifact in every runtime that reads it (LiteRT for .tflite;
onnxruntime and, with `edgetl[openvino]`, OpenVINO for .onnx) at each thread count (default 1 and 2), all in one
interleaved run with edgetl verify's runners: batch 1, warm-up, then >= 100 timed runs per model, so machine noise hits
every model alike. Accuracy is not the point here (few images, one epoch); latency and size are.

    EDGETL_WEIGHTS_DIR=../shared/weights python benchmarks/export_latency.py [--image-size 224] [--runs 200] [--threads 1 2]

    python benchmarks/export_latency.py --backbones resnet50 vgg16 efficientnet_b7 --threads 1 --runs 100

MobileNetV3-Small uses the shared ImageNet weights; the other backbones have none here and use
random initialisation, with BatchNorm statistics recalibrated on the images by finetune (int8 latency does depend on
the weights: collapsed activations give int8 scales that XNNPACK refuses, see docs/qat.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from edgetl.config import FinetuneConfig  # noqa: E402
from edgetl.export import export_run  # noqa: E402
from edgetl.finetune import finetune  # noqa: E402
from edgetl.verify import load_bundle, paired_ratio  # noqa: E402
from edgetl.verify.runners import KerasRunner, make_runner, measure_latencies  # noqa: E402

#: backbone -> weights used here (only MobileNetV3-Small's ImageNet file is available offline; the rest run with random
#: weights and BatchNorm statistics recalibrated by finetune)
BACKBONES = {
    "mobilenet_v3_small": "imagenet",
    "mobilenet_v3_large": "none",
    "efficientnet_b0": "none",
    "resnet50": "none",
    "vgg16": "none",
    "efficientnet_b7": "none",
}


def subset(src: Path, dst: Path, per_class: int) -> Path:
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for img in sorted(cls.iterdir())[:per_class]:
            (dst / cls.name / img.name).symlink_to(img.resolve())
    return dst


def runners_for(run: Path, threads: list[int], openvino: bool) -> dict[tuple[str, str, int], object]:
    """(artifact, runtime, threads) -> runner, for every artifact in every runtime that reads its format."""
    bundle = load_bundle(run / "export")
    out: dict[tuple[str, str, int], object] = {}
    keras = KerasRunner("float.keras", run / "float.keras", bundle.input, len(bundle.labels), threads=threads[0])
    out[("keras (original)", "tf_keras", threads[0])] = keras
    for spec in bundle.artifacts:
        for t in threads:
            runtime = "litert" if spec.format == "tflite" else "onnxruntime"
            out[(spec.name, runtime, t)] = make_runner(spec, bundle.input, bundle.labels, threads=t)
            if openvino and spec.format == "onnx":
                out[(spec.name, "openvino", t)] = make_runner(spec, bundle.input, bundle.labels, t, engine="openvino")
    return out, bundle


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(here.parent / "shared" / "data" / "trashnet"))
    ap.add_argument(
        "--backbones",
        nargs="+",
        default=list(BACKBONES),
        choices=list(BACKBONES),
        help="rows to run (default: all; EfficientNet-B7 alone takes tens of minutes on 2 cores)",
    )
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--per-class", type=int, default=12)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="thread counts, each timed in the same interleaved run (the first is the headline)",
    )
    ap.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO columns")
    ap.add_argument(
        "--format",
        default="all",
        choices=["all", "tflite", "onnx"],
        help="artifact formats to export and time (tflite: LiteRT rows only, e.g. for EfficientNet-B7)",
    )
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    openvino = not args.no_openvino
    if openvino:
        try:
            import openvino as _  # noqa: F401
        except ImportError:
            print("openvino is not installed (pip install 'edgetl[openvino]'): no OpenVINO rows\n")
            openvino = False
    work = Path(args.workdir or tempfile.mkdtemp(prefix="edgetl-bench-"))
    data = subset(Path(args.data), work / "data", args.per_class) if not (work / "data").exists() else work / "data"
    cpu = (
        next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    t0 = args.threads[0]
    print(
        f"CPU: {cpu}; {os.cpu_count()} cores; threads {args.threads}; batch 1; warm-up {args.warmup}; "
        f"{args.runs} timed runs, every model and thread count interleaved in one run; {args.image_size} px\n"
    )
    rows = []
    for name in args.backbones:
        run = work / name
        if not (run / "manifest.json").exists():
            cfg = FinetuneConfig(
                data=str(data),
                backbone=name,
                weights=BACKBONES.get(name, "none"),
                image_size=args.image_size,
                epochs=1,
                fine_tune_epochs=0,
                freeze="all",
                feature_views=0,
                qat=True,
                qat_epochs=1,
                calibration_images=32,
                out=str(run),
            )
            finetune(cfg)
        export_run(run, format=args.format, quantization=["fp32", "qat_int8"], samples=24, force=True)
        runners, bundle = runners_for(run, args.threads, openvino)
        keyed = {"|".join(map(str, k)): r for k, r in runners.items()}
        times = measure_latencies(keyed, bundle.sample.images[0], warmup=args.warmup, runs=args.runs)
        stats = {k: np.percentile(times["|".join(map(str, k))], [50, 90, 99]) for k in runners}
        keras_p50 = stats[("keras (original)", "tf_keras", t0)][0]
        sizes = {s.name: s.path.stat().st_size for s in bundle.artifacts}
        quant = {s.name: s.quantization for s in bundle.artifacts}
        fmt = {s.name: s.format for s in bundle.artifacts}
        fp32_of = {
            f: next(s.name for s in bundle.artifacts if s.format == f and s.quantization == "fp32")
            for f in fmt.values()
        }
        for (art, runtime, t), (p50, p90, p99) in stats.items():
            if t != t0:
                continue
            by_threads = {tt: stats[(art, runtime, tt)][0] for tt in args.threads if (art, runtime, tt) in stats}
            # int8 vs the same runtime's fp32 at each thread count: median over the interleaved rounds of the
            # per-round p50 ratio (as edgetl verify), so a neighbour's load in one round hits both sides of it
            ratio_by_threads = {}
            for tt in by_threads:
                base_key = (fp32_of.get(fmt.get(art)), runtime, tt)
                if art in fmt and base_key in runners:
                    ratio_by_threads[tt] = paired_ratio(
                        times["|".join(map(str, (art, runtime, tt)))], times["|".join(map(str, base_key))]
                    )
            vs_fp32 = ratio_by_threads.get(t0)
            size = sizes.get(art)
            size_rel = size / sizes[fp32_of[fmt[art]]] if size else None
            rows.append(
                dict(
                    backbone=name,
                    artifact=art,
                    runtime=runtime,
                    p50=p50,
                    p90=p90,
                    p99=p99,
                    by_threads=by_threads,
                    ratio_by_threads=ratio_by_threads,
                    size=size,
                    vs_keras=p50 / keras_p50,
                    vs_fp32=vs_fp32,
                    size_rel=size_rel,
                    int8="int8" in quant.get(art, ""),
                )
            )
        for r in runners.values():
            r.close()

    tcols = "".join(f"{'p50 ' + str(t) + 't':>10}" for t in args.threads)
    tcols += "".join(f"{'int8/fp32 ' + str(t) + 't':>15}" for t in args.threads)
    print(
        f"{'backbone':<20}{'artifact':<18}{'runtime':<13}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{tcols}"
        f"{'size KiB':>10}{'vs keras':>10}{'vs fp32':>9}{'size/fp32':>10}"
    )
    print(
        "(vs fp32, int8/fp32: median over interleaved rounds of the per-round p50 ratio; the load average when timed "
        "is printed below)"
    )
    for r in rows:
        tvals = "".join(f"{r['by_threads'].get(t, float('nan')):>10.3f}" for t in args.threads)
        tvals += "".join(
            f"{r['ratio_by_threads'][t]:>14.2f}x" if r["int8"] and t in r["ratio_by_threads"] else f"{'':>15}"
            for t in args.threads
        )
        vs_fp32 = f"{r['vs_fp32']:.2f}x" if r["vs_fp32"] is not None else ""
        size_rel = f"{r['size_rel']:.2f}x" if r["size_rel"] is not None else ""
        print(
            f"{r['backbone']:<20}{r['artifact']:<18}{r['runtime']:<13}{r['p50']:>9.3f}{r['p90']:>9.3f}"
            f"{r['p99']:>9.3f}{tvals}{(r['size'] or 0) / 1024:>10.0f}{r['vs_keras']:>9.2f}x{vs_fp32:>9}{size_rel:>10}"
        )
    print(f"load when timed: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
    print(
        f"\ngoals ({t0} thread): best int8 <= 0.30x keras; int8 <= 1.0x fp32 in the same runtime; "
        "int8 size <= 0.30x fp32 (OpenVINO rows: information)"
    )
    for name in args.backbones:
        mine = [r for r in rows if r["backbone"] == name and r["int8"] and r["runtime"] != "openvino"]
        best = min(mine, key=lambda r: r["p50"])
        lat_ok = all(r["vs_fp32"] <= 1.0 for r in mine)
        size_ok = all(r["size_rel"] <= 0.30 for r in mine)
        print(
            f"{name}: best int8 {best['artifact']} at {best['vs_keras']:.2f}x keras "
            f"({'PASS' if best['vs_keras'] <= 0.30 else 'MISS'}); int8 vs fp32 latency {'PASS' if lat_ok else 'MISS'}; "
            f"int8 size {'PASS' if size_ok else 'MISS'}"
        )


if __name__ == "__main__":
    main()
