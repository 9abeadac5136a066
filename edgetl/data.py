"""Image folders: one sub-folder per class. Pure PIL + numpy (no TensorFlow), so the device path can use it.

Every image is decoded the same way everywhere (training, export samples, verify): EXIF orientation applied,
converted to 8-bit RGB, resized (bilinear, no crop) to the model's input size, returned as ``uint8`` HWC.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgetl.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
#: Refuse images larger than this many pixels (decompression bombs); 64 MP covers any real photo.
MAX_IMAGE_PIXELS = 64_000_000


@dataclass(frozen=True)
class ImageFolder:
    """A scanned class-per-folder dataset: class names (sorted) and (path, class index) items."""

    root: Path
    classes: tuple[str, ...]
    items: tuple[tuple[Path, int], ...]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray:
        return np.array([label for _, label in self.items], dtype=np.int64)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


#: Folders that are never classes nor scanned for images (besides hidden ones: ``.thumbs/``, ``.git/``...).
IGNORED_FOLDERS = frozenset({"__MACOSX"})
#: Sub-folder names of a train/val/test split layout (compared case-insensitively).
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def _ignored(path: Path) -> bool:
    return path.name.startswith(".") or path.name in IGNORED_FOLDERS


def _shown(path: Path) -> str:
    """A path as text even when its name is not valid UTF-8 (undecodable bytes shown as \\xNN)."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _check_utf8(path: Path) -> None:
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"folder name {_shown(path)} is not valid UTF-8 (class names become labels in UTF-8 files)",
            "rename it to a UTF-8 name (e.g. `convmv -f latin1 -t utf8 --notest -r DIR`)",
        ) from None


def _check_link(link: Path, real_root: Path, seen: set[Path]) -> Path:
    """A symlinked folder is followed unless it points back into the data folder or at one of its parents."""
    target = link.resolve()
    if target == real_root or target in real_root.parents or target in seen:
        raise DataError(
            f"{_shown(link)} is a symbolic link back to {_shown(target)}, a loop (its images would be read again, "
            "under another label)",
            "remove the link",
        )
    if real_root in target.parents:
        raise DataError(
            f"{_shown(link)} is a symbolic link to {_shown(target)}, inside the data folder (those images would "
            "count twice, under two labels)",
            "remove the link (or copy the images you mean into this class)",
        )
    return target


def _images_in(class_dir: Path, real_root: Path) -> list[Path]:
    """Image files under ``class_dir`` (recursively), skipping hidden and __MACOSX folders, refusing link loops."""
    seen = {class_dir.resolve()}
    found: list[Path] = []
    stack = [class_dir]
    while stack:
        folder = stack.pop()
        for p in sorted(folder.iterdir()):
            if _ignored(p):
                continue
            if p.is_dir():
                if p.is_symlink():
                    seen.add(_check_link(p, real_root, seen))
                else:
                    seen.add(p.resolve())
                stack.append(p)
            elif is_image_file(p):
                found.append(p)
    return sorted(found, key=lambda p: str(p))


def _check_split_layout(root: Path, subdirs: list[Path]) -> None:
    """``train/``, ``val/``, ``test/`` at the root are a split, not classes: refuse with the flags that use it."""
    kinds = {SPLIT_NAMES.get(d.name.lower()) for d in subdirs}
    if None in kinds or "train" not in kinds or len(subdirs) < 2:
        return
    by_kind = {SPLIT_NAMES[d.name.lower()]: d for d in subdirs}
    fix = f"pass --data {_shown(by_kind['train'])}"
    if "val" in by_kind:
        fix += f" --val-data {_shown(by_kind['val'])}"
    else:
        fix += " (a seeded --val-split of it validates)"
    if "test" in by_kind:
        fix += f", and keep {by_kind['test'].name}/ for `edgetl verify RUN --data {_shown(by_kind['test'])}`"
    raise DataError(
        f"data folder {_shown(root)} holds {', '.join(d.name + '/' for d in subdirs)}: a train/val/test split, "
        "not one sub-folder per class",
        fix,
    )


def scan_folder(root: str | Path, classes: Sequence[str] | None = None) -> ImageFolder:
    try:
        return _scan_folder(root, classes)
    except PermissionError as exc:
        raise DataError(
            f"cannot read {_shown(Path(exc.filename or root))}: permission denied",
            "make the data folder readable for this user",
        ) from None


def _scan_folder(root: str | Path, classes: Sequence[str] | None = None) -> ImageFolder:
    """Scan ``root`` (one sub-folder per class). ``classes`` pins the class list (e.g. for --val-data).

    Hidden files and folders and ``__MACOSX/`` are ignored. Refused with one line (DataError) before anything is
    decoded: a train/val/test split layout at the root, a class folder name that is not UTF-8, and a symlinked
    folder pointing back into the data folder or at one of its parents (links to elsewhere are followed).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(
            f"data folder {_shown(root)} does not exist", "pass --data a folder with one sub-folder per class"
        )
    if not root.is_dir():
        raise DataError(f"{_shown(root)} is a file, not a folder", "pass --data a folder with one sub-folder per class")
    real_root = root.resolve()
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not _ignored(p))
    if not subdirs:
        loose = [p for p in root.iterdir() if is_image_file(p)]
        hint = " (it holds loose images)" if loose else ""
        raise DataError(
            f"data folder {_shown(root)} has no class sub-folders{hint}",
            "put each class's images in its own sub-folder, e.g. data/cat/*.jpg and data/dog/*.jpg",
        )
    for d in subdirs:
        _check_utf8(d)
    _check_split_layout(root, subdirs)
    for d in subdirs:
        if d.is_symlink():
            _check_link(d, real_root, set())
    found = {d.name: _images_in(d, real_root) for d in subdirs}
    if classes is None:
        if len(subdirs) < 2:
            raise DataError(
                f"data folder {root} has only one class ({subdirs[0].name})",
                "a classifier needs at least 2 class sub-folders",
            )
        class_names = tuple(d.name for d in subdirs)
    else:
        class_names = tuple(classes)
        extra = sorted(set(found) - set(class_names))
        if extra:
            raise DataError(
                f"{root} has classes the training data does not have: {', '.join(extra)}",
                "use the same class sub-folders as the training data",
            )
    empty = [name for name in class_names if not found.get(name)]
    if empty and classes is None:
        raise DataError(
            f"class folder(s) {', '.join(empty)} in {root} contain no images",
            f"add images ({', '.join(sorted(IMAGE_EXTENSIONS))}) or remove the empty folder",
        )
    items = tuple((p, i) for i, name in enumerate(class_names) for p in found.get(name, []))
    if not items:
        raise DataError(f"no images found in {root}", f"supported extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}")
    counts = {name: len(found.get(name, [])) for name in class_names}
    return ImageFolder(root=root, classes=class_names, items=items, counts=counts)


def _to_rgb8(img):
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, 1) to 8-bit RGB."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def load_image(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Decode one image to ``uint8`` (height, width, 3) RGB. Raises DataError naming the file if unreadable."""
    from PIL import Image, ImageOps

    path = Path(path)
    height, width = size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise DataError(
                        f"image {path} is {img.width}x{img.height} pixels, over the {MAX_IMAGE_PIXELS:,} limit",
                        "resize it or remove it (or pass --skip-bad-images)",
                    )
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)
                if img.format == "JPEG":
                    img.draft("RGB", (width * 2, height * 2))
                img.load()
                img = ImageOps.exif_transpose(img)
                img = _to_rgb8(img)
                img = img.resize((width, height), Image.BILINEAR)
                return np.asarray(img, dtype=np.uint8).copy()
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(
            f"image {path} is too large to decode safely ({exc})", "resize it or remove it (or pass --skip-bad-images)"
        ) from None
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"cannot read image {path}: {reason}", "fix or remove the file, or pass --skip-bad-images"
        ) from None


@dataclass(frozen=True)
class ImageList:
    """A split as file paths and labels (nothing decoded): what the streaming training pipeline reads from."""

    items: tuple[tuple[Path, int], ...]
    skipped: tuple[Path, ...] = ()

    def __len__(self) -> int:
        return len(self.items)

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(p for p, _ in self.items)

    @property
    def labels(self) -> np.ndarray:
        return np.array([label for _, label in self.items], dtype=np.int64)

    def without(self, bad: Sequence[Path]) -> "ImageList":
        """The list minus ``bad`` (unreadable files), which are recorded as skipped."""
        bad_set = {str(p) for p in bad}
        if not bad_set:
            return self
        kept = tuple(it for it in self.items if str(it[0]) not in bad_set)
        gone = tuple(p for p, _ in self.items if str(p) in bad_set)
        return ImageList(kept, self.skipped + gone)


@dataclass(frozen=True)
class LoadedImages:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,)
    paths: tuple[Path, ...]
    skipped: tuple[Path, ...]


def load_images(
    items: Sequence[tuple[Path, int]],
    size: tuple[int, int],
    skip_bad: bool = False,
    progress: Callable[[int], None] | None = None,
) -> LoadedImages:
    """Decode ``items``. Unreadable files raise DataError naming them all, unless ``skip_bad``."""
    height, width = size
    out = np.empty((len(items), height, width, 3), dtype=np.uint8)
    labels, paths, bad, bad_reasons = [], [], [], []
    n = 0
    for path, label in items:
        try:
            out[n] = load_image(path, size)
        except DataError as exc:
            bad.append(path)
            bad_reasons.append(exc.message)
        else:
            labels.append(label)
            paths.append(path)
            n += 1
        if progress is not None:
            progress(1)
    if bad and not skip_bad:
        shown = "; ".join(bad_reasons[:3]) + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else "")
        raise DataError(f"{len(bad)} unreadable image(s): {shown}", "fix or remove them, or pass --skip-bad-images")
    if n == 0:
        raise DataError("no readable images", "check the data folder")
    return LoadedImages(out[:n].copy() if n < len(items) else out, np.array(labels, np.int64), tuple(paths), tuple(bad))


def stratified_split(
    items: Sequence[tuple[Path, int]], val_fraction: float, seed: int
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Seeded split keeping each class's share: every class keeps >=1 training and (if it has >=2) >=1 val item."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-split must be between 0 and 1 (got {val_fraction})", "use e.g. --val-split 0.2")
    by_class: dict[int, list[tuple[Path, int]]] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda it: str(it[0]))
        rng.shuffle(group)
        n_val = int(round(len(group) * val_fraction))
        n_val = min(max(n_val, 1 if len(group) >= 2 else 0), len(group) - 1)
        val.extend(group[:n_val])
        train.extend(group[n_val:])
    if not val:
        raise DataError("too few images for a validation split", "add images or pass --val-data DIR")
    return train, val
