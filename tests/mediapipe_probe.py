"""Run MediaPipe Tasks on .tflite files and print what it reports, as JSON (used by tests/test_export.py).

``python mediapipe_probe.py IMAGES.npy MODEL.tflite...`` -> {model: {"categories": [[[index, name, score], ...] per
image], "packed_files": [...], "labels_txt": str, "metadata": {...}}}. Runs in any Python with ``mediapipe`` and
``numpy`` (no edgetl needed): in-process where mediapipe is importable, else in the test's own cached venv.

The mediapipe 1.2.x / 0.10.3x wheels import a pybind module they do not ship
(``mediapipe.tasks.cc.metadata.python._pywrap_metadata_version``) at the top of ``metadata.py``; only the metadata
*writer* (MetadataPopulator) uses it. An empty placeholder module lets the displayer, which converts the metadata to
JSON with MediaPipe's own C flatbuffers parser and the real schema, be imported unchanged.
"""

import importlib
import json
import sys
import types

import numpy as np


def _metadata_module():
    try:
        return importlib.import_module("mediapipe.tasks.python.metadata.metadata")
    except ModuleNotFoundError as exc:
        if "mediapipe.tasks.cc" not in str(exc):
            raise
    parts = "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version".split(".")
    for i in range(3, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    return importlib.import_module("mediapipe.tasks.python.metadata.metadata")


def main(images_path, models):
    import mediapipe as mp
    from mediapipe.tasks import python as mp_tasks
    from mediapipe.tasks.python import vision

    metadata = _metadata_module()
    images = np.load(images_path, allow_pickle=False)
    out = {"mediapipe": mp.__version__}
    for model in models:
        options = vision.ImageClassifierOptions(
            base_options=mp_tasks.BaseOptions(model_asset_path=model), max_results=1000
        )
        cats = []
        with vision.ImageClassifier.create_from_options(options) as classifier:
            for img in images:
                res = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(img)))
                cats.append([[c.index, c.category_name, float(c.score)] for c in res.classifications[0].categories])
        displayer = metadata.MetadataDisplayer.with_model_file(model)
        files = displayer.get_packed_associated_file_list()
        out[model] = {
            "categories": cats,
            "packed_files": files,
            "labels_txt": displayer.get_associated_file_buffer("labels.txt").decode()
            if "labels.txt" in files
            else None,
            "metadata": json.loads(displayer.get_metadata_json()),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
