"""Read, edit and write TFLite flatbuffers without TensorFlow (LiteRT's generated schema + ``flatbuffers``).

Every .tflite that edgetl writes goes through :func:`write`, which

* stores each distinct quantization vector once: a per-channel int8 tensor carries one int64 zero point
  per channel (all 0 for symmetric weights, and again for its int32 bias), ~12 bytes a channel that the
  converter writes out separately for every tensor. Tables that hold equal vectors now point to one copy
  (flatbuffers allow shared offsets; readers see the same values), which is most of the gap between
  "int8 weights are 0.25x" and the file size; and
* aligns every weight buffer to 16 bytes (int32 biases and float weights are read in place).

:func:`finish_qat_int8` gives the converter's float-input QAT file a raw-pixel ``uint8`` (or ``int8``) input followed
by one ``DEQUANTIZE`` (XNNPACK runs it, unlike the uint8->int8 ``QUANTIZE`` the converter would add) and a float
``SOFTMAX`` on the dequantized logits.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from edgetl.errors import ExportError

_ALIGN = 16

#: input_type -> (TFLite tensor type name, numpy dtype, zero point); scale is always 1 (raw pixel bytes).
INPUT_TYPES = {"uint8": ("UINT8", np.uint8, 0), "int8": ("INT8", np.int8, -128)}


def _schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


def read(model: bytes) -> Any:
    """The flatbuffer as LiteRT's object API tree (``ModelT``)."""
    try:
        return _schema().ModelT.InitFromPackedBuf(bytearray(model), 0)
    except Exception as e:  # a truncated or foreign file
        raise ExportError(f"not a readable TFLite flatbuffer ({type(e).__name__})", "re-run the export") from e


def write(obj: Any) -> bytes:
    """Serialize a ``ModelT``: shared quantization vectors, 16-byte aligned buffers."""
    import flatbuffers

    schema = _schema()
    cache: dict[tuple[str, bytes], int] = {}

    class _Quant(schema.QuantizationParametersT):
        def Pack(self, builder):  # noqa: N802 - flatbuffers API name
            saved = {}
            for field, dtype in (
                ("min", np.float32),
                ("max", np.float32),
                ("scale", np.float32),
                ("zeroPoint", np.int64),
            ):
                value = getattr(self, field)
                if value is None:
                    continue
                arr = np.ascontiguousarray(np.asarray(value, dtype=dtype).reshape(-1))
                key = (field, arr.tobytes())
                if key not in cache:
                    cache[key] = builder.CreateNumpyVector(arr)
                saved[field] = cache[key]
            schema.QuantizationParametersStart(builder)
            adders = {
                "min": schema.QuantizationParametersAddMin,
                "max": schema.QuantizationParametersAddMax,
                "scale": schema.QuantizationParametersAddScale,
                "zeroPoint": schema.QuantizationParametersAddZeroPoint,
            }
            for field, offset in saved.items():
                adders[field](builder, offset)
            if self.details is not None:  # pragma: no cover - custom quantization, not produced by edgetl
                raise ExportError("custom quantization details are not supported", "re-export without them")
            schema.QuantizationParametersAddDetailsType(builder, self.detailsType)
            schema.QuantizationParametersAddQuantizedDimension(builder, self.quantizedDimension)
            return schema.QuantizationParametersEnd(builder)

    class _Buffer(schema.BufferT):
        def Pack(self, builder):  # noqa: N802
            data = None
            if self.data is not None:
                payload = np.asarray(self.data, dtype=np.uint8).tobytes()
                builder.StartVector(1, len(payload), _ALIGN)
                builder.head -= len(payload)
                builder.Bytes[builder.head : builder.head + len(payload)] = payload
                builder.vectorNumElems = len(payload)
                data = builder.EndVector()
            schema.BufferStart(builder)
            if data is not None:
                schema.BufferAddData(builder, data)
            schema.BufferAddOffset(builder, self.offset)
            schema.BufferAddSize(builder, self.size)
            return schema.BufferEnd(builder)

    for buf in obj.buffers or []:
        buf.__class__ = _Buffer
    for graph in obj.subgraphs or []:
        for tensor in graph.tensors or []:
            if tensor.quantization is not None:
                tensor.quantization.__class__ = _Quant
    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(obj.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def text(value: Any) -> str:
    """A flatbuffer string field (bytes) as ``str``."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def op_name(obj: Any, op: Any) -> str:
    """The builtin operator name (``"CONV_2D"``) of ``op`` in the ``ModelT`` ``obj``."""
    code = obj.operatorCodes[op.opcodeIndex]
    code = max(code.builtinCode, code.deprecatedBuiltinCode)
    return next(k for k, v in vars(_schema().BuiltinOperator).items() if v == code and not k.startswith("_"))


def _opcode(obj: Any, name: str) -> int:
    schema = _schema()
    code = getattr(schema.BuiltinOperator, name)
    for i, oc in enumerate(obj.operatorCodes or []):
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) == code:
            return i
    oc = schema.OperatorCodeT()
    oc.builtinCode = code
    oc.deprecatedBuiltinCode = min(code, 127)
    oc.version = 1
    obj.operatorCodes.append(oc)
    return len(obj.operatorCodes) - 1


def finish_qat_int8(model: bytes, input_type: str, seven_bit: bool = False) -> bytes:
    """Post-process a QAT int8 flatbuffer the converter made with float32 input and output, in one read and write:
    :func:`seven_bit_weights` (when the QAT model trained 7-bit CONV_2D/FULLY_CONNECTED weights),
    :func:`_float_softmax_output`, then :func:`_quantize_input` (unless ``input_type`` is ``"float32"``)."""
    if input_type != "float32" and input_type not in INPUT_TYPES:
        raise ExportError(f"unknown TFLite input type {input_type!r}", f"use float32 or {' or '.join(INPUT_TYPES)}")
    obj = read(model)
    if seven_bit:
        seven_bit_weights(obj)
    _float_softmax_output(obj)
    if input_type != "float32":
        _quantize_input(obj, input_type)
    return write(obj)


def seven_bit_weights(obj: Any) -> int:
    """Store 7-bit QAT weights of int8 ``CONV_2D`` / ``FULLY_CONNECTED`` ops exactly (-63..63, scale max|w|/63), in place.

    The converter quantizes every kernel on its own 8-bit grid (scale max|w|/127), so weights QAT trained on the
    7-bit grid ``m*j/63`` arrive as ``q = round(127*j/63)``: up to half an int8 step away from what QAT computed.
    ``j = round(63*q/127)`` recovers them exactly (checked per tensor: ``round(127*j/63) == q`` everywhere, else
    the tensor is left alone); the weight scale becomes ``scale*127/63`` and the int32 bias is re-expressed on the
    new ``input_scale*weight_scale``. Returns the number of kernels rewritten.
    """
    schema = _schema()
    graph = obj.subgraphs[0]
    done: set[int] = set()
    count = 0
    for op in graph.operators:
        if op_name(obj, op) not in ("CONV_2D", "FULLY_CONNECTED") or op.inputs is None or len(op.inputs) < 2:
            continue
        w_index = int(op.inputs[1])
        wt = graph.tensors[w_index]
        qw = wt.quantization
        if wt.type != schema.TensorType.INT8 or qw is None or qw.scale is None or w_index in done:
            continue
        buf = obj.buffers[wt.buffer]
        if buf.data is None:
            continue
        q = np.asarray(buf.data, dtype=np.uint8).view(np.int8).astype(np.int64)
        scale = np.asarray(qw.scale, np.float64).reshape(-1)
        j = np.round(q * 63 / 127)
        if np.any(np.abs(j) > 63) or not np.array_equal(np.round(j * 127 / 63), q):
            continue  # not on the 7-bit grid: leave it
        new_scale = (scale * 127.0 / 63.0).astype(np.float32)
        buf.data = j.astype(np.int8).view(np.uint8).reshape(-1)
        qw.scale = new_scale
        if len(op.inputs) > 2 and int(op.inputs[2]) >= 0:
            bt = graph.tensors[int(op.inputs[2])]
            in_scale = float(np.asarray(graph.tensors[int(op.inputs[0])].quantization.scale).reshape(-1)[0])
            bbuf = obj.buffers[bt.buffer]
            if bt.type == schema.TensorType.INT32 and bbuf.data is not None and bt.quantization is not None:
                b = np.asarray(bbuf.data, dtype=np.uint8).view(np.int32).astype(np.float64)
                old_bs = np.broadcast_to(np.asarray(bt.quantization.scale, np.float64).reshape(-1), b.shape)
                new_bs = np.broadcast_to(np.float64(in_scale) * new_scale.astype(np.float64), b.shape).astype(
                    np.float32
                )
                bbuf.data = np.round(b * old_bs / new_bs.astype(np.float64)).astype(np.int32).view(np.uint8).reshape(-1)
                bt.quantization.scale = new_bs.copy()
        done.add(w_index)
        count += 1
    return count


def _quantize_input(obj: Any, input_type: str) -> None:
    """Turn the float32 (0..255 pixels) input of a single-subgraph model into a raw-byte ``uint8`` (scale 1, zero
    point 0) or ``int8`` (pixel - 128: scale 1, zero point -128) tensor followed by a ``DEQUANTIZE`` (XNNPACK runs
    it, unlike the uint8->int8 ``QUANTIZE`` the converter would add), in place.

    The input keeps its tensor index and name (signatures still point at it); the float tensor the graph used to
    read becomes an internal tensor. Exact: every pixel byte dequantizes to the same float it was before.
    """
    schema = _schema()
    type_name, _, zero_point = INPUT_TYPES[input_type]
    graph = obj.subgraphs[0]
    index = int(graph.inputs[0])
    tensor = graph.tensors[index]
    if tensor.type != schema.TensorType.FLOAT32:
        raise ExportError("the model input is already quantized", "convert the QAT model with a float32 input first")
    inner = schema.TensorT()
    inner.shape = np.array(tensor.shape, dtype=np.int32)
    inner.shapeSignature = None if tensor.shapeSignature is None else np.array(tensor.shapeSignature, dtype=np.int32)
    inner.type = schema.TensorType.FLOAT32
    inner.name = text(tensor.name) + "_float"
    obj.buffers.append(schema.BufferT())
    inner.buffer = len(obj.buffers) - 1
    graph.tensors.append(inner)
    inner_index = len(graph.tensors) - 1
    for op in graph.operators:
        op.inputs = np.array([inner_index if int(i) == index else int(i) for i in op.inputs], dtype=np.int32)
    tensor.type = getattr(schema.TensorType, type_name)
    qp = schema.QuantizationParametersT()
    qp.scale = np.array([1.0], dtype=np.float32)
    qp.zeroPoint = np.array([zero_point], dtype=np.int64)
    tensor.quantization = qp
    dq = schema.OperatorT()
    dq.opcodeIndex = _opcode(obj, "DEQUANTIZE")
    dq.inputs = np.array([index], dtype=np.int32)
    dq.outputs = np.array([inner_index], dtype=np.int32)
    graph.operators.insert(0, dq)


def _float_softmax_output(obj: Any) -> None:
    """Rewrite a final ``SOFTMAX (int8) -> DEQUANTIZE`` into ``DEQUANTIZE -> SOFTMAX (float32)``, in place.

    The converter quantizes a softmax even when QAT left it float (its int8 output scale is fixed at 1/256), but
    XNNPACK runs SOFTMAX in float only, so the int8 one splits the graph. Softmax on the dequantized logits is
    what the QAT model computes; it also keeps probabilities that the int8 grid would round to ties apart.
    Models without that tail are left unchanged.
    """
    graph = obj.subgraphs[0]
    ops = graph.operators
    if len(ops) < 2 or [op_name(obj, o) for o in ops[-2:]] != ["SOFTMAX", "DEQUANTIZE"]:
        return
    softmax, dq = ops[-2], ops[-1]
    if int(dq.inputs[0]) != int(softmax.outputs[0]) or int(dq.outputs[0]) not in [int(i) for i in graph.outputs]:
        return
    logits = int(softmax.inputs[0])
    if sum(logits in [int(i) for i in o.inputs] for o in ops) != 1:  # the logits feed only the softmax
        return
    hidden = int(softmax.outputs[0])
    probs_int8 = graph.tensors[hidden]  # becomes the float logits tensor
    probs_int8.type = _schema().TensorType.FLOAT32
    probs_int8.quantization = None
    probs_int8.name = text(probs_int8.name) + "_logits"
    probs_int8.shape = np.array(graph.tensors[logits].shape, dtype=np.int32)
    dq.inputs = np.array([logits], dtype=np.int32)
    dq.outputs = np.array([hidden], dtype=np.int32)
    softmax.inputs = np.array([hidden], dtype=np.int32)
    softmax.outputs = np.array([int(graph.outputs[0])], dtype=np.int32)
    ops[-2], ops[-1] = dq, softmax


def xnnpack_partitions(model: bytes) -> tuple[int, bool]:
    """How LiteRT's default XNNPACK delegate splits ``model`` (1 thread): the number of delegate nodes, and whether
    the graph runs as one partition that reads the model input and writes the model output (every op inside)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model, num_threads=1)
    it.allocate_tensors()
    delegates = [d for d in it._get_ops_details() if d["op_name"] == "DELEGATE"]
    whole = (
        len(delegates) == 1
        and it.get_input_details()[0]["index"] in list(delegates[0]["inputs"])
        and it.get_output_details()[0]["index"] in list(delegates[0]["outputs"])
    )
    return len(delegates), whole


# --- I/O names, batch and signature -----------------------------------------------------------------------------

#: The one signature every edgetl .tflite carries, and its input/output names (the same as the ONNX files').
SIGNATURE_KEY = "serving_default"
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"


def standardize_io(obj: Any, input_name: str = INPUT_NAME, output_name: str = OUTPUT_NAME) -> None:
    """Give a single-input, single-output model the same interface whatever converter made it, in place: input
    tensor ``image`` with batch 1 (shape and shape signature), output tensor ``probabilities``, and exactly one
    ``serving_default`` SignatureDef mapping those names to those tensors.

    The Keras converter names the float input ``serving_default_image:0`` with a dynamic batch (-1), the
    concrete-function converter (int8 files) names it ``image`` with batch 1 and writes no SignatureDef. The graph
    itself is unchanged: every tensor whose shape signature has a dynamic leading dimension and a static shape of
    batch 1 is marked batch 1, which is the shape LiteRT already allocates.
    """
    schema = _schema()
    if not obj.subgraphs or len(obj.subgraphs) != 1:
        raise ExportError(f"expected one subgraph, the model has {len(obj.subgraphs or [])}", "re-run the export")
    graph = obj.subgraphs[0]
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ExportError(
            f"expected one input and one output, the model has {len(graph.inputs)} and {len(graph.outputs)}",
            "export a single-image classifier",
        )
    for tensor in graph.tensors:
        sig = tensor.shapeSignature
        if sig is not None and len(sig) and int(sig[0]) == -1 and tensor.shape is not None and len(tensor.shape):
            if int(tensor.shape[0]) == 1:
                sig = np.array(sig, dtype=np.int32)
                sig[0] = 1
                tensor.shapeSignature = sig
    in_index, out_index = int(graph.inputs[0]), int(graph.outputs[0])
    graph.tensors[in_index].name = input_name
    graph.tensors[out_index].name = output_name
    shape = graph.tensors[in_index].shape
    if shape is None or len(shape) != 4 or int(shape[0]) != 1:
        raise ExportError(
            f"the model input has shape {None if shape is None else list(shape)}", "expected NHWC, batch 1"
        )

    def tensor_map(name: str, index: int):
        tm = schema.TensorMapT()
        tm.name = name
        tm.tensorIndex = index
        return tm

    sig_def = schema.SignatureDefT()
    sig_def.signatureKey = SIGNATURE_KEY
    sig_def.subgraphIndex = 0
    sig_def.inputs = [tensor_map(input_name, in_index)]
    sig_def.outputs = [tensor_map(output_name, out_index)]
    obj.signatureDefs = [sig_def]


# --- metadata entries (read lazily: no unpacking of the weights) ------------------------------------------------


def metadata_entries(data: bytes) -> dict[str, bytes]:
    """All ``Model.metadata`` entries of a TFLite file as {name: buffer bytes}, read with LiteRT's generated schema
    accessors (lazy: tensors and weights are not unpacked). Anything after the flatbuffer (a TFLite Metadata
    associated-files zip) is ignored. ValueError for a file that is not a readable TFLite flatbuffer."""
    if len(data) < 8 or bytes(data[4:8]) != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (no TFL3 identifier)")
    schema = _schema()
    out: dict[str, bytes] = {}
    try:
        model = schema.Model.GetRootAs(data, 0)
        n_buffers = model.BuffersLength()
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            name, index = entry.Name(), entry.Buffer()
            if name is None or index >= n_buffers:
                continue
            buffer = model.Buffers(index)
            if buffer.DataLength():
                out[text(name)] = buffer.DataAsNumpy().tobytes()
            else:  # models over 2 GB keep buffer data after the flatbuffer: offset/size from the file start
                offset, size = buffer.Offset(), buffer.Size()
                out[text(name)] = (
                    bytes(data[offset : offset + size]) if offset > 1 and offset + size <= len(data) else b""
                )
    except (IndexError, TypeError, struct.error) as exc:  # offsets pointing outside the file
        raise ValueError(f"corrupt flatbuffer ({type(exc).__name__})") from None
    return out
