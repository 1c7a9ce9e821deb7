"""Gradient checkpointing: transformer layers recomputed in the backward pass, same dropout masks."""

import functools

import mlx.core as mx

from macft.patching import swapped_classes


@functools.cache
def _checkpointed_class(cls):
    call = cls.__call__

    def __call__(self, *args, **kwargs):
        # The backward pass runs the layer again; dropout there must draw the same masks as in
        # the forward pass, so the layer reseeds the RNG with a number drawn once, here.
        seed = int(mx.random.randint(0, 1 << 31, ()).item())

        def inner(params, *args, **kwargs):
            mx.random.seed(seed)
            self.update(params)
            return call(self, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__})


def grad_checkpointing(model, enabled: bool = True):
    """Recompute each transformer layer in the backward pass instead of keeping activations.

    Python finds __call__ on the class, so each layer gets a subclass for the duration;
    the parameter names do not change (unlike wrapping the layer in another module).
    """
    layers = list(getattr(model, "layers", [])) if enabled else []
    return swapped_classes(layers, _checkpointed_class)
