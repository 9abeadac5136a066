"""The embedded demo data set: procedurally drawn photos-like images of 3 shape classes (no download needed).

Each image is a randomly coloured, textured background with one shape (circle, square or triangle) of random size,
position, rotation and colour, plus noise and blur, so the task is learnable but not trivial.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edgetl.fsutil import atomic_write_bytes

CLASSES = ("circle", "square", "triangle")


def _draw(kind: str, size: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw, ImageFilter

    base = rng.integers(40, 216, size=3)
    grad = np.linspace(-40, 40, size)[None, :, None] * rng.uniform(-1, 1)
    bg = np.clip(base[None, None, :] + grad + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.38) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    colour = tuple(int(c) for c in (255 - base + rng.integers(-60, 60, size=3)) % 256)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        n = 4 if kind == "square" else 3
        phase = rng.uniform(0, 2 * math.pi)
        pts = [(cx + r * math.cos(phase + 2 * math.pi * i / n), cy + r * math.sin(phase + 2 * math.pi * i / n))
               for i in range(n)]
        draw.polygon(pts, fill=colour)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))


def make_shapes(root: str | Path, per_class: int = 120, size: int = 128, seed: int = 0) -> Path:
    """Write ``per_class`` JPEGs per class under ``root/<class>/``; idempotent for the same arguments."""
    import io

    root = Path(root)
    stamp = root / ".edgetl-shapes"
    key = f"{per_class}-{size}-{seed}"
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
