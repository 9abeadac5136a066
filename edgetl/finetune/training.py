"""What every training phase shares: seeds and determinism, augmentation, loss and targets, early stopping, the
progress and log callbacks (``logs/PHASE/history.csv`` and TensorBoard scalars), and accuracy on streamed images or
with LiteRT."""

from __future__ import annotations

import os
import random
import shutil
import weakref
from pathlib import Path

import numpy as np

from edgetl.config import FinetuneConfig
from edgetl.data import ImageList
from edgetl.fsutil import atomic_write_text


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
    """A Keras callback driving a Reporter task: one tick per batch (also under ``steps_per_execution``), metrics
    per epoch; after early stopping the task's last status says so (the bar then ends at what was done, see
    RichReporter)."""

    def __new__(cls, task, best: dict, stopper=None, epochs: int | None = None):
        from edgetl._tfenv import keras

        class _Callback(keras().callbacks.Callback):
            done = 0  # batches of this epoch counted so far

            def on_epoch_begin(self, epoch, logs=None):
                self.done = 0

            def on_train_batch_end(self, batch, logs=None):
                # ``batch`` is the index of the last batch run: several per call with steps_per_execution
                task.advance(batch + 1 - self.done)
                self.done = batch + 1

            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                best["epochs_run"] = epoch + 1
                best["shown"] = dict(
                    epoch=epoch + 1,
                    loss=float(logs.get("loss", np.nan)),
                    val_acc=float(logs.get("val_accuracy", np.nan)),
                )
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
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        ).SerializeToString()
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


def _loss(cfg: FinetuneConfig, k):
    if cfg.label_smoothing:
        return k.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing)
    return "sparse_categorical_crossentropy"


def _targets(labels: np.ndarray, cfg: FinetuneConfig, num_classes: int) -> np.ndarray:
    if cfg.label_smoothing:
        return np.eye(num_classes, dtype=np.float32)[labels]
    return labels


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


def tflite_accuracy(
    content: bytes, images, labels: np.ndarray | None = None, image_size: int | None = None, chunk: int = 256
) -> float:
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
