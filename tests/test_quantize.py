"""QAT on the stock tf_keras.applications backbones (edgetl.qat, converted by edgetl.convert).

Small (32 px) random-weight models so the whole file runs in a few minutes on 2 cores. Every
check runs the real tfmot / TFLite converter / LiteRT / tf2onnx / onnxruntime code paths.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgetl._tfenv import keras, tf

K = keras()
TF = tf()

from edgetl import qat as q  # noqa: E402
from edgetl.convert.onnx import float_to_onnx, qat_to_onnx  # noqa: E402
from edgetl.convert.tflite import float_to_tflite, ptq_to_tflite_int8, qat_to_tflite_int8  # noqa: E402
from edgetl.errors import ConfigError, ExportError, ModelFileError  # noqa: E402
from edgetl.finetune import get_base  # noqa: E402
from edgetl.predict import tflite_predict  # noqa: E402

#: backbones whose QAT path is exercised here by every ``case`` test (the guard test compares it to the table)
QAT_TESTED_BACKBONES = ("mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "mobilenet_v2")
#: the bigger rows, too slow for every ``case`` test: where their QAT path is tested instead
QAT_TESTED_ELSEWHERE = {
    "resnet50": "test_export.py::test_every_variant_exports_for_every_backbone (train, QAT, every variant, "
    "1 XNNPACK partition, int8 agrees with QAT)",
    "vgg16": "same, and test_caffe_preprocessing_folds_into_the_stem_conv here",
    "efficientnet_b7": "test_efficientnet_b7_blocks_quantize_to_one_xnnpack_partition here (B7's stem and first two "
    "stages at B7 width/depth; the whole B7 is converted in benchmarks/export_latency.py)",
}

SIZE = 32
NUM_CLASSES = 6
FROZEN = 12  # first base layers frozen, like a partial fine-tune


def build_classifier(name, seed=0):
    """edgetl's own classifier (backbones table + finetune.build_classifier): nested base + pool/dropout/dense."""
    from edgetl.backbones import get_backbone
    from edgetl.finetune import build_classifier as edgetl_classifier
    from edgetl.finetune import get_base
    from edgetl.weights import WeightsChoice

    K.utils.set_random_seed(seed)
    model, base = edgetl_classifier(get_backbone(name), SIZE, NUM_CLASSES, WeightsChoice("none", None), 0.2)
    assert get_base(model) is base
    rng = np.random.default_rng(seed)
    for layer in base.layers:  # non-trivial BN statistics so that folding is really tested
        if isinstance(layer, K.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, layer.moving_variance.shape).astype("float32"))
    for layer in base.layers[:FROZEN]:
        layer.trainable = False
    return model


def images(n, seed=1):
    """'Real-ish' images: smooth colour blobs plus noise, 0..255, integer valued."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = []
    for _ in range(n):
        c = rng.uniform(0, 255, 3)
        g = np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy + rng.uniform()))
        img = c[None, None, :] * (0.6 + 0.4 * g[..., None]) + rng.normal(0, 12, (SIZE, SIZE, 3))
        out.append(np.clip(np.round(img), 0, 255))
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module", params=QAT_TESTED_BACKBONES)
def case(request):
    name = request.param
    model = build_classifier(name)
    qat = q.quantize_for_training(model)
    q.calibrate(qat, images(32, seed=2), batch_size=16)
    return {"name": name, "model": model, "qat": qat}


def _tflite_run(blob, x):
    return tflite_predict(blob, x, threads=1)


# ----------------------------------------------------------------------------------------------


def stem_layers(flat, plan):
    """Names of the layers flatten marked as the float stem, and of its output layer(s), in layer order."""
    stem = [layer.name for layer in flat.layers if plan.of(layer).float_]
    outs = [layer.name for layer in flat.layers if plan.of(layer).stem_out]
    return stem, outs


@pytest.mark.parametrize("stem", q.STEMS)
def test_flatten_preserves_outputs_and_flags(case, stem):
    model = case["model"]
    flat, plan = q.flatten(model, stem=stem)
    x = images(6)
    diff = np.abs(model(x, training=False).numpy() - flat(x, training=False).numpy()).max()
    assert diff <= 1e-5, diff
    kinds = {type(layer).__name__ for layer in flat.layers}
    assert "TFOpLambda" not in kinds and "BatchNormalization" not in kinds
    assert not any(isinstance(layer, K.Model) for layer in flat.layers)
    assert ("SpaceToDepth" in kinds) == (stem == "space_to_depth" and case["name"].startswith("mobilenet"))
    names, outs = stem_layers(flat, plan)
    if stem == "float":
        # the stem is a prefix of the graph: preprocessing, exactly one Conv2D (the 3-channel stem conv), its
        # activation; its last layer is the single producer of the first quantized tensor
        by_name = {layer.name: layer for layer in flat.layers}
        assert [type(by_name[n]).__name__ for n in names].count("Conv2D") == 1
        assert [layer.name for layer in flat.layers[1 : 1 + len(names)]] == names
        assert len(outs) == 1 and outs[0] == names[-1]
        assert (
            by_name[names[names.index(next(n for n in names if type(by_name[n]).__name__ == "Conv2D"))]].input_shape[-1]
            == 3
        )
    else:
        assert names == [] and outs == []
    # trainable flags survive: frozen base conv layers stay frozen, the head stays trainable
    base = get_base(model)
    frozen = [layer.name for layer in base.layers[:FROZEN] if type(layer).__name__ in ("Conv2D", "DepthwiseConv2D")]
    assert frozen
    by_name = {layer.name: layer for layer in flat.layers}
    for n in frozen:
        assert by_name[n].trainable is False, n
    assert by_name["predictions"].trainable is True


def test_flatten_output_is_serializable():
    model = build_classifier("mobilenet_v3_small")
    flat = q.flatten_for_qat(model)
    clone = K.Model.from_config(flat.get_config())
    clone.set_weights(flat.get_weights())
    x = images(2)
    assert np.abs(clone(x).numpy() - flat(x).numpy()).max() < 1e-6


def test_qat_model_is_close_to_float_and_only_the_stem_and_softmax_are_float(case):
    from tensorflow_model_optimization.quantization.keras import QuantizeWrapper

    qat = case["qat"]
    stem, outs = stem_layers(*q.flatten(case["model"]))
    unwrapped = [layer.name for layer in qat.layers[1:] if not isinstance(layer, QuantizeWrapper)]
    assert set(unwrapped) <= set(stem) | {"predictions_act"} and "predictions_act" in unwrapped
    wrapped = {layer.layer.name: layer for layer in qat.layers if isinstance(layer, QuantizeWrapper)}
    assert outs and all(n in wrapped for n in outs)  # the stem output is fake-quantized
    for n in stem:  # but no stem weight is (tfmot may wrap a conv before a ReLU with an output-only config)
        if n in wrapped:
            assert wrapped[n].quantize_config.get_weights_and_quantizers(wrapped[n].layer) == [], n
    x = images(8, seed=5)
    p_float = case["model"](x, training=False).numpy()
    p_fq = qat(x, training=False).numpy()
    assert np.isfinite(p_fq).all()
    assert np.abs(p_float - p_fq).max() < 0.1


def test_every_conv_weight_is_fake_quantized(case):
    """tfmot's LayerReLUQuantize would give a conv followed by a ReLU a no-op config (float weights in QAT, int8 in
    the file); edgetl's FusedReLU keeps it away. Every conv/dense outside the float stem quantizes its weights."""
    from tensorflow_model_optimization.quantization.keras import QuantizeWrapper

    stem, _ = stem_layers(*q.flatten(case["model"]))
    for layer in case["qat"].layers:
        if isinstance(layer, QuantizeWrapper) and type(layer.layer).__name__ in ("Conv2D", "DepthwiseConv2D", "Dense"):
            if layer.layer.name in stem:
                continue
            assert layer.quantize_config.get_weights_and_quantizers(layer.layer), layer.name


def test_all_zero_channel_with_large_bias_survives_int8():
    """A dead output channel (all-zero kernel) with bias 6: its int32 bias must not saturate (it did when the weight
    range came from a FakeQuant of [0, 0]: weight scale 4e-9)."""
    inp = K.Input((16, 16, 3))
    x = K.layers.Conv2D(8, 3, strides=2, padding="same", name="stem")(inp)  # the float stem
    x = K.layers.ReLU(6.0)(x)
    conv = K.layers.Conv2D(4, 1, name="gate")
    x = K.layers.ReLU(6.0)(conv(x))
    x = K.layers.GlobalAveragePooling2D()(x)
    head = K.layers.Dense(2, activation="softmax", name="predictions")
    model = K.Model(inp, head(x))
    kernel, _ = conv.get_weights()
    kernel[..., 0] = 0.0
    conv.set_weights([kernel, np.array([6.0, 0.0, 0.0, 0.0], np.float32)])
    head.set_weights([np.array([[2.0, -2.0], [0, 0], [0, 0], [0, 0]], np.float32), np.zeros(2, np.float32)])
    qat = q.quantize_for_training(model)
    x_img = images(4, seed=3)[:, :16, :16]
    q.calibrate(qat, x_img)
    p_int8 = _tflite_run(qat_to_tflite_int8(qat), x_img)
    p_fq = qat(x_img, training=False).numpy()
    assert (p_fq[:, 0] > 0.99).all()  # logits 12 vs -12
    assert np.abs(p_int8 - p_fq).max() < 0.01, p_int8


def test_calibrate_sets_ranges_from_data(case):
    qat = case["qat"]
    ranges = [
        (v.name, float(v.numpy()))
        for v in qat.non_trainable_weights
        if v.name.endswith(("output_max:0", "post_activation_max:0"))
    ]
    assert ranges
    # tfmot's initial +-6 is gone (a ReLU6 output may legitimately calibrate to exactly 6)
    changed = [abs(val - 6.0) > 1e-6 for _, val in ranges]
    assert np.mean(changed) > 0.8, ranges
    mults = [
        float(w._output_quantizer_vars["max_var"].numpy())
        for w in qat.layers
        if type(getattr(w, "layer", None)).__name__ == "Multiply"
    ]
    assert mults or case["name"] == "mobilenet_v2"  # the only backbone without squeeze-excite Multiply
    assert all(abs(v - 6.0) > 1e-6 for v in mults)
    assert not [layer for layer in qat.layers if type(layer).__name__ == "QuantizeLayer"]  # float input, float stem


def test_int8_stem_pins_the_input_range():
    qat = q.quantize_for_training(build_classifier("mobilenet_v3_small", seed=3), stem="space_to_depth")
    q.calibrate(qat, images(8, seed=2))
    inp = [layer for layer in qat.layers if type(layer).__name__ == "QuantizeLayer"][0]
    assert float(inp.quantizer_vars["min_var"].numpy()) == 0.0
    assert float(inp.quantizer_vars["max_var"].numpy()) == 255.0
    blob = qat_to_tflite_int8(qat)
    x = images(4, seed=3)
    assert np.abs(_tflite_run(blob, x) - qat(x, training=False).numpy()).max() < 0.15


def test_int8_tflite_is_fully_quantized_and_matches_fake_quant(case):
    from ai_edge_litert import schema_py_generated as schema

    qat = case["qat"]
    blob = qat_to_tflite_int8(qat)
    m = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(blob, 0))
    g = m.subgraphs[0]
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    inp, out = g.tensors[g.inputs[0]], g.tensors[g.outputs[0]]
    assert types[inp.type] == "UINT8" and types[out.type] == "FLOAT32"
    assert list(inp.quantization.scale) == [1.0] and list(inp.quantization.zeroPoint) == [0]
    ops = [names[m.operatorCodes[op.opcodeIndex].builtinCode] for op in g.operators]
    # raw bytes -> DEQUANTIZE -> float stem -> QUANTIZE -> int8 body -> DEQUANTIZE -> float SOFTMAX
    assert ops[0] == "DEQUANTIZE" and ops[-2:] == ["DEQUANTIZE", "SOFTMAX"] and ops.count("DEQUANTIZE") == 2
    float_to_int8 = [
        i
        for i, op in enumerate(g.operators)
        if ops[i] == "QUANTIZE" and types[g.tensors[op.inputs[0]].type] == "FLOAT32"
    ]
    assert len(float_to_int8) == 1  # one float->int8 boundary: the stem output (int8->int8 requantize ops aside)
    start = float_to_int8[0]
    assert "CONV_2D" in ops[1:start] and start <= 8  # the stem is a few ops

    def tensor_types(op):
        return {types[g.tensors[t].type] for t in list(op.inputs) + list(op.outputs) if t >= 0}

    for op in g.operators[1:start]:
        assert tensor_types(op) == {"FLOAT32"}
    body = ops[start + 1 : -2]
    assert "CONV_2D" in body and "FULLY_CONNECTED" in body
    assert "HARD_SWISH" not in body  # not run by XNNPACK in int8 (see docs/qat.md)
    assert "MINIMUM" not in body and "RELU" not in body and "RELU6" not in body  # same: partition breakers
    for op in g.operators[start + 1 : -2]:
        assert tensor_types(op) <= {"INT8", "INT32"}, ops[g.operators.index(op)]

    from edgetl.tflite_fb import xnnpack_partitions

    # one XNNPACK partition that reads the model input and writes the model output: it runs every op
    assert xnnpack_partitions(blob) == (1, True)

    x = images(16, seed=7)
    p_int8 = _tflite_run(blob, x)
    p_fq = qat(x, training=False).numpy()
    assert np.abs(p_int8 - p_fq).mean() < 0.02
    assert np.abs(p_int8 - p_fq).max() < 0.15
    assert len(blob) < 0.45 * len(float_to_tflite(case["model"]))


def test_int8_input_variants_agree(case):
    if case["name"] != "mobilenet_v3_small":
        pytest.skip("input types are backbone independent; checked once")
    qat = case["qat"]
    from ai_edge_litert.interpreter import Interpreter

    x = images(4, seed=12).astype(np.uint8)
    outs = {}
    for kind in ("uint8", "int8", "float32"):
        it = Interpreter(model_content=qat_to_tflite_int8(qat, input_type=kind), num_threads=1)
        it.allocate_tensors()
        d, o = it.get_input_details()[0], it.get_output_details()[0]
        assert d["dtype"] == np.dtype(kind)
        if kind == "int8":
            assert d["quantization"] == (1.0, -128)
            feed = (x.astype(np.int16) - 128).astype(np.int8)
        else:
            feed = x.astype(d["dtype"])
        res = []
        for img in feed:
            it.set_tensor(d["index"], img[None])
            it.invoke()
            res.append(it.get_tensor(o["index"])[0].copy())
        outs[kind] = np.stack(res)
    np.testing.assert_allclose(outs["int8"], outs["uint8"], atol=1e-6)
    np.testing.assert_allclose(outs["float32"], outs["uint8"], atol=1e-6)
    with pytest.raises(ConfigError):
        qat_to_tflite_int8(qat, input_type="int4")


def test_qdq_onnx_runs_in_onnxruntime(case):
    import onnx
    import onnxruntime as ort

    qat = case["qat"]
    blob = qat_to_onnx(qat, opset=13)
    proto = onnx.load_from_string(blob)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # weights are stored as int8 behind DequantizeLinear (not float on the int8 grid)
    producer = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    float_convs = [n for n in convs if producer.get(n.input[1]) is None]
    assert len(float_convs) == 1  # only the float stem conv keeps float weights, as in the QAT model
    assert float_convs[0].input[1] in {i.name for i in proto.graph.initializer}
    assert all(producer[n.input[1]].op_type == "DequantizeLinear" for n in convs if n not in float_convs)
    int8_bytes = sum(len(i.raw_data) for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8)
    float_bytes = sum(len(i.raw_data) for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    assert int8_bytes > float_bytes
    # every Add/Mul between quantized tensors reads quantized constants (ORT fuses them to QLinear*)
    inits = {i.name for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type in ("Add", "Mul") and any(
            producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input
        ):
            assert not any(i in inits for i in n.input), n.name
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
    x = images(4, seed=8)
    name = sess.get_inputs()[0].name
    p = np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])
    p_fq = qat(x, training=False).numpy()
    assert p.shape == p_fq.shape
    assert np.abs(p - p_fq).max() < 0.1


def test_qat_trains_a_step_and_keeps_frozen_layers(case):
    # runs after the conversion tests of the same backbone (it changes the weights)
    model, qat = case["model"], case["qat"]
    x, y = images(8, seed=6), np.arange(8) % NUM_CLASSES
    wrapped = {layer.layer.name: layer for layer in qat.layers if hasattr(layer, "layer")}
    plain = {layer.name: layer for layer in qat.layers if not hasattr(layer, "layer")}
    base = get_base(model)
    convs = [layer.name for layer in base.layers[:FROZEN] if type(layer).__name__ in ("Conv2D", "DepthwiseConv2D")]
    stem_conv = convs[0]  # the float stem conv (frozen too; wrapped only when it is the stem output)
    frozen_name = next(n for n in convs[1:] if n in wrapped)
    assert wrapped[frozen_name].trainable is False
    assert (wrapped[stem_conv] if stem_conv in wrapped else plain[stem_conv]).trainable is False

    def kernel(n):
        return [v for v in (wrapped[n] if n in wrapped else plain[n]).weights if v.name.endswith("kernel:0")][0]

    frozen_before = kernel(frozen_name).numpy().copy()
    stem_before = kernel(stem_conv).numpy().copy()
    head_before = kernel("predictions").numpy().copy()
    qat.compile(optimizer=K.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    hist = qat.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0])
    assert not np.allclose(kernel("predictions").numpy(), head_before)
    np.testing.assert_array_equal(kernel(frozen_name).numpy(), frozen_before)
    np.testing.assert_array_equal(kernel(stem_conv).numpy(), stem_before)


def test_save_load_roundtrip(tmp_path):
    model = build_classifier("mobilenet_v3_small", seed=4)
    qat = q.quantize_for_training(model)
    q.calibrate(qat, images(8))
    path = tmp_path / "qat.h5"
    q.save_qat_model(qat, path)
    loaded = q.load_qat_model(path)
    x = images(4, seed=9)
    np.testing.assert_allclose(loaded(x, training=False).numpy(), qat(x, training=False).numpy(), atol=1e-6)
    assert [w.trainable for w in loaded.layers] == [w.trainable for w in qat.layers]
    assert sum(v.shape.num_elements() for v in loaded.trainable_weights) == sum(
        v.shape.num_elements() for v in qat.trainable_weights
    )
    assert q.seven_bit(loaded)  # the 7-bit kernel grid (WEIGHT_LEVELS) survives save/load
    assert len(qat_to_tflite_int8(loaded)) > 0


def test_load_garbage_raises_model_file_error(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(ModelFileError):
        q.load_qat_model(bad)
    with pytest.raises(ModelFileError):
        q.load_qat_model(tmp_path / "missing.h5")


def test_unsupported_graph_raises_export_error():
    inp = K.Input((SIZE, SIZE, 3))
    x = K.layers.Conv2D(4, 3)(inp)
    x = TF.math.sin(x)  # TFOpLambda that has no int8 rewrite
    model = K.Model(inp, x)
    with pytest.raises(ExportError):
        q.flatten_for_qat(model)


def test_ptq_and_float_converters():
    model = build_classifier("mobilenet_v3_small", seed=5)
    x = images(8, seed=10)
    fp = float_to_tflite(model)
    p_fp = _tflite_run(fp, x)
    assert np.abs(p_fp - model(x).numpy()).max() < 1e-4
    ptq = ptq_to_tflite_int8(model, x)
    p = _tflite_run(ptq, x)
    assert p.shape == p_fp.shape and np.isfinite(p).all()
    # the random backbone's outputs hardly depend on the image, so PTQ's accuracy is checked on a small conv net whose
    # outputs do: int8 must follow the float model, image by image (a converter that ignores the input fails here)
    K.utils.set_random_seed(3)
    inp = K.Input((SIZE, SIZE, 3))
    h = K.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    h = K.layers.Conv2D(16, 3, strides=2, activation="relu")(h)
    h = K.layers.Conv2D(16, 3, strides=2, activation="relu")(h)
    h = K.layers.GlobalAveragePooling2D()(h)
    small = K.Model(
        inp,
        K.layers.Dense(NUM_CLASSES, activation="softmax", kernel_initializer=K.initializers.RandomNormal(stddev=2.0))(
            h
        ),
    )
    xs = images(64, seed=11)
    ref = small(xs).numpy()
    assert ref.argmax(1).std() > 0  # the float model's answers vary with the image
    got = _tflite_run(ptq_to_tflite_int8(small, xs[:32]), xs)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9 and np.abs(got - ref).mean() <= 0.01  # measured 0.95, 0.002
    import onnxruntime as ort

    sess = ort.InferenceSession(float_to_onnx(model), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    p_onnx = sess.run(None, {name: x[:1]})[0]
    assert np.abs(p_onnx - p_fp[:1]).max() < 1e-4


def test_every_backbone_in_the_table_has_a_qat_test():
    """Guard: adding a backbone row without QAT coverage fails here."""
    from edgetl.backbones import BACKBONES

    assert sorted(QAT_TESTED_BACKBONES + tuple(QAT_TESTED_ELSEWHERE)) == sorted(BACKBONES)


@pytest.mark.parametrize("stem", q.STEMS)
def test_caffe_preprocessing_folds_into_the_stem_conv(stem):
    """VGG16/ResNet50's RGB->BGR + mean subtraction (a frozen 1x1 permutation conv in front of the base) is folded
    into the stem conv exactly: outputs unchanged, no 1x1 conv left on the input, the first conv reads the 3 RGB
    channels with its kernel's input channels reversed, a per-channel offset (-mean, reversed) in front of it."""
    from edgetl.backbones import CAFFE_BGR_MEAN

    model = build_classifier("vgg16")
    flat, plan = q.flatten(model, stem=stem)
    x = images(4)
    assert np.abs(model(x, training=False).numpy() - flat(x, training=False).numpy()).max() <= 1e-5
    convs = [layer for layer in flat.layers if type(layer).__name__ == "Conv2D"]
    assert "input_preprocess" not in [layer.name for layer in convs]
    first = convs[0]
    assert first.name == "block1_conv1" and first.input_shape[-1] == 3
    original = model.get_layer("vgg16").get_layer("block1_conv1").get_weights()[0]
    np.testing.assert_array_equal(first.get_weights()[0], original[:, :, ::-1, :])
    pre = flat.layers[1]
    if stem == "float":  # fp32 in the int8 file: offset only
        assert type(pre).__name__ == "ChannelAffine" and plan.of(pre).float_
        scale, offset = pre.get_weights()
    else:  # quantized as a 1x1 depthwise conv
        assert type(pre).__name__ == "DepthwiseConv2D"
        scale, offset = pre.get_weights()[0].reshape(-1), pre.get_weights()[1]
    np.testing.assert_array_equal(scale, np.ones(3, np.float32))
    np.testing.assert_allclose(offset, -np.asarray(CAFFE_BGR_MEAN[::-1], np.float32), rtol=1e-7)


def _efficientnet_b7_head(size=SIZE):
    """A classifier on EfficientNet-B7's stem and first two stages (block1a-d, block2a-g) at B7's width and depth
    coefficients (2.0, 3.1: the same layers, channel counts and names as in the table's EfficientNetB7, whose 813
    layers take minutes to rewrite and convert on 2 cores), plus B7's top conv (1x1 to 2560 channels)."""
    from tf_keras.src.applications import efficientnet

    from edgetl.backbones import Backbone, get_backbone
    from edgetl.finetune import build_classifier as edgetl_classifier
    from edgetl.weights import WeightsChoice

    row = get_backbone("efficientnet_b7")

    class B7Head(Backbone):
        def build_base(self, image_size, weights):
            return efficientnet.EfficientNet(
                2.0,
                3.1,
                600,
                0.5,
                model_name="efficientnetb7",
                blocks_args=efficientnet.DEFAULT_BLOCKS_ARGS[:2],
                include_top=False,
                weights=None,
                input_shape=(image_size, image_size, 3),
            )

    import dataclasses

    K.utils.set_random_seed(0)
    b = B7Head(**{f.name: getattr(row, f.name) for f in dataclasses.fields(Backbone)})
    model, base = edgetl_classifier(b, size, NUM_CLASSES, WeightsChoice("none", None), 0.2)
    from edgetl.finetune import recalibrate_batchnorm

    recalibrate_batchnorm(base, images(16, seed=4))
    return model, base, row


def test_efficientnet_b7_blocks_quantize_to_one_xnnpack_partition():
    from tensorflow_model_optimization.quantization.keras import QuantizeWrapper

    from edgetl.tflite_fb import xnnpack_partitions

    model, base, row = _efficientnet_b7_head()
    names = [layer.name for layer in base.layers]
    assert row.freeze_points["early"] in names  # block2g_add: the table's early point is in these stages
    assert sum(type(layer).__name__ == "Add" for layer in base.layers) == 3 + 6  # block1b-d, block2b-g
    flat, plan = q.flatten(model)
    x = images(8, seed=5)
    assert np.abs(model(x, training=False).numpy() - flat(x, training=False).numpy()).max() <= 1e-5
    qat = q.quantize_for_training(model)
    q.calibrate(qat, images(16, seed=2), batch_size=16)
    stem, _ = stem_layers(flat, plan)
    weighted = [
        layer
        for layer in qat.layers
        if isinstance(layer, QuantizeWrapper)
        and type(layer.layer).__name__ in ("Conv2D", "DepthwiseConv2D", "Dense")
        and layer.layer.name not in stem
    ]
    n_linear = sum(type(layer).__name__ in ("Conv2D", "DepthwiseConv2D", "Dense") for layer in flat.layers)
    assert len(weighted) == n_linear - 1  # every conv/dense but the float stem conv quantizes its weights
    assert all(w.quantize_config.get_weights_and_quantizers(w.layer) for w in weighted)
    blob = qat_to_tflite_int8(qat)
    assert xnnpack_partitions(blob) == (1, True)
    p_int8, p_fq = _tflite_run(blob, x), qat(x, training=False).numpy()
    assert np.abs(p_int8 - p_fq).mean() < 0.02 and np.abs(p_int8 - p_fq).max() < 0.15


def _saturation_model():
    """linear float stem conv -> 1x1 conv (kernel 0.5 and 0.5*101/127 alternating) -> output, calibrated on black and
    white images: the stem output range is about [-40, 29], its zero point 148, and a white image gives uint8 255.

    With 8-bit weights (int8 127 and 101 in each pair: 255 * 228 > 32767) onnxruntime's x86 int8 conv kernels
    without VNNI (AVX2 EPYC, onnxruntime 1.32) saturate their int16 pair sums: ORT_ENABLE_ALL gave -7.8 where the
    QDQ graph gives 207.5. 7-bit weights (63 and 50, WEIGHT_LEVELS) are exact."""
    K.utils.set_random_seed(3)
    inp = K.Input((8, 8, 3), name="image")
    x = K.layers.Conv2D(
        16,
        3,
        strides=2,
        padding="same",
        name="stem",
        kernel_initializer=K.initializers.Constant(0.01),
        bias_initializer=K.initializers.Constant(-40.0),
    )(inp)
    y = K.layers.Conv2D(4, 1, name="pointwise")(x)
    model = K.Model(inp, y)
    kernel = np.full((1, 1, 16, 4), 0.5, np.float32)
    kernel[:, :, 1::2, :] = 0.5 * 101 / 127  # int8 127 and 101: 255 * 228 > 32767; not on the 7-bit grid
    model.get_layer("pointwise").set_weights([kernel, np.zeros(4, np.float32)])
    qat = q.quantize_for_training(model)
    bright = np.full((4, 8, 8, 3), 255.0, np.float32)
    q.calibrate(qat, np.concatenate([bright, np.zeros_like(bright)]), batch_size=8)
    return qat, bright


def test_pointwise_and_dense_weights_are_7_bit_in_qat_onnx_and_tflite(case):
    """The QAT grid of Conv2D/Dense kernels is -63..63 and both files store exactly it (WEIGHT_LEVELS)."""
    if case["name"] != "mobilenet_v3_small":
        pytest.skip("weight encoding is backbone independent; checked once")
    import onnx
    from onnx import numpy_helper

    from edgetl import tflite_fb

    assert q.WEIGHT_LEVELS == {"Conv2D": 63, "Dense": 63, "DepthwiseConv2D": 127}
    qat = case["qat"]
    proto = onnx.load_from_string(qat_to_onnx(qat))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    groups = {
        n.input[1]: next((a.i for a in n.attribute if a.name == "group"), 1)
        for n in proto.graph.node
        if n.op_type == "Conv"
    }
    seen = {"pointwise": 0, "depthwise": 0, "gemm": 0}
    for n in proto.graph.node:
        if (
            n.op_type == "DequantizeLinear"
            and n.input[0] in inits
            and inits[n.input[0]].dtype == np.int8
            and n.input[0].endswith("_edgetl_w_q")
        ):
            peak = int(np.abs(inits[n.input[0]]).max())
            kind = "gemm" if n.output[0] not in groups else ("pointwise" if groups[n.output[0]] == 1 else "depthwise")
            assert peak == (127 if kind == "depthwise" else 63), (kind, peak)
            seen[kind] += 1
    assert min(seen.values()) >= 1, seen
    obj = tflite_fb.read(qat_to_tflite_int8(qat))
    g = obj.subgraphs[0]
    peaks = {}
    for op in g.operators:
        name = tflite_fb.op_name(obj, op)
        t = g.tensors[int(op.inputs[1])] if name in ("CONV_2D", "FULLY_CONNECTED", "DEPTHWISE_CONV_2D") else None
        if (
            t is not None
            and t.quantization is not None
            and t.quantization.scale is not None
            and obj.buffers[t.buffer].data is not None
        ):
            peaks.setdefault(name, set()).add(int(np.abs(np.asarray(obj.buffers[t.buffer].data).view(np.int8)).max()))
    assert peaks == {"CONV_2D": {63}, "FULLY_CONNECTED": {63}, "DEPTHWISE_CONV_2D": {127}}, peaks


def test_int8_onnx_gives_the_qdq_graph_result_under_default_optimizations():
    """onnxruntime's fused int8 kernels (ORT_ENABLE_ALL) compute what the QDQ graph (ORT_DISABLE_ALL) and the fake-quant
    model compute, also where 8-bit weights would overflow int16 pair sums (x86 without VNNI), and the TFLite file
    (XNNPACK) carries the same 7-bit kernel exactly."""
    import onnxruntime as ort

    qat, bright = _saturation_model()
    blob = qat_to_onnx(qat)
    outs = {}
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
        outs[level] = sess.run(None, {sess.get_inputs()[0].name: bright[:1]})[0]
    fq = qat(bright[:1], training=False).numpy()
    tol = 0.01 * float(np.abs(fq).max())  # ~2.5 output steps; saturation is 50-100% off
    assert float(np.abs(fq).max()) > 1.0
    np.testing.assert_allclose(outs["ORT_DISABLE_ALL"], fq, atol=tol)
    np.testing.assert_allclose(outs["ORT_ENABLE_ALL"], outs["ORT_DISABLE_ALL"], atol=tol)
    p_tfl = tflite_predict(qat_to_tflite_int8(qat, input_type="float32"), bright[:1])
    np.testing.assert_allclose(p_tfl.reshape(fq.shape), fq, atol=tol)


def _tflite_int8_biases(blob) -> list[np.ndarray]:
    """The bias of each int8 CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED of a TFLite file, as the runtime adds it
    (int32 x its scale)."""
    from edgetl import tflite_fb

    obj = tflite_fb.read(blob)
    g = obj.subgraphs[0]
    out = []
    for op in g.operators:
        if tflite_fb.op_name(obj, op) not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        if len(op.inputs) < 3 or int(op.inputs[2]) < 0:
            continue
        t = g.tensors[int(op.inputs[2])]
        data = obj.buffers[t.buffer].data
        if data is None or t.quantization is None or t.quantization.scale is None:
            continue  # the float stem's bias
        ints = np.asarray(data, np.uint8).view(np.int32).astype(np.float64)
        out.append(ints * np.asarray(t.quantization.scale, np.float64).reshape(-1))
    return out


def _matched(files: list[np.ndarray], keras_biases: list[np.ndarray]) -> int:
    """How many of the file's biases equal a Keras bias of the same length (to float32 rounding)."""
    return sum(any(k.shape == b.shape and np.allclose(b, k, rtol=1e-5, atol=1e-9) for k in keras_biases) for b in files)


def _onnx_bias_off_grid(blob) -> list[float]:
    """Per int8 Conv/Gemm of a QDQ ONNX file: how far its float bias lies off the grid that onnxruntime rounds it
    to (input scale x weight scale, from the DequantizeLinear nodes), in steps, float32 storage allowed."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(blob)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}

    def dq_scale(name):
        while name in producer and producer[name].op_type in ("Pad", "Reshape", "Transpose", "Squeeze", "Flatten"):
            name = producer[name].input[0]
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        return inits[node.input[1]].astype(np.float64)

    off = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        s_in, s_w = dq_scale(node.input[0]), dq_scale(node.input[1])
        if s_in is None or s_w is None:
            continue  # the float stem
        b = inits[node.input[2]].astype(np.float64)
        step = float(s_in.reshape(-1)[0]) * np.broadcast_to(s_w.reshape(-1), b.shape)
        k = (b / np.where(step > 0, step, 1.0))[step > 0]
        off.append(float((np.abs(k - np.round(k)) - 1e-6 * np.abs(k)).max(initial=0)))
    return off


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "efficientnet_b0"])
def test_snapped_biases_are_what_the_int8_files_add(backbone):
    """The int8 files add each conv/dense bias on the int32 grid input scale x weight scale. After ``snap_biases``
    the QAT model's biases lie on that grid, so the TFLite file adds exactly the QAT model's bias (before, most are
    up to half a step off) and the ONNX file's float biases are already on the grid onnxruntime rounds them to.
    EfficientNet-B0 covers swish, squeeze-excite through Reshape and the Dense head."""
    from edgetl.qat.snap import input_scale

    qat = q.quantize_for_training(build_classifier(backbone))
    q.calibrate(qat, images(32, seed=2), batch_size=16)

    def keras_biases():
        out = []
        for w in qat.layers:
            bias = {v.name.split("/")[-1]: v for v in w.weights}.get("bias:0")
            if getattr(w, "layer", None) is not None and bias is not None and input_scale(w) is not None:
                out.append(bias.numpy().astype(np.float64))
        return out

    before = _tflite_int8_biases(qat_to_tflite_int8(qat))
    assert len(before) >= 10 and _matched(before, keras_biases()) < len(before) // 2  # rounded away from Keras's
    assert max(_onnx_bias_off_grid(qat_to_onnx(qat))) > 0.1

    assert q.snap_biases(qat) > len(before) // 2  # (an all-zero bias is on the grid already)
    assert q.snap_biases(qat) == 0  # on the grid: a second pass changes nothing
    after = _tflite_int8_biases(qat_to_tflite_int8(qat))
    assert _matched(after, keras_biases()) == len(after)
    off = _onnx_bias_off_grid(qat_to_onnx(qat))
    assert len(off) >= 10 and max(off) < 1e-3, off  # (tf2onnx drops all-zero biases)


def test_snapped_kernels_leave_no_weight_on_a_rounding_boundary():
    """QAT drives weights onto the boundary between two grid points, where Keras in graph mode (``predict``) and
    the exporters round them differently. After ``snap_kernels`` every weight is a grid value, and the kernel the
    QAT model computes with in graph mode is the one the ONNX file stores."""
    import onnx
    from onnx import numpy_helper

    qat = q.quantize_for_training(build_classifier("mobilenet_v3_small"))
    q.calibrate(qat, images(32, seed=2), batch_size=16)
    wrapper = next(w for w in qat.layers if type(getattr(w, "layer", None)).__name__ == "Conv2D" and "expand" in w.name)
    kernel = next(v for v in wrapper.weights if v.name.split("/")[-1] == "kernel:0")
    k = kernel.numpy()
    step = np.abs(k).max(axis=(0, 1, 2)) / q.WEIGHT_LEVELS["Conv2D"]
    k[0, 0, 0, :] = -31.5 * step  # a weight of every channel exactly on a boundary, as QAT leaves them
    kernel.assign(k)

    def off_grid():
        w = kernel.numpy().astype(np.float64)
        s = np.abs(w).max(axis=(0, 1, 2)) / q.WEIGHT_LEVELS["Conv2D"]
        r = w / s
        return float(np.abs(r - np.round(r)).max())

    assert off_grid() > 0.49
    assert q.snap_kernels(qat) >= 1
    assert off_grid() < 1e-4 and q.snap_kernels(qat) == 0

    cin = k.shape[2]
    probe = tf().function(lambda x: wrapper(x, training=False))  # graph mode, as predict runs it
    eye = tf().constant(np.eye(cin, dtype=np.float32).reshape(cin, 1, 1, cin))
    bias = next(v for v in wrapper.weights if v.name.split("/")[-1] == "bias:0").numpy()
    used = probe(eye).numpy().reshape(cin, -1) - bias
    proto = onnx.load_from_string(qat_to_onnx(qat))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    (conv,) = [n for n in proto.graph.node if n.op_type == "Conv" and wrapper.name + "/" in n.name]
    dq = producer[conv.input[1]]
    stored = inits[dq.input[0]].astype(np.float64) * inits[dq.input[1]].astype(np.float64).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(used, stored[:, :, 0, 0].T, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "efficientnet_b0"])
def test_the_fidelity_benchmarks_float64_reference_computes_the_qdq_graph(backbone):
    """``benchmarks/int8_fidelity.py`` measures the QAT model and both int8 files against the QAT graph computed in
    float64 (``benchmarks/qdq_exact.py``). That reference must be the graph onnxruntime runs unfused: each int8
    tensor, computed from onnxruntime's own int8 inputs, the same but for the odd element float32 puts across a step
    boundary. (Without the inputs given, one such element spreads through a deep net: EfficientNet-B0's last
    tensors then differ in up to half their elements, the effect the benchmark measures.) EfficientNet-B0 covers
    swish (Sigmoid), its squeeze-excite (Reshape) and the MatMul head."""
    import sys
    from pathlib import Path

    import onnxruntime as ort

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import int8_layers
    import qdq_exact

    qat = q.quantize_for_training(build_classifier(backbone))
    q.calibrate(qat, images(32, seed=2), batch_size=16)
    q.snap_to_grid(qat)
    data = qat_to_onnx(qat)
    probed, named = int8_layers.int8_tensor_outputs(data)
    names = [name for name, _ in named]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probed, options, providers=["CPUExecutionProvider"])
    x = images(6, seed=3)
    runs = [session.run(None, {session.get_inputs()[0].name: xi[None]}) for xi in x]  # the output, then names
    theirs = {name: np.concatenate([r[k + 1] for r in runs]) for k, name in enumerate(names)}
    probs, ours = qdq_exact.evaluate(data, x, tensors=tuple(names), given=theirs)
    assert len(names) > 50
    diff = [theirs[name].astype(np.int32) - np.rint(v).astype(np.int32) for name, v in zip(names, ours)]
    off = [float(np.mean(d != 0)) for d in diff]
    # a tensor's share may reach ~2%: values that sit exactly at a calibrated range end land a hair from a half step
    assert max(off) < 0.05, (max(off), names[int(np.argmax(off))])
    assert sum(int(np.count_nonzero(d)) for d in diff) / sum(d.size for d in diff) < 1e-3
    np.testing.assert_allclose(probs, np.concatenate([r[0] for r in runs]), atol=1e-4)


def test_litert_computes_every_int8_tensor_of_a_swish_net_as_the_qat_graph():
    """TFLite's int8 LOGISTIC writes a fixed grid (scale 1/256, zero point -128). A sigmoid fake-quantized on a
    learned range made the converter add a QUANTIZE after each LOGISTIC: a second rounding the QAT model does not
    have, which left 25-58% of EfficientNet-B0's swish and gate values one step off. With the sigmoid on that fixed
    grid (``SigmoidQuantizeConfig``) the file has no such QUANTIZE, and each int8 tensor LiteRT (XNNPACK) computes
    from its own int8 inputs is the QAT graph's (float64) value but for the odd element on a step boundary."""
    import sys
    from pathlib import Path

    from edgetl import tflite_fb

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import int8_layers

    qat = q.quantize_for_training(build_classifier("efficientnet_b0"))
    q.calibrate(qat, images(32, seed=2), batch_size=16)
    q.snap_to_grid(qat)
    rows = int8_layers.compare_tflite_with_exact(qat, images(3, seed=3), local=True)
    assert len(rows) > 200
    off = [r["differ"] / r["elements"] for r in rows]
    assert max(off) < 0.05 and sum(r["differ"] for r in rows) / sum(r["elements"] for r in rows) < 1e-3, max(off)
    obj = tflite_fb.read(qat_to_tflite_int8(qat))
    ops = [tflite_fb.op_name(obj, op) for op in obj.subgraphs[0].operators]
    assert ops.count("LOGISTIC") > 30 and ops.count("QUANTIZE") == 1  # the float stem's output only
