"""Run provenance: schema names, run ids, package versions (TF-free)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import uuid
from importlib import metadata

from edgetl.schema import BUNDLE_SCHEMA, RUN_SCHEMA  # noqa: F401 (the schema names live in edgetl.schema)

_PACKAGES = (
    "edgetl",
    "tensorflow",
    "tensorflow-cpu",
    "tf-keras",
    "tensorflow-model-optimization",
    "tf2onnx",
    "onnx",
    "onnxruntime",
    "ai-edge-litert",
    "numpy",
    "pillow",
    "typer",
    "rich",
    "pydantic",
)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def config_hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# The folders edgetl writes as a whole, and how it recognises its own (edgetl.fsutil.check_target).
from edgetl.fsutil import FolderKind  # noqa: E402

#: BUNDLE/verify/ (or --report DIR): only report files; recognised by its entries (a killed verify leaves no report.json)
REPORT_FOLDER = FolderKind(
    "verify report folder",
    None,
    names=("report.json", "report.md", "latency.png", "confusion.png", "misclassified.png"),
)
BUNDLE_FOLDER = FolderKind("bundle", "bundle.json", "edgetl.bundle/", children=(("verify", REPORT_FOLDER),))
RUN_FOLDER = FolderKind(
    "run directory",
    "manifest.json",
    "edgetl.run/",
    names=("progress.json", "labels.txt", "splits.json", "curves.png", "float.keras", "qat.h5"),
    children=(("export", BUNDLE_FOLDER),),
    nested=(BUNDLE_FOLDER,),
)
