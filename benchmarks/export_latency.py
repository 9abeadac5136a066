"""Latency and size of every exported artifact against the original Keras model, per backbone, side by side.

For each backbone this runs the real pipeline on a small real subset (finetune with a short QAT phase, export
fp32 + int8 TFLite and ONNX), then `edgetl verify` times the original Keras model and every artifact in the same
process on this CPU: batch 1, fixed threads (default 1), warm-up, then >= 100 timed runs, interleaved so that machine
noise hits every model alike. Accuracy is not the point here (few images, one epoch); latency and size are.

    EDGETL_WEIGHTS_DIR=../shared/weights python benchmarks/export_latency.py [--image-size 224] [--runs 200]

MobileNetV3-Small uses the shared ImageNet weights; MobileNetV3-Large and EfficientNet-B0 have none here and use
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

from edgetl.config import FinetuneConfig  # noqa: E402
from edgetl.export import export_run  # noqa: E402
from edgetl.finetune import finetune  # noqa: E402
from edgetl.verify import Thresholds, verify  # noqa: E402

BACKBONES = {"mobilenet_v3_small": "imagenet", "mobilenet_v3_large": "none", "efficientnet_b0": "none"}


def subset(src: Path, dst: Path, per_class: int) -> Path:
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for img in sorted(cls.iterdir())[:per_class]:
            (dst / cls.name / img.name).symlink_to(img.resolve())
    return dst


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(here.parent / "shared" / "data" / "trashnet"))
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--per-class", type=int, default=12)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="edgetl-bench-"))
    data = subset(Path(args.data), work / "data", args.per_class) if not (work / "data").exists() else work / "data"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    print(f"CPU: {cpu}; threads {args.threads}; batch 1; warm-up {args.warmup}; {args.runs} timed runs; "
          f"{args.image_size} px\n")
    rows = []
    for name in args.backbones:
        run = work / name
        if not (run / "manifest.json").exists():
            cfg = FinetuneConfig(data=str(data), backbone=name, weights=BACKBONES.get(name, "none"),
                                 image_size=args.image_size, epochs=1, fine_tune_epochs=0, freeze="all",
                                 feature_views=0, qat=True, qat_epochs=1, calibration_images=32, out=str(run))
            finetune(cfg)
        export_run(run, format="all", quantization=["fp32", "qat_int8"], samples=24)
        report = verify(run, threads=args.threads, runs=args.runs, warmup=args.warmup,
                        thresholds=Thresholds(margin_pp=100, min_agreement=0, max_mean_diff=1, max_latency_ratio=100),
                        bundle_sample=True)
        d = report.to_dict()
        ref = d["reference"]
        rows.append((name, "keras (original)", ref["latency_ms"]["p50"], ref["latency_ms"]["p90"], None, 1.0, None))
        sizes = {a["format"]: a["size_bytes"] for a in d["artifacts"] if a["quantization"] == "fp32"}
        p50_fp32 = {a["format"]: a["latency_ms"]["p50"] for a in d["artifacts"] if a["quantization"] == "fp32"}
        for a in d["artifacts"]:
            vs_fp32 = a["latency_ms"]["p50"] / p50_fp32[a["format"]] if a["format"] in p50_fp32 else None
            size_ratio = a["size_bytes"] / sizes[a["format"]] if a["format"] in sizes else None
            rows.append((name, a["name"], a["latency_ms"]["p50"], a["latency_ms"]["p90"], a["size_bytes"],
                         a["latency_ms"]["p50"] / ref["latency_ms"]["p50"], (vs_fp32, size_ratio)))

    print(f"{'backbone':<20}{'artifact':<18}{'p50 ms':>9}{'p90 ms':>9}{'size KiB':>10}{'vs keras':>10}"
          f"{'vs fp32 (lat)':>15}{'vs fp32 (size)':>16}")
    for name, art, p50, p90, size, ratio, rel in rows:
        lat_rel = f"{rel[0]:.2f}x" if rel and rel[0] is not None else ""
        size_rel = f"{rel[1]:.2f}x" if rel and rel[1] is not None else ""
        print(f"{name:<20}{art:<18}{p50:>9.3f}{p90:>9.3f}{(size or 0) / 1024:>10.0f}{ratio:>9.2f}x"
              f"{lat_rel:>15}{size_rel:>16}")
    print("\ngoals: best int8 <= 0.30x keras; int8 <= 1.0x fp32 in the same runtime; int8 size <= 0.30x fp32")
    for name in args.backbones:
        mine = [r for r in rows if r[0] == name and "int8" in r[1]]
        best = min(mine, key=lambda r: r[2])
        lat_ok = all(r[6][0] <= 1.0 for r in mine)
        size_ok = all(r[6][1] <= 0.30 for r in mine)
        print(f"{name}: best int8 {best[1]} at {best[5]:.2f}x keras ({'PASS' if best[5] <= 0.30 else 'MISS'}); "
              f"int8 vs fp32 latency {'PASS' if lat_ok else 'MISS'}; int8 size {'PASS' if size_ok else 'MISS'}")


if __name__ == "__main__":
    main()
