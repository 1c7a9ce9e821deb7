"""Load a GGUF file as an mlx-lm model: names, config, q/k layout and quantization mapped back."""

from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from macft.errors import ModelError
from macft.models import gguf_archs as archs
from macft.models import mlx_lm_compat, quant
from macft.models.gguf_tokenizer import build_tokenizer, tokenizer_source

# mx.load reads these natively (Q4_0/Q4_1 as 4-bit, Q8_0 as 8-bit, group 32); others go through gguf-py.
GGUF_GROUP = 32


HEADER_BYTES = 24  # magic, version, tensor count, metadata count


def _check_magic(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[:4] != b"GGUF":
        raise ModelError(
            f"{path}: not a GGUF file (starts with {head[:4]!r}, not b'GGUF'); the file is "
            "corrupt or truncated: download it again"
        )
    if len(head) < HEADER_BYTES:
        raise ModelError(
            f"{path}: truncated GGUF ({len(head)} bytes, less than its {HEADER_BYTES}-byte "
            "header); download it again"
        )


def _plain(v):
    """mx.load metadata values (0-d arrays, arrays, lists, str) -> JSON-friendly Python values."""
    if isinstance(v, mx.array):
        return v.item() if v.ndim == 0 else v.tolist()
    return v


def _reader(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(str(path))
    except Exception:  # gguf-py's errors (numpy views, indices) say little to a user
        raise ModelError(
            f"{path}: cannot read GGUF ({path.stat().st_size:,} bytes): the file is "
            "corrupt or truncated; download it again"
        ) from None


def _damaged(path: Path, what: str) -> ModelError:
    return ModelError(
        f"{path}: {what}: the file is damaged or not one macft can read; download it again"
    )


def _metadata(reader: gguf.GGUFReader, path: Path) -> dict:
    try:
        return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception:  # gguf-py decodes what the file says: bad UTF-8, wrong types, offsets
        raise _damaged(path, "its metadata cannot be read") from None


def _config(arch, meta: dict, tensor_names, path: Path) -> dict:
    try:
        return archs.config_from_gguf(arch, meta, tensor_names, path)
    except (TypeError, ValueError, OverflowError):  # a value of the wrong kind (text, a list)
        raise _damaged(path, f"a {arch.gguf_arch}.* metadata value is of the wrong kind") from None


def _tokenizer(meta: dict, path: Path):
    try:
        return build_tokenizer(meta, str(path))
    except ModelError:
        raise
    except Exception:  # tokens, merges or ids of the wrong kind, from a damaged file
        raise _damaged(path, "its tokenizer metadata cannot be read") from None


def gguf_config(path: Path) -> dict:
    """The HF-style config of a GGUF file from its header alone (no tensor is read)."""
    _check_magic(path)
    reader = _reader(path)
    meta = _metadata(reader, path)
    arch = archs.get_arch(meta.get("general.architecture"), path)
    return _config(arch, meta, {t.name for t in reader.tensors}, path)


# general.file_type of GGUFs whose weights mx.load reads as they are: bits (group size 32).
KEPT_FILE_TYPES = {2: 4, 3: 4, 7: 8}  # Q4_0, Q4_1, Q8_0; others are re-quantized on load


def gguf_kept_quantization(path: Path) -> tuple[int, int] | None:
    """(bits, group size) a GGUF's weights keep in memory, or None when the recipe's apply."""
    _check_magic(path)
    bits = KEPT_FILE_TYPES.get(_metadata(_reader(path)).get("general.file_type"))
    return (bits, GGUF_GROUP) if bits else None


def gguf_tokenizer(path: Path):
    """The tokenizer a GGUF file carries."""
    _check_magic(path)
    return _tokenizer(_metadata(_reader(path), path), path)


class _Tensors:
    """One GGUF's tensors through mx.load when it can read them all, else gguf-py in numpy."""

    def __init__(self, path: Path):
        self.path = path
        # gguf-py reads the header first: mx.load's own parser ends the process (SIGSEGV) on
        # some damaged headers, where gguf-py raises and the user gets one clear line
        reader = _reader(path)
        meta = _metadata(reader, path)
        try:
            self.arrays, meta = mx.load(str(path), return_metadata=True)
            self.meta = {k: _plain(v) for k, v in meta.items()}
            self.reader = None
        except (RuntimeError, ValueError):
            # K-quants, Q5_x, BF16...: mx.load refuses the whole file; read it with gguf-py.
            self.arrays, self.reader, self.meta = None, reader, meta
            self.by_name = {t.name: t for t in self.reader.tensors}

    def names(self) -> set:
        if self.arrays is not None:
            return {k for k in self.arrays if not k.endswith((".scales", ".biases"))}
        return set(self.by_name)

    def get(self, name: str):
        """(float array, None) or (None, (weight, scales, biases, bits)) for a GGUF tensor name."""
        if self.arrays is not None:
            if name not in self.arrays:
                return None, None
            base = name.rsplit(".", 1)[0]
            if f"{base}.scales" in self.arrays:
                w, s, b = (
                    self.arrays[name],
                    self.arrays[f"{base}.scales"],
                    self.arrays[f"{base}.biases"],
                )
                bits = w.shape[-1] * 32 // (s.shape[-1] * GGUF_GROUP)
                return None, (w, s, b, bits)
            return self.arrays[name], None
        t = self.by_name.get(name)
        if t is None:
            return None, None
        kind = gguf.GGMLQuantizationType
        if t.tensor_type in (kind.F32, kind.F16):
            return mx.array(np.asarray(t.data)), None
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelError(
                f"{self.path}: tensor {name} has type {t.tensor_type.name}, which macft cannot read; "
                "use a GGUF with Q4_0/Q4_1/Q8_0/K-quants/F16, or the HF folder"
            ) from None
        return mx.array(data.astype(np.float32, copy=False)), None


def _name_map(model, gguf_arch: str, n_layers: int) -> dict:
    """mlx-lm parameter name -> GGUF tensor name, from gguf-py's table (HF names = mlx-lm names)."""
    table = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch), n_layers
    )
    out = {}
    for name, _ in tree_flatten(model.parameters()):
        module, leaf = name.rsplit(".", 1)
        base = table.get_name(module)
        if base is not None:
            out[name] = f"{base}.{leaf}"
    return out


def _build(path: Path, config: dict):
    try:
        model = mlx_lm_compat.build_model(config)
    except (ValueError, TypeError, KeyError) as e:
        raise ModelError(
            f"{path}: mlx-lm cannot build {config['model_type']} from this GGUF ({e})"
        ) from None
    if config["tie_word_embeddings"] and "lm_head" in model and hasattr(model, "sanitize"):
        model.sanitize({})  # gemma3_text drops its head only when the weights have none
    return model


def _weights(tensors: _Tensors, model, config: dict, arch, bits: int, group_size: int):
    """(weights by mlx-lm name, quantization plan): each GGUF tensor in mlx-lm's layout.

    GGUF's own 4/8-bit tensors stay quantized (group 32); float ones are quantized to
    bits/group_size as they load; llama's q/k rows go back to HF's order; norms lose Gemma's +1.
    """
    modules = dict(model.named_modules())
    name_map = _name_map(model, arch.gguf_arch, config["num_hidden_layers"])
    heads = {
        "self_attn.q_proj": config["num_attention_heads"],
        "self_attn.k_proj": config["num_key_value_heads"],
    }
    weights, plan, missing = {}, {}, []
    for name, gname in name_map.items():
        module_path, leaf = name.rsplit(".", 1)
        arr, triplet = tensors.get(gname)
        if arr is None and triplet is None:
            missing.append(gname)
            continue
        n_heads = next((h for k, h in heads.items() if module_path.endswith(k)), None)
        unperm = (
            (lambda x, h=n_heads: archs.unpermute_qk(x, h)) if arch.permute_qk and n_heads else None
        )
        if triplet is not None:
            w, s, b, qbits = triplet
            if unperm:  # groups run along columns, so whole rows of all three move together
                w, s, b = unperm(w), unperm(s), unperm(b)
            if quant.quantizable(module_path, modules[module_path], GGUF_GROUP):
                weights[f"{module_path}.weight"], weights[f"{module_path}.scales"] = w, s
                weights[f"{module_path}.biases"] = b
                plan[module_path] = {"group_size": GGUF_GROUP, "bits": qbits}
                mx.eval(w, s, b)
                continue
            arr = mx.dequantize(w, s, b, GGUF_GROUP, qbits)
        if unperm:
            arr = unperm(arr)
        if arch.norm_offset and archs.is_norm(name):
            arr = arr.astype(mx.float32) - arch.norm_offset
        if leaf == "weight" and quant.quantizable(module_path, modules[module_path], group_size):
            weights[name], weights[f"{module_path}.scales"], weights[f"{module_path}.biases"] = (
                quant.quantize_one(arr, bits, group_size)
            )
            plan[module_path] = {"group_size": group_size, "bits": bits}
        else:
            weights[name] = arr
        del arr
    unmapped = [n for n, _ in tree_flatten(model.parameters()) if n not in name_map]
    if missing or unmapped:
        raise ModelError(
            f"{tensors.path}: GGUF lacks tensors this {arch.gguf_arch} model needs "
            f"({', '.join((missing + unmapped)[:4])}); the file is incomplete or a variant macft does not know"
        )
    return weights, plan


def _source(path: Path, meta: dict, arch, factors) -> dict:
    """What base.json records of a GGUF base: its metadata, tokenizer and rope factors."""
    source = {
        "kind": "gguf",
        "path": str(path),
        "arch": arch.gguf_arch,
        "tokenizer": tokenizer_source(meta),
        "gguf": {
            k: v
            for k, v in meta.items()
            if not isinstance(v, list | dict) and not k.startswith("tokenizer.")
        },
    }
    if "tokenizer.chat_template" in meta:
        source["tokenizer"]["chat_template"] = meta["tokenizer.chat_template"]
    if factors is not None:
        source["rope_freqs"] = [float(x) for x in factors.tolist()]
    return source


def load_gguf(path: Path, bits: int, group_size: int):
    """-> (model, tokenizer, config, source)."""
    _check_magic(path)
    tensors = _Tensors(path)
    meta = tensors.meta
    if meta.get("general.type") == "adapter":
        raise ModelError(
            f"{path}: this GGUF is a LoRA adapter, not a base model; give the base model's GGUF"
        )
    arch = archs.get_arch(meta.get("general.architecture"), path)
    names = tensors.names()
    config = _config(arch, meta, names, path)
    factors = None
    if "rope_freqs.weight" in names:
        factors = tensors.get("rope_freqs.weight")[0].astype(mx.float32)
        config["rope_scaling"] = archs.llama3_rope_scaling(factors.tolist())

    model = _build(path, config)
    try:
        weights, plan = _weights(tensors, model, config, arch, bits, group_size)
    except ValueError as e:  # MLX's reshape or quantize on a tensor of another shape
        raise ModelError(
            f"{path}: tensor shapes do not match the GGUF metadata ({str(e)[:200]}); the file "
            "is damaged: download it again"
        ) from None
    quant.apply_quantization(model, plan)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ModelError(f"{path}: tensor shapes do not match the GGUF metadata ({e})") from None
    if factors is not None:
        archs.set_rope_factors(model, factors, config)
    model.eval()
    mx.eval(model.parameters())
    config["quantization"] = quant.config_entry(plan)
    return model, _tokenizer(meta, path), config, _source(path, meta, arch, factors)
