"""Artifact metadata: what every exported model carries about itself, and TF-free readers for it.

TFLite: two entries in the flatbuffer's ``metadata`` table, each pointing at a ``buffers`` entry:

* ``edgetl`` — UTF-8 JSON (see :func:`artifact_metadata`)
* ``edgetl.labels`` — the labels file (UTF-8, one class per line)

ONNX: ``metadata_props`` keys ``edgetl.schema``, ``edgetl.labels`` (JSON list), ``edgetl.input`` (JSON contract),
``edgetl.version``, ``edgetl.run_id``, ``edgetl.backbone``, ``edgetl.quantization``, ``edgetl.format``,
``edgetl.source``.

Both readers return the same normalized dict::

    {"schema", "edgetl_version", "run_id", "backbone", "labels", "input", "quantization", "format", "source"}

(the TFLite reader adds ``labels_file``, the embedded labels text). This module imports neither TensorFlow nor
LiteRT; the TFLite reader is a small hand parser of the flatbuffer (only ``Model.metadata`` and ``Model.buffers``).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from edgetl.errors import ModelFileError

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


def to_onnx_props(meta: dict[str, Any]) -> dict[str, str]:
    """Flatten :func:`artifact_metadata` to ONNX ``metadata_props`` (string values)."""
    return {
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
        raise ModelFileError(f"{path} is not a readable ONNX model: {str(exc).splitlines()[0]}", "re-export it") from None
    return from_onnx_props(props, path)


# --- TFLite: minimal flatbuffer reader -------------------------------------------------------------------------

# Field indices in the TFLite schema's Model table (schema.fbs): version=0, operator_codes=1, subgraphs=2,
# description=3, buffers=4, metadata_buffer=5, metadata=6, signature_defs=7.
_MODEL_BUFFERS = 4
_MODEL_METADATA = 6
# Metadata table: name=0, buffer=1. Buffer table: data=0, offset=1, size=2.


class _FlatBuffer:
    """Just enough of the flatbuffers wire format to walk tables, vectors and strings (bounds-checked)."""

    def __init__(self, buf: bytes):
        self.buf = memoryview(buf)

    def _u(self, fmt: str, pos: int) -> int:
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.buf):
            raise ValueError(f"offset {pos} out of range")
        return struct.unpack_from(fmt, self.buf, pos)[0]

    def root(self) -> int:
        return self._u("<I", 0)

    def field_pos(self, table: int, index: int) -> int | None:
        vtable = table - self._u("<i", table)
        vt_size = self._u("<H", vtable)
        entry = 4 + 2 * index
        if entry >= vt_size:
            return None
        off = self._u("<H", vtable + entry)
        return table + off if off else None

    def deref(self, pos: int) -> int:
        return pos + self._u("<I", pos)

    def table_field(self, table: int, index: int) -> int | None:
        pos = self.field_pos(table, index)
        return None if pos is None else self.deref(pos)

    def vector(self, table: int, index: int) -> tuple[int, int]:
        """(start of elements, length) of a vector field; (0, 0) if absent."""
        pos = self.table_field(table, index)
        if pos is None:
            return 0, 0
        return pos + 4, self._u("<I", pos)

    def string(self, table: int, index: int) -> str | None:
        start, n = self.vector(table, index)
        if not start:
            return None
        if start + n > len(self.buf):
            raise ValueError("string out of range")
        return bytes(self.buf[start : start + n]).decode("utf-8", errors="replace")

    def scalar(self, table: int, index: int, fmt: str, default: int = 0) -> int:
        pos = self.field_pos(table, index)
        return default if pos is None else self._u(fmt, pos)


def tflite_metadata_entries(data: bytes) -> dict[str, bytes]:
    """All ``Model.metadata`` entries of a TFLite flatbuffer as {name: buffer bytes} (TF-free)."""
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (no TFL3 identifier)")
    fb = _FlatBuffer(data)
    model = fb.root()
    buffers_start, n_buffers = fb.vector(model, _MODEL_BUFFERS)
    meta_start, n_meta = fb.vector(model, _MODEL_METADATA)
    out: dict[str, bytes] = {}
    for i in range(n_meta):
        entry = fb.deref(meta_start + 4 * i)
        name = fb.string(entry, 0)
        index = fb.scalar(entry, 1, "<I")
        if name is None or index >= n_buffers:
            continue
        buffer = fb.deref(buffers_start + 4 * index)
        start, n = fb.vector(buffer, 0)
        if start:
            if start + n > len(data):
                raise ValueError("buffer out of range")
            out[name] = bytes(data[start : start + n])
        else:  # large models keep buffer data after the flatbuffer: offset/size from the file start
            offset, size = fb.scalar(buffer, 1, "<Q"), fb.scalar(buffer, 2, "<Q")
            if offset > 1 and offset + size <= len(data):
                out[name] = bytes(data[offset : offset + size])
            else:
                out[name] = b""
    return out


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
