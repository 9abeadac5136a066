"""Every bad input gets a clear answer: exit 2, ONE line on stderr naming the problem, nothing left behind.

One parametrized matrix over the four commands (finetune, export, verify, run). Each case prepares its inputs in its
own folder, snapshots that folder, runs the real CLI in-process and checks:

* exit code 2 and no traceback;
* stderr is exactly one (non-blank) line that contains the case's substring;
* the folder is byte-for-byte as before: no output target created, nothing changed, no partial files (hidden or not).

Then: odd-but-valid images are accepted (CMYK, 16-bit, palette, EXIF rotation, upper-case extensions, spaces and
non-ASCII names), and the CLI's own error plumbing (``--debug`` tracebacks, internal errors) is checked.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import rundir_factory  # noqa: E402

SMALL_WEIGHTS = "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
FAST = ["--weights", "none", "--image-size", "32", "--epochs", "1", "--no-qat", "--batch-size", "16"]


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    """``--debug`` sets EDGETL_DEBUG in-process; never let it leak between cases."""
    monkeypatch.delenv("EDGETL_DEBUG", raising=False)


# --- shared inputs (built once per module) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A tiny, real run directory (no QAT) with a real fp32 ONNX + TFLite bundle in RUN/export."""
    from edgetl.export import export_run

    run = rundir_factory.make_run_dir(tmp_path_factory.mktemp("badinputs"), qat=False, per_class=8, epochs=1)
    export_run(run, "all", "fp32", run / "export", samples=6, calibration=8)
    return run


# --- file makers ------------------------------------------------------------------------------------------------


def _png_bytes(size=(48, 48), seed=0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes(seed=0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bomb_png(width: int = 9000, height: int = 9000) -> bytes:
    """A valid 1-bit grayscale PNG of width x height pixels, a few KB on disk (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root (hidden ones too) -> sha256 (files) or "dir"/"link"."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "link" if p.is_symlink() else ("dir" if p.is_dir() else _sha(p))
    return out


# --- the cases --------------------------------------------------------------------------------------------------


@dataclass
class Env:
    tmp: Path
    shapes: Path
    base_run: Callable[[], Path]
    weights_dir: Callable[[], Path]

    def data(self) -> Path:
        return copy_data(self.shapes, self.tmp / "data")

    def run(self, with_bundle: bool = False) -> Path:
        dst = self.tmp / "run"
        shutil.copytree(self.base_run(), dst, ignore=None if with_bundle else shutil.ignore_patterns("export"))
        return dst

    def bundle(self) -> Path:
        return shutil.copytree(self.base_run() / "export", self.tmp / "bundle")

    def recipe(self, text: str) -> Path:
        path = self.tmp / "recipe.yaml"
        path.write_text(text)
        return path


def _manifest_edit(run: Path, **changes) -> None:
    m = json.loads((run / "manifest.json").read_text())
    m.update(changes)
    (run / "manifest.json").write_text(json.dumps(m))


def _rehash_run(run: Path) -> None:
    """Make manifest.json's checksums match the (deliberately broken) model files."""
    m = json.loads((run / "manifest.json").read_text())
    m["files"] = {name: _sha(run / name) for name in m.get("files", {}) if (run / name).is_file()}
    (run / "manifest.json").write_text(json.dumps(m))


def _rehash_bundle(bundle: Path) -> None:
    import bundle_factory

    bundle_factory.rehash(bundle)


def _edit_bundle(bundle: Path, fn) -> None:
    path = bundle / "bundle.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def _artifact(bundle: Path, fmt: str) -> Path:
    meta = json.loads((bundle / "bundle.json").read_text())
    return bundle / next(a["file"] for a in meta["artifacts"] if a["format"] == fmt)


def _lambda_keras(path: Path, size: int, n_classes: int, marker: Path | None = None, h5: bool = False) -> None:
    """A classifier that smuggles Python code in a Lambda layer; running it touches ``marker``.

    ``h5=True`` writes the legacy HDF5 format under whatever name ``path`` has (e.g. ``float.keras``).
    """
    from edgetl._tfenv import keras

    k = keras()
    marker = marker or path.with_name(".lambda-ran")
    fn = eval(f"lambda t: (__import__('pathlib').Path({str(marker)!r}).touch(), t * 0.5)[1]")  # noqa: S307
    inp = k.Input((size, size, 3), name="image")
    x = k.layers.Lambda(fn, name="sneaky")(inp)  # arbitrary Python in the model file
    x = k.layers.GlobalAveragePooling2D()(x)
    model = k.Model(inp, k.layers.Dense(n_classes, activation="softmax")(x))
    if h5:
        tmp = path.with_name(".tmp-model.h5")
        model.save(tmp, save_format="h5")
        tmp.replace(path)
    else:
        model.save(path)
    marker.unlink(missing_ok=True)  # building the model ran the lambda once; from here on it must never run


# finetune ----------------------------------------------------------------------------------------------------------


def ft_missing(e: Env):
    return ["finetune", "--data", e.tmp / "nope", "--out", e.tmp / "out", *FAST], "does not exist"


def ft_empty_folder(e: Env):
    (e.tmp / "data").mkdir()
    return ["finetune", "--data", e.tmp / "data", "--out", e.tmp / "out", *FAST], "no class sub-folders"


def ft_single_class(e: Env):
    data = e.tmp / "data"
    shutil.copytree(e.shapes / "circle", data / "circle")
    return ["finetune", "--data", data, "--out", e.tmp / "out", *FAST], "only one class"


def ft_empty_class(e: Env):
    data = e.data()
    (data / "hexagon").mkdir()
    return ["finetune", "--data", data, "--out", e.tmp / "out", *FAST], "hexagon"


def ft_file_not_folder(e: Env):
    (e.tmp / "data.jpg").write_bytes(_jpeg_bytes())
    return ["finetune", "--data", e.tmp / "data.jpg", "--out", e.tmp / "out", *FAST], "is a file, not a folder"


def ft_val_data_extra_class(e: Env):
    data = e.data()
    val = copy_data(e.shapes, e.tmp / "val")
    shutil.copytree(val / "circle", val / "star")
    return ["finetune", "--data", data, "--val-data", val, "--out", e.tmp / "out", *FAST], "star"


def ft_corrupt_jpeg(e: Env):
    data = e.data()
    good = _jpeg_bytes()
    (data / "square" / "broken.jpg").write_bytes(good[:200] + bytes(range(256)) * 8)
    return ["finetune", "--data", data, "--out", e.tmp / "out", *FAST], "broken.jpg"


def ft_truncated_png(e: Env):
    data = e.data()
    good = _png_bytes()
    (data / "circle" / "cut.png").write_bytes(good[: len(good) // 2])
    return ["finetune", "--data", data, "--out", e.tmp / "out", *FAST], "cut.png"


def ft_not_an_image(e: Env):
    data = e.data()
    (data / "triangle" / "notes.jpg").write_text("these are my notes, not a photo\n")
    return ["finetune", "--data", data, "--out", e.tmp / "out", *FAST], "notes.jpg"


def ft_decompression_bomb(e: Env):
    data = e.data()
    (data / "circle" / "huge.png").write_bytes(bomb_png())
    assert (data / "circle" / "huge.png").stat().st_size < 200_000
    return ["finetune", "--data", data, "--out", e.tmp / "out", *FAST], "huge.png"


def ft_unknown_backbone(e: Env):
    return [
        "finetune",
        "--data",
        e.shapes,
        "--out",
        e.tmp / "out",
        *FAST,
        "--backbone",
        "resnet18",
    ], "unknown backbone 'resnet18'"


def ft_image_size_not_multiple(e: Env):
    args = ["finetune", "--data", e.shapes, "--out", e.tmp / "out", "--weights", "none", "--image-size", "36"]
    return args, "multiple of 8"


def ft_image_size_too_small(e: Env):
    args = ["finetune", "--data", e.shapes, "--out", e.tmp / "out", "--weights", "none", "--image-size", "16"]
    return args, "out of range"


def ft_val_split_out_of_range(e: Env):
    return ["finetune", "--data", e.shapes, "--out", e.tmp / "out", *FAST, "--val-split", "1.5"], "val_split"


def ft_weights_missing_file(e: Env):
    args = ["finetune", "--data", e.shapes, "--out", e.tmp / "out", "--weights", e.tmp / "w.h5", "--image-size", "32"]
    return args, "does not exist"


def ft_weights_wrong_architecture(e: Env):
    args = [
        "finetune",
        "--data",
        e.shapes,
        "--out",
        e.tmp / "out",
        "--backbone",
        "mobilenet_v3_large",
        "--weights",
        e.weights_dir() / SMALL_WEIGHTS,
        "--epochs",
        "1",
        "--no-qat",
    ]
    return args, "does not fit mobilenet_v3_large"


def ft_out_is_not_a_run(e: Env):
    mine = e.tmp / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("do not delete")
    return ["finetune", "--data", e.shapes, "--out", mine, *FAST], "not an edgetl run directory"


# finetune: output folders (data loss) ---------------------------------------------------------------------------


def ft_out_foreign_manifest(e: Env):
    """A web app's manifest.json is not an edgetl run: the folder and thesis.txt stay byte-identical."""
    w = e.tmp / "w"
    w.mkdir()
    (w / "manifest.json").write_text('{"name": "pwa"}')
    (w / "thesis.txt").write_text("keep")
    return ["finetune", "--data", e.shapes, "--out", w, *FAST], "not an edgetl run directory"


def ft_out_foreign_manifest_force(e: Env):
    args, expect = ft_out_foreign_manifest(e)
    return [*args, "--force"], expect


def ft_out_earlier_run_needs_force(e: Env):
    run = e.run(with_bundle=True)
    return ["finetune", "--data", e.shapes, "--out", run, *FAST], "holds an earlier edgetl run directory; pass --force"


def ft_out_run_with_user_file_force(e: Env):
    """A real edgetl run (right schema), but the user added a file to its bundle: even --force refuses."""
    run = e.run(with_bundle=True)
    (run / "export" / "notes.txt").write_text("mine")
    return ["finetune", "--data", e.shapes, "--out", run, "--force", *FAST], "did not write (export/notes.txt)"


def ft_out_root(e: Env):
    return ["finetune", "--data", e.shapes, "--out", "/", *FAST], "--out / is the file system root"


def ft_seed_too_big(e: Env):
    return ["finetune", "--data", e.shapes, "--out", e.tmp / "out", *FAST, "--seed", "4294967296"], "seed"


# finetune: data traps ---------------------------------------------------------------------------------------------


def _split_layout(e: Env, splits) -> Path:
    data = e.tmp / "data"
    for split in splits:
        copy_data(e.shapes, data / split)
    return data


def ft_split_layout_train_test(e: Env):
    data = _split_layout(e, ("train", "test"))
    return [
        "finetune",
        "--data",
        data,
        "--out",
        e.tmp / "out",
        *FAST,
    ], f"split, not one sub-folder per class; pass --data {data / 'train'}"


def ft_split_layout_train_val_test(e: Env):
    data = _split_layout(e, ("train", "val", "test"))
    return ["finetune", "--data", data, "--out", e.tmp / "out", *FAST], f"--val-data {data / 'val'}"


def ft_symlink_loop(e: Env):
    data = e.data()
    (data / "loop").symlink_to(".")
    return ["finetune", "--data", data, "--out", e.tmp / "out", *FAST], "a loop"


def ft_symlink_nested_loop(e: Env):
    data = e.data()
    (data / "circle" / "up").symlink_to("..")
    return ["finetune", "--data", data, "--out", e.tmp / "out", *FAST], "a loop"


def ft_symlink_into_data(e: Env):
    data = e.data()
    (data / "dup").symlink_to("circle")
    return ["finetune", "--data", data, "--out", e.tmp / "out", *FAST], "inside the data folder"


def ft_non_utf8_class(e: Env):
    import os

    data = e.data()
    bad = os.fsencode(data) + b"/caf\xe9"
    os.mkdir(bad)
    for img in (data / "circle").iterdir():
        shutil.copy(img, os.fsdecode(bad + b"/" + os.fsencode(img.name)))
    return ["finetune", "--data", data, "--out", e.tmp / "out", *FAST], "caf\\xe9 is not valid UTF-8"


def ft_usage_not_an_integer(e: Env):
    return ["finetune", "--data", e.shapes, "--out", e.tmp / "out", "--image-size", "abc"], "'--image-size'"


def ft_usage_unknown_flag(e: Env):
    return ["finetune", "--data", e.shapes, "--out", e.tmp / "out", "--bogus"], "No such option: --bogus"


# export ------------------------------------------------------------------------------------------------------------


def ex_missing(e: Env):
    return ["export", e.tmp / "nope", "--out", e.tmp / "b"], "does not exist"


def ex_empty_run(e: Env):
    (e.tmp / "run").mkdir()
    return ["export", e.tmp / "run", "--out", e.tmp / "b"], "missing manifest.json"


def ex_unknown_format(e: Env):
    return ["export", e.run(), "--format", "coreml", "--out", e.tmp / "b"], "unknown export format coreml"


def ex_unknown_quantization(e: Env):
    return ["export", e.run(), "-q", "int4", "--out", e.tmp / "b"], "unknown quantization int4"


def ex_truncated_keras_checksum(e: Env):
    run = e.run()
    data = (run / "float.keras").read_bytes()
    (run / "float.keras").write_bytes(data[: len(data) // 3])
    return ["export", run, "--out", e.tmp / "b"], "does not match the checksum"


def ex_garbage_keras(e: Env):
    run = e.run()
    (run / "float.keras").write_bytes(bytes(range(256)) * 40)
    _rehash_run(run)
    return ["export", run, "-f", "tflite", "-q", "fp32", "--out", e.tmp / "b"], "cannot load the float model"


def ex_truncated_keras(e: Env):
    run = e.run()
    data = (run / "float.keras").read_bytes()
    (run / "float.keras").write_bytes(data[: len(data) // 2])
    _rehash_run(run)
    return ["export", run, "-f", "tflite", "-q", "fp32", "--out", e.tmp / "b"], "cannot load the float model"


def ex_lambda_keras(e: Env):
    run = e.run()
    _lambda_keras(run / "float.keras", 32, 3)
    _rehash_run(run)
    return ["export", run, "-f", "tflite", "-q", "fp32", "--out", e.tmp / "b"], "Python code"


def ex_h5_lambda_disguised(e: Env):
    run = e.run()
    _lambda_keras(run / "float.keras", 32, 3, marker=e.tmp.parent / "ran", h5=True)
    _rehash_run(run)
    return ["export", run, "-f", "tflite", "-q", "fp32", "--out", e.tmp / "b"], "not a .keras (zip) archive"


def ex_labels_txt_edited(e: Env):
    run = e.run()
    (run / "labels.txt").write_text("blue\ngreen\nred\npurple\n")
    return ["export", run, "--out", e.tmp / "b"], "labels.txt does not match"


def ex_label_count_vs_model(e: Env):
    run = e.run()
    labels = ["blue", "green", "red", "purple"]
    (run / "labels.txt").write_text("\n".join(labels) + "\n")
    _manifest_edit(run, labels=labels)
    return ["export", run, "-f", "tflite", "-q", "fp32", "--out", e.tmp / "b"], "outputs 3 classes but the run lists 4"


def ex_newer_version(e: Env):
    run = e.run()
    _manifest_edit(run, schema="edgetl.run/2", edgetl_version="9.0.0")
    return ["export", run, "--out", e.tmp / "b"], "made by edgetl 9.0.0"


def ex_foreign_schema_version(e: Env):
    run = e.run()
    _manifest_edit(run, schema="edgetl.runs.v9", edgetl_version="9.0.0")
    return ["export", run, "--out", e.tmp / "b"], "written by edgetl 9.0.0"


def ex_out_is_a_file(e: Env):
    run = e.run()
    (e.tmp / "b").write_text("x")
    return ["export", run, "--out", e.tmp / "b"], "is a file"


def ex_out_foreign_bundle_json(e: Env):
    run = e.run()
    b = e.tmp / "b"
    b.mkdir()
    (b / "bundle.json").write_text('{"name": "webpack"}')
    (b / "keep.txt").write_text("keep")
    return ["export", run, "--out", b, "--force"], "not an edgetl bundle"


def ex_out_earlier_bundle_needs_force(e: Env):
    run = e.run(with_bundle=True)
    return ["export", run, "-f", "tflite", "-q", "fp32"], "holds an earlier edgetl bundle; pass --force"


def ex_out_bundle_with_user_file_force(e: Env):
    run = e.run(with_bundle=True)
    (run / "export" / "verify").mkdir()
    (run / "export" / "verify" / "mine.txt").write_text("mine")
    return ["export", run, "-f", "tflite", "-q", "fp32", "--force"], "did not write (verify/mine.txt)"


def _edit_keras_config(path: Path, edit) -> None:
    import zipfile

    with zipfile.ZipFile(path) as src:
        members = {name: src.read(name) for name in src.namelist()}
    config = json.loads(members["config.json"])
    edit(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as dst:
        for name, data in members.items():
            dst.writestr(name, data)


def ex_keras_names_module(e: Env):
    """config.json naming module "this": refused before Keras imports it (the Zen of Python is never printed)."""
    run = e.run()
    _edit_keras_config(run / "float.keras", lambda c: c.update(module="this"))
    _rehash_run(run)
    was_imported = "this" in sys.modules

    def not_imported():
        assert was_imported or "this" not in sys.modules, "a module named by the model file was imported"

    return (["export", run, "-f", "tflite", "-q", "fp32", "--out", e.tmp / "b"], "names module 'this'", not_imported)


def ex_keras_names_class(e: Env):
    run = e.run()

    def edit(config):
        config["config"]["layers"][1]["class_name"] = "Evil"

    _edit_keras_config(run / "float.keras", edit)
    _rehash_run(run)
    return ["export", run, "-f", "tflite", "-q", "fp32", "--out", e.tmp / "b"], "names class 'Evil'"


def ex_qat_h5_names_module(e: Env):
    """The QAT model (HDF5, whose loader ignores safe mode) is checked against the same allow-list."""
    import h5py

    run = e.run()
    config = {
        "class_name": "Functional",
        "config": {
            "name": "m",
            "layers": [
                {"class_name": "InputLayer", "config": {"name": "image", "batch_input_shape": [None, 32, 32, 3]}},
                {"module": "os", "class_name": "system", "config": {"name": "boom"}},
            ],
        },
    }
    with h5py.File(run / "qat.h5", "w") as fh:
        fh.attrs["model_config"] = json.dumps(config)
    _manifest_edit(run, files={**json.loads((run / "manifest.json").read_text())["files"], "qat.h5": ""})
    _rehash_run(run)
    return ["export", run, "-f", "tflite", "-q", "qat_int8", "--out", e.tmp / "b"], "names module 'os'"


# verify ------------------------------------------------------------------------------------------------------------


def ve_missing(e: Env):
    return ["verify", e.tmp / "nope", "--runs", "2", "--warmup", "0"], "does not exist"


def ve_not_a_bundle(e: Env):
    (e.tmp / "folder").mkdir()
    (e.tmp / "folder" / "x.txt").write_text("x")
    return ["verify", e.tmp / "folder", "--runs", "2", "--warmup", "0"], "neither a bundle"


def ve_changed_file(e: Env):
    b = e.bundle()
    with open(b / "labels.txt", "a") as fh:
        fh.write("purple\n")
    return ["verify", b, "--runs", "2", "--warmup", "0"], "labels.txt does not match its checksum"


def ve_changed_artifact(e: Env):
    b = e.bundle()
    art = _artifact(b, "onnx")
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0xFF
    art.write_bytes(bytes(data))
    return ["verify", b, "--runs", "2", "--warmup", "0"], f"{art.name} does not match its checksum"


def ve_path_outside(e: Env):
    b = e.bundle()
    (e.tmp / "secret.txt").write_text("outside the bundle")

    def edit(meta):
        meta["files"]["../secret.txt"] = _sha(e.tmp / "secret.txt")

    _edit_bundle(b, edit)
    return ["verify", b, "--runs", "2", "--warmup", "0"], "'../secret.txt' is unsafe"


def ve_artifact_absolute_path(e: Env):
    b = e.bundle()
    _edit_bundle(b, lambda meta: meta["artifacts"][0].update(file="/etc/passwd"))
    return ["verify", b, "--runs", "2", "--warmup", "0"], "'/etc/passwd' is unsafe"


def ve_truncated_tflite(e: Env):
    b = e.bundle()
    art = _artifact(b, "tflite")
    data = art.read_bytes()
    art.write_bytes(data[: len(data) // 2])
    _rehash_bundle(b)
    return ["verify", b, "--runs", "2", "--warmup", "0"], art.name


def ve_garbage_onnx(e: Env):
    b = e.bundle()
    art = _artifact(b, "onnx")
    art.write_bytes(b"this is not a protobuf" * 100)
    _rehash_bundle(b)
    return ["verify", b, "--runs", "2", "--warmup", "0"], art.name


def ve_bundle_json_garbage(e: Env):
    b = e.bundle()
    (b / "bundle.json").write_text("{not json")
    return ["verify", b, "--runs", "2", "--warmup", "0"], "not valid JSON"


def ve_newer_bundle_schema(e: Env):
    b = e.bundle()
    _edit_bundle(b, lambda meta: meta.update(schema="edgetl.bundle/2", edgetl_version="9.0.0"))
    return ["verify", b, "--runs", "2", "--warmup", "0"], "edgetl.bundle/2"


def ve_run_newer_version(e: Env):
    run = e.run(with_bundle=True)
    _manifest_edit(run, schema="edgetl.run/2", edgetl_version="9.0.0")
    return ["verify", run, "--runs", "2", "--warmup", "0"], "9.0.0"


def ve_contract_channels_text(e: Env):
    b = e.bundle()
    _edit_bundle(b, lambda meta: meta["input"].update(channels="three"))
    return ["verify", b, "--runs", "2", "--warmup", "0"], "channels"


def ve_contract_height_inf(e: Env):
    b = e.bundle()
    (b / "bundle.json").write_text((b / "bundle.json").read_text().replace('"height": 32', '"height": Infinity', 1))
    return ["verify", b, "--runs", "2", "--warmup", "0"], "height"


def ve_file_name_too_long(e: Env):
    b = e.bundle()
    _edit_bundle(b, lambda meta: meta["files"].update({"x" * 300: "0" * 64}))
    return ["verify", b, "--runs", "2", "--warmup", "0"], "xxxxxxxx"


def ve_unknown_only(e: Env):
    b = e.bundle()
    return ["verify", b, "--only", "tflite_int3", "--runs", "2", "--warmup", "0"], "tflite_int3"


def ve_report_dir_symlink(e: Env):
    """BUNDLE/verify -> elsewhere: refused, nothing written (or overwritten) in the other folder."""
    b = e.bundle()
    elsewhere = e.tmp / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "report.json").write_text("not yours")
    (b / "verify").symlink_to(elsewhere)
    return ["verify", b, "--runs", "2", "--warmup", "0"], "is a symbolic link"


def ve_planted_partial_symlink(e: Env):
    """A planted BUNDLE/verify/.latency.partial<PID>.png -> victim: refused, the victim keeps its bytes."""
    b = e.bundle()
    victim = e.tmp / "victim.txt"
    victim.write_text("precious")
    (b / "verify").mkdir()
    (b / "verify" / ".latency.partial4242.png").symlink_to(victim)
    return ["verify", b, "--runs", "2", "--warmup", "0"], "did not write (.latency.partial4242.png)"


def ve_report_folder_foreign(e: Env):
    b = e.bundle()
    mine = e.tmp / "docs"
    mine.mkdir()
    (mine / "thesis.txt").write_text("keep")
    return ["verify", b, "--runs", "2", "--warmup", "0", "--report", mine], "did not write (thesis.txt)"


def ve_bundle_json_deep(e: Env):
    b = e.bundle()
    (b / "bundle.json").write_text("[" * 200_000 + "]" * 200_000)
    return ["verify", b, "--runs", "2", "--warmup", "0"], "nested too deeply"


def ve_npz_as_npy(e: Env):
    b = e.bundle()
    images = np.load(b / "sample" / "images.npy")
    with open(b / "sample" / "images.npy", "wb") as fh:
        np.savez(fh, images=images)
    _rehash_bundle(b)
    return ["verify", b, "--runs", "2", "--warmup", "0"], "sample/images.npy is an .npz archive"


def ve_corrupt_npy_header(e: Env):
    """A header claiming ~3 TB: the file is named, not "out of memory; use a smaller --image-size"."""
    b = e.bundle()
    path = b / "sample" / "images.npy"
    images = np.load(path)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 32, 32, 3)})
    path.write_bytes(buf.getvalue() + images.tobytes())
    _rehash_bundle(b)
    return ["verify", b, "--runs", "2", "--warmup", "0"], "sample/images.npy is corrupt"


def ve_onnx_external_data(e: Env):
    import onnx

    b = e.bundle()
    art = _artifact(b, "onnx")
    model = onnx.load(str(art))
    onnx.save_model(
        model,
        str(art),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=128,
    )  # shape tensors stay inline: ORT loads it
    _rehash_bundle(b)
    return ["verify", b, "--runs", "2", "--warmup", "0"], "keeps tensors in external data files"


# run ---------------------------------------------------------------------------------------------------------------


def _recipe_text(e: Env, finetune_extra: str = "", export: str = "") -> str:
    return (
        f"stages: [finetune, export]\nfinetune:\n  data: {e.shapes}\n  out: {e.tmp / 'out'}\n  weights: none\n"
        f"  image_size: 32\n  epochs: 1\n  qat: false\n{finetune_extra}{export}"
    )


def run_missing_recipe(e: Env):
    return ["run", e.tmp / "nope.yaml"], "does not exist"


def run_invalid_yaml(e: Env):
    return ["run", e.recipe("finetune:\n  data: [unclosed\n")], "not valid YAML"


def run_misspelt_key(e: Env):
    return ["run", e.recipe(_recipe_text(e, "  epochz: 3\n"))], "did you mean 'epochs'"


def run_wrong_type(e: Env):
    return ["run", e.recipe(_recipe_text(e, "  batch_size: lots\n"))], "finetune.batch_size"


def run_unknown_backbone(e: Env):
    return ["run", e.recipe(_recipe_text(e, "  backbone: vgg19\n"))], "unknown backbone 'vgg19'"


def run_unknown_export_format(e: Env):
    return ["run", e.recipe(_recipe_text(e, export="export:\n  format: coreml\n"))], "export.format"


def run_bad_set(e: Env):
    return ["run", e.recipe(_recipe_text(e)), "--set", "finetune.epochs"], "KEY=VALUE"


def run_not_a_mapping(e: Env):
    return ["run", e.recipe("- just\n- a list\n")], "mapping"


def run_earlier_run_needs_force(e: Env):
    run = e.run(with_bundle=True)
    text = _recipe_text(e).replace(f"out: {e.tmp / 'out'}", f"out: {run}")
    return ["run", e.recipe(text)], "holds an earlier edgetl run directory; pass --force"


def run_usage_unknown_flag(e: Env):
    return ["run", e.recipe(_recipe_text(e)), "--frce"], "No such option: --frce"


CASES: list[tuple[Callable[[Env], tuple], str | None]] = [
    (ft_missing, None),
    (ft_empty_folder, None),
    (ft_single_class, None),
    (ft_empty_class, None),
    (ft_file_not_folder, None),
    (ft_val_data_extra_class, None),
    (ft_corrupt_jpeg, None),
    (ft_truncated_png, None),
    (ft_not_an_image, None),
    (ft_decompression_bomb, None),
    (ft_unknown_backbone, None),
    (ft_image_size_not_multiple, None),
    (ft_image_size_too_small, None),
    (ft_val_split_out_of_range, None),
    (ft_weights_missing_file, None),
    (ft_weights_wrong_architecture, None),
    (ft_out_is_not_a_run, None),
    (ex_missing, None),
    (ex_empty_run, None),
    (ex_unknown_format, None),
    (ex_unknown_quantization, None),
    (ex_truncated_keras_checksum, None),
    (ex_garbage_keras, None),
    (ex_truncated_keras, None),
    (ex_lambda_keras, None),
    (ex_h5_lambda_disguised, None),
    (ex_labels_txt_edited, None),
    (ex_label_count_vs_model, None),
    (ex_newer_version, None),
    (ex_foreign_schema_version, None),
    (ex_out_is_a_file, None),
    (ve_missing, None),
    (ve_not_a_bundle, None),
    (ve_changed_file, None),
    (ve_changed_artifact, None),
    (ve_path_outside, None),
    (ve_artifact_absolute_path, None),
    (ve_truncated_tflite, None),
    (ve_garbage_onnx, None),
    (ve_bundle_json_garbage, None),
    (ve_newer_bundle_schema, None),
    (ve_run_newer_version, None),
    (ve_unknown_only, None),
    (ve_contract_channels_text, None),
    (ve_contract_height_inf, None),
    (ve_file_name_too_long, None),
    (run_missing_recipe, None),
    (run_invalid_yaml, None),
    (run_misspelt_key, None),
    (run_wrong_type, None),
    (run_unknown_backbone, None),
    (run_unknown_export_format, None),
    (run_bad_set, None),
    (run_not_a_mapping, None),
    # hardening, second round (issue 10)
    (ft_out_foreign_manifest, None),
    (ft_out_foreign_manifest_force, None),
    (ft_out_earlier_run_needs_force, None),
    (ft_out_run_with_user_file_force, None),
    (ft_out_root, None),
    (ft_seed_too_big, None),
    (ft_split_layout_train_test, None),
    (ft_split_layout_train_val_test, None),
    (ft_symlink_loop, None),
    (ft_symlink_nested_loop, None),
    (ft_symlink_into_data, None),
    (ft_non_utf8_class, None),
    (ft_usage_not_an_integer, None),
    (ft_usage_unknown_flag, None),
    (ex_out_foreign_bundle_json, None),
    (ex_out_earlier_bundle_needs_force, None),
    (ex_out_bundle_with_user_file_force, None),
    (ex_keras_names_module, None),
    (ex_keras_names_class, None),
    (ex_qat_h5_names_module, None),
    (ve_report_dir_symlink, None),
    (ve_planted_partial_symlink, None),
    (ve_report_folder_foreign, None),
    (ve_bundle_json_deep, None),
    (ve_npz_as_npy, None),
    (ve_corrupt_npy_header, None),
    (ve_onnx_external_data, None),
    (run_earlier_run_needs_force, None),
    (run_usage_unknown_flag, None),
]


def _params():
    for fn, xfail in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
        yield pytest.param(fn, id=fn.__name__, marks=marks)


def assert_one_line_error(code: int, stderr: str, expect: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert expect in line, f"{expect!r} not in {line!r}"
    assert code == 2, (code, line)
    return line


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input(case, cli, tmp_path, shapes_dir, request, monkeypatch):
    env = Env(
        tmp=tmp_path / "case",
        shapes=shapes_dir,
        base_run=lambda: request.getfixturevalue("base_run"),
        weights_dir=lambda: request.getfixturevalue("weights_dir"),
    )
    env.tmp.mkdir()
    monkeypatch.chdir(env.tmp)  # anything written relative to the cwd shows up in the snapshot too
    args, expect, *post_checks = case(env)
    before = snapshot(env.tmp)
    shapes_before = snapshot(shapes_dir)
    code, _stdout, stderr = cli(*args)
    assert_one_line_error(code, stderr, expect)
    after = snapshot(env.tmp)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    assert not (added or removed or changed), f"left behind: {added}, removed: {removed}, changed: {changed}"
    assert snapshot(shapes_dir) == shapes_before
    for check in post_checks:
        check()


def test_matrix_size():
    assert len(CASES) >= 83


# --- odd but valid ----------------------------------------------------------------------------------------------


def _odd_folder(root: Path) -> Path:
    """Two classes of odd-but-valid images: every mode/format/name quirk the README promises to accept."""
    from PIL import Image

    rng = np.random.default_rng(3)

    def rgb(color, size=(40, 40)):
        arr = np.clip(np.array(color)[None, None] + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255)
        return Image.fromarray(arr.astype(np.uint8))

    for cls, color in (("warm rød", (220, 60, 40)), ("cool", (40, 80, 220))):
        d = root / cls
        d.mkdir(parents=True)
        rgb(color).convert("CMYK").save(d / "cmyk photo.jpg", "JPEG")
        gray16 = (np.asarray(rgb(color).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        img16 = Image.fromarray(gray16)
        assert img16.mode.startswith("I;16")
        img16.save(d / "depth16.png")
        rgb(color).convert("P", palette=Image.ADAPTIVE, colors=16).save(d / "palette.gif")
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees on display
        rgb(color, (40, 20)).save(d / "rotated.jpg", "JPEG", exif=exif.tobytes())
        rgb(color).save(d / "UPPER.JPG", "JPEG")
        rgb(color).save(d / "SHOUT.PNG", "PNG")
        rgb(color).save(d / "ñandú façade.png", "PNG")
        rgba = rgb(color).convert("RGBA")
        rgba.putalpha(128)
        rgba.save(d / "alpha.webp", "WEBP")
    return root


def test_odd_but_valid_images_load(tmp_path):
    from PIL import Image

    from edgetl.data import load_image, load_images, scan_folder

    root = _odd_folder(tmp_path / "odd")
    folder = scan_folder(root)
    assert folder.classes == ("cool", "warm rød")
    assert folder.counts == {"cool": 8, "warm rød": 8}
    loaded = load_images(folder.items, (32, 32))
    assert loaded.images.shape == (16, 32, 32, 3) and loaded.images.dtype == np.uint8
    assert not loaded.skipped
    # colours survive every conversion: the red channel dominates in "warm rød", blue in "cool"
    means = loaded.images.reshape(16, -1, 3).mean(1)
    coloured = [(mean, label) for mean, label in zip(means, loaded.labels) if np.ptp(mean) > 5]
    assert len(coloured) == 14  # all but the two 16-bit grayscale PNGs
    for mean, label in coloured:
        assert np.argmax(mean) == (2 if label == 0 else 0), (mean, label)
    # EXIF orientation is applied: a 40x20 (w x h) photo tagged "rotate 90" is displayed 20 wide, 40 tall
    rotated = root / "cool" / "rotated.jpg"
    with Image.open(rotated) as img:
        assert img.size == (40, 20)
    marked = Image.new("RGB", (40, 20), (0, 0, 0))
    marked.paste((255, 255, 255), (0, 0, 20, 20))  # white left half before rotation
    exif = Image.Exif()
    exif[0x0112] = 6
    marked.save(tmp_path / "mark.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    arr = load_image(tmp_path / "mark.jpg", (40, 20)).astype(int)  # (h=40, w=20) after transposing
    assert arr[:20].mean() > 200 and arr[20:].mean() < 50  # left half went to the top


def test_odd_but_valid_images_finetune(cli, tmp_path, monkeypatch):
    root = _odd_folder(tmp_path / "odd")
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = cli("finetune", "--data", root, "--out", tmp_path / "run", *FAST, "--json")
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["labels"] == ["cool", "warm rød"]
    assert manifest["data"]["train_images"] + manifest["data"]["val_images"] == 16
    assert manifest["data"]["skipped_images"] == 0
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


# --- the CLI's error plumbing -----------------------------------------------------------------------------------


def test_debug_shows_a_traceback_and_plain_does_not(cli, tmp_path):
    code, _, stderr = cli(
        "finetune", "--data", tmp_path / "nope", "--out", tmp_path / "o", *FAST, env={"EDGETL_DEBUG": None}
    )
    assert code == 2 and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    code, _, stderr = cli(
        "--debug", "finetune", "--data", tmp_path / "nope", "--out", tmp_path / "o", *FAST, env={"EDGETL_DEBUG": None}
    )
    assert code == 2 and "Traceback" in stderr and "DataError" in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: data folder")


@pytest.mark.parametrize("command", ["finetune", "export", "verify", "run"])
def test_internal_errors_are_one_line(command, cli, tmp_path, monkeypatch, shapes_dir):
    """A non-edgetl exception (e.g. a TensorFlow error) still gives one line and a non-zero exit; --debug shows it."""

    class FakeTFError(RuntimeError):
        pass

    def boom(*_a, **_k):
        raise FakeTFError("Graph execution error:\n\n  node conv2d/Conv2D: [[{{node x}}]]")

    import edgetl.config
    import edgetl.export
    import edgetl.finetune
    import edgetl.verify

    target = {
        "finetune": (edgetl.finetune, "finetune"),
        "export": (edgetl.export, "export_run"),
        "verify": (edgetl.verify, "verify"),
        "run": (edgetl.config, "load_recipe"),
    }[command]
    monkeypatch.setattr(*target, boom)
    (tmp_path / "x").mkdir()
    args = {
        "finetune": ["finetune", "--data", shapes_dir, "--out", tmp_path / "o", *FAST],
        "export": ["export", tmp_path / "x"],
        "verify": ["verify", tmp_path / "x"],
        "run": ["run", tmp_path / "r.yaml"],
    }[command]
    if command == "verify":  # default_report_dir resolves the target first: give it a bundle-looking folder
        (tmp_path / "x" / "bundle.json").write_text("{}")
    code, _, stderr = cli(*args, env={"EDGETL_DEBUG": None})
    lines = stderr.strip().splitlines()
    assert code == 3 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: internal error: FakeTFError: Graph execution error")
    assert "--debug" in lines[0] and "[[" in lines[0]  # printed as plain text, not eaten as rich markup
    code, _, stderr = cli("--debug", *args, env={"EDGETL_DEBUG": None})
    assert code == 3 and "Traceback" in stderr and "FakeTFError" in stderr


def test_error_text_with_brackets_is_not_markup(cli, tmp_path):
    weird = tmp_path / "[bold]photos[/]"
    code, _, stderr = cli("finetune", "--data", weird, "--out", tmp_path / "o", *FAST)
    assert code == 2 and "[bold]photos[/]" in stderr and len(stderr.strip().splitlines()) == 1


# --- safety: a model file's Python code never runs ----------------------------------------------------------------


@pytest.mark.parametrize("h5", [False, True], ids=["keras_lambda", "h5_renamed_to_keras"])
def test_lambda_in_float_keras_is_refused_by_export(base_run, tmp_path, h5):
    from edgetl.errors import ModelFileError
    from edgetl.export import export_run

    run = shutil.copytree(base_run, tmp_path / "run", ignore=shutil.ignore_patterns("export"))
    marker = tmp_path / "code-ran"
    _lambda_keras(run / "float.keras", 32, 3, marker=marker, h5=h5)
    _rehash_run(run)
    with pytest.raises(ModelFileError) as info:
        export_run(run, "tflite", "fp32", tmp_path / "b", samples=4)
    assert "\n" not in info.value.one_line()
    assert ("Python code" if not h5 else "not a .keras (zip) archive") in info.value.one_line()
    assert not marker.exists(), "the Lambda layer's code was executed"
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "h5",
    [
        False,
        True,
    ],
    ids=["keras_lambda", "h5_renamed_to_keras"],
)
def test_lambda_in_float_keras_is_refused_by_verify(base_run, tmp_path, cli, h5):
    run = shutil.copytree(base_run, tmp_path / "run")
    marker = tmp_path / "code-ran"
    _lambda_keras(run / "float.keras", 32, 3, marker=marker, h5=h5)
    _rehash_run(run)
    code, _, stderr = cli("verify", run, "--runs", "2", "--warmup", "0", "--report", tmp_path / "report")
    ran = marker.exists()
    assert not ran, "the Lambda layer's code was executed"
    assert_one_line_error(code, stderr, "float.keras")


def test_lambda_in_qat_model_is_refused_by_export(base_run, tmp_path):
    """The QAT model is HDF5 (qat.save_qat_model), whose loader ignores safe mode: export must still refuse."""
    from edgetl.errors import ModelFileError
    from edgetl.export import export_run

    run = shutil.copytree(base_run, tmp_path / "run", ignore=shutil.ignore_patterns("export"))
    marker = tmp_path / "code-ran"
    _lambda_keras(run / "qat.h5", 32, 3, marker=marker, h5=True)
    _manifest_edit(run, files={**json.loads((run / "manifest.json").read_text())["files"], "qat.h5": ""})
    _rehash_run(run)
    with pytest.raises(ModelFileError, match="Python code"):
        export_run(run, "tflite", "qat_int8", tmp_path / "b", samples=4, calibration=4)
    assert not marker.exists(), "the Lambda layer's code was executed"
    assert not (tmp_path / "b").exists()


# --- output folders: --force replaces only edgetl's own folders; reports are written as one confined set ---------


def test_force_replaces_an_earlier_run_and_bundle(base_run, shapes_dir, tmp_path, cli, monkeypatch):
    """--force replaces an edgetl run (with its bundle and verify reports) and an edgetl bundle; nothing else moves."""
    monkeypatch.chdir(tmp_path)
    run = shutil.copytree(base_run, tmp_path / "run")
    keep = tmp_path / "keep.txt"
    keep.write_text("beside the run")
    code, _, stderr = cli("verify", run, "--runs", "2", "--warmup", "0")
    assert code in (0, 1, 4) and (run / "export" / "verify" / "report.json").is_file(), stderr
    old_id = json.loads((run / "manifest.json").read_text())["run_id"]
    code, _, stderr = cli("export", run, "-f", "tflite", "-q", "fp32", "--samples", "4", "--force")
    assert code == 0, stderr
    assert not (run / "export" / "verify").exists()  # the old bundle's reports went with it
    assert [a["name"] for a in json.loads((run / "export" / "bundle.json").read_text())["artifacts"]] == ["tflite_fp32"]
    code, _, stderr = cli("finetune", "--data", shapes_dir, "--out", run, *FAST, "--force")
    assert code == 0, stderr
    assert json.loads((run / "manifest.json").read_text())["run_id"] != old_id
    assert not (run / "export").exists()
    assert keep.read_text() == "beside the run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "run"]  # no .run.* leftovers


def _verify_args(bundle: Path) -> list:
    return ["verify", bundle, "--runs", "2", "--warmup", "0"]


def test_verify_cleans_stale_partials_of_killed_runs(base_run, tmp_path, cli):
    """What a SIGKILLed verify leaves (old-style partial files in verify/, a temp folder with a dead pid) is cleaned
    by the next run; only names edgetl itself uses are touched."""
    from edgetl.fsutil import PID_FILE

    bundle = shutil.copytree(base_run / "export", tmp_path / "bundle")
    reports = bundle / "verify"
    reports.mkdir()
    (reports / ".latency.partial31337.png").write_bytes(b"half a png")
    (reports / ".report.json.k2j3.partial").write_bytes(b'{"half":')
    stale = bundle / ".verify.abc123.partial"
    stale.mkdir()
    (stale / PID_FILE).write_text("999999999")  # no such process
    (stale / "report.md").write_text("half")
    code, _, stderr = cli(*_verify_args(bundle))
    assert code in (0, 1, 4), stderr
    assert sorted(p.name for p in reports.iterdir()) == [
        "confusion.png",
        "latency.png",
        "misclassified.png",
        "report.json",
        "report.md",
    ]
    assert not [p.name for p in bundle.iterdir() if p.name.startswith(".")]


def test_report_set_is_written_as_a_whole(base_run, tmp_path, cli, monkeypatch):
    """A verify that dies while writing its reports leaves the previous report set exactly as it was: never a new
    report.md next to an old report.json, and no partial file."""
    from edgetl.verify.report import Report

    bundle = shutil.copytree(base_run / "export", tmp_path / "bundle")
    code, _, stderr = cli(*_verify_args(bundle))
    assert code in (0, 1, 4), stderr
    before = snapshot(bundle)

    def boom(self):
        raise RuntimeError("killed while writing report.json")

    monkeypatch.setattr(Report, "to_dict", boom)  # report.md and the plots are written first, then report.json
    code, _, stderr = cli(*_verify_args(bundle))
    assert code == 3 and "killed while writing" in stderr, stderr
    assert snapshot(bundle) == before


@pytest.mark.parametrize("command", ["finetune", "export"])
def test_read_only_target_is_bad_input(command, base_run, shapes_dir, cli):
    """A read-only --out parent (finetune) or run directory (export, default RUN/export): exit 2, one line, nothing
    written. As root (where permissions do not bind) the CLI runs with the effective uid of `nobody`."""
    import os
    import tempfile

    import rich.markup  # noqa: F401

    import edgetl.export  # noqa: F401  (imported before dropping privileges: the interpreter lives under /root)
    import edgetl.finetune  # noqa: F401

    root = Path(tempfile.mkdtemp(prefix="edgetl-ro-"))  # outside pytest's 0700 folder, so `nobody` can reach it
    try:
        os.chmod(root, 0o755)
        if command == "finetune":
            locked = root / "locked"
            locked.mkdir()
            data = copy_data(shapes_dir, root / "data")
            for p in [data, *data.rglob("*")]:
                os.chmod(p, 0o755 if p.is_dir() else 0o644)
            args, expect = ["finetune", "--data", data, "--out", locked / "run", *FAST], "cannot write the run"
        else:
            locked = shutil.copytree(base_run, root / "run", ignore=shutil.ignore_patterns("export"))
            args, expect = ["export", locked, "-f", "tflite", "-q", "fp32"], "cannot write the bundle"
        before = snapshot(root)
        os.chmod(locked, 0o555)
        as_root = os.geteuid() == 0
        if as_root:
            os.seteuid(65534)
        try:
            code, _, stderr = cli(*args)
        finally:
            if as_root:
                os.seteuid(0)
        os.chmod(locked, 0o755)
        assert_one_line_error(code, stderr, expect)
        assert snapshot(root) == before
    finally:
        for p in [root, *root.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                os.chmod(p, 0o755)
        shutil.rmtree(root)


def test_progress_bars_end_cleanly():
    """Early stopping (fewer steps than planned) ends the bar full at what ran, not frozen at 884/1020; a step of
    unknown length (the QAT rewrite) shows a spinner and the time, never `0/?`."""
    from rich.console import Console

    from edgetl.progress import RichReporter

    console = Console(record=True, width=120, force_terminal=False)
    reporter = RichReporter(console)
    with reporter.task("head phase", 1020) as task:
        task.advance(884)
    with reporter.task("QAT: rewrite, annotate, calibrate", None):
        pass
    text = console.export_text()
    assert "884/884" in text and "1020" not in text, text
    assert "QAT: rewrite" in text and "/?" not in text and "0/" not in text, text


_KILLED_VERIFY = """
import sys, time
from edgetl.verify.report import Report
Report.to_dict = lambda self: time.sleep(600)  # hang after report.md and the plots are written, before report.json
from edgetl.cli import app
sys.argv = ["edgetl", "verify", sys.argv[1], "--runs", "2", "--warmup", "0"]
app()
"""


def test_sigkilled_verify_keeps_old_reports_and_next_run_cleans_up(base_run, tmp_path, cli):
    """A verify SIGKILLed while writing its reports: the previous report set is byte-identical (no new report.md next
    to the old report.json), and the next verify removes the killed run's temp folder."""
    import os
    import signal
    import subprocess
    import time

    bundle = shutil.copytree(base_run / "export", tmp_path / "bundle")
    code, _, stderr = cli(*_verify_args(bundle))
    assert code in (0, 1, 4), stderr
    before = snapshot(bundle / "verify")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_VERIFY, str(bundle)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not list(bundle.glob(".verify.*.partial/report.md")):
            assert proc.poll() is None and time.time() < deadline, "verify ended before writing its reports"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert snapshot(bundle / "verify") == before
    assert list(bundle.glob(".verify.*.partial"))  # what the kill left
    code, _, stderr = cli(*_verify_args(bundle))
    assert code in (0, 1, 4), stderr
    assert not [p.name for p in bundle.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in (bundle / "verify").iterdir()) == [
        "confusion.png",
        "latency.png",
        "misclassified.png",
        "report.json",
        "report.md",
    ]
