"""`edgetl finetune`: transfer learning in three phases, writing a run directory (docs/formats.md).

1. head: the whole backbone frozen; its pooled features are computed once (plus ``feature_views`` augmented
   views per image) and a dropout+softmax head is trained on the cached features at ``head_lr``.
2. fine_tune (optional): the backbone above the freeze boundary is unfrozen and trained end to end at a 10-100x
   lower ``fine_tune_lr``. BatchNormalization layers stay in inference mode (the base is called with
   ``training=False``), frozen or not.
3. qat (default on): quantization-aware training from the best float weights (edgetl.qat).

Images are never all in memory: every phase streams them from their files (edgetl.stream: tf.data over file
indices, parallel decode + resize with the same decoder as export and verify), the head phase's cached features go to
files in the work folder and are read back a batch at a time, and the BatchNorm, calibration images are drawn by index.
Each phase writes ``logs/PHASE/history.csv`` and TensorBoard scalars.

The run is built in a hidden ``.NAME.partial`` folder beside the target and swapped in when complete; each finished
phase is checkpointed there, so a killed run resumes from its last completed phase when rerun with the same config.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetl import __version__
from edgetl.backbones import Backbone, check_image_size, get_backbone
from edgetl.config import FinetuneConfig
from edgetl.data import ImageFolder, ImageList, scan_folder, stratified_split
from edgetl.errors import ConfigError, DataError, RunDirError, WeightsError
from edgetl.fsutil import atomic_write_json, atomic_write_text, check_target, clean_stale, sha256_file, swap_dir
from edgetl.manifest import RUN_FOLDER, RUN_SCHEMA, config_hash, new_run_id, now_iso, package_versions
from edgetl.progress import NullReporter, Reporter
from edgetl.weights import WeightsChoice, keras_download_path, resolve_weights, weights_record

PHASES = ("head", "fine_tune", "qat")


# ----------------------------------------------------------------------------------------------------------- model


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
    front = [layer for layer in model.layers[: model.layers.index(base)]
             if not isinstance(layer, keras().layers.InputLayer)]
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


# ------------------------------------------------------------------------------------------------------ freezing


@dataclass(frozen=True)
class FreezeDecision:
    policy: str
    boundary_index: int  # layers [0, boundary_index] of the base are frozen; -1: none frozen
    boundary_layer: str | None
    reason: str


#: fine-tune learning rate when ``fine_tune_lr`` is unset: pretrained weights (10-100x below the head's), and from
#: scratch (``weights: none``; measured on the demo shapes at 64 px: val accuracy 0.96 after 10 epochs)
PRETRAINED_FINE_TUNE_LR = 5e-5
FROM_SCRATCH_FINE_TUNE_LR = 2e-3


def auto_freeze_point(images_per_class: float, domain: str, pretrained: bool = True) -> tuple[str, str]:
    """The decision guide: no pretrained features -> freeze nothing; little data -> freeze more; data unlike
    ImageNet -> unfreeze more."""
    if not pretrained:
        return "none", ("weights none: no pretrained features to transfer, so nothing is frozen "
                        "(the whole backbone trains from scratch)")
    n = images_per_class
    if n < 100:
        return "all", (f"{n:.0f} images per class is small: feature extraction (whole backbone frozen) avoids "
                       "overfitting")
    if n < 1000:
        point = "late" if domain == "similar" else "mid"
        return point, (f"{n:.0f} images per class and a {domain} domain: freeze up to the {point} point, "
                       "fine-tune the top blocks")
    point = "mid" if domain == "similar" else "early"
    return point, f"{n:.0f} images per class and a {domain} domain: freeze only up to the {point} point"


def decide_freeze(backbone: Backbone, base, policy: str, images_per_class: float, domain: str,
                  pretrained: bool = True) -> FreezeDecision:
    names = [layer.name for layer in base.layers]
    policy = str(policy).strip()
    reason = f"--freeze {policy}"
    point = policy
    if policy == "auto":
        point, reason = auto_freeze_point(images_per_class, domain, pretrained)
    if point == "all":
        return FreezeDecision(policy, len(names) - 1, names[-1], reason)
    if point == "none":
        return FreezeDecision(policy, -1, None, reason)
    if point in backbone.freeze_points:
        layer = backbone.freeze_points[point]
        return FreezeDecision(policy, names.index(layer), layer, reason)
    try:
        fraction = float(point)
    except ValueError:
        fraction = None
    if fraction is not None:
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"--freeze {policy} is not a fraction between 0 and 1", "use e.g. --freeze 0.7")
        n_frozen = int(round(fraction * len(names)))
        return FreezeDecision(policy, n_frozen - 1, names[n_frozen - 1] if n_frozen else None, reason)
    if point in names:
        return FreezeDecision(policy, names.index(point), point, reason)
    import difflib

    close = difflib.get_close_matches(point, names + list(backbone.freeze_points), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"--freeze {policy!r} is not a layer of {backbone.name} nor a policy",
        f"{hint}use auto, all, none, {', '.join(backbone.freeze_points)}, a fraction 0..1 or a layer name",
    )


def apply_freeze(base, decision: FreezeDecision) -> dict:
    """Set ``trainable`` per layer; return the counts the manifest records."""
    base.trainable = True
    frozen = trainable = 0
    for i, layer in enumerate(base.layers):
        layer.trainable = i > decision.boundary_index
        if layer.weights:
            if layer.trainable:
                trainable += 1
            else:
                frozen += 1
    return {
        "policy": decision.policy,
        "boundary_layer": decision.boundary_layer,
        "boundary_index": decision.boundary_index,
        "frozen_layers": frozen,
        "trainable_layers": trainable,
        "backbone_layers": len(base.layers),
        "reason": decision.reason,
    }


# ------------------------------------------------------------------------------------------------- training bits


def fine_tune_learning_rate(cfg: FinetuneConfig, pretrained: bool) -> float:
    """``fine_tune_lr`` when set; else low for pretrained weights, high from scratch (nothing to preserve)."""
    if cfg.fine_tune_lr is not None:
        return float(cfg.fine_tune_lr)
    return PRETRAINED_FINE_TUNE_LR if pretrained else FROM_SCRATCH_FINE_TUNE_LR


def set_seeds(seed: int) -> dict:
    """Seed Python, numpy and TensorFlow, and turn on TensorFlow's op determinism (same command + seed -> same
    weights and metrics). Returns what the manifest records about it."""
    from edgetl._tfenv import keras, tf

    random.seed(seed)
    np.random.seed(seed)
    keras().utils.set_random_seed(seed)
    try:
        tf().config.experimental.enable_op_determinism()
    except (AttributeError, RuntimeError) as exc:  # very old TF, or already initialised otherwise
        return {"seed": seed, "op_determinism": False, "why": f"enable_op_determinism failed: {exc}"}
    return {"seed": seed, "op_determinism": True}


def make_augmenter(cfg: FinetuneConfig, seed: int):
    from edgetl._tfenv import keras

    k = keras()
    a = cfg.augment
    layers = []
    if a.flip:
        layers.append(k.layers.RandomFlip("horizontal", seed=seed))
    if a.rotation:
        layers.append(k.layers.RandomRotation(a.rotation, fill_mode="reflect", seed=seed + 1))
    if a.zoom:
        layers.append(k.layers.RandomZoom(a.zoom, fill_mode="reflect", seed=seed + 2))
    if a.contrast:
        layers.append(k.layers.RandomContrast(a.contrast, seed=seed + 3))
    return k.Sequential(layers, name="augment") if layers else None


class _EpochProgress:
    """A Keras callback driving a Reporter task: one tick per batch, metrics per epoch; after early stopping the
    task's last status says so (the bar then ends at what was done, see RichReporter)."""

    def __new__(cls, task, best: dict, stopper=None, epochs: int | None = None):
        from edgetl._tfenv import keras

        class _Callback(keras().callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                task.advance(1)

            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                best["epochs_run"] = epoch + 1
                best["shown"] = dict(epoch=epoch + 1, loss=float(logs.get("loss", np.nan)),
                                     val_acc=float(logs.get("val_accuracy", np.nan)))
                task.update(**best["shown"])

            def on_train_end(self, logs=None):
                if stopper is None:
                    return
                best["best_epoch"] = int(getattr(stopper, "best_epoch", 0)) + 1
                run = best.get("epochs_run", 0)
                if epochs is not None and 0 < run < epochs:  # the bar ends at what was done (RichReporter)
                    task.update(**best.get("shown", {}), stopped=f"early({run}/{epochs})", best=best["best_epoch"])

        return _Callback()


class _TrainingLog:
    """Per-phase training logs in ``logdir``: ``history.csv`` (rewritten after every epoch) and TensorBoard scalar
    event files (``train/`` and ``validation/``, tags ``epoch_loss``, ``epoch_accuracy`` like Keras's TensorBoard
    callback). Written with TensorFlow's own summary writer, so the ``tensorboard`` package is not needed to write
    them (only to view them: ``tensorboard --logdir RUN/logs``)."""

    def __new__(cls, logdir: Path):
        from edgetl._tfenv import keras, tf

        tf_ = tf()
        from tensorflow.core.framework import summary_pb2

        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")).SerializeToString()
        shutil.rmtree(logdir, ignore_errors=True)  # a resumed phase starts its logs again
        logdir.mkdir(parents=True)

        class _Callback(keras().callbacks.Callback):
            rows: list[dict] = []
            writers: dict = {}

            def _writer(self, split):
                if split not in self.writers:
                    self.writers[split] = tf_.summary.create_file_writer(str(logdir / split))
                return self.writers[split]

            def on_epoch_end(self, epoch, logs=None):
                logs = {k: float(v) for k, v in (logs or {}).items()}
                self.rows.append({"epoch": epoch + 1, **logs})
                for key, value in logs.items():
                    split, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
                    with self._writer(split).as_default():
                        tf_.summary.write(f"epoch_{name}", tf_.constant(value), step=epoch, metadata=metadata)
                    self._writer(split).flush()
                keys = ["epoch"] + sorted({k for r in self.rows for k in r} - {"epoch"})
                lines = [",".join(keys)] + [",".join(f"{r.get(k, '')}" for k in keys) for r in self.rows]
                atomic_write_text(logdir / "history.csv", "\n".join(lines) + "\n")

            def on_train_end(self, logs=None):
                for w in self.writers.values():
                    w.close()

        cb = _Callback()
        cb.rows, cb.writers = [], {}
        return cb


def _history(h) -> dict[str, list[float]]:
    return {k: [float(v) for v in vals] for k, vals in h.history.items()}


def _early_stopping(k, cfg):
    return k.callbacks.EarlyStopping("val_accuracy", patience=cfg.patience, mode="max", restore_best_weights=True)


def evaluate_accuracy(model, images: np.ndarray, labels: np.ndarray, batch_size: int = 64) -> float:
    probs = model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(probs, axis=1) == labels))


_PREDICT_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def predict_stream(model, ds) -> np.ndarray:
    """Class probabilities over a batched dataset of ``(inputs, targets)``, batch by batch, in its order (not
    distributed: under a multi-worker strategy every worker computes the same full result)."""
    from edgetl._tfenv import tf

    fn = _PREDICT_FNS.get(model)
    if fn is None:  # one traced function per model (not per call)
        def forward(x):
            return model(x, training=False)

        fn = _PREDICT_FNS[model] = tf().function(forward, reduce_retracing=True)
    return np.concatenate([fn(x).numpy() for x, _ in ds])


def stream_accuracy(model, images: ImageList, image_size: int, batch_size: int) -> float:
    """Accuracy over images decoded from their files a batch at a time."""
    from edgetl.stream import image_dataset

    probs = predict_stream(model, image_dataset(images.items, (image_size, image_size), batch_size))
    return float(np.mean(np.argmax(probs, axis=1) == images.labels))


def tflite_accuracy(content: bytes, images, labels: np.ndarray | None = None, image_size: int | None = None,
                    chunk: int = 256) -> float:
    """Accuracy of a .tflite flatbuffer, run with LiteRT exactly as a device would (batch 1). ``images``: an array
    (with ``labels``) or an :class:`ImageList` decoded ``chunk`` images at a time."""
    from edgetl.predict import tflite_predict

    threads = os.cpu_count() or 1
    if not isinstance(images, ImageList):
        probs = tflite_predict(content, images, threads=threads)
        return float(np.mean(np.argmax(probs, axis=1) == labels))
    from edgetl.data import load_images

    correct = total = 0
    for i in range(0, len(images), chunk):
        part = load_images(images.items[i : i + chunk], (image_size, image_size), skip_bad=True)
        probs = tflite_predict(content, part.images, threads=threads)
        correct += int(np.sum(np.argmax(probs, axis=1) == part.labels))
        total += len(part.labels)
    return correct / max(total, 1)


# --------------------------------------------------------------------------------------------------------- phases


@dataclass(frozen=True)
class HeadResult:
    record: dict  # the phase's manifest record
    train: ImageList  # the splits without unreadable images (--skip-bad-images)
    val: ImageList


def head_phase(cfg, model, train: ImageList, val: ImageList, reporter: Reporter, seed: int,
               pretrained: bool = True, cache_dir: Path | None = None, logdir: Path | None = None,
               on_checked=None) -> HeadResult:
    """Train the head on cached features of the frozen backbone (clean features only from a random backbone:
    augmented views of random features are not worth their time).

    Images are decoded from their files batch by batch; the features (one file per split and view) go to
    ``cache_dir`` (default: a fresh temporary folder), are streamed from there for training and deleted at the end.
    The first (clean) pass over the images also finds the unreadable ones: DataError naming them, unless
    ``cfg.skip_bad_images`` (then they are left out of every later pass and returned as skipped). ``on_checked``
    is called once every image was found readable (or skipped).
    """
    import tempfile

    from edgetl._tfenv import keras, tf
    from edgetl.stream import BadImages, FeatureFile, feature_dataset, image_dataset

    k, tf = keras(), tf()
    feature_model = k.Model(model.input, model.get_layer("pool").output)
    augment = make_augmenter(cfg, seed)
    views = cfg.feature_views if augment is not None and pretrained else 0
    bs = cfg.batch_size
    size = tuple(int(d) for d in model.input_shape[1:3])
    num_classes = model.output_shape[-1]
    width = int(feature_model.output_shape[-1])

    @tf.function(reduce_retracing=True)
    def clean_features(batch):
        return feature_model(tf.cast(batch, tf.float32), training=False)

    @tf.function(reduce_retracing=True)
    def augmented_features(batch):
        return feature_model(augment(tf.cast(batch, tf.float32), training=True), training=False)

    if augment is not None:  # build the augmentation layers' state outside tf.function
        augment(tf.zeros((1,) + size + (3,)), training=True)

    if cache_dir is None:
        cache = Path(tempfile.mkdtemp(prefix="edgetl-features-"))
    else:
        cache = Path(cache_dir)
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
    files: list = []

    def extract(images: ImageList, name: str, view: int, task, bad: BadImages | None = None):
        f = FeatureFile(cache / f"{name}-view{view}.f32", width)
        files.append(f)
        fn = augmented_features if view > 0 else clean_features
        for batch in image_dataset(images.items, size, bs, bad=bad, as_float=False):
            feats = fn(batch[0]).numpy()
            f.append(feats if bad is None else feats[batch[2].numpy()])
            task.advance(1)
        f.finish()
        return f

    try:
        t0 = time.perf_counter()
        n_batches = -(-len(train) // bs) * (1 + views) + -(-len(val) // bs)
        with reporter.task(f"caching features (1+{views} views)", n_batches) as task:
            bad_train, bad_val = BadImages(), BadImages()
            train_files = [extract(train, "train", 0, task, bad_train)]
            val_file = extract(val, "val", 0, task, bad_val)
            merged = BadImages()
            for i, (path, why) in enumerate([*bad_train.reasons.values(), *bad_val.reasons.values()]):
                merged.add(i, path, why)
            merged.raise_unless(cfg.skip_bad_images)
            train = train.without([p for p, _ in bad_train.reasons.values()])
            val = val.without([p for p, _ in bad_val.reasons.values()])
            if not len(train) or not len(val):
                raise DataError("no readable images" if not len(train) else "no readable validation images",
                                "check the data folder")
            if on_checked is not None:
                on_checked()
            for view in range(1, 1 + views):
                train_files.append(extract(train, "train", view, task))
        cache_s = time.perf_counter() - t0

        y_train = np.tile(train.labels, 1 + views)
        train_ds = feature_dataset(train_files, _targets(y_train, cfg, num_classes), bs, shuffle_seed=seed)
        val_ds = feature_dataset([val_file], _targets(val.labels, cfg, num_classes), bs)
        head_in = k.Input((width,), name="features")
        h = k.layers.Dropout(cfg.dropout, name="dropout")(head_in)
        head_out = k.layers.Dense(num_classes, activation="softmax", name="predictions")(h)
        head = k.Model(head_in, head_out)
        head.compile(k.optimizers.Adam(cfg.head_lr), _loss(cfg, k), metrics=["accuracy"])
        best: dict = {}
        steps = -(-len(y_train) // bs)
        stopper = _early_stopping(k, cfg)
        logs = (_TrainingLog(logdir),) if logdir is not None else ()
        t1 = time.perf_counter()
        with reporter.task("head phase", steps * cfg.epochs) as task:
            hist = head.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, verbose=0,
                            callbacks=[stopper, _EpochProgress(task, best, stopper, cfg.epochs), *logs])
        train_s = time.perf_counter() - t1
    finally:
        for f in files:
            f.close()
        shutil.rmtree(cache, ignore_errors=True)
    model.get_layer("predictions").set_weights(head.get_layer("predictions").get_weights())
    val_acc = stream_accuracy(model, val, size[0], bs)
    record = {
        "status": "done", "epochs": cfg.epochs, "epochs_run": best.get("epochs_run", cfg.epochs),
        "best_epoch": best.get("best_epoch"), "lr": cfg.head_lr, "feature_views": views,
        "cached_samples": int(len(y_train)), "cache_seconds": round(cache_s, 2), "train_seconds": round(train_s, 2),
        "val_accuracy": val_acc, "history": _history(hist),
    }
    return HeadResult(record, train, val)


def _loss(cfg: FinetuneConfig, k):
    if cfg.label_smoothing:
        return k.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing)
    return "sparse_categorical_crossentropy"


def _targets(labels: np.ndarray, cfg: FinetuneConfig, num_classes: int) -> np.ndarray:
    if cfg.label_smoothing:
        return np.eye(num_classes, dtype=np.float32)[labels]
    return labels


def fit_phase(name, cfg, model, train: ImageList, val: ImageList, lr, epochs, reporter, seed, augment=True,
              callbacks=(), logdir: Path | None = None) -> dict:
    """End-to-end training of the trainable layers (fine-tune or QAT), early stopping on val accuracy; images are
    decoded from their files a batch at a time (:func:`edgetl.stream.image_dataset`)."""
    from edgetl._tfenv import keras
    from edgetl.stream import image_dataset

    k = keras()
    num_classes = model.output_shape[-1]
    size = tuple(int(d) for d in model.input_shape[1:3])
    model.compile(k.optimizers.Adam(lr), _loss(cfg, k), metrics=["accuracy"])
    train_ds = image_dataset(train.items, size, cfg.batch_size, shuffle_seed=seed,
                             targets=_targets(train.labels, cfg, num_classes),
                             augment=make_augmenter(cfg, seed) if augment else None)
    val_ds = image_dataset(val.items, size, cfg.batch_size, targets=_targets(val.labels, cfg, num_classes))
    steps = -(-len(train) // cfg.batch_size)
    best: dict = {}
    stopper = _early_stopping(k, cfg)
    logs = (_TrainingLog(logdir),) if logdir is not None else ()
    t0 = time.perf_counter()
    with reporter.task(f"{name} phase", steps * epochs) as task:
        hist = model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=0,
                         callbacks=[stopper, _EpochProgress(task, best, stopper, epochs), *logs, *callbacks])
    return {
        "status": "done", "epochs": epochs, "epochs_run": best.get("epochs_run", epochs),
        "best_epoch": best.get("best_epoch"), "lr": lr,
        "train_seconds": round(time.perf_counter() - t0, 2), "history": _history(hist),
    }

# ------------------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    manifest: dict
    chief: bool = True  # False: a multi-worker run's other worker (the chief wrote run_dir)


def default_run_dir(cfg: FinetuneConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    name = cfg.name or f"{Path(cfg.data).resolve().name}-{cfg.backbone}"
    return Path("models") / name


def _scan_split(cfg: FinetuneConfig) -> tuple[ImageFolder, list, list]:
    """Scan the folders and split them (cheap: no image is decoded). Raises DataError for a bad layout."""
    folder = scan_folder(cfg.data)
    if cfg.val_data:
        val_folder = scan_folder(cfg.val_data, classes=folder.classes)
        train_items, val_items = list(folder.items), list(val_folder.items)
    else:
        train_items, val_items = stratified_split(folder.items, cfg.val_split, cfg.seed)
    return folder, train_items, val_items


def _check_classes(folder: ImageFolder, train: ImageList) -> None:
    present = set(train.labels.tolist())
    if len(present) < len(folder.classes):
        missing = sorted(set(range(len(folder.classes))) - present)
        raise DataError(f"class(es) {', '.join(folder.classes[i] for i in missing)} have no readable training image",
                        "add images to them")


def _rel(path: Path, root: Path) -> str:
    """A split entry: the path relative to its data root (portable: the data may move, see --data-root)."""
    try:
        return Path(os.path.abspath(path)).relative_to(root).as_posix()
    except ValueError:
        return os.path.abspath(path)


def _plot_curves(phases: dict, path: Path) -> None:
    """Accuracy and loss per epoch, phases one after the other; each phase's best epoch (the weights early stopping
    kept) marked on its validation curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    offset = 0
    for name in PHASES:
        rec = phases.get(name, {})
        hist = rec.get("history")
        if not hist:
            continue
        n = len(hist.get("loss", []))
        xs = np.arange(offset + 1, offset + n + 1)
        best = rec.get("best_epoch")
        for key, ax in (("accuracy", axes[0]), ("loss", axes[1])):
            if key in hist:
                ax.plot(xs, hist[key], label=f"{name} train")
            if f"val_{key}" in hist:
                line, = ax.plot(xs, hist[f"val_{key}"], "--", label=f"{name} val")
                if best and 1 <= best <= n:
                    ax.plot([offset + best], [hist[f"val_{key}"][best - 1]], marker="*", markersize=13,
                            color=line.get_color(), linestyle="none",
                            label=f"{name} best (epoch {best})" if key == "accuracy" else None)
                    ax.axvline(offset + best, color=line.get_color(), alpha=0.25, linewidth=1)
        offset += n
    for ax, title in zip(axes, ("accuracy", "loss")):
        ax.set_title(title)
        ax.set_xlabel("epoch (phases in order)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def finetune(cfg: FinetuneConfig, reporter: Reporter | None = None, force: bool = False) -> RunResult:
    """Run all configured phases and write the run directory. Returns its path and manifest.

    An existing ``--out`` is only replaced when it is an edgetl run holding nothing edgetl did not write, and only
    with ``force``. A killed run resumes (same config and data) from its hidden ``.NAME.partial`` work folder.

    With ``TF_CONFIG`` naming several workers (multi-worker training), only the chief (``chief`` task, else worker
    0) writes the run directory; the other workers train in a temporary folder they delete at the end.
    """
    import tempfile

    from edgetl.distribute import cluster_role

    reporter = reporter or NullReporter()
    role = cluster_role()
    backbone = get_backbone(cfg.backbone)
    image_size = cfg.image_size or backbone.default_size
    check_image_size(backbone, image_size)
    weights = resolve_weights(backbone, cfg.weights, image_size, cfg.weights_dir)
    run_dir = default_run_dir(cfg)
    scratch = None
    if role.chief:
        target = Path(os.path.abspath(run_dir))
        clean_stale(target, RUN_FOLDER)  # a run killed mid-swap: its old run is put back first
        # only ever replace an edgetl run holding nothing but edgetl's files, and only with --force
        replacing = check_target(target, RUN_FOLDER, force)
    else:  # another worker: the same training, written to a private temporary folder
        scratch = Path(tempfile.mkdtemp(prefix=f"edgetl-worker{role.index}-"))
        target, replacing = scratch / "run", False

    try:
        # Cheap checks first (no image decoded, no TensorFlow): folder layout, classes, split.
        folder, train_items, val_items = _scan_split(cfg)
        config = cfg.model_dump()
        config["image_size"] = image_size
        # the data's classes and per-class counts too: a resume must never continue on a changed data set
        chash = config_hash({**{k: v for k, v in config.items() if k not in ("out", "name")},
                             "data_classes": list(folder.classes), "data_counts": folder.counts,
                             "split_sizes": [len(train_items), len(val_items)]})

        from edgetl.distribute import select_strategy

        strategy = select_strategy(role)  # before the work folder: a cluster that never forms leaves nothing
        work = target.with_name(f".{target.name}.partial")
        state = _read_state(work, chash)
        fresh = state is None
        if state is None:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            state = {"config_hash": chash, "run_id": new_run_id(), "created": now_iso(), "completed": [],
                     "phases": {}}
        else:
            reporter.info(f"resuming {run_dir} after phase(s): {', '.join(state['completed'])}")
        if replacing:
            reporter.info(f"--force: the earlier run in {run_dir} will be replaced when this one is complete")
        try:
            result = _run_phases(cfg, reporter, backbone, image_size, weights, target if scratch else run_dir,
                                 folder, train_items, val_items, config, work, state, force, strategy, role)
        except BaseException as exc:
            if fresh and not state["completed"]:  # nothing worth resuming: leave no trace
                shutil.rmtree(work, ignore_errors=True)
            from edgetl.distribute import cluster_failure

            failure = cluster_failure(exc, role)
            if failure is not None:
                raise failure from None
            raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if scratch is not None:
        return RunResult(run_dir, result.manifest, chief=False)
    return result


def _log_files(work: Path) -> dict[str, str]:
    """The training logs (RUN/logs/PHASE/history.csv and TensorBoard events) with their checksums."""
    logs = work / "logs"
    if not logs.is_dir():
        return {}
    return {p.relative_to(work).as_posix(): sha256_file(p) for p in sorted(logs.rglob("*")) if p.is_file()}


def _run_phases(cfg, reporter, backbone, image_size, weights, run_dir, folder, train_items, val_items, config, work,
                state, force, strategy, role) -> RunResult:
    from edgetl.stream import load_at

    determinism = set_seeds(cfg.seed)
    size = (image_size, image_size)
    train = ImageList(tuple(train_items))
    val = ImageList(tuple(val_items))
    if state.get("skipped"):  # resumed: the unreadable images the head phase found
        train, val = train.without(state["skipped"]["train"]), val.without(state["skipped"]["val"])
    with strategy.scope():
        # The model before the images: a weights file that does not fit fails in seconds, before decoding a
        # large data set.
        if state["completed"]:
            from edgetl.export.context import load_float_model

            model = load_float_model(work / "float.keras")  # safe mode, .keras (zip) only
            base = get_base(model)
        else:
            model, base = build_classifier(backbone, image_size, len(folder.classes), weights, cfg.dropout)
        # the BatchNorm images of a weights-none backbone: drawn by index, only those decoded
        pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(train))[:BN_RECALIBRATION_IMAGES])
        # (as the nested backbone sees them: through any preprocessing layers in front of it)
        bn_images = base_inputs(model, load_at(train.items, pick, size)) if weights.source == "none" else None
        # Said once the head phase's first pass found every image readable (a bad one fails with one line only).
        pending: list[str] = []
        if not state["completed"] and weights.source == "none":
            count = recalibrate_batchnorm(base, bn_images)
            pending.append(f"weights none: statistics of {count} BatchNorm layers set from training images")
        n_per_class = len(train) / len(folder.classes)
        pretrained = weights.source != "none"
        decision = decide_freeze(backbone, base, cfg.freeze, n_per_class, cfg.domain, pretrained)
        fine_tune_lr = fine_tune_learning_rate(cfg, pretrained)
        pending.append(f"weights: {weights.describe()}")
        pending.append(f"freeze: {decision.reason}")
        if not pretrained and cfg.fine_tune_epochs == 0:
            pending.append("weights none with fine_tune_epochs 0: only the head trains, on random features")
        phases = state["phases"]

        def say_pending() -> None:
            for message in pending:
                reporter.info(message)
            pending.clear()

        if "head" not in state["completed"]:
            for layer in base.layers:
                layer.trainable = False
            head = head_phase(cfg, model, train, val, reporter, cfg.seed, pretrained,
                              cache_dir=work / ".features.partial", logdir=work / "logs" / "head",
                              on_checked=say_pending)
            train, val = head.train, head.val
            _check_classes(folder, train)
            phases["head"] = head.record
            state["skipped"] = {"train": [str(p) for p in train.skipped], "val": [str(p) for p in val.skipped]}
            reporter.info(f"head phase: val_accuracy {phases['head']['val_accuracy']:.4f}")
            _checkpoint(work, model, state, "head")
        say_pending()  # (resumed after the head phase: said here)

        freeze_info = apply_freeze(base, decision)
        if "fine_tune" not in state["completed"]:
            if cfg.fine_tune_epochs > 0 and freeze_info["trainable_layers"] > 0:
                before = phases["head"]["val_accuracy"]
                saved = model.get_weights()
                rec = fit_phase("fine_tune", cfg, model, train, val, fine_tune_lr, cfg.fine_tune_epochs,
                                reporter, cfg.seed + 1,
                                callbacks=() if pretrained else (_BatchNormTracker(base, bn_images),),
                                logdir=work / "logs" / "fine_tune")
                rec["val_accuracy"] = stream_accuracy(model, val, image_size, cfg.batch_size)
                if rec["val_accuracy"] < before:
                    model.set_weights(saved)
                    rec["kept"] = "head weights (fine-tuning did not improve val accuracy)"
                    rec["val_accuracy_after"] = rec["val_accuracy"]
                    rec["val_accuracy"] = before
                phases["fine_tune"] = rec
                reporter.info(f"fine-tune phase: val_accuracy {rec['val_accuracy']:.4f}")
            else:
                why = "fine_tune_epochs is 0" if cfg.fine_tune_epochs == 0 else "nothing unfrozen (--freeze all)"
                phases["fine_tune"] = {"status": "skipped", "reason": why}
            _checkpoint(work, model, state, "fine_tune")

    float_acc = phases["fine_tune"].get("val_accuracy", phases["head"]["val_accuracy"])
    metrics = {"float_val_accuracy": float_acc}
    if cfg.qat:
        if "qat" not in state["completed"]:
            phases["qat"] = qat_phase(cfg, model, train, val, work, reporter)
            state["completed"].append("qat")
            _save_state(work, state)
        metrics.update(phases["qat"].get("metrics", {}))
    else:
        phases["qat"] = {"status": "skipped", "reason": "--no-qat"}
        (work / "qat.h5").unlink(missing_ok=True)
        shutil.rmtree(work / "logs" / "qat", ignore_errors=True)

    atomic_write_text(work / "labels.txt", "\n".join(folder.classes) + "\n")
    data_root = Path(os.path.abspath(cfg.data))
    val_root = Path(os.path.abspath(cfg.val_data)) if cfg.val_data else data_root
    splits = {
        "data_root": str(data_root),
        "val_root": str(val_root) if cfg.val_data else None,
        "train": [[_rel(p, data_root), int(label)] for p, label in train.items],
        "val": [[_rel(p, val_root), int(label)] for p, label in val.items],
        "skipped": [str(p) for p in train.skipped + val.skipped],
    }
    atomic_write_json(work / "splits.json", splits)
    _plot_curves(phases, work / "curves.png")

    loaded = weights.path or (keras_download_path(backbone) if weights.source == "imagenet" else None)
    files = {p.name: sha256_file(p) for p in sorted(work.iterdir()) if p.is_file() and not p.name.startswith(".")
             and p.name not in ("manifest.json", "progress.json")}
    files.update(_log_files(work))
    distribution = {"strategy": type(strategy).__name__, "replicas": int(strategy.num_replicas_in_sync)}
    if role.workers > 1:  # (TensorFlow's class behind MultiWorkerMirroredStrategy is CollectiveAllReduceStrategy)
        distribution.update({"strategy": "MultiWorkerMirroredStrategy", "workers": role.workers,
                             "chief": role.chief_name})
    manifest = {
        "schema": RUN_SCHEMA,
        "edgetl_version": __version__,
        "run_id": state["run_id"],
        "created": state["created"],
        "finished": now_iso(),
        "backbone": backbone.name,
        "image_size": [image_size, image_size],
        "labels": list(folder.classes),
        "input": {"layout": "NHWC", "height": image_size, "width": image_size, "channels": 3, "color": "RGB",
                  "dtype": "float32", "range": [0, 255], "preprocessing": backbone.preprocessing},
        "weights": weights_record(weights, loaded),
        "freeze": freeze_info,
        "seed": cfg.seed,
        "determinism": determinism,
        "distribution": distribution,
        "config": config,
        "versions": package_versions(),
        "data": {"classes": folder.counts, "train_images": int(len(train)), "val_images": int(len(val)),
                 "skipped_images": len(splits["skipped"])},
        "phases": {name: {k2: v for k2, v in rec.items() if k2 != "history"} for name, rec in phases.items()},
        "metrics": metrics,
        "completed_phases": list(state["completed"]),
        "files": files,
    }
    # checked again (nothing foreign may have appeared in the target while training), while progress.json still
    # lets a rerun resume
    check_target(run_dir, RUN_FOLDER, force)
    atomic_write_json(work / "manifest.json", manifest)
    (work / "progress.json").unlink(missing_ok=True)
    swap_dir(work, run_dir)
    return RunResult(run_dir, manifest)


def qat_phase(cfg, model, train: ImageList, val: ImageList, work: Path, reporter: Reporter) -> dict:
    """Phase 3: rewrite + annotate, calibrate ranges on training images, train at a low lr, measure int8 files.

    The calibration images are drawn by index and only those are decoded; accuracies stream the validation files."""
    from edgetl import qat
    from edgetl.convert.tflite import ptq_to_tflite_int8, qat_to_tflite_int8
    from edgetl.stream import load_at

    t0 = time.perf_counter()
    size = tuple(int(d) for d in model.input_shape[1:3])
    rng = np.random.default_rng(cfg.seed)
    calib_idx = rng.permutation(len(train))[: cfg.calibration_images]
    calib = load_at(train.items, np.sort(calib_idx), size).astype(np.float32)
    with reporter.task("QAT: rewrite, annotate, calibrate", None):
        qat_model = qat.quantize_for_training(model)
        qat.calibrate(qat_model, calib, batch_size=cfg.batch_size)
    calibrated_acc = stream_accuracy(qat_model, val, size[0], cfg.batch_size)
    rec = fit_phase("qat", cfg, qat_model, train, val, cfg.qat_lr, cfg.qat_epochs, reporter, cfg.seed + 2,
                    logdir=work / "logs" / "qat")
    fake_acc = stream_accuracy(qat_model, val, size[0], cfg.batch_size)
    qat.save_qat_model(qat_model, work / "qat.h5")
    with reporter.task("QAT: converting int8 TFLite (QAT and PTQ) to measure them", None):
        qat_int8 = tflite_accuracy(qat_to_tflite_int8(qat_model), val, image_size=size[0])
        ptq_int8 = tflite_accuracy(ptq_to_tflite_int8(model, calib), val, image_size=size[0])
    rec.update({
        "calibrated_val_accuracy": calibrated_acc,
        "val_accuracy": fake_acc,
        "calibration_images": int(len(calib)),
        "seconds": round(time.perf_counter() - t0, 2),
        "metrics": {"qat_val_accuracy": fake_acc, "qat_int8_val_accuracy": qat_int8, "ptq_int8_val_accuracy": ptq_int8},
    })
    reporter.info(f"QAT: fake-quant val_accuracy {fake_acc:.4f}, int8 TFLite {qat_int8:.4f} (PTQ int8 {ptq_int8:.4f})")
    return rec


# ---------------------------------------------------------------------------------------------------- persistence


def _read_state(work: Path, chash: str) -> dict | None:
    try:
        state = json.loads((work / "progress.json").read_text())
    except (OSError, ValueError):
        return None
    if state.get("config_hash") != chash or not (work / "float.keras").is_file():
        return None
    return state


def _save_state(work: Path, state: dict) -> None:
    atomic_write_json(work / "progress.json", state)


def _checkpoint(work: Path, model, state: dict, phase: str) -> None:
    tmp = work / ".float.partial.keras"
    model.save(tmp)
    os.replace(tmp, work / "float.keras")
    state["completed"].append(phase)
    _save_state(work, state)
