"""The embedded demo data set: procedurally drawn images of 3 shape classes (no download needed).

Each image is a randomly coloured, lightly textured background with one large shape (circle, square or triangle)
(upright) of random size, position and a contrasting colour, plus mild noise and blur. It is sized so that a
MobileNetV3-Small trained from scratch (``weights: none``, no local ImageNet weights) learns it in about a minute
on 2 CPU cores, and has enough held-out images (``DEMO_PER_CLASS`` x 3 x the recipe's val_split) for verify's
paired accuracy test to decide at the default margin.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edgetl.fsutil import atomic_write_bytes

CLASSES = ("circle", "square", "triangle")


def _draw(kind: str, size: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw, ImageFilter

    base = rng.integers(30, 226, size=3)
    grad = np.linspace(-25, 25, size)[None, :, None] * rng.uniform(-1, 1)
    bg = np.clip(base[None, None, :] + grad + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.28, 0.42) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    colour = tuple(int(c) for c in np.where(base > 128, base - 110, base + 110) + rng.integers(-20, 20, size=3))
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        n = 4 if kind == "square" else 3
        phase = -math.pi / 4 if n == 4 else -math.pi / 2  # upright: axis-aligned square, triangle pointing up
        pts = [
            (cx + r * math.cos(phase + 2 * math.pi * i / n), cy + r * math.sin(phase + 2 * math.pi * i / n))
            for i in range(n)
        ]
        draw.polygon(pts, fill=colour)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


#: images per class of the demo set (``builtin:shapes``)
DEMO_PER_CLASS = 300


def make_shapes(root: str | Path, per_class: int = DEMO_PER_CLASS, size: int = 96, seed: int = 0) -> Path:
    """Write ``per_class`` JPEGs per class under ``root/<class>/``; idempotent for the same arguments."""
    import io

    root = Path(root)
    stamp = root / ".edgetl-shapes"
    key = f"v3-{per_class}-{size}-{seed}"
    if stamp.is_file() and stamp.read_text() == key:
        return root
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            buf = io.BytesIO()
            _draw(kind, size, rng).save(buf, "JPEG", quality=90)
            atomic_write_bytes(root / kind / f"{kind}_{i:04d}.jpg", buf.getvalue())
    stamp.write_text(key)
    return root
