"""The model card (``README.md``) every bundle carries: what the model is, what it takes, how an app runs it.

Written by export from the run's manifest and the finished artifact records (TF-free, plain text). Verify results
are not in it (they come later, on the device: ``edgetl verify BUNDLE`` writes ``BUNDLE/verify/report.md``); the
validation accuracies measured by ``edgetl finetune`` are, when the manifest has them.
"""

from __future__ import annotations

from typing import Any

_METRICS = (
    ("float_val_accuracy", "float model (Keras)"),
    ("qat_val_accuracy", "QAT model (fake-quant, Keras)"),
    ("qat_int8_val_accuracy", "QAT int8 TFLite"),
    ("ptq_int8_val_accuracy", "post-training int8 TFLite"),
)


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KB" if n < 1024 * 1024 else f"{n / (1024 * 1024):.2f} MB"


def _pick(records: list[dict[str, Any]], fmt: str) -> dict[str, Any] | None:
    """The artifact an app would ship in ``fmt``: QAT int8, else PTQ int8, else fp32, else the first."""
    of_format = [r for r in records if r["format"] == fmt]
    for quantization in ("qat_int8", "ptq_int8", "fp32"):
        for r in of_format:
            if r["quantization"] == quantization:
                return r
    return of_format[0] if of_format else None


def model_card(bundle: dict[str, Any], manifest: dict[str, Any]) -> str:
    """Markdown for ``README.md`` from the bundle.json dict (before ``files``) and the run's manifest."""
    labels = list(bundle["labels"])
    contract = bundle["input"]
    h, w = contract["height"], contract["width"]
    low, high = contract.get("range", [0, 255])
    records = bundle["artifacts"]
    lines = [
        f"# {bundle['run_id']}: image classifier ({bundle.get('backbone') or 'unknown backbone'})",
        "",
        f"Exported by edgetl {bundle['edgetl_version']} on {bundle['created']}. Every model file here carries its "
        "labels and input contract in its own metadata (TFLite Metadata / ONNX metadata_props), so apps and "
        "`edgetl predict` need nothing else.",
        "",
        "## Labels",
        "",
        f"{len(labels)} classes, output index order (also `labels.txt`, and packed inside every `.tflite`):",
        "",
    ]
    lines += [f"{i}. {label}" for i, label in enumerate(labels)]
    lines += [
        "",
        "## Input and output",
        "",
        f"- Input `image`: one {w}x{h} RGB image, NHWC, batch 1. Resize (bilinear) to {w}x{h}; no other "
        f"preprocessing: scaling/normalization is inside the model.",
        f"- float32 models take the pixel values as floats {low:g}..{high:g}; the full-int8 TFLite models take "
        "the RGB bytes as `uint8` directly (see the table: QAT int8 is scale 1, zero point 0, i.e. byte = pixel).",
        f"- Output `probabilities`: float32 softmax over the {len(labels)} labels.",
        "",
        "| file | format | quantization | input | size |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in records:
        quant = r.get("input_quant")
        feed = r["input_dtype"] + (f" (scale {quant[0]:g}, zero point {quant[1]})" if quant else "")
        lines.append(f"| `{r['file']}` | {r['format']} | {r['quantization']} | {feed} | {_size(r['size_bytes'])} |")
    lines += ["", "## Model and data", ""]
    lines.append(f"- Backbone: {bundle.get('backbone') or 'unknown'}")
    weights = manifest.get("weights") if isinstance(manifest.get("weights"), dict) else {}
    if weights.get("source"):
        lines.append(f"- Initial weights: {weights['source']}")
    data = manifest.get("data") if isinstance(manifest.get("data"), dict) else {}
    if data.get("train_images") is not None:
        lines.append(f"- Data: {data['train_images']} training and {data.get('val_images', '?')} validation images")
    classes = data.get("classes") if isinstance(data.get("classes"), dict) else None
    if classes:
        lines.append("- Images per class: " + ", ".join(f"{k} {v}" for k, v in classes.items()))
    metrics = manifest.get("metrics") if isinstance(manifest.get("metrics"), dict) else {}
    shown = [(label, metrics[key]) for key, label in _METRICS if isinstance(metrics.get(key), (int, float))]
    if shown:
        lines.append(
            "- Validation top-1 accuracy (measured by `edgetl finetune`): "
            + "; ".join(f"{label} {100 * value:.1f}%" for label, value in shown)
        )
    lines.append(
        f"- Bundle sample: {bundle['sample']['count']} held-out validation images (`sample/`) with the "
        "original model's outputs"
    )
    lines += [
        "",
        "## Verify on the target CPU",
        "",
        "```sh",
        "pip install 'edgetl[device]'      # no TensorFlow",
        "edgetl verify .                   # accuracy vs the original model + latency; writes verify/report.md",
        "edgetl predict . photo.jpg        # top-3 labels (a folder of images works too; --json)",
        "```",
    ]
    lines += use_it_in_your_app(_pick(records, "tflite"), _pick(records, "onnx"), h, w)
    return "\n".join(lines) + "\n"


def use_it_in_your_app(tflite: dict[str, Any] | None, onnx: dict[str, Any] | None, h: int, w: int) -> list[str]:
    lines = ["", "## Use it in your app", ""]
    if tflite is not None:
        name = tflite["file"]
        uint8 = tflite["input_dtype"] == "uint8"
        lines += [
            f"MediaPipe Tasks (Python, Android, iOS, web) reads labels and preprocessing from `{name}` itself:",
            "",
            "```python",
            "import mediapipe as mp",
            "from mediapipe.tasks.python import BaseOptions, vision",
            "classifier = vision.ImageClassifier.create_from_options(vision.ImageClassifierOptions(",
            f"    base_options=BaseOptions(model_asset_path='{name}'), max_results=3))",
            "result = classifier.classify(mp.Image.create_from_file('photo.jpg'))",
            "print([(c.category_name, c.score) for c in result.classifications[0].categories])",
            "```",
            "",
            "LiteRT (`pip install ai-edge-litert`), signature `serving_default`: `image` -> `probabilities`:",
            "",
            "```python",
            "import numpy as np",
            "from PIL import Image",
            "from ai_edge_litert.interpreter import Interpreter",
            f"it = Interpreter(model_path='{name}')",
            "run = it.get_signature_runner('serving_default')",
            f"x = np.asarray(Image.open('photo.jpg').convert('RGB').resize(({w}, {h}), Image.BILINEAR))[None]",
            f"probs = run(image=x{'' if uint8 else '.astype(np.float32)'})['probabilities'][0]",
            "labels = open('labels.txt').read().split()",
            "print(labels[int(probs.argmax())], float(probs.max()))",
            "```",
            "",
        ]
        if uint8:
            lines += [
                f"Android / iOS without MediaPipe: `{name}` takes the RGB bytes as they are. Scale the camera "
                f"frame or bitmap to {w}x{h}, drop the alpha channel and copy the bytes in R, G, B order into a "
                f"{h * w * 3}-byte buffer: on Android `ByteBuffer.allocateDirect({h * w * 3})` filled from "
                "`Bitmap.getPixels` (`(p shr 16) and 0xFF`, `(p shr 8) and 0xFF`, `p and 0xFF`), or the LiteRT "
                "Support Library's `TensorImage(DataType.UINT8)` with a `ResizeOp` and no `NormalizeOp`; on iOS "
                "the same bytes from a `CVPixelBuffer` (BGRA: reorder to RGB) into `interpreter.copy(data, toInputAt: "
                "0)`. Read the `float32` output as probabilities in `labels.txt` order.",
                "",
            ]
    if onnx is not None:
        lines += [
            f"onnxruntime (`{onnx['file']}`; labels in the `labels` metadata key, a JSON list):",
            "",
            "```python",
            "import json, numpy as np, onnxruntime as ort",
            "from PIL import Image",
            f"sess = ort.InferenceSession('{onnx['file']}', providers=['CPUExecutionProvider'])",
            "labels = json.loads(sess.get_modelmeta().custom_metadata_map['labels'])",
            f"x = np.asarray(Image.open('photo.jpg').convert('RGB').resize(({w}, {h}), Image.BILINEAR), np.float32)[None]",
            "probs = sess.run(['probabilities'], {'image': x})[0][0]",
            "print(labels[int(probs.argmax())], float(probs.max()))",
            "```",
        ]
    return lines
