"""Which backbone? For one data set: each backbone's float and int8 accuracy, int8 latency and size, side by side.

Runs the real pipeline per backbone (`edgetl finetune` with a QAT phase, `edgetl export` of the fp32 and QAT int8
TFLite files), then times both files with LiteRT (XNNPACK, batch 1, the same interleaved timing as `edgetl verify`)
on this machine. Accuracies are the run's own validation numbers (manifest.json): float = the Keras model, int8 =
the converted int8 .tflite run with LiteRT on the validation split.

    EDGETL_WEIGHTS_DIR=../shared/weights python benchmarks/backbone_compare.py --data ../shared/data/trashnet \\
        --backbones mobilenet_v3_small efficientnet_b0 resnet50 --image-size 96 --epochs 2 --per-class 40

`--weights auto` (default) uses ImageNet weights where the file is found locally (``--weights-dir`` /
``$EDGETL_WEIGHTS_DIR`` / Keras's cache) and random weights otherwise, and says which in the table: accuracies of
random-weight rows say little about the architecture (they measure a backbone trained from scratch on a few
images), their latency and size are the real ones. For a fair accuracy comparison put every backbone's
``*_notop.h5`` file in the weights folder.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from export_latency import subset  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from edgetl.backbones import BACKBONES, get_backbone  # noqa: E402
from edgetl.config import FinetuneConfig  # noqa: E402
from edgetl.errors import WeightsError  # noqa: E402
from edgetl.export import export_run  # noqa: E402
from edgetl.finetune import finetune  # noqa: E402
from edgetl.verify import load_bundle  # noqa: E402
from edgetl.verify.runners import make_runner, measure_latencies  # noqa: E402
from edgetl.weights import resolve_weights  # noqa: E402


def weights_for(name: str, spec: str, size: int) -> str:
    if spec != "auto":
        return spec
    try:
        resolve_weights(get_backbone(name), "imagenet", size, allow_download=False)
        return "imagenet"
    except WeightsError:
        return "none"


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(here.parent / "shared" / "data" / "trashnet"))
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    ap.add_argument(
        "--weights", default="auto", help="auto (imagenet where found locally, else none) | imagenet | none"
    )
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--per-class", type=int, default=0, help="images per class (0: all)")
    ap.add_argument("--epochs", type=int, default=5, help="head epochs")
    ap.add_argument("--fine-tune-epochs", type=int, default=0)
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--freeze", default="auto")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="keeps the runs; a rerun reuses finished ones")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="edgetl-compare-"))
    data = Path(args.data)
    if args.per_class:
        data = work / "data" if (work / "data").exists() else subset(data, work / "data", args.per_class)
    rows = []
    for name in args.backbones:
        run = work / name
        weights = weights_for(name, args.weights, args.image_size)
        if not (run / "manifest.json").exists():
            cfg = FinetuneConfig(
                data=str(data),
                backbone=name,
                weights=weights,
                image_size=args.image_size,
                epochs=args.epochs,
                fine_tune_epochs=args.fine_tune_epochs,
                freeze=args.freeze,
                qat=True,
                qat_epochs=args.qat_epochs,
                out=str(run),
                seed=0,
            )
            finetune(cfg)
        manifest = json.loads((run / "manifest.json").read_text())
        export_run(run, format="tflite", quantization=["fp32", "qat_int8"], samples=12, force=True)
        bundle = load_bundle(run / "export")
        runners = {s.name: make_runner(s, bundle.input, bundle.labels, threads=args.threads) for s in bundle.artifacts}
        times = measure_latencies(runners, bundle.sample.images[0], warmup=args.warmup, runs=args.runs)
        for r in runners.values():
            r.close()
        by_q = {s.quantization: s for s in bundle.artifacts}
        p50 = {s.quantization: float(np.percentile(times[s.name], 50)) for s in bundle.artifacts}
        m = manifest.get("metrics", {})
        rows.append(
            dict(
                backbone=name,
                weights=manifest["weights"]["source"],
                float_acc=m.get("float_val_accuracy"),
                int8_acc=m.get("qat_int8_val_accuracy"),
                fp32_ms=p50["fp32"],
                int8_ms=p50["qat_int8"],
                fp32_mb=by_q["fp32"].path.stat().st_size / 1e6,
                int8_mb=by_q["qat_int8"].path.stat().st_size / 1e6,
            )
        )

    def acc(v):
        return f"{v:.3f}" if isinstance(v, (int, float)) else "-"

    print(
        f"\n{data} at {args.image_size} px; head {args.epochs} epochs, fine-tune {args.fine_tune_epochs}, "
        f"QAT {args.qat_epochs}; LiteRT {args.threads} thread(s), batch 1, p50 of {args.runs} runs\n"
    )
    print(
        f"{'backbone':<20}{'weights':<10}{'float acc':>10}{'int8 acc':>10}{'int8 ms':>10}{'fp32 ms':>10}"
        f"{'int8/fp32':>10}{'int8 MB':>9}{'fp32 MB':>9}"
    )
    for r in rows:
        print(
            f"{r['backbone']:<20}{r['weights']:<10}{acc(r['float_acc']):>10}{acc(r['int8_acc']):>10}"
            f"{r['int8_ms']:>10.2f}{r['fp32_ms']:>10.2f}{r['int8_ms'] / r['fp32_ms']:>9.2f}x"
            f"{r['int8_mb']:>9.2f}{r['fp32_mb']:>9.2f}"
        )
    if any(r["weights"] == "none" for r in rows):
        print(
            "\nweights none: trained from scratch on this data (accuracy says little about the architecture; "
            "latency and size are the real ones)"
        )


if __name__ == "__main__":
    main()
