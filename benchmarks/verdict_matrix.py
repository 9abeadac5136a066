"""Do verify's verdicts deserve trust? Honest runs must never FAIL; planted faults must always FAIL, naming the check.

For every (data set, image size, QAT epochs, seed) in the matrix: `edgetl finetune` (subset of the data set) ->
`edgetl export` (defaults) -> `edgetl verify RUN` with the DEFAULT thresholds (host: float.keras and qat.h5 run,
the run's whole validation split). Then the same bundle is copied and one fault planted per copy, and the bundle is
verified with the default thresholds (the device path: stored source outputs, the bundle sample):

  swapped     onnx_fp32 with two output classes swapped (a Gather on the output)        -> fidelity (+ accuracy)
  perturbed   onnx_fp32 with 5% Gaussian noise on every weight                         -> fidelity
  preprocess  onnx_fp32 that normalises its input twice (x/127.5-1 in front)           -> fidelity
  labels      labels.txt and bundle.json labels in the wrong order (consistently)      -> refused (exit 2, labels)
  slowed      onnx_qat_int8 plus a heavy MatMul chain multiplied by 0 (same outputs)   -> latency
  collapsed   onnx_qat_int8 whose outputs are all 1/C                                  -> fidelity (+ accuracy)

    EDGETL_WEIGHTS_DIR=../shared/weights python benchmarks/verdict_matrix.py \
        --datasets demo,trashnet,flowers --sizes 96,128,224 --qat-epochs 1,default --seeds 0,1,2 --per-class 60

An honest run that FAILs is verified again on the shared data set's images its subset left out (thousands the run
never saw): the FAIL is real when that verdict is FAIL too (the artifact really is worse), false otherwise.

Prints one row per run and a summary (false FAILs among honest runs, faults missed); exit 1 if any. With
``--json FILE`` the rows are saved after every run, so the matrix can be split over processes (e.g. ``--datasets
demo`` and ``--datasets trashnet,flowers``) and summarized together: ``--summarize A.json B.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("EDGETL_SHARED", REPO.parent / "shared"))

#: fault -> the check names (prefix of a failure string) that must appear; "refused": verify exits 2 naming labels
FAULTS = {
    "swapped": {"fidelity"},  # accuracy too when the sample is large enough to decide
    "perturbed": {"fidelity"},
    "preprocess": {"fidelity"},
    "labels": {"refused"},
    "slowed": {"latency"},
    "collapsed": {"fidelity"},
}


def _env() -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_USE_LEGACY_KERAS": "1", "PYTHONPATH": str(REPO)}
    return env


def edgetl(*args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgetl", *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=timeout,
        cwd=REPO,
    )


def subset(name: str, dest: Path, per_class: int, seed: int) -> Path:
    if dest.is_dir():
        return dest
    if name == "demo":
        from edgetl.demo import make_shapes

        return make_shapes(dest)
    src = SHARED / "data" / name
    if not src.is_dir():
        raise SystemExit(f"{src} is missing: set EDGETL_SHARED or drop {name} from --datasets")
    rng = np.random.default_rng(1000 + seed)
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        pick = sorted(rng.permutation(len(files))[:per_class].tolist())
        (dest / cls.name).mkdir(parents=True, exist_ok=True)
        for i in pick:
            (dest / cls.name / files[i].name).symlink_to(files[i].resolve())
    return dest


def held_out(name: str, used: Path, dest: Path) -> Path | None:
    """dest/CLASS/ with links to the shared data set's images that the run's subset ``used`` left out (None for the
    generated demo set): the ground truth for a FAIL on an honest run."""
    if name == "demo":
        return None
    if not dest.is_dir():
        for cls in sorted(p for p in (SHARED / "data" / name).iterdir() if p.is_dir()):
            taken = {f.name for f in (used / cls.name).iterdir()}
            (dest / cls.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir()):
                if f.name not in taken:
                    (dest / cls.name / f.name).symlink_to(f.resolve())
    return dest


def verify_json(run: Path, report_dir: Path, runs: int, *extra) -> tuple[dict, subprocess.CompletedProcess]:
    """``edgetl verify RUN --json``: its report when it reached a verdict (exit 0 PASS, 1 FAIL, 4 INCONCLUSIVE),
    else {}; and the process (exit code, stderr)."""
    proc = edgetl("verify", run, "--json", *extra, "--runs", runs, "--report", report_dir)
    return (json.loads(proc.stdout) if proc.returncode in (0, 1, 4) else {}), proc


def recheck(run: Path, data: Path | None, runs: int) -> dict:
    """Verify ``run`` again on the held-out images ``data``: an honest FAIL that holds there too is real (the
    artifact really is worse), one that does not is a false FAIL."""
    if data is None:
        return {"verdict": "not rechecked (no held-out images)"}
    report, proc = verify_json(run, run / "verify-held-out", runs, "--data", data)
    return {
        "verdict": report.get("verdict", f"exit {proc.returncode}"),
        "n": report.get("samples"),
        "failures": report.get("failures", [proc.stderr.strip()[-300:]]),
    }


# --- faults (ONNX graph edits and bundle edits; bundle.json checksums recomputed) -------------------------------


def _rehash(bundle: Path) -> None:
    from edgetl.fsutil import sha256_file

    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["files"] = {rel: sha256_file(bundle / rel) for rel in manifest["files"]}
    for art in manifest["artifacts"]:
        art["size_bytes"] = (bundle / art["file"]).stat().st_size
        art["sha256"] = manifest["files"].get(art["file"], art.get("sha256"))
    (bundle / "bundle.json").write_text(json.dumps(manifest, indent=2))


def _edit_onnx(path: Path, edit) -> None:
    import onnx

    proto = onnx.load(str(path))
    edit(proto)
    onnx.checker.check_model(proto)
    path.write_bytes(proto.SerializeToString())


def _wrap_output(proto, make_nodes) -> None:
    """Rename the graph output's producer to OUT__orig and let ``make_nodes(orig, out)`` compute the output."""
    graph = proto.graph
    out = graph.output[0].name
    for node in graph.node:
        node.output[:] = [o + "__orig" if o == out else o for o in node.output]
    nodes, inits = make_nodes(out + "__orig", out)
    graph.initializer.extend(inits)
    graph.node.extend(nodes)


def plant(fault: str, bundle: Path, n_classes: int) -> str:
    """Plant ``fault`` in ``bundle`` (a copy); returns the artifact it affects (or "" for bundle-level faults)."""
    from onnx import helper, numpy_helper

    if fault == "labels":
        manifest = json.loads((bundle / "bundle.json").read_text())
        manifest["labels"] = manifest["labels"][1:] + manifest["labels"][:1]
        (bundle / "labels.txt").write_text("".join(f"{x}\n" for x in manifest["labels"]))
        (bundle / "bundle.json").write_text(json.dumps(manifest, indent=2))
        _rehash(bundle)
        return ""
    name = "onnx_fp32" if fault in ("swapped", "perturbed", "preprocess") else "onnx_qat_int8"
    path = bundle / next(
        a["file"] for a in json.loads((bundle / "bundle.json").read_text())["artifacts"] if a["name"] == name
    )

    def edit(proto):
        graph = proto.graph
        if fault == "swapped":
            perm = np.arange(n_classes)
            perm[[0, 1]] = [1, 0]
            _wrap_output(
                proto,
                lambda orig, out: (
                    [helper.make_node("Gather", [orig, "fault_perm"], [out], axis=1)],
                    [numpy_helper.from_array(perm.astype(np.int64), "fault_perm")],
                ),
            )
        elif fault == "perturbed":
            rng = np.random.default_rng(0)
            for init in graph.initializer:
                w = numpy_helper.to_array(init)
                if w.dtype == np.float32 and w.size > 16:
                    noisy = w + rng.normal(0, 0.05 * (float(w.std()) or 1.0), w.shape).astype(np.float32)
                    init.CopyFrom(numpy_helper.from_array(noisy, init.name))
        elif fault == "preprocess":
            inp = graph.input[0].name
            for node in graph.node:
                node.input[:] = [i + "__pre" if i == inp else i for i in node.input]
            graph.initializer.extend(
                [
                    numpy_helper.from_array(np.array(1 / 127.5, np.float32), "fault_scale"),
                    numpy_helper.from_array(np.array(-1.0, np.float32), "fault_offset"),
                ]
            )
            graph.node.insert(0, helper.make_node("Mul", [inp, "fault_scale"], ["fault_scaled"]))
            graph.node.insert(1, helper.make_node("Add", ["fault_scaled", "fault_offset"], [inp + "__pre"]))
        elif fault == "collapsed":
            _wrap_output(
                proto,
                lambda orig, out: (
                    [
                        helper.make_node("Mul", [orig, "fault_zero"], ["fault_nothing"]),
                        helper.make_node("Add", ["fault_nothing", "fault_uniform"], [out]),
                    ],
                    [
                        numpy_helper.from_array(np.array(0.0, np.float32), "fault_zero"),
                        numpy_helper.from_array(np.full((1, n_classes), 1.0 / n_classes, np.float32), "fault_uniform"),
                    ],
                ),
            )
        elif fault == "slowed":
            shape = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]]
            flat, hidden, depth = int(np.prod(shape)), 512, 12
            rng = np.random.default_rng(3)
            inits = [
                numpy_helper.from_array(np.array([-1, flat], np.int64), "slow_shape"),
                numpy_helper.from_array(np.array(1 / 255, np.float32), "slow_scale"),
                numpy_helper.from_array(np.array(0.0, np.float32), "slow_zero"),
                numpy_helper.from_array(
                    (rng.standard_normal((flat, hidden)) / np.sqrt(flat)).astype(np.float32), "slow_w0"
                ),
            ]
            nodes = [
                helper.make_node("Reshape", [graph.input[0].name, "slow_shape"], ["slow_flat"]),
                helper.make_node("Mul", ["slow_flat", "slow_scale"], ["slow_scaled"]),
                helper.make_node("MatMul", ["slow_scaled", "slow_w0"], ["slow_h0"]),
                helper.make_node("Tanh", ["slow_h0"], ["slow_a0"]),
            ]
            for i in range(1, depth + 1):
                inits.append(
                    numpy_helper.from_array(
                        (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32), f"slow_w{i}"
                    )
                )
                nodes += [
                    helper.make_node("MatMul", [f"slow_a{i - 1}", f"slow_w{i}"], [f"slow_h{i}"]),
                    helper.make_node("Tanh", [f"slow_h{i}"], [f"slow_a{i}"]),
                ]

            def tail(orig, out):
                return nodes + [
                    helper.make_node("ReduceMean", [f"slow_a{depth}"], ["slow_mean"], axes=[1], keepdims=1),
                    helper.make_node("Mul", ["slow_mean", "slow_zero"], ["slow_nothing"]),
                    helper.make_node("Add", [orig, "slow_nothing"], [out]),
                ], inits

            _wrap_output(proto, tail)
        else:
            raise ValueError(fault)

    _edit_onnx(path, edit)
    _rehash(bundle)
    return name


def caught(fault: str, proc: subprocess.CompletedProcess, artifact: str) -> tuple[bool, str]:
    expected = FAULTS[fault]
    if "refused" in expected:
        ok = proc.returncode == 2 and "labels" in proc.stderr
        return ok, f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1][:90] if proc.stderr.strip() else ''}"
    if proc.returncode not in (0, 1, 4):
        return False, f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"
    report = json.loads(proc.stdout)
    art = next(a for a in report["artifacts"] if a["name"] == artifact)
    named = {f.split(":")[0] for f in art["failures"]}
    return expected <= named and proc.returncode == 1, ",".join(sorted(named)) or "none"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="demo,trashnet,flowers")
    ap.add_argument("--sizes", default="96,128,224")
    ap.add_argument("--qat-epochs", default="1,default", help="comma list; 'default' = FinetuneConfig's default")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--per-class", type=int, default=60, help="images per class of the shared data sets")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--fine-tune-epochs", type=int, default=1)
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--runs", type=int, default=50, help="timed inferences per model in verify")
    ap.add_argument("--out", default="/tmp/edgetl-verdict-matrix")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the rows here")
    ap.add_argument(
        "--summarize",
        nargs="+",
        metavar="JSON",
        default=None,
        help="only print the summary over rows saved with --json (e.g. parts of the matrix run in separate processes)",
    )
    args = ap.parse_args()
    if args.summarize:
        return summarize([row for f in args.summarize for row in json.loads(Path(f).read_text())])

    from edgetl.config import FinetuneConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights_dir = os.environ.get("EDGETL_WEIGHTS_DIR")
    faults = [f for f in args.faults.split(",") if f]
    rows = []

    def save(rows: list[dict]) -> None:  # after every run: a long matrix can be split over processes
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(rows, indent=2))

    header = f"{'data':<9}{'px':>4} {'qat':>4} {'seed':>4}  {'weights':<9}{'n':>5}  {'honest':<13}" + "".join(
        f"{f:<12}" for f in faults
    )
    print(header, flush=True)
    for dataset in args.datasets.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            for qat in args.qat_epochs.split(","):
                qat_epochs = FinetuneConfig.model_fields["qat_epochs"].default if qat == "default" else int(qat)
                for seed in (int(s) for s in args.seeds.split(",")):
                    t0 = time.time()
                    data = subset(dataset, out / f"data-{dataset}-{args.per_class}-{seed}", args.per_class, seed)
                    run = out / f"{dataset}-{size}-q{qat_epochs}-s{seed}"
                    weights = "imagenet" if weights_dir and dataset != "demo" else "none"
                    ft = [
                        "finetune",
                        "--data",
                        data,
                        "--out",
                        run,
                        "--image-size",
                        size,
                        "--weights",
                        weights,
                        "--epochs",
                        args.epochs,
                        "--fine-tune-epochs",
                        args.fine_tune_epochs,
                        "--qat-epochs",
                        qat_epochs,
                        "--seed",
                        seed,
                    ]
                    if dataset == "demo":
                        ft += ["--val-split", "0.4", "--batch-size", "16", "--epochs", "3", "--fine-tune-epochs", "10"]
                    row = {"data": dataset, "size": size, "qat_epochs": qat_epochs, "seed": seed, "weights": weights}
                    for step in (ft, ["export", run]):
                        proc = edgetl(*step)
                        if proc.returncode != 0:
                            row["error"] = f"{step[0]}: {proc.stderr.strip()[-300:]}"
                            break
                    if "error" in row:
                        print(f"{dataset:<9}{size:>4} {qat_epochs:>4} {seed:>4}  ERROR {row['error']}", flush=True)
                        rows.append(row)
                        save(rows)
                        continue
                    report, proc = verify_json(run, run / "verify-honest", args.runs)
                    row["honest"] = report.get("verdict", f"exit {proc.returncode}")
                    row["honest_failures"] = report.get("failures", [proc.stderr.strip()[-300:]])
                    row["honest_inconclusive"] = report.get("inconclusive", [])
                    row["n"] = report.get("samples")
                    if row["honest"] == "FAIL":
                        rest = held_out(dataset, data, out / f"held-out-{dataset}-{args.per_class}-{seed}")
                        row["held_out"] = recheck(run, rest, args.runs)
                    n_classes = len(report.get("labels", [])) or 2
                    row["faults"] = {}
                    for fault in faults:
                        bundle = out / f"fault-{fault}"
                        shutil.rmtree(bundle, ignore_errors=True)
                        shutil.copytree(run / "export", bundle, ignore=shutil.ignore_patterns("verify"))
                        artifact = plant(fault, bundle, n_classes)
                        only = ["--only", artifact] if artifact else []
                        proc = edgetl("verify", bundle, "--json", "--runs", args.runs, *only, "--report", bundle / "v")
                        ok, named = caught(fault, proc, artifact)
                        row["faults"][fault] = {"caught": ok, "named": named}
                    rows.append(row)
                    save(rows)
                    cells = "".join(
                        f"{('ok ' if r['caught'] else 'MISS ') + r['named'][:8]:<12}" for r in row["faults"].values()
                    )
                    print(
                        f"{dataset:<9}{size:>4} {qat_epochs:>4} {seed:>4}  {weights:<9}{row['n'] or 0:>5}  "
                        f"{row['honest']:<13}{cells}  ({time.time() - t0:.0f} s)",
                        flush=True,
                    )
                    for failure in row["honest_failures"]:
                        print(f"    honest failure: {failure}", flush=True)
                    if "held_out" in row:
                        h = row["held_out"]
                        print(f"    on {h.get('n')} held-out images: {h['verdict']}", flush=True)
                        for failure in h.get("failures", []):
                            print(f"      {failure}", flush=True)
    return summarize(rows)


def summarize(rows: list[dict]) -> int:
    """The summary lines over ``rows``; 1 if an honest run FAILed, a fault was missed or a run errored."""
    honest = [r for r in rows if "honest" in r]
    fails = [r for r in honest if r["honest"] == "FAIL"]
    # a FAIL is real when the verdict on the data set's held-out images (thousands, unseen by the run) is FAIL too
    real = [r for r in fails if r.get("held_out", {}).get("verdict") == "FAIL"]
    false_fails = [r for r in fails if r not in real]
    inconclusive = [r for r in honest if r["honest"] == "INCONCLUSIVE"]
    planted = [(r, f, v) for r in honest for f, v in r["faults"].items()]
    missed = [(r, f, v) for r, f, v in planted if not v["caught"]]
    print(
        f"\nhonest runs: {len(honest)}; PASS {sum(r['honest'] == 'PASS' for r in honest)}, "
        f"INCONCLUSIVE {len(inconclusive)}, FAIL {len(fails)} (real, i.e. FAIL again on the held-out images: "
        f"{len(real)}; false FAIL {len(false_fails)}); errors {len(rows) - len(honest)}"
    )
    for r in fails:
        h = r.get("held_out", {})
        print(
            f"  FAIL: {r['data']} {r['size']} px qat {r['qat_epochs']} seed {r['seed']}: held-out recheck on "
            f"{h.get('n')} images: {h.get('verdict', 'none')}"
        )
    print(
        f"planted faults: {len(planted)}; caught naming the right check {len(planted) - len(missed)}, "
        f"missed {len(missed)}"
    )
    for r, f, v in missed:
        print(f"  missed: {r['data']} {r['size']} px qat {r['qat_epochs']} seed {r['seed']}: {f} -> {v['named']}")
    return 1 if false_fails or missed or len(rows) != len(honest) else 0


if __name__ == "__main__":
    sys.exit(main())
