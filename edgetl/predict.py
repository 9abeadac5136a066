"""``edgetl predict``: classify images with an exported artifact, the way an app would. TensorFlow-free.

Everything the prediction needs comes from the artifact file itself, not from ``bundle.json``:

* ``.tflite``: the standard TFLite Metadata (``TFLITE_METADATA``): labels from the packed ``TENSOR_AXIS_LABELS``
  file, pixel scaling from ``NormalizationOptions`` (``(pixel - mean) / std``), colour space from
  ``ImageProperties``; input size, dtype and quantization from the tensor (LiteRT). A file without that metadata
  falls back to edgetl's own ``edgetl`` entry.
* ``.onnx``: labels from the plain ``labels`` key (JSON list), pixel range from ``Image.NominalPixelRange``,
  colour order from ``Image.BitmapPixelFormat``; size and dtype from the graph input (onnxruntime). Falls back to the
  ``edgetl.*`` keys.

Images are decoded and resized exactly as for training and export (:func:`edgetl.data.load_image`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import ConfigError, DataError, ModelFileError

_FIX = "pass a .tflite/.onnx file exported by `edgetl export` (or its bundle folder)"
#: Which artifact of a bundle ``predict`` runs when none is named: what an app ships first.
BUNDLE_PREFERENCE = ("tflite_qat_int8", "tflite_ptq_int8", "tflite_fp32", "onnx_qat_int8", "onnx_fp32")
_ONNX_RANGES = {"NominalRange_0_255": (0.0, 255.0), "Normalized_0_1": (0.0, 1.0), "Normalized_1_1": (-1.0, 1.0)}


@dataclass(frozen=True)
class Contract:
    """What the model takes, as read from the artifact: feed ``(pixel - mean) / std`` (float, or quantized with
    ``quant`` for integer inputs) in ``color`` order, ``height`` x ``width``."""

    height: int
    width: int
    dtype: str
    mean: float
    std: float
    color: str
    quant: tuple[float, int] | None
    source: str  # where the labels/scaling were read: "TFLITE_METADATA", "onnx image metadata", "edgetl"

    def to_dict(self) -> dict[str, Any]:
        return {
            "height": self.height,
            "width": self.width,
            "dtype": self.dtype,
            "mean": self.mean,
            "std": self.std,
            "color": self.color,
            "quant": list(self.quant) if self.quant else None,
            "source": self.source,
        }


def _range_to_norm(value_range) -> tuple[float, float]:
    from edgetl.tflite_metadata import normalization

    return normalization(value_range)


class Predictor:
    """One loaded artifact: ``labels``, ``contract``, ``predict(uint8 images) -> probabilities``."""

    labels: tuple[str, ...]
    contract: Contract
    path: Path
    runtime: str

    def prepare(self, images: np.ndarray) -> np.ndarray:
        c = self.contract
        if c.color == "BGR":
            images = images[..., ::-1]
        x = (images.astype(np.float32) - np.float32(c.mean)) / np.float32(c.std)
        if c.dtype in ("uint8", "int8"):
            scale, zero_point = c.quant or (1.0, 0)
            info = np.iinfo(c.dtype)
            return np.clip(np.round(x / np.float32(scale)) + zero_point, info.min, info.max).astype(c.dtype)
        return x.astype(c.dtype)

    def predict(self, images: np.ndarray) -> np.ndarray:
        x = self.prepare(np.asarray(images))
        out = np.stack([self._invoke(x[i : i + 1]).reshape(-1) for i in range(len(x))]).astype(np.float32)
        if out.shape[1] != len(self.labels):
            raise ModelFileError(
                f"{self.path.name} outputs {out.shape[1]} scores but carries {len(self.labels)} labels", _FIX
            )
        return out

    def _invoke(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


def _labels_from_text(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


class TflitePredictor(Predictor):
    def __init__(self, path: Path, threads: int = 1):
        from edgetl import tflite_metadata
        from edgetl.tflite_fb import metadata_entries

        self.path = path
        data = path.read_bytes()
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise ConfigError(f"running {path.name} needs ai-edge-litert", "pip install 'edgetl[device]'") from None
        try:
            entries = metadata_entries(data)
            self.interpreter = Interpreter(model_content=data, num_threads=int(threads))
            self.interpreter.allocate_tensors()
        except Exception as exc:
            raise ModelFileError(
                f"{path} is not a loadable TFLite model: {str(exc).splitlines()[0][:200]}", _FIX
            ) from None
        self.runtime = "ai_edge_litert"
        inp = self.interpreter.get_input_details()[0]
        self._in, self._out = inp["index"], self.interpreter.get_output_details()[0]["index"]
        shape = [int(d) for d in inp["shape"]]
        if len(shape) != 4 or shape[-1] != 3:
            raise ModelFileError(f"{path.name} takes input shape {shape}; predict needs NHWC RGB images", _FIX)
        dtype = np.dtype(inp["dtype"]).name
        scale, zero_point = inp.get("quantization", (0.0, 0))
        quant = (float(scale), int(zero_point)) if dtype in ("uint8", "int8") and scale else None
        labels: tuple[str, ...] = ()
        mean = std = None
        color, source = "RGB", "TFLITE_METADATA"
        if tflite_metadata.METADATA_NAME in entries:
            try:
                md = tflite_metadata.read_model_metadata(entries[tflite_metadata.METADATA_NAME])
            except ValueError as exc:
                raise ModelFileError(f"{path.name} has unreadable TFLite Metadata: {exc}", _FIX) from None
            files = tflite_metadata.associated_files(data)
            name = (md.get("output") or {}).get("labels_file")
            if name and name in files:
                labels = _labels_from_text(files[name].decode("utf-8", errors="replace"))
            info = md.get("input") or {}
            if info.get("mean") and info.get("std"):
                if len(set(info["mean"])) > 1 or len(set(info["std"])) > 1:
                    raise ModelFileError(f"{path.name}: per-channel normalization is not supported by predict", _FIX)
                mean, std = float(info["mean"][0]), float(info["std"][0])
            if info.get("color_space") not in (None, "RGB"):
                raise ModelFileError(f"{path.name} takes {info['color_space']} images; predict feeds RGB", _FIX)
        if not labels or mean is None:  # no (complete) standard metadata: edgetl's own entries
            source = "edgetl"
            try:
                meta = json.loads(entries["edgetl"].decode("utf-8"))
                labels = labels or tuple(meta["labels"])
                contract = meta["input"]
                if mean is None:
                    mean, std = _range_to_norm(contract.get("range", [0, 255]))
                color = contract.get("color", "RGB")
            except (KeyError, ValueError, TypeError, UnicodeDecodeError):
                raise ModelFileError(
                    f"{path.name} carries no labels (no TFLite Metadata, no edgetl metadata)", _FIX
                ) from None
        self.labels = labels
        self.contract = Contract(shape[1], shape[2], dtype, mean, std, color, quant, source)

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self._in, x)
        self.interpreter.invoke()
        out = self.interpreter.get_output_details()[0]
        y = self.interpreter.get_tensor(self._out)
        if np.issubdtype(y.dtype, np.integer):
            scale, zero_point = out["quantization"]
            y = (y.astype(np.float32) - zero_point) * np.float32(scale)
        return y


class OnnxPredictor(Predictor):
    _TYPES = {
        "tensor(float)": "float32",
        "tensor(uint8)": "uint8",
        "tensor(int8)": "int8",
        "tensor(float16)": "float16",
    }

    def __init__(self, path: Path, threads: int = 1):
        self.path = path
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(f"running {path.name} needs onnxruntime", "pip install 'edgetl[device]'") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelFileError(
                f"{path} is not a loadable ONNX model: {str(exc).splitlines()[0][:200]}", _FIX
            ) from None
        self.runtime = f"onnxruntime {ort.__version__}"
        inp = self.session.get_inputs()[0]
        self._in, self._out = inp.name, self.session.get_outputs()[0].name
        shape = list(inp.shape)
        if len(shape) != 4 or shape[-1] != 3 or not all(isinstance(d, int) and d > 0 for d in shape[1:3]):
            raise ModelFileError(f"{path.name} takes input shape {shape}; predict needs NHWC RGB images", _FIX)
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        labels: tuple[str, ...] = ()
        value_range = None
        source = "onnx image metadata"
        try:
            if "labels" in props:
                labels = tuple(json.loads(props["labels"]))
            if props.get("Image.NominalPixelRange") in _ONNX_RANGES:
                value_range = _ONNX_RANGES[props["Image.NominalPixelRange"]]
            color = "BGR" if props.get("Image.BitmapPixelFormat") == "Bgr8" else "RGB"
            if not labels or value_range is None:
                source = "edgetl"
                labels = labels or tuple(json.loads(props["edgetl.labels"]))
                contract = json.loads(props["edgetl.input"])
                value_range = value_range or contract.get("range", [0, 255])
                color = contract.get("color", color)
        except (KeyError, ValueError, TypeError):
            raise ModelFileError(f"{path.name} carries no labels (no `labels` or edgetl.* metadata)", _FIX) from None
        mean, std = _range_to_norm(value_range)
        dtype = self._TYPES.get(inp.type, inp.type)
        self.labels = labels
        self.contract = Contract(int(shape[1]), int(shape[2]), dtype, mean, std, color, None, source)

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self._out], {self._in: x})[0]


def resolve(target: str | Path, artifact: str | None = None) -> Path:
    """The model file to run: ``target`` itself, or an artifact of the bundle folder ``target`` (``artifact`` by
    name or file name; default the first of :data:`BUNDLE_PREFERENCE` it has). The bundle's checksums are checked."""
    target = Path(target)
    if target.is_file():
        if artifact is not None:
            raise ConfigError("--artifact applies to a bundle folder, not a model file", "drop --artifact")
        if target.suffix.lower() not in (".tflite", ".onnx"):
            raise ConfigError(f"{target} is neither a .tflite nor an .onnx file", _FIX)
        return target
    if not target.exists():
        raise ConfigError(f"{target} does not exist", _FIX)
    if not (target / "bundle.json").is_file():
        raise ConfigError(f"{target} is a folder without bundle.json, not an edgetl bundle", _FIX)
    from edgetl.verify import load_bundle

    bundle = load_bundle(target)
    by_name = {a.name: a for a in bundle.artifacts}
    if artifact is not None:
        for spec in bundle.artifacts:
            if artifact in (spec.name, spec.file):
                return spec.path
        raise ConfigError(f"the bundle has no artifact {artifact!r}", f"use one of: {', '.join(by_name)}")
    for name in BUNDLE_PREFERENCE + tuple(by_name):
        if name in by_name:
            return by_name[name].path
    raise ConfigError(f"the bundle {target} lists no artifacts", "re-export it with `edgetl export RUN`")


def load(path: str | Path, threads: int = 1) -> Predictor:
    path = Path(path)
    if path.suffix.lower() == ".tflite":
        return TflitePredictor(path, threads)
    if path.suffix.lower() == ".onnx":
        return OnnxPredictor(path, threads)
    raise ConfigError(f"{path} is neither a .tflite nor an .onnx file", _FIX)


def image_paths(target: str | Path) -> list[Path]:
    """One image, or every image in a folder (sorted, not recursive)."""
    from edgetl.data import IMAGE_EXTENSIONS, is_image_file

    target = Path(target)
    if target.is_dir():
        paths = sorted(p for p in target.iterdir() if is_image_file(p))
        if not paths:
            raise DataError(f"no images in {target}", f"supported extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}")
        return paths
    if not target.is_file():
        raise DataError(f"image {target} does not exist", "pass an image file or a folder of images")
    return [target]


def predict(
    model: str | Path, images: str | Path, top_k: int = 3, artifact: str | None = None, threads: int = 1
) -> dict[str, Any]:
    """Classify ``images`` (a file or a folder) with ``model`` (a .tflite/.onnx file or a bundle folder)."""
    from edgetl.data import load_image

    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1 (got {top_k})", "use e.g. --top-k 3")
    path = resolve(model, artifact)
    paths = image_paths(images)  # missing/empty before the runtime starts (and prints its own notices)
    runner = load(path, threads)
    c = runner.contract
    results = []
    for image_path in paths:
        pixels = load_image(image_path, (c.height, c.width))
        probs = runner.predict(pixels[None])[0]
        order = np.argsort(-probs, kind="stable")[: min(top_k, len(probs))]
        results.append(
            {
                "image": str(image_path),
                "top": [{"label": runner.labels[i], "index": int(i), "score": float(probs[i])} for i in order],
            }
        )
    return {
        "model": str(path),
        "runtime": runner.runtime,
        "labels": list(runner.labels),
        "input": c.to_dict(),
        "predictions": results,
    }


def tflite_predict(content: bytes, images: np.ndarray, threads: int = 1, xnnpack: bool = True) -> np.ndarray:
    """Run a .tflite flatbuffer with LiteRT at batch 1, as a device would; returns float32 outputs (N, C).

    The bare runtime helper (no metadata, labels or contract checks: that is :class:`TflitePredictor`), used to
    measure int8 accuracy in finetune and in the tests and benchmarks.

    Inputs are 0..255 pixels; a quantized input tensor gets ``round(x / scale + zero_point)`` from the model's own
    quantization parameters (so uint8, int8 and float32 inputs are all fed correctly).
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kind = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = Interpreter(model_content=content, num_threads=threads, experimental_op_resolver_type=kind)
    it.allocate_tensors()
    d, o = it.get_input_details()[0], it.get_output_details()[0]
    out = []
    for img in np.asarray(images, dtype=np.float32):
        x = img[None]
        if d["dtype"] != np.float32:
            scale, zero = d["quantization"]
            info = np.iinfo(d["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        it.set_tensor(d["index"], x.astype(d["dtype"]))
        it.invoke()
        out.append(it.get_tensor(o["index"])[0].astype(np.float32))
    return np.stack(out)


__all__ = ["predict", "load", "resolve", "image_paths", "Predictor", "Contract", "BUNDLE_PREFERENCE", "tflite_predict"]
