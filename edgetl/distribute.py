"""Pick the tf.distribute strategy that matches the hardware: several GPUs, TF_CONFIG workers, or as is.

``EDGETL_CPU_DEVICES=N`` splits the CPU into N logical devices and mirrors over them (used to test the
multi-replica path on a machine without GPUs). Must be called before TensorFlow initialises its devices.

Multi-worker (``TF_CONFIG`` with more than one task, docs/multi-worker.md): MultiWorkerMirroredStrategy. A cluster
that does not form within ``EDGETL_WORKER_TIMEOUT`` seconds (default 300: a worker never started, a wrong address)
ends this process with one line, killed by a watchdog process (exit 137: TensorFlow blocks in C++ there, holding
the GIL, and catches SIGTERM, so nothing else would end it); a worker dying later fails the running collective on the others (TensorFlow's coordination
service stops getting its heartbeats within ~10-20 s), reported as :class:`edgetl.errors.ClusterError`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

#: seconds to wait for every worker of TF_CONFIG's cluster to join
DEFAULT_WORKER_TIMEOUT = 300.0


@dataclass(frozen=True)
class ClusterRole:
    """This process's place in a TF_CONFIG cluster (a lone process: 1 worker, the chief)."""

    workers: int = 1
    task_type: str = "worker"
    index: int = 0

    @property
    def chief(self) -> bool:
        return self.task_type == "chief" or (self.task_type == "worker" and self.index == 0 and not self._has_chief)

    _has_chief: bool = False

    @property
    def chief_name(self) -> str:
        return "chief:0" if self._has_chief else "worker:0"


def cluster_failure(exc: BaseException, role: ClusterRole):
    """A ClusterError for TensorFlow's error when a peer worker died or is unreachable; None for anything else."""
    from edgetl._tfenv import tf
    from edgetl.errors import ClusterError

    errors = tf().errors
    kinds = (errors.UnavailableError, errors.DeadlineExceededError, errors.AbortedError, errors.CancelledError)
    if role.workers <= 1 or not isinstance(exc, kinds):
        return None
    first = " ".join(str(exc).split())
    first = first[:240] + ("..." if len(first) > 240 else "")
    return ClusterError(
        f"multi-worker training failed on {role.task_type}:{role.index} of {role.workers}: another worker died or "
        f"became unreachable ({type(exc).__name__}: {first})",
        "check the other workers' logs, then restart every worker with the same command (the chief resumes from "
        "its last finished phase)",
    )


def cluster_role() -> ClusterRole:
    """Read TF_CONFIG (TF-free). ConfigError for TF_CONFIG that is not JSON or names no task of its cluster."""
    from edgetl.errors import ConfigError

    raw = os.environ.get("TF_CONFIG", "")
    if not raw.strip():
        return ClusterRole()
    try:
        conf = json.loads(raw)
        cluster = conf.get("cluster", {}) or {}
        task = conf.get("task", {}) or {}
        workers = sum(len(v) for k, v in cluster.items() if k in ("chief", "worker"))
        task_type, index = str(task.get("type", "worker")), int(task.get("index", 0))
    except (ValueError, TypeError, AttributeError):
        raise ConfigError(
            'TF_CONFIG is not valid JSON of the form {"cluster": {...}, "task": {...}}',
            "fix or unset TF_CONFIG (docs/multi-worker.md)",
        ) from None
    if workers > 1 and (task_type not in cluster or not 0 <= index < len(cluster[task_type])):
        raise ConfigError(
            f"TF_CONFIG's task {task_type}:{index} is not in its cluster",
            "set task.type/task.index to one of the cluster's entries",
        )
    return ClusterRole(workers=max(workers, 1), task_type=task_type, index=index, _has_chief="chief" in cluster)


def worker_timeout() -> float:
    from edgetl.errors import ConfigError

    raw = os.environ.get("EDGETL_WORKER_TIMEOUT", "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_WORKER_TIMEOUT
    except ValueError:
        value = -1
    if value <= 0:
        raise ConfigError(f"EDGETL_WORKER_TIMEOUT={raw!r} is not a positive number of seconds", "e.g. 300")
    return value


#: run in a child process: TensorFlow blocks in C++ while the cluster forms (holding the GIL: no Python thread of
#: this process runs) and catches SIGTERM, so only an outside SIGKILL ends a cluster that never forms
_WATCHDOG = """
import os, sys, time
parent, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
end = time.monotonic() + timeout
while time.monotonic() < end:
    time.sleep(0.2)
    try:
        os.kill(parent, 0)
    except OSError:
        sys.exit(0)
    if os.getppid() != parent:
        sys.exit(0)
sys.stderr.write(message + "\\n")
sys.stderr.flush()
os.kill(parent, 9)
"""


def _multi_worker(tf, role: ClusterRole):
    import subprocess

    timeout = worker_timeout()
    message = (
        f"error: the multi-worker cluster in TF_CONFIG did not form within {timeout:g} s (this is "
        f"{role.task_type}:{role.index} of {role.workers}); start every worker listed in TF_CONFIG, check "
        "their addresses and ports, or raise EDGETL_WORKER_TIMEOUT."
    )
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout), message],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    finally:
        watchdog.kill()
        watchdog.wait()


def select_strategy(role: ClusterRole | None = None):
    from edgetl._tfenv import tf

    tf = tf()
    role = role or cluster_role()
    if role.workers > 1:
        return _multi_worker(tf, role)
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    n_cpu = int(os.environ.get("EDGETL_CPU_DEVICES", "0") or 0)
    if n_cpu > 1:
        cpus = tf.config.list_physical_devices("CPU")
        try:
            tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * n_cpu)
        except RuntimeError:
            pass  # already initialised (e.g. by an earlier run in this process): use what exists
        logical = tf.config.list_logical_devices("CPU")
        if len(logical) > 1:
            return tf.distribute.MirroredStrategy([d.name for d in logical])
    return tf.distribute.get_strategy()
