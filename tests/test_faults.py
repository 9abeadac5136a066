"""Faults: ``edgetl finetune`` SIGKILLed midway loses nothing and resumes.

A real ``edgetl finetune`` subprocess (32 px, random init, shapes data) is killed with SIGKILL as soon as its hidden
``.NAME.partial`` folder records the head phase as completed (it is then fine-tuning). Afterwards:

* the target holds the previous good run, byte for byte (checksums intact), or nothing if there was none;
* rerunning the same command completes and resumes: the head phase is not trained again (same run id, same head
  record, a "resuming" message), and no hidden work folder is left;
* replacing an earlier run needs --force (refused up front without it), also when resuming.

Export's SIGKILL test lives in tests/test_export.py (test_sigkill_midway_leaves_old_bundle_or_nothing).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgetl.fsutil import sha256_file

REPO = Path(__file__).resolve().parents[1]


def _args(data: Path, out: Path, seed: int) -> list[str]:
    # fine-tuning the whole (random-init) backbone gives the killer a window of several seconds after the head phase
    return [
        sys.executable,
        "-m",
        "edgetl",
        "finetune",
        "--data",
        str(data),
        "--out",
        str(out),
        "--weights",
        "none",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--fine-tune-epochs",
        "3",
        "--freeze",
        "none",
        "--feature-views",
        "0",
        "--no-qat",
        "--seed",
        str(seed),
        "--json",
    ]


def _env() -> dict:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_USE_LEGACY_KERAS": "1", "EDGETL_DEBUG": ""}


def _progress(work: Path) -> dict | None:
    try:
        return json.loads((work / "progress.json").read_text())
    except (OSError, ValueError):
        return None


def start_and_kill_after_head(args: list[str], out: Path, cwd: Path) -> dict:
    """Run finetune; SIGKILL it once progress.json says "head" is done. Returns that progress.json."""
    work = out.with_name(f".{out.name}.partial")
    proc = subprocess.Popen(args, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    state = None
    try:
        while time.time() < deadline:
            state = _progress(work)
            if state and "head" in state.get("completed", []):
                break
            if proc.poll() is not None:
                pytest.fail(
                    f"finetune ended (rc {proc.returncode}) before it could be killed:\n"
                    f"{proc.stderr.read().decode(errors='replace')[-3000:]}"
                )
            time.sleep(0.02)
        else:
            pytest.fail("finetune never completed its head phase")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "finetune finished before the kill landed"
    assert state is not None
    return state


def finish(args: list[str], cwd: Path) -> tuple[dict, str]:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)["manifest"], proc.stderr


def checksums(run: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(run.iterdir()) if p.is_file()}


def assert_intact(run: Path) -> dict:
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["files"], manifest
    for name, digest in manifest["files"].items():
        assert sha256_file(run / name) == digest, name
    return manifest


def assert_resumed(manifest: dict, stderr: str, killed_state: dict) -> None:
    assert "resuming" in stderr and "head" in stderr, stderr[-2000:]
    assert manifest["run_id"] == killed_state["run_id"]  # the same run, continued
    head = {k: v for k, v in killed_state["phases"]["head"].items() if k != "history"}
    assert manifest["phases"]["head"] == head  # not retrained: the killed run's record, unchanged
    assert manifest["completed_phases"][0] == "head"
    assert manifest["phases"]["fine_tune"]["status"] == "done"


def no_leftovers(parent: Path, name: str) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_sigkill_finetune_leaves_old_run_or_nothing_and_resumes(shapes_dir, tmp_path):
    out = tmp_path / "run"

    # 1. no previous run: killed after the head phase -> nothing at the target, the hidden work folder remains
    args = _args(shapes_dir, out, seed=1)
    killed = start_and_kill_after_head(args, out, tmp_path)
    assert not out.exists()
    assert (tmp_path / ".run.partial" / "float.keras").is_file()
    # ... and the same command resumes and completes
    manifest, stderr = finish(args, tmp_path)
    assert_resumed(manifest, stderr, killed)
    assert_intact(out)
    no_leftovers(tmp_path, "run")

    # 2. a previous good run exists: a killed run (different settings) leaves it exactly as it was
    good = checksums(out)
    good_manifest = (out / "manifest.json").read_text()
    args2 = _args(shapes_dir, out, seed=2)
    refused = subprocess.run(args2, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "pass --force" in refused.stderr, refused.stderr[-2000:]
    assert checksums(out) == good  # refused up front: nothing trained, nothing replaced
    args2 = [*args2, "--force"]
    killed2 = start_and_kill_after_head(args2, out, tmp_path)
    assert killed2["run_id"] != killed["run_id"]
    assert checksums(out) == good and (out / "manifest.json").read_text() == good_manifest
    assert_intact(out)
    # ... and rerunning it resumes, then replaces the old run as a whole
    manifest2, stderr2 = finish(args2, tmp_path)
    assert_resumed(manifest2, stderr2, killed2)
    assert assert_intact(out)["run_id"] == killed2["run_id"] and manifest2["seed"] == 2
    no_leftovers(tmp_path, "run")
