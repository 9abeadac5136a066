"""Float vs post-training int8 (PTQ) vs quantization-aware int8 (QAT) accuracy, side by side, per data set.

Runs `edgetl finetune` (head, fine-tune, QAT) with MobileNetV3-Small and the local ImageNet weights on each data set,
then reads the manifest, whose int8 accuracies come from running the converted int8 .tflite files with LiteRT on the
validation split (not from the fake-quant Keras model). Goal: QAT int8 within 0.5 pp of float and not below PTQ.

    EDGETL_WEIGHTS_DIR=../shared/weights python benchmarks/qat_accuracy.py [--datasets trashnet flowers]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from edgetl.config import load_recipe  # noqa: E402
from edgetl.finetune import finetune  # noqa: E402
from edgetl.progress import RichReporter  # noqa: E402


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["trashnet", "flowers"])
    ap.add_argument("--image-size", type=int, default=None, help="override the recipes' 224")
    ap.add_argument("--out", default=None, help="where the runs go (default: a temp folder)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="edgetl-qat-"))
    rows = []
    for name in args.datasets:
        recipe = load_recipe(here / "recipes" / f"{name}.yaml")
        values = recipe.finetune.model_dump()
        values["data"] = (
            str((here / values["data"]).resolve()) if not Path(values["data"]).is_absolute() else values["data"]
        )
        values["out"] = str(out / name)
        if args.image_size:
            values["image_size"] = args.image_size
        cfg = type(recipe.finetune).model_validate(values)
        m = finetune(cfg, RichReporter(), force=True).manifest["metrics"]
        rows.append(
            (
                name,
                m["float_val_accuracy"],
                m["ptq_int8_val_accuracy"],
                m["qat_val_accuracy"],
                m["qat_int8_val_accuracy"],
            )
        )
    print(
        f"\n{'data set':<12}{'float':>9}{'PTQ int8':>10}{'QAT fake-q':>12}{'QAT int8':>10}{'QAT-float':>11}{'QAT-PTQ':>9}"
    )
    for name, f, p, q, qi in rows:
        print(f"{name:<12}{f:>9.4f}{p:>10.4f}{q:>12.4f}{qi:>10.4f}{(qi - f) * 100:>+10.2f}pp{(qi - p) * 100:>+8.2f}pp")
    for name, f, p, _, qi in rows:
        ok = (qi - f) * 100 >= -0.5 and qi >= p
        print(f"{name}: QAT int8 within 0.5 pp of float and >= PTQ: {'PASS' if ok else 'MISS'}")


if __name__ == "__main__":
    main()
