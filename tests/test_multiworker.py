"""Multi-worker training: two real `edgetl finetune` processes on localhost joined by TF_CONFIG
(MultiWorkerMirroredStrategy over gRPC collectives); a cluster that never forms ends with one line, no hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO

FAST = [
    "--weights",
    "none",
    "--image-size",
    "32",
    "--epochs",
    "1",
    "--fine-tune-epochs",
    "0",
    "--no-qat",
    "--batch-size",
    "8",
    "--json",
]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env(ports, index, tmp):
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    tmp.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "TF_USE_LEGACY_KERAS": "1",
        "TMPDIR": str(tmp),
        "EDGETL_WORKER_TIMEOUT": "240",
    }


def _start_workers(ports, data, out, args, tmp_path) -> list:
    """One `edgetl finetune` process per port, each with its own TF_CONFIG task and temporary folder."""
    return [
        subprocess.Popen(
            [sys.executable, "-m", "edgetl", "finetune", "--data", str(data), "--out", str(out), *args],
            cwd=REPO,
            env=_env(ports, i, tmp_path / f"tmp{i}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(len(ports))
    ]


@pytest.mark.slow  # two TensorFlow processes training together: ~4.5 min measured on 2 loaded cores
def test_two_workers_on_localhost_train_one_run(shapes_dir, tmp_path):
    ports = _free_ports(2)
    out = tmp_path / "out" / "run"
    procs = _start_workers(ports, shapes_dir, out, FAST, tmp_path)
    try:
        results = [p.communicate(timeout=540) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["run"]  # one run directory, nothing partial beside it
    m = json.loads((out / "manifest.json").read_text())
    assert m["distribution"] == {
        "strategy": "MultiWorkerMirroredStrategy",
        "replicas": 2,
        "workers": 2,
        "chief": "worker:0",
    }
    assert json.loads(results[0][0])["run_dir"] == str(out)
    other = json.loads(results[1][0])
    assert other["run_dir"] is None and other["distribution"]["workers"] == 2
    assert os.listdir(tmp_path / "tmp1") == []  # the other worker deleted its private copy
    assert m["phases"]["head"]["status"] == "done" and (out / "float.keras").is_file()


def test_a_cluster_that_never_forms_ends_with_one_line(shapes_dir, tmp_path):
    ports = _free_ports(2)  # worker 1 is never started
    env = {**_env(ports, 0, tmp_path / "tmp0"), "EDGETL_WORKER_TIMEOUT": "8"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "edgetl", "finetune", "--data", str(shapes_dir), "--out", str(tmp_path / "run"), *FAST],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # TensorFlow blocks in C++: a watchdog SIGKILLs it
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "did not form within 8 s" in lines[0], proc.stderr[-2000:]
    assert time.monotonic() - t0 < 200
    assert os.listdir(tmp_path) == ["tmp0"]  # no run directory, no partial folder


def _history_files(root) -> list:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f == "history.csv"]


@pytest.mark.slow  # two TensorFlow processes; the survivor must notice the dead peer: ~2-3 min on 2 cores
def test_a_worker_that_dies_mid_training_ends_the_other_with_one_line(shapes_dir, tmp_path):
    ports = _free_ports(2)
    out = tmp_path / "out" / "run"
    many = [a if a != "1" else "100" for a in FAST] + ["--patience", "100"]  # a head phase that outlasts the kill
    procs = _start_workers(ports, shapes_dir, out, many, tmp_path)
    try:
        deadline = time.monotonic() + 400
        while not _history_files(tmp_path / "out") and time.monotonic() < deadline:  # the chief finished an epoch
            assert procs[0].poll() is None, procs[0].communicate()[1][-2000:]
            time.sleep(0.5)
        assert _history_files(tmp_path / "out"), "the chief never finished a head epoch"
        procs[1].kill()
        killed = time.monotonic()
        _stdout, stderr = procs[0].communicate(timeout=240)  # no hang: TimeoutExpired fails the test
        noticed = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 3, stderr[-3000:]  # ClusterError
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "another worker died or became unreachable" in lines[0], stderr[-3000:]
    assert "Traceback" not in stderr
    assert not out.exists()  # no run directory from a failed cluster (the work folder stays, to resume)
    print(f"the chief noticed the dead worker after {noticed:.0f} s")
