"""The streaming input pipeline (edgetl.stream): the same pixels, features and order as decoding the files directly,
and cached features read back from disk exactly. Cheap: 32 px, a few dozen images, a tiny conv net."""

from __future__ import annotations

import numpy as np
import pytest

from edgetl.data import ImageList, load_images, scan_folder
from edgetl.errors import DataError


@pytest.fixture(scope="module")
def items(shapes_dir):
    return scan_folder(shapes_dir).items  # 3 classes x 16 images, 48 px, decoded at 32 px below


def _tiny_model():
    from edgetl._tfenv import keras

    k = keras()
    inputs = k.Input((32, 32, 3), name="image")
    x = k.layers.Rescaling(1 / 127.5, -1)(inputs)
    x = k.layers.Conv2D(8, 3, strides=2, activation="relu", kernel_initializer=k.initializers.GlorotUniform(1))(x)
    x = k.layers.GlobalAveragePooling2D(name="pool")(x)
    x = k.layers.Dropout(0.1, name="dropout")(x)
    return k.Model(inputs, k.layers.Dense(3, activation="softmax", name="predictions")(x))


def test_streamed_images_are_the_directly_decoded_ones_in_order(items):
    from edgetl.stream import image_dataset

    direct = load_images(items, (32, 32))
    batches = list(image_dataset(items, (32, 32), 10))
    assert [len(x) for x, _ in batches] == [10, 10, 10, 10, 8]
    images = np.concatenate([x.numpy() for x, _ in batches])
    labels = np.concatenate([y.numpy() for _, y in batches])
    assert images.dtype == np.float32
    np.testing.assert_array_equal(images, direct.images.astype(np.float32))  # bit-identical pixels
    np.testing.assert_array_equal(labels, direct.labels)


def test_shuffled_stream_is_seeded_and_keeps_image_label_pairs(items):
    from edgetl.stream import image_dataset

    direct = load_images(items, (32, 32))
    key = {direct.images[i].tobytes(): int(direct.labels[i]) for i in range(len(direct.labels))}

    def epoch_orders(seed):
        ds = image_dataset(items, (32, 32), 16, shuffle_seed=seed, as_float=False)
        orders = []
        for _ in range(2):  # two epochs: reshuffled each time
            xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
            x, y = np.concatenate(xs), np.concatenate(ys)
            assert [key[img.tobytes()] for img in x] == y.tolist()  # every image still has its own label
            orders.append(y.tolist())
        return orders

    a, b = epoch_orders(5), epoch_orders(5)
    assert a == b  # same seed, same order, epoch by epoch
    assert a[0] != a[1]  # reshuffled between epochs
    assert sorted(a[0]) == sorted(direct.labels.tolist()) and a[0] != direct.labels.tolist()


def test_streamed_features_equal_features_of_directly_decoded_images(items, tmp_path):
    """The head phase's pipeline: stream -> feature model -> file on disk -> batches back; against the in-memory
    path (decode all, one forward pass)."""
    from edgetl._tfenv import keras, tf
    from edgetl.stream import FeatureFile, feature_dataset, image_dataset

    model = _tiny_model()
    features = keras().Model(model.input, model.get_layer("pool").output)
    direct = load_images(items, (32, 32))
    expected = features.predict(direct.images.astype(np.float32), verbose=0)

    f = FeatureFile(tmp_path / "train-view0.f32", expected.shape[1])
    for x, _ in image_dataset(items, (32, 32), 7, as_float=False):
        f.append(features(np.asarray(x, np.float32), training=False).numpy())
    f.finish()
    np.testing.assert_allclose(f.read_all(), expected, rtol=1e-5, atol=1e-6)

    # read back as training batches: in order, and shuffled (rows still paired with their targets)
    targets = direct.labels
    rows = [(x.numpy(), y.numpy()) for x, y in feature_dataset([f], targets, 8)]
    np.testing.assert_allclose(np.concatenate([r[0] for r in rows]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([r[1] for r in rows]), targets)
    two = FeatureFile(tmp_path / "second.f32", expected.shape[1])
    two.append(expected[::-1])
    two.finish()
    both_targets = np.concatenate([targets, targets[::-1]])
    shuffled = [(x.numpy(), y.numpy()) for x, y in feature_dataset([f, two], both_targets, 8, shuffle_seed=1)]
    xs, ys = np.concatenate([s[0] for s in shuffled]), np.concatenate([s[1] for s in shuffled])
    assert len(xs) == 2 * len(expected) and ys.tolist() != both_targets.tolist()
    by_row = {expected[i].round(5).tobytes(): int(targets[i]) for i in range(len(targets))}
    assert [by_row[row.round(5).tobytes()] for row in xs] == ys.tolist()

    # under the in-memory budget (the default, for files this small) the rows are read once, up front; above it
    # (budget 0) a batch at a time from disk: the same batches, shuffled alike
    def batches(ds):
        return [(x.numpy(), y.numpy()) for x, y in ds]

    in_memory = feature_dataset([f, two], both_targets, 8, shuffle_seed=1)
    from_disk = feature_dataset([f, two], both_targets, 8, shuffle_seed=1, in_memory_bytes=0)
    for (xm, ym), (xd, yd) in zip(batches(in_memory), batches(from_disk), strict=True):
        np.testing.assert_array_equal(xm, xd)
        np.testing.assert_array_equal(ym, yd)
    f.close()
    two.close()
    f.path.unlink()
    two.path.unlink()
    assert len(batches(in_memory)) == len(shuffled)  # needs no file any more
    with pytest.raises(tf().errors.InvalidArgumentError):  # reads the (closed, deleted) files
        batches(from_disk)


def test_head_phase_streams_skips_bad_images_and_cleans_its_cache(shapes_dir, tmp_path):
    import shutil

    from edgetl.config import FinetuneConfig
    from edgetl.finetune import PhaseContext, head_phase, set_seeds
    from edgetl.progress import NullReporter

    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    (data / "circle" / "broken.jpg").write_bytes(b"not a jpeg at all")
    folder = scan_folder(data)
    train = ImageList(tuple(it for i, it in enumerate(folder.items) if i % 4))
    val = ImageList(tuple(it for i, it in enumerate(folder.items) if not i % 4))
    broken = [p for p, _ in folder.items if p.name == "broken.jpg"]
    cfg = FinetuneConfig(data=str(data), epochs=2, batch_size=8, feature_views=1, seed=0)
    set_seeds(0)
    with pytest.raises(DataError, match="1 unreadable image.*broken.jpg"):
        head_phase(PhaseContext(cfg, _tiny_model(), train, val, NullReporter(), 0), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()

    cfg.skip_bad_images = True
    model = _tiny_model()
    result = head_phase(
        PhaseContext(cfg, model, train, val, NullReporter(), 0, logdir=tmp_path / "logs"), cache_dir=tmp_path / "cache"
    )
    assert not (tmp_path / "cache").exists()  # cached features deleted after training
    skipped = result.train.skipped + result.val.skipped
    assert list(skipped) == broken
    rec = result.record
    assert rec["cached_samples"] == 2 * len(result.train) == 2 * (len(train) - len(result.train.skipped))
    assert rec["epochs_run"] == 2 and 1 <= rec["best_epoch"] <= 2
    lines = (tmp_path / "logs" / "history.csv").read_text().splitlines()
    assert lines[0] == "epoch,accuracy,loss,val_accuracy,val_loss" and len(lines) == 3
    np.testing.assert_allclose([float(r.split(",")[3]) for r in lines[1:]], rec["history"]["val_accuracy"])
    # the recorded accuracy (the head on the cached validation features) is the whole classifier's on the files
    from edgetl.finetune.training import predict_stream
    from edgetl.stream import image_dataset

    probs = predict_stream(model, image_dataset(result.val.items, (32, 32), 8))
    assert rec["val_accuracy"] == float(np.mean(np.argmax(probs, axis=1) == result.val.labels))


def test_run_directory_has_training_logs_edgetl_owns(cli_run):
    """history.csv and TensorBoard scalars per phase, matching the manifest's history; listed in the manifest's
    files, so the run stays provably edgetl's own (a rerun with --force may replace it)."""
    import json

    from edgetl._tfenv import tf
    from edgetl.fsutil import check_target, foreign_entries, sha256_file
    from edgetl.manifest import RUN_FOLDER

    m = json.loads((cli_run / "manifest.json").read_text())
    for phase in ("head", "fine_tune", "qat"):
        rec = m["phases"][phase]
        assert 1 <= rec["best_epoch"] <= rec["epochs_run"], rec
        rows = (cli_run / "logs" / phase / "history.csv").read_text().splitlines()
        assert rows[0] == "epoch,accuracy,loss,val_accuracy,val_loss" and len(rows) == 1 + rec["epochs_run"]
        val_acc = [float(r.split(",")[3]) for r in rows[1:]]
        events = {}
        for split in ("train", "validation"):
            (event_file,) = (cli_run / "logs" / phase / split).iterdir()
            for e in tf().compat.v1.train.summary_iterator(str(event_file)):
                for v in e.summary.value:
                    events[(split, v.tag, e.step)] = float(tf().make_ndarray(v.tensor))
        assert [events[("validation", "epoch_accuracy", i)] for i in range(len(val_acc))] == pytest.approx(val_acc)
        assert ("train", "epoch_loss", 0) in events
    logs = {name: digest for name, digest in m["files"].items() if name.startswith("logs/")}
    assert len(logs) == 9  # 3 phases x (history.csv + 2 event files)
    assert all(sha256_file(cli_run / name) == digest for name, digest in logs.items())
    assert foreign_entries(cli_run, RUN_FOLDER) == []
    assert check_target(cli_run, RUN_FOLDER, force=True) is True


@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_progress_after_early_stopping_ends_at_what_ran_and_says_so(steps_per_execution):
    """A real Keras fit stopped early: the bar ends full at the batches that ran, its status names the stop and the
    best epoch (the one whose weights were kept). With several batches per call (the head phase compiles with
    ``steps_per_execution``; 8 batches an epoch, 3 a call) every batch is still counted once."""
    from rich.console import Console

    from edgetl._tfenv import keras
    from edgetl.config import FinetuneConfig
    from edgetl.finetune.training import _early_stopping, _EpochProgress
    from edgetl.progress import RichReporter

    k = keras()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype(np.float32), rng.integers(0, 3, 64)
    model = k.Sequential([k.Input((4,)), k.layers.Dense(3, activation="softmax")])
    model.compile(
        k.optimizers.SGD(0.0),  # lr 0: no gain
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    cfg = FinetuneConfig(data="unused", patience=2)
    console = Console(record=True, width=160, force_terminal=False)
    best: dict = {}
    stopper = _early_stopping(k, cfg)
    with RichReporter(console).task("head phase", 8 * 30) as task:
        model.fit(
            x,
            y,
            validation_data=(x, y),
            batch_size=8,
            epochs=30,
            verbose=0,
            callbacks=[stopper, _EpochProgress(task, best, stopper, 30)],
        )
    text = console.export_text()
    assert best["epochs_run"] == 3 and best["best_epoch"] == 1  # nothing improves after epoch 1
    assert "24/24" in text and "/240" not in text, text
    assert "stopped=early(3/30)" in text and "best=1" in text, text
