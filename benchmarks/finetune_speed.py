"""Head-phase speed: edgetl's cached-feature head training vs a plain `model.fit` over the full frozen-base model.

Same data, same split, same epochs, same optimizer, no augmentation on either side (so both see identical inputs);
prints both wall times, the speed-up and both validation accuracies, measured side by side in one run. edgetl's
time includes decoding the image files (it streams them); the plain fit gets them decoded in memory beforehand.

    EDGETL_WEIGHTS_DIR=../shared/weights python benchmarks/finetune_speed.py [--data DIR] [--image-size 160] [--epochs 10]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from edgetl.backbones import get_backbone  # noqa: E402
from edgetl.config import FinetuneConfig  # noqa: E402
from edgetl.data import ImageList, load_images, scan_folder, stratified_split  # noqa: E402
from edgetl.finetune import PhaseContext, build_classifier, evaluate_accuracy, head_phase, set_seeds  # noqa: E402
from edgetl.progress import NullReporter  # noqa: E402
from edgetl.weights import resolve_weights  # noqa: E402


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(here.parent / "shared" / "data" / "trashnet"))
    ap.add_argument("--backbone", default="mobilenet_v3_small")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-class", type=int, default=0, help="use only the first N images per class (0: all)")
    args = ap.parse_args()

    from edgetl._tfenv import keras

    k = keras()
    b = get_backbone(args.backbone)
    folder = scan_folder(args.data)
    items = folder.items
    if args.per_class:
        items = [it for c in range(len(folder.classes)) for it in [i for i in items if i[1] == c][: args.per_class]]
    tr, va = stratified_split(items, 0.2, args.seed)
    size = (args.image_size, args.image_size)
    t0 = time.perf_counter()
    train, val = load_images(tr, size), load_images(va, size)
    decode_s = time.perf_counter() - t0
    weights = resolve_weights(b, args.weights, args.image_size)
    cfg = FinetuneConfig(
        data=args.data,
        backbone=args.backbone,
        image_size=args.image_size,
        epochs=args.epochs,
        patience=args.epochs + 1,
        feature_views=0,
        seed=args.seed,
        augment={"flip": False, "rotation": 0, "zoom": 0, "contrast": 0},
    )
    print(
        f"data {args.data}: {len(train.labels)} train / {len(val.labels)} val images, {args.image_size} px, "
        f"{args.epochs} epochs, weights {weights.describe()}, {os.cpu_count()} CPUs"
    )

    # edgetl: features of the frozen backbone computed once, head trained on them
    set_seeds(args.seed)
    model, base = build_classifier(b, args.image_size, len(folder.classes), weights, cfg.dropout)
    base.trainable = False
    t0 = time.perf_counter()
    # streamed: decoded from the files, features cached on disk (the plain fit below gets the decoded arrays free)
    phase = PhaseContext(cfg, model, ImageList(tuple(tr)), ImageList(tuple(va)), NullReporter(), args.seed)
    rec = head_phase(phase).record
    edgetl_s = time.perf_counter() - t0
    edgetl_acc = rec["val_accuracy"]

    # baseline: the same classifier, plain model.fit over images (the frozen base runs every epoch)
    set_seeds(args.seed)
    model2, base2 = build_classifier(b, args.image_size, len(folder.classes), weights, cfg.dropout)
    base2.trainable = False
    model2.compile(k.optimizers.Adam(cfg.head_lr), "sparse_categorical_crossentropy", metrics=["accuracy"])
    t0 = time.perf_counter()
    model2.fit(
        train.images.astype(np.float32),
        train.labels,
        batch_size=cfg.batch_size,
        epochs=args.epochs,
        validation_data=(val.images.astype(np.float32), val.labels),
        verbose=0,
        callbacks=[
            k.callbacks.EarlyStopping("val_accuracy", patience=args.epochs + 1, mode="max", restore_best_weights=True)
        ],
    )
    plain_s = time.perf_counter() - t0
    plain_acc = evaluate_accuracy(model2, val.images, val.labels)

    print()
    print(f"{'method':<44}{'seconds':>10}{'val acc':>10}")
    print(f"{'edgetl head phase (cached features)':<44}{edgetl_s:>10.1f}{edgetl_acc:>10.4f}")
    print(f"{'plain model.fit, frozen base':<44}{plain_s:>10.1f}{plain_acc:>10.4f}")
    print(f"{'  (+ decoding its images into memory first)':<44}{plain_s + decode_s:>10.1f}")
    speedup = plain_s / edgetl_s  # conservative: edgetl's time includes decoding the files, the plain fit's not
    print(f"speed-up counting the plain fit's decoding too: {(plain_s + decode_s) / edgetl_s:.1f}x")
    diff_pp = (edgetl_acc - plain_acc) * 100
    print(f"\nspeed-up {speedup:.1f}x (goal >= 5x); accuracy difference {diff_pp:+.2f} pp (goal within +-1 pp)")
    print("RESULT", "PASS" if speedup >= 5 and abs(diff_pp) <= 1.0 else "MISS")


if __name__ == "__main__":
    main()
