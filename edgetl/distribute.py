"""Pick the tf.distribute strategy that matches the hardware: several GPUs, TF_CONFIG workers, or as is.

``EDGETL_CPU_DEVICES=N`` splits the CPU into N logical devices and mirrors over them (used to test the
multi-replica path on a machine without GPUs). Must be called before TensorFlow initialises its devices.
"""

from __future__ import annotations

import json
import os


def select_strategy():
    from edgetl._tfenv import tf

    tf = tf()
    if os.environ.get("TF_CONFIG"):
        cluster = json.loads(os.environ["TF_CONFIG"]).get("cluster", {})
        if sum(len(v) for v in cluster.values()) > 1:
            return tf.distribute.MultiWorkerMirroredStrategy()
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
