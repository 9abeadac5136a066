"""Run every artifact of a bundle on its sample, TensorFlow-free: the same code on the host and on the (emulated) device.

    python probe.py BUNDLE OUT.npz

Writes each artifact's output probabilities (batch 1, 1 thread, through edgetl's own runners) and, for TFLite
artifacts, how LiteRT's default XNNPACK delegate partitions the graph on *this* CPU. Prints one JSON line with the
machine, the partition counts and whether TensorFlow was imported (it must not be).
"""

from __future__ import annotations

import json
import platform
import sys

import numpy as np

from edgetl.tflite_fb import xnnpack_partitions
from edgetl.verify import load_bundle
from edgetl.verify.report import machine_info
from edgetl.verify.runners import make_runner


def main(bundle_dir: str, out: str) -> None:
    bundle = load_bundle(bundle_dir)
    arrays: dict[str, np.ndarray] = {"labels": bundle.sample.labels}
    partitions: dict[str, list] = {}
    for spec in bundle.artifacts:
        runner = make_runner(spec, bundle.input, bundle.labels, threads=1)
        try:
            arrays[spec.name] = runner.predict(bundle.sample.images).astype(np.float32)
        finally:
            runner.close()
        if spec.format == "tflite":
            count, whole = xnnpack_partitions(spec.path.read_bytes())
            partitions[spec.name] = [count, bool(whole)]
    np.savez(out, **arrays)
    print(
        json.dumps(
            {
                "machine": machine_info(1) | {"arch": platform.machine()},
                "partitions": partitions,
                "quantization": {s.name: s.quantization for s in bundle.artifacts},
                "format": {s.name: s.format for s in bundle.artifacts},
                "tensorflow_imported": "tensorflow" in sys.modules,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
