"""Read and validate a run directory written by ``edgetl finetune`` (TF-free).

See docs/formats.md ("Run directory"). :func:`read_run` checks what export needs and raises
:class:`~edgetl.errors.RunDirError` with a fix for anything missing, unreadable or from an incompatible edgetl.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetl import __version__, schema
from edgetl.errors import RunDirError
from edgetl.schema import RUN_SCHEMA

#: The run-manifest schema this edgetl reads: ``edgetl.run/<major>``.
RUN_SCHEMA_PREFIX = "edgetl.run/"
RUN_SCHEMA_MAJOR = 1

MANIFEST = "manifest.json"
FLOAT_MODEL = "float.keras"
QAT_MODEL = "qat.h5"
LABELS = "labels.txt"
SPLITS = "splits.json"

_FINETUNE_FIX = "run `edgetl finetune` to completion for this run (or pass the folder it wrote, e.g. models/<name>)"


@dataclass(frozen=True)
class RunInfo:
    """What export needs from a run directory; paths are absolute."""

    path: Path
    manifest: dict[str, Any]
    float_model: Path
    qat_model: Path | None
    labels: tuple[str, ...]
    image_size: tuple[int, int]  # (height, width)
    splits: dict[str, Any] | None
    notes: tuple[str, ...] = field(default=())
    contract: schema.InputContract | None = None  # the manifest's `input`, if it has one

    @property
    def run_id(self) -> str:
        return str(self.manifest.get("run_id") or self.path.name)

    @property
    def backbone(self) -> str | None:
        return self.manifest.get("backbone")  # a string or None (edgetl.schema.RunManifest)

    @property
    def has_qat(self) -> bool:
        return self.qat_model is not None

    @property
    def input_contract(self) -> dict[str, Any]:
        """The model input contract (docs/formats.md), from the manifest or derived from ``image_size``."""
        height, width = self.image_size
        given = self.contract.dump() if self.contract else {}
        given.pop("preprocessing", None)
        return {
            "layout": "NHWC",
            "height": height,
            "width": width,
            "channels": 3,
            "color": "RGB",
            "dtype": "float32",
            "range": [0, 255],
            **given,
        }

    def split_items(self, split: str, data_root: str | Path | None = None) -> list[tuple[Path, int]]:
        """Resolve ``splits.json[split]`` to absolute (path, label) items.

        Relative entries resolve against ``data_root`` (override), else ``val_root`` (for "val", when set) or
        ``data_root`` from splits.json; a relative root itself resolves against the run dir, then the cwd.
        """
        if self.splits is None:
            raise RunDirError(f"{self.path / SPLITS} is missing", _FINETUNE_FIX)
        entries = self.splits.get(split)
        if not isinstance(entries, list):
            raise RunDirError(f"{self.path / SPLITS} has no {split!r} list", _FINETUNE_FIX)
        if data_root is not None:
            root: Path | None = Path(data_root)
        else:
            raw = self.splits.get("val_root") if split == "val" and self.splits.get("val_root") else None
            raw = raw or self.splits.get("data_root")
            root = None if raw in (None, "") else self._resolve_root(Path(raw))
        items: list[tuple[Path, int]] = []
        n_labels = len(self.labels)
        for entry in entries:
            try:
                rel, label = entry[0], int(entry[1])
            except (TypeError, ValueError, IndexError, KeyError):
                raise RunDirError(
                    f"{self.path / SPLITS} has a malformed {split!r} entry {entry!r}", "expected [path, label] pairs"
                ) from None
            if not 0 <= label < n_labels:
                raise RunDirError(
                    f"{self.path / SPLITS} has label {label} outside the run's {n_labels} classes", _FINETUNE_FIX
                )
            p = Path(rel)
            if not p.is_absolute():
                p = (root / p) if root is not None else self._resolve_root(p)
            items.append((p, label))
        return items

    def _resolve_root(self, p: Path) -> Path:
        if p.is_absolute():
            return p
        for base in (self.path, Path.cwd()):
            if (base / p).exists():
                return (base / p).resolve()
        return (self.path / p).resolve()


def _error(message: str) -> RunDirError:
    return RunDirError(message, _FINETUNE_FIX)


def check_schema(manifest: dict[str, Any], path: Path) -> None:
    """Refuse a manifest whose schema major version differs from :data:`RUN_SCHEMA_MAJOR`."""
    value = manifest.get("schema")
    made_by = manifest.get("edgetl_version") or "an unknown edgetl version"
    if not isinstance(value, str) or not value.startswith(RUN_SCHEMA_PREFIX):
        by = f", written by edgetl {manifest['edgetl_version']}" if manifest.get("edgetl_version") else ""
        raise RunDirError(
            f"{path} is not an edgetl run manifest (schema {value!r}{by}; edgetl {__version__} reads {RUN_SCHEMA!r})",
            "pass the run folder written by `edgetl finetune`",
        )
    version = value[len(RUN_SCHEMA_PREFIX) :]
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise RunDirError(f"{path} has an unreadable schema {value!r}", _FINETUNE_FIX) from None
    if major != RUN_SCHEMA_MAJOR:
        raise RunDirError(
            f"this run was made by edgetl {made_by} (schema {value}); edgetl {__version__} reads {RUN_SCHEMA}",
            f"export it with edgetl {made_by}, or re-run `edgetl finetune` with edgetl {__version__}",
        )


def read_run(path: str | Path, verify_checksums: bool = True) -> RunInfo:
    """Validate and read a run directory. Raises RunDirError naming what is missing and how to fix it."""
    root = Path(path).expanduser()
    if not root.exists():
        raise RunDirError(f"run directory {root} does not exist", _FINETUNE_FIX)
    if not root.is_dir():
        raise RunDirError(f"{root} is a file, not a run directory", _FINETUNE_FIX)
    root = root.resolve()
    missing = [name for name in (MANIFEST, FLOAT_MODEL) if not (root / name).is_file()]
    if missing:
        partial = " (finetune may have been interrupted)" if any(root.iterdir()) else ""
        raise RunDirError(f"run directory {root} is missing {' and '.join(missing)}{partial}", _FINETUNE_FIX)
    manifest = schema.read_json(root / MANIFEST, _error)
    check_schema(manifest, root / MANIFEST)
    doc = schema.parse(schema.RunManifest, manifest, str(root / MANIFEST), _error)

    labels_file = root / LABELS
    file_labels = None
    if labels_file.is_file():
        try:
            file_labels = [ln.strip() for ln in labels_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise RunDirError(f"cannot read {labels_file}: {exc}", _FINETUNE_FIX) from None
    labels = doc.labels or file_labels
    if not labels or len(labels) < 2:
        raise RunDirError(f"{root / MANIFEST} lists no class labels", _FINETUNE_FIX)
    if file_labels is not None and file_labels != labels:
        raise RunDirError(
            f"{labels_file} does not match the labels in {root / MANIFEST}",
            "restore labels.txt (one class per line, in manifest order) or re-run `edgetl finetune`",
        )
    if doc.size is None:
        raise RunDirError(f"{root / MANIFEST} has no image_size [h, w]", _FINETUNE_FIX)

    notes: list[str] = []
    qat_path: Path | None = root / QAT_MODEL
    if not os.path.exists(qat_path):
        if (doc.phases or {}).get("qat", {}).get("status") == "done":
            notes.append(f"manifest says QAT ran but {QAT_MODEL} is missing; QAT variants are unavailable")
        qat_path = None

    if verify_checksums:
        from edgetl.fsutil import sha256_file

        for name in (FLOAT_MODEL, QAT_MODEL):
            expected = (doc.files or {}).get(name)
            target = root / name
            if expected and target.is_file() and sha256_file(target) != expected:
                raise RunDirError(
                    f"{target} does not match the checksum in {root / MANIFEST} (changed or truncated since finetune)",
                    "restore the file or re-run `edgetl finetune`",
                )

    splits = schema.read_json(root / SPLITS, _error) if (root / SPLITS).is_file() else None

    return RunInfo(
        path=root,
        manifest=manifest,
        float_model=root / FLOAT_MODEL,
        qat_model=qat_path,
        labels=tuple(labels),
        image_size=doc.size,
        splits=splits,
        notes=tuple(notes),
        contract=doc.input,
    )
