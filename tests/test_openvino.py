"""The OpenVINO runner on real ONNX artifacts made by ``edgetl export``: fidelity vs onnxruntime, static batch 1,
the thread count and the precision it is asked for (no silent bf16), and the embedded metadata it reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

import rundir_factory  # noqa: E402

INT8_MEAN_TOL = 0.05  # mean |dp| between two int8 runtimes (different integer kernels) on the same QDQ file


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory) -> Path:
    from edgetl.export import export_run

    run = rundir_factory.make_run_dir(tmp_path_factory.mktemp("ov"), qat=True, per_class=16)
    out = tmp_path_factory.mktemp("ov_bundle") / "onnx"
    export_run(run, "onnx", "all", out, samples=24, seed=3, calibration=24)
    return out


def _runners(bundle_dir: Path, name: str, threads: int = 1):
    from edgetl.verify import load_bundle
    from edgetl.verify.openvino_runner import OpenVinoRunner
    from edgetl.verify.runners import make_runner

    bundle = load_bundle(bundle_dir)
    spec = bundle.artifact(name)
    ort = make_runner(spec, bundle.input, bundle.labels, threads=threads)
    ov = OpenVinoRunner(
        spec.name, spec.path, bundle.input, len(bundle.labels), input_dtype=spec.input_dtype,
        input_quant=spec.input_quant, output_dtype=spec.output_dtype, output_quant=spec.output_quant,
        quantization=spec.quantization, threads=threads, labels=bundle.labels,
    )
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
        OpenVinoRunner(spec.name, spec.path, bundle.input, len(bundle.labels), quantization="fp32",
                       labels=tuple(reversed(bundle.labels)))
