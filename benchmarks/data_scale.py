"""Data-set scale: peak RSS and wall time of the same `edgetl finetune` at growing numbers of images.

MobileNetV3-Small, weights none, 224 px, 2 head epochs, no fine-tune, no QAT, on synthetic 4-class JPEGs (generated
once into a cache under /tmp, never into the repo). Each size runs in a fresh `edgetl finetune` process; its peak
RSS is the child's own ``ru_maxrss`` (os.wait4). Goal (issue 15): RSS(largest) / RSS(smallest) <= 1.3 and time per
image flat within 20% (the marginal cost of a further image, measured between consecutive sizes: a run's fixed
start-up is not a cost per image).

    nice -n 5 python benchmarks/data_scale.py [--sizes 800,6400,25600] [--cache /tmp/edgetl-data-scale]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLASSES = ("blue", "green", "red", "yellow")
HUES = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40), "yellow": (210, 200, 40)}


def make_images(root: Path, per_class: int, size: int = 224, seed: int = 0) -> None:
    """``per_class`` JPEGs per class: noise and random ellipses, tinted by the class colour (learnable, varied)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for name in CLASSES:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        have = len(list(folder.glob("*.jpg")))
        for i in range(have, per_class):
            base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((size, size), Image.BILINEAR)
            draw = ImageDraw.Draw(img)
            colour = np.array(HUES[name])
            for _ in range(3):
                x0, y0 = rng.integers(0, size * 3 // 4, 2)
                w, h = rng.integers(size // 6, size // 2, 2)
                tint = tuple(int(c) for c in np.clip(colour + rng.integers(-40, 40, 3), 0, 255))
                draw.ellipse([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=tint)
            img.save(folder / f"{i:06d}.jpg", quality=90)


def subset(all_root: Path, dst: Path, per_class: int) -> Path:
    """dst/CLASS/ with symlinks to the first ``per_class`` images of each class (nothing copied)."""
    for name in CLASSES:
        (dst / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            link = dst / name / f"{i:06d}.jpg"
            if not link.exists():
                link.symlink_to(all_root / name / f"{i:06d}.jpg")
    return dst


def run_finetune(data: Path, out: Path, image_size: int, epochs: int, batch_size: int) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_USE_LEGACY_KERAS="1")
    cmd = [
        sys.executable,
        "-m",
        "edgetl",
        "finetune",
        "--data",
        str(data),
        "--weights",
        "none",
        "--image-size",
        str(image_size),
        "--epochs",
        str(epochs),
        "--fine-tune-epochs",
        "0",
        "--no-qat",
        "--batch-size",
        str(batch_size),
        "--out",
        str(out),
        "--force",
        "--json",
    ]
    t0 = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(
            f"edgetl finetune failed on {data} (exit {os.waitstatus_to_exitcode(status)}); "
            f"see {out.with_suffix('.log')}"
        )
    manifest = json.loads(stdout)["manifest"]
    return {"wall_s": wall, "rss_mb": usage.ru_maxrss / 1024, "manifest": manifest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="800,6400,25600", help="numbers of images (multiples of 4)")
    ap.add_argument("--cache", default="/tmp/edgetl-data-scale", help="where the synthetic JPEGs are kept")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    cache = Path(args.cache)
    t0 = time.perf_counter()
    make_images(cache / "all", max(sizes) // 4, args.image_size)
    print(f"synthetic JPEGs ready in {cache / 'all'} ({time.perf_counter() - t0:.0f} s)", flush=True)

    rows = []
    for n in sizes:
        data = subset(cache / "all", cache / f"n{n}", n // 4)
        r = run_finetune(data, cache / f"run-{n}", args.image_size, args.epochs, args.batch_size)
        m = r["manifest"]["phases"]["head"]
        rows.append(
            (
                n,
                r["wall_s"],
                r["rss_mb"],
                m.get("cache_seconds"),
                m.get("train_seconds"),
                r["manifest"]["metrics"]["float_val_accuracy"],
            )
        )
        print(f"{n} images: {r['wall_s']:.1f} s, peak RSS {r['rss_mb']:.0f} MB", flush=True)

    n0, w0, r0 = rows[0][:3]
    print(
        f"\nedgetl finetune, {args.image_size} px, {args.epochs} head epochs, weights none, no fine-tune, no QAT, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"{'images':>8}{'wall s':>9}{'ms/image':>10}{'x (ms/img)':>12}{'peak RSS MB':>13}{'x RSS':>8}"
        f"{'cache s':>9}{'head s':>8}{'val acc':>9}"
    )
    for n, wall, rss, cache_s, train_s, acc in rows:
        per = wall / n * 1000
        print(
            f"{n:>8}{wall:>9.1f}{per:>10.2f}{per / (w0 / n0 * 1000):>12.2f}{rss:>13.0f}{rss / r0:>8.2f}"
            f"{cache_s:>9.1f}{train_s:>8.1f}{acc:>9.3f}"
        )
    # Time per image: the wall time of a run is a fixed start-up (TensorFlow import, model build, tracing, writing
    # the run directory) plus a cost per image. The whole run's ms/image (column above) falls with size only because
    # the start-up is shared by more images; what must stay flat is the cost of each further image, the marginal
    # ms/image between consecutive sizes (a pipeline that slowed down with size, e.g. by swapping or a growing
    # buffer, shows here).
    steps = [((b[1] - a[1]) / (b[0] - a[0]) * 1000, a[0], b[0]) for a, b in zip(rows, rows[1:])]
    for per, a, b in steps:
        print(f"marginal ms/image {a:>6} -> {b:<6}: {per:.2f}")
    big = rows[-1]
    rss_ratio = big[2] / r0
    time_ratio = steps[-1][0] / steps[0][0] if len(steps) > 1 else float("nan")
    phase_ratio = ((big[3] + big[4]) / big[0]) / ((rows[0][3] + rows[0][4]) / n0)
    ok = rss_ratio <= 1.3 and abs(time_ratio - 1) <= 0.2
    print(
        f"\nRSS({big[0]})/RSS({n0}) = {rss_ratio:.2f} (goal <= 1.3); marginal time per image, last step / first "
        f"step = {time_ratio:.2f} (goal within 0.8-1.2); whole-run ms/image {big[0]} vs {n0}: "
        f"{(big[1] / big[0]) / (w0 / n0):.2f} (start-up included); head phase alone (cache s + head s) per image: "
        f"{phase_ratio:.2f}"
    )
    print("RESULT", "PASS" if ok else "MISS")


if __name__ == "__main__":
    main()
