"""Write a fused float mlx-lm model as a GGUF file llama.cpp and Ollama load (f16 ... q4_k_m)."""

import errno
import functools
import os
import time
from pathlib import Path

import gguf
import mlx.nn as nn
import numpy as np

from macft.atomic import check_space, write_via_temp
from macft.errors import ExportError
from macft.export.gguf import QTYPES
from macft.export.gguf import quant as gq
from macft.export.gguf import vocab as gguf_vocab
from macft.export.gguf.layout import (
    llama3_rope_factors,
    longrope_factors,
    metadata,
    model_tensors,
    resolve,
)

HEADER_SLACK = 1 << 20  # bytes of metadata besides the vocabulary


def _n_vocab(model: nn.Module) -> int:
    for path, m in model.named_modules():
        if path.endswith("embed_tokens"):
            w = m.weight
            return int(w.shape[0])
    raise ExportError("the model has no embed_tokens; it is not a decoder LLM macft can export")


def _n_expert(hp: dict) -> int:
    return int(hp.get("num_local_experts") or hp.get("num_experts") or 0)


def plan(model, config: dict, qtype: str, source: dict | None = None, consume=False) -> dict:
    """What the export writes: layout, hyperparameters and [(name, getter, shape, type)], no data."""
    if qtype not in QTYPES:
        raise ExportError(f"GGUF type {qtype!r} is not one of {', '.join(QTYPES)}")
    model, layout, hp = resolve(model, config)
    tensors = list(model_tensors(model, hp, layout, consume))
    names = {t[0] for t in tensors}
    tied = "output.weight" not in names
    if layout.gguf_arch == "phi3" and tied:  # llama.cpp's phi3 requires its own output matrix
        # written twice: computed once (a consumed model has no second copy to compute from)
        get = functools.cache(next(g for n, g, _ in tensors if n == "token_embd.weight"))
        shape = next(s for n, _, s in tensors if n == "token_embd.weight")
        tensors = [(n, get if n == "token_embd.weight" else g, s) for n, g, s in tensors]
        tensors.append(("output.weight", get, shape))
        tied = False
    factors = None
    if (source or {}).get("rope_freqs"):  # the source GGUF's exact factors win
        factors = np.array(source["rope_freqs"], dtype=np.float32)
    elif layout.gguf_arch == "llama":
        factors = llama3_rope_factors(hp)
    if factors is not None:
        tensors.append(("rope_freqs.weight", lambda *_, f=factors: f, factors.shape))
    for name, f in longrope_factors(hp).items():
        tensors.append((name, lambda *_, f=f: f, f.shape))
    n_layers, n_expert = hp["num_hidden_layers"], _n_expert(hp)
    typed = [
        (n, g, s, gq.tensor_type(n, s, qtype, n_layers, tied, n_expert)) for n, g, s in tensors
    ]
    return {"layout": layout, "hp": hp, "tensors": typed, "n_vocab": _n_vocab(model)}


def _general(writer: gguf.GGUFWriter, qtype: str, source: dict) -> None:
    writer.add_type("model")
    origin = source.get("path")
    writer.add_name(f"{Path(origin).stem} (macft fine-tune)" if origin else "macft fine-tune")
    writer.add_file_type(int(gq.FILE_TYPES[qtype]))
    if qtype not in ("f16", "bf16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_meta(writer: gguf.GGUFWriter, arch: str, meta: dict) -> None:
    for key, value in meta.items():
        full = f"{arch}.{key}"
        if isinstance(value, bool):
            writer.add_bool(full, value)
        elif isinstance(value, int):
            writer.add_uint32(full, value)
        elif isinstance(value, float):
            writer.add_float32(full, value)
        else:
            writer.add_string(full, str(value))


def _write(tmp: Path, arch: str, add_keys, tensors: list, progress) -> None:
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        add_keys(writer)
        for name, _, shape, t in tensors:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), gq.nbytes(shape, t), t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, (_, get, _, t) in enumerate(tensors, 1):
            writer.write_tensor_data(gq.encode(get(*gq.take_as(t)), t))
            if progress is not None:
                progress(done, len(tensors))
        writer.flush()
        for f in writer.fout or []:
            os.fsync(f.fileno())
    finally:
        writer.close()


def write_file(path: Path, arch: str, add_keys, tensors: list, extra_bytes: int, progress) -> int:
    """Stream `tensors` [(name, () -> float32, shape, type)] into a GGUF at `path`, atomically.

    add_keys(writer) adds the metadata. The disk must hold the file first; on any error
    (disk full included) the temp file goes and an older `path` stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = sum(gq.nbytes(s, t) for _, _, s, t in tensors)
    check_space(
        path.parent,
        data + extra_bytes + HEADER_SLACK,
        f"the GGUF {path.name}",
        "free some space or write it to another disk",
        ExportError,
    )
    try:
        write_via_temp(path, lambda tmp: _write(tmp, arch, add_keys, tensors, progress))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ExportError(
                f"{path}: the disk filled up while writing the GGUF; nothing was replaced. "
                "Free some space or write it to another disk"
            ) from None
        raise
    return path.stat().st_size


def type_counts(tensors: list) -> dict:
    counts: dict[str, int] = {}
    for _, _, _, t in tensors:
        counts[t.name] = counts.get(t.name, 0) + 1
    return counts


def export_gguf(
    model, config, tokenizer, source, path, qtype="f16", progress=None, consume=False
) -> dict:
    """Write `model` to `path` as GGUF of type `qtype`; LoRA layers are merged, and quantized
    weights dequantized, one tensor at a time as it is written (`consume`: the model empties
    as it goes, for an export that is its last use).

    The vocabulary is copied from a GGUF source or built from the HF tokenizer; the file is
    written under a temp name and renamed, so `path` is either the old file or the new one.
    Returns {"path", "size", "qtype", "arch", "tensors", "seconds", "vocab"}.
    """
    start = time.monotonic()
    source = source or {}
    p = plan(model, config, qtype, source, consume)
    layout = p["layout"]
    fields, vocab_from = gguf_vocab.vocab_fields(tokenizer, source, p["n_vocab"])

    def add_keys(writer):
        _general(writer, qtype, source)
        _add_meta(writer, layout.gguf_arch, metadata(p["hp"], layout, p["n_vocab"]))
        for key, (value, kind, sub) in fields.items():
            writer.add_key_value(key, value, kind, sub)

    vocab_bytes = sum(len(str(v)) for v, _, _ in fields.values())
    size = write_file(path, layout.gguf_arch, add_keys, p["tensors"], vocab_bytes, progress)
    return {
        "path": str(path),
        "size": size,
        "qtype": qtype,
        "arch": layout.gguf_arch,
        "tensors": len(p["tensors"]),
        "types": type_counts(p["tensors"]),
        "vocab": vocab_from,
        "seconds": time.monotonic() - start,
    }
