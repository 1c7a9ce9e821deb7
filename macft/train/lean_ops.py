"""Training ops that keep less for the backward pass: attention, RMSNorm, SwiGLU (see lean_ops)."""

import contextlib

import mlx.core as mx
import mlx.nn as nn

from macft.models.mlx_lm_compat import model_functions
from macft.models.patching import swapped_classes
from macft.train import fast_math

# A masked score: large and negative, not -inf, so a row never becomes NaN.
_MASKED = -1e30


def after(primals, cotangents) -> list:
    """The primals, computed on only once the cotangents exist: a VJP's recompute stays its own."""
    deps = cotangents if isinstance(cotangents, (list, tuple)) else [cotangents]
    return mx.depends(list(primals), list(deps))


def _group(q, k, v):
    """Queries as (batch, kv heads, group, n, d); keys and values as (batch, kv heads, 1, m, d)."""
    b, hq, n, d = q.shape
    hk = k.shape[1]
    return q.reshape(b, hk, hq // hk, n, d), k[:, :, None], v[:, :, None]


def _scores(q, k, scale, mask):
    """float32 scores (batch, kv heads, group, n, m) with the mask applied."""
    s = ((q * scale) @ k.swapaxes(-1, -2)).astype(mx.float32)
    m = mask[:, :, None] if mask.ndim == 4 else mask
    if mask.dtype == mx.bool_:
        return mx.where(m, s, _MASKED)
    return s + m.astype(mx.float32)


def _attention(scale: float):
    @mx.custom_function
    def attend(q, k, v, mask):
        qg, kg, vg = _group(q, k, v)
        s = _scores(qg, kg, scale, mask)
        top = s.max(-1, keepdims=True)
        p = fast_math.shifted_exp(s, top)
        total = p.sum(-1, keepdims=True)
        o = ((p / total).astype(v.dtype) @ vg).reshape(q.shape)
        return o, top + mx.log(total)

    @attend.vjp
    def attend_vjp(primals, cotangents, outputs):
        # Tied to the cotangents: else mx.compile merges this recompute with the forward's
        # and keeps the n x n scores alive until here, which is what this VJP avoids.
        q, k, v, mask = after(primals, cotangents)
        o, lse = outputs
        qg, kg, vg = _group(q, k, v)
        do = cotangents[0].reshape(qg.shape)
        p = fast_math.shifted_exp(_scores(qg, kg, scale, mask), lse)
        # softmax backward: ds = p * (dp - rowsum(do * o)); the row sum needs o, not p
        dp = (do @ vg.swapaxes(-1, -2)).astype(mx.float32)
        ds = p * (dp - (do * o.reshape(qg.shape)).astype(mx.float32).sum(-1, keepdims=True))
        dv = (p.astype(v.dtype).swapaxes(-1, -2) @ do).sum(axis=2)
        ds = ds.astype(q.dtype)
        dq = ((ds @ kg) * scale).reshape(q.shape)
        dk = ((ds.swapaxes(-1, -2) @ qg) * scale).sum(axis=2)
        return dq, dk, dv, mx.zeros_like(mask)

    return attend


_ATTENTION: dict[float, object] = {}


def attention(queries, keys, values, scale: float, mask=None) -> mx.array:
    """softmax(q k^T * scale + mask) v with grouped kv heads; backward recomputes softmax.

    MLX's CPU attention keeps every layer's heads x n x m probabilities for the backward
    pass; this keeps q, k, v, the output and one log-sum-exp per query.
    """
    n, m = queries.shape[2], keys.shape[2]
    if isinstance(mask, str) or mask is None:
        # "causal": the queries are the last n of m positions
        causal = mask == "causal"
        mask = (
            mx.arange(m - n, m)[:, None] >= mx.arange(m)[None]
            if causal
            else mx.ones((n, m), mx.bool_)
        )
    if scale not in _ATTENTION:
        _ATTENTION[scale] = _attention(scale)
    return _ATTENTION[scale](queries, keys, values, mask)[0]


def _rms_norm(eps: float):
    @mx.custom_function
    def norm(x, weight):
        return mx.fast.rms_norm(x, weight, eps)

    @norm.vjp
    def norm_vjp(primals, cotangent, output):
        x, weight = after(primals, cotangent)
        xf = x.astype(mx.float32)
        r = mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)
        n = xf * r
        dy = cotangent.astype(mx.float32)
        g = dy * weight.astype(mx.float32)
        dx = r * (g - n * mx.mean(g * n, axis=-1, keepdims=True))
        dw = (dy * n).reshape(-1, n.shape[-1]).sum(axis=0)
        return dx.astype(x.dtype), dw.astype(weight.dtype)

    return norm


_NORMS: dict[float, object] = {}


def rms_norm(x, weight, eps: float) -> mx.array:
    """mx.fast.rms_norm whose backward recomputes the scale: it keeps x only, not 3 copies."""
    if eps not in _NORMS:
        _NORMS[eps] = _rms_norm(eps)
    return _NORMS[eps](x, weight)


def _swiglu(tied: bool):
    @mx.custom_function
    def swiglu(gate, x):
        """silu(gate) * x whose backward recomputes the sigmoid instead of keeping it and silu."""
        return fast_math.swiglu(gate, x)

    @swiglu.vjp
    def swiglu_vjp(primals, cotangent, output):
        # Compiled without checkpointing, the recompute must be tied to the cotangent (else
        # its sigmoid is the forward's, kept alive: +10% peak on SmolLM2). Inside a
        # checkpointed layer it is better merged with the layer's own recompute.
        return fast_math.swiglu_grads(*(after(primals, cotangent) if tied else primals), cotangent)

    return swiglu


swiglu = _swiglu(tied=True)
_swiglu_in_checkpoint = _swiglu(tied=False)


class _LeanRMSNorm(nn.RMSNorm):
    def __call__(self, x):
        return rms_norm(x, self.weight, self.eps)


def _sdpa(original):
    def sdpa(queries, keys, values, cache, scale, mask, sinks=None):
        if sinks is not None or hasattr(cache, "bits"):
            return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        return attention(queries, keys, values, scale, mask)

    return sdpa


def lean_ops(mac: bool, checkpointing: bool) -> tuple[str, ...]:
    """Which lean ops a training step uses.

    On a CPU all three; with checkpointing a layer keeps nothing anyway, and recomputing
    attention or a norm twice would only cost time, so only the SwiGLU's faster form. On the
    Mac path attention alone: MLX does not use its fused attention while training on Metal (the
    fused backward is not implemented), so every layer would keep heads x n x n probabilities
    that the lean attention recomputes instead; Metal's own norm and SwiGLU kernels stay.
    """
    if mac:
        return ("attention",)
    return ("swiglu",) if checkpointing else ("attention", "norm", "swiglu")


@contextlib.contextmanager
def lean_training(model, ops=("attention", "norm", "swiglu"), checkpointing: bool = False):
    """Use the lean `ops` in this model's forward pass for the duration (see lean_ops)."""
    functions = {}
    if "swiglu" in ops:
        functions["swiglu"] = lambda _: _swiglu_in_checkpoint if checkpointing else swiglu
    if "attention" in ops:
        functions["scaled_dot_product_attention"] = _sdpa
    norms = []
    if "norm" in ops:
        norms = [m for _, m in model.named_modules() if type(m) is nn.RMSNorm]
    with model_functions(model, functions), swapped_classes(norms, lambda cls: _LeanRMSNorm):
        yield
