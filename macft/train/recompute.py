"""Gradient checkpointing: transformer layers recomputed in the backward pass, same dropout masks."""

import contextlib
import functools

import mlx.core as mx
import mlx.nn as nn

from macft.models.patching import swapped_classes

# id(dropout module) -> the key its masks come from while its layer runs
_KEYS: dict[int, mx.array] = {}


@functools.cache
def _keyed_class(cls):
    def __call__(self, x):
        key = _KEYS.get(id(self))
        if key is None or not self.training:
            return cls.__call__(self, x)
        mask = mx.random.bernoulli(self._p_1, x.shape, key=key)
        return (mask * x) * (1 / self._p_1)

    return type(cls.__name__, (cls,), {"__call__": __call__})


def _dropouts(layer) -> list:
    return [m for _, m in layer.named_modules() if isinstance(m, nn.Dropout) and m._p_1 < 1]


@functools.cache
def _checkpointed_class(cls):
    call = cls.__call__

    def __call__(self, *args, **kwargs):
        # The backward pass runs the layer again; its dropout masks must be the forward's.
        # So they come from a key drawn once, here: a lazy array, which also works inside
        # mx.compile (drawing a seed with .item() would not).
        drops = _dropouts(self) if self.training else []
        key = mx.random.randint(0, 1 << 31, (2,)).astype(mx.uint32) if drops else None

        def inner(params, *args, **kwargs):
            self.update(params)
            if not drops:
                return call(self, *args, **kwargs)
            _KEYS.update(zip(map(id, drops), mx.random.split(key, len(drops)), strict=True))
            try:
                return call(self, *args, **kwargs)
            finally:
                for d in drops:
                    _KEYS.pop(id(d), None)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__})


@contextlib.contextmanager
def grad_checkpointing(model, enabled: bool = True):
    """Recompute each transformer layer in the backward pass instead of keeping activations.

    Python finds __call__ on the class, so each layer gets a subclass for the duration;
    the parameter names do not change (unlike wrapping the layer in another module).
    """
    layers = list(getattr(model, "layers", [])) if enabled else []
    drops = [d for layer in layers for d in _dropouts(layer)]
    with swapped_classes(layers, _checkpointed_class), swapped_classes(drops, _keyed_class):
        yield
