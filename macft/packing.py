"""Sequence packing: several examples per row, each attending only to itself, positions from 0."""

import functools
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from macft.patching import swapped_classes

# Architectures whose attention does `rope(q, offset=cache.offset)`, then
# `cache.update_and_fetch(k, v)`, and takes its mask from `cache.make_mask`: a stand-in cache
# gives them per-token positions and a block-diagonal mask through mlx-lm's own modules.
PACKABLE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Rope modules that only hand `offset` to mx.fast.rope (no arithmetic on it).
_SAFE_ROPES = ("RoPE", "Llama3RoPE", "YarnRoPE")
# Row width at which attention (its softmax grows with width^2) costs about as much per token
# as the rest of a layer: measured on a 2-core CPU for a 576-wide model, where MLX's exp is slow
# (sdpa is unfused there); on Metal sdpa is one fused kernel and long rows cost little.
ATTENTION_TOKENS = {"cpu": 320, "gpu": 4096}


def row_widths(width: int, pad_to: int) -> int:
    return max(pad_to, math.ceil(width / pad_to) * pad_to)


def first_fit(lengths, width: int) -> list[list[int]]:
    """Indices grouped into rows of at most `width` tokens: longest first, first row that fits."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows, room = [], []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def plan_rows(lengths, pad_to: int = 32, max_width: int | None = None, attention=None):
    """(width, rows) for packing examples of these lengths; deterministic.

    The width is a multiple of pad_to (few shapes) chosen to minimise padded tokens, with
    a penalty for long rows, whose attention grows with the square of the width.
    """
    longest = row_widths(max(lengths), pad_to)
    top = row_widths(sum(lengths), pad_to)
    if max_width:
        top = min(top, max(longest, row_widths(max_width, pad_to)))
    if attention is None:
        attention = ATTENTION_TOKENS[mx.default_device().type.name]
    best = None
    for width in range(longest, top + 1, pad_to):
        rows = first_fit(lengths, width)
        cost = len(rows) * width * (1 + width / attention)
        if best is None or cost < best[0]:
            best = (cost, width, rows)
    return best[1], best[2]


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


def collate_packed(examples, pad_id: int, pad_to: int = 32, max_width: int | None = None):
    """(inputs, targets, loss_mask, positions, segments) numpy arrays, examples packed in rows.

    Padding at the end of a row is a segment of its own, so no query sees only masked keys.
    """
    lengths = [max(len(e.ids) - 1, 0) for e in examples]
    width, rows = plan_rows([max(n, 1) for n in lengths], pad_to, max_width)
    shape = (len(rows), width)
    inputs = np.full(shape, pad_id, dtype=np.int32)
    targets = np.full(shape, pad_id, dtype=np.int32)
    loss_mask = np.zeros(shape, dtype=np.float32)
    positions = np.zeros(shape, dtype=np.int32)
    segments = np.zeros(shape, dtype=np.int32)
    for r, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row):
            e, n = examples[i], lengths[i]
            ids = np.asarray(e.ids, dtype=np.int32)
            inputs[r, at : at + n] = ids[:-1]
            targets[r, at : at + n] = ids[1:]
            loss_mask[r, at : at + n] = np.asarray(e.mask[1:], dtype=np.float32)
            positions[r, at : at + n] = np.arange(n)
            segments[r, at : at + n] = seg
            at += n
        positions[r, at:] = np.arange(width - at)
        segments[r, at:] = len(row)
    return inputs, targets, loss_mask, positions, segments
