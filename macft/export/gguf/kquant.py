"""GGML K-quant encoders (Q4_K, Q5_K, Q6_K) in numpy, following llama.cpp's reference quantizers."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

QK_K = 256
_F = np.float32
_GROUP_MAX_EPS = _F(1e-15)
_MAGIC = _F(12582912.0)  # 1.5 * 2^23: llama.cpp's nearest_int adds it to round to an integer
# Superblocks per chunk: keeps the (32, n) work arrays of one chunk in the L2 cache.
_CHUNK = 512
# numpy releases the GIL inside each operation, so chunks encode in parallel threads.
_THREADS = min(8, os.cpu_count() or 1)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    # llama.cpp's magic-number rounding (ties to even); reproduced bit for bit, even out of range.
    t = (v + _MAGIC).view(np.int32)
    return (t & 0x7FFFFF) - 0x400000


def _seqsum(a: np.ndarray) -> np.ndarray:
    # Reducing over the leading axis adds row after row, the C loop's order, so sums match exactly.
    return np.add.reduce(a, axis=0)


def _fit_min_scale(x, w, nmax, rmin, rdelta, nstep):
    """make_qkx2_quants on columns: x, w (n, S) -> scale (S,), the_min (S,), L (n, S) int32."""
    xmin, mx = x.min(axis=0), x.max(axis=0)
    mn = np.minimum(xmin, _F(0))
    flat = mx == mn
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    lf, t = np.empty_like(x), np.empty_like(x)

    def levels(iscale, ref):
        # clamp(nearest_int(iscale * (x - ref)), 0, nmax) as floats, written into lf
        v = np.multiply(np.subtract(x, ref, out=lf), iscale, out=lf)
        bound = np.abs(iscale) * np.maximum(mx - ref, ref - xmin)
        if np.all(bound < _F(4e6)):  # within nearest_int's range adding 1.5*2^23 rounds exactly
            np.subtract(np.add(v, _MAGIC, out=v), _MAGIC, out=v)
            return np.clip(v, 0, nmax, out=v)
        v[...] = np.clip(_nearest_int(v), 0, nmax)
        return v

    def error(scale, min_):
        diff = np.subtract(np.add(np.multiply(lf, scale, out=t), min_, out=t), x, out=t)
        return _seqsum(np.multiply(np.multiply(diff, diff, out=t), w, out=t))

    iscale = _F(nmax) / np.where(flat, _F(1), mx - mn)  # flat columns get all-zero quants below
    scale = _F(1) / iscale
    iscale[flat] = 0
    levels(iscale, mn)
    best_err = error(scale, mn)
    best_iscale, best_ref = iscale, mn.copy()  # the (iscale, min) that produced the kept L
    for step in range(nstep + 1):
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = (_F(rmin) + _F(rdelta) * _F(step) + _F(nmax)) / (mx - mn)
        iscale[flat] = 0
        levels(iscale, mn)
        wl = np.multiply(w, lf, out=t)
        sum_l, sum_xl = _seqsum(wl), _seqsum(wl * x)
        sum_l2 = _seqsum(np.multiply(wl, lf, out=t))
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        pos = this_min > 0
        this_min[pos] = 0
        this_scale[pos] = sum_xl[pos] / sum_l2[pos]
        err = error(this_scale, this_min)
        better = (det > 0) & (err < best_err) & ~flat
        best_err = np.where(better, err, best_err)
        scale = np.where(better, this_scale, scale)
        best_iscale = np.where(better, iscale, best_iscale)
        best_ref = np.where(better, mn, best_ref)
        mn = np.where(better, this_min, mn)
    L = levels(best_iscale, best_ref).astype(np.int32)
    L[:, flat] = 0
    scale[flat] = 0
    return scale, -mn, L


def _symmetric_scale(x, nmax):
    """make_qx_quants(rmse_type=1, no weights) on columns: x (n, S) -> scale (S,), L (n, S) in [0, 2*nmax)."""
    cols = np.arange(x.shape[1])
    vmax = x[np.abs(x).argmax(axis=0), cols]  # first element of largest magnitude, sign kept
    zero = np.abs(vmax) < _GROUP_MAX_EPS
    vmax[zero] = 1
    x2 = x * x
    wx = x2 * x
    lf, t = np.empty_like(x), np.empty_like(x)

    def sums(iscale):
        # |iscale * x| <= nmax + 1 here, so adding 1.5*2^23 rounds exactly like nearest_int
        v = np.multiply(x, iscale, out=lf)
        np.subtract(np.add(v, _MAGIC, out=v), _MAGIC, out=v)
        np.clip(v, -nmax, nmax - 1, out=v)
        return _seqsum(np.multiply(wx, v, out=t)), _seqsum(
            np.multiply(np.multiply(x2, v, out=t), v, out=t)
        )

    iscale = -_F(nmax) / vmax
    sumlx, suml2 = sums(iscale)
    nz = suml2 != 0
    scale = np.zeros_like(sumlx)
    scale[nz] = sumlx[nz] / suml2[nz]
    best = scale * sumlx
    best_iscale = iscale
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(_F(nmax) + _F(0.1) * _F(step)) / vmax
        sumlx, suml2 = sums(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = np.where(better, sumlx / np.where(better, suml2, 1), scale)
        best = np.where(better, scale * sumlx, best)
        best_iscale = np.where(better, iscale, best_iscale)
    L = np.clip(_nearest_int(best_iscale * x), -nmax, nmax - 1) + nmax
    L[:, zero] = 0
    scale[zero] = 0
    return scale, L


def _pack_scales_mins(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per superblock (B, 8) -> GGML's 12-byte layout (B, 12)."""
    out = np.empty((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _quantize_k_asym(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Shared Q4_K/Q5_K core: (B, 256) -> d, dmin (B,) f16, packed scales (B, 12), L (B, 256)."""
    nb = blocks.shape[0]
    # (32, S): one column per 32-value sub-block
    x = np.ascontiguousarray(blocks.reshape(nb * 8, 32).T)
    sum_x2 = _seqsum(x * x)
    av_x = np.sqrt(sum_x2 / _F(32))
    w = av_x + np.abs(x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scales, mins, L = _fit_min_scale(x, w, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), _F(0))
    max_min = np.maximum(mins.max(axis=1), _F(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, _F(63) / max_scale, _F(0))
        inv_min = np.where(max_min > 0, _F(63) / max_min, _F(0))
    # C stores nearest_int into a uint8 before clamping to 63.
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d = (max_scale / _F(63)).astype(np.float16)
    dmin = (max_min / _F(63)).astype(np.float16)
    sub_d = (d.astype(_F)[:, None] * ls.astype(_F)).reshape(-1)
    sub_m = (dmin.astype(_F)[:, None] * lm.astype(_F)).reshape(-1)
    keep = sub_d == 0  # C skips re-quantizing these and keeps the search's L
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int((x + sub_m) / sub_d), 0, nmax)
    L = np.where(keep, L, requant)
    L = L.T.reshape(nb, QK_K).astype(np.uint8)
    return d, dmin, _pack_scales_mins(ls, lm), L


def _q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d, dmin, sc, L = _quantize_k_asym(blocks, 15, -1.0, 0.1, 20)
    out = np.empty((nb, 144), np.uint8)
    out[:, 0:2] = d.view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = dmin.view(np.uint8).reshape(nb, 2)
    out[:, 4:16] = sc
    L = L.reshape(nb, 4, 2, 32)  # 64-value chunks: first 32 in low nibbles, next 32 in high
    out[:, 16:] = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(nb, 128)
    return out


def _q5_k_blocks(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d, dmin, sc, L = _quantize_k_asym(blocks, 31, -0.5, 0.1, 15)
    out = np.empty((nb, 176), np.uint8)
    out[:, 0:2] = d.view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = dmin.view(np.uint8).reshape(nb, 2)
    out[:, 4:16] = sc
    L = L.reshape(nb, 8, 32)  # sub-block k's fifth bits go to bit k of qh
    qh = np.zeros((nb, 32), np.uint8)
    for k in range(8):
        qh |= (L[:, k] >> 4) << k
    out[:, 16:48] = qh
    low = (L & 0xF).reshape(nb, 4, 2, 32)
    out[:, 48:] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
    return out


def _q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    # (16, S): one column per 16-value sub-block
    x = np.ascontiguousarray(blocks.reshape(nb * 16, 16).T)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scales, L = _symmetric_scale(x, 32)
    scales = scales.reshape(nb, 16)
    pick = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), pick]
    zero = np.abs(max_scale) < _GROUP_MAX_EPS
    max_scale[zero] = 1
    iscale = _F(-128) / max_scale
    d = (_F(1) / iscale).astype(np.float16)
    sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
    sub_d = (d.astype(_F)[:, None] * sc.astype(_F)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int(x / sub_d), -32, 31) + 32
    L = np.where(sub_d == 0, L, requant).T.reshape(nb, 2, 4, 32).astype(np.uint8)
    out = np.empty((nb, 210), np.uint8)
    lo = L & 0xF
    out[:, 0:128] = (lo[:, :, 0:2] | (lo[:, :, 2:4] << 4)).reshape(nb, 128)
    hi = L >> 4
    out[:, 128:192] = (
        hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    ).reshape(nb, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d.view(np.uint8).reshape(nb, 2)
    out[zero] = 0
    return out


def _quantize(x: np.ndarray, encode, block_bytes: int, threads: int | None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[-1] % QK_K:
        raise ValueError(f"K-quants need a last dimension divisible by {QK_K}; got shape {x.shape}")
    blocks = np.ascontiguousarray(x, dtype=_F).reshape(-1, QK_K)
    if not np.isfinite(blocks).all():
        raise ValueError("cannot quantize a tensor holding NaN or infinite values")
    out = np.empty((blocks.shape[0], block_bytes), np.uint8)

    def work(start):
        out[start : start + _CHUNK] = encode(blocks[start : start + _CHUNK])

    starts = range(0, blocks.shape[0], _CHUNK)
    if threads is None:
        threads = _THREADS
    if threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(min(threads, len(starts))) as pool:
            list(pool.map(work, starts))
    else:
        for start in starts:
            work(start)
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK_K * block_bytes)


def quantize_q4_k(x: np.ndarray, threads: int | None = None) -> np.ndarray:
    """float32 (..., n*256) -> GGML block_q4_K bytes, uint8 (..., n*144).

    Bytes equal llama.cpp's quantize_row_q4_K_ref (what llama-quantize writes without an imatrix).
    threads: worker threads (default: up to 8 CPU cores); the bytes do not depend on it.
    """
    return _quantize(x, _q4_k_blocks, 144, threads)


def quantize_q5_k(x: np.ndarray, threads: int | None = None) -> np.ndarray:
    """float32 (..., n*256) -> GGML block_q5_K bytes, uint8 (..., n*176)."""
    return _quantize(x, _q5_k_blocks, 176, threads)


def quantize_q6_k(x: np.ndarray, threads: int | None = None) -> np.ndarray:
    """float32 (..., n*256) -> GGML block_q6_K bytes, uint8 (..., n*210)."""
    return _quantize(x, _q6_k_blocks, 210, threads)
