"""A device install: a fresh venv with ``pip install <repo>[device]`` (no TensorFlow) verifies a real bundle.

The venv is cached under ``.pytest_cache/edgetl-device-venv/<key>`` (key: pyproject.toml + Python version), so only
the first run pays for resolving and downloading the device dependencies; every run re-installs edgetl itself from
a fresh copy of the source tree (a normal ``pip install``, dependencies already satisfied) so the code under test is
the current one. A file lock keeps concurrent test runs from building the same venv at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import locked

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".pytest_cache" / "edgetl-device-venv"
PIP_TIMEOUT = 900
# 60 images: the accuracy test needs a wide margin to decide; the tiny model's int8 is slower than its fp32
VERIFY_FLAGS = ["--runs", "20", "--warmup", "2", "--max-latency-ratio", "8", "--margin-pp", "10"]


def _key() -> str:
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes())
    digest.update(f"{platform.python_version()} {sys.platform} {platform.machine()} v1".encode())
    return digest.hexdigest()[:16]


def _source_copy(dest: Path) -> Path:
    """pyproject.toml, README and the edgetl package, without build droppings (nothing is written into the repo)."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "edgetl", dest / "edgetl", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _run(cmd: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1", COLUMNS="160")
    kwargs.setdefault("cwd", CACHE)  # never the repo root: `python -c` would import the checkout, not the install
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory) -> Path:
    if not (REPO / "pyproject.toml").is_file():
        pytest.fail("pyproject.toml is missing: cannot build the device install")
    venv = CACHE / _key()
    src = _source_copy(tmp_path_factory.mktemp("src") / "edgetl-src")
    with locked(CACHE / ".lock"):
        for old in CACHE.iterdir():  # venvs for an older pyproject.toml
            if old.is_dir() and old.name != venv.name:
                shutil.rmtree(old, ignore_errors=True)
        python = venv / "bin" / "python"
        if not (venv / ".complete").is_file():
            shutil.rmtree(venv, ignore_errors=True)
            proc = _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
            assert proc.returncode == 0, proc.stderr
        # A normal install: resolves [device] from the package index (already satisfied after the first run), and
        # reinstalls edgetl from the current sources.
        proc = _run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--upgrade",
                "--upgrade-strategy",
                "only-if-needed",
                f"{src}[device]",
            ],
            timeout=PIP_TIMEOUT,
            cwd=src,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (venv / ".complete").write_text("ok\n")
    return venv


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    from bundle_factory import get_factory

    f = get_factory()
    root = tmp_path_factory.mktemp("device_bundles")
    return {
        "honest": f.write_bundle(root / "honest"),
        "faulty": f.write_bundle(
            root / "faulty", f.honest_artifacts() + [f.tflite_int8(f.variant("shuffled"), name="shuffled_int8_tflite")]
        ),
    }


def test_device_venv_has_no_tensorflow(device_venv):
    python = str(device_venv / "bin" / "python")
    proc = _run([python, "-c", "import tensorflow"])
    assert proc.returncode != 0 and "No module named 'tensorflow'" in proc.stderr
    proc = _run([python, "-c", "import tf_keras"])
    assert proc.returncode != 0
    proc = _run([python, "-c", "import edgetl, onnxruntime, ai_edge_litert, matplotlib; print(edgetl.__file__)"])
    assert proc.returncode == 0, proc.stderr
    assert str(device_venv) in proc.stdout  # the installed copy, not the repo checkout


def test_device_verify_honest_bundle(device_venv, bundles, tmp_path):
    proc = _run(
        [
            str(device_venv / "bin" / "edgetl"),
            "verify",
            str(bundles["honest"]),
            "--json",
            "--report",
            str(tmp_path / "report"),
            *VERIFY_FLAGS,
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["passed"] is True
    assert [a["name"] for a in report["artifacts"]] == ["model_fp32_onnx", "model_fp32_tflite", "model_ptq_int8_tflite"]
    assert report["reference"]["name"] == "reference_outputs.npy" and report["verdict"] == "PASS"
    assert report["machine"]["onnxruntime"] and report["machine"]["ai_edge_litert"]
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "report" / "latency.png").is_file()
    # the artifacts' embedded edgetl metadata is read (and checked) on the device too
    code = (
        "import sys; from edgetl.verify import load_bundle; from edgetl.verify.runners import make_runner\n"
        f"b = load_bundle({str(bundles['honest'])!r})\n"
        "metas = {a.name: make_runner(a, b.input, b.labels).metadata for a in b.artifacts}\n"
        "print(sorted(k for k, m in metas.items() if m and m.get('labels') == list(b.labels)))\n"
        "sys.exit('tensorflow' in sys.modules)\n"
    )
    proc = _run([str(device_venv / "bin" / "python"), "-c", code])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "['model_fp32_onnx', 'model_fp32_tflite', 'model_ptq_int8_tflite']" in proc.stdout


def test_device_verify_faulty_bundle_exit_1(device_venv, bundles, tmp_path):
    proc = _run(
        [
            str(device_venv / "bin" / "edgetl"),
            "verify",
            str(bundles["faulty"]),
            "--json",
            "--report",
            str(tmp_path / "report"),
            *VERIFY_FLAGS,
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    bad = {a["name"]: a["failures"] for a in report["artifacts"] if not a["passed"]}
    assert list(bad) == ["shuffled_int8_tflite"]
    assert any(f.startswith("fidelity") for f in bad["shuffled_int8_tflite"])
    assert any(f.startswith("accuracy") for f in bad["shuffled_int8_tflite"])


def test_device_verifies_a_bundle_made_by_the_cli(device_venv, cli_run, tmp_path):
    """`edgetl finetune` + `edgetl export` (real CLI) on the host, `edgetl verify` of the copied bundle in the
    TF-free venv: it checks QAT int8 files against the QAT model's stored outputs, as the host does running qat.h5."""
    bundle = tmp_path / "bundle"
    shutil.copytree(cli_run / "export", bundle, ignore=shutil.ignore_patterns("verify"))
    flags = ["--runs", "10", "--warmup", "2", "--json"]
    proc = _run([str(device_venv / "bin" / "edgetl"), "verify", str(bundle), *flags], cwd=tmp_path)
    assert proc.returncode in (0, 1, 4), proc.stderr[-2000:]
    device = json.loads(proc.stdout)
    assert proc.returncode == device["exit_code"]
    host = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgetl",
            "verify",
            str(cli_run),
            "--bundle-sample",
            *flags,
            "--report",
            str(tmp_path / "host"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert host.returncode in (0, 1, 4), host.stderr[-2000:]
    host_report = json.loads(host.stdout)
    by_name = {a["name"]: a for a in host_report["artifacts"]}
    assert [a["source"] for a in device["artifacts"]] == ["float.keras", "qat.h5", "float.keras", "qat.h5"]
    for art in device["artifacts"]:
        ref = by_name[art["name"]]
        assert (
            art["top1_agreement"] == ref["top1_agreement"] and abs(art["mean_abs_diff"] - ref["mean_abs_diff"]) < 1e-5
        )
        assert art["accuracy_test"]["drop_pp"] == ref["accuracy_test"]["drop_pp"]
        assert not any("not checked" in f for f in art["inconclusive"])


def test_device_verify_run_directory_needs_tensorflow(device_venv, tmp_path):
    from bundle_factory import get_factory

    run = get_factory().write_run(tmp_path / "run")
    proc = _run([str(device_venv / "bin" / "edgetl"), "verify", str(run)], cwd=tmp_path)
    assert proc.returncode == 2
    assert "needs TensorFlow" in proc.stderr and "export" in proc.stderr


def test_device_verify_tampered_bundle_exit_2(device_venv, bundles, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles["honest"], bundle, ignore=shutil.ignore_patterns("verify"))
    with open(bundle / "model_fp32_tflite.tflite", "ab") as fh:
        fh.write(b"\0")
    proc = _run([str(device_venv / "bin" / "edgetl"), "verify", str(bundle), "--json"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == "" and "model_fp32_tflite.tflite" in proc.stderr and "checksum" in proc.stderr


def test_device_predict_matches_verify_runners(device_venv, bundles, tmp_path):
    """`edgetl predict` in the TF-free device venv, on every artifact of a bundle, reads the labels from the files
    and gives the same top-1 (and score) as verify's runners."""
    from PIL import Image

    from edgetl.verify import load_bundle
    from edgetl.verify.runners import make_runner

    bundle = load_bundle(bundles["honest"])
    images = bundle.sample.images[:12]
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    for spec in bundle.artifacts:
        proc = _run(
            [
                str(device_venv / "bin" / "edgetl"),
                "predict",
                str(bundles["honest"]),
                str(folder),
                "--artifact",
                spec.name,
                "--json",
                "--top-k",
                "1",
            ],
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        data = json.loads(proc.stdout)
        assert data["labels"] == list(bundle.labels), spec.name
        ref = make_runner(spec, bundle.input, bundle.labels).predict(images)
        got = [p["top"][0] for p in data["predictions"]]
        assert [g["index"] for g in got] == ref.argmax(1).tolist(), spec.name
        assert all(g["label"] == bundle.labels[g["index"]] for g in got)
        assert max(abs(g["score"] - float(r.max())) for g, r in zip(got, ref)) < 1e-5, spec.name
