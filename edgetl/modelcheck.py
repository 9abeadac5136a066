"""Model files name nothing edgetl would import or run: an allow-list check of their config (TF-free).

Keras deserializes a model by the names its config carries: ``module`` entries are *imported*
(``importlib.import_module``) and ``class_name`` / ``registered_name`` pick the classes to build, ``TFOpLambda``
calls a TensorFlow function by name, and Lambda layers carry Python bytecode. So before any deserialization,
:func:`check_config` walks the config (a ``.keras`` archive's ``config.json``, or the ``model_config`` of the QAT
HDF5 file) and refuses, naming the exact entry, anything outside what edgetl's own models contain.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from edgetl.errors import ModelFileError

#: Keras classes in edgetl's classifiers (every backbone, the head, initializers): see tests/test_bad_inputs.py.
KERAS_CLASSES = frozenset(
    {
        "Functional",
        "Model",
        "Sequential",
        "InputLayer",
        "Activation",
        "Add",
        "AveragePooling2D",
        "BatchNormalization",
        "Concatenate",
        "Conv2D",
        "Dense",
        "DepthwiseConv2D",
        "Dropout",
        "Flatten",
        "GlobalAveragePooling2D",
        "GlobalMaxPooling2D",
        "HardSigmoid",
        "MaxPooling2D",
        "Multiply",
        "Normalization",
        "ReLU",
        "Rescaling",
        "Reshape",
        "Softmax",
        "Subtract",
        "ZeroPadding2D",
        "TFOpLambda",
        "Constant",
        "GlorotNormal",
        "GlorotUniform",
        "HeNormal",
        "HeUniform",
        "Ones",
        "RandomNormal",
        "RandomUniform",
        "TruncatedNormal",
        "VarianceScaling",
        "Zeros",
        "L1",
        "L2",
        "L1L2",
        "MaxNorm",
        "NonNeg",
        "UnitNorm",
    }
)
#: Classes of the QAT model (tfmot wrappers/quantizers and edgetl.qat's layers and configs).
QAT_CLASSES = frozenset(
    {
        "QuantizeWrapper",
        "QuantizeWrapperV2",
        "QuantizeLayer",
        "QuantizeAwareActivation",
        "Default8BitQuantizeConfig",
        "Default8BitConvQuantizeConfig",
        "MovingAverageQuantizer",
        "LastValueQuantizer",
        "AllValuesQuantizer",
        "AddConst",
        "ScaleConst",
        "ChannelAffine",
        "SpaceToDepth",
        "FusedReLU",
        "OutputQuantizeConfig",
        "SigmoidQuantizeConfig",
        "NoOpQuantizeConfig",
        "AffineQuantizeConfig",
        "QATWrapper",
        "ChannelWeightsQuantizer",
        "ChannelQuantizeConfig",
        # tfmot's own wrapper config for an unannotated layer that feeds an annotated one (ResNet50's float-stem
        # ZeroPadding2D before the stem conv): the registry's config of that layer, outputs only (none for padding)
        "OutputOnlyConfig",
    }
)
_EDGETL_QAT = frozenset(f"edgetl>{name}" for name in QAT_CLASSES)
#: ``module`` values Keras may import for these classes (None: the legacy HDF5 config names no module).
MODULES = frozenset(
    {
        "keras",
        "keras.layers",
        "keras.initializers",
        "keras.regularizers",
        "keras.constraints",
        "keras.models",
        "tf_keras.src.engine.functional",
        "tf_keras.src.engine.sequential",
        "tf_keras.src.engine.training",
        "tf_keras.src.layers.core.tf_op_layer",
    }
)
QAT_MODULES = frozenset(
    {
        "edgetl.qat.layers",
        "edgetl.qat.configs",
        "edgetl.quantize",  # where the layers and configs lived before edgetl.qat (QAT models written then)
        "tensorflow_model_optimization.python.core.quantization.keras.quantize_aware_activation",
        "tensorflow_model_optimization.python.core.quantization.keras.quantize_wrapper",
        "tensorflow_model_optimization.python.core.quantization.keras.quantize_layer",
        "tensorflow_model_optimization.python.core.quantization.keras.quantizers",
        "tensorflow_model_optimization.python.core.quantization.keras.default_8bit.default_8bit_quantize_registry",
    }
)
#: TensorFlow functions a TFOpLambda layer may call (hard-swish / squeeze-excite arithmetic).
TF_OPS = frozenset(
    {
        "math.multiply",
        "__operators__.add",
        "math.add",
        "math.subtract",
        "__operators__.mul",
        "math.truediv",
        "nn.relu6",
        "math.sigmoid",
    }
)
ACTIVATIONS = frozenset(
    {
        "linear",
        "relu",
        "relu6",
        "softmax",
        "sigmoid",
        "hard_sigmoid",
        "swish",
        "silu",
        "hard_swish",
        "hard_silu",
        "tanh",
        "elu",
        "gelu",
        "selu",
        None,
    }
)

_FIX = "only use run directories written by `edgetl finetune`; re-run it to rewrite the model"


def _refuse(what: str, path: Path, where: str, detail: str) -> ModelFileError:
    return ModelFileError(f"refusing to load the {what} {path}: {where} {detail}", _FIX)


def check_config(config: Any, path: Path, what: str, qat: bool = False) -> None:
    """Raise ModelFileError naming the first entry of ``config`` that is not on the allow-list."""
    classes = KERAS_CLASSES | (QAT_CLASSES | _EDGETL_QAT if qat else frozenset())
    modules = MODULES | (QAT_MODULES if qat else frozenset())
    stack: list[tuple[Any, str]] = [(config, "model config")]
    while stack:  # iterative: a config nested 100k deep must not overflow the stack
        node, where = stack.pop()
        if isinstance(node, list):
            stack.extend((v, where) for v in node)
            continue
        if not isinstance(node, dict):
            continue
        if "function_type" in node or node.get("class_name") in ("Lambda", "__lambda__", "function"):
            raise _refuse(
                what,
                path,
                f"its {where}",
                "contains Python code (a Lambda layer or a serialized function), which edgetl never runs",
            )
        if "module" in node and node["module"] is not None and node["module"] not in modules:
            raise _refuse(
                what,
                path,
                f"its {where}",
                f"names module {node['module']!r} (class "
                f"{node.get('class_name')!r}), which is not one edgetl's models use; edgetl imports "
                "nothing a model file names",
            )
        if "class_name" in node and node["class_name"] not in classes:
            raise _refuse(
                what,
                path,
                f"its {where}",
                f"names class {node['class_name']!r}, which is not a layer edgetl's models use",
            )
        registered = node.get("registered_name")
        if registered is not None and registered not in classes:
            raise _refuse(
                what,
                path,
                f"its {where}",
                f"names registered class {registered!r}, which is not one edgetl's models use",
            )
        if node.get("class_name") == "TFOpLambda":
            function = (node.get("config") or {}).get("function") if isinstance(node.get("config"), dict) else None
            if function not in TF_OPS:
                raise _refuse(
                    what,
                    path,
                    f"its {where}",
                    f"calls TensorFlow function {function!r}, which is not one edgetl's models use",
                )
        activation = node.get("activation")
        if isinstance(activation, str) and activation not in ACTIVATIONS:
            raise _refuse(
                what, path, f"its {where}", f"names activation {activation!r}, which is not one edgetl's models use"
            )
        inner = node.get("config")
        if isinstance(inner, dict) and isinstance(inner.get("name"), str) and "class_name" in node:
            where = f"{node['class_name']} {inner['name']!r}"
        # compile_config (optimizer, loss) is never deserialized: edgetl loads every model with compile=False
        stack.extend((v, where) for k, v in node.items() if isinstance(v, (dict, list)) and k != "compile_config")


def _parse(raw: Any, path: Path, what: str) -> Any:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        return json.loads(raw)
    except (TypeError, ValueError, RecursionError):
        raise ModelFileError(
            f"cannot load the {what} {path}: its model config is not readable JSON",
            "re-run `edgetl finetune` to rewrite it",
        ) from None


def check_keras_file(path: Path, what: str = "float model", qat: bool = False) -> None:
    """Check a ``.keras`` archive's ``config.json`` before Keras reads it (ModelFileError if not allowed)."""
    try:
        with zipfile.ZipFile(path) as archive:
            raw = archive.read("config.json")
    except KeyError:
        raise ModelFileError(
            f"cannot load the {what} {path}: the archive has no config.json", "re-run `edgetl finetune` to rewrite it"
        ) from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelFileError(
            f"cannot load the {what} {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}",
            "re-run `edgetl finetune` to rewrite it",
        ) from None
    check_config(_parse(raw, path, what), path, what, qat)


def check_h5_config(raw: Any, path: Path, what: str = "QAT model") -> None:
    """Check the ``model_config`` attribute of an HDF5 model (the QAT model) before Keras reads it."""
    check_config(_parse(raw, path, what), path, what, qat=True)
