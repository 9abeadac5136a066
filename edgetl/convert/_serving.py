"""The batch-1 serving function both converters trace."""

from __future__ import annotations

from edgetl._tfenv import tf

_TF = tf()


def concrete(model, batch=1):
    shape = [batch] + list(model.inputs[0].shape[1:])

    @_TF.function(input_signature=[_TF.TensorSpec(shape, _TF.float32, name="image")])
    def serve(x):
        return model(x, training=False)

    return serve, serve.get_concrete_function()
