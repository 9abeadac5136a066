"""Keras model -> deployable bytes: :mod:`edgetl.convert.tflite` (fp32, QAT int8, PTQ int8; the int8 flatbuffer
fix-ups are :func:`edgetl.tflite_fb.finish_qat_int8`) and :mod:`edgetl.convert.onnx` (fp32, QAT QDQ with its QDQ
fix-ups). Used by ``edgetl export``'s variant builders (:mod:`edgetl.export`) and by finetune's int8 accuracy.
Importing either module imports TensorFlow; the runtime side (running a .tflite) is :mod:`edgetl.predict`.
"""
