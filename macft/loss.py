"""Loss only where it counts: the LM head and cross-entropy on target positions, in chunks."""

import mlx.core as mx
import mlx.nn as nn


def head_fn(model):
    """hidden states (after the final norm) -> logits, or None if this architecture is unknown.

    The one place that knows how mlx-lm models end: `model.model` is the decoder, the head is
    `lm_head` or, with tied embeddings, the embedding used as a (maybe quantized) linear;
    Gemma-2 style models cap the logits with tanh.
    """
    inner = getattr(model, "model", None)
    args = getattr(model, "args", None)
    if not isinstance(inner, nn.Module) or args is None or not hasattr(inner, "embed_tokens"):
        return None
    if "lm_head" in model:
        head = model.lm_head
    elif getattr(args, "tie_word_embeddings", True):
        head = inner.embed_tokens.as_linear
    else:
        return None
    cap = getattr(args, "final_logit_softcapping", None)
    if not cap:
        return head
    return lambda h: mx.tanh(head(h) / cap) * cap


def _ce_chunk(head, h, targets):
    """Sum of cross-entropy for one chunk of positions."""
    logits = head(h).astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)
    return (lse - picked).sum()


def ce_sum(head, h, targets, chunk: int) -> mx.array:
    """Sum of cross-entropy of head(h) (n, V) against targets (n,), `chunk` rows at a time.

    No gradient support needed (evaluation): each chunk's logits are dropped after use.
    """
    total = mx.array(0.0)
    for s in range(0, h.shape[0], chunk):
        total = total + _ce_chunk(head, h[s : s + chunk], targets[s : s + chunk])
    return total


def fused_ce_sum(head, h, targets, chunk: int) -> mx.array:
    """ce_sum whose gradient w.r.t. h is computed in the forward pass, chunk by chunk.

    d loss / d logits = softmax - onehot is known as soon as the logits are, so each chunk's
    logits (n x V floats, the largest tensor of a step) die right away instead of living until
    the backward pass; only d loss / d h (n x hidden) is kept. No extra FLOPs are spent.
    """

    @mx.custom_function
    def f(h, targets):
        total, grads = mx.array(0.0), []
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s : s + chunk], targets[s : s + chunk]
            logits = head(hc).astype(mx.float32)
            # One exp pass for both the loss and the softmax: on a CPU, exp over n x V floats
            # costs more than the head's matmul (logsumexp, then exp again, would double it).
            top = mx.max(logits, axis=-1, keepdims=True)
            e = mx.exp(logits - top)
            norm = e.sum(axis=-1, keepdims=True)
            picked = mx.take_along_axis(logits, tc[:, None], axis=-1)
            loss = (top + mx.log(norm) - picked).sum()
            p = e / norm
            picked = mx.take_along_axis(p, tc[:, None], axis=-1)
            d_logits = mx.put_along_axis(p, tc[:, None], picked - 1, axis=-1)
            grads.append(mx.vjp(head, [hc], [d_logits.astype(hc.dtype)])[1][0])
            total = total + loss
        return total, mx.concatenate(grads) if len(grads) > 1 else grads[0]

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        return (cotangents[0] * outputs[1]).astype(primals[0].dtype), mx.zeros_like(primals[1])

    return f(h, targets)[0]
