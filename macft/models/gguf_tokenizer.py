"""Build a Hugging Face fast tokenizer from GGUF tokenizer metadata, without torch."""

import logging

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import PreTrainedTokenizerFast

from macft.errors import ModelError
from macft.models import mlx_lm_compat

log = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split patterns of the byte-level BPE families llama.cpp names in tokenizer.ggml.pre.
# Llama 3 keeps up to three digits together; Qwen2 splits every digit.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _split_then_bytes(pattern: str):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _gpt2():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm():
    # SmolLM/StarCoder: each digit on its own, then the GPT-2 pattern.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


PRE_TOKENIZERS = {
    "default": _gpt2,
    "gpt2": _gpt2,
    "gpt-2": _gpt2,  # the name llama.cpp knows
    "smollm": _smollm,
    "starcoder": _smollm,
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "llama3": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
}


def _token(tokens: list[str], meta: dict, key: str) -> str | None:
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    return tokens[i] if i is not None and 0 <= i < len(tokens) else None


def _bpe_model(tokens, meta) -> tuple[Tokenizer, str]:
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string keeps its first id, as llama.cpp does
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        log.warning("GGUF pre-tokenizer %r is not known to macft; using GPT-2's split", pre)
    tok.pre_tokenizer = PRE_TOKENIZERS.get(pre, _gpt2)()
    tok.decoder = decoders.ByteLevel()
    return tok, "bpe"


def _spm_merges(tokens, scores, types) -> list[tuple[str, str]]:
    """SentencePiece BPE merges pieces by the score of the result; HF BPE needs explicit ranks."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    found = []
    for piece, pid in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((-scores[pid], vocab[left], vocab[right], left, right))
    found.sort()
    return [(f[3], f[4]) for f in found]


def _spm_model(tokens, meta) -> tuple[Tokenizer, str]:
    n = len(tokens)
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * n)
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * n)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk = _token(tokens, meta, "unknown") or ("<unk>" if "<unk>" in vocab else None)
    bpe = models.BPE(
        vocab=vocab,
        merges=_spm_merges(tokens, scores, types),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=any(t == BYTE for t in types),
    )
    tok = Tokenizer(bpe)
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # llama.cpp prefixes a space to every text run (even one that starts with a space, and
    # after each special token); a normalizer does the same, Metaspace would skip some.
    steps = [normalizers.Prepend("▁")] if prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok, "spm" if prefix else "spm_no_space"


def build_tokenizer(meta: dict, path: str):
    """GGUF metadata dict (plain Python values) -> mlx-lm TokenizerWrapper."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelError(
            f"{path}: the GGUF has no tokenizer.ggml.tokens; it cannot be used without a tokenizer"
        )
    if kind == "gpt2":
        tok, detok = _bpe_model(tokens, meta)
    elif kind == "llama":
        tok, detok = _spm_model(tokens, meta)
    else:
        raise ModelError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama); "
            "use the model's HF folder instead"
        )

    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    added = [
        AddedToken(t, special=ty == CONTROL, normalized=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty in (CONTROL, USER_DEFINED)
    ]
    tok.add_tokens(added)  # AddedToken.special decides whether decode may skip it

    bos = _token(tokens, meta, "bos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    eos = _token(tokens, meta, "eos")
    if (add_bos and bos) or (add_eos and eos):
        # llama.cpp adds BOS/EOS around every encoding; HF does it in the post-processor.
        head = f"{bos}:0 " if add_bos and bos else ""
        tail = f" {eos}:0" if add_eos and eos else ""
        specials = {
            t: tokens.index(t) for t in (bos if add_bos else None, eos if add_eos else None) if t
        }
        tok.post_processor = processors.TemplateProcessing(
            single=f"{head}$A:0{tail}",
            pair=f"{head}$A:0{tail} $B:1{tail}",
            special_tokens=list(specials.items()),
        )

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=_token(tokens, meta, "unknown"),
        pad_token=_token(tokens, meta, "padding"),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,  # keeps decode(encode(s)) == s
    )
    eos_ids = {
        meta[k]
        for k in (
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        )
        if meta.get(k) is not None
    }
    return mlx_lm_compat.wrap_tokenizer(hf, detok, sorted(eos_ids))


def tokenizer_source(meta: dict) -> dict:
    """The small facts a GGUF export needs to write the same tokenizer back."""
    keep = (
        "model",
        "pre",
        "bos_token_id",
        "eos_token_id",
        "eot_token_id",
        "padding_token_id",
        "unknown_token_id",
        "add_bos_token",
        "add_eos_token",
        "add_space_prefix",
    )
    return {k: meta[f"tokenizer.ggml.{k}"] for k in keep if f"tokenizer.ggml.{k}" in meta}
