"""The three phases, in order: head on cached features of the frozen backbone, fine-tune (the backbone above the
freeze boundary unfrozen), QAT (edgetl.qat); and :func:`run_phases`, which runs those not yet completed in the
work folder, checkpointing after each."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl.backbones import Backbone
from edgetl.config import FinetuneConfig
from edgetl.data import ImageFolder, ImageList
from edgetl.errors import DataError
from edgetl.finetune.freeze import apply_freeze, decide_freeze, fine_tune_learning_rate
from edgetl.finetune.model import (
    BN_RECALIBRATION_IMAGES,
    _BatchNormTracker,
    base_inputs,
    build_classifier,
    get_base,
    recalibrate_batchnorm,
)
from edgetl.finetune.resume import _checkpoint, _save_state
from edgetl.finetune.training import (
    _early_stopping,
    _EpochProgress,
    _history,
    _loss,
    _targets,
    _TrainingLog,
    make_augmenter,
    predict_stream,
    set_seeds,
    stream_accuracy,
    tflite_accuracy,
)
from edgetl.progress import Reporter
from edgetl.weights import WeightsChoice

if TYPE_CHECKING:
    from edgetl.stream import BadImages, FeatureFile

PHASES = ("head", "fine_tune", "qat")


@dataclass(frozen=True)
class PhaseContext:
    """What a training phase gets: the config, the model it trains, the splits, where it reports and logs."""

    cfg: FinetuneConfig
    model: Any  # the classifier (backbone + head), or its QAT rewrite
    train: ImageList
    val: ImageList
    reporter: Reporter
    seed: int  # shuffling and augmentation
    logdir: Path | None = None  # history.csv and TensorBoard scalars (none: not written)


@dataclass(frozen=True)
class FitSettings:
    """What differs between the phases that fit a model: name (in the progress task), learning rate, epochs."""

    name: str
    lr: float
    epochs: int
    augment: bool = True  # augment the training images (the head phase's augmentation is its cached views)
    callbacks: tuple = ()  # after early stopping, progress and the training log


@dataclass(frozen=True)
class HeadResult:
    record: dict  # the phase's manifest record
    train: ImageList  # the splits without unreadable images (--skip-bad-images)
    val: ImageList


def head_phase(
    ctx: PhaseContext, pretrained: bool = True, cache_dir: Path | None = None, on_checked=None
) -> HeadResult:
    """Train the head on cached features of the frozen backbone (clean features only from a random backbone:
    augmented views of random features are not worth their time).

    Images are decoded from their files batch by batch; the features (one file per split and view) go to
    ``cache_dir`` (default: a fresh temporary folder), are streamed from there for training and deleted at the end.
    The first (clean) pass over the images also finds the unreadable ones: DataError naming them, unless
    ``cfg.skip_bad_images`` (then they are left out of every later pass and returned as skipped). ``on_checked``
    is called once every image was found readable (or skipped).
    """
    cache = _feature_cache(ctx, pretrained, cache_dir)
    try:
        cached = _cache_features(ctx, cache, on_checked)
        trained = _train_head(ctx, cache, cached)
    finally:
        cache.close()
    ctx.model.get_layer("predictions").set_weights(trained.head.get_layer("predictions").get_weights())
    return HeadResult(_head_record(cache, cached, trained), cached.train, cached.val)


@dataclass(frozen=True)
class _FeatureCache:
    """The frozen backbone's pooled features of images, written batch by batch to one file per split and view in
    ``folder``; :meth:`close` closes the files and deletes the folder."""

    folder: Path
    clean: Any  # tf.function: a batch of images -> their features
    augmented: Any  # the same through the augmentation layers
    views: int  # augmented views per training image
    size: tuple[int, int]
    width: int  # features per image
    batch_size: int
    files: list = field(default_factory=list)

    def extract(self, images: ImageList, name: str, view: int, task, bad: BadImages | None = None) -> FeatureFile:
        from edgetl.stream import FeatureFile, image_dataset

        f = FeatureFile(self.folder / f"{name}-view{view}.f32", self.width)
        self.files.append(f)
        fn = self.augmented if view > 0 else self.clean
        for batch in image_dataset(images.items, self.size, self.batch_size, bad=bad, as_float=False):
            feats = fn(batch[0]).numpy()
            f.append(feats if bad is None else feats[batch[2].numpy()])
            task.advance(1)
        f.finish()
        return f

    def close(self) -> None:
        for f in self.files:
            f.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _feature_cache(ctx: PhaseContext, pretrained: bool, cache_dir: Path | None) -> _FeatureCache:
    """The feature model (the classifier up to its pooling) and its feature functions; an empty cache folder."""
    import tempfile

    from edgetl._tfenv import keras, tf
    from edgetl.config import FEATURE_BATCH

    k, tf = keras(), tf()
    feature_model = k.Model(ctx.model.input, ctx.model.get_layer("pool").output)
    augment = make_augmenter(ctx.cfg, ctx.seed)
    size = tuple(int(d) for d in ctx.model.input_shape[1:3])

    # one trace for every batch size (the last batch is smaller): uint8 images of any count
    images = tf.TensorSpec((None, *size, 3), tf.uint8)

    @tf.function(input_signature=[images])
    def clean_features(batch):
        return feature_model(tf.cast(batch, tf.float32), training=False)

    @tf.function(input_signature=[images])
    def augmented_features(batch):
        return feature_model(augment(tf.cast(batch, tf.float32), training=True), training=False)

    if augment is not None:  # build the augmentation layers' state outside tf.function
        augment(tf.zeros((1,) + size + (3,)), training=True)

    if cache_dir is None:
        folder = Path(tempfile.mkdtemp(prefix="edgetl-features-"))
    else:
        folder = Path(cache_dir)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    views = ctx.cfg.feature_views if augment is not None and pretrained else 0
    width = int(feature_model.output_shape[-1])
    return _FeatureCache(
        folder, clean_features, augmented_features, views, size, width, max(ctx.cfg.batch_size, FEATURE_BATCH)
    )


@dataclass(frozen=True)
class _CachedFeatures:
    train: ImageList  # the splits without unreadable images
    val: ImageList
    train_files: list  # FeatureFile per view: the clean one first
    val_file: Any  # FeatureFile (clean)
    seconds: float


def _cache_features(ctx: PhaseContext, cache: _FeatureCache, on_checked) -> _CachedFeatures:
    """The clean pass over both splits (finding the unreadable images), then the augmented views of the training
    images that are left."""
    from edgetl.stream import BadImages

    t0 = time.perf_counter()
    bs, views = cache.batch_size, cache.views
    n_batches = -(-len(ctx.train) // bs) * (1 + views) + -(-len(ctx.val) // bs)
    with ctx.reporter.task(f"caching features (1+{views} views)", n_batches) as task:
        bad_train, bad_val = BadImages(), BadImages()
        train_files = [cache.extract(ctx.train, "train", 0, task, bad_train)]
        val_file = cache.extract(ctx.val, "val", 0, task, bad_val)
        train, val = _without_bad_images(ctx, bad_train, bad_val)
        if on_checked is not None:
            on_checked()
        for view in range(1, 1 + views):
            train_files.append(cache.extract(train, "train", view, task))
    return _CachedFeatures(train, val, train_files, val_file, time.perf_counter() - t0)


def _without_bad_images(ctx: PhaseContext, bad_train: BadImages, bad_val: BadImages) -> tuple[ImageList, ImageList]:
    """The splits without the unreadable images; DataError naming them unless ``cfg.skip_bad_images``, or when a
    split has none left."""
    from edgetl.stream import BadImages

    merged = BadImages()
    for i, (path, why) in enumerate([*bad_train.reasons.values(), *bad_val.reasons.values()]):
        merged.add(i, path, why)
    merged.raise_unless(ctx.cfg.skip_bad_images)
    train = ctx.train.without([p for p, _ in bad_train.reasons.values()])
    val = ctx.val.without([p for p, _ in bad_val.reasons.values()])
    if not len(train) or not len(val):
        raise DataError(
            "no readable images" if not len(train) else "no readable validation images", "check the data folder"
        )
    return train, val


@dataclass(frozen=True)
class _Fitted:
    settings: FitSettings
    history: Any  # keras' History
    best: dict  # epochs_run and best_epoch (_EpochProgress)
    seconds: float


@dataclass(frozen=True)
class _TrainedHead:
    head: Any  # the head model: features -> dropout -> predictions
    fitted: _Fitted
    samples: int  # cached training samples (images x (1 + views))
    val_accuracy: float


def _train_head(ctx: PhaseContext, cache: _FeatureCache, cached: _CachedFeatures) -> _TrainedHead:
    """Fit a dropout+softmax head on the cached features; its accuracy on the cached validation features."""
    from edgetl._tfenv import keras
    from edgetl.config import HEAD_STEPS_PER_EXECUTION
    from edgetl.stream import feature_dataset

    k, cfg, bs = keras(), ctx.cfg, ctx.cfg.batch_size
    num_classes = ctx.model.output_shape[-1]
    y_train = np.tile(cached.train.labels, 1 + cache.views)
    train_ds = feature_dataset(cached.train_files, _targets(y_train, cfg, num_classes), bs, shuffle_seed=ctx.seed)
    val_ds = feature_dataset([cached.val_file], _targets(cached.val.labels, cfg, num_classes), bs)
    head_in = k.Input((cache.width,), name="features")
    h = k.layers.Dropout(cfg.dropout, name="dropout")(head_in)
    head_out = k.layers.Dense(num_classes, activation="softmax", name="predictions")(h)
    head = k.Model(head_in, head_out)
    head.compile(
        k.optimizers.Adam(cfg.head_lr),
        _loss(cfg, k),
        metrics=["accuracy"],
        steps_per_execution=HEAD_STEPS_PER_EXECUTION,
    )
    settings = FitSettings("head", cfg.head_lr, cfg.epochs, augment=False)
    fitted = _fit(ctx, head, (train_ds, val_ds), -(-len(y_train) // bs), settings)
    # The classifier is the feature model followed by this head (its dropout inactive at inference), so its
    # validation accuracy is the head's on the cached validation features: no second decode and forward pass.
    val_acc = float(np.mean(np.argmax(predict_stream(head, val_ds), axis=1) == cached.val.labels))
    return _TrainedHead(head, fitted, int(len(y_train)), val_acc)


def _head_record(cache: _FeatureCache, cached: _CachedFeatures, trained: _TrainedHead) -> dict:
    fitted = trained.fitted
    return {
        **_fit_record(fitted),
        "feature_views": cache.views,
        "cached_samples": trained.samples,
        "cache_seconds": round(cached.seconds, 2),
        "train_seconds": fitted.seconds,
        "val_accuracy": trained.val_accuracy,
        "history": _history(fitted.history),
    }


def _fit(ctx: PhaseContext, model, datasets: tuple, steps: int, settings: FitSettings) -> _Fitted:
    """``model.fit`` on (train, validation) datasets of ``steps`` batches an epoch, early stopping on val accuracy,
    with the phase's progress task and training log."""
    from edgetl._tfenv import keras

    train_ds, val_ds = datasets
    best: dict = {}
    stopper = _early_stopping(keras(), ctx.cfg)
    logs = (_TrainingLog(ctx.logdir),) if ctx.logdir is not None else ()
    t0 = time.perf_counter()
    with ctx.reporter.task(f"{settings.name} phase", steps * settings.epochs) as task:
        hist = model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=settings.epochs,
            verbose=0,
            callbacks=[stopper, _EpochProgress(task, best, stopper, settings.epochs), *logs, *settings.callbacks],
        )
    return _Fitted(settings, hist, best, round(time.perf_counter() - t0, 2))


def _fit_record(fitted: _Fitted) -> dict:
    """A fitting phase's record, up to its learning rate."""
    s, best = fitted.settings, fitted.best
    return {
        "status": "done",
        "epochs": s.epochs,
        "epochs_run": best.get("epochs_run", s.epochs),
        "best_epoch": best.get("best_epoch"),
        "lr": s.lr,
    }


def fit_phase(ctx: PhaseContext, settings: FitSettings) -> dict:
    """End-to-end training of the trainable layers (fine-tune or QAT), early stopping on val accuracy; images are
    decoded from their files a batch at a time (:func:`edgetl.stream.image_dataset`)."""
    from edgetl._tfenv import keras
    from edgetl.stream import image_dataset

    k, cfg, model = keras(), ctx.cfg, ctx.model
    num_classes = model.output_shape[-1]
    size = tuple(int(d) for d in model.input_shape[1:3])
    model.compile(k.optimizers.Adam(settings.lr), _loss(cfg, k), metrics=["accuracy"])
    train_ds = image_dataset(
        ctx.train.items,
        size,
        cfg.batch_size,
        shuffle_seed=ctx.seed,
        targets=_targets(ctx.train.labels, cfg, num_classes),
        augment=make_augmenter(cfg, ctx.seed) if settings.augment else None,
    )
    val_ds = image_dataset(ctx.val.items, size, cfg.batch_size, targets=_targets(ctx.val.labels, cfg, num_classes))
    fitted = _fit(ctx, model, (train_ds, val_ds), -(-len(ctx.train) // cfg.batch_size), settings)
    return {**_fit_record(fitted), "train_seconds": fitted.seconds, "history": _history(fitted.history)}


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
    rec = fit_phase(
        PhaseContext(cfg, qat_model, train, val, reporter, cfg.seed + 2, logdir=work / "logs" / "qat"),
        FitSettings("qat", cfg.qat_lr, cfg.qat_epochs),
    )
    # weights and biases as the int8 files hold them (on their grids), so the QAT model computes what they do
    snapped = qat.snap_to_grid(qat_model)
    fake_acc = stream_accuracy(qat_model, val, size[0], cfg.batch_size)
    qat.save_qat_model(qat_model, work / "qat.h5")
    with reporter.task("QAT: converting int8 TFLite (QAT and PTQ) to measure them", None):
        qat_int8 = tflite_accuracy(qat_to_tflite_int8(qat_model), val, image_size=size[0])
        ptq_int8 = tflite_accuracy(ptq_to_tflite_int8(model, calib), val, image_size=size[0])
    rec.update(
        {
            "calibrated_val_accuracy": calibrated_acc,
            "val_accuracy": fake_acc,
            "calibration_images": int(len(calib)),
            "snapped_to_grid": snapped,  # layers whose kernel / bias moved onto the int8 grid
            "seconds": round(time.perf_counter() - t0, 2),
            "metrics": {
                "qat_val_accuracy": fake_acc,
                "qat_int8_val_accuracy": qat_int8,
                "ptq_int8_val_accuracy": ptq_int8,
            },
        }
    )
    reporter.info(f"QAT: fake-quant val_accuracy {fake_acc:.4f}, int8 TFLite {qat_int8:.4f} (PTQ int8 {ptq_int8:.4f})")
    return rec


def qat_loss_warning(float_acc: float, qat_int8_acc: float | None, n_val: int) -> str | None:
    """A warning line when the QAT int8 file ends more than verify's accuracy margin below the float model on the
    validation split (a weak model, too few QAT epochs): ``edgetl verify`` will then not pass it."""
    from edgetl.config import VerifyConfig

    margin = VerifyConfig.model_fields["margin_pp"].default
    if qat_int8_acc is None or (float_acc - qat_int8_acc) * 100 <= margin:
        return None
    return (
        f"warning: the QAT int8 file's val accuracy {qat_int8_acc:.4f} is {(float_acc - qat_int8_acc) * 100:.1f} pp "
        f"below the float model's {float_acc:.4f} ({n_val} images; verify's margin is {margin:g} pp): train QAT "
        "longer (--qat-epochs), add images, or ship a float file"
    )


# ------------------------------------------------------------------------------------------- the phases of one run


@dataclass(frozen=True)
class RunContext:
    """What the phases of one run and the writing of its run directory share (made by ``finetune()``)."""

    cfg: FinetuneConfig
    reporter: Reporter
    backbone: Backbone
    image_size: int
    weights: WeightsChoice
    run_dir: Path  # where the finished run goes (a non-chief worker: its private temporary folder)
    folder: ImageFolder  # the scanned training folder: classes and per-class counts
    train_items: list
    val_items: list
    config: dict  # the config as the manifest records it
    work: Path  # the hidden work folder (``.NAME.partial``): checkpoints, progress.json, logs
    state: dict  # progress.json's content: completed phases and their records (updated in place)
    force: bool
    strategy: Any  # the tf.distribute strategy (edgetl.distribute.select_strategy)
    role: Any  # edgetl.distribute.ClusterRole


@dataclass(frozen=True)
class Trained:
    """What the phases leave for the run directory."""

    phases: dict  # per phase: its record (with its history)
    metrics: dict
    freeze: dict  # apply_freeze's counts
    determinism: dict  # set_seeds' record
    train: ImageList  # the splits without unreadable images
    val: ImageList


def _check_classes(folder: ImageFolder, train: ImageList) -> None:
    present = set(train.labels.tolist())
    if len(present) < len(folder.classes):
        missing = sorted(set(range(len(folder.classes))) - present)
        raise DataError(
            f"class(es) {', '.join(folder.classes[i] for i in missing)} have no readable training image",
            "add images to them",
        )


def run_phases(ctx: RunContext) -> Trained:
    """Run the phases ``ctx.state`` does not list as completed (a resumed run starts from its last checkpoint)."""
    from edgetl.stream import load_at

    cfg, state, work = ctx.cfg, ctx.state, ctx.work
    determinism = set_seeds(cfg.seed)
    size = (ctx.image_size, ctx.image_size)
    train = ImageList(tuple(ctx.train_items))
    val = ImageList(tuple(ctx.val_items))
    if state.get("skipped"):  # resumed: the unreadable images the head phase found
        train, val = train.without(state["skipped"]["train"]), val.without(state["skipped"]["val"])
    pretrained = ctx.weights.source != "none"
    with ctx.strategy.scope():
        # The model before the images: a weights file that does not fit fails in seconds, before decoding a
        # large data set.
        if state["completed"]:
            from edgetl.export.context import load_float_model

            model = load_float_model(work / "float.keras")  # safe mode, .keras (zip) only
            base = get_base(model)
        else:
            model, base = build_classifier(
                ctx.backbone, ctx.image_size, len(ctx.folder.classes), ctx.weights, cfg.dropout
            )
        # the BatchNorm images of a weights-none backbone: drawn by index, only those decoded
        pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(train))[:BN_RECALIBRATION_IMAGES])
        # (as the nested backbone sees them: through any preprocessing layers in front of it)
        bn_images = base_inputs(model, load_at(train.items, pick, size)) if not pretrained else None
        # Said once the head phase's first pass found every image readable (a bad one fails with one line only).
        pending: list[str] = []
        if not state["completed"] and not pretrained:
            count = recalibrate_batchnorm(base, bn_images)
            pending.append(f"weights none: statistics of {count} BatchNorm layers set from training images")
        n_per_class = len(train) / len(ctx.folder.classes)
        decision = decide_freeze(ctx.backbone, base, cfg.freeze, n_per_class, cfg.domain, pretrained)
        pending.append(f"weights: {ctx.weights.describe()}")
        pending.append(f"freeze: {decision.reason}")
        if not pretrained and cfg.fine_tune_epochs == 0:
            pending.append("weights none with fine_tune_epochs 0: only the head trains, on random features")

        def say_pending() -> None:
            for message in pending:
                ctx.reporter.info(message)
            pending.clear()

        if "head" not in state["completed"]:
            train, val = _head_step(ctx, model, base, train, val, pretrained, on_checked=say_pending)
        say_pending()  # (resumed after the head phase: said here)

        freeze_info = apply_freeze(base, decision)
        if "fine_tune" not in state["completed"]:
            _fine_tune_step(ctx, model, base, train, val, freeze_info, pretrained, bn_images)

    phases = state["phases"]
    float_acc = phases["fine_tune"].get("val_accuracy", phases["head"]["val_accuracy"])
    metrics = {"float_val_accuracy": float_acc}
    if cfg.qat:
        if "qat" not in state["completed"]:
            phases["qat"] = qat_phase(cfg, model, train, val, work, ctx.reporter)
            state["completed"].append("qat")
            _save_state(work, state)
        metrics.update(phases["qat"].get("metrics", {}))
        warning = qat_loss_warning(float_acc, metrics.get("qat_int8_val_accuracy"), len(val))
        if warning:
            ctx.reporter.info(warning)
    else:
        phases["qat"] = {"status": "skipped", "reason": "--no-qat"}
        (work / "qat.h5").unlink(missing_ok=True)
        shutil.rmtree(work / "logs" / "qat", ignore_errors=True)
    return Trained(phases, metrics, freeze_info, determinism, train, val)


def _head_step(
    ctx: RunContext, model, base, train: ImageList, val: ImageList, pretrained: bool, on_checked
) -> tuple[ImageList, ImageList]:
    """Phase 1 with the whole base frozen; records the unreadable images it found; checkpoint."""
    cfg, state, work = ctx.cfg, ctx.state, ctx.work
    for layer in base.layers:
        layer.trainable = False
    head = head_phase(
        PhaseContext(cfg, model, train, val, ctx.reporter, cfg.seed, logdir=work / "logs" / "head"),
        pretrained,
        cache_dir=work / ".features.partial",
        on_checked=on_checked,
    )
    train, val = head.train, head.val
    _check_classes(ctx.folder, train)
    state["phases"]["head"] = head.record
    state["skipped"] = {"train": [str(p) for p in train.skipped], "val": [str(p) for p in val.skipped]}
    ctx.reporter.info(f"head phase: val_accuracy {state['phases']['head']['val_accuracy']:.4f}")
    _checkpoint(work, model, state, "head")
    return train, val


def _fine_tune_step(
    ctx: RunContext, model, base, train: ImageList, val: ImageList, freeze_info: dict, pretrained: bool, bn_images
) -> None:
    """Phase 2 (or its skipped record); the head's weights are kept when fine-tuning did not improve val accuracy;
    checkpoint."""
    cfg, phases = ctx.cfg, ctx.state["phases"]
    if cfg.fine_tune_epochs > 0 and freeze_info["trainable_layers"] > 0:
        before = phases["head"]["val_accuracy"]
        saved = model.get_weights()
        rec = fit_phase(
            PhaseContext(cfg, model, train, val, ctx.reporter, cfg.seed + 1, logdir=ctx.work / "logs" / "fine_tune"),
            FitSettings(
                "fine_tune",
                fine_tune_learning_rate(cfg, pretrained),
                cfg.fine_tune_epochs,
                callbacks=() if pretrained else (_BatchNormTracker(base, bn_images),),
            ),
        )
        rec["val_accuracy"] = stream_accuracy(model, val, ctx.image_size, cfg.batch_size)
        if rec["val_accuracy"] < before:
            model.set_weights(saved)
            rec["kept"] = "head weights (fine-tuning did not improve val accuracy)"
            rec["val_accuracy_after"] = rec["val_accuracy"]
            rec["val_accuracy"] = before
        phases["fine_tune"] = rec
        ctx.reporter.info(f"fine-tune phase: val_accuracy {rec['val_accuracy']:.4f}")
    else:
        why = "fine_tune_epochs is 0" if cfg.fine_tune_epochs == 0 else "nothing unfrozen (--freeze all)"
        phases["fine_tune"] = {"status": "skipped", "reason": why}
    _checkpoint(ctx.work, model, ctx.state, "fine_tune")
