"""Batches: a deterministic order per epoch, and micro-batches of padded or packed rows."""

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from macft import device
from macft.data.encode import Pair
from macft.data.packing import PackedCache

# Row widths are multiples of this: few shapes, so few compiles (each new shape costs one).
PAD_TO = 32


def batches_per_epoch(n_examples: int, batch_size: int) -> int:
    return math.ceil(n_examples / batch_size)


def batch_order(
    n_examples: int, batch_size: int, seed: int, epoch: int, lengths=None
) -> list[list[int]]:
    """Example indices in batches for one epoch, the same for the same (seed, epoch).

    Every example appears exactly once: nothing is dropped and nothing repeated, so the last
    batch may be smaller (the trainer weights every step by its target tokens, so a small
    batch just counts less). With `lengths`, examples of similar length share a batch
    (less padding): the shuffled order is sorted by length within windows of 16 batches,
    then the batches themselves are shuffled.
    """
    if n_examples <= 0:
        return []
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n_examples)
    if lengths is not None:
        lengths = np.asarray(lengths)
        window = 16 * batch_size
        for start in range(0, n_examples, window):
            chunk = order[start : start + window]
            order[start : start + window] = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches = [order[i : i + batch_size].tolist() for i in range(0, n_examples, batch_size)]
    if lengths is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def round_up(n: int, multiple: int = PAD_TO) -> int:
    """n rounded up to a multiple (at least one multiple)."""
    return max(multiple, math.ceil(n / multiple) * multiple)


def width_bucket(n: int, pad_to: int = PAD_TO) -> int:
    """The padded width of a row of n tokens: a multiple of pad_to up to 16 x pad_to (512),
    then eight sizes per doubling (576, 640, ..., 1024, 1152, ...).

    Each width is one more graph for mx.compile (traced, kept for the run), so long rows share
    few widths: 40 up to 4096 tokens instead of 128, for at most 12.5% padding.
    """
    if n <= 16 * pad_to:
        return round_up(n, pad_to)
    return round_up(n, max(pad_to, 1 << (int(n - 1).bit_length() - 4)))


# Row width at which attention (its softmax grows with width^2) costs about as much per token
# as the rest of a layer: measured on a 2-core CPU for a 576-wide model, where MLX's exp is slow
# (sdpa is unfused there); on Metal sdpa is one fused kernel and long rows cost little.
ATTENTION_TOKENS = {"cpu": 320, "gpu": 4096}


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


def plan_rows(lengths, pad_to: int = PAD_TO, max_width: int | None = None, attention=None):
    """(width, rows) for packing examples of these lengths; deterministic.

    The width is a width_bucket (few shapes) chosen to minimise padded tokens, with a penalty
    for long rows, whose attention grows with the square of the width.
    """
    longest = width_bucket(max(lengths), pad_to)
    top = width_bucket(sum(lengths), pad_to)
    if max_width:
        top = min(top, max(longest, width_bucket(max_width, pad_to)))
    if attention is None:
        attention = ATTENTION_TOKENS["gpu" if device.mac_path() else "cpu"]
    widths = sorted({width_bucket(w, pad_to) for w in range(longest, top + 1, pad_to)})
    best = None
    for width in widths:
        rows = first_fit(lengths, width)
        cost = len(rows) * width * (1 + width / attention)
        if best is None or cost < best[0]:
            best = (cost, width, rows)
    return best[1], best[2]


def collate_packed(examples, pad_id: int, pad_to: int = PAD_TO, max_width: int | None = None):
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


def collate(examples, pad_id: int, pad_to: int = PAD_TO):
    """(inputs, targets, loss_mask, n_target_tokens) for next-token prediction, right-padded.

    inputs = ids[:-1], targets = ids[1:], loss_mask = mask[1:]; the width is a width_bucket,
    so only a few shapes occur (each new shape costs a compile on MLX).
    """
    width = width_bucket(max(len(e.ids) - 1 for e in examples), pad_to)
    inputs = np.full((len(examples), width), pad_id, dtype=np.int32)
    targets = np.full((len(examples), width), pad_id, dtype=np.int32)
    loss_mask = np.zeros((len(examples), width), dtype=np.float32)
    for row, e in enumerate(examples):
        n = len(e.ids) - 1
        if n <= 0:
            continue
        ids = np.asarray(e.ids, dtype=np.int32)
        inputs[row, :n] = ids[:-1]
        targets[row, :n] = ids[1:]
        loss_mask[row, :n] = np.asarray(e.mask[1:], dtype=np.float32)
    n_targets = int(loss_mask.sum())
    return mx.array(inputs), mx.array(targets), mx.array(loss_mask), n_targets


def input_tokens(examples) -> int:
    """Non-padding input tokens in a batch (what tokens_per_s counts)."""
    return sum(max(len(e.ids) - 1, 0) for e in examples)


def example_tokens(example) -> int:
    """The tokens one example puts through the model: a preference pair puts both answers."""
    if isinstance(example, Pair):
        return len(example.chosen.ids) + len(example.rejected.ids)
    return len(example.ids)


@dataclass
class Batch:
    inputs: mx.array  # (rows, width)
    targets: mx.array
    loss_mask: mx.array  # float 0/1
    index: mx.array  # flat positions whose loss counts
    n_targets: int
    n_inputs: int
    cache: PackedCache | None = None  # packed rows: positions and the block-diagonal mask
    weights: mx.array | None = None  # per index entry: 1, or 0 where index only pads a shape
    ref: mx.array | None = None  # preference pairs: the reference's log-probability per row


def make_pair_batch(pairs: list[Pair], pad_id: int, pad_to: int = PAD_TO) -> Batch:
    """Preference pairs as padded rows: every chosen answer, then every rejected one.

    n_targets counts pairs, not tokens: the preference losses are one number per pair, so the
    trainer's division by n_targets weighs every pair equally, however micro-batches split them.
    """
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    inputs, targets, mask, _ = collate(rows, pad_id, pad_to)
    index = np.flatnonzero(np.asarray(mask).reshape(-1) > 0).astype(np.int32)
    ref = None
    if pairs and all(p.ref is not None for p in pairs):
        ref = mx.array(np.array([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs], np.float32))
    n = len(pairs)
    return Batch(inputs, targets, mask, mx.array(index), n, input_tokens(rows), None, None, ref)


def make_batch(examples, pad_id: int, pack: bool = False, pad_to: int = PAD_TO) -> Batch:
    """One micro-batch: examples padded one per row, or packed several to a row."""
    if examples and isinstance(examples[0], Pair):
        return make_pair_batch(examples, pad_id, pad_to)
    cache = None
    if pack:
        inputs, targets, mask, positions, segments = collate_packed(examples, pad_id, pad_to)
        cache = PackedCache(mx.array(positions), mx.array(segments))
        inputs, targets = mx.array(inputs), mx.array(targets)
    else:
        inputs, targets, mask, _ = collate(examples, pad_id, pad_to)
        mask = np.asarray(mask)
    index = np.flatnonzero(np.asarray(mask).reshape(-1) > 0).astype(np.int32)
    return Batch(
        inputs, targets, mx.array(mask), mx.array(index), len(index), input_tokens(examples), cache
    )
