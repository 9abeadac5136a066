"""Build tiny, real verification bundles (and run directories) for tests. Needs TensorFlow (host side).

A 32x32 colour classifier ("red"/"green"/"blue" dominant channel, Rescaling inside the model) is trained in a
few seconds on synthetic images, then exported for real: TFLite fp32 and full-int8 (uint8 in/out) with
``tf.lite.TFLiteConverter.from_keras_model``, ONNX fp32 with ``tf2onnx.convert.from_keras``. Faulty variants
(perturbed weights, shuffled classes, a model missing its Rescaling layer, an ONNX graph slowed by heavy
no-op MatMul chains) are produced the same way, so the verifier is tested on genuine artifacts.

    from tests.bundle_factory import get_factory, make_bundle
    bundle_dir = make_bundle(tmp_path / "bundle")                 # honest: onnx fp32 (reference), tflite fp32/int8
    f = get_factory()
    f.write_bundle(tmp_path / "b", f.honest_artifacts() + [f.tflite_fp32(f.variant("shuffled"), name="bad")])
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgetl import schema

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

LABELS = ("red", "green", "blue")
SIZE = 32
CONTRACT = {
    "layout": "NHWC",
    "height": SIZE,
    "width": SIZE,
    "channels": 3,
    "color": "RGB",
    "dtype": "float32",
    "range": [0, 255],
}
RUN_ID = "tiny-0001"


@dataclass
class ArtifactBlob:
    """An artifact's bytes plus what bundle.json will claim about it."""

    name: str
    file: str
    format: str
    quantization: str
    data: bytes = field(repr=False)
    input_dtype: str = "float32"
    input_quant: list[float] | None = None
    output_dtype: str = "float32"
    output_quant: list[float] | None = None
    source: str | None = None  # bundle.json "source" (None: not written; verify infers it from the quantization)

    def entry(self) -> schema.ArtifactRecord:
        return schema.ArtifactRecord(
            name=self.name,
            file=self.file,
            format=self.format,
            quantization=self.quantization,
            input_dtype=self.input_dtype,
            input_quant=self.input_quant,
            output_dtype=self.output_dtype,
            output_quant=self.output_quant,
            size_bytes=len(self.data),
            **({"source": self.source} if self.source else {}),
        )

    def renamed(self, name: str) -> ArtifactBlob:
        return replace(self, name=name, file=f"{name}.{self.format}")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 32, 32, 3) images whose dominant colour channel is the class, with texture and noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(LABELS)
    rng.shuffle(labels)
    base = rng.uniform(20, 110, size=(n, 1, 1, 3))
    images = base + rng.normal(0, 25, size=(n, SIZE, SIZE, 3))
    boost = rng.uniform(70, 130, size=n)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for i, label in enumerate(labels):
        blob = np.exp(-(((yy - rng.uniform(8, 24)) ** 2 + (xx - rng.uniform(8, 24)) ** 2) / rng.uniform(40, 200)))
        images[i, :, :, label] += boost[i] * (0.6 + 0.8 * blob)
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


class TinyClassifier:
    """A trained tiny tf_keras classifier and exporters for it (and for faulty variants of it)."""

    def __init__(self, seed: int = 0, n_train: int = 360, n_sample: int = 60):
        from edgetl._tfenv import keras, tf

        self.tf = tf()
        self.keras = keras()
        self.keras.utils.set_random_seed(seed)
        self.labels = LABELS
        x, y = synthetic_images(n_train, seed)
        self.model = self._build(rescale=True)
        self.model.compile(
            optimizer=self.keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        self.model.fit(x.astype(np.float32), y, epochs=12, batch_size=32, verbose=0)
        self.sample_images, self.sample_labels = synthetic_images(n_sample, seed + 1000)
        self.reference_outputs = self.predict(self.model, self.sample_images)
        self.calibration = x[:64]
        self._cache: dict[Any, ArtifactBlob] = {}
        self._variants: dict[str, Any] = {}

    # -- models -----------------------------------------------------------------------------------------
    def _build(self, rescale: bool):
        k = self.keras
        layers = [k.layers.Input((SIZE, SIZE, 3), name="image")]
        if rescale:
            layers.append(k.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale"))
        layers += [
            k.layers.Conv2D(8, 3, activation="relu", name="conv"),
            k.layers.GlobalAveragePooling2D(name="pool"),
            k.layers.Dense(len(LABELS), activation="softmax", name="head"),
        ]
        return k.Sequential(layers, name="tiny")

    def predict(self, model, images: np.ndarray) -> np.ndarray:
        return np.asarray(model(images.astype(np.float32), training=False), dtype=np.float32)

    def variant(self, kind: str):
        """``honest`` | ``perturbed`` (noisy conv weights) | ``shuffled`` (output classes permuted) |
        ``no_rescale`` (Rescaling layer dropped: the model really wants [-1, 1], not the contract's 0..255)."""
        if kind == "honest":
            return self.model
        if kind in self._variants:  # memoized: exporters cache by model identity
            return self._variants[kind]
        model = self._build(rescale=kind != "no_rescale")
        conv_w, conv_b = self.model.get_layer("conv").get_weights()
        head_w, head_b = self.model.get_layer("head").get_weights()
        if kind == "perturbed":
            rng = np.random.default_rng(7)
            conv_w = conv_w + rng.normal(0, 0.5 * conv_w.std(), conv_w.shape).astype(np.float32)
        elif kind == "shuffled":
            perm = np.roll(np.arange(len(LABELS)), 1)
            head_w, head_b = head_w[:, perm], head_b[perm]
        elif kind != "no_rescale":
            raise ValueError(kind)
        model.get_layer("conv").set_weights([conv_w, conv_b])
        model.get_layer("head").set_weights([head_w, head_b])
        self._variants[kind] = model
        return model

    # -- exporters --------------------------------------------------------------------------------------
    def _tflite_claims(self, blob: ArtifactBlob) -> ArtifactBlob:
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_content=blob.data)
        inp, out = it.get_input_details()[0], it.get_output_details()[0]

        def quant(d):
            return (
                [float(d["quantization"][0]), int(d["quantization"][1])] if np.dtype(d["dtype"]).kind in "iu" else None
            )

        return replace(
            blob,
            input_dtype=np.dtype(inp["dtype"]).name,
            input_quant=quant(inp),
            output_dtype=np.dtype(out["dtype"]).name,
            output_quant=quant(out),
        )

    def tflite_fp32(self, model=None, name: str = "model_fp32_tflite", **contract: Any) -> ArtifactBlob:
        key = ("tflite_fp32", id(model) if model is not None else None)
        if key not in self._cache:
            converter = self.tf.lite.TFLiteConverter.from_keras_model(model or self.model)
            self._cache[key] = self._tflite_claims(ArtifactBlob("", "", "tflite", "fp32", converter.convert()))
        return self.with_metadata(self._cache[key], **contract).renamed(name)

    def tflite_int8(self, model=None, name: str = "model_ptq_int8_tflite", **contract: Any) -> ArtifactBlob:
        key = ("tflite_int8", id(model) if model is not None else None)
        if key not in self._cache:
            tf = self.tf
            converter = tf.lite.TFLiteConverter.from_keras_model(model or self.model)
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            calib = self.calibration.astype(np.float32)
            converter.representative_dataset = lambda: ([calib[i : i + 1]] for i in range(len(calib)))
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.uint8
            converter.inference_output_type = tf.uint8
            self._cache[key] = self._tflite_claims(ArtifactBlob("", "", "tflite", "ptq_int8", converter.convert()))
        return self.with_metadata(self._cache[key], **contract).renamed(name)

    def onnx_fp32(self, model=None, name: str = "model_fp32_onnx", **contract: Any) -> ArtifactBlob:
        key = ("onnx_fp32", id(model) if model is not None else None)
        if key not in self._cache:
            import tf2onnx

            spec = (self.tf.TensorSpec((None, SIZE, SIZE, 3), self.tf.float32, name="image"),)
            proto, _ = tf2onnx.convert.from_keras(model or self.model, input_signature=spec, opset=13)
            self._cache[key] = ArtifactBlob("", "", "onnx", "fp32", proto.SerializeToString())
        return self.with_metadata(self._cache[key], **contract).renamed(name)

    def with_metadata(self, blob: ArtifactBlob, **contract: Any) -> ArtifactBlob:
        """Embed edgetl artifact metadata (docs/formats.md): labels + this artifact's own input contract.

        By default the contract is the bundle's, with the model's real input dtype (+ ``quant``); keyword
        arguments override contract fields (e.g. ``range=[-1, 1]``) to describe a model that takes other inputs.
        """
        own = dict(CONTRACT, dtype=blob.input_dtype)
        if blob.input_quant is not None:
            own["quant"] = list(blob.input_quant)
        own.update(contract)
        meta = {
            "schema": "edgetl.artifact/1",
            "edgetl_version": "0.1.0",
            "run_id": RUN_ID,
            "backbone": "tiny",
            "labels": list(LABELS),
            "input": own,
            "quantization": blob.quantization,
            "format": blob.format,
            "source": "float.keras",
        }
        if blob.format == "onnx":
            import onnx

            proto = onnx.load_from_string(blob.data)
            del proto.metadata_props[:]
            for key, value in {
                "edgetl.schema": meta["schema"],
                "edgetl.version": meta["edgetl_version"],
                "edgetl.run_id": RUN_ID,
                "edgetl.backbone": "tiny",
                "edgetl.labels": json.dumps(meta["labels"]),
                "edgetl.input": json.dumps(own, sort_keys=True),
                "edgetl.quantization": blob.quantization,
                "edgetl.format": "onnx",
                "edgetl.source": "float.keras",
            }.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value
            return replace(blob, data=proto.SerializeToString())
        try:  # the exporter's own (TF-free) flatbuffer writer
            from edgetl.export.tflite import embed_metadata
        except ImportError:  # exporter not available: artifact without metadata (verify then trusts bundle.json)
            return blob
        return replace(blob, data=embed_metadata(blob.data, meta, "".join(f"{x}\n" for x in LABELS)))

    def slowed_onnx(
        self,
        blob: ArtifactBlob | None = None,
        name: str = "model_slowed_onnx",
        hidden: int = 512,
        depth: int = 16,
        quantization: str = "fp32",
    ) -> ArtifactBlob:
        """The same ONNX graph plus a heavy MatMul/Tanh chain on the input whose result is multiplied by 0 and
        added to the output: identical probabilities, many times the compute."""
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        blob = blob or self.onnx_fp32()
        proto = onnx.load_from_string(blob.data)
        graph = proto.graph
        out_name = graph.output[0].name
        for node in graph.node:
            node.output[:] = [o + "__orig" if o == out_name else o for o in node.output]
        rng = np.random.default_rng(3)
        inits = [
            numpy_helper.from_array(np.array([-1, SIZE * SIZE * 3], np.int64), "slow_shape"),
            numpy_helper.from_array(np.array(1 / 255, np.float32), "slow_scale"),
            numpy_helper.from_array(np.array(0.0, np.float32), "slow_zero"),
            numpy_helper.from_array(
                (rng.standard_normal((SIZE * SIZE * 3, hidden)) / np.sqrt(SIZE * SIZE * 3)).astype(np.float32),
                "slow_w0",
            ),
        ]
        nodes = [
            helper.make_node("Reshape", [graph.input[0].name, "slow_shape"], ["slow_flat"]),
            helper.make_node("Mul", ["slow_flat", "slow_scale"], ["slow_scaled"]),
            helper.make_node("MatMul", ["slow_scaled", "slow_w0"], ["slow_h0"]),
            helper.make_node("Tanh", ["slow_h0"], ["slow_a0"]),
        ]
        for i in range(1, depth + 1):
            w = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"slow_w{i}"))
            nodes.append(helper.make_node("MatMul", [f"slow_a{i - 1}", f"slow_w{i}"], [f"slow_h{i}"]))
            nodes.append(helper.make_node("Tanh", [f"slow_h{i}"], [f"slow_a{i}"]))
        nodes += [
            helper.make_node("ReduceMean", [f"slow_a{depth}"], ["slow_mean"], axes=[1], keepdims=1),
            helper.make_node("Mul", ["slow_mean", "slow_zero"], ["slow_nothing"]),
            helper.make_node("Add", [out_name + "__orig", "slow_nothing"], [out_name]),
        ]
        graph.initializer.extend(inits)
        graph.node.extend(nodes)
        assert graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
        onnx.checker.check_model(proto)
        if quantization != blob.quantization:  # a claim of another quantization: drop the embedded metadata
            del proto.metadata_props[:]
        return ArtifactBlob(name, f"{name}.onnx", "onnx", quantization, proto.SerializeToString())

    def honest_artifacts(self) -> list[ArtifactBlob]:
        return [self.onnx_fp32(), self.tflite_fp32(), self.tflite_int8()]

    # -- writers ----------------------------------------------------------------------------------------
    def write_bundle(
        self,
        dest: str | Path,
        artifacts: list[ArtifactBlob] | None = None,
        *,
        reference: str | None = "model_fp32_onnx",
        images: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        reference_outputs: np.ndarray | None = None,
        qat_outputs: np.ndarray | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> Path:
        """Write a complete bundle per docs/formats.md (checksums included). ``overrides`` patch bundle.json."""
        dest = Path(dest)
        (dest / "sample").mkdir(parents=True, exist_ok=True)
        artifacts = self.honest_artifacts() if artifacts is None else artifacts
        blobs: dict[str, bytes] = {"labels.txt": ("\n".join(LABELS) + "\n").encode()}
        for art in artifacts:
            blobs[art.file] = art.data
        for key, array in (
            ("images", self.sample_images if images is None else images),
            ("labels", self.sample_labels if labels is None else labels),
            ("reference_outputs", self.reference_outputs if reference_outputs is None else reference_outputs),
            *([("qat_outputs", qat_outputs)] if qat_outputs is not None else []),
        ):
            np.save(dest / "sample" / f"{key}.npy", array, allow_pickle=False)
            blobs[f"sample/{key}.npy"] = (dest / "sample" / f"{key}.npy").read_bytes()
        for rel, data in blobs.items():
            if not rel.startswith("sample/"):
                (dest / rel).write_bytes(data)
        outputs = {"float.keras": "sample/reference_outputs.npy", "qat.h5": "sample/qat_outputs.npy"}
        manifest = schema.Bundle(
            schema=schema.BUNDLE_SCHEMA,
            edgetl_version="0.1.0",
            run_id=RUN_ID,
            backbone="tiny",
            labels=list(LABELS),
            input=CONTRACT,
            reference=reference,
            artifacts=[a.entry() for a in artifacts],
            sample=schema.SampleRecord(
                images="sample/images.npy",
                labels="sample/labels.npy",
                reference_outputs="sample/reference_outputs.npy",
                **({"source_outputs": outputs} if qat_outputs is not None else {}),
                count=int(len(self.sample_images if images is None else images)),
            ),
            files={rel: _sha(data) for rel, data in sorted(blobs.items())},
        ).dump()
        manifest.update(overrides or {})
        (dest / "bundle.json").write_text(json.dumps(manifest, indent=2))
        return dest

    def write_run(self, dest: str | Path, artifacts: list[ArtifactBlob] | None = None, model=None) -> Path:
        """A minimal run directory (manifest.json, float.keras, labels.txt) with its bundle in ``export/``."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        (model or self.model).save(dest / "float.keras")
        (dest / "labels.txt").write_text("\n".join(LABELS) + "\n")
        manifest = schema.RunManifest(
            schema=schema.RUN_SCHEMA,
            edgetl_version="0.1.0",
            run_id=RUN_ID,
            backbone="tiny",
            image_size=[SIZE, SIZE],
            labels=list(LABELS),
            input=CONTRACT,
            files={name: _sha((dest / name).read_bytes()) for name in ("float.keras", "labels.txt")},
            completed_phases=["head"],
        ).dump()
        (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
        self.write_bundle(dest / "export", artifacts)
        return dest

    def write_image_folder(self, dest: str | Path, n: int = 30, seed: int = 5000) -> Path:
        """A labelled class-folder dataset (PNG files) for ``--data``."""
        from PIL import Image

        dest = Path(dest)
        images, labels = synthetic_images(n, seed)
        for i, (img, label) in enumerate(zip(images, labels)):
            folder = dest / LABELS[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:03d}.png")
        return dest


def rehash(bundle_dir: str | Path) -> None:
    """Recompute every checksum in bundle.json (to build a *consistently* broken bundle on purpose)."""
    bundle_dir = Path(bundle_dir)
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    manifest["files"] = {rel: _sha((bundle_dir / rel).read_bytes()) for rel in manifest["files"]}
    for art in manifest["artifacts"]:
        art["size_bytes"] = (bundle_dir / art["file"]).stat().st_size
    (bundle_dir / "bundle.json").write_text(json.dumps(manifest, indent=2))


def edit_bundle_json(bundle_dir: str | Path, edit) -> None:
    """Apply ``edit(dict)`` to bundle.json in place."""
    path = Path(bundle_dir) / "bundle.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))


@functools.lru_cache(maxsize=1)
def get_factory() -> TinyClassifier:
    """One trained tiny classifier per process (training + exports take a few seconds)."""
    return TinyClassifier()


def make_bundle(dest: str | Path, artifacts: list[ArtifactBlob] | None = None, **kwargs: Any) -> Path:
    """An honest bundle (onnx fp32 reference, tflite fp32, tflite uint8 int8) at ``dest``."""
    return get_factory().write_bundle(dest, artifacts, **kwargs)


if __name__ == "__main__":  # python tests/bundle_factory.py OUT_DIR  → writes an honest bundle
    import sys

    out = make_bundle(sys.argv[1] if len(sys.argv) > 1 else "tiny_bundle")
    print(out)
