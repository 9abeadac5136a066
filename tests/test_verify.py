"""edgetl verify: bundle validation, runners, checks, report files and the CLI, on real tiny artifacts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import edit_bundle_json, get_factory, rehash
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetl.errors import BundleError, ConfigError, DataError, ModelFileError, RunDirError
from edgetl.verify import Thresholds, load_bundle, verify
from edgetl.verify.bundle import InputContract
from edgetl.verify.runners import Runner

REPO = Path(__file__).resolve().parents[1]
FAST = {"runs": 30, "warmup": 3}
# The tiny model runs in ~20 us, so per-call overhead dominates and the int8 TFLite is ~2x the fp32 ONNX reference;
# the slowed artifact is ~50x. One flipped image of 60 is 1.67 pp.
LENIENT = Thresholds(max_latency_ratio=8.0, max_accuracy_drop=2.0)


@pytest.fixture(scope="session")
def factory():
    return get_factory()


@pytest.fixture(scope="session")
def honest_bundle(factory, tmp_path_factory) -> Path:
    return factory.write_bundle(tmp_path_factory.mktemp("honest") / "bundle")


@pytest.fixture(scope="session")
def faulty_bundle(factory, tmp_path_factory) -> Path:
    f = factory
    artifacts = f.honest_artifacts() + [
        f.tflite_fp32(f.variant("perturbed"), name="perturbed_fp32_tflite"),
        f.tflite_int8(f.variant("shuffled"), name="shuffled_int8_tflite"),
        f.tflite_fp32(f.variant("no_rescale"), name="no_rescale_fp32_tflite"),
        f.slowed_onnx(name="slowed_fp32_onnx"),
    ]
    return f.write_bundle(tmp_path_factory.mktemp("faulty") / "bundle", artifacts)


@pytest.fixture(scope="session")
def faulty_report(faulty_bundle, tmp_path_factory):
    return verify(faulty_bundle, thresholds=LENIENT, report_dir=tmp_path_factory.mktemp("faulty_report"), **FAST)


@pytest.fixture
def bundle_copy(honest_bundle, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(honest_bundle, dst, ignore=shutil.ignore_patterns("verify"))
    return dst


# ---------------------------------------------------------------------------------------------------------------
# honest artifacts pass; every kind of fault fails, naming the check


def test_honest_bundle_passes(honest_bundle, factory):
    report = verify(honest_bundle, thresholds=LENIENT, **FAST)
    assert report.passed, report.failures
    assert [a.name for a in report.artifacts] == ["model_fp32_onnx", "model_fp32_tflite", "model_ptq_int8_tflite"]
    assert report.reference.name == "model_fp32_onnx" and report.reference.kind == "onnx"
    ref_acc = float(np.mean(factory.reference_outputs.argmax(1) == factory.sample_labels))
    assert report.reference.accuracy == pytest.approx(ref_acc)
    by_name = {a.name: a for a in report.artifacts}
    onnx, fp32, int8 = by_name["model_fp32_onnx"], by_name["model_fp32_tflite"], by_name["model_ptq_int8_tflite"]
    assert onnx.is_reference and onnx.latency_ratio == 1.0
    assert onnx.max_abs_diff < 1e-5 and fp32.max_abs_diff < 1e-4
    assert 1e-4 < int8.max_abs_diff < 0.1  # really quantized, still close
    assert int8.top1_agreement >= 0.95
    for art in report.artifacts:
        assert art.latency.runs == FAST["runs"] and 0 < art.latency.p50 <= art.latency.p90 <= art.latency.p99
        assert art.size_bytes == (honest_bundle / art.file).stat().st_size
    assert report.samples == 60


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("perturbed_fp32_tflite", {"max_abs_diff"}),
        ("shuffled_int8_tflite", {"accuracy_drop_pp", "top1_agreement"}),
        ("no_rescale_fp32_tflite", {"max_abs_diff"}),
        ("slowed_fp32_onnx", {"latency_ratio"}),
    ],
)
def test_each_fault_fails_naming_the_check(faulty_report, name, expected):
    art = next(a for a in faulty_report.artifacts if a.name == name)
    assert not art.passed
    failed = {f.split(":")[0] for f in art.failures}
    assert expected <= failed, art.failures
    for failure in art.failures:  # human strings: check, value, threshold
        assert (">" in failure or "<" in failure) and any(ch.isdigit() for ch in failure)
    assert f"{name}: " in " ".join(faulty_report.failures)


def test_faults_do_not_taint_honest_artifacts(faulty_report):
    assert not faulty_report.passed
    honest = {a.name: a for a in faulty_report.artifacts if a.name.startswith("model_")}
    assert len(honest) == 3 and all(a.passed for a in honest.values()), [a.failures for a in honest.values()]
    slowed = next(a for a in faulty_report.artifacts if a.name == "slowed_fp32_onnx")
    assert slowed.latency_ratio > LENIENT.max_latency_ratio
    assert [f.split(":")[0] for f in slowed.failures] == ["latency_ratio"]  # outputs are identical
    assert slowed.max_abs_diff < 1e-5


def test_every_failure_is_collected(faulty_report):
    # one run shows all of them: perturbed 1+, shuffled 2+, no_rescale 1+, slowed 1
    assert len(faulty_report.failures) >= 5


def test_bgr_swapped_sample_is_caught(factory, tmp_path):
    """An exporter that saved the sample in BGR (reference outputs computed on RGB) fails every artifact."""
    bundle = factory.write_bundle(tmp_path / "bgr", images=factory.sample_images[..., ::-1].copy())
    report = verify(bundle, thresholds=LENIENT, **FAST)
    assert not report.passed
    for art in report.artifacts:
        assert any(f.startswith("top1_agreement") for f in art.failures), art.failures


def test_default_thresholds_are_strict(faulty_report):
    t = Thresholds()
    assert (t.max_accuracy_drop, t.min_agreement, t.max_latency_ratio, t.float_tolerance, t.fp16_tolerance) == (
        1.0, 0.95, 1.0, 1e-4, 1e-2,
    )
    assert t.output_tolerance("fp32") == 1e-4 and t.output_tolerance("fp16") == 1e-2
    assert t.output_tolerance("ptq_int8") is None
    rep = faulty_report.to_dict()
    assert rep["thresholds"]["max_latency_ratio"] == LENIENT.max_latency_ratio


@pytest.mark.parametrize(
    "kwargs",
    [{"max_accuracy_drop": -1}, {"min_agreement": 1.5}, {"max_latency_ratio": 0}, {"float_tolerance": float("nan")}],
)
def test_bad_thresholds(kwargs):
    with pytest.raises(ConfigError):
        Thresholds(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# report files


REQUIRED_ARTIFACT_KEYS = {
    "name", "format", "quantization", "runtime", "accuracy", "accuracy_drop_pp", "top1_agreement", "max_abs_diff",
    "mean_abs_diff", "latency_ms", "latency_ratio", "size_bytes", "passed", "failures",
}


def test_report_files(faulty_bundle, tmp_path):
    out = tmp_path / "rep"
    report = verify(faulty_bundle, thresholds=LENIENT, report_dir=out, artifacts=["model_ptq_int8_tflite", "slowed_fp32_onnx"], **FAST)
    data = json.loads((out / "report.json").read_text())
    assert data["passed"] is False and data["passed"] == report.passed
    assert set(data["reference"]) >= {"name", "accuracy", "latency_ms"}
    assert set(data["reference"]["latency_ms"]) >= {"p50", "p90", "p99"}
    assert [a["name"] for a in data["artifacts"]] == ["model_ptq_int8_tflite", "slowed_fp32_onnx"]
    for art in data["artifacts"]:
        assert REQUIRED_ARTIFACT_KEYS <= set(art)
        assert set(art["latency_ms"]) >= {"p50", "p90", "p99"}
    assert set(data["machine"]) >= {"cpu", "threads", "python", "onnxruntime", "ai_edge_litert", "os"}
    assert data["machine"]["threads"] == 1 and data["machine"]["cpu"]
    assert data["samples"] == 60
    assert set(data["thresholds"]) == {"max_accuracy_drop", "min_agreement", "max_latency_ratio", "float_tolerance",
                                       "fp16_tolerance"}
    md = (out / "report.md").read_text()
    assert "| slowed_fp32_onnx |" in md and "latency_ratio" in md and "FAIL" in md
    for png in ("latency.png", "confusion.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*partial*"))  # atomic writes leave no temp files


# ---------------------------------------------------------------------------------------------------------------
# bundle validation


def test_load_bundle_typed(honest_bundle):
    bundle = load_bundle(honest_bundle / "bundle.json")
    assert bundle.labels == ("red", "green", "blue") and bundle.reference == "model_fp32_onnx"
    assert bundle.input.height == 32 and bundle.input.range == (0.0, 255.0)
    assert bundle.sample.images.dtype == np.uint8 and bundle.sample.images.shape == (60, 32, 32, 3)
    int8 = bundle.artifact("model_ptq_int8_tflite")
    assert int8.input_dtype == "uint8" and int8.input_quant is not None and int8.is_int8 and not int8.is_float


@pytest.mark.parametrize("relpath", ["model_fp32_tflite.tflite", "sample/images.npy", "labels.txt"])
def test_tampered_file_is_refused_naming_it(bundle_copy, relpath):
    path = bundle_copy / relpath
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum") as exc:
        load_bundle(bundle_copy)
    assert relpath in exc.value.message


def test_truncated_file_is_refused(bundle_copy):
    path = bundle_copy / "model_fp32_onnx.onnx"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BundleError, match="model_fp32_onnx.onnx"):
        verify(bundle_copy, **FAST)


@pytest.mark.parametrize("bad", ["../outside.tflite", "/etc/passwd", "sample/../../x.npy"])
def test_path_escape_is_refused(bundle_copy, bad):
    (bundle_copy.parent / "outside.tflite").write_bytes(b"x")

    def edit(m):
        m["artifacts"][1]["file"] = bad

    edit_bundle_json(bundle_copy, edit)
    with pytest.raises(BundleError, match="unsafe"):
        load_bundle(bundle_copy)


def test_path_escape_in_files_is_refused(bundle_copy):
    edit_bundle_json(bundle_copy, lambda m: m["files"].update({"../evil": "0" * 64}))
    with pytest.raises(BundleError, match="unsafe"):
        load_bundle(bundle_copy)


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "model_fp32_tflite.tflite").unlink()
    with pytest.raises(BundleError, match=r"model_fp32_tflite\.tflite is missing"):
        load_bundle(bundle_copy)


def test_artifact_without_checksum_is_refused(bundle_copy):
    edit_bundle_json(bundle_copy, lambda m: m["files"].pop("model_fp32_tflite.tflite"))
    with pytest.raises(BundleError, match="no checksum"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("schema", "match"),
    [("edgetl.bundle/2", "newer"), ("edgetl.bundle/0", "older"), ("something.else/1", "not an edgetl bundle"),
     (None, "not an edgetl bundle")],
)
def test_incompatible_schema(bundle_copy, schema, match):
    edit_bundle_json(bundle_copy, lambda m: m.update(schema=schema))
    with pytest.raises(BundleError, match=match):
        load_bundle(bundle_copy)


def test_pickled_sample_is_refused(bundle_copy):
    np.save(bundle_copy / "sample" / "labels.npy", np.array([{"a": 1}] * 60, dtype=object), allow_pickle=True)
    rehash(bundle_copy)
    with pytest.raises(BundleError, match="labels.npy"):
        load_bundle(bundle_copy)


def test_sample_shape_mismatch(bundle_copy):
    np.save(bundle_copy / "sample" / "reference_outputs.npy", np.zeros((60, 4), np.float32))
    rehash(bundle_copy)
    with pytest.raises(BundleError, match="reference_outputs.npy"):
        load_bundle(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        verify(tmp_path / "nope")
    with pytest.raises(BundleError, match="neither a bundle"):
        verify(tmp_path)
    (tmp_path / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path)


def test_reference_must_be_fp32(bundle_copy):
    edit_bundle_json(bundle_copy, lambda m: m.update(reference="model_ptq_int8_tflite"))
    with pytest.raises(BundleError, match="float32"):
        load_bundle(bundle_copy)
    edit_bundle_json(bundle_copy, lambda m: m.update(reference="nope"))
    with pytest.raises(BundleError, match="not one of the artifacts"):
        load_bundle(bundle_copy)


def test_tflite_fp32_reference_when_no_onnx(bundle_copy):
    """export names tflite_fp32 as the reference when no ONNX fp32 was exported."""
    edit_bundle_json(bundle_copy, lambda m: m.update(reference="model_fp32_tflite"))
    report = verify(bundle_copy, thresholds=LENIENT, **FAST)
    assert report.reference.name == "model_fp32_tflite" and report.reference.kind == "tflite"
    assert next(a for a in report.artifacts if a.is_reference).name == "model_fp32_tflite"


# ---------------------------------------------------------------------------------------------------------------
# runners: garbage models, contract claims that contradict the model


@pytest.mark.parametrize("name", ["model_fp32_tflite.tflite", "model_fp32_onnx.onnx"])
def test_garbage_model_with_valid_checksum(bundle_copy, name):
    (bundle_copy / name).write_bytes(b"this is not a model" * 50)
    rehash(bundle_copy)  # the exporter itself wrote garbage: checksums match
    with pytest.raises(ModelFileError, match=name.replace(".", r"\.")) as exc:
        verify(bundle_copy, **FAST)
    assert "\n" not in exc.value.one_line()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("input_quant", [0.5, 0], "input quantization"),
        ("output_quant", [0.00390625, 3], "output quantization"),
    ],
)
def test_wrong_quant_claim_is_refused(bundle_copy, field, value, match):
    def edit(m):
        m["artifacts"][2][field] = value

    edit_bundle_json(bundle_copy, edit)
    with pytest.raises(ModelFileError, match=match):
        verify(bundle_copy, **FAST)


def test_wrong_dtype_claim_is_refused(bundle_copy):
    """The bundle says the int8 model takes float32 0..255; the model really takes uint8."""

    def edit(m):
        m["artifacts"][2].update(input_dtype="float32", input_quant=None)

    edit_bundle_json(bundle_copy, edit)
    with pytest.raises(ModelFileError, match=r"model_ptq_int8_tflite\.tflite.*input dtype is float32.*uint8"):
        verify(bundle_copy, **FAST)


def test_onnx_dtype_claim_is_refused(bundle_copy):
    edit_bundle_json(bundle_copy, lambda m: m["artifacts"][0].update(input_dtype="uint8", input_quant=[1.0, 0]))
    with pytest.raises(ModelFileError, match="input dtype"):
        verify(bundle_copy, **FAST)


def test_bundle_without_float_artifact(factory, tmp_path):
    """Only an int8 artifact and no reference: accuracy/agreement still checked, latency ratio skipped (warned)."""
    bundle = factory.write_bundle(tmp_path / "b", [factory.tflite_int8()], reference=None)
    report = verify(bundle, thresholds=LENIENT, **FAST)
    assert report.passed and report.artifacts[0].latency_ratio is None
    assert report.reference.latency is None
    assert any("latency_ratio was not checked" in w for w in report.warnings)
    with pytest.raises(ConfigError, match="--data"):
        verify(bundle, data=factory.write_image_folder(tmp_path / "data", n=6), **FAST)


def test_metadata_contradicting_the_bundle_is_refused(bundle_copy):
    """bundle.json calls the fp32 TFLite an fp16 one; the artifact's embedded edgetl metadata says fp32."""
    edit_bundle_json(bundle_copy, lambda m: m["artifacts"][1].update(quantization="fp16"))
    with pytest.raises(ModelFileError, match=r"model_fp32_tflite\.tflite.*quantization fp32"):
        verify(bundle_copy, **FAST)


def test_artifact_metadata_contract_is_applied(factory, tmp_path):
    """A model that really takes [-1, 1] passes when its own metadata says so (and fails when it claims 0..255)."""
    f = factory
    honest = f.tflite_fp32(f.variant("no_rescale"), name="minus1_1_tflite", range=[-1, 1])
    lying = f.tflite_fp32(f.variant("no_rescale"), name="lying_tflite")
    bundle = f.write_bundle(tmp_path / "b", [f.onnx_fp32(), honest, lying])
    report = verify(bundle, thresholds=LENIENT, **FAST)
    by_name = {a.name: a for a in report.artifacts}
    assert by_name["minus1_1_tflite"].passed, by_name["minus1_1_tflite"].failures
    assert by_name["minus1_1_tflite"].max_abs_diff < 1e-4
    assert not by_name["lying_tflite"].passed


def _runner(**kw):
    return Runner("x", Path("x"), InputContract(4, 4), 3, **kw)


@settings(max_examples=50, deadline=None)
@given(
    scale=st.floats(0.01, 4.0),
    zero_point=st.integers(-128, 127),
    pixels=st.lists(st.integers(0, 255), min_size=48, max_size=48),
)
def test_input_quantization_contract(scale, zero_point, pixels):
    images = np.array(pixels, np.uint8).reshape(1, 4, 4, 3)
    q = _runner(input_dtype="int8", input_quant=(scale, zero_point)).prepare(images)
    assert q.dtype == np.int8
    expected = np.clip(np.round(images.astype(np.float32) / np.float32(scale)) + zero_point, -128, 127)
    np.testing.assert_array_equal(q, expected)
    f = _runner().prepare(images)
    assert f.dtype == np.float32 and f.max() <= 255 and np.array_equal(f, images.astype(np.float32))


def test_output_dequantization():
    r = _runner(output_dtype="uint8", output_quant=(1 / 256, 0))
    np.testing.assert_allclose(r.finish(np.array([[0, 128, 255]], np.uint8)), [[0, 0.5, 255 / 256]])
    r = _runner(output_dtype="int8", output_quant=(1 / 256, -128))
    np.testing.assert_allclose(r.finish(np.array([[-128, 0, 127]], np.int8)), [[0, 0.5, 255 / 256]])


def test_runner_latency(honest_bundle):
    from edgetl.verify.runners import make_runner

    bundle = load_bundle(honest_bundle)
    runner = make_runner(bundle.artifact("model_ptq_int8_tflite"), bundle.input, bundle.labels, threads=1)
    times = runner.latency(bundle.sample.images[0], warmup=2, runs=7)
    assert times.shape == (7,) and np.all(times > 0)
    probs = runner.predict(bundle.sample.images[:5])
    assert probs.dtype == np.float32 and probs.shape == (5, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=0.05)


# ---------------------------------------------------------------------------------------------------------------
# options: --only, --data, run directories


def test_only(honest_bundle):
    report = verify(honest_bundle, artifacts=["model_fp32_tflite"], thresholds=LENIENT, **FAST)
    assert [a.name for a in report.artifacts] == ["model_fp32_tflite"]
    assert report.reference.name == "model_fp32_onnx" and report.reference.latency is not None
    with pytest.raises(ConfigError, match="no artifact named nope"):
        verify(honest_bundle, artifacts=["nope"], **FAST)


def test_data_folder(honest_bundle, factory, tmp_path):
    data = factory.write_image_folder(tmp_path / "data", n=30)
    report = verify(honest_bundle, data=data, thresholds=LENIENT, **FAST)
    assert report.samples == 30 and report.data == str(data)
    assert report.passed, report.failures
    assert report.reference.outputs_source.startswith("model_fp32_onnx")
    ref = next(a for a in report.artifacts if a.is_reference)
    assert ref.max_abs_diff == 0.0 and ref.top1_agreement == 1.0
    (data / "purple").mkdir()
    with pytest.raises(DataError, match="purple"):
        verify(honest_bundle, data=data, **FAST)


def test_run_directory_uses_the_keras_original(factory, tmp_path):
    run = factory.write_run(tmp_path / "run")
    report = verify(run, thresholds=LENIENT, **FAST)
    assert report.reference.kind == "keras" and report.reference.name == "float.keras"
    assert report.reference.latency is not None and report.reference.latency.p50 > 0
    assert report.passed, report.failures
    assert not any(a.is_reference for a in report.artifacts)
    assert all(a.latency_ratio is not None for a in report.artifacts)


def test_run_directory_without_export(factory, tmp_path):
    run = factory.write_run(tmp_path / "run")
    shutil.rmtree(run / "export")
    with pytest.raises(RunDirError, match="edgetl export"):
        verify(run, **FAST)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _cli(*args):
    from typer.testing import CliRunner

    from edgetl.cli import app

    result = CliRunner().invoke(app, ["verify", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


LENIENT_FLAGS = ["--max-latency-ratio", "8", "--max-accuracy-drop", "2", "--runs", "20", "--warmup", "2"]


def test_cli_pass_exit_0(honest_bundle, tmp_path):
    code, out, err = _cli(honest_bundle, *LENIENT_FLAGS, "--report", tmp_path / "r")
    assert code == 0, out + err
    assert "PASS" in out and "all checks passed" in out
    assert (tmp_path / "r" / "report.json").is_file()


def test_cli_fail_exit_1_json(faulty_bundle, tmp_path):
    code, out, err = _cli(faulty_bundle, *LENIENT_FLAGS, "--json", "--report", tmp_path / "r")
    assert code == 1
    data = json.loads(out)  # stdout is only the JSON
    assert data["passed"] is False
    failed = {a["name"] for a in data["artifacts"] if not a["passed"]}
    assert failed == {"perturbed_fp32_tflite", "shuffled_int8_tflite", "no_rescale_fp32_tflite", "slowed_fp32_onnx"}
    assert "latency_ratio" in err  # the failure list is on stderr


def test_cli_default_report_dir_and_only(bundle_copy):
    code, out, err = _cli(bundle_copy, *LENIENT_FLAGS, "--only", "model_fp32_tflite", "--threads", "2")
    assert code == 0, out + err
    data = json.loads((bundle_copy / "verify" / "report.json").read_text())
    assert [a["name"] for a in data["artifacts"]] == ["model_fp32_tflite"] and data["machine"]["threads"] == 2
    assert load_bundle(bundle_copy)  # the report folder inside the bundle does not break it


def test_cli_unwritable_default_report_dir_still_gives_the_verdict(bundle_copy, tmp_path):
    (bundle_copy / "verify").write_text("a file where the report folder would go")  # like a read-only bundle
    code, out, err = _cli(bundle_copy, *LENIENT_FLAGS, "--only", "model_fp32_tflite")
    assert code == 0, out + err
    assert "reports were not written" in out
    code, out, err = _cli(bundle_copy, *LENIENT_FLAGS, "--report", bundle_copy / "verify")
    assert code == 2 and "--report" in err


def test_cli_bad_input_exit_2(bundle_copy, tmp_path):
    code, _, err = _cli(tmp_path / "missing")
    assert code == 2 and "does not exist" in err
    (bundle_copy / "sample" / "images.npy").write_bytes(b"tampered")
    code, out, err = _cli(bundle_copy, "--json")
    assert code == 2 and "sample/images.npy" in err and out == ""
    assert len(err.strip().splitlines()) == 1
    code, _, err = _cli(bundle_copy, "--min-agreement", "2")
    assert code == 2


def test_cli_help():
    from typer.testing import CliRunner

    from edgetl.cli import app

    result = CliRunner().invoke(app, ["verify", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--data", "--threads", "--runs", "--warmup", "--max-accuracy-drop", "--min-agreement",
                 "--max-latency-ratio", "--float-tolerance", "--fp16-tolerance", "--report", "--json", "--only"):
        assert flag in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# the device path never imports TensorFlow


def test_cli_and_verify_import_no_tensorflow():
    code = "import sys, edgetl.cli, edgetl.verify; sys.exit(1 if 'tensorflow' in sys.modules else 0)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_verifying_a_bundle_imports_no_tensorflow(honest_bundle, tmp_path):
    code = (
        "import sys\n"
        "from edgetl.verify import verify, Thresholds\n"
        f"r = verify({str(honest_bundle)!r}, runs=5, warmup=1, report_dir={str(tmp_path / 'r')!r},"
        " thresholds=Thresholds(max_latency_ratio=8, max_accuracy_drop=2))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras'))\n"
        "print(r.passed, bad)\n"
        "sys.exit(0 if r.passed and not bad else 1)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
