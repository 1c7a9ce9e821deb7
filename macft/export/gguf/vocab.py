"""GGUF tokenizer metadata: copied from a source GGUF, or built from the HF tokenizer macft trained with."""

import json
import re
from pathlib import Path

import gguf
from gguf import GGUFValueType as V

from macft.errors import ExportError
from macft.models.gguf_tokenizer import (
    _LLAMA3_SPLIT,
    _QWEN2_SPLIT,
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    build_tokenizer,
)

# Texts whose encodings must agree between the HF tokenizer and the GGUF description of it.
PROBES = (
    "Hello world! It's 2024: 12345 apples, don't they?",
    "  leading spaces\tand tabs\n\nnew lines  ",
    "naïve café — 東京 🙂 ok",
    "x=a+b*3; print(f'{x:>10}')",
)
_SPECIAL_LOOK = re.compile(r"^<[|｜].*[|｜]>$|^<[a-z_]+>$|^<(start|end)_of_\w+>$")


def _hf(tokenizer):
    return getattr(tokenizer, "_tokenizer", tokenizer)


def _pre_name(tj: dict) -> str | None:
    """The tokenizer.ggml.pre name llama.cpp uses for this tokenizer.json pre-tokenizer, if known."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm" if steps[1].get("use_regex", True) else None
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(pattern)
    return None


def _describe(tj: dict) -> str:
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return " + ".join(str(s.get("type")) for s in steps) or "none"


def _looks_special(text: str) -> bool:
    return bool(_SPECIAL_LOOK.match(text))


def _common(hf, tokens: list[str], meta: dict) -> None:
    """Special ids, add_bos/add_eos as the tokenizer really behaves, chat template."""
    for key, attr in (("bos", "bos"), ("eos", "eos"), ("unknown", "unk"), ("padding", "pad")):
        tid = getattr(hf, f"{attr}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < len(tokens):
            meta[f"tokenizer.ggml.{key}_token_id"] = tid
    probe = hf.encode("a", add_special_tokens=True)
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    meta["tokenizer.ggml.add_bos_token"] = bool(probe) and bos is not None and probe[0] == bos
    meta["tokenizer.ggml.add_eos_token"] = bool(probe) and eos is not None and probe[-1] == eos
    template = getattr(hf, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if isinstance(template, str) and template:
        meta["tokenizer.chat_template"] = template


def _added(hf) -> dict[int, tuple[str, bool]]:
    return {i: (t.content, bool(t.special)) for i, t in hf.added_tokens_decoder.items()}


def _bpe(hf, tj: dict, n_vocab: int) -> dict:
    pre = _pre_name(tj)
    if pre is None:
        raise ExportError(
            f"the tokenizer's pre-tokenizer ({_describe(tj)}) is not one llama.cpp knows by a name "
            "macft can write (gpt-2, smollm, llama-bpe, qwen2); llama.cpp would refuse the GGUF. "
            "Export the MLX folder instead, or convert with llama.cpp's convert_hf_to_gguf.py"
        )
    by_id = {i: t for t, i in hf.get_vocab().items()}
    added = _added(hf)
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            text, special = added[i]
            tokens.append(text)
            types.append(CONTROL if special or _looks_special(text) else USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    merges = tj["model"].get("merges") or []
    # Pairs may hold spaces; llama.cpp splits "a b" at the space, so spaces travel as U+0120.
    merges = [m if isinstance(m, str) else " ".join(s.replace(" ", "Ġ") for s in m) for m in merges]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    _common(hf, tokens, meta)
    _verify(hf, meta)
    return meta


def _verify(hf, meta: dict) -> None:
    """The GGUF must tokenize like the model was trained: compare on a few probe texts."""
    gguf_tok = build_tokenizer(meta, "export")
    for text in PROBES:
        want = hf.encode(text, add_special_tokens=False)
        got = gguf_tok.encode(text, add_special_tokens=False)
        if want != got:
            raise ExportError(
                f"the GGUF tokenizer (pre-tokenizer {meta['tokenizer.ggml.pre']!r}) would split "
                f"{text!r} differently from the model's own tokenizer; llama.cpp would feed the "
                "model other tokens. Export the MLX folder instead"
            )


def _spm_prefix(pieces: list[str]) -> bool:
    return bool(pieces) and pieces[0].startswith("▁")


def _spm_file(model_file: Path, hf, n_vocab: int) -> dict:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        if i < sp.vocab_size():
            tokens.append(sp.id_to_piece(i))
            scores.append(sp.get_score(i))
            kind = NORMAL
            for test, value in (
                (sp.is_unknown, UNKNOWN),
                (sp.is_control, CONTROL),
                (sp.is_unused, UNUSED),
                (sp.is_byte, BYTE),
            ):
                kind = value if test(i) else kind
            types.append(kind)
        else:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(UNUSED)
    for i, (text, special) in _added(hf).items():
        if i < n_vocab and (i >= sp.vocab_size() or special):
            tokens[i] = text
            types[i] = CONTROL if special else USER_DEFINED
            scores[i] = scores[i] if i < sp.vocab_size() else -1000.0
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.add_space_prefix": _spm_prefix(sp.encode("a", out_type=str)),
    }
    _common(hf, tokens, meta)
    return meta


def _spm_from_bpe(hf, tj: dict, n_vocab: int) -> dict:
    """A SentencePiece-style BPE (byte fallback) with no tokenizer.model: scores from merge ranks.

    llama.cpp's SPM tokenizer merges the pair whose result scores highest, so scoring each piece
    by minus the rank of the merge that makes it reproduces the BPE merge order.
    """
    rank = {}
    for r, m in enumerate(tj["model"].get("merges") or []):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(left + right, r)
    by_id = {i: t for t, i in hf.get_vocab().items()}
    added, unk = _added(hf), getattr(hf, "unk_token_id", None)
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        text = added[i][0] if i in added else by_id.get(i, f"[PAD{i}]")
        tokens.append(text)
        scores.append(-float(rank[text]) if text in rank else 0.0)
        if i == unk:
            types.append(UNKNOWN)
        elif i in added:
            types.append(CONTROL if added[i][1] or _looks_special(text) else USER_DEFINED)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(BYTE)
        else:
            types.append(NORMAL if i in by_id else UNUSED)
    ids = hf.encode("a", add_special_tokens=False)
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.add_space_prefix": _spm_prefix(hf.convert_ids_to_tokens(ids)),
    }
    _common(hf, tokens, meta)
    return meta


def _spm_model_file(hf, source: dict) -> Path | None:
    for folder in (source.get("path"), Path(getattr(hf, "vocab_file", "") or ".").parent):
        if folder and (Path(folder) / "tokenizer.model").is_file():
            return Path(folder) / "tokenizer.model"
    return None


def from_tokenizer(tokenizer, source: dict, n_vocab: int) -> dict:
    """GGUF tokenizer.* metadata (plain Python values) for the HF tokenizer the model uses."""
    hf = _hf(tokenizer)
    n_tokens = len(hf.get_vocab())
    if n_tokens > n_vocab:
        raise ExportError(
            f"the tokenizer has {n_tokens:,} tokens but the model only {n_vocab:,} embedding rows; "
            "the tokenizer belongs to another model"
        )
    tj = json.loads(hf.backend_tokenizer.to_str()) if getattr(hf, "is_fast", False) else {}
    model = tj.get("model", {})
    spm_file = _spm_model_file(hf, source)
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        return _bpe(hf, tj, n_vocab)
    if spm_file is not None:
        return _spm_file(spm_file, hf, n_vocab)
    if model.get("type") == "BPE":
        return _spm_from_bpe(hf, tj, n_vocab)
    raise ExportError(
        f"the tokenizer ({model.get('type') or type(hf).__name__}) is neither byte-level BPE nor "
        "SentencePiece, the two kinds macft writes to GGUF; export the MLX folder instead"
    )


def from_gguf(path: Path, n_vocab: int) -> dict:
    """Every tokenizer.* field of a source GGUF as (value, type, element type), unchanged."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            kind = f.types[0]
            out[key] = (f.contents(), kind, f.types[-1] if kind == V.ARRAY else None)
    n = len(out.get("tokenizer.ggml.tokens", ([],))[0])
    if n != n_vocab:
        raise ExportError(
            f"{path}: its vocabulary has {n:,} tokens but the model {n_vocab:,} embedding rows"
        )
    return out


# Types for the keys macft writes itself; arrays of ints are int32, ids uint32, as llama.cpp reads them.
_TYPES = {
    "tokenizer.ggml.tokens": (V.ARRAY, V.STRING),
    "tokenizer.ggml.merges": (V.ARRAY, V.STRING),
    "tokenizer.ggml.token_type": (V.ARRAY, V.INT32),
    "tokenizer.ggml.scores": (V.ARRAY, V.FLOAT32),
}


def typed(meta: dict) -> dict:
    """Plain metadata -> {key: (value, type, element type)} for GGUFWriter.add_key_value."""
    out = {}
    for key, value in meta.items():
        if key in _TYPES:
            out[key] = (value, *_TYPES[key])
        elif isinstance(value, bool):
            out[key] = (value, V.BOOL, None)
        elif isinstance(value, int):
            out[key] = (value, V.UINT32, None)
        else:
            out[key] = (value, V.STRING, None)
    return out


def vocab_fields(tokenizer, source: dict, n_vocab: int) -> tuple[dict, str]:
    """({key: (value, type, element type)}, where it came from) for the export's tokenizer.*."""
    path = Path(source.get("path") or "")
    if source.get("kind") == "gguf" and path.is_file():
        fields = from_gguf(path, n_vocab)
        template = getattr(_hf(tokenizer), "chat_template", None)
        if isinstance(template, str) and template:  # what the run trained with, if it differs
            fields["tokenizer.chat_template"] = (template, V.STRING, None)
        return fields, f"copied from {path.name}"
    meta = from_tokenizer(tokenizer, source, n_vocab)
    kind = meta["tokenizer.ggml.model"]
    return typed(meta), f"{kind} ({meta.get('tokenizer.ggml.pre', 'sentencepiece')})"
