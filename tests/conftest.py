"""Shared fixtures: the ../shared folder, tiny generated image folders, the CLI runner."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGETL_SHARED", REPO.parent / "shared"))
V3S_NO_TOP = SHARED / "weights" / "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"shared data folder {SHARED} not present")
    return SHARED


@pytest.fixture(scope="session")
def weights_dir(shared) -> Path:
    return shared / "weights"


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock on the file ``path`` (created) while the block runs: one pytest process at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` once per test session, also across pytest-xdist workers (``make test`` runs two): the first
    worker builds under a file lock in the folder all workers' temp folders share; the others wait, then reuse it.
    A build that failed leaves no ``.complete`` marker, so the next one starts over in a fresh folder."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with locked(root / f".{name}.lock"):
        done = root / name / ".complete"
        if not done.is_file():
            if (root / name).exists():
                shutil.rmtree(root / name)
            (root / name).mkdir()
            build(root / name)
            done.write_text("")
    return root / name


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """3 classes x 16 generated images, 48 px: learnable, tiny."""
    from edgetl.demo import make_shapes

    return built_once(tmp_path_factory, "shapes", lambda d: make_shapes(d, per_class=16, size=48, seed=1))


@pytest.fixture(scope="session")
def cli_run(shapes_dir, tmp_path_factory) -> Path:
    """A run made by the real `edgetl finetune` CLI (random init, 32 px, head + fine-tune + QAT) and exported by the
    real `edgetl export` CLI: the run directory, with its bundle in RUN/export/."""
    import subprocess

    def build(root: Path) -> None:
        run = root / "run"
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_USE_LEGACY_KERAS": "1"}
        for args in (
            [
                "finetune",
                "--data",
                str(shapes_dir),
                "--out",
                str(run),
                "--weights",
                "none",
                "--image-size",
                "32",
                "--epochs",
                "2",
                "--fine-tune-epochs",
                "2",
                "--qat-epochs",
                "1",
                "--batch-size",
                "8",
                "--seed",
                "0",
            ],
            ["export", str(run)],
        ):
            proc = subprocess.run(
                [sys.executable, "-m", "edgetl", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600
            )
            assert proc.returncode == 0, f"edgetl {args[0]}: {proc.stderr[-3000:]}"

    return built_once(tmp_path_factory, "cli_run", build) / "run"


@pytest.fixture
def cli():
    """Run the real CLI in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from edgetl.cli import app

    runner = CliRunner()

    def invoke(*args: str, env: dict | None = None):
        result = runner.invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return invoke


def subset_of(src: Path, dst: Path, classes: int, per_class: int) -> Path:
    """Symlink a few images per class of a shared dataset into dst (fast, nothing copied)."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir())[:classes]:
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for img in sorted(cls.iterdir())[:per_class]:
            (dst / cls.name / img.name).symlink_to(img.resolve())
    return dst


sys.path.insert(0, str(Path(__file__).parent))
