"""The image-folder loader: bad inputs give one DataError naming the problem; odd-but-valid inputs load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl.data import load_image, load_images, scan_folder, stratified_split
from edgetl.errors import DataError


def _jpeg(path: Path, colour=(200, 30, 30), size=(40, 30), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, "JPEG")
    return path


def _folder(root: Path, classes=("a", "b"), n=3) -> Path:
    for c in classes:
        for i in range(n):
            _jpeg(root / c / f"{i}.jpg", colour=(40 * i, 100, 200))
    return root


def test_scan_counts_and_sorted_classes(tmp_path):
    f = scan_folder(_folder(tmp_path, ("zebra", "ant"), 2))
    assert f.classes == ("ant", "zebra")
    assert f.counts == {"ant": 2, "zebra": 2}
    assert f.labels.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize(
    "setup, needle",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: _jpeg(p / "file.jpg"), "is a file, not a folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no class sub-folders"),
        (lambda p: _folder(p / "one", ("only",)), "only one class"),
        (lambda p: (_folder(p / "ec"), (p / "ec" / "c").mkdir())[0], "contain no images"),
    ],
    ids=["missing", "file", "empty", "single-class", "empty-class"],
)
def test_scan_bad_inputs(tmp_path, setup, needle):
    with pytest.raises(DataError) as err:
        scan_folder(setup(tmp_path))
    assert needle in err.value.one_line()
    assert "\n" not in err.value.one_line()


def test_loose_images_hint(tmp_path):
    _jpeg(tmp_path / "x.jpg")
    with pytest.raises(DataError, match="loose images"):
        scan_folder(tmp_path)


def _corrupt(tmp_path: Path) -> list[Path]:
    good = _jpeg(tmp_path / "good.jpg")
    data = good.read_bytes()
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(data[: len(data) // 3])
    png = tmp_path / "trunc.png"
    Image.new("RGB", (50, 50), (1, 2, 3)).save(png)
    png.write_bytes(png.read_bytes()[:60])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    return [truncated, png, text]


def test_unreadable_images_are_named(tmp_path):
    for bad in _corrupt(tmp_path):
        with pytest.raises(DataError) as err:
            load_image(bad, (32, 32))
        assert bad.name in err.value.one_line()


def test_load_images_fails_listing_bad_or_skips_them(tmp_path):
    bad = _corrupt(tmp_path)
    good = [_jpeg(tmp_path / f"g{i}.jpg") for i in range(2)]
    items = [(p, 0) for p in good + bad]
    with pytest.raises(DataError, match="3 unreadable image"):
        load_images(items, (32, 32))
    loaded = load_images(items, (32, 32), skip_bad=True)
    assert loaded.images.shape == (2, 32, 32, 3)
    assert set(loaded.skipped) == set(bad)


def test_decompression_bomb_is_refused(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # 81 MP, a few KB on disk
    assert bomb.stat().st_size < 200_000
    with pytest.raises(DataError, match="bomb.png"):
        load_image(bomb, (32, 32))


def test_odd_but_valid_images_load_as_rgb(tmp_path):
    paths = []
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(cmyk, "JPEG")  # pure red in CMYK
    paths.append(cmyk)
    png16 = tmp_path / "deep.png"
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(png16)
    paths.append(png16)
    gif = tmp_path / "pal.gif"
    frames = [Image.new("P", (20, 20), i) for i in range(3)]
    frames[0].putpalette([0, 255, 0] + [255, 0, 0] * 255)
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    paths.append(gif)
    rgba = tmp_path / "alpha.PNG"
    Image.new("RGBA", (20, 20), (0, 0, 255, 255)).save(rgba)
    paths.append(rgba)
    spaces = tmp_path / "ein Bild mit Ümlaut é.JPEG"
    _jpeg(spaces)
    paths.append(spaces)
    webp = tmp_path / "w.webp"
    Image.new("RGB", (20, 20), (9, 9, 9)).save(webp)
    paths.append(webp)
    arrays = [load_image(p, (16, 16)) for p in paths]
    for a in arrays:
        assert a.shape == (16, 16, 3) and a.dtype == np.uint8
    assert arrays[0][8, 8, 0] > 200 and arrays[0][8, 8, 1] < 60  # CMYK red stays red
    assert arrays[1].min() == 255  # 16-bit white stays white, not clipped to garbage
    assert tuple(arrays[2][8, 8]) == (0, 255, 0)  # palette applied, first frame
    assert tuple(arrays[3][8, 8]) == (0, 0, 255)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    arr = load_image(path, (40, 40))
    # after a 90-degree rotation the white half is on top, not on the left
    assert arr[:20].mean() > 200 and arr[20:].mean() < 60


def test_upper_case_extensions_are_found(tmp_path):
    _jpeg(tmp_path / "a" / "X.JPG")
    _jpeg(tmp_path / "b" / "Y.Jpeg")
    assert len(scan_folder(tmp_path).items) == 2


def test_stratified_split_is_seeded_and_keeps_class_shares(tmp_path):
    items = [(Path(f"c{c}/{i}.jpg"), c) for c in range(3) for i in range(10 * (c + 1))]
    train, val = stratified_split(items, 0.2, seed=7)
    again = stratified_split(items, 0.2, seed=7)
    assert (train, val) == again
    assert stratified_split(items, 0.2, seed=8)[1] != val
    per_class = np.bincount([label for _, label in val])
    assert per_class.tolist() == [2, 4, 6]
    assert not set(map(str, train)) & set(map(str, val))
    with pytest.raises(DataError):
        stratified_split(items, 1.5, 0)


def test_hidden_folders_and_macosx_are_ignored(tmp_path):
    """`.thumbs/` inside a class, `__MACOSX/` at the root and inside a class, hidden files: never classes, never
    scanned (their broken files would fail loading); symlinked class folders outside the data folder are followed."""
    root = _folder(tmp_path / "data", ("cat", "dog"), 2)
    (root / "cat" / ".thumbs").mkdir()
    (root / "cat" / ".thumbs" / "t.jpg").write_bytes(b"not a jpeg")
    (root / "__MACOSX" / "cat").mkdir(parents=True)
    (root / "__MACOSX" / "cat" / "._0.jpg").write_bytes(b"resource fork")
    (root / "__MACOSX" / "cat" / "x.jpg").write_bytes(b"resource fork")
    (root / "dog" / "__MACOSX").mkdir()
    (root / "dog" / "__MACOSX" / "y.jpg").write_bytes(b"resource fork")
    (root / "dog" / ".hidden.jpg").write_bytes(b"hidden")
    elsewhere = _folder(tmp_path / "elsewhere", ("bird",), 3)
    (root / "bird").symlink_to(elsewhere / "bird")
    f = scan_folder(root)
    assert f.classes == ("bird", "cat", "dog")
    assert f.counts == {"bird": 3, "cat": 2, "dog": 2}
    loaded = load_images(f.items, (16, 16))
    assert len(loaded.images) == 7 and not loaded.skipped


@pytest.mark.parametrize(
    "layout, fix",
    [
        (("train", "test"), "pass --data {root}/train (a seeded --val-split of it validates), and keep test/"),
        (("Train", "Valid"), "pass --data {root}/Train --val-data {root}/Valid"),
    ],
)
def test_split_layout_is_refused_with_the_flags(tmp_path, layout, fix):
    root = tmp_path / "data"
    for split in layout:
        _folder(root / split, ("cat", "dog"), 2)
    with pytest.raises(DataError) as info:
        scan_folder(root)
    assert "train/val/test split" in info.value.one_line()
    assert fix.format(root=root) in info.value.one_line()


def test_classes_named_like_splits_among_others_are_classes(tmp_path):
    f = scan_folder(_folder(tmp_path, ("train", "bus"), 2))  # vehicles: a "train" class is not a split layout
    assert f.classes == ("bus", "train")
