"""The backbone table: one row per supported architecture (TF-free; builders import tf_keras lazily).

Every classifier edgetl builds takes float32 RGB in 0..255 (NHWC); each backbone's preprocessing lives inside the
model, so exported artifacts need no hidden preprocessing step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgetl.errors import ConfigError


@dataclass(frozen=True)
class Backbone:
    name: str
    keras_class: str  # attribute of tf_keras.applications
    default_size: int
    min_size: int
    #: how 0..255 input becomes what the network expects (for docs, manifests and `--help`)
    preprocessing: str
    #: Keras's own weight file names (with top, without top) for `weights: imagenet`
    weight_files: tuple[str, str]
    #: named freeze points: freeze every backbone layer up to and including this layer
    freeze_points: dict[str, str]
    #: extra kwargs for the Keras builder
    builder_kwargs: dict[str, Any] = field(default_factory=dict)
    #: a layer put in front of the base for backbones without built-in preprocessing: (scale, offset)
    input_rescale: tuple[float, float] | None = None
    #: caffe-style preprocessing put in front of the base (``tf_keras.applications.imagenet_utils`` mode "caffe"):
    #: RGB -> BGR and minus these per-channel means (B, G, R), no scaling. Built as one frozen 1x1 Conv2D
    #: (a channel permutation kernel, bias -mean): one fp32 CONV_2D in the float files, and for QAT the permutation
    #: folds exactly into the stem conv's kernel (edgetl.qat.passes), leaving one per-channel ADD in the float stem.
    input_bgr_mean: tuple[float, float, float] | None = None

    def build_base(self, image_size: int, weights: str | None):
        """Build the headless backbone (a nested tf_keras Model)."""
        from edgetl._tfenv import keras

        builder: Callable[..., Any] = getattr(keras().applications, self.keras_class)
        return builder(
            input_shape=(image_size, image_size, 3), include_top=False, weights=weights, **self.builder_kwargs
        )


#: ImageNet channel means in BGR order (Keras's caffe-style preprocess_input for ResNet50 and VGG16)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

#: how ResNet50/VGG16 see their input (keras.applications.imagenet_utils "caffe" mode), for docs and manifests
CAFFE_PREPROCESSING = (
    "caffe-style, in front of the base: RGB -> BGR, minus ImageNet mean (103.939, 116.779, 123.68), "
    "no scaling (one frozen 1x1 conv)"
)

BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            name="mobilenet_v3_small",
            keras_class="MobileNetV3Small",
            default_size=224,
            min_size=32,
            preprocessing="Rescaling(1/127.5, offset=-1) inside the model: 0..255 -> -1..1",
            weight_files=(
                "weights_mobilenet_v3_small_224_1.0_float.h5",
                "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
            ),
            freeze_points={"early": "expanded_conv_2/Add", "mid": "expanded_conv_5/Add", "late": "expanded_conv_9/Add"},
            builder_kwargs={"include_preprocessing": True, "minimalistic": False, "alpha": 1.0},
        ),
        Backbone(
            name="mobilenet_v3_large",
            keras_class="MobileNetV3Large",
            default_size=224,
            min_size=32,
            preprocessing="Rescaling(1/127.5, offset=-1) inside the model: 0..255 -> -1..1",
            weight_files=(
                "weights_mobilenet_v3_large_224_1.0_float.h5",
                "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
            ),
            freeze_points={
                "early": "expanded_conv_2/Add",
                "mid": "expanded_conv_9/Add",
                "late": "expanded_conv_13/Add",
            },
            builder_kwargs={"include_preprocessing": True, "minimalistic": False, "alpha": 1.0},
        ),
        Backbone(
            name="efficientnet_b0",
            keras_class="EfficientNetB0",
            default_size=224,
            min_size=32,
            preprocessing="Rescaling(1/255) and ImageNet mean/std Normalization inside the model",
            weight_files=("efficientnetb0.h5", "efficientnetb0_notop.h5"),
            freeze_points={"early": "block2b_add", "mid": "block4c_add", "late": "block6d_add"},
        ),
        Backbone(
            name="mobilenet_v2",
            keras_class="MobileNetV2",
            default_size=224,
            min_size=32,
            preprocessing="Rescaling(1/127.5, offset=-1) added in front of the base: 0..255 -> -1..1",
            weight_files=(
                "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5",
                "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
            ),
            freeze_points={"early": "block_2_add", "mid": "block_9_add", "late": "block_15_add"},
            builder_kwargs={"alpha": 1.0},
            input_rescale=(1 / 127.5, -1.0),
        ),
        Backbone(
            name="resnet50",
            keras_class="ResNet50",
            default_size=224,
            min_size=32,
            preprocessing=CAFFE_PREPROCESSING,
            weight_files=(
                "resnet50_weights_tf_dim_ordering_tf_kernels.h5",
                "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            ),
            freeze_points={"early": "conv2_block3_out", "mid": "conv3_block4_out", "late": "conv4_block6_out"},
            input_bgr_mean=CAFFE_BGR_MEAN,
        ),
        Backbone(
            name="vgg16",
            keras_class="VGG16",
            default_size=224,
            min_size=32,
            preprocessing=CAFFE_PREPROCESSING,
            weight_files=(
                "vgg16_weights_tf_dim_ordering_tf_kernels.h5",
                "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            ),
            freeze_points={"early": "block2_pool", "mid": "block3_pool", "late": "block4_pool"},
            input_bgr_mean=CAFFE_BGR_MEAN,
        ),
        Backbone(
            # Keras publishes B7 for 600 px; edgetl's default stays 224 like every other row: the side-by-side
            # comparison (benchmarks/backbone_compare.py) is at one size, and B7 at 600 px costs ~7x the compute
            # of 224 px on an edge CPU. The headless ImageNet weights load at any size; pass --image-size 600
            # for the published accuracy.
            name="efficientnet_b7",
            keras_class="EfficientNetB7",
            default_size=224,
            min_size=32,
            preprocessing="Rescaling(1/255) and ImageNet mean/std Normalization inside the model",
            weight_files=("efficientnetb7.h5", "efficientnetb7_notop.h5"),
            freeze_points={"early": "block2g_add", "mid": "block4j_add", "late": "block6m_add"},
        ),
    )
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, BACKBONES, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown backbone {name!r}", f"{hint}choose one of: {', '.join(BACKBONES)}") from None


def check_image_size(backbone: Backbone, size: int) -> None:
    if not isinstance(size, int) or size < backbone.min_size or size > 1024:
        raise ConfigError(
            f"--image-size {size} is out of range for {backbone.name}",
            f"use a size between {backbone.min_size} and 1024 (default {backbone.default_size})",
        )
    if size % 8:
        raise ConfigError(
            f"--image-size {size} is not a multiple of 8, which {backbone.name}'s strided layers need",
            f"use e.g. {size - size % 8 or 8} or {size + 8 - size % 8}",
        )
