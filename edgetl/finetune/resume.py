"""The work folder's resume state: ``progress.json`` (config hash, completed phases, their records) and the
``float.keras`` checkpoint written after each finished phase."""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgetl.fsutil import atomic_write_json


def _read_state(work: Path, chash: str) -> dict | None:
    try:
        state = json.loads((work / "progress.json").read_text())
    except (OSError, ValueError):
        return None
    if state.get("config_hash") != chash or not (work / "float.keras").is_file():
        return None
    return state


def _save_state(work: Path, state: dict) -> None:
    atomic_write_json(work / "progress.json", state)


def _checkpoint(work: Path, model, state: dict, phase: str) -> None:
    tmp = work / ".float.partial.keras"
    model.save(tmp)
    os.replace(tmp, work / "float.keras")
    state["completed"].append(phase)
    _save_state(work, state)
