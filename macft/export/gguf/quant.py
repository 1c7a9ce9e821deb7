"""GGUF tensor types per export type (llama.cpp's Q4_K_M mixture included) and their encoding."""

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants as gguf_quants

from macft.export.gguf import kquant

T = GGMLQuantizationType
FILE_TYPES = {
    "f16": LlamaFileType.MOSTLY_F16,
    "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
    "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
}
DEFAULT = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_k_m": T.Q4_K}
# llama-quantize's substitutes when a row length is not a multiple of a type's block.
FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
# Tensors llama-quantize never quantizes (norms, MoE routers): kept F32 like the converter writes them.
KEEP_F32 = ("_norm.weight", "ffn_gate_inp.weight")
_KQUANT = {T.Q4_K: kquant.quantize_q4_k, T.Q5_K: kquant.quantize_q5_k, T.Q6_K: kquant.quantize_q6_k}


def block(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def nbytes(shape: tuple, t: T) -> int:
    """Bytes of a tensor of numpy `shape` stored as type `t` (rows run along the last axis)."""
    size, type_size = GGML_QUANT_SIZES[t]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * (shape[-1] // size) * type_size


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's pick of the layers whose attn_v / ffn_down get more bits in *_K_M files."""
    return (
        i_layer < n_layers // 8
        or i_layer >= 7 * n_layers // 8
        or (i_layer - n_layers // 8) % 3 == 2
    )


def _layer(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else -1


def _fits(shape: tuple, t: T) -> bool:
    return shape[-1] % block(t) == 0


def tensor_type(name: str, shape: tuple, qtype: str, n_layers: int, tied: bool, n_expert: int = 0):
    """The GGML type llama.cpp would give tensor `name` (GGUF name) in a file of type `qtype`."""
    if len(shape) < 2 or not name.endswith(".weight") or name.endswith(KEEP_F32):
        return T.F32
    t = DEFAULT[qtype]
    if qtype in ("f16", "bf16"):
        return t
    leaf = name.split(".")[-2] if name.startswith("blk.") else name.rsplit(".", 1)[0]
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if is_output:
        # The output matrix decides the next token: llama.cpp keeps it at 6+ bits.
        if not _fits(shape, t):
            t = T.Q8_0
        elif t != T.Q8_0:
            t = T.Q6_K
    elif leaf in ("attn_v", "attn_qkv"):
        if qtype == "q4_k_m" and use_more_bits(_layer(name), n_layers):
            t = T.Q6_K
        if n_expert == 8:
            t = T.Q8_0
    elif leaf == "attn_k" and n_expert == 8:
        t = T.Q8_0
    elif leaf.startswith("ffn_down") and qtype == "q4_k_m":
        if use_more_bits(_layer(name), n_layers):
            t = T.Q6_K
    elif leaf == "attn_output" and qtype == "q4_k_m" and n_expert == 8:
        t = T.Q5_K
    if not _fits(shape, t):
        t = FALLBACK.get(t, T.F16)
        if not _fits(shape, t):
            t = T.F16
    return t


def encode(x: np.ndarray, t: T) -> np.ndarray:
    """float32 array -> what GGUFWriter stores for type t (float arrays or uint8 blocks)."""
    if t == T.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if t == T.F16:
        return np.ascontiguousarray(x.astype(np.float16))
    if t in _KQUANT:
        return _KQUANT[t](np.ascontiguousarray(x, dtype=np.float32))
    return gguf_quants.quantize(np.ascontiguousarray(x, dtype=np.float32), t)


def take_as(t: T) -> tuple:
    """The dtype a tensor of type t is best computed in: float16 for F16 (half the memory
    of float32 while it is written), float32 for everything that encodes from it."""
    return (mx.float16,) if t == T.F16 else ()


def decode(data: np.ndarray, t: T) -> np.ndarray:
    """The float32 values a stored tensor holds (what llama.cpp computes with)."""
    if t in (T.F32, T.F16):
        return data.astype(np.float32)
    return gguf_quants.dequantize(data, t).astype(np.float32)
