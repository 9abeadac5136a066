"""Standard TFLite Metadata (the ``TFLITE_METADATA`` entry) for edgetl classifiers: written and read without
TensorFlow, tflite-support or MediaPipe.

MediaPipe Tasks (``ImageClassifier``), ML Kit custom models and the LiteRT Support Library read a model's labels
and preprocessing from this entry: a ``ModelMetadata`` flatbuffer (file identifier ``M001``, schema
``metadata_schema.fbs`` of tflite-support / MediaPipe) in a ``Model.metadata`` buffer named ``TFLITE_METADATA``,
plus the associated files (here ``labels.txt``) in an uncompressed zip appended after the model flatbuffer.

What edgetl writes (:func:`model_metadata`):

* ``ModelMetadata`` name, description, version (the run id), author, ``min_parser_version`` 1.0.0;
* input tensor ``image``: ``ImageProperties`` (RGB, default size W x H), ``NormalizationOptions`` and ``Stats``;
* output tensor ``probabilities``: ``FeatureProperties``, ``Stats`` [0, 1] and ``labels.txt`` as a
  ``TENSOR_AXIS_LABELS`` associated file.

Normalization: edgetl models take raw pixels and scale inside the model, so a float input expects values in the
contract's ``range`` (``[0, 255]``). MediaPipe feeds a float input ``(pixel - mean) / std``; :func:`normalization`
picks ``mean``/``std`` so that this *is* the contract range (``mean 0, std 1`` for ``[0, 255]``: the raw pixel
values). A ``uint8`` input gets the raw bytes; for it the same options describe the real values of those bytes
(edgetl's QAT int8 input is scale 1, zero point 0: byte = pixel).

The builder below writes the tables with the plain ``flatbuffers`` builder, using the field slots of
``metadata_schema.fbs`` (tables and slots listed at each call); no generated code is needed.
"""

from __future__ import annotations

import io
import struct
import zipfile
from typing import Any

METADATA_NAME = "TFLITE_METADATA"
FILE_IDENTIFIER = b"M001"
LABELS_FILE = "labels.txt"
MIN_PARSER_VERSION = "1.0.0"

# metadata_schema.fbs enums
_TENSOR_AXIS_LABELS = 2  # AssociatedFileType
_RGB = 1  # ColorSpaceType
_FEATURE_PROPERTIES, _IMAGE_PROPERTIES = 1, 2  # ContentProperties union
_NORMALIZATION_OPTIONS = 1  # ProcessUnitOptions union


def normalization(value_range: tuple[float, float] | list[float]) -> tuple[float, float]:
    """(mean, std) such that ``(pixel - mean) / std`` maps pixels 0..255 onto ``value_range`` [low, high]."""
    low, high = float(value_range[0]), float(value_range[1])
    if not high > low:
        raise ValueError(f"bad input range {value_range}")
    std = 255.0 / (high - low)
    return -low * std + 0.0, std  # + 0.0: no negative zero


# --- writing ---------------------------------------------------------------------------------------------------


def model_metadata(
    *,
    name: str,
    description: str,
    version: str,
    author: str,
    height: int,
    width: int,
    value_range: tuple[float, float] | list[float],
    input_description: str,
    output_description: str,
    labels_file: str = LABELS_FILE,
) -> bytes:
    """The ``ModelMetadata`` flatbuffer (identifier ``M001``) of a one-input, one-output image classifier."""
    import flatbuffers

    b = flatbuffers.Builder(1024)
    mean, std = normalization(value_range)

    def string(s: str) -> int:
        return b.CreateString(s)

    def floats(values: list[float]) -> int:
        b.StartVector(4, len(values), 4)
        for v in reversed(values):
            b.PrependFloat32(float(v))
        return b.EndVector()

    def offsets(items: list[int]) -> int:
        b.StartVector(4, len(items), 4)
        for item in reversed(items):
            b.PrependUOffsetTRelative(item)
        return b.EndVector()

    def table(n_slots: int, fields: list[tuple[str, int, Any]]) -> int:
        b.StartObject(n_slots)
        for kind, slot, value in fields:
            if kind == "offset":
                b.PrependUOffsetTRelativeSlot(slot, value, 0)
            elif kind == "int8":
                b.PrependInt8Slot(slot, value, 0)
            elif kind == "uint8":
                b.PrependUint8Slot(slot, value, 0)
            elif kind == "uint32":
                b.PrependUint32Slot(slot, value, 0)
        return b.EndObject()

    def stats(low: float, high: float) -> int:
        mx, mn = floats([high]), floats([low])
        return table(2, [("offset", 0, mx), ("offset", 1, mn)])  # Stats: max 0, min 1

    # input tensor
    size = table(2, [("uint32", 0, int(width)), ("uint32", 1, int(height))])  # ImageSize: width 0, height 1
    image_props = table(2, [("int8", 0, _RGB), ("offset", 1, size)])  # ImageProperties: color_space 0, default_size 1
    in_content = table(3, [("uint8", 0, _IMAGE_PROPERTIES), ("offset", 1, image_props)])  # Content: type 0, props 1
    mean_v, std_v = floats([mean]), floats([std])
    norm = table(2, [("offset", 0, mean_v), ("offset", 1, std_v)])  # NormalizationOptions: mean 0, std 1
    unit = table(2, [("uint8", 0, _NORMALIZATION_OPTIONS), ("offset", 1, norm)])  # ProcessUnit: type 0, options 1
    units = offsets([unit])
    in_stats = stats((0.0 - mean) / std, (255.0 - mean) / std)
    in_name, in_desc = string("image"), string(input_description)
    # TensorMetadata: name 0, description 1, dimension_names 2, content 3, process_units 4, stats 5, files 6
    input_md = table(
        7,
        [
            ("offset", 0, in_name),
            ("offset", 1, in_desc),
            ("offset", 3, in_content),
            ("offset", 4, units),
            ("offset", 5, in_stats),
        ],
    )

    # output tensor
    feature = table(0, [])  # FeatureProperties (no fields)
    out_content = table(3, [("uint8", 0, _FEATURE_PROPERTIES), ("offset", 1, feature)])
    out_stats = stats(0.0, 1.0)
    file_name, file_desc = string(labels_file), string("Labels for the output classes, one per line, index order")
    # AssociatedFile: name 0, description 1, type 2, locale 3, version 4
    labels = table(5, [("offset", 0, file_name), ("offset", 1, file_desc), ("int8", 2, _TENSOR_AXIS_LABELS)])
    files = offsets([labels])
    out_name, out_desc = string("probabilities"), string(output_description)
    output_md = table(
        7,
        [
            ("offset", 0, out_name),
            ("offset", 1, out_desc),
            ("offset", 3, out_content),
            ("offset", 5, out_stats),
            ("offset", 6, files),
        ],
    )

    # SubGraphMetadata: name 0, description 1, input_tensor_metadata 2, output_tensor_metadata 3, ...
    inputs, outputs = offsets([input_md]), offsets([output_md])
    sub_name = string("image_classifier")
    subgraph = table(10, [("offset", 0, sub_name), ("offset", 2, inputs), ("offset", 3, outputs)])
    subgraphs = offsets([subgraph])
    # ModelMetadata: name 0, description 1, version 2, subgraph_metadata 3, author 4, license 5,
    # associated_files 6, min_parser_version 7
    m_name, m_desc, m_version, m_author = string(name), string(description), string(version), string(author)
    m_parser = string(MIN_PARSER_VERSION)
    root = table(
        8,
        [
            ("offset", 0, m_name),
            ("offset", 1, m_desc),
            ("offset", 2, m_version),
            ("offset", 3, subgraphs),
            ("offset", 4, m_author),
            ("offset", 7, m_parser),
        ],
    )
    b.Finish(root, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def append_associated_files(model: bytes, files: dict[str, bytes]) -> bytes:
    """``model`` followed by an uncompressed (stored) zip of ``files``, as the TFLite Metadata readers expect.

    The zip's offsets count from the start of the file (what tflite-support's writer produces), so both readers that
    take the zip on its own and readers that take the whole file find the entries. Any zip already appended is
    dropped first (the flatbuffer writer returns only the flatbuffer, so callers pass a fresh one)."""
    buf = io.BytesIO()
    buf.write(model)
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # reproducible bytes
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    out = buf.getvalue()
    if out[: len(model)] != model:  # pragma: no cover - zipfile never rewrites what is before its start
        raise RuntimeError("appending the associated files changed the model bytes")
    return out


# --- reading ---------------------------------------------------------------------------------------------------


def associated_files(data: bytes) -> dict[str, bytes]:
    """The files packed after a TFLite flatbuffer ({} when there are none)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return {name: zf.read(name) for name in zf.namelist()}
    except zipfile.BadZipFile:
        return {}


class _Table:
    """A flatbuffers table (``flatbuffers.table.Table``) with slot-number accessors."""

    def __init__(self, buf: bytearray, pos: int):
        from flatbuffers.table import Table

        self.t = Table(buf, pos)

    def _off(self, slot: int) -> int:
        return self.t.Offset(4 + 2 * slot)

    def string(self, slot: int) -> str | None:
        o = self._off(slot)
        return self.t.String(o + self.t.Pos).decode("utf-8", errors="replace") if o else None

    def scalar(self, slot: int, flags) -> int:
        o = self._off(slot)
        return self.t.Get(flags, o + self.t.Pos) if o else 0

    def table(self, slot: int) -> _Table | None:
        o = self._off(slot)
        if not o:
            return None
        return _Table(self.t.Bytes, self.t.Indirect(o + self.t.Pos))

    def tables(self, slot: int) -> list[_Table]:
        o = self._off(slot)
        if not o:
            return []
        start, n = self.t.Vector(o), self.t.VectorLen(o)
        return [_Table(self.t.Bytes, self.t.Indirect(start + 4 * i)) for i in range(n)]

    def floats(self, slot: int) -> list[float]:
        from flatbuffers import number_types as nt

        o = self._off(slot)
        if not o:
            return []
        start, n = self.t.Vector(o), self.t.VectorLen(o)
        return [float(self.t.Get(nt.Float32Flags, start + 4 * i)) for i in range(n)]


def read_model_metadata(meta: bytes) -> dict[str, Any]:
    """Decode the parts of a ``ModelMetadata`` flatbuffer an image classifier needs (ValueError if it is not one)::

    {"name", "description", "version", "min_parser_version",
     "input": {"name", "color_space", "default_size": [w, h] | None, "mean": [..], "std": [..]},
     "output": {"name", "labels_file"}}
    """
    from flatbuffers import number_types as nt

    if len(meta) < 8 or bytes(meta[4:8]) != FILE_IDENTIFIER:
        raise ValueError("not a TFLite Metadata buffer (no M001 identifier)")
    try:
        buf = bytearray(meta)
        root = _Table(buf, struct.unpack_from("<I", buf, 0)[0])
        subgraphs = root.tables(3)
        if not subgraphs:
            raise ValueError("no subgraph metadata")
        sub = subgraphs[0]
        inputs, outputs = sub.tables(2), sub.tables(3)
        result: dict[str, Any] = {
            "name": root.string(0),
            "description": root.string(1),
            "version": root.string(2),
            "min_parser_version": root.string(7),
            "input": None,
            "output": None,
        }
        if inputs:
            t = inputs[0]
            info: dict[str, Any] = {
                "name": t.string(0),
                "color_space": None,
                "default_size": None,
                "mean": [],
                "std": [],
            }
            content = t.table(3)
            if content is not None and content.scalar(0, nt.Uint8Flags) == _IMAGE_PROPERTIES:
                props = content.table(1)
                if props is not None:
                    info["color_space"] = {0: "UNKNOWN", 1: "RGB", 2: "GRAYSCALE"}.get(props.scalar(0, nt.Int8Flags))
                    size = props.table(1)
                    if size is not None:
                        info["default_size"] = [size.scalar(0, nt.Uint32Flags), size.scalar(1, nt.Uint32Flags)]
            for unit in t.tables(4):
                if unit.scalar(0, nt.Uint8Flags) == _NORMALIZATION_OPTIONS and unit.table(1) is not None:
                    info["mean"], info["std"] = unit.table(1).floats(0), unit.table(1).floats(1)
            result["input"] = info
        if outputs:
            t = outputs[0]
            labels = [f.string(0) for f in t.tables(6) if f.scalar(2, nt.Int8Flags) == _TENSOR_AXIS_LABELS]
            result["output"] = {"name": t.string(0), "labels_file": labels[0] if labels else None}
        return result
    except (IndexError, struct.error, TypeError, AttributeError) as exc:
        raise ValueError(f"corrupt TFLite Metadata ({type(exc).__name__})") from None
