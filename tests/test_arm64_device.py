"""The device path on an emulated 64-bit ARM core (Raspberry Pi 4 class), against this host, in `make test`.

The quick version of `make device-test-arm64` (devices/arm64/harness.py; the full one covers three cores and pip
inside the emulated root): an arm64 Debian root (cached under .device/arm64/), edgetl[device]'s aarch64 wheels
resolved by the host's pip, and on a bundle made by `edgetl export`: `edgetl verify` and the probe under
qemu-user emulating a Cortex-A72, compared with the same on the host. Needs root (mounts, chroot), the Debian
mirror and the package index the first time; skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import rundir_factory

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "devices" / "arm64"))

CORE = "cortex-a72"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or platform.machine() != "x86_64" or not sys.platform.startswith("linux"),
    reason="the emulated arm64 check needs root on an x86-64 Linux host (mounts, chroot, binfmt_misc)",
)


@pytest.fixture(scope="module")
def arm(tmp_path_factory):
    import harness

    try:
        harness.ensure_tools()
        harness.build_root()
    except harness.Failed as exc:
        pytest.fail(f"could not prepare the emulated arm64 root: {exc}")
    work = Path(tempfile.mkdtemp(prefix="test-", dir=harness.CACHE))
    try:
        env = harness.host_resolved_site(work)
        shutil.copy2(harness.HERE / "probe.py", work / "probe.py")
        yield harness, work, env
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def bundle(arm) -> Path:
    from edgetl.export import export_run

    harness, work, _ = arm
    run = rundir_factory.make_run_dir(work / "made", qat=True, per_class=16)
    return export_run(run, "all", ["fp32", "qat_int8"], work / "bundle", samples=24, seed=3).out


def _host(harness, bundle: Path, work: Path):
    proc = harness.sh(
        [
            sys.executable,
            "-m",
            "edgetl",
            "verify",
            str(bundle),
            "--json",
            "--report",
            str(work / "host-report"),
            *harness.VERIFY_FLAGS,
        ],
        check=False,
    )
    assert proc.returncode in (0, 1, 4), proc.stderr[-2000:]
    harness.sh([sys.executable, str(work / "probe.py"), str(bundle), str(work / "host.npz")])
    return json.loads(proc.stdout)


def test_verify_on_emulated_cortex_a72_matches_the_host(arm, bundle):
    harness, work, env = arm
    host_report = _host(harness, bundle, work)
    rel = bundle.relative_to(work)
    proc = harness.in_root(
        CORE,
        [
            "/usr/bin/python3",
            "-m",
            "edgetl",
            "verify",
            f"/work/{rel}",
            "--json",
            "--report",
            f"/work/report-{CORE}",
            *harness.VERIFY_FLAGS,
        ],
        work,
        env=env,
        timeout=900,
    )
    assert proc.returncode in (0, 1, 4) and proc.stdout.strip(), proc.stderr[-3000:]
    dev_report = json.loads(proc.stdout)
    assert dev_report["machine"]["arch"] == "aarch64"
    assert "emulated" in dev_report["machine"]["cpu"]  # emulated latency is never shown as a device figure
    proc = harness.in_root(
        CORE, ["/usr/bin/python3", "/work/probe.py", f"/work/{rel}", f"/work/{CORE}.npz"], work, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["tensorflow_imported"] is False
    rows, problems = harness.compare(
        CORE, host_report, dev_report, work / "host.npz", work / f"{CORE}.npz", probe, 0.02
    )
    assert problems == []
    assert {r["artifact"] for r in rows} == {a["name"] for a in host_report["artifacts"]}
    qat_tflite = [r for r in rows if r["quantization"] == "qat_int8" and r["format"] == "tflite"]
    assert qat_tflite and all(r["xnnpack_partitions"] == 1 and r["one_partition"] for r in qat_tflite)
    fp32 = [r for r in rows if r["quantization"] == "fp32"]
    assert fp32 and all(r["max_abs_diff_host"] <= 1e-4 for r in fp32)
    assert np.load(work / f"{CORE}.npz")["labels"].shape[0] == dev_report["samples"]
