"""`make device-test-arm64`: edgetl's device path on emulated 64-bit ARM cores, against the host, on a real bundle.

What it does (every step is checked; the first failure stops it with one line and exit 1):

1. Host: a run made by ``edgetl finetune`` (the embedded shapes data, MobileNetV3-Small, ``weights none`` unless
   ``--weights-dir`` has the ImageNet file), ``edgetl export --format all``, ``edgetl verify BUNDLE --json`` and the
   probe (``probe.py``: every artifact's outputs on the bundle sample, XNNPACK partitions) on this x86 machine.
2. An arm64 Debian bookworm root (Python 3.11, as Raspberry Pi OS) built once with ``debootstrap --foreign`` (its
   packages unpacked on the host; see :func:`build_root`) and cached under ``.device/arm64/`` (git-ignored); a venv
   there, made by the emulated Python and pip, with ``edgetl[device]`` (no TensorFlow) installed from a wheel of this
   working tree, as a user would on the device; the dependencies are cached, edgetl itself is reinstalled every run.
3. For each core (cortex-a72 = Raspberry Pi 4, cortex-a76 = Raspberry Pi 5, neoverse-n1 = Graviton2 class): in a
   private mount namespace, the root sees a matching ARM ``/proc/cpuinfo`` (onnxruntime crashes on import without
   one) and qemu emulates the same core (``QEMU_CPU``; a mismatch makes XNNPACK pick instructions the core lacks,
   and ``max`` gives wrong int8 results even for stock models, an emulator artefact). There it runs
   ``edgetl verify BUNDLE --json`` and the probe, and compares with the host:

   * the verdict and every artifact's pass/fail and accuracy equal the host's;
   * float outputs within 1e-4, int8 outputs within the int8 tolerance (``--int8-tolerance``) of the host's;
   * every QAT int8 TFLite file runs as one XNNPACK partition on ARM (delegate nodes counted);
   * ``edgetl predict BUNDLE IMAGES --artifact NAME --json`` (the app's path: labels and input contract read from the
     model file itself) gives, for every artifact, the labels, contract and top-1 of the host's ``edgetl predict``,
     its scores within the same float / int8 tolerances;
   * TensorFlow is never imported.

Emulated latency is reported as such (the fake cpuinfo names the emulation, and verify's machine line shows it):
it says nothing about a real device. Needs root (mounts, chroot), Debian's package mirror and PyPI.

    python devices/arm64/harness.py [--cores cortex-a72,cortex-a76,neoverse-n1] [--work DIR] [--cache DIR]
                                    [--install root|host] [--bundle DIR] [--weights-dir DIR]

``--cache DIR`` uses another checkout's cached root (``.device/arm64``); ``--install host`` puts ``edgetl[device]`` on
the root's ``sys.path`` from aarch64 wheels resolved by the host's pip (the quick path of ``make test``; it leaves the
root's venv alone), ``--bundle DIR`` checks a bundle ``edgetl export`` made earlier instead of training one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = REPO / ".device" / "arm64"
ROOT = CACHE / "root"
VENV = "/opt/edgetl-venv"  # inside the root
CORES = ("cortex-a72", "cortex-a76", "neoverse-n1")
MIRROR = os.environ.get("EDGETL_DEBIAN_MIRROR", "http://deb.debian.org/debian")
ROOT_PACKAGES = "python3,python3-venv,ca-certificates"
FLOAT_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}  # max |dp| ARM vs host; float kernels differ only in rounding order
INT8_MIN_AGREEMENT = 0.95
# Latency under emulation means nothing: the latency check is made non-binding on both sides, so the verdicts compare
# accuracy and fidelity only.
VERIFY_FLAGS = ["--runs", "10", "--warmup", "2", "--max-latency-ratio", "1000"]


class Failed(Exception):
    pass


def log(msg: str) -> None:
    print(f"[arm64 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(
    cmd: list[str], *, env: dict | None = None, timeout: float = 3600, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        tail = (proc.stdout[-1500:] + "\n" + proc.stderr[-2500:]).strip()
        raise Failed(f"`{' '.join(map(str, cmd))[:200]}` exited {proc.returncode}:\n{tail}")
    return proc


# -- host tools ----------------------------------------------------------------------------------------------


def ensure_tools() -> None:
    if os.geteuid() != 0:
        raise Failed("needs root (debootstrap, mounts, chroot); run as root")
    if not shutil.which("qemu-aarch64-static") or not shutil.which("debootstrap"):
        log("installing qemu-user-static, debootstrap, binfmt-support (apt)")
        sh(["apt-get", "update", "-qq"], timeout=900)
        sh(
            ["apt-get", "install", "-y", "-qq", "qemu-user-static", "debootstrap", "binfmt-support"],
            env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"},
            timeout=1800,
        )
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "register").exists():
        sh(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)])
    if not (binfmt / "qemu-aarch64").exists():
        sh(["update-binfmts", "--enable", "qemu-aarch64"])
    if "enabled" not in (binfmt / "qemu-aarch64").read_text():
        raise Failed("binfmt_misc has qemu-aarch64 but it is disabled: run `update-binfmts --enable qemu-aarch64`")


# -- the arm64 root and its venv -------------------------------------------------------------------------------


def _refuse_mounts_under(path: Path) -> None:
    """Never delete through a mount (a leaked /proc or /dev bind inside the root would take the host's with it)."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/mounts", encoding="utf-8") as fh:
        mounted = [line.split()[1] for line in fh if line.split()[1].startswith(prefix)]
    if mounted:
        raise Failed(f"{path} has file systems mounted inside ({', '.join(mounted[:3])}): unmount them first")


def use_cache(cache: Path) -> None:
    """Use the root cached under ``cache`` (another checkout's ``.device/arm64``) instead of this one's."""
    global CACHE, ROOT
    CACHE = Path(cache).resolve()
    ROOT = CACHE / "root"


def build_root(root: Path | None = None) -> None:
    """Debian bookworm arm64 with Python 3.11: debootstrap's first stage downloads and unpacks the base system,
    then every downloaded package (python3 and its libraries among them) is unpacked with the host's dpkg-deb.

    debootstrap's second stage (7-8 minutes under emulation) only runs maintainer scripts; nothing edgetl's device
    path uses needs them, so it is skipped.
    """
    root = root or ROOT
    stamp = root / ".edgetl-root-v1"
    if stamp.is_file():
        log(f"arm64 root: cached ({root})")
        return
    t0 = time.monotonic()
    if root.exists():  # a half-built root from an interrupted run: only ever our own cache folder
        _refuse_mounts_under(root)
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    log(f"arm64 root: debootstrap --foreign bookworm from {MIRROR}")
    sh(
        [
            "debootstrap",
            "--arch=arm64",
            "--foreign",
            "--variant=minbase",
            f"--include={ROOT_PACKAGES}",
            "bookworm",
            str(root),
            MIRROR,
        ],
        timeout=1800,
    )
    debs = sorted((root / "var" / "cache" / "apt" / "archives").glob("*.deb"))
    for deb in debs:
        sh(["dpkg-deb", "-x", str(deb), str(root)])
    # ca-certificates' bundle is made by its maintainer script; the host's (with any local CA) stands in for it
    (root / "etc" / "ssl" / "certs").mkdir(parents=True, exist_ok=True)
    shutil.copy2(_host_ca(), root / "etc" / "ssl" / "certs" / "ca-certificates.crt")
    if not (root / "usr" / "bin" / "python3").exists():
        raise Failed(f"arm64 root: no /usr/bin/python3 after unpacking {len(debs)} packages")
    stamp.write_text(f"bookworm arm64 {MIRROR}: first stage + {len(debs)} packages unpacked\n")
    log(f"arm64 root: built in {time.monotonic() - t0:.0f} s ({len(debs)} packages)")


def _pip_env() -> dict[str, str]:
    """pip settings that make sense inside the root: the index and certificates, not the host's local paths."""
    env = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_DEFAULT_TIMEOUT": "180", "PYTHONDONTWRITEBYTECODE": "1"}
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"):
        urls = [u for u in os.environ.get(key, "").split() if not u.startswith("file:")]
        if urls:
            env[key] = " ".join(urls)
    return env


def _host_ca() -> Path:
    for candidate in (
        os.environ.get("PIP_CERT"),
        os.environ.get("SSL_CERT_FILE"),
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise Failed("no CA certificate bundle on the host (PIP_CERT or /etc/ssl/certs/ca-certificates.crt)")


def chroot_env(core: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "QEMU_CPU": core,
        "COLUMNS": "160",
        "TERM": "dumb",
        **_pip_env(),
    }


def in_root(
    core: str, argv: list[str], work: Path, timeout: float = 3600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``argv`` in the root, emulating ``core``, in a private mount namespace with that core's cpuinfo."""
    cpuinfo = HERE / "cpuinfo" / f"{core}.txt"
    (ROOT / "work").mkdir(exist_ok=True)
    script = "\n".join(
        [
            "set -e",
            f"mount -t proc proc '{ROOT}/proc'",
            f"mount --bind '{cpuinfo}' '{ROOT}/proc/cpuinfo'",
            f"mount --rbind /dev '{ROOT}/dev'",
            f"mount --rbind /sys '{ROOT}/sys'",  # XNNPACK's cpuinfo reads /sys/devices/system/cpu: no delegate without it
            f"mount --bind '{work}' '{ROOT}/work'",
            f'exec {shutil.which("chroot") or "/usr/sbin/chroot"} "$0" "$@"',
        ]
    )
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(ROOT), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=chroot_env(core) | (env or {}), timeout=timeout)


def _wheel(work: Path) -> Path:
    """A wheel of this working tree (pure Python), built on the host."""
    out = work / "wheel"
    src = work / "src"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "edgetl", src / "edgetl", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    sh([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(src)], timeout=900)
    wheels = sorted(out.glob("edgetl-*.whl"))
    if len(wheels) != 1:
        raise Failed(f"expected one edgetl wheel in {out}, found {len(wheels)}")
    return wheels[0]


AARCH64_TAGS = [f"manylinux_2_{n}_aarch64" for n in range(36, 16, -1)] + ["manylinux2014_aarch64"]  # glibc 2.36


def host_resolved_site(work: Path) -> dict[str, str]:
    """The quick install (for `make test`): the host's pip resolves and unpacks ``edgetl[device]``'s aarch64 wheels
    for Python 3.11 into the root (``--platform``/``--target``: nothing runs under emulation), and this working tree's
    edgetl into ``work``. Returns the chroot environment that puts both on ``sys.path``.

    The same wheels a pip on the device picks (manylinux tags up to the root's glibc 2.36); ``make
    device-test-arm64`` does the real thing, pip inside the emulated root."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    site = ROOT / "opt" / f"site-{key}"
    plat = [arg for tag in AARCH64_TAGS for arg in ("--platform", tag)]
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
        *plat,
    ]
    wheel = _wheel(work)
    if not (site / ".complete").is_file():
        shutil.rmtree(site, ignore_errors=True)
        for old in (ROOT / "opt").glob("site-*"):
            shutil.rmtree(old, ignore_errors=True)
        sh([*pip, "--target", str(site), f"{wheel}[device]"], timeout=1800)
        shutil.rmtree(site / "edgetl", ignore_errors=True)  # edgetl itself comes fresh from `work` every run
        (site / ".complete").write_text(wheel.name + "\n")
    shutil.rmtree(work / "pkg", ignore_errors=True)
    sh([*pip, "--no-deps", "--target", str(work / "pkg"), str(wheel)], timeout=600)
    return {"PYTHONPATH": f"/work/pkg:/opt/{site.name}", "PYTHONNOUSERSITE": "1"}


def build_venv(work: Path) -> None:
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    stamp = ROOT / VENV.lstrip("/") / f".deps-{key}"
    wheel = _wheel(work)
    core = CORES[0]
    if not stamp.is_file():
        t0 = time.monotonic()
        log(f"arm64 venv: {VENV} with edgetl[device] (downloads aarch64 wheels; minutes under emulation)")
        shutil.rmtree(ROOT / VENV.lstrip("/"), ignore_errors=True)
        for argv in (
            ["/usr/bin/python3", "-m", "venv", VENV],
            [f"{VENV}/bin/python", "-m", "pip", "install", "--quiet", f"/work/wheel/{wheel.name}[device]"],
        ):
            proc = in_root(core, argv, work)
            if proc.returncode != 0:
                raise Failed(f"arm64 venv: `{' '.join(argv)}` exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        stamp.write_text(wheel.name + "\n")
        log(f"arm64 venv: built in {time.monotonic() - t0:.0f} s")
    proc = in_root(
        core,
        [
            f"{VENV}/bin/python",
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--force-reinstall",
            f"/work/wheel/{wheel.name}",
        ],
        work,
    )
    if proc.returncode != 0:
        raise Failed(f"arm64 venv: reinstalling edgetl failed:\n{proc.stderr[-3000:]}")
    proc = in_root(
        core, [f"{VENV}/bin/python", "-c", "import importlib.util as u; print(u.find_spec('tensorflow') is None)"], work
    )
    if proc.stdout.strip() != "True":
        raise Failed(f"arm64 venv: TensorFlow is installed there (it must not be): {proc.stdout}{proc.stderr}")


# -- host side ---------------------------------------------------------------------------------------------------


def edgetl_host(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return sh([str(Path(sys.executable).parent / "edgetl"), *args], timeout=timeout)


def make_bundle(work: Path, weights_dir: Path | None, image_size: int) -> Path:
    from edgetl.demo import make_shapes

    data = make_shapes(work / "shapes", per_class=60, size=96, seed=3)
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    weights = ["--weights", "imagenet", "--weights-dir", str(weights_dir)] if weights_dir else ["--weights", "none"]
    log(
        f"host: edgetl finetune ({'ImageNet weights from ' + str(weights_dir) if weights_dir else 'weights none'}), "
        f"{image_size} px"
    )
    edgetl_host(
        "finetune",
        "--data",
        str(data),
        "--backbone",
        "mobilenet_v3_small",
        *weights,
        "--image-size",
        str(image_size),
        "--epochs",
        "8",
        "--fine-tune-epochs",
        "0",
        "--qat-epochs",
        "2",
        "--seed",
        "0",
        "--out",
        str(run),
    )
    log("host: edgetl export --format all")
    edgetl_host("export", str(run), "--format", "all")
    return run / "export"


def host_reference(bundle: Path, work: Path) -> tuple[dict, dict]:
    report = json.loads(
        sh(
            [
                str(Path(sys.executable).parent / "edgetl"),
                "verify",
                str(bundle),
                "--json",
                "--report",
                str(work / "reports" / "host"),
                *VERIFY_FLAGS,
            ],
            check=False,
        ).stdout
    )
    probe = sh([sys.executable, str(HERE / "probe.py"), str(bundle), str(work / "host.npz")]).stdout
    return report, json.loads(probe.strip().splitlines()[-1])


def installed(install: str, work: Path) -> tuple[list[str], list[str], dict[str, str]]:
    """``(edgetl argv, python argv, env)`` inside the root for ``--install root`` (the venv) or ``host``."""
    if install == "host":
        env = host_resolved_site(work)
        return ["/usr/bin/python3", "-m", "edgetl"], ["/usr/bin/python3"], env
    build_venv(work)
    return [f"{VENV}/bin/edgetl"], [f"{VENV}/bin/python"], {}


# -- edgetl predict: what an app does with the bundle ----------------------------------------------------------------

PREDICT_IMAGES = 8


def predict_images(bundle: Path, work: Path) -> Path:
    """The first bundle sample images as PNG files (at the model's size: predict's resize is then the identity)."""
    from PIL import Image

    from edgetl.verify import load_bundle

    out = work / "predict-images"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for i, image in enumerate(load_bundle(bundle).sample.images[:PREDICT_IMAGES]):
        Image.fromarray(image).save(out / f"{i:02d}.png")
    return out


def predict_all(run, bundle: str, images: str, names: list[str], n_labels: int) -> dict[str, dict]:
    """``edgetl predict BUNDLE IMAGES --artifact NAME --json`` for every artifact; ``run(argv)`` runs one command
    (on the host or in the root) and returns the CompletedProcess."""
    out = {}
    for name in names:
        proc = run(["predict", bundle, images, "--artifact", name, "--top-k", str(n_labels), "--json"])
        if proc.returncode != 0 or not proc.stdout.strip():
            raise Failed(f"edgetl predict --artifact {name} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
        out[name] = json.loads(proc.stdout)
    return out


def _scores(result: dict, n_labels: int) -> tuple[list[str], np.ndarray]:
    images, rows = [], []
    for item in result["predictions"]:
        row = np.full(n_labels, np.nan)
        for top in item["top"]:
            row[top["index"]] = top["score"]
        images.append(Path(item["image"]).name)
        rows.append(row)
    return images, np.array(rows)


def compare_predict(name: str, quant: str, host: dict, dev: dict, int8_tol: float) -> tuple[dict, list[str]]:
    """Device ``edgetl predict`` vs the host's for one artifact: labels, contract, top-1 per image, scores."""
    problems = []
    n = len(host["labels"])
    if dev["labels"] != host["labels"]:
        problems.append(f"{name}: predict labels {dev['labels']} != host {host['labels']}")
    if dev["input"] != host["input"]:
        problems.append(f"{name}: predict input contract {dev['input']} != host {host['input']}")
    h_img, h = _scores(host, n)
    d_img, d = _scores(dev, n)
    if h_img != d_img or h.shape != d.shape:
        problems.append(f"{name}: predict ran on images {d_img}, host on {h_img}")
        return {"predict_top1_host": None, "predict_max_diff_host": None}, problems
    diff = np.abs(h - d)
    agree = float(np.mean(np.nanargmax(h, 1) == np.nanargmax(d, 1)))
    if quant in FLOAT_TOLERANCE:
        if not diff.max() <= FLOAT_TOLERANCE[quant]:
            problems.append(
                f"{name}: predict scores differ from the host's by {diff.max():.2e} > {FLOAT_TOLERANCE[quant]:g}"
            )
    elif not (diff.mean() <= int8_tol and agree >= INT8_MIN_AGREEMENT):
        problems.append(
            f"{name}: predict int8 scores vs the host's: mean |dp| {diff.mean():.4f} (max {int8_tol}), "
            f"top-1 agreement {agree:.3f} (min {INT8_MIN_AGREEMENT})"
        )
    if quant in FLOAT_TOLERANCE and agree < 1.0:
        problems.append(f"{name}: predict top-1 differs from the host's on {1 - agree:.0%} of the images")
    return {"predict_top1_host": agree, "predict_max_diff_host": float(diff.max())}, problems


# -- comparison ----------------------------------------------------------------------------------------------------


def _accuracies(report: dict) -> dict[str, float | None]:
    return {a["name"]: a.get("accuracy") for a in report["artifacts"]}


def compare(
    core: str, host_report: dict, dev_report: dict, host_npz: Path, dev_npz: Path, dev_probe: dict, int8_tol: float
) -> tuple[list[dict], list[str]]:
    """Per-artifact rows for the table, and every difference from the host that breaks the device contract."""
    host_out, dev_out = np.load(host_npz), np.load(dev_npz)
    host_pass = {a["name"]: a["passed"] for a in host_report["artifacts"]}
    dev_pass = {a["name"]: a["passed"] for a in dev_report["artifacts"]}
    host_acc, dev_acc = _accuracies(host_report), _accuracies(dev_report)
    rows, problems = [], []
    if dev_report["verdict"] != host_report["verdict"]:
        problems.append(f"verdict {dev_report['verdict']} != host {host_report['verdict']}")
    for name, quant in dev_probe["quantization"].items():
        h, d = host_out[name], dev_out[name]
        diff = np.abs(h.astype(np.float64) - d)
        agree = float(np.mean(h.argmax(1) == d.argmax(1)))
        parts = dev_probe["partitions"].get(name)
        fmt = dev_probe["format"][name]
        row = {
            "core": core,
            "artifact": name,
            "format": fmt,
            "quantization": quant,
            "accuracy": dev_acc.get(name),
            "host_accuracy": host_acc.get(name),
            "passed": dev_pass.get(name),
            "host_passed": host_pass.get(name),
            "top1_agreement_host": agree,
            "max_abs_diff_host": float(diff.max()),
            "mean_abs_diff_host": float(diff.mean()),
            "xnnpack_partitions": None if parts is None else parts[0],
            "one_partition": None if parts is None else parts[1],
        }
        rows.append(row)
        if dev_acc.get(name) != host_acc.get(name):
            problems.append(f"{name}: accuracy {dev_acc.get(name)} != host {host_acc.get(name)}")
        if dev_pass.get(name) != host_pass.get(name):
            problems.append(f"{name}: passed {dev_pass.get(name)} != host {host_pass.get(name)}")
        if quant in FLOAT_TOLERANCE:
            if diff.max() > FLOAT_TOLERANCE[quant]:
                problems.append(
                    f"{name}: outputs differ from the host's by {diff.max():.2e} > {FLOAT_TOLERANCE[quant]:g}"
                )
        elif diff.mean() > int8_tol or agree < INT8_MIN_AGREEMENT:
            problems.append(
                f"{name}: int8 outputs vs the host's: mean |dp| {diff.mean():.4f} (max {int8_tol}), "
                f"top-1 agreement {agree:.3f} (min {INT8_MIN_AGREEMENT})"
            )
        if quant == "qat_int8" and fmt == "tflite" and parts != [1, True]:
            problems.append(f"{name}: {parts[0]} XNNPACK partitions on {core} (expected one whole-graph partition)")
    if dev_probe["tensorflow_imported"]:
        problems.append("TensorFlow was imported on the device")
    return rows, problems


def run_core(
    core: str,
    bundle: Path,
    work: Path,
    host_report: dict,
    int8_tol: float,
    host_predict: dict,
    images: Path,
    tool: tuple[list[str], list[str], dict[str, str]],
) -> tuple[list[dict], dict]:
    edgetl, python, env = tool
    t0 = time.monotonic()
    rel = bundle.relative_to(work)
    proc = in_root(
        core,
        [*edgetl, "verify", f"/work/{rel}", "--json", "--report", f"/work/reports/{core}", *VERIFY_FLAGS],
        work,
        env=env,
    )
    if proc.returncode not in (0, 1, 4) or not proc.stdout.strip():
        raise Failed(f"{core}: edgetl verify exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    dev_report = json.loads(proc.stdout)
    t_verify = time.monotonic() - t0
    proc = in_root(core, [*python, "/work/probe.py", f"/work/{rel}", f"/work/{core}.npz"], work, env=env)
    if proc.returncode != 0:
        raise Failed(f"{core}: probe exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    dev_probe = json.loads(proc.stdout.strip().splitlines()[-1])
    rows, problems = compare(
        core, host_report, dev_report, work / "host.npz", work / f"{core}.npz", dev_probe, int8_tol
    )
    t1 = time.monotonic()
    dev_predict = predict_all(
        lambda argv: in_root(core, [*edgetl, *argv], work, env=env, timeout=900),
        f"/work/{rel}",
        f"/work/{images.relative_to(work)}",
        list(host_predict),
        len(host_report["labels"]),
    )
    for row in rows:
        name = row["artifact"]
        extra, bad = compare_predict(name, row["quantization"], host_predict[name], dev_predict[name], int8_tol)
        row.update(extra)
        problems += bad
    info = {
        "core": core,
        "cpu": dev_report["machine"]["cpu"],
        "arch": dev_report["machine"]["arch"],
        "verify_s": round(t_verify, 1),
        "predict_s": round(time.monotonic() - t1, 1),
        "total_s": round(time.monotonic() - t0, 1),
        "passed": dev_report["passed"],
        "problems": problems,
    }
    return rows, info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", default=",".join(CORES))
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a fresh one under .device/)")
    ap.add_argument(
        "--weights-dir",
        type=Path,
        default=None,
        help="folder with Keras's MobileNetV3-Small ImageNet file (default: weights none)",
    )
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument(
        "--int8-tolerance",
        type=float,
        default=0.02,
        help="max mean |probability difference| of an int8 artifact between ARM and the host",
    )
    ap.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="folder with the cached arm64 root (default .device/arm64 of this checkout)",
    )
    ap.add_argument(
        "--install",
        choices=("root", "host"),
        default="root",
        help="root: pip in the emulated root installs edgetl[device] into a venv there (what a user does); "
        "host: the host's pip resolves the aarch64 wheels (quick; leaves the root's venv alone)",
    )
    ap.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="check this bundle (made by `edgetl export` on the host) instead of training and exporting one",
    )
    args = ap.parse_args()
    if args.cache is not None:
        use_cache(args.cache)
    if args.bundle is not None and not (args.bundle / "bundle.json").is_file():
        print(f"error: --bundle {args.bundle} has no bundle.json; pass a folder `edgetl export` wrote", file=sys.stderr)
        return 2
    cores = [c for c in args.cores.split(",") if c]
    unknown = [c for c in cores if not (HERE / "cpuinfo" / f"{c}.txt").is_file()]
    if unknown:
        print(f"error: no cpuinfo for core(s) {unknown}; known: {', '.join(CORES)}", file=sys.stderr)
        return 2
    t_all = time.monotonic()
    try:
        ensure_tools()
        CACHE.mkdir(parents=True, exist_ok=True)
        work = args.work or Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
        work.mkdir(parents=True, exist_ok=True)
        shutil.copy2(HERE / "probe.py", work / "probe.py")
        t0 = time.monotonic()
        if args.bundle is not None:
            bundle = work / "bundle"
            shutil.rmtree(bundle, ignore_errors=True)
            shutil.copytree(args.bundle, bundle, ignore=shutil.ignore_patterns("verify"))
            log(f"host: bundle {args.bundle} (copied to {bundle})")
        else:
            bundle = make_bundle(work, args.weights_dir, args.image_size)
        host_report, _ = host_reference(bundle, work)
        images = predict_images(bundle, work)
        log("host: edgetl predict, every artifact")
        host_predict = predict_all(
            lambda argv: edgetl_host(*argv),
            str(bundle),
            str(images),
            [a["name"] for a in host_report["artifacts"]],
            len(host_report["labels"]),
        )
        t_host = time.monotonic() - t0
        log(f"host: verdict {host_report['verdict']} ({t_host:.0f} s)")
        t0 = time.monotonic()
        build_root()
        tool = installed(args.install, work)
        t_root = time.monotonic() - t0
        rows, infos = [], []
        for core in cores:
            log(f"{core}: edgetl verify + probe + predict under emulation")
            r, info = run_core(core, bundle, work, host_report, args.int8_tolerance, host_predict, images, tool)
            rows += r
            infos.append(info)
            log(
                f"{core}: {len(info['problems'])} difference(s) from the host ({info['total_s']:.0f} s; cpu: {info['cpu']})"
            )
    except Failed as exc:
        print(f"device-test-arm64: FAIL: {exc}", file=sys.stderr)
        return 1
    print_tables(rows, infos)
    stages = "copy of --bundle" if args.bundle is not None else "finetune, export"
    print(
        f"\nhost ({stages}, verify, probe, predict): {t_host:.0f} s; root + venv: {t_root:.0f} s; "
        f"total {time.monotonic() - t_all:.0f} s. Emulated latency is not a device figure."
    )
    (work / "summary.json").write_text(json.dumps({"rows": rows, "cores": infos}, indent=1))
    problems = [f"{i['core']}: {p}" for i in infos for p in i["problems"]]
    for p in problems:
        print(f"  - {p}", file=sys.stderr)
    verdict = "FAIL" if problems else "PASS"
    print(
        f"device-test-arm64: {verdict} ({len(cores)} cores, {len(problems)} difference(s) from the host; "
        f"{work}/summary.json)"
    )
    return 1 if problems else 0


def print_tables(rows: list[dict], infos: list[dict]) -> None:
    print(
        "\n| core | artifact | accuracy (host) | passed (host) | top-1 = host | mean / max abs diff vs host | "
        "XNNPACK partitions | predict top-1 = host | predict max abs diff |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        parts = (
            ""
            if r["xnnpack_partitions"] is None
            else (f"{r['xnnpack_partitions']}{' (whole graph)' if r['one_partition'] else ''}")
        )
        print(
            f"| {r['core']} | {r['artifact']} | {r['accuracy']:.4f} ({r['host_accuracy']:.4f}) | "
            f"{r['passed']} ({r['host_passed']}) | {r['top1_agreement_host']:.3f} | "
            f"{r['mean_abs_diff_host']:.1e} / {r['max_abs_diff_host']:.1e} | {parts} | "
            f"{_opt(r.get('predict_top1_host'), '.3f')} | {_opt(r.get('predict_max_diff_host'), '.1e')} |"
        )
    print("\n| core | verify's machine line | verify s | predict s | verify + probe + predict s |")
    print("| --- | --- | --- | --- | --- |")
    for i in infos:
        print(f"| {i['core']} | {i['cpu']} ({i['arch']}) | {i['verify_s']} | {i.get('predict_s')} | {i['total_s']} |")


def _opt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    sys.exit(main())
