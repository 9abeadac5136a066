"""The classifier: backbone (nested, BatchNorm in inference mode) + pooled dropout/softmax head, the preprocessing
layers in front of the backbone, and the BatchNorm re-estimation a ``weights: none`` backbone needs."""

from __future__ import annotations

import numpy as np

from edgetl.backbones import Backbone
from edgetl.errors import RunDirError, WeightsError
from edgetl.weights import WeightsChoice


def build_classifier(backbone: Backbone, image_size: int, num_classes: int, weights: WeightsChoice, dropout: float):
    """The classifier: image (0..255 RGB) -> [rescale] -> backbone (nested, inference BN) -> pool -> dropout -> dense."""
    from edgetl._tfenv import keras

    k = keras()
    try:
        base = backbone.build_base(image_size, weights.keras_arg())
    except (ValueError, OSError, KeyError) as exc:
        if weights.path is not None:
            raise WeightsError(
                f"weights file {weights.path} does not fit {backbone.name} ({str(exc).splitlines()[0][:160]})",
                f"pass weights made for {backbone.name} without the top ({backbone.weight_files[1]}) or --weights none",
            ) from None
        if weights.source == "imagenet":
            raise WeightsError(
                f"could not get ImageNet weights for {backbone.name}: {str(exc).splitlines()[0][:160]}",
                f"download {backbone.weight_files[1]} and set EDGETL_WEIGHTS_DIR to its folder, or pass --weights none",
            ) from None
        raise
    except Exception as exc:  # Keras download errors (no network) come as various types
        if weights.source == "imagenet" and weights.path is None:
            raise WeightsError(
                f"could not download ImageNet weights for {backbone.name} ({type(exc).__name__})",
                f"put {backbone.weight_files[1]} in a folder and set EDGETL_WEIGHTS_DIR to it, or pass --weights none",
            ) from None
        raise
    inputs = k.Input((image_size, image_size, 3), name="image")
    x = inputs
    if backbone.input_rescale is not None:
        scale, offset = backbone.input_rescale
        x = k.layers.Rescaling(scale, offset, name="input_rescale")(x)
    if backbone.input_bgr_mean is not None:
        x = bgr_mean_preprocess(x, backbone.input_bgr_mean)
    x = base(x, training=False)
    x = k.layers.GlobalAveragePooling2D(name="pool")(x)
    x = k.layers.Dropout(dropout, name="dropout")(x)
    outputs = k.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    model = k.Model(inputs, outputs, name=f"edgetl_{backbone.name}")
    return model, base


def bgr_mean_preprocess(x, bgr_mean, name: str = "input_preprocess"):
    """Caffe-style preprocessing as one frozen 1x1 Conv2D applied to ``x``: output channel c = input channel 2-c
    minus ``bgr_mean[c]`` (RGB -> BGR, mean subtraction, no scaling: Keras's ``preprocess_input`` for
    ResNet50/VGG16; each output is one input times 1 plus zeros, minus the mean). A stock layer, so ``float.keras``
    needs no custom objects."""
    from edgetl._tfenv import keras

    kernel = np.zeros((1, 1, 3, 3), np.float32)
    for c in range(3):
        kernel[0, 0, 2 - c, c] = 1.0
    layer = keras().layers.Conv2D(3, 1, name=name, trainable=False)
    y = layer(x)
    layer.set_weights([kernel, -np.asarray(bgr_mean, np.float32)])
    return y


def base_inputs(model, images: np.ndarray) -> np.ndarray:
    """``images`` (0..255) as the nested backbone sees them: through the layers in front of it (``input_rescale``,
    ``input_preprocess``; none for backbones with their preprocessing inside)."""
    from edgetl._tfenv import keras

    base = get_base(model)
    front = [
        layer for layer in model.layers[: model.layers.index(base)] if not isinstance(layer, keras().layers.InputLayer)
    ]
    x = np.asarray(images, np.float32)
    for layer in front:
        x = layer(x).numpy()
    return x


def get_base(model):
    """The nested backbone model of a classifier built by :func:`build_classifier`."""
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.name not in ("image",):
            return layer
    raise RunDirError("the saved model has no nested backbone", "rerun edgetl finetune")


#: training images whose statistics become the BatchNorm statistics of a ``weights: none`` backbone (one batch)
BN_RECALIBRATION_IMAGES = 64


def recalibrate_batchnorm(base, images: np.ndarray) -> int:
    """Set every BatchNormalization's moving mean/variance to the statistics of its input on ``images`` (one batch;
    the images as the base sees them: :func:`base_inputs`).

    For ``weights: none``: a randomly initialised backbone keeps BN's initial statistics (mean 0, variance 1), so
    activations shrink layer after layer (MobileNetV3-Large: ~1e-8 deep in the network). A frozen random base then
    gives the head near-constant features, and int8 ranges span 1e-8 next to the +3 of hard-swish, which XNNPACK
    refuses to run in int8 (19 partitions). One forward pass in training mode with momentum 0 makes every BN
    normalise its real input (a data-dependent initialisation); weights are not touched. Returns the BN count.
    """
    from edgetl._tfenv import keras, tf

    k = keras()
    bns = [layer for layer in base.layers if isinstance(layer, k.layers.BatchNormalization)]
    drops = [layer for layer in base.layers if isinstance(layer, k.layers.Dropout)]
    saved = [(layer, layer.momentum, layer.trainable) for layer in bns]
    saved_rates = [(layer, layer.rate) for layer in drops]
    try:
        for layer in bns:
            layer.momentum, layer.trainable = 0.0, True  # frozen BN runs in inference mode even when training
        for layer in drops:
            layer.rate = 0.0
        base(tf().constant(np.asarray(images, np.float32)), training=True)
    finally:
        for layer, momentum, trainable in saved:
            layer.momentum, layer.trainable = momentum, trainable
        for layer, rate in saved_rates:
            layer.rate = rate
    return len(bns)


class _BatchNormTracker:
    """``weights: none``: BatchNorm runs in inference mode, so its statistics would stay those of the random
    initialisation while the whole backbone trains; re-estimate them before every validation (and so for the next
    epoch) from the same clean training images (:func:`recalibrate_batchnorm`)."""

    def __new__(cls, base, images: np.ndarray):
        from edgetl._tfenv import keras

        class Tracker(keras().callbacks.Callback):
            def on_test_begin(self, logs=None):
                recalibrate_batchnorm(base, images)

        return Tracker()
