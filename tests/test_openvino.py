"""The OpenVINO runner on real ONNX artifacts made by ``edgetl export``: fidelity vs onnxruntime, static batch 1,
the thread count and the precision it is asked for (no silent bf16), and the embedded metadata it reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

import rundir_factory  # noqa: E402

INT8_MEAN_TOL = 0.05  # mean |dp| between two int8 runtimes (different integer kernels) on the same QDQ file
FAST = {"runs": 20, "warmup": 2}


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory) -> Path:
    from edgetl.export import export_run

    run = rundir_factory.make_run_dir(tmp_path_factory.mktemp("ov"), qat=True, per_class=16)
    out = tmp_path_factory.mktemp("ov_bundle") / "onnx"
    export_run(run, "onnx", "all", out, samples=24, seed=3, calibration=24)
    return out


def _runners(bundle_dir: Path, name: str, threads: int = 1):
    from edgetl.verify import load_bundle
    from edgetl.verify.runners import make_runner

    bundle = load_bundle(bundle_dir)
    spec = bundle.artifact(name)
    ort = make_runner(spec, bundle.input, bundle.labels, threads=threads)
    ov = make_runner(spec, bundle.input, bundle.labels, threads=threads, engine="openvino")
    return bundle, ort, ov


def test_fp32_matches_onnxruntime_with_f32_precision(onnx_bundle):
    bundle, ort, ov = _runners(onnx_bundle, "onnx_fp32")
    a, b = ort.predict(bundle.sample.images), ov.predict(bundle.sample.images)
    assert float(np.abs(a - b).max()) <= 1e-4
    assert ov.execution_precision == "f32"
    # the model was compiled at static batch 1 although the file's batch dimension is dynamic
    compiled_input = ov._request.get_compiled_model().inputs[0].get_partial_shape()
    assert compiled_input.is_static
    assert [d.get_length() for d in compiled_input] == [1, bundle.input.height, bundle.input.width, 3]


def test_int8_within_int8_tolerance_of_onnxruntime(onnx_bundle):
    bundle, ort, ov = _runners(onnx_bundle, "onnx_qat_int8")
    a, b = ort.predict(bundle.sample.images), ov.predict(bundle.sample.images)
    assert np.all(np.isfinite(b))
    assert float(np.abs(a - b).mean()) <= INT8_MEAN_TOL
    assert float(np.mean(a.argmax(1) == b.argmax(1))) >= 0.9


def test_threads_are_honoured(onnx_bundle):
    for threads in (1, 2):
        _, _, ov = _runners(onnx_bundle, "onnx_fp32", threads=threads)
        compiled = ov._request.get_compiled_model()
        assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == threads
        assert str(compiled.get_property("ENABLE_CPU_PINNING")).lower() in ("false", "0")


def test_reads_embedded_labels_and_refuses_a_mismatch(onnx_bundle):
    from edgetl.errors import ModelFileError
    from edgetl.verify import load_bundle
    from edgetl.verify.openvino_runner import OpenVinoRunner

    bundle, _, ov = _runners(onnx_bundle, "onnx_fp32")
    assert ov.metadata is not None and ov.metadata["labels"] == list(bundle.labels)
    spec = load_bundle(onnx_bundle).artifact("onnx_fp32")
    with pytest.raises(ModelFileError, match="labels"):
        OpenVinoRunner(
            spec.name,
            spec.path,
            bundle.input,
            len(bundle.labels),
            quantization="fp32",
            labels=tuple(reversed(bundle.labels)),
        )


# ---------------------------------------------------------------------------------------------------------------
# `edgetl verify --runtime onnxruntime,openvino`: OpenVINO rows checked like the others, in the same report


@pytest.fixture(scope="module")
def both_report(onnx_bundle, tmp_path_factory):
    from edgetl.verify import Thresholds, verify

    return verify(
        onnx_bundle,
        runtimes="onnxruntime,openvino",
        threads=(1, 2),
        report_dir=tmp_path_factory.mktemp("r"),
        thresholds=Thresholds(max_latency_ratio=8.0, margin_pp=50.0),
        **FAST,
    )


def _row(report, name):
    return next(a for a in report.artifacts if a.name == name)


def test_verify_openvino_fp32_matches_onnxruntime_at_f32(both_report):
    from edgetl.verify import Thresholds

    ort, ov = _row(both_report, "onnx_fp32"), _row(both_report, "onnx_fp32@openvino")
    assert ov.engine == "openvino" and ov.artifact == "onnx_fp32" and "f32 precision" in ov.runtime
    assert ort.engine == "onnxruntime" and "onnxruntime" in ort.runtime
    assert float(np.abs(ov.predictions - ort.predictions).max()) <= 1e-4
    assert ov.max_abs_diff <= Thresholds().float_tolerance  # fidelity vs float.keras's outputs, as for onnxruntime
    assert not [f for f in ov.failures if f.startswith("fidelity")]


def test_verify_openvino_int8_within_the_int8_tolerance(both_report):
    from edgetl.verify import Thresholds

    t = Thresholds()
    ort, ov = _row(both_report, "onnx_qat_int8"), _row(both_report, "onnx_qat_int8@openvino")
    assert ov.source == ort.source == "qat.h5"
    assert float(np.abs(ov.predictions - ort.predictions).mean()) <= t.max_mean_diff
    assert ov.top1_agreement >= t.min_agreement and ov.mean_abs_diff <= t.max_mean_diff  # vs qat.h5's outputs
    assert not [f for f in ov.failures if f.startswith("fidelity")]


def test_verify_openvino_int8_vs_fp32_ratio_per_thread_count(both_report):
    ov = _row(both_report, "onnx_qat_int8@openvino")
    assert ov.latency_baseline == "onnx_fp32@openvino"  # OpenVINO int8 is timed against OpenVINO fp32
    assert _row(both_report, "onnx_qat_int8").latency_baseline == "onnx_fp32"
    assert set(ov.latency_by_threads) == {1, 2} and set(ov.latency_ratio_by_threads) == {1, 2}
    assert ov.latency_ratio == ov.latency_ratio_by_threads[1] and np.isfinite(ov.latency_ratio)
    names = [a["name"] for a in both_report.to_dict()["artifacts"]]
    assert len(names) == len(set(names)) and sum(n.endswith("@openvino") for n in names) == len(names) // 2
    assert both_report.to_dict()["machine"]["openvino"]


def test_cli_runtime_openvino(onnx_bundle, tmp_path):
    import json

    from typer.testing import CliRunner

    from edgetl.cli import app

    result = CliRunner().invoke(
        app,
        [
            "verify",
            str(onnx_bundle),
            "--runtime",
            "openvino",
            "--only",
            "onnx_fp32",
            "--threads",
            "1,2",
            "--json",
            "--report",
            str(tmp_path / "r"),
            "--runs",
            "10",
            "--warmup",
            "1",
            "--margin-pp",
            "50",
        ],
    )
    assert result.exit_code == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert [a["name"] for a in data["artifacts"]] == ["onnx_fp32@openvino"]  # openvino alone: no onnxruntime row
    assert set(data["artifacts"][0]["latency_ms_by_threads"]) == {"1", "2"}
    assert "onnx_fp32@openvino" in (tmp_path / "r" / "report.md").read_text()
