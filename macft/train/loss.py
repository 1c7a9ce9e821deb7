"""The training loss: token-weighted cross-entropy sums, the LM head only on target positions."""

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from macft import device
from macft.data.batches import Batch
from macft.train import fast_math


@dataclass
class Head:
    """The LM head as two plain matmuls: logits = h @ W.T and, backwards, dh = d @ W.

    Knowing both, the loss needs no vjp through the head, so no second forward pass.
    """

    fwd: Callable  # h -> h @ W.T
    bwd: Callable  # d logits -> d logits @ W
    rows: Callable  # token ids -> their rows of W (float): onehot @ W without the onehot
    cap: float | None = None  # Gemma-2 style soft-capping of the logits

    def __call__(self, h: mx.array) -> mx.array:
        z = self.fwd(h)
        return mx.tanh(z / self.cap) * self.cap if self.cap else z


def _matmuls(module):
    if "bias" in module:
        return None
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        w, scales, biases = module.weight, module.scales, module.get("biases")
        kw = {"group_size": module.group_size, "bits": module.bits, "mode": module.mode}
        if device.mac_path():

            def fwd(h):
                return mx.quantized_matmul(h, w, scales, biases, transpose=True, **kw)

            def bwd(d):
                return mx.quantized_matmul(d, w, scales, biases, transpose=False, **kw)

            def rows(ids):
                b = None if biases is None else biases[ids]
                return mx.dequantize(w[ids], scales[ids], b, **kw)

            return fwd, bwd, rows
        # On a CPU the quantized matmul is ~70x slower than a float BLAS; one float copy per
        # micro-batch serves every chunk, forwards and backwards.
        weight = mx.dequantize(w, scales, biases, **kw)
    elif isinstance(module, (nn.Linear, nn.Embedding)):
        weight = module.weight
    else:
        return None
    return (
        lambda h: h @ weight.T.astype(h.dtype),
        lambda d: d @ weight.astype(d.dtype),
        lambda ids: weight[ids],
    )


def head_fn(model) -> Head | None:
    """The model's LM head (after the final norm), or None if this architecture is unknown.

    The one place that knows how mlx-lm models end: `model.model` is the decoder, the head is
    `lm_head` or, with tied embeddings, the embedding used as a (maybe quantized) linear.
    """
    inner = getattr(model, "model", None)
    args = getattr(model, "args", None)
    if not isinstance(inner, nn.Module) or args is None or not hasattr(inner, "embed_tokens"):
        return None
    if "lm_head" in model:
        module = model.lm_head
    elif getattr(args, "tie_word_embeddings", True):
        module = inner.embed_tokens
    else:
        return None
    ops = _matmuls(module)
    if ops is None:
        return None
    return Head(*ops, cap=getattr(args, "final_logit_softcapping", None) or None)


def _ce_chunk(head, h, targets, weights=None):
    """Sum of cross-entropy for one chunk of positions."""
    logits = head(h).astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)
    return ((lse - picked) if weights is None else (lse - picked) * weights[:, None]).sum()


def _part(weights, s: int, chunk: int):
    return None if weights is None else weights[s : s + chunk]


def ce_sum(head, h, targets, chunk: int, weights=None) -> mx.array:
    """Sum of cross-entropy of head(h) (n, V) against targets (n,), `chunk` rows at a time.

    `weights` (n,), if given, scales each row's loss (0 for rows that only pad a shape).
    No gradient support needed (evaluation): each chunk's logits are dropped after use.
    """
    total = mx.array(0.0)
    for s in range(0, h.shape[0], chunk):
        part = _part(weights, s, chunk)
        total = total + _ce_chunk(head, h[s : s + chunk], targets[s : s + chunk], part)
        mx.eval(total)  # one chunk at a time, or MLX holds several chunks' logits at once
    return total


def fused_ce_sum(head, h, targets, chunk: int, weights=None) -> mx.array:
    """ce_sum whose gradient w.r.t. h is computed in the forward pass, chunk by chunk.

    d loss / d logits = softmax - onehot is known as soon as the logits are, so each chunk's
    logits (n x V floats, the largest tensor of a step) die right away instead of living until
    the backward pass; only d loss / d h (n x hidden) is kept. No extra FLOPs are spent.
    """

    @mx.custom_function
    def f(h, targets, weights):
        total, grads = mx.array(0.0), []
        for s in range(0, h.shape[0], chunk):
            hc, tc, wc = h[s : s + chunk], targets[s : s + chunk], weights[s : s + chunk, None]
            if grads:
                # One chunk at a time: MLX would otherwise run every chunk side by side and
                # hold all their logits.
                (hc,) = mx.depends([hc], [grads[-1], total])
            logits = head(hc).astype(mx.float32)
            top = mx.max(logits, axis=-1, keepdims=True)
            picked = mx.take_along_axis(logits, tc[:, None], axis=-1)
            # One exp pass for both the loss and the softmax: on a CPU, exp over n x V floats
            # costs more than the head's matmul (logsumexp, then exp again, would double it).
            # exp and the division each write over their input, so one n x V buffer serves.
            p = fast_math.shifted_exp(logits, top)
            norm = p.sum(axis=-1, keepdims=True)
            loss = ((top + mx.log(norm) - picked) * wc).sum()
            p = p * (wc / norm)
            if head.cap:  # d tanh(z / c) * c / dz = 1 - tanh^2
                at = mx.take_along_axis(p, tc[:, None], axis=-1)
                d = mx.put_along_axis(p, tc[:, None], at - wc, axis=-1)
                dh = head.bwd((d * (1 - (logits / head.cap) ** 2)).astype(hc.dtype))
            else:  # (softmax - onehot) @ W = softmax @ W - the target rows of W
                dh = head.bwd(p.astype(hc.dtype)) - (head.rows(tc) * wc).astype(hc.dtype)
            grads.append(dh)
            total = total + loss
        return total, mx.concatenate(grads) if len(grads) > 1 else grads[0]

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        h, targets, weights = primals
        dh = (cotangents[0] * outputs[1]).astype(h.dtype)
        return dh, mx.zeros_like(targets), mx.zeros_like(weights)

    if weights is None:
        weights = mx.ones(targets.shape, mx.float32)
    return f(h, targets, weights)[0]


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
