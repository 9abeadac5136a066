"""The backbone table, freeze policies (which layers train) and weights resolution."""

from __future__ import annotations

import numpy as np
import pytest

from edgetl.backbones import BACKBONES, check_image_size, get_backbone
from edgetl.errors import ConfigError, WeightsError
from edgetl.finetune import apply_freeze, auto_freeze_point, build_classifier, decide_freeze, get_base
from edgetl.weights import ENV_VAR, WeightsChoice, resolve_weights

NONE = WeightsChoice("none", None)


@pytest.fixture(scope="module")
def small():
    b = get_backbone("mobilenet_v3_small")
    model, base = build_classifier(b, 32, 3, NONE, 0.2)
    return b, model, base


def narrow(b):
    """EfficientNet-B7 with width 0.1 instead of 2.0: the same 800 layers and layer names (they depend on the depth
    coefficient only), 0.4M instead of 64M weights (the real one takes ~1 min to build on 2 cores)."""
    import dataclasses

    from tf_keras.src.applications import efficientnet

    from edgetl.backbones import Backbone

    assert b.keras_class == "EfficientNetB7"

    class Narrow(Backbone):
        def build_base(self, image_size, weights):
            return efficientnet.EfficientNet(
                0.1,
                3.1,
                600,
                0.5,
                model_name="efficientnetb7",
                include_top=False,
                weights=weights,
                input_shape=(image_size, image_size, 3),
            )

    return Narrow(**{f.name: getattr(b, f.name) for f in dataclasses.fields(Backbone)})


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_table_row_builds_with_its_freeze_points(name):
    b = BACKBONES[name]
    model, base = build_classifier(narrow(b) if name == "efficientnet_b7" else b, 32, 4, NONE, 0.1)
    names = [layer.name for layer in base.layers]
    for point, layer in b.freeze_points.items():
        assert layer in names, f"{name}: freeze point {point}={layer} is not a layer"
    idx = [names.index(b.freeze_points[p]) for p in ("early", "mid", "late")]
    assert idx == sorted(idx) and len(set(idx)) == 3
    out = model(np.full((1, 32, 32, 3), 127.0, np.float32)).numpy()
    assert out.shape == (1, 4) and abs(out.sum() - 1) < 1e-5
    assert get_base(model) is base


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_caffe_preprocessing_is_inside_the_model_and_stays_frozen(name):
    """VGG16/ResNet50 get Keras's own caffe-style preprocess_input (RGB->BGR, minus the ImageNet mean, no scaling)
    as a layer of the model, bit for bit; it never trains (whatever --freeze says) and the BatchNorm recalibration
    of a random backbone sees the preprocessed images."""
    from edgetl._tfenv import keras
    from edgetl.finetune import base_inputs

    k = keras()
    b = get_backbone(name)
    model, base = build_classifier(b, 32, 3, NONE, 0.1)
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    keras_pre = getattr(k.applications, name).preprocess_input(x.copy())
    np.testing.assert_array_equal(base_inputs(model, x), keras_pre)
    pre = model.get_layer("input_preprocess")
    apply_freeze(base, decide_freeze(b, base, "none", 50, "similar"))
    assert pre.trainable is False and not pre.trainable_weights
    if name == "vgg16":  # the other front layer: mobilenet_v2's input_rescale
        v2, _ = build_classifier(get_backbone("mobilenet_v2"), 32, 3, NONE, 0.1)
        np.testing.assert_allclose(base_inputs(v2, x), x / 127.5 - 1.0, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet50", "vgg16", "efficientnet_b7"])
def test_imagenet_weights_are_found_by_keras_file_name(name, monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("EDGETL_OFFLINE", "1")
    b = get_backbone(name)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(WeightsError, match=b.weight_files[1].replace(".", r"\.")):
        resolve_weights(b, "imagenet", 224)
    (tmp_path / b.weight_files[1]).write_bytes(b"")
    assert resolve_weights(b, "imagenet", 224).path == (tmp_path / b.weight_files[1]).resolve()


def _trainable(base):
    return [layer.trainable for layer in base.layers]


def test_freeze_all_none_point_fraction_and_layer(small):
    b, _, base = small
    names = [layer.name for layer in base.layers]
    d = decide_freeze(b, base, "all", 50, "similar")
    info = apply_freeze(base, d)
    assert not any(_trainable(base)) and info["trainable_layers"] == 0 and info["frozen_layers"] > 0

    info = apply_freeze(base, decide_freeze(b, base, "none", 50, "similar"))
    assert all(_trainable(base)) and info["frozen_layers"] == 0

    info = apply_freeze(base, decide_freeze(b, base, "mid", 50, "similar"))
    k = names.index("expanded_conv_5/Add")
    assert not any(_trainable(base)[: k + 1]) and all(_trainable(base)[k + 1 :])
    assert info["boundary_layer"] == "expanded_conv_5/Add"

    apply_freeze(base, decide_freeze(b, base, "0.5", 50, "similar"))
    assert sum(not t for t in _trainable(base)) == round(0.5 * len(names))

    apply_freeze(base, decide_freeze(b, base, "expanded_conv_2/Add", 50, "similar"))
    assert _trainable(base).index(True) == names.index("expanded_conv_2/Add") + 1


def test_freeze_bad_values(small):
    b, _, base = small
    with pytest.raises(ConfigError, match="did you mean"):
        decide_freeze(b, base, "expanded_conv_2/ad", 50, "similar")
    with pytest.raises(ConfigError, match="fraction"):
        decide_freeze(b, base, "1.5", 50, "similar")


def test_auto_freeze_follows_the_decision_guide():
    assert auto_freeze_point(40, "similar")[0] == "all"
    assert auto_freeze_point(40, "different")[0] == "all"
    assert auto_freeze_point(300, "similar")[0] == "late"
    assert auto_freeze_point(300, "different")[0] == "mid"
    assert auto_freeze_point(3000, "similar")[0] == "mid"
    assert auto_freeze_point(3000, "different")[0] == "early"
    assert "images per class" in auto_freeze_point(300, "similar")[1]


def test_batchnorm_stays_in_inference_mode_when_trainable(small):
    _, model, base = small
    apply_freeze(base, decide_freeze(get_backbone("mobilenet_v3_small"), base, "none", 50, "similar"))
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    bn = next(layer for layer in base.layers if "BatchNorm" in type(layer).__name__)
    before = [w.numpy().copy() for w in bn.non_trainable_weights]
    model(x, training=True)  # training=True at the top must not update moving statistics
    after = [w.numpy() for w in bn.non_trainable_weights]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_image_size_checks():
    b = get_backbone("mobilenet_v3_small")
    check_image_size(b, 96)
    for bad in (8, 100, 4096):
        with pytest.raises(ConfigError):
            check_image_size(b, bad)
    with pytest.raises(ConfigError, match="did you mean mobilenet_v3_small"):
        get_backbone("mobilenet_v3_smal")


def test_weights_found_in_env_folder(monkeypatch, weights_dir):
    monkeypatch.setenv(ENV_VAR, str(weights_dir))
    choice = resolve_weights(get_backbone("mobilenet_v3_small"), "imagenet", 224)
    assert choice.path.name == "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
    assert choice.keras_arg() == str(choice.path)


def test_weights_dir_argument_wins(monkeypatch, tmp_path, weights_dir):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    choice = resolve_weights(get_backbone("mobilenet_v3_small"), "imagenet", 224, weights_dir=weights_dir)
    assert choice.path.parent == weights_dir.resolve()


def test_missing_imagenet_weights_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("EDGETL_OFFLINE", "1")
    with pytest.raises(WeightsError) as err:
        resolve_weights(get_backbone("efficientnet_b0"), "imagenet", 224)
    assert "efficientnetb0_notop.h5" in err.value.one_line() and ENV_VAR in err.value.one_line()


def test_weights_path_errors(tmp_path):
    b = get_backbone("mobilenet_v3_small")
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights(b, str(tmp_path / "nope.h5"), 224)
    with pytest.raises(WeightsError, match="is a folder"):
        resolve_weights(b, str(tmp_path), 224)
    assert resolve_weights(b, "none", 224).keras_arg() is None


def test_wrong_architecture_weights_file_is_refused(weights_dir):
    b = get_backbone("mobilenet_v3_large")
    choice = resolve_weights(b, str(weights_dir / "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"), 64)
    with pytest.raises(WeightsError, match="does not fit mobilenet_v3_large"):
        build_classifier(b, 64, 3, choice, 0.2)


def test_shared_weights_load_into_small(weights_dir):
    b = get_backbone("mobilenet_v3_small")
    choice = resolve_weights(b, "imagenet", 64, weights_dir=weights_dir)
    model, base = build_classifier(b, 64, 3, choice, 0.2)
    random_model, random_base = build_classifier(b, 64, 3, NONE, 0.2)
    w = base.get_layer("Conv").get_weights()[0]
    assert not np.allclose(w, random_base.get_layer("Conv").get_weights()[0])


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "efficientnet_b0"])
def test_weights_none_batchnorm_recalibration_revives_random_features(name):
    """A random backbone with BN's initial statistics collapses its features (std ~1e-11 at 32 px); one
    recalibration pass gives O(1) features, changes no weight and restores every BN/Dropout setting."""
    from edgetl._tfenv import keras
    from edgetl.finetune import recalibrate_batchnorm

    k = keras()
    k.utils.set_random_seed(0)
    base = get_backbone(name).build_base(32, None)
    base.trainable = False
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 32, 32, 3)).astype(np.float32)
    before = base(x, training=False).numpy().std()
    kernels = [w.numpy().copy() for w in base.weights if "moving" not in w.name]
    bns = [layer for layer in base.layers if isinstance(layer, k.layers.BatchNormalization)]
    settings = [(layer.momentum, layer.trainable) for layer in bns]
    assert recalibrate_batchnorm(base, x) == len(bns) > 0
    after = base(x, training=False).numpy().std()
    assert before < 1e-4 and after > 0.1, (before, after)
    assert all(
        np.array_equal(a, w.numpy()) for a, w in zip(kernels, [w for w in base.weights if "moving" not in w.name])
    )
    assert [(layer.momentum, layer.trainable) for layer in bns] == settings


def test_auto_freeze_without_pretrained_weights_freezes_nothing():
    for n in (40, 300, 3000):
        point, reason = auto_freeze_point(n, "similar", pretrained=False)
        assert point == "none" and "no pretrained features" in reason
    from edgetl.config import FinetuneConfig
    from edgetl.finetune import FROM_SCRATCH_FINE_TUNE_LR, PRETRAINED_FINE_TUNE_LR, fine_tune_learning_rate

    cfg = FinetuneConfig(data="x")
    assert fine_tune_learning_rate(cfg, pretrained=True) == PRETRAINED_FINE_TUNE_LR
    assert fine_tune_learning_rate(cfg, pretrained=False) == FROM_SCRATCH_FINE_TUNE_LR
    assert fine_tune_learning_rate(FinetuneConfig(data="x", fine_tune_lr=1e-4), pretrained=False) == 1e-4
