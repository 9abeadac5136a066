"""The three phases, in order: head on cached features of the frozen backbone, fine-tune (the backbone above the
freeze boundary unfrozen), QAT (edgetl.qat); and :func:`run_phases`, which runs those not yet completed in the
work folder, checkpointing after each."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

PHASES = ("head", "fine_tune", "qat")


@dataclass(frozen=True)
class HeadResult:
    record: dict  # the phase's manifest record
    train: ImageList  # the splits without unreadable images (--skip-bad-images)
    val: ImageList


def head_phase(
    cfg,
    model,
    train: ImageList,
    val: ImageList,
    reporter: Reporter,
    seed: int,
    pretrained: bool = True,
    cache_dir: Path | None = None,
    logdir: Path | None = None,
    on_checked=None,
) -> HeadResult:
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
                raise DataError(
                    "no readable images" if not len(train) else "no readable validation images", "check the data folder"
                )
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
            hist = head.fit(
                train_ds,
                validation_data=val_ds,
                epochs=cfg.epochs,
                verbose=0,
                callbacks=[stopper, _EpochProgress(task, best, stopper, cfg.epochs), *logs],
            )
        train_s = time.perf_counter() - t1
        # The classifier is the feature model followed by this head (its dropout inactive at inference), so its
        # validation accuracy is the head's on the cached validation features: no second decode and forward pass.
        val_acc = float(np.mean(np.argmax(predict_stream(head, val_ds), axis=1) == val.labels))
    finally:
        for f in files:
            f.close()
        shutil.rmtree(cache, ignore_errors=True)
    model.get_layer("predictions").set_weights(head.get_layer("predictions").get_weights())
    record = {
        "status": "done",
        "epochs": cfg.epochs,
        "epochs_run": best.get("epochs_run", cfg.epochs),
        "best_epoch": best.get("best_epoch"),
        "lr": cfg.head_lr,
        "feature_views": views,
        "cached_samples": int(len(y_train)),
        "cache_seconds": round(cache_s, 2),
        "train_seconds": round(train_s, 2),
        "val_accuracy": val_acc,
        "history": _history(hist),
    }
    return HeadResult(record, train, val)


def fit_phase(
    name,
    cfg,
    model,
    train: ImageList,
    val: ImageList,
    lr,
    epochs,
    reporter,
    seed,
    augment=True,
    callbacks=(),
    logdir: Path | None = None,
) -> dict:
    """End-to-end training of the trainable layers (fine-tune or QAT), early stopping on val accuracy; images are
    decoded from their files a batch at a time (:func:`edgetl.stream.image_dataset`)."""
    from edgetl._tfenv import keras
    from edgetl.stream import image_dataset

    k = keras()
    num_classes = model.output_shape[-1]
    size = tuple(int(d) for d in model.input_shape[1:3])
    model.compile(k.optimizers.Adam(lr), _loss(cfg, k), metrics=["accuracy"])
    train_ds = image_dataset(
        train.items,
        size,
        cfg.batch_size,
        shuffle_seed=seed,
        targets=_targets(train.labels, cfg, num_classes),
        augment=make_augmenter(cfg, seed) if augment else None,
    )
    val_ds = image_dataset(val.items, size, cfg.batch_size, targets=_targets(val.labels, cfg, num_classes))
    steps = -(-len(train) // cfg.batch_size)
    best: dict = {}
    stopper = _early_stopping(k, cfg)
    logs = (_TrainingLog(logdir),) if logdir is not None else ()
    t0 = time.perf_counter()
    with reporter.task(f"{name} phase", steps * epochs) as task:
        hist = model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=epochs,
            verbose=0,
            callbacks=[stopper, _EpochProgress(task, best, stopper, epochs), *logs, *callbacks],
        )
    return {
        "status": "done",
        "epochs": epochs,
        "epochs_run": best.get("epochs_run", epochs),
        "best_epoch": best.get("best_epoch"),
        "lr": lr,
        "train_seconds": round(time.perf_counter() - t0, 2),
        "history": _history(hist),
    }


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
        "qat",
        cfg,
        qat_model,
        train,
        val,
        cfg.qat_lr,
        cfg.qat_epochs,
        reporter,
        cfg.seed + 2,
        logdir=work / "logs" / "qat",
    )
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
        cfg,
        model,
        train,
        val,
        ctx.reporter,
        cfg.seed,
        pretrained,
        cache_dir=work / ".features.partial",
        logdir=work / "logs" / "head",
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
            "fine_tune",
            cfg,
            model,
            train,
            val,
            fine_tune_learning_rate(cfg, pretrained),
            cfg.fine_tune_epochs,
            ctx.reporter,
            cfg.seed + 1,
            callbacks=() if pretrained else (_BatchNormTracker(base, bn_images),),
            logdir=ctx.work / "logs" / "fine_tune",
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
