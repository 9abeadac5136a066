"""int8 fidelity: do the QAT int8 files compute what the QAT (fake-quant) model computes, in each runtime?

For each backbone x data set x image size x seed this runs `edgetl finetune` (head, fine-tune, QAT), then measures
on the run's validation split:

* accuracy of the float model, the QAT fake-quant model, PTQ int8 (TFLite in LiteRT/XNNPACK; ONNX = onnxruntime's
  static QDQ quantization of the fp32 ONNX) and QAT int8 (TFLite in LiteRT with XNNPACK, ONNX in onnxruntime with its
  default graph optimizations ORT_ENABLE_ALL, 1 thread);
* top-1 agreement and mean |dp| (over images and classes) of each int8 file with the model it came from (QAT int8
  vs the QAT model, PTQ int8 vs the float model);
* two yardsticks for those distances: the QAT model on every pixel + 0.01 (of 0..255) vs itself ("shift", the
  model's own noise floor), and the QAT int8 TFLite file vs the QAT int8 ONNX file ("cross": two integer runtimes
  computing the same int8 graph, each rounding its own way);
* the same distances from the QAT graph computed exactly (float64, `qdq_exact.py`) for the QAT Keras model and both
  int8 files: the Keras model is one float32 rounding of that graph too, so its own distance from it is the most
  any file can be asked to agree with it.

Goals per (backbone, data set, size), median over seeds: QAT int8 agreement >= 0.99 and mean |dp| <= 0.01 in each
runtime; QAT int8 accuracy >= float - 0.5 pp and >= PTQ int8 (same runtime). Printed as PASS/FAIL.

MobileNetV3-Small uses the ImageNet weights (set EDGETL_WEIGHTS_DIR, e.g. ../shared/weights); mobilenet_v3_large and
efficientnet_b0 are trained from scratch (weights none, nothing frozen). The full matrix is hours of CPU; pass a
reduced one, e.g.

    EDGETL_WEIGHTS_DIR=../shared/weights python benchmarks/int8_fidelity.py --backbones mobilenet_v3_small \\
        --datasets trashnet --sizes 128 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qdq_exact  # noqa: E402

BACKBONES = ("mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0")
DATASETS = ("trashnet", "flowers")
GOAL_AGREEMENT, GOAL_MEAN_DIFF, GOAL_MARGIN_PP = 0.99, 0.01, 0.5


def _ort_predict(data: bytes, images: np.ndarray, level: str = "ORT_ENABLE_ALL") -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)  # default: what users run
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[None].astype(np.float32)})[0] for x in images])


def _fidelity(p: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    return float(np.mean(p.argmax(1) == ref.argmax(1))), float(np.mean(np.abs(p - ref)))


def _accuracy(p: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(p.argmax(1) == labels))


def one_run(
    backbone: str,
    dataset: str,
    size: int,
    seed: int,
    epochs: int,
    qat_epochs: int,
    data_root: Path,
    out: Path,
    reuse: bool = False,
) -> dict:
    from edgetl import qat
    from edgetl.config import FinetuneConfig
    from edgetl.convert.onnx import qat_to_onnx
    from edgetl.convert.tflite import ptq_to_tflite_int8, qat_to_tflite_int8
    from edgetl.data import load_images
    from edgetl.export import onnx as onnx_export
    from edgetl.export.context import BuildContext, load_float_model
    from edgetl.finetune import finetune
    from edgetl.predict import tflite_predict
    from edgetl.progress import RichReporter
    from edgetl.rundir import read_run

    pretrained = backbone == "mobilenet_v3_small"
    cfg = FinetuneConfig(
        data=str(data_root / dataset),
        backbone=backbone,
        weights="imagenet" if pretrained else "none",
        image_size=size,
        epochs=epochs,
        fine_tune_epochs=max(1, epochs // 3) if pretrained else epochs,
        fine_tune_lr=5e-5 if pretrained else None,
        freeze="auto" if pretrained else "none",
        qat_epochs=qat_epochs,
        qat_lr=3e-5 if pretrained else 1e-4,
        seed=seed,
        out=str(out / f"{backbone}-{dataset}-{size}-s{seed}"),
    )
    t0 = time.perf_counter()
    if reuse and (Path(cfg.out) / "manifest.json").is_file():
        run = read_run(cfg.out)  # --reuse: measure an earlier run of the same cell again
    else:
        run = read_run(finetune(cfg, RichReporter(), force=True).run_dir)
    val = load_images(run.split_items("val", None), (size, size))
    images, labels = val.images.astype(np.float32), val.labels
    train_items = run.split_items("train", None)
    rng = np.random.default_rng(seed)
    calib = load_images([train_items[i] for i in np.sort(rng.permutation(len(train_items))[:256])], (size, size))
    calib_images = calib.images.astype(np.float32)

    float_model = load_float_model(run.float_model)
    qat_model = qat.load_qat_model(run.qat_model)
    # runs QAT'd before snap_to_grid existed (--reuse) get it here, as finetune now does; zeros for newer runs
    snapped_now = qat.snap_to_grid(qat_model)
    p_float = float_model.predict(images, batch_size=32, verbose=0)
    p_qat = qat_model.predict(images, batch_size=32, verbose=0)
    # the QAT model's own noise floor: the same model on every pixel + 0.01 (of 0..255)
    p_qat_shift = qat_model.predict(images + np.float32(0.01), batch_size=32, verbose=0)
    p_qat_tfl = tflite_predict(qat_to_tflite_int8(qat_model), images)
    qat_onnx = qat_to_onnx(qat_model)
    p_qat_onnx = _ort_predict(qat_onnx, images)
    p_exact = qdq_exact.evaluate_apart(qat_onnx, images)  # the QAT graph in float64: what all of them round
    p_unfused = _ort_predict(qat_onnx, images, "ORT_DISABLE_ALL")  # the same graph in float32
    if np.mean(p_exact.argmax(1) == p_unfused.argmax(1)) < 0.9:
        raise RuntimeError("the float64 QAT graph disagrees with onnxruntime's unfused one: not a reference")
    p_ptq_tfl = tflite_predict(ptq_to_tflite_int8(float_model, calib_images), images)
    work = out / "_ort_static"
    work.mkdir(exist_ok=True)
    ctx = BuildContext(run=run, workdir=work, calibration_loader=lambda: calib.images)
    p_ptq_onnx = _ort_predict(onnx_export.build_ort_static_int8(ctx), images)
    row = {
        "backbone": backbone,
        "dataset": dataset,
        "size": size,
        "seed": seed,
        "val_images": int(len(labels)),
        "float": _accuracy(p_float, labels),
        "qat": _accuracy(p_qat, labels),
        "ptq_tflite": _accuracy(p_ptq_tfl, labels),
        "ptq_onnx": _accuracy(p_ptq_onnx, labels),
        "qat_tflite": _accuracy(p_qat_tfl, labels),
        "qat_onnx": _accuracy(p_qat_onnx, labels),
        "seconds": round(time.perf_counter() - t0, 1),
        "biases_snapped_at_measurement": snapped_now,
    }
    for name, p, ref in (
        ("qat_shift", p_qat_shift, p_qat),
        ("exact_qat", p_qat, p_exact),
        ("exact_tflite", p_qat_tfl, p_exact),
        ("exact_onnx", p_qat_onnx, p_exact),
        ("qat_cross", p_qat_tfl, p_qat_onnx),
        ("qat_tflite", p_qat_tfl, p_qat),
        ("qat_onnx", p_qat_onnx, p_qat),
        ("ptq_tflite", p_ptq_tfl, p_float),
        ("ptq_onnx", p_ptq_onnx, p_float),
    ):
        row[f"{name}_agree"], row[f"{name}_mdp"] = _fidelity(p, ref)
    return row


def _median(rows: list[dict], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def _per_run(rows: list[dict], heads, cols) -> None:
    """A table: one line per run, the columns ``cols`` under ``heads`` ('-' where a row lacks one)."""
    print(f"{'run':<42}" + "".join(f"{h:>9}" for h in heads))
    for r in rows:
        name = f"{r['backbone']} {r['dataset']} {r['size']} s{r['seed']}"
        print(f"{name:<42}" + "".join(f"{r[c]:>9.4f}" if c in r else f"{'-':>9}" for c in cols))


def report(rows: list[dict]) -> bool:
    cols = (
        "float",
        "qat",
        "qat_shift_agree",
        "qat_shift_mdp",
        "qat_cross_agree",
        "qat_cross_mdp",
        "ptq_tflite",
        "qat_tflite",
        "qat_tflite_agree",
        "qat_tflite_mdp",
        "ptq_onnx",
        "qat_onnx",
        "qat_onnx_agree",
        "qat_onnx_mdp",
    )
    heads = (
        "float",
        "QAT fq",
        "shift ag",
        "shift dp",
        "cross ag",
        "cross dp",
        "PTQ tfl",
        "QAT tfl",
        "agree",
        "m|dp|",
        "PTQ ort",
        "QAT ort",
        "agree",
        "m|dp|",
    )
    print(
        "\nper run (accuracy on the validation split; agree / m|dp| = QAT int8 file vs the QAT model;"
        " shift = the QAT model on pixels + 0.01 vs itself: its own noise floor; cross = QAT int8 TFLite vs QAT int8 ONNX)"
    )
    _per_run(rows, heads, cols)
    exact_cols = [f"exact_{who}_{m}" for who in ("qat", "tflite", "onnx") for m in ("agree", "mdp")]
    print(
        "\nper run, each vs the QAT graph computed exactly (float64, benchmarks/qdq_exact.py): the QAT Keras model"
        " (float32), the QAT int8 TFLite file, the QAT int8 ONNX file; agree / m|dp|"
    )
    _per_run(rows, ("Keras ag", "dp", "tfl ag", "dp", "ort ag", "dp"), exact_cols)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["backbone"], r["dataset"], r["size"]), []).append(r)
    ok_all = True
    print("\ngoals (median over seeds)")
    for (bb, ds, size), g in groups.items():
        fl = _median(g, "float")
        for rt in ("tflite", "onnx"):
            agree, mdp = _median(g, f"qat_{rt}_agree"), _median(g, f"qat_{rt}_mdp")
            acc, ptq = _median(g, f"qat_{rt}"), _median(g, f"ptq_{rt}")
            checks = {
                f"agreement {agree:.4f} >= {GOAL_AGREEMENT}": agree >= GOAL_AGREEMENT,
                f"mean|dp| {mdp:.4f} <= {GOAL_MEAN_DIFF}": mdp <= GOAL_MEAN_DIFF,
                f"QAT int8 {acc:.4f} >= float {fl:.4f} - {GOAL_MARGIN_PP}pp": (acc - fl) * 100
                >= -GOAL_MARGIN_PP - 1e-9,
                f"QAT int8 {acc:.4f} >= PTQ int8 {ptq:.4f}": acc >= ptq,
            }
            for text, ok in checks.items():
                ok_all &= ok
                print(f"{bb} {ds} {size} ({len(g)} seeds) {rt:<6} {text:<48} {'PASS' if ok else 'FAIL'}")
        if all("exact_qat_agree" in r for r in g):
            med = {c: _median(g, c) for c in exact_cols}
            print(
                f"{bb} {ds} {size} ({len(g)} seeds) vs the exact QAT graph, agree / m|dp|: Keras QAT model "
                f"{med['exact_qat_agree']:.4f} / {med['exact_qat_mdp']:.4f}, TFLite {med['exact_tflite_agree']:.4f} / "
                f"{med['exact_tflite_mdp']:.4f}, ONNX {med['exact_onnx_agree']:.4f} / {med['exact_onnx_mdp']:.4f}"
            )
    return ok_all


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--sizes", nargs="+", type=int, default=[128, 224])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10, help="head epochs (from scratch: also the fine-tune epochs)")
    ap.add_argument("--qat-epochs", type=int, default=None, help="QAT epochs (default: edgetl finetune's, 6)")
    ap.add_argument("--data-root", default=os.environ.get("EDGETL_SHARED_DATA", "../shared/data"))
    ap.add_argument("--out", default=None, help="where the runs go (default: a temp folder)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--reuse", action="store_true", help="measure existing runs in --out again instead of retraining")
    ap.add_argument(
        "--summarize",
        nargs="+",
        default=None,
        metavar="ROWS.json",
        help="print the table and goals of saved --json rows (no runs)",
    )
    args = ap.parse_args(argv)
    if args.qat_epochs is None:
        from edgetl.config import FinetuneConfig

        args.qat_epochs = FinetuneConfig.model_fields["qat_epochs"].default
    if args.summarize:
        return 0 if report([r for f in args.summarize for r in json.loads(Path(f).read_text())]) else 1
    data_root = Path(args.data_root).resolve()
    out = Path(args.out or tempfile.mkdtemp(prefix="edgetl-fidelity-"))
    rows = []
    for bb in args.backbones:
        for ds in args.datasets:
            for size in args.sizes:
                for seed in args.seeds:
                    rows.append(one_run(bb, ds, size, seed, args.epochs, args.qat_epochs, data_root, out, args.reuse))
                    print(json.dumps(rows[-1]), flush=True)
                    if args.json:
                        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if report(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
