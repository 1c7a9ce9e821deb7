"""Batches: a deterministic order per epoch, padded or packed rows, token-weighted losses."""

import contextlib
import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from macft.loss import ce_sum, fused_ce_sum, head_fn
from macft.packing import PackedCache, collate_packed, packing_supported, per_token_rope


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


def padded_width(n: int, pad_to: int) -> int:
    return max(pad_to, math.ceil(n / pad_to) * pad_to)


def collate(examples, pad_id: int, pad_to: int = 32):
    """(inputs, targets, loss_mask, n_target_tokens) for next-token prediction, right-padded.

    inputs = ids[:-1], targets = ids[1:], loss_mask = mask[1:]; the width is rounded up to a
    multiple of `pad_to` so only a few shapes occur (each new shape costs a compile on MLX).
    """
    width = padded_width(max(len(e.ids) - 1 for e in examples), pad_to)
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


def make_batch(examples, pad_id: int, pack: bool = False, pad_to: int = 32) -> Batch:
    """One micro-batch: examples padded one per row, or packed several to a row."""
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


def loss_sum(model, inputs, targets, mask):
    """Sum of per-token cross-entropy over target tokens (not the mean: steps weigh by tokens).

    The reference: full logits for every position. batch_loss gives the same, faster.
    """
    logits = model(inputs).astype(mx.float32)
    return (nn.losses.cross_entropy(logits, targets) * mask).sum()


def batch_loss(model, batch: Batch, loss_chunk: int = 0, grad: bool = True):
    """loss_sum of a Batch; with loss_chunk, the LM head runs only on target positions."""
    caches = None if batch.cache is None else [batch.cache] * len(model.layers)
    head = head_fn(model) if loss_chunk else None
    if head is None:
        logits = model(batch.inputs, cache=caches).astype(mx.float32)
        return (nn.losses.cross_entropy(logits, batch.targets) * batch.loss_mask).sum()
    h = model.model(batch.inputs, cache=caches)
    h = h.reshape(-1, h.shape[-1])[batch.index]
    targets = batch.targets.reshape(-1)[batch.index]
    return (fused_ce_sum if grad else ce_sum)(head, h, targets, loss_chunk, batch.weights)


def packing_context(model, pack: bool):
    return per_token_rope(model) if pack else contextlib.nullcontext()


def can_pack(model) -> bool:
    return packing_supported(model)


def accumulate(
    loss_and_grad, model, batches, pad_id: int, seeds=None, pack=False, loss_chunk=0, streams=None
):
    """(loss sum, gradient sums, target tokens, input tokens) over micro-batches.

    `loss_and_grad` is nn.value_and_grad(model, batch_loss). Dividing both sums by the target
    tokens afterwards weighs every token equally, so 4 micro-batches of 1 give the same update
    as 1 batch of 4, packed or not. With `streams` (CPU streams, see backend.cpu_streams) each
    micro-batch is split into that many parts, each computed on its own stream, at once.
    """
    grads, loss, n_targets, n_inputs = None, mx.array(0.0), 0, 0
    with packing_context(model, pack):
        for i, examples in enumerate(batches):
            if not examples:  # a rank's share of a small last batch can be empty
                continue
            if seeds is not None:
                mx.random.seed(seeds[i])
            k = len(streams) if streams and len(examples) >= len(streams) else 1
            for j in range(k):
                batch = make_batch(examples[j::k], pad_id, pack)
                n_inputs += batch.n_inputs
                if not batch.n_targets:
                    continue
                with mx.stream(streams[j]) if k > 1 else contextlib.nullcontext():
                    mb_loss, mb_grads = loss_and_grad(model, batch, loss_chunk)
                grads = mb_grads if grads is None else tree_map(mx.add, grads, mb_grads)
                loss = loss + mb_loss
                n_targets += batch.n_targets
            mx.eval(loss, grads)  # keep the graph one micro-batch deep
    return loss, grads, n_targets, n_inputs


def evaluate(
    model,
    valid_set,
    batch_size: int,
    pad_id: int,
    max_batches: int = 0,
    pack: bool = False,
    loss_chunk: int = 0,
    shard: tuple[int, int] = (0, 1),
    reduce=None,
):
    """Token-weighted mean loss over the validation set (or its first max_batches batches).

    Data parallel: shard=(rank, size) evaluates every size-th example of each batch and
    reduce(loss sum, tokens) adds up the ranks' sums."""
    if not valid_set:
        return None
    lengths = [len(e.ids) for e in valid_set]
    batches = batch_order(len(valid_set), batch_size, 0, 0, lengths)  # fixed, length-grouped
    if max_batches:
        batches = batches[:max_batches]
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        with packing_context(model, pack):
            for idx in batches:
                idx = idx[shard[0] :: shard[1]]
                if not idx:
                    continue
                batch = make_batch([valid_set[i] for i in idx], pad_id, pack)
                if batch.n_targets:
                    total += batch_loss(model, batch, loss_chunk, grad=False).item()
                    tokens += batch.n_targets
    finally:
        model.train(was_training)
    if reduce is not None:
        total, tokens = reduce(total, tokens)
    return total / tokens if tokens else None
