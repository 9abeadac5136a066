"""Load and validate a verification bundle (``bundle.json`` + artifacts + sample). TensorFlow-free.

Everything that can be wrong with a bundle on disk is reported as :class:`~edgetl.errors.BundleError`
naming the offending file: an unknown/newer schema, a missing file, a checksum mismatch (tampering or a
partial copy), a path that escapes the bundle, or sample arrays of the wrong dtype/shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgetl import schema
from edgetl.errors import BundleError
from edgetl.fsutil import confined, sha256_file
from edgetl.schema import SOURCE_FLOAT, SOURCE_QAT, InputContract  # noqa: F401 (edgetl.verify imports them here)

SCHEMA_NAME, _, _VERSION = schema.BUNDLE_SCHEMA.rpartition("/")
SCHEMA_VERSION = int(_VERSION)

_FIX = "re-export the bundle with `edgetl export RUN` (and copy the whole folder)"


class ArtifactSpec(schema.ArtifactRecord):
    """An artifact record of ``bundle.json`` and its file's resolved path inside the bundle."""

    path: Path


@dataclass(frozen=True)
class Sample:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,)
    reference_outputs: np.ndarray  # float32 (N, C): the float model's outputs
    #: every source model's outputs on these images, by source name ("float.keras" = reference_outputs, "qat.h5")
    source_outputs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class Bundle:
    root: Path
    schema: str
    edgetl_version: str | None
    run_id: str | None
    backbone: str | None
    labels: tuple[str, ...]
    input: InputContract
    reference: str | None
    artifacts: tuple[ArtifactSpec, ...]
    sample: Sample
    files: dict[str, str] = field(default_factory=dict)

    def artifact(self, name: str) -> ArtifactSpec:
        for spec in self.artifacts:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def reference_artifact(self) -> ArtifactSpec | None:
        return None if self.reference is None else self.artifact(self.reference)


def _err(message: str, fix: str = _FIX) -> BundleError:
    return BundleError(message, fix)


def _confine(root: Path, relpath: str, what: str) -> Path:
    try:
        return confined(root, relpath)
    except OSError:
        raise _err(f"bundle.json: {what} path {relpath[:60]!r}... cannot be a file name here") from None
    except ValueError:
        raise _err(
            f"bundle.json: {what} path {relpath!r} is unsafe (absolute or outside the bundle); refusing the bundle",
            "only use bundles you exported yourself; paths must be relative and stay inside the bundle folder",
        ) from None


def _parse_schema(value: Any) -> None:
    name, _, version = value.rpartition("/") if isinstance(value, str) else ("", "", "")
    if name != SCHEMA_NAME:
        raise _err(f"bundle.json has schema {value!r:.80}, not {schema.BUNDLE_SCHEMA!r}; it is not an edgetl bundle")
    try:
        number = int(version)
    except ValueError:
        raise _err(f"bundle.json has an unreadable schema version {value!r:.80}") from None
    if number > SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema {value!r} is newer than this edgetl understands ({schema.BUNDLE_SCHEMA!r})",
            "upgrade edgetl on this device (pip install -U 'edgetl[device]') or re-export with the same version",
        )
    if number < SCHEMA_VERSION:
        raise _err(f"bundle schema {value!r} is older than {schema.BUNDLE_SCHEMA!r} and no longer supported")


def _load_npy(path: Path, relpath: str) -> np.ndarray:
    """A plain .npy array; the header is checked against the file size first (a corrupt header claiming terabytes
    must name the file, not exhaust memory)."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            if fh.read(4) == b"PK\x03\x04":
                raise _err(f"bundle file {relpath} is an .npz archive, not a plain .npy array")
            fh.seek(0)
            major, _minor = fmt.read_magic(fh)
            reader = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
            shape, _fortran, dtype = reader(fh, max_header_size=10_000)
            if dtype.hasobject:
                raise _err(f"bundle file {relpath} holds Python objects, not a plain .npy array")
            need = int(np.prod(shape, dtype=object)) * dtype.itemsize
            have = path.stat().st_size - fh.tell()
            if need != have:
                raise _err(
                    f"bundle file {relpath} is corrupt: its header says {dtype} {tuple(shape)} "
                    f"({need:,} bytes) but it holds {have:,} bytes of data"
                )
        return np.load(path, allow_pickle=False)
    except BundleError:
        raise
    except (ValueError, OSError, EOFError, TypeError, OverflowError, MemoryError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _err(f"bundle file {relpath} is not a plain .npy array ({reason[:160]})") from None


def _load_sample(
    root: Path, raw: schema.SampleRecord, contract: InputContract, n_classes: int
) -> tuple[Sample, dict[str, str]]:
    rel = {"images": raw.images, "labels": raw.labels, "reference_outputs": raw.reference_outputs}
    rel.update({f"source:{k}": v for k, v in (raw.source_outputs or {}).items() if k != SOURCE_FLOAT})
    paths = {key: _confine(root, value, f"sample.{key}") for key, value in rel.items()}
    for key, path in paths.items():
        if not path.is_file():
            raise _err(f"bundle file {rel[key]} (sample.{key}) is missing")
    images = _load_npy(paths["images"], rel["images"])
    labels = _load_npy(paths["labels"], rel["labels"])
    ref = _load_npy(paths["reference_outputs"], rel["reference_outputs"])
    expected = (contract.height, contract.width, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
        raise _err(
            f"bundle file {rel['images']} holds {images.dtype} {images.shape}; expected uint8 (N, {', '.join(map(str, expected))})"
        )
    n = images.shape[0]
    if n == 0:
        raise _err(f"bundle file {rel['images']} holds no images")
    if labels.ndim != 1 or labels.shape[0] != n or not np.issubdtype(labels.dtype, np.integer):
        raise _err(f"bundle file {rel['labels']} holds {labels.dtype} {labels.shape}; expected int64 ({n},)")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise _err(f"bundle file {rel['labels']} has label indices outside 0..{n_classes - 1}")
    if ref.ndim != 2 or ref.shape != (n, n_classes) or not np.issubdtype(ref.dtype, np.floating):
        raise _err(
            f"bundle file {rel['reference_outputs']} holds {ref.dtype} {ref.shape}; expected float32 ({n}, {n_classes})"
        )
    if not np.all(np.isfinite(ref)):
        raise _err(f"bundle file {rel['reference_outputs']} contains NaN or Inf")
    sources = {SOURCE_FLOAT: ref.astype(np.float32)}
    for key in [k for k in rel if k.startswith("source:")]:
        out = _load_npy(paths[key], rel[key])
        if out.shape != (n, n_classes) or not np.issubdtype(out.dtype, np.floating) or not np.all(np.isfinite(out)):
            raise _err(
                f"bundle file {rel[key]} holds {out.dtype} {out.shape}; expected finite float32 ({n}, {n_classes})"
            )
        sources[key.split(":", 1)[1]] = out.astype(np.float32)
    if raw.count is not None and raw.count != n:
        raise _err(f"bundle.json: sample.count is {raw.count} but {rel['images']} holds {n} images")
    sample = Sample(
        images=images, labels=labels.astype(np.int64), reference_outputs=sources[SOURCE_FLOAT], source_outputs=sources
    )
    return sample, {str(v): k for k, v in rel.items()}


# ONNX protobuf field numbers (onnx.proto3): ModelProto.graph=7, functions=25; GraphProto.node=1, initializer=5,
# sparse_initializer=15; NodeProto.attribute=5; AttributeProto.t=5, g=6, tensors=10, graphs=11, sparse_tensor=22,
# sparse_tensors=23; FunctionProto.node=7; SparseTensorProto.values=1, indices=2; TensorProto.external_data=13,
# data_location=14 (1 = EXTERNAL). Read here without the onnx package (the device install does not have it).
_ONNX_MESSAGES = {
    "model": {7: "graph", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "function": {7: "node"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {},
}


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _external(data: memoryview, kind: str) -> bool:
    stack = [(data, kind)]
    while stack:
        buf, kind = stack.pop()
        children = _ONNX_MESSAGES[kind]
        pos = 0
        while pos < len(buf):
            key, pos = _varint(buf, pos)
            field, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = _varint(buf, pos)
                if kind == "tensor" and field == 14 and value == 1:
                    return True
            elif wire == 2:
                length, pos = _varint(buf, pos)
                if pos + length > len(buf):
                    raise ValueError("truncated field")
                if kind == "tensor" and field == 13:
                    return True
                if field in children:
                    stack.append((buf[pos : pos + length], children[field]))
                pos += length
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                raise ValueError(f"unsupported wire type {wire}")
    return False


def onnx_uses_external_data(path: Path) -> bool:
    """True if any tensor of the ONNX model at ``path`` points at external data (a file beside the model).

    A file that does not parse as protobuf is left to onnxruntime, which names it when loading fails.
    """
    try:
        return _external(memoryview(path.read_bytes()), "model")
    except (ValueError, IndexError):
        return False


def _check_files(root: Path, files: dict[str, str]) -> dict[str, str]:
    checked = {}
    for relpath, digest in files.items():
        path = _confine(root, relpath, "files")
        if not path.is_file():
            raise _err(f"bundle file {relpath} is missing (listed in bundle.json)")
        if sha256_file(path) != digest.lower():
            raise BundleError(
                f"bundle file {relpath} does not match its checksum in bundle.json (modified, truncated or corrupt)",
                "copy the bundle again from the export machine, or re-export it",
            )
        checked[str(Path(relpath).as_posix())] = digest.lower()
    return checked


def load_bundle(path: str | Path) -> Bundle:
    """Read and fully validate the bundle at ``path`` (a folder, or its ``bundle.json``).

    Anything malformed is a BundleError: the specific checks below name the problem; a value so odd that it slips
    past them (and makes Python raise while parsing) is still reported as a malformed bundle, never a traceback.
    """
    try:
        return _load_bundle(Path(path))
    except BundleError:
        raise
    except (TypeError, ValueError, OverflowError, OSError, KeyError, IndexError) as exc:
        if isinstance(exc, OSError) and exc.filename:  # name the file in the bundle, not the path leading to it
            name = Path(exc.filename).name
            what = f"{exc.strerror}: {name[:60]!r}{'...' if len(name) > 60 else ''} ({len(name)} characters)"
        else:
            what = " ".join(str(exc).split())[:120]
        raise _err(f"bundle.json in {path} is malformed ({type(exc).__name__}: {what})") from None


def _load_bundle(path: Path) -> Bundle:
    if path.name == "bundle.json" and path.is_file():
        path = path.parent
    if not path.exists():
        raise BundleError(f"bundle folder {path} does not exist", "pass the folder `edgetl export` wrote")
    manifest = path / "bundle.json"
    if not manifest.is_file():
        raise BundleError(
            f"{path} has no bundle.json; it is not an edgetl bundle", "pass the folder `edgetl export` wrote"
        )
    raw = schema.read_json(manifest, _err)
    _parse_schema(raw.get("schema"))
    doc = schema.parse(schema.Bundle, raw, "bundle.json", _err)
    root = path.resolve()
    artifacts = tuple(
        ArtifactSpec(**a.model_dump(), path=_confine(root, a.file, f"artifact {a.name!r}")) for a in doc.artifacts
    )
    files = _check_files(root, doc.files)
    listed = {str(confined(root, rel)) for rel in files}

    sample, sample_paths = _load_sample(root, doc.sample, doc.input, len(doc.labels))
    for spec in artifacts:
        if not spec.path.is_file():
            raise _err(f"bundle file {spec.file} (artifact {spec.name!r}) is missing")
        if str(spec.path) not in listed:
            raise _err(f"bundle file {spec.file} (artifact {spec.name!r}) has no checksum in bundle.json `files`")
    for relpath in sample_paths:
        if str(confined(root, relpath)) not in listed:
            raise _err(f"bundle file {relpath} has no checksum in bundle.json `files`")
    for spec in artifacts:
        if spec.format == "onnx" and onnx_uses_external_data(spec.path):
            raise _err(
                f"bundle file {spec.file} (artifact {spec.name!r}) keeps tensors in external data files, which the "
                "bundle's checksums do not cover; edgetl never writes external data, so the bundle is refused"
            )

    labels_txt = root / "labels.txt"
    if labels_txt.is_file() and "labels.txt" in files:
        lines = [line.strip() for line in labels_txt.read_text(encoding="utf-8").splitlines() if line.strip()]
        if lines != doc.labels:
            raise _err("bundle file labels.txt does not match bundle.json `labels`")

    return Bundle(
        root=root,
        schema=doc.schema_,
        edgetl_version=doc.edgetl_version,
        run_id=doc.run_id,
        backbone=doc.backbone,
        labels=tuple(doc.labels),
        input=doc.input,
        reference=doc.reference,
        artifacts=artifacts,
        sample=sample,
        files=files,
    )
