"""Build a tiny, real run directory (docs/formats.md) for export/verify tests, in a few seconds.

``make_run_dir(tmp_path)`` writes colored-noise PNGs in class folders, a small tf_keras classifier with
Rescaling inside (briefly trained so its outputs are not uniform), ``float.keras``, ``labels.txt``,
``splits.json``, ``manifest.json`` and, with ``qat=True`` and ``edgetl.qat`` importable, ``qat.h5``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

#: In-memory QAT models by run dir (str), so tests can stand in for ``qat.load_qat_model`` if needed.
QAT_MODELS: dict[str, Any] = {}

CLASS_COLORS = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (50, 60, 210)}


def make_images(root: Path, per_class: int = 12, size: int = 40, seed: int = 0) -> Path:
    """Class folders of noisy solid-color PNGs (slightly larger than the model input so resizing is exercised)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, color in CLASS_COLORS.items():
        (root / name).mkdir(exist_ok=True)
        for i in range(per_class):
            noise = rng.normal(0, 35, (size, size, 3))
            img = np.clip(np.array(color, np.float64) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


def tiny_model(size: int, n_classes: int, seed: int = 0):
    """A MobileNetV2-flavoured tf_keras classifier: Rescaling, conv-BN-ReLU6, depthwise, residual add, GAP, softmax."""
    from edgetl._tfenv import keras, tf

    tf().random.set_seed(seed)
    k = keras()
    inp = k.Input((size, size, 3), name="image")
    x = k.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")(inp)
    x = k.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x)
    x = k.layers.BatchNormalization()(x)
    x = k.layers.ReLU(6.0)(x)
    y = k.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    y = k.layers.BatchNormalization()(y)
    y = k.layers.ReLU(6.0)(y)
    y = k.layers.Conv2D(8, 1, use_bias=False)(y)
    y = k.layers.BatchNormalization()(y)
    x = k.layers.Add()([x, y])
    x = k.layers.GlobalAveragePooling2D()(x)
    out = k.layers.Dense(n_classes, activation="softmax", name="classifier")(x)
    return k.Model(inp, out, name="tiny")


def make_run_dir(
    tmp: Path,
    *,
    size: int = 32,
    per_class: int = 12,
    qat: bool = True,
    seed: int = 0,
    name: str = "run",
    epochs: int = 3,
    backbone: str | None = None,
) -> Path:
    """Write a complete run directory under ``tmp/name`` (images under ``tmp/data``) and return its path."""
    from edgetl import __version__, schema
    from edgetl.data import load_images, scan_folder, stratified_split
    from edgetl.fsutil import sha256_file

    tmp = Path(tmp)
    data_root = make_images(tmp / "data", per_class=per_class, size=size + 8, seed=seed)
    folder = scan_folder(data_root)
    train, val = stratified_split(folder.items, 0.25, seed)
    run = tmp / name
    run.mkdir(parents=True)
    labels = list(folder.classes)

    x = load_images(train, (size, size))
    if backbone is None:
        model = tiny_model(size, len(labels), seed)
    else:  # a real table backbone, random weights with BN statistics from the images (what finetune does)
        from edgetl._tfenv import keras
        from edgetl.backbones import get_backbone
        from edgetl.finetune import base_inputs, build_classifier, recalibrate_batchnorm
        from edgetl.weights import WeightsChoice

        keras().utils.set_random_seed(seed)
        model, base = build_classifier(get_backbone(backbone), size, len(labels), WeightsChoice("none", None), 0.2)
        recalibrate_batchnorm(base, base_inputs(model, x.images.astype(np.float32)))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x.images.astype(np.float32), x.labels, epochs=epochs, batch_size=8, verbose=0)
    model.save(run / "float.keras")

    files = {"float.keras": sha256_file(run / "float.keras")}
    qat_status = "skipped"
    if qat:
        try:
            from edgetl import qat as qat_lib
        except ModuleNotFoundError:
            qat_lib = None
        if qat_lib is not None:
            qmodel = qat_lib.quantize_for_training(model)
            if hasattr(qat_lib, "calibrate"):
                qat_lib.calibrate(qmodel, x.images.astype(np.float32))
            qat_lib.save_qat_model(qmodel, run / "qat.h5")
            QAT_MODELS[str(run.resolve())] = qmodel
            files["qat.h5"] = sha256_file(run / "qat.h5")
            qat_status = "done"

    (run / "labels.txt").write_text("".join(f"{c}\n" for c in labels))
    splits = {
        "train": [[str(p.relative_to(data_root)), int(label)] for p, label in train],
        "val": [[str(p.relative_to(data_root)), int(label)] for p, label in val],
        "data_root": str(data_root),
        "val_root": None,
    }
    (run / "splits.json").write_text(json.dumps(splits))
    manifest = schema.RunManifest(
        schema=schema.RUN_SCHEMA,
        edgetl_version=__version__,
        run_id=f"test-{name}",
        created="2025-01-01T00:00:00+00:00",
        backbone=backbone or "tiny-test",
        image_size=[size, size],
        labels=labels,
        input={
            "layout": "NHWC",
            "height": size,
            "width": size,
            "channels": 3,
            "color": "RGB",
            "dtype": "float32",
            "range": [0, 255],
        },
        seed=seed,
        phases={"head": {"status": "done"}, "fine_tune": {"status": "skipped"}, "qat": {"status": qat_status}},
        metrics={},
        files=files,
        completed_phases=["head"] + (["qat"] if qat_status == "done" else []),
    ).dump()
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return run
