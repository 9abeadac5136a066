"""edgetl verify: bundle validation, runners, checks, report files and the CLI, on real tiny artifacts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
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
# The tiny model runs in ~20 us, so per-call overhead dominates and its int8 TFLite is ~2x its fp32 TFLite; the
# slowed artifact is ~50x. 60 images with no flipped prediction still give a +-5.8 pp interval for the accuracy drop,
# so the honest artifacts are INCONCLUSIVE at the default 2 pp margin and pass at 10 pp.
LENIENT = Thresholds(max_latency_ratio=8.0, margin_pp=10.0)


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
        f.slowed_onnx(name="slowed_int8_onnx", quantization="ort_static_int8"),
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
    assert report.reference.name == "reference_outputs.npy" and report.reference.kind == "bundle"
    assert report.verdict == "PASS" and report.exit_code == 0
    ref_acc = float(np.mean(factory.reference_outputs.argmax(1) == factory.sample_labels))
    assert report.reference.accuracy == pytest.approx(ref_acc)
    by_name = {a.name: a for a in report.artifacts}
    onnx, fp32, int8 = by_name["model_fp32_onnx"], by_name["model_fp32_tflite"], by_name["model_ptq_int8_tflite"]
    assert onnx.is_reference and onnx.latency_ratio is None and fp32.latency_ratio is None
    assert onnx.max_abs_diff < 1e-5 and fp32.max_abs_diff < 1e-4
    assert 1e-4 < int8.max_abs_diff < 0.1  # really quantized, still close
    assert int8.top1_agreement >= 0.95 and int8.source == "float.keras"
    assert int8.latency_baseline == "model_fp32_tflite"  # the same runtime's fp32, not the ONNX reference
    assert 0.3 * int8.latency.p50 / fp32.latency.p50 < int8.latency_ratio < 3 * int8.latency.p50 / fp32.latency.p50
    for art in report.artifacts:
        assert art.latency.runs == FAST["runs"] and 0 < art.latency.p50 <= art.latency.p90 <= art.latency.p99
        assert art.size_bytes == (honest_bundle / art.file).stat().st_size
    assert report.samples == 60


def test_paired_ratio_ignores_rounds_a_neighbour_slowed():
    from edgetl.verify import paired_ratio

    base = np.ones(100)
    art = np.full(100, 0.8)
    base[30:40] *= 5  # one round where only the baseline's block was hit by load: the p50 ratio barely moves
    art[60:80] *= 3  # two rounds where the artifact's blocks were hit
    assert paired_ratio(art, base) == pytest.approx(0.8)
    base[:] = 1.0
    art[:] = 1.3  # really slower in every round
    assert paired_ratio(art, base) == pytest.approx(1.3)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("perturbed_fp32_tflite", {"fidelity"}),
        ("shuffled_int8_tflite", {"accuracy", "fidelity"}),
        ("no_rescale_fp32_tflite", {"fidelity"}),
        ("slowed_int8_onnx", {"latency"}),
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
    slowed = next(a for a in faulty_report.artifacts if a.name == "slowed_int8_onnx")
    assert slowed.latency_ratio > LENIENT.latency_limit and slowed.latency_baseline == "model_fp32_onnx"
    assert [f.split(":")[0] for f in slowed.failures] == ["latency"]  # outputs are identical
    assert slowed.max_abs_diff < 1e-5


def test_every_failure_is_collected(faulty_report):
    # one run shows all of them: perturbed 1+, shuffled 3+ (agreement, mean |dp|, accuracy), no_rescale 1+, slowed 1
    assert len(faulty_report.failures) >= 6


def test_bgr_swapped_sample_is_caught(factory, tmp_path):
    """An exporter that saved the sample in BGR (reference outputs computed on RGB) fails every artifact."""
    bundle = factory.write_bundle(tmp_path / "bgr", images=factory.sample_images[..., ::-1].copy())
    report = verify(bundle, thresholds=LENIENT, **FAST)
    assert not report.passed
    for art in report.artifacts:
        assert any(f.startswith("fidelity") for f in art.failures), art.failures


def test_default_thresholds_are_strict(faulty_report):
    t = Thresholds()
    assert (
        t.margin_pp,
        t.confidence,
        t.min_agreement,
        t.max_mean_diff,
        t.max_latency_ratio,
        t.latency_noise,
        t.float_tolerance,
        t.fp16_tolerance,
        t.max_p50_ms,
        t.max_p99_ms,
    ) == (
        2.0,
        0.95,
        0.70,
        0.06,
        1.0,
        0.10,
        1e-4,
        1e-2,
        None,
        None,
    )
    assert t.output_tolerance("fp32") == 1e-4 and t.output_tolerance("fp16") == 1e-2
    assert t.output_tolerance("ptq_int8") is None and t.latency_limit == pytest.approx(1.1)
    rep = faulty_report.to_dict()
    assert rep["thresholds"]["max_latency_ratio"] == LENIENT.max_latency_ratio


@pytest.mark.parametrize(
    "kwargs",
    [
        {"margin_pp": -1},
        {"min_agreement": 1.5},
        {"max_latency_ratio": 0},
        {"float_tolerance": float("nan")},
        {"confidence": 1.0},
        {"max_p50_ms": 0},
        {"max_mean_diff": -0.1},
    ],
)
def test_bad_thresholds(kwargs):
    with pytest.raises(ConfigError):
        Thresholds(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# report files


REQUIRED_ARTIFACT_KEYS = {
    "name",
    "format",
    "quantization",
    "runtime",
    "source",
    "accuracy",
    "accuracy_drop_pp",
    "accuracy_test",
    "top1_agreement",
    "max_abs_diff",
    "mean_abs_diff",
    "latency_ms",
    "latency_ratio",
    "latency_baseline",
    "size_bytes",
    "per_class",
    "verdict",
    "passed",
    "failures",
    "inconclusive",
}


def test_report_files(faulty_bundle, tmp_path):
    out = tmp_path / "rep"
    report = verify(
        faulty_bundle,
        thresholds=LENIENT,
        report_dir=out,
        artifacts=["model_ptq_int8_tflite", "slowed_int8_onnx"],
        **FAST,
    )
    data = json.loads((out / "report.json").read_text())
    assert data["passed"] is False and data["passed"] == report.passed
    assert data["verdict"] == "FAIL" and data["exit_code"] == 1
    assert set(data["reference"]) >= {"name", "accuracy", "latency_ms", "outputs_source"}
    assert [a["name"] for a in data["artifacts"]] == ["model_ptq_int8_tflite", "slowed_int8_onnx"]
    for art in data["artifacts"]:
        assert REQUIRED_ARTIFACT_KEYS <= set(art)
        assert set(art["latency_ms"]) >= {"p50", "p90", "p99"}
    assert set(data["machine"]) >= {"cpu", "threads", "python", "onnxruntime", "ai_edge_litert", "os"}
    assert data["machine"]["threads"] == 1 and data["machine"]["cpu"]
    assert data["samples"] == 60
    assert set(data["thresholds"]) == {
        "margin_pp",
        "confidence",
        "fail_confidence",
        "min_agreement",
        "max_mean_diff",
        "max_latency_ratio",
        "latency_noise",
        "float_tolerance",
        "fp16_tolerance",
        "max_p50_ms",
        "max_p99_ms",
    }
    int8 = data["artifacts"][0]
    confusion = np.array(int8["per_class"]["confusion"])
    assert confusion.shape == (3, 3) and confusion.sum() == 60
    assert set(int8["per_class"]["classes"]) == {"red", "green", "blue"}
    assert int8["accuracy_test"]["n"] == 60 and int8["accuracy_test"]["ci_low_pp"] < int8["accuracy_test"]["ci_high_pp"]
    assert data["reference_per_class"]["confusion"]
    md = (out / "report.md").read_text()
    assert "| slowed_int8_onnx |" in md and "latency: p50" in md and "FAIL" in md
    assert "## Per class (precision / recall)" in md and "Misclassified by" in md
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
    [
        ("edgetl.bundle/2", "newer"),
        ("edgetl.bundle/0", "older"),
        ("something.else/1", "not an edgetl bundle"),
        (None, "not an edgetl bundle"),
    ],
)
def test_incompatible_schema(bundle_copy, schema, match):
    edit_bundle_json(bundle_copy, lambda m: m.update(schema=schema))
    with pytest.raises(BundleError, match=match):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        (
            lambda m: m["artifacts"][0].update(quantization="int4"),
            "`artifacts[0].quantization` should be 'fp32', 'fp16'",
        ),
        (
            lambda m: m["artifacts"][2].update(input_quant=None),
            "`artifacts[2]` artifact 'model_ptq_int8_tflite' has a uint8",
        ),
        (lambda m: m["input"].update(range=[0, True]), "`input.range[1]` should be a valid number (got True)"),
        (lambda m: m["sample"].pop("labels"), "`sample.labels` is missing"),
        (lambda m: m["files"].update({"labels.txt": "abc"}), "`files.labels.txt` is not a sha256 hex digest"),
    ],
)
def test_schema_error_names_the_field(bundle_copy, edit, expect):
    """bundle.json is read with edgetl.schema.Bundle: the first problem, as one line naming the field."""
    edit_bundle_json(bundle_copy, edit)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    assert info.value.message.startswith("bundle.json: ") and expect in info.value.message, info.value.message


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
    assert next(a for a in report.artifacts if a.is_reference).name == "model_fp32_tflite"
    data = get_factory().write_image_folder(bundle_copy.parent / "data", n=12)
    report = verify(bundle_copy, data=data, thresholds=LENIENT, **FAST)  # the float model's stand-in on --data
    assert report.reference.name == "model_fp32_tflite" and report.reference.kind == "tflite"


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
    assert any("latency ratio not checked" in w for w in report.warnings)
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
    return Runner("x", Path("x"), InputContract(height=4, width=4), 3, **kw)


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
    report = verify(honest_bundle, artifacts=["model_ptq_int8_tflite"], thresholds=LENIENT, **FAST)
    assert [a.name for a in report.artifacts] == ["model_ptq_int8_tflite"]
    art = report.artifacts[0]  # its latency baseline is timed even though it was not selected
    assert art.latency_baseline == "model_fp32_tflite" and art.latency_ratio is not None and art.latency_ratio > 0
    with pytest.raises(ConfigError, match="no artifact named nope"):
        verify(honest_bundle, artifacts=["nope"], **FAST)


def test_data_folder(honest_bundle, factory, tmp_path):
    data = factory.write_image_folder(tmp_path / "data", n=30)
    report = verify(honest_bundle, data=data, thresholds=LENIENT, **FAST)
    assert report.samples == 30 and report.data == str(data)
    assert report.passed, report.failures
    assert report.reference.outputs_source.startswith("model_fp32_onnx")
    ref = next(a for a in report.artifacts if a.is_reference)
    assert ref.max_abs_diff < 1e-5 and ref.top1_agreement == 1.0  # fidelity: on the bundle sample
    assert report.artifacts[0].per_class["confusion"] and np.sum(report.artifacts[0].per_class["confusion"]) == 30
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
    assert [a.name for a in report.artifacts if a.latency_ratio is not None] == ["model_ptq_int8_tflite"]
    assert any("not reachable" in w for w in report.warnings) and report.data == "bundle sample"


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


LENIENT_FLAGS = ["--max-latency-ratio", "8", "--margin-pp", "10", "--runs", "20", "--warmup", "2"]


def test_cli_pass_exit_0(honest_bundle, tmp_path):
    code, out, err = _cli(honest_bundle, *LENIENT_FLAGS, "--report", tmp_path / "r")
    assert code == 0, out + err
    assert "PASS" in out and "all checks passed" in out and "INCONCLUSIVE" not in out
    assert (tmp_path / "r" / "report.json").is_file()


def test_cli_fail_exit_1_json(faulty_bundle, tmp_path):
    code, out, err = _cli(faulty_bundle, *LENIENT_FLAGS, "--json", "--report", tmp_path / "r")
    assert code == 1
    data = json.loads(out)  # stdout is only the JSON
    assert data["passed"] is False
    failed = {a["name"] for a in data["artifacts"] if not a["passed"]}
    assert failed == {"perturbed_fp32_tflite", "shuffled_int8_tflite", "no_rescale_fp32_tflite", "slowed_int8_onnx"}
    assert "latency: p50" in err  # the failure list is on stderr


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
    assert "reports were not written" in " ".join(out.split())  # the console wraps long lines where it likes
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


def test_cli_threads_side_by_side(bundle_copy, tmp_path):
    """--threads 2,1: every model timed at both counts in one run, one column each; the checks use the first."""
    code, out, err = _cli(bundle_copy, *LENIENT_FLAGS, "--threads", "2,1", "--json", "--report", tmp_path / "r")
    assert code == 0, out + err
    data = json.loads(out)
    assert data["machine"]["threads"] == 2 and data["machine"]["threads_timed"] == [2, 1]
    for a in data["artifacts"]:
        assert set(a["latency_ms_by_threads"]) == {"2", "1"}
        assert all(s["runs"] == 20 and s["p50"] > 0 for s in a["latency_ms_by_threads"].values())
        assert a["latency_ms"] == a["latency_ms_by_threads"]["2"]  # the deployment count's figures are the verdict's
    int8 = next(a for a in data["artifacts"] if a["name"] == "model_ptq_int8_tflite")
    assert set(int8["latency_ratio_by_threads"]) == {"2", "1"}
    assert int8["latency_ratio"] == int8["latency_ratio_by_threads"]["2"]
    md = (tmp_path / "r" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| artifact"))
    for column in ("p50 ms @2t", "int8/fp32 @2t", "p50 ms @1t", "int8/fp32 @1t"):
        assert column in header
    assert "threads 2 (the deployment count: the latency check uses it); also timed at 1" in md
    row = next(line for line in md.splitlines() if line.startswith("| model_ptq_int8_tflite"))
    assert len(row.split("|")) == len(header.split("|"))


def test_threads_sweep_is_what_the_latency_check_reads(honest_bundle):
    report = verify(
        honest_bundle,
        threads="1,2",
        thresholds=replace(LENIENT, max_latency_ratio=1e-3),
        runs=20,
        warmup=2,
        artifacts=["model_ptq_int8_tflite"],
    )
    (int8,) = report.artifacts
    assert int8.latency_ratio == int8.latency_ratio_by_threads[1] and 2 in int8.latency_ratio_by_threads
    assert any(f.startswith("latency: p50") for f in int8.failures)


@pytest.mark.parametrize("value", ["0", "two", "1,-2", ","])
def test_cli_bad_threads_exit_2(bundle_copy, tmp_path, value):
    code, out, err = _cli(bundle_copy, "--threads", value, "--report", tmp_path / "r")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--threads" in err and "--threads 1,all" in err
    assert not (tmp_path / "r").exists()


def test_cli_bad_runtime_exit_2(bundle_copy, tmp_path):
    code, out, err = _cli(bundle_copy, "--runtime", "tensorrt", "--report", tmp_path / "r")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "onnxruntime or openvino" in err
    code, out, err = _cli(
        bundle_copy, "--runtime", "openvino", "--only", "model_fp32_tflite", "--report", tmp_path / "r"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no ONNX artifact" in err
    assert not (tmp_path / "r").exists()


def test_cli_runtime_openvino_not_installed_exit_2(bundle_copy, tmp_path):
    code = (
        "import sys; sys.modules['openvino'] = None\n"  # what Python does when the package is absent
        "from edgetl.cli import app; app(['verify', sys.argv[1], '--runtime', 'openvino', '--report', sys.argv[2]])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(bundle_copy), str(tmp_path / "r")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (
        proc.stderr.strip() == "error: --runtime openvino: OpenVINO is not installed; pip install 'edgetl[openvino]'."
    )
    assert not (tmp_path / "r").exists()


def test_cli_help():
    from typer.testing import CliRunner

    from edgetl.cli import app

    result = CliRunner().invoke(app, ["verify", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in (
        "--data",
        "--threads",
        "--runs",
        "--warmup",
        "--margin-pp",
        "--confidence",
        "--min-agreement",
        "--max-mean-diff",
        "--max-latency-ratio",
        "--latency-noise",
        "--max-p50-ms",
        "--max-p99-ms",
        "--float-tolerance",
        "--fp16-tolerance",
        "--report",
        "--json",
        "--only",
        "--bundle-sample",
        "--runtime",
    ):
        assert flag in result.stdout
    assert "4 INCONCLUSIVE" in " ".join(result.stdout.split())


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
        " thresholds=Thresholds(max_latency_ratio=8, margin_pp=10))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras'))\n"
        "print(r.passed, bad)\n"
        "sys.exit(0 if r.passed and not bad else 1)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# the three checks, one at a time (each test fails when its check is broken)


def test_paired_accuracy_interval_and_verdicts():
    from edgetl.verify.checks import paired_accuracy

    y = np.zeros(300, np.int64)
    same = paired_accuracy(y, y, y, margin_pp=2.0, confidence=0.95)
    z2 = 1.959964**2  # all right, no discordant pair: Wilson's bound z^2/(n+z^2) on each side
    assert same.ci_high_pp == pytest.approx(100 * z2 / (300 + z2), abs=1e-3) == -same.ci_low_pp
    assert same.verdict == "PASS" and same.drop_pp == 0.0
    small = paired_accuracy(y[:60], y[:60], y[:60], margin_pp=2.0, confidence=0.95)
    assert small.verdict == "INCONCLUSIVE" and small.ci_high_pp > 5  # 60 images cannot show a 2 pp margin
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 1000)
    ref = labels.copy()
    ref[:100] = (ref[:100] + 1) % 3  # float model 90% right
    art = ref.copy()
    art[100:200] = (art[100:200] + 1) % 3  # the artifact breaks 100 more: a 10 pp drop
    bad = paired_accuracy(ref, art, labels, margin_pp=2.0, confidence=0.95)
    assert bad.only_reference_right == 100 and bad.only_artifact_right == 0
    assert bad.drop_pp == pytest.approx(10.0) and 2.0 < bad.ci_low_pp < 10.0 < bad.ci_high_pp and bad.verdict == "FAIL"
    better = paired_accuracy(ref, labels, labels, margin_pp=2.0, confidence=0.95)  # the artifact fixes 100
    assert better.drop_pp == pytest.approx(-10.0) and better.verdict == "PASS"
    wider = paired_accuracy(ref, art, labels, margin_pp=2.0, confidence=0.99)
    assert wider.ci_high_pp - wider.ci_low_pp > bad.ci_high_pp - bad.ci_low_pp


def test_a_fail_needs_the_stricter_level_so_thin_noisy_evidence_is_inconclusive():
    """The verdict matrix's one false FAIL at 0.95 for both: flowers, 60 images, the QAT int8 file broke 8 and fixed
    1 (lower end +2.34 pp > 2), yet on the 4,017 images that run never saw it was 0.05 pp below the float model."""
    from edgetl.verify.checks import paired_accuracy

    def counts(a, b, c, d):  # both right, only the float model right, only the artifact right, neither
        labels = np.zeros(a + b + c + d, np.int64)
        ref = np.array([0] * a + [0] * b + [1] * c + [1] * d)
        art = np.array([0] * a + [1] * b + [0] * c + [1] * d)
        return ref, art, labels

    t = Thresholds()
    assert (t.confidence, t.fail_confidence) == (0.95, 0.998)
    flowers = counts(28, 8, 1, 23)
    old = paired_accuracy(*flowers, margin_pp=2.0, confidence=0.95)
    assert old.verdict == "FAIL" and old.ci_low_pp == pytest.approx(2.339, abs=1e-3)
    now = paired_accuracy(*flowers, margin_pp=2.0, confidence=t.confidence, fail_confidence=t.fail_confidence)
    assert now.verdict == "INCONCLUSIVE" and now.fail_low_pp < 2.0 < now.ci_low_pp
    assert (now.ci_low_pp, now.ci_high_pp) == (old.ci_low_pp, old.ci_high_pp)  # the printed 95% interval is unchanged
    # a real loss is still a FAIL at the stricter level: 30 of 60 broken, or 8 broken / 1 fixed on 600 images
    gross = paired_accuracy(*counts(6, 30, 0, 24), margin_pp=2.0, confidence=0.95, fail_confidence=0.998)
    assert gross.verdict == "FAIL" and gross.fail_low_pp > 2.0
    many = paired_accuracy(*counts(280, 80, 10, 230), margin_pp=2.0, confidence=0.95, fail_confidence=0.998)
    assert many.verdict == "FAIL"
    with pytest.raises(ConfigError, match="--fail-confidence must be in"):
        Thresholds(fail_confidence=0.9)  # below --confidence


def _result(quantization="qat_int8", **kw):
    from edgetl.verify.checks import ArtifactResult, LatencyStats

    base = dict(
        name="a",
        file="a",
        format="tflite",
        quantization=quantization,
        runtime="r",
        accuracy=0.9,
        accuracy_drop_pp=0.0,
        top1_agreement=1.0,
        max_abs_diff=0.01,
        mean_abs_diff=0.001,
        latency=LatencyStats(1.0, 1.0, 1.2, 1.0, 10),
        latency_ratio=1.0,
        size_bytes=1,
        latency_baseline="tflite_fp32",
    )
    base.update(kw)
    return ArtifactResult(**base)


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({}, set()),
        ({"top1_agreement": 0.69}, {"fidelity"}),
        ({"top1_agreement": 0.71}, set()),
        ({"mean_abs_diff": 0.07}, {"fidelity"}),
        ({"max_abs_diff": 0.5}, set()),  # int8: max |dp| alone is not a fidelity failure
        ({"quantization": "fp32", "max_abs_diff": 2e-4, "latency_ratio": None}, {"fidelity"}),
        ({"quantization": "fp16", "max_abs_diff": 5e-3, "latency_ratio": None}, set()),
        ({"quantization": "fp16", "max_abs_diff": 2e-2, "latency_ratio": None}, {"fidelity"}),
        ({"latency_ratio": 1.09}, set()),  # inside the 10% noise allowance
        ({"latency_ratio": 1.11}, {"latency"}),
        ({"max_abs_diff": float("nan"), "mean_abs_diff": float("nan")}, {"fidelity"}),
    ],
)
def test_check_names_the_failed_check(kw, named):
    from edgetl.verify.checks import check

    failures, undecided = check(_result(**kw), Thresholds())
    assert {f.split(":")[0] for f in failures} == named, failures
    assert not undecided


def test_unchecked_fidelity_is_inconclusive_not_a_nan_failure():
    """A bundle from an older export carries no qat.h5 outputs: fidelity is 'not checked' (INCONCLUSIVE), not FAIL."""
    from edgetl.verify.checks import check

    nan = float("nan")
    note = "fidelity: not checked: the bundle carries no qat.h5 outputs (exported by an older edgetl; re-export it)"
    result = _result(max_abs_diff=nan, mean_abs_diff=nan, inconclusive=[note])
    assert check(result, Thresholds()) == ([], [])
    result.inconclusive.clear()  # without that note, NaN differences still fail
    assert [f.split(":")[0] for f in check(result, Thresholds())[0]] == ["fidelity"]


def test_latency_budgets():
    from edgetl.verify.checks import check

    failures, _ = check(_result(latency_ratio=None), Thresholds(max_p50_ms=0.5, max_p99_ms=1.1))
    assert [f.split(":")[0] for f in failures] == ["latency budget", "latency budget"]
    assert "--max-p50-ms 0.5" in failures[0] and "--max-p99-ms 1.1" in failures[1]
    assert check(_result(latency_ratio=None), Thresholds(max_p50_ms=2, max_p99_ms=2))[0] == []


def test_qat_artifact_is_checked_against_the_qat_model(factory, tmp_path):
    """A QAT int8 file is compared with the QAT model's stored outputs, not float.keras's (the issue's false FAIL)."""
    qat_model = factory.variant("perturbed")  # stands in for a QAT model that differs from the float model
    qat_outputs = factory.predict(qat_model, factory.sample_images)
    art = replace(factory.tflite_int8(qat_model, name="qat_like_int8_tflite"), source="qat.h5")
    bundle = factory.write_bundle(
        tmp_path / "b", [factory.tflite_fp32(), art], reference="model_fp32_tflite", qat_outputs=qat_outputs
    )
    report = verify(bundle, thresholds=LENIENT, **FAST)
    result = next(a for a in report.artifacts if a.name == "qat_like_int8_tflite")
    assert result.source == "qat.h5" and not any(f.startswith("fidelity") for f in result.failures), result.failures
    own = np.mean(result.predictions.argmax(1) == qat_outputs.argmax(1))
    assert result.top1_agreement == pytest.approx(own)
    # the same file judged against float.keras (its bundle claims the float model as its source) is not as close
    edit_bundle_json(bundle, lambda m: m["artifacts"][1].update(source="float.keras"))
    rehash(bundle)
    against_float = next(a for a in verify(bundle, thresholds=LENIENT, **FAST).artifacts if a.name == art.name)
    assert against_float.mean_abs_diff > 5 * result.mean_abs_diff
    # an old bundle without QAT outputs: fidelity is not checked, and the verdict says so (inconclusive)
    old = factory.write_bundle(tmp_path / "old", [factory.tflite_fp32(), art], reference="model_fp32_tflite")
    undecided = next(a for a in verify(old, thresholds=LENIENT, **FAST).artifacts if a.name == art.name).inconclusive
    assert any("fidelity: not checked" in u for u in undecided)


def test_inconclusive_exit_4(honest_bundle, tmp_path):
    code, out, err = _cli(
        honest_bundle, "--max-latency-ratio", "8", "--runs", "10", "--warmup", "1", "--json", "--report", tmp_path / "r"
    )
    data = json.loads(out)
    assert code == 4 and data["verdict"] == "INCONCLUSIVE" and data["exit_code"] == 4 and not data["failures"]
    assert all("inconclusive: 60 images" in item and "--data DIR" in item for item in data["inconclusive"])


def test_defaults_live_in_one_place():
    """The recipe's verify section and the CLI flags take their defaults from Thresholds."""
    from typer.testing import CliRunner

    from edgetl.cli import app
    from edgetl.config import VerifyConfig

    assert VerifyConfig().thresholds() == Thresholds()
    assert VerifyConfig(margin_pp=5.0).thresholds() == Thresholds(margin_pp=5.0)
    text = " ".join(CliRunner().invoke(app, ["verify", "--help"], env={"COLUMNS": "300"}).stdout.split())
    assert "--margin-pp PP" in text and f"[default: {Thresholds().margin_pp}]" in text
