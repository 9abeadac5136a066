"""`edgetl finetune` -> `edgetl export` -> `edgetl verify`, all through the real CLI (no test factory), on the host.

The device half (the same bundle verified in the TensorFlow-free venv) is in tests/test_device_install.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from conftest import REPO

from edgetl.verify import load_bundle

FLAGS = ["--runs", "10", "--warmup", "2", "--json"]


def _verify(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "edgetl", "verify", *map(str, args), *FLAGS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode in (0, 1, 4), proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert proc.returncode == report["exit_code"] == {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 4}[report["verdict"]]
    return report


def test_cli_run_export_verify_on_the_host(cli_run, tmp_path):
    bundle = load_bundle(cli_run / "export")
    sources = {a.name: a.source for a in bundle.artifacts}
    assert sources == {
        "tflite_fp32": "float.keras",
        "tflite_qat_int8": "qat.h5",
        "onnx_fp32": "float.keras",
        "onnx_qat_int8": "qat.h5",
    }
    assert set(bundle.sample.source_outputs) == {"float.keras", "qat.h5"}
    assert not np.allclose(bundle.sample.source_outputs["qat.h5"], bundle.sample.reference_outputs, atol=1e-6)

    # host, default: the run's whole validation split, float.keras and qat.h5 run live
    report = _verify(cli_run, "--report", tmp_path / "host")
    splits = json.loads((cli_run / "splits.json").read_text())
    assert report["data"] == "the run's validation split" and report["samples"] == len(splits["val"])
    arts = {a["name"]: a for a in report["artifacts"]}
    for name in ("tflite_fp32", "onnx_fp32"):  # fp32 conversions match the float model
        assert arts[name]["max_abs_diff"] <= 1e-4 and not any(f.startswith("fidelity") for f in arts[name]["failures"])
    for name in ("tflite_qat_int8", "onnx_qat_int8"):
        assert arts[name]["source"] == "qat.h5" and arts[name]["latency_baseline"] == name.replace("qat_int8", "fp32")
        assert arts[name]["latency_ratio"] > 0
    for art in report["artifacts"]:
        misclassified = art["per_class"]["misclassified"]
        assert art["per_class"]["misclassified_count"] == round((1 - art["accuracy"]) * report["samples"])
        assert all(m["image"].startswith(splits["data_root"]) for m in misclassified)  # real file paths

    # host on the bundle sample: the QAT model run live gives the fidelity the stored qat_outputs.npy gives
    live = _verify(cli_run, "--bundle-sample", "--report", tmp_path / "sample")
    stored = _verify(cli_run / "export", "--report", tmp_path / "bundle")
    assert live["data"] == stored["data"] == "bundle sample"
    for a, b in zip(live["artifacts"], stored["artifacts"]):
        assert a["name"] == b["name"] and a["top1_agreement"] == b["top1_agreement"]
        assert abs(a["mean_abs_diff"] - b["mean_abs_diff"]) < 1e-6
        assert a["accuracy_test"]["drop_pp"] == b["accuracy_test"]["drop_pp"]


def test_weights_none_trains_from_scratch(cli_run):
    """`--weights none --freeze auto`: nothing frozen (no pretrained features), said in the manifest, whole backbone
    fine-tuned at the from-scratch rate; op determinism on."""
    from edgetl.finetune import FROM_SCRATCH_FINE_TUNE_LR

    m = json.loads((cli_run / "manifest.json").read_text())
    assert m["weights"]["source"] == "none"
    assert m["freeze"]["policy"] == "auto" and m["freeze"]["frozen_layers"] == 0 and m["freeze"]["trainable_layers"] > 0
    assert "no pretrained features" in m["freeze"]["reason"]
    assert m["phases"]["fine_tune"]["lr"] == FROM_SCRATCH_FINE_TUNE_LR
    assert m["determinism"] == {"seed": 0, "op_determinism": True}
