"""Packed rows in the model: per-token positions and a block-diagonal mask through mlx-lm's modules.

data/batches.py lays examples out in rows; this module makes the model read such rows as
several sequences, each attending only to itself, with positions restarting at 0.
"""

import contextlib
import functools

import mlx.core as mx
import mlx.nn as nn

from macft.models.patching import swapped_classes

# Architectures whose attention does `rope(q, offset=cache.offset)`, then
# `cache.update_and_fetch(k, v)`, and takes its mask from `cache.make_mask`: a stand-in cache
# gives them per-token positions and a block-diagonal mask through mlx-lm's own modules.
PACKABLE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Rope modules that only hand `offset` to mx.fast.rope (no arithmetic on it).
_SAFE_ROPES = ("RoPE", "Llama3RoPE", "YarnRoPE")


class PackedCache:
    """Stands in for a KV cache during a packed forward: per-token positions and a mask."""

    def __init__(self, positions: mx.array, segments: mx.array):
        self.offset = positions  # (rows, width); the patched rope reads it per token
        self.segments = segments

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        seg, pos = self.segments, self.offset
        same = seg[:, :, None] == seg[:, None, :]
        causal = pos[:, :, None] >= pos[:, None, :]
        mask = same & causal
        if window_size is not None:
            mask = mask & (pos[:, :, None] - pos[:, None, :] < window_size)
        return mask[:, None]

    def update_and_fetch(self, keys, values):
        return keys, values  # nothing cached: training sees the whole row at once


@functools.cache
def _positioned_class(cls):
    call = cls.__call__

    def __call__(self, x, offset=0, *args, **kwargs):
        if not (isinstance(offset, mx.array) and offset.ndim == 2):
            return call(self, x, offset, *args, **kwargs)
        # mx.fast.rope takes one offset per batch item: make every token its own item.
        b, h, n, d = x.shape
        y = x.swapaxes(1, 2).reshape(b * n, h, 1, d)
        y = call(self, y, offset.reshape(-1), *args, **kwargs)
        return y.reshape(b, n, h, d).swapaxes(1, 2)

    return type(cls.__name__, (cls,), {"__call__": __call__, "_per_token": True})


def _ropes(model):
    return [m for _, m in model.named_modules() if type(m).__name__.endswith("RoPE")]


def packing_supported(model) -> bool:
    args = getattr(model, "args", None)
    kind = getattr(args, "model_type", getattr(model, "model_type", None))
    ropes = _ropes(model)
    return (
        kind in PACKABLE_TYPES
        and bool(ropes)
        and all(type(r).__name__ in _SAFE_ROPES for r in ropes)
        and isinstance(getattr(model, "model", None), nn.Module)
    )


def per_token_rope(model):
    """Let the model's rope modules take a (rows, width) array of positions as their offset."""
    ropes = [m for m in _ropes(model) if not getattr(type(m), "_per_token", False)]
    return swapped_classes(ropes, _positioned_class)


def packing_context(model, pack: bool):
    """The rope patch for the duration when rows are packed; nothing otherwise."""
    return per_token_rope(model) if pack else contextlib.nullcontext()
