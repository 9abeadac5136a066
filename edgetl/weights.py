"""Where pretrained weights come from: `imagenet` (a local folder first, then Keras's download), `none`, or a path.

Local lookup order for `imagenet`: ``--weights-dir``, then ``$EDGETL_WEIGHTS_DIR``, then Keras's own cache
(``~/.keras/models``), each by Keras's own file name. Only then does Keras download (real users, online). The
resolution never falls back silently: a missing file is an error that says how to supply one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgetl.backbones import Backbone
from edgetl.errors import WeightsError
from edgetl.fsutil import sha256_file

ENV_VAR = "EDGETL_WEIGHTS_DIR"


@dataclass(frozen=True)
class WeightsChoice:
    source: str  # "imagenet", "none" or "path"
    path: Path | None  # the file to load (None: random init, or Keras download still to happen)
    searched: tuple[str, ...] = ()

    def keras_arg(self) -> str | None:
        if self.source == "none":
            return None
        if self.path is not None:
            return str(self.path)
        return "imagenet"

    def describe(self) -> str:
        if self.source == "none":
            return "none (random initialisation)"
        if self.path is not None:
            return f"{self.source}: {self.path}"
        return "imagenet (Keras download)"


def search_dirs(weights_dir: str | Path | None = None) -> list[Path]:
    dirs = []
    if weights_dir:
        dirs.append(Path(weights_dir))
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]))
    dirs.append(Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models")
    return dirs


def resolve_weights(
    backbone: Backbone,
    weights: str,
    image_size: int,
    weights_dir: str | Path | None = None,
    allow_download: bool = True,
) -> WeightsChoice:
    spec = (weights or "").strip()
    if spec.lower() in ("none", "random", ""):
        return WeightsChoice("none", None)
    if spec.lower() == "imagenet":
        filename = backbone.weight_files[1]
        dirs = search_dirs(weights_dir)
        for d in dirs:
            candidate = d / filename
            if candidate.is_file():
                return WeightsChoice("imagenet", candidate.resolve(), tuple(map(str, dirs)))
        if weights_dir and not Path(weights_dir).is_dir():
            raise WeightsError(f"weights folder {weights_dir} does not exist", f"create it and put {filename} in it")
        if not allow_download or os.environ.get("EDGETL_OFFLINE"):
            raise WeightsError(
                f"ImageNet weights for {backbone.name} ({filename}) not found in {', '.join(map(str, dirs))}",
                f"put {filename} in a folder and set {ENV_VAR}=FOLDER (or --weights PATH, or --weights none)",
            )
        return WeightsChoice("imagenet", None, tuple(map(str, dirs)))
    path = Path(spec).expanduser()
    if not path.exists():
        raise WeightsError(
            f"weights file {path} does not exist",
            f"pass --weights imagenet, none, or the path of a Keras .h5 weights file for {backbone.name}",
        )
    if path.is_dir():
        raise WeightsError(
            f"--weights {path} is a folder",
            f"pass the .h5 file inside it, or set {ENV_VAR}={path} with --weights imagenet",
        )
    return WeightsChoice("path", path.resolve())


def weights_record(choice: WeightsChoice, loaded_path: Path | None) -> dict:
    path = loaded_path or choice.path
    return {
        "source": choice.source,
        "path": str(path) if path else None,
        "file": path.name if path else None,
        "sha256": sha256_file(path) if path and path.is_file() else None,
    }


def keras_download_path(backbone: Backbone) -> Path:
    """Where Keras's own download lands (to record the file it loaded)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / backbone.weight_files[1]
