"""macft.kquant writes GGML's Q4_K/Q5_K/Q6_K blocks: llama.cpp's bytes, gguf-py reads them back."""

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from macft.export.gguf.kquant import quantize_q4_k, quantize_q5_k, quantize_q6_k

ENCODERS = {
    T.Q4_K: (quantize_q4_k, 144),
    T.Q5_K: (quantize_q5_k, 176),
    T.Q6_K: (quantize_q6_k, 210),
}
f32 = np.float32


def rel_rms(r, x):
    return float(np.sqrt(np.mean((r - x) ** 2) / np.mean(x**2)))


def roundtrip(x, qtype):
    return gguf.quants.dequantize(ENCODERS[qtype][0](x), qtype)


def sample(kind, rows=64, cols=1024, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal((rows, cols)).astype(f32)
    return (rng.standard_t(3, (rows, cols)) * 0.02).astype(f32)  # heavy tails, weight-like scale


def edge_blocks():
    """Blocks that take the reference code's special branches."""
    rng = np.random.default_rng(7)
    out = [np.zeros(256), np.full(256, 3.5), np.full(256, -2.0), -np.abs(rng.standard_normal(256))]
    b = np.zeros(256)
    b[17] = 5
    out.append(b)  # one outlier, rest zero
    b = rng.standard_normal(256) * 0.01
    b[200] = -40
    out.append(b)  # one negative outlier
    b = rng.standard_normal(256)
    b[:32] = 0
    b[64:96] = 7.0
    out.append(b)  # an all-zero and a constant sub-block
    out.append(rng.standard_normal(256) * 1e-30)  # scales underflow float16
    out.append(np.tile([1e4, -1e4], 128))
    out.append(rng.integers(0, 16, 256) * 0.25 - 1.0)
    return np.array(out, f32)


# --- shapes and the GGUF writer -------------------------------------------------------------


@pytest.mark.parametrize("qtype", list(ENCODERS))
def test_shapes_and_dtype(qtype):
    fn, nbytes = ENCODERS[qtype]
    x = sample("normal", 6, 512).reshape(2, 3, 512)
    q = fn(x)
    assert q.dtype == np.uint8 and q.shape == (2, 3, 2 * nbytes)
    assert fn(x[0, 0]).shape == (2 * nbytes,)
    assert np.array_equal(fn(x[0]), q[0])  # rows are independent
    assert gguf.quants.dequantize(q, qtype).shape == x.shape
    with pytest.raises(ValueError, match="divisible by 256"):
        fn(np.zeros((4, 100), f32))
    bad = x.copy()
    bad[1, 2, 300] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        fn(bad)


def test_many_blocks_match_block_by_block():
    # more superblocks than one internal chunk: chunking and threads must not change any byte
    x = sample("heavy", 40, 256 * 30)
    q = quantize_q4_k(x)
    assert np.array_equal(q, quantize_q4_k(x, threads=1))
    assert np.array_equal(q, quantize_q4_k(x, threads=3))
    assert np.array_equal(q[:3], np.stack([quantize_q4_k(r) for r in x[:3]]))
    assert np.array_equal(q.reshape(-1, 144)[-5:], quantize_q4_k(x.reshape(-1, 256)[-5:]))


def test_gguf_writer_and_reader_take_the_bytes(tmp_path):
    x = {T.Q4_K: sample("normal", 8, 512), T.Q6_K: sample("heavy", 4, 768)}
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for qtype, a in x.items():
        w.add_tensor(f"t.{qtype.name}", ENCODERS[qtype][0](a), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for qtype, a in x.items():
        t = tensors[f"t.{qtype.name}"]
        assert t.tensor_type == qtype and list(t.shape) == [a.shape[1], a.shape[0]]
        assert np.array_equal(gguf.quants.dequantize(t.data, qtype), roundtrip(a, qtype))


# --- reconstruction error against gguf-py's own Q4_0/Q5_0/Q8_0 -----------------------------


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_error_beats_legacy_quants_of_similar_size(kind):
    x = sample(kind, 128, 1024)
    legacy = {
        t: rel_rms(gguf.quants.dequantize(gguf.quants.quantize(x, t), t), x)
        for t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0)
    }
    k = {t: rel_rms(roundtrip(x, t), x) for t in ENCODERS}
    # measured (normal / heavy): Q4_0 .086/.129, Q4_1 .078/.100, Q5_0 .043/.067, Q8_0 .0054/.0085,
    # Q4_K .072/.093, Q5_K .036/.047, Q6_K .018/.026
    assert k[T.Q4_K] < 0.95 * legacy[T.Q4_1] < legacy[T.Q4_0]
    assert k[T.Q5_K] < 0.9 * legacy[T.Q5_0]
    assert k[T.Q6_K] < 0.5 * legacy[T.Q5_0]
    assert k[T.Q6_K] < 4 * legacy[T.Q8_0]
    assert k[T.Q4_K] > k[T.Q5_K] > k[T.Q6_K] > legacy[T.Q8_0]


# --- exact cases ------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", list(ENCODERS))
def test_zero_blocks_are_zero_bytes_and_zeros(qtype):
    x = np.zeros((2, 512), f32)
    x[1, 256:] = sample("normal", 1, 256)[0]
    q = ENCODERS[qtype][0](x)
    assert not q[0].any()  # all-zero superblocks: every byte 0
    r = gguf.quants.dequantize(q, qtype)
    assert not r[0].any() and not r[1, :256].any()


@pytest.mark.parametrize("qtype", list(ENCODERS))
@pytest.mark.parametrize("value", [3.5, -2.0, 0.3])
def test_constant_blocks_round_trip_to_float16_precision(qtype, value):
    # (far smaller constants put d among float16's subnormals, where llama.cpp loses precision too)
    x = np.full((1, 256), value, f32)
    r = roundtrip(x, qtype)
    assert np.abs(r - x).max() <= 2**-10 * abs(value)


@pytest.mark.parametrize("qtype", list(ENCODERS))
@pytest.mark.parametrize("outlier", [5.0, -40.0])
def test_one_outlier_keeps_zeros_exact(qtype, outlier):
    x = np.zeros((1, 256), f32)
    x[0, 77] = outlier
    r = roundtrip(x, qtype)[0]
    assert abs(r[77] - outlier) <= 2**-10 * abs(outlier)
    assert not np.concatenate([r[:64], r[96:]]).any()  # other sub-blocks: exactly zero
    near = np.delete(r[64:96], 77 - 64)
    if qtype == T.Q6_K or outlier > 0:
        assert not near.any()
    else:  # Q4_K/Q5_K reach 0 from the negative min: float16 rounding of d and dmin shows
        assert np.abs(near).max() <= 2**-10 * abs(outlier)


@pytest.mark.parametrize("qtype", list(ENCODERS))
def test_negative_only_blocks_are_as_good_as_positive(qtype):
    x = np.abs(sample("normal", 32, 512)) + 0.1
    pos, neg = rel_rms(roundtrip(x, qtype), x), rel_rms(roundtrip(-x, qtype), -x)
    assert neg < 1.5 * pos and pos < 0.05
    assert (roundtrip(-x, qtype) <= 0).all()


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K])
def test_values_on_the_asymmetric_grid_round_trip_exactly(qtype):
    # d = 2^-6 and dmin = 2^-7 are exact in float16: x = d*63*k - dmin*63 must come back bit for bit
    nmax = 15 if qtype == T.Q4_K else 31
    k = np.random.default_rng(3).integers(0, nmax + 1, (4, 8, 32))
    k[:, :, 0], k[:, :, 1] = 0, nmax  # every sub-block spans the whole grid
    x = (k * (63 * 2.0**-6) - 63 * 2.0**-7).astype(f32).reshape(4, 256)
    assert np.array_equal(roundtrip(x, qtype), x)
    # an arbitrary step lands within float16 rounding of d
    y = (k * 0.0123 - 0.05).astype(f32).reshape(4, 256)
    assert np.abs(roundtrip(y, qtype) - y).max() <= 2**-10 * np.abs(y).max()


def test_values_on_the_symmetric_grid_round_trip_exactly():
    k = np.random.default_rng(4).integers(-32, 32, (4, 16, 16))
    k[:, :, 5] = -32  # the largest magnitude is negative in every sub-block, as the encoder expects
    x = (k * 2.0**-5).astype(f32).reshape(4, 256)
    assert np.array_equal(roundtrip(x, T.Q6_K), x)
    y = (k * 0.0123).astype(f32).reshape(4, 256)
    assert np.abs(roundtrip(y, T.Q6_K) - y).max() <= 2**-10 * np.abs(y).max()


# --- bit-exact agreement with llama.cpp ------------------------------------------------------


def _llama_cpp_encoder(qtype):
    xllamacpp = pytest.importorskip("xllamacpp")
    lib = ctypes.CDLL(str(next(Path(xllamacpp.__file__).parent.glob("xllamacpp*.so"))))
    fn = getattr(lib, f"quantize_row_{qtype.name.lower()[:2]}_K_ref", None)
    if fn is None:
        pytest.skip("this xllamacpp build does not export llama.cpp's reference K-quant encoders")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]

    def encode(x):
        x = np.ascontiguousarray(x, f32).reshape(-1)
        out = np.zeros(x.size // 256 * ENCODERS[qtype][1], np.uint8)
        fn(x.ctypes.data, out.ctypes.data, x.size)
        return out

    return encode


@pytest.mark.parametrize("qtype", list(ENCODERS))
def test_bytes_equal_llama_cpp(qtype):
    encode = _llama_cpp_encoder(qtype)
    rng = np.random.default_rng(11)
    for x in [
        sample("normal", 512, 1024),
        sample("heavy", 512, 1024, seed=1),
        np.abs(sample("normal", 64, 1024, seed=2)) + 1,
        (rng.standard_normal((64, 1024)) * (rng.random((64, 1024)) < 0.05)).astype(f32),
        (rng.standard_normal((64, 1024)) * 1e-6).astype(f32),
        edge_blocks(),
    ]:
        ours, theirs = ENCODERS[qtype][0](x).reshape(-1), encode(x)
        bad = np.flatnonzero((ours != theirs).reshape(-1, ENCODERS[qtype][1]).any(axis=1))
        assert bad.size == 0, f"{bad.size} blocks differ, first {bad[:5]}"


# A plain transcription of llama.cpp's reference encoders, one float32 scalar at a time, so a
# vectorisation bug cannot hide when xllamacpp is not installed.


def nearest_int(v):
    bits = (np.array(v, f32) + f32(12582912.0)).view(np.int32)
    return (int(bits) & 0x7FFFFF) - 0x400000


def clamp(v, lo, hi):
    return max(lo, min(hi, v))


def slow_qkx2(x, w, nmax, rmin, rdelta, nstep):
    lo, hi, sum_w, sum_x = x[0], x[0], w[0], w[0] * x[0]
    for i in range(1, len(x)):
        lo, hi = min(lo, x[i]), max(hi, x[i])
        sum_w += w[i]
        sum_x += w[i] * x[i]
    lo = min(lo, f32(0))
    if hi == lo:
        return f32(0), -lo, [0] * len(x)
    iscale = f32(nmax) / (hi - lo)
    scale = f32(1) / iscale
    L = [clamp(nearest_int(iscale * (v - lo)), 0, nmax) for v in x]
    best = f32(0)
    for i, v in enumerate(x):
        diff = scale * f32(L[i]) + lo - v
        best += w[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (hi - lo)
        aux = [clamp(nearest_int(iscale * (v - lo)), 0, nmax) for v in x]
        s_l = s_l2 = s_xl = f32(0)
        for i, v in enumerate(x):
            s_l += w[i] * f32(aux[i])
            s_l2 += w[i] * f32(aux[i]) * f32(aux[i])
            s_xl += w[i] * f32(aux[i]) * v
        det = sum_w * s_l2 - s_l * s_l
        if det > 0:
            this_scale = (sum_w * s_xl - sum_x * s_l) / det
            this_min = (s_l2 * sum_x - s_l * s_xl) / det
            if this_min > 0:
                this_min, this_scale = f32(0), s_xl / s_l2
            err = f32(0)
            for i, v in enumerate(x):
                diff = this_scale * f32(aux[i]) + this_min - v
                err += w[i] * (diff * diff)
            if err < best:
                L, best, scale, lo = aux, err, this_scale, this_min
    return scale, -lo, L


def slow_qk_asym(x, nmax, rmin, rdelta, nstep):
    """quantize_row_q4_K_ref / q5_K_ref for one superblock -> d, dmin, 12 scale bytes, L."""
    scales, mins, L = [], [], []
    for j in range(8):
        xs = list(x[32 * j : 32 * j + 32])
        sum_x2 = f32(0)
        for v in xs:
            sum_x2 += v * v
        av_x = np.sqrt(sum_x2 / f32(32))
        s, m, lj = slow_qkx2(xs, [av_x + abs(v) for v in xs], nmax, rmin, rdelta, nstep)
        scales.append(s)
        mins.append(m)
        L += lj
    max_scale, max_min = max([f32(0)] + scales), max([f32(0)] + mins)
    inv_s = f32(63) / max_scale if max_scale > 0 else f32(0)
    inv_m = f32(63) / max_min if max_min > 0 else f32(0)
    sc = [0] * 12
    for j in range(8):
        ls = min(63, nearest_int(inv_s * scales[j]) & 0xFF)
        lm = min(63, nearest_int(inv_m * mins[j]) & 0xFF)
        if j < 4:
            sc[j], sc[j + 4] = ls, lm
        else:
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            sc[j - 4] |= (ls >> 4) << 6
            sc[j] |= (lm >> 4) << 6
    d, dmin = np.float16(max_scale / f32(63)), np.float16(max_min / f32(63))
    for j in range(8):
        if j < 4:
            s, m = sc[j] & 63, sc[j + 4] & 63
        else:
            s, m = (
                (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4),
                (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
            )
        dd, dm = f32(d) * f32(s), f32(dmin) * f32(m)
        if dd == 0:
            continue
        for i in range(32 * j, 32 * j + 32):
            L[i] = clamp(nearest_int((x[i] + dm) / dd), 0, nmax)
    return d.tobytes() + dmin.tobytes() + bytes(sc), L


def slow_q4_k(x):
    head, L = slow_qk_asym(x, 15, -1.0, 0.1, 20)
    qs = [L[64 * c + i] | (L[64 * c + i + 32] << 4) for c in range(4) for i in range(32)]
    return head + bytes(qs)


def slow_q5_k(x):
    head, L = slow_qk_asym(x, 31, -0.5, 0.1, 15)
    qh, ql = [0] * 32, []
    for c in range(4):
        for i in range(32):
            lo, hi = L[64 * c + i], L[64 * c + i + 32]
            qh[i] |= (lo > 15) << (2 * c) | (hi > 15) << (2 * c + 1)
            ql.append((lo & 0xF) | ((hi & 0xF) << 4))
    return head + bytes(qh) + bytes(ql)


def slow_qx(x, nmax):
    """make_qx_quants with rmse_type 1 and no importance weights."""
    amax, vmax = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, vmax = abs(v), v
    if amax < f32(1e-15):
        return f32(0), [0] * len(x)

    def fit(iscale):
        ls = [clamp(nearest_int(iscale * v), -nmax, nmax - 1) for v in x]
        slx = sl2 = f32(0)
        for v, li in zip(x, ls, strict=True):
            w = v * v
            slx += w * v * f32(li)
            sl2 += w * f32(li) * f32(li)
        return slx, sl2, [li + nmax for li in ls]

    slx, sl2, L = fit(-f32(nmax) / vmax)
    scale = slx / sl2 if sl2 != 0 else f32(0)
    best = scale * slx
    for step in [s for s in range(-9, 10) if s]:
        slx, sl2, cand = fit(-(f32(nmax) + f32(0.1) * f32(step)) / vmax)
        if sl2 > 0 and slx * slx > best * sl2:
            L, scale = cand, slx / sl2
            best = scale * slx
    return scale, L


def slow_q6_k(x):
    scales, L = [], []
    for j in range(16):
        s, lj = slow_qx(list(x[16 * j : 16 * j + 16]), 32)
        scales.append(s)
        L += lj
    amax, max_scale = f32(0), f32(0)
    for s in scales:
        if abs(s) > amax:
            amax, max_scale = abs(s), s
    if amax < f32(1e-15):
        return bytes(210)
    iscale = f32(-128) / max_scale
    d = np.float16(f32(1) / iscale)
    sc = [min(127, nearest_int(iscale * s)) for s in scales]
    for j in range(16):
        dd = f32(d) * f32(sc[j])
        if dd == 0:
            continue
        for i in range(16 * j, 16 * j + 16):
            L[i] = clamp(nearest_int(x[i] / dd), -32, 31) + 32
    ql, qh = [0] * 128, [0] * 64
    for h in range(2):
        for i in range(32):
            q = [L[128 * h + i + 32 * k] for k in range(4)]
            ql[64 * h + i] = (q[0] & 0xF) | ((q[2] & 0xF) << 4)
            ql[64 * h + i + 32] = (q[1] & 0xF) | ((q[3] & 0xF) << 4)
            qh[32 * h + i] = (
                (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6)
            )
    return bytes(ql) + bytes(qh) + np.array(sc, np.int8).tobytes() + d.tobytes()


SLOW = {T.Q4_K: slow_q4_k, T.Q5_K: slow_q5_k, T.Q6_K: slow_q6_k}


@pytest.mark.parametrize("qtype", list(ENCODERS))
def test_bytes_equal_a_plain_transcription_of_the_reference(qtype):
    x = np.concatenate(
        [
            sample("normal", 2, 512).reshape(-1, 256),
            sample("heavy", 1, 512).reshape(-1, 256),
            edge_blocks(),
        ]
    )
    ours = ENCODERS[qtype][0](x)
    with np.errstate(all="ignore"):
        for i, block in enumerate(x):
            assert ours[i].tobytes() == SLOW[qtype](block), f"block {i} differs"
