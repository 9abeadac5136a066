"""Artifact metadata: what every exported model carries about itself, and TF-free readers for it.

TFLite: two entries in the flatbuffer's ``metadata`` table, each pointing at a ``buffers`` entry:

* ``edgetl`` — UTF-8 JSON (see :func:`artifact_metadata`)
* ``edgetl.labels`` — the labels file (UTF-8, one class per line)

ONNX: ``metadata_props`` keys ``edgetl.schema``, ``edgetl.labels`` (JSON list), ``edgetl.input`` (JSON contract),
``edgetl.version``, ``edgetl.run_id``, ``edgetl.backbone``, ``edgetl.quantization``, ``edgetl.format``,
``edgetl.source``.

Both readers return the same normalized dict::

    {"schema", "edgetl_version", "run_id", "backbone", "labels", "input", "quantization", "format", "source"}

(the TFLite reader adds ``labels_file``, the embedded labels text). This module never imports TensorFlow; the TFLite
reader uses LiteRT's generated flatbuffer schema (``ai_edge_litert``, in the ``[device]`` extra) through
:mod:`edgetl.tflite_fb`. Every TFLite file also carries the standard TFLite Metadata (``TFLITE_METADATA``, with the
labels as a packed ``labels.txt``): see :mod:`edgetl.tflite_metadata`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from edgetl.errors import ConfigError, ModelFileError

ARTIFACT_SCHEMA = "edgetl.artifact/1"
TFLITE_METADATA_NAME = "edgetl"
TFLITE_LABELS_NAME = "edgetl.labels"
ONNX_PREFIX = "edgetl."

#: The normalized keys returned by both readers.
KEYS = ("schema", "edgetl_version", "run_id", "backbone", "labels", "input", "quantization", "format", "source")


def artifact_metadata(
    *,
    edgetl_version: str,
    run_id: str,
    backbone: str | None,
    labels: list[str] | tuple[str, ...],
    input_contract: dict[str, Any],
    quantization: str,
    fmt: str,
    source: str,
) -> dict[str, Any]:
    """The normalized metadata dict an artifact carries (``input`` describes *this* artifact's input)."""
    return {
        "schema": ARTIFACT_SCHEMA,
        "edgetl_version": edgetl_version,
        "run_id": run_id,
        "backbone": backbone,
        "labels": list(labels),
        "input": dict(input_contract),
        "quantization": quantization,
        "format": fmt,
        "source": source,
    }


#: ONNX image metadata (the keys WinML / the ONNX "Image" metadata convention define for image inputs).
ONNX_PIXEL_RANGES = {(0.0, 255.0): "NominalRange_0_255", (0.0, 1.0): "Normalized_0_1", (-1.0, 1.0): "Normalized_1_1"}


def onnx_standard_props(meta: dict[str, Any]) -> dict[str, str]:
    """Keys any ONNX reader can use without knowing edgetl: the image metadata keys ``Image.BitmapPixelFormat``
    (``Rgb8``), ``Image.ColorSpaceGamma`` (``SRGB``), ``Image.NominalPixelRange`` (``NominalRange_0_255`` for
    edgetl's raw-pixel input), and ``labels``: the class names as a JSON list (``json.loads`` in any language;
    a label may contain commas)."""
    contract = meta["input"]
    value_range = tuple(float(v) for v in contract.get("range", (0, 255)))
    props = {
        "Image.BitmapPixelFormat": "Bgr8" if contract.get("color") == "BGR" else "Rgb8",
        "Image.ColorSpaceGamma": "SRGB",
        "labels": json.dumps(list(meta["labels"])),
    }
    if value_range in ONNX_PIXEL_RANGES:
        props["Image.NominalPixelRange"] = ONNX_PIXEL_RANGES[value_range]
    return props


def to_onnx_props(meta: dict[str, Any]) -> dict[str, str]:
    """Flatten :func:`artifact_metadata` to ONNX ``metadata_props`` (string values): the ``edgetl.*`` keys and
    :func:`onnx_standard_props`."""
    return {
        **onnx_standard_props(meta),
        "edgetl.schema": meta["schema"],
        "edgetl.version": meta["edgetl_version"],
        "edgetl.run_id": meta["run_id"],
        "edgetl.backbone": meta["backbone"] or "",
        "edgetl.labels": json.dumps(meta["labels"]),
        "edgetl.input": json.dumps(meta["input"], sort_keys=True),
        "edgetl.quantization": meta["quantization"],
        "edgetl.format": meta["format"],
        "edgetl.source": meta["source"],
    }


def from_onnx_props(props: dict[str, str], path: Path | str = "model") -> dict[str, Any]:
    if "edgetl.labels" not in props or "edgetl.input" not in props:
        raise ModelFileError(
            f"{path} carries no edgetl metadata (no edgetl.labels/edgetl.input metadata_props)",
            "export it with `edgetl export`",
        )
    try:
        labels = json.loads(props["edgetl.labels"])
        contract = json.loads(props["edgetl.input"])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path} has unreadable edgetl metadata: {exc}", "re-export it") from None
    return {
        "schema": props.get("edgetl.schema"),
        "edgetl_version": props.get("edgetl.version"),
        "run_id": props.get("edgetl.run_id"),
        "backbone": props.get("edgetl.backbone") or None,
        "labels": labels,
        "input": contract,
        "quantization": props.get("edgetl.quantization"),
        "format": props.get("edgetl.format", "onnx"),
        "source": props.get("edgetl.source"),
    }


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """Read the edgetl metadata of an ONNX file with ``onnx`` (or, without it, onnxruntime)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist", "pass the path of an exported .onnx file")
    try:
        import onnx
    except ImportError:
        onnx = None
    try:
        if onnx is not None:
            model = onnx.load(str(path), load_external_data=False)
            props = {p.key: p.value for p in model.metadata_props}
        else:
            import onnxruntime as ort

            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            props = dict(sess.get_modelmeta().custom_metadata_map)
    except ModelFileError:
        raise
    except Exception as exc:  # protobuf DecodeError, ORT Fail... : a corrupt file
        raise ModelFileError(
            f"{path} is not a readable ONNX model: {str(exc).splitlines()[0]}", "re-export it"
        ) from None
    return from_onnx_props(props, path)


# --- TFLite ---------------------------------------------------------------------------------------------------


def tflite_metadata_entries(data: bytes) -> dict[str, bytes]:
    """All ``Model.metadata`` entries of a TFLite flatbuffer as {name: buffer bytes} (TF-free: LiteRT's generated
    schema, read lazily, via :func:`edgetl.tflite_fb.metadata_entries`). ValueError for an unreadable file."""
    from edgetl.tflite_fb import metadata_entries

    return metadata_entries(data)


def read_tflite_metadata(path: str | Path) -> dict[str, Any]:
    """Read the edgetl metadata (and embedded labels) of a ``.tflite`` file without TensorFlow."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist", "pass the path of an exported .tflite file")
    data = path.read_bytes()
    try:
        entries = tflite_metadata_entries(data)
    except (ValueError, struct.error) as exc:
        raise ModelFileError(f"{path} is not a readable TFLite model: {exc}", "re-export it") from None
    except ImportError:
        raise ConfigError(
            f"reading {path.name} needs ai-edge-litert, which is not installed", "pip install 'edgetl[device]'"
        ) from None
    if TFLITE_METADATA_NAME not in entries:
        raise ModelFileError(f"{path} carries no edgetl metadata", "export it with `edgetl export`")
    try:
        meta = json.loads(entries[TFLITE_METADATA_NAME].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} has unreadable edgetl metadata: {exc}", "re-export it") from None
    if not isinstance(meta, dict) or "labels" not in meta or "input" not in meta:
        raise ModelFileError(f"{path} has incomplete edgetl metadata", "re-export it")
    result = {key: meta.get(key) for key in KEYS}
    for key, value in meta.items():
        result.setdefault(key, value)
    labels_text = entries.get(TFLITE_LABELS_NAME)
    result["labels_file"] = None if labels_text is None else labels_text.decode("utf-8", errors="replace")
    return result


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Dispatch on the suffix: ``.tflite`` or ``.onnx``."""
    path = Path(path)
    if path.suffix.lower() == ".tflite":
        return read_tflite_metadata(path)
    if path.suffix.lower() == ".onnx":
        return read_onnx_metadata(path)
    raise ModelFileError(f"{path} is neither .tflite nor .onnx", "pass an exported model file")
