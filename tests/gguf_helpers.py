"""Test helpers for GGUF export: tiny models of each architecture, a BPE tokenizer, llama.cpp runs."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from conftest import CHATML, SPECIALS, TINY_CONFIG
from gguf import GGUFReader
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from macft import mlx_lm_compat
from macft.gguf_layout import gguf_name, name_table, resolve, strip_prefix
from macft.gguf_quant import decode
from macft.models.arch import unpermute_qk

MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"),
    ("Ġ", "s"), ("r", "e"), ("a", "t"), ("Ġ", "c"), ("Ġc", "at"), ("Ġs", "at"), ("Ġ", "m"),
    ("Ġm", "at"), ("Ġ", "o"), ("Ġo", "n"), ("1", "2"),
]  # fmt: skip
PROMPT = "the cat sat on the mat, 12 times"

# The tiny llama of conftest without its model_type; more rows than tokens: the GGUF vocabulary is padded
BASE = {**{k: v for k, v in TINY_CONFIG.items() if k != "model_type"}, "vocab_size": 300}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # tiny, so that the scaled frequencies matter within a short prompt
    "original_max_position_embeddings": 64,
}
ARCHS = {
    # Llama 3.x with rope scaling (rope_freqs tensor) and tied embeddings (SmolLM2-like)
    "llama": {"model_type": "llama", "tie_word_embeddings": True, "rope_scaling": LLAMA3_ROPE},
    "mistral": {"model_type": "mistral"},
    "qwen2": {"model_type": "qwen2"},
    "qwen3": {"model_type": "qwen3", "head_dim": 32, "tie_word_embeddings": True},
    "gemma2": {
        "model_type": "gemma2",
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 256,
    },
    "gemma3": {
        "model_type": "gemma3_text",
        "num_hidden_layers": 6,  # mlx-lm needs one full sliding-window pattern (5 local + 1 global)
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 256,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
    },
    "phi3": {"model_type": "phi3"},
}
MOE = {
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "tie_word_embeddings": False,
    },
    "mixtral": {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
}


def bpe_tokenizer() -> TokenizerWrapper:
    """Byte-level BPE with a few merges and ChatML specials (llama.cpp needs merges)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIALS + alphabet)}
    for a, b in MERGES:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )
    return TokenizerWrapper(hf)


def tiny_config(arch: str, **overrides) -> dict:
    extra = ARCHS.get(arch) or MOE[arch]
    return {**BASE, **extra, **overrides}


def build(config: dict, seed: int = 0):
    """A random model; 1-D weights (norms, biases) jittered so the +1 norm offset is tested."""
    mx.random.seed(seed)
    model = mlx_lm_compat.build_model(config)
    if hasattr(model, "sanitize") and config.get("tie_word_embeddings"):
        model.sanitize({})
    flat = tree_flatten(model.parameters())
    # Gemma's norms compute with 1+w, and trained ones sit near w=0 (mlx-lm starts them at 1).
    base = 0.0 if config["model_type"].startswith("gemma") else 1.0
    jitter = [
        (k, (base if k.endswith("norm.weight") else v) + 0.2 * mx.random.normal(v.shape))
        for k, v in flat
        if v.ndim == 1
    ]
    model.update(tree_unflatten(jitter))
    mx.eval(model.parameters())
    model.eval()
    return model


def mlx_logprobs(model, ids: list[int]) -> np.ndarray:
    cache = make_prompt_cache(model)  # Gemma 3 needs one per layer even for a single pass
    logits = model(mx.array([ids]), cache=cache)[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def skipped_tokens(tokenizer) -> list[int]:
    """Tokens greedy decoding must skip on both sides: llama.cpp ends generation at the
    end-of-turn specials, and it holds back the probabilities of a token that is an incomplete
    UTF-8 sequence (a lone byte >= 0x80), which would misalign the steps."""
    hf = tokenizer._tokenizer
    out = [i for i in range(len(hf)) if "\ufffd" in hf.decode([i])]
    specials = [hf.convert_tokens_to_ids(s) for s in SPECIALS if s in hf.get_vocab()]
    return sorted({*out, *specials, *hf.all_special_ids})


def pick(logprobs: np.ndarray, skip: list[int]) -> int:
    lp = logprobs.copy()
    lp[skip] = -np.inf
    return int(lp.argmax())


def margin(logprobs: np.ndarray, skip: list[int]) -> float:
    lp = np.delete(logprobs, skip)
    top = np.sort(lp)[-2:]
    return float(top[1] - top[0])


def mlx_greedy(model, ids: list[int], n: int, skip: list[int]) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(pick(mlx_logprobs(model, out)[-1], skip))
    return out[len(ids) :]


def llama_cpp(path, prompt, n_predict, skip, n_probs=8, lora=None, with_usage=False):
    """Greedy steps from llama.cpp: [{"id", "top": {id: logprob}}] (probabilities before sampling).

    `prompt` is token ids, or text that llama.cpp tokenizes itself; with_usage also returns
    the response's token counts.
    """
    import xllamacpp as xl

    params = xl.CommonParams()
    params.model.path = str(path)
    params.n_ctx = 256
    params.n_parallel = 1
    params.cpuparams.n_threads = 1  # two spin-waiting threads crawl on shared cores
    params.cpuparams_batch.n_threads = 1
    params.warmup = False
    if lora:
        params.lora_adapters = [xl.CommonAdapterLoraInfo(str(lora), 1.0)]
    server = xl.Server(params)
    try:
        r = server.handle_completions(
            {
                "prompt": prompt,
                "n_predict": n_predict,
                "temperature": 0,
                "top_k": 1,
                "n_probs": n_probs,
                "post_sampling_probs": False,
                "cache_prompt": False,
                "logit_bias": [[i, False] for i in skip],
            }
        )
    finally:
        del server
    if "choices" not in r:
        raise AssertionError(f"llama.cpp failed: {r}")
    steps = r["choices"][0]["logprobs"]["content"]
    steps = [
        {"id": s["id"], "top": {t["id"]: t["logprob"] for t in s["top_logprobs"]}} for s in steps
    ]
    return (steps, r["usage"]) if with_usage else steps


def compare(model, prompt_ids: list[int], steps: list[dict], skip: list[int]) -> dict:
    """MLX teacher-forced on llama.cpp's greedy path: top-1 agreement and log-prob differences."""
    gen = [s["id"] for s in steps]
    lp = mlx_logprobs(model, prompt_ids + gen[:-1])[len(prompt_ids) - 1 :]
    agree = [pick(lp[i], skip) == g for i, g in enumerate(gen)]
    diffs = [abs(lp[i][t] - v) for i, s in enumerate(steps) for t, v in s["top"].items()]
    return {
        "tokens": gen,
        "agree": sum(agree) / len(agree),
        "all_agree": all(agree),
        # the lead of MLX's choice over the runner-up, per step: a flip needs an error that big
        "margins": [margin(lp[i], skip) for i in range(len(gen))],
        "agree_list": agree,
        "max_diff": float(max(diffs)),
        "mean_diff": float(np.mean(diffs)),
    }


def weights_as_stored(model, config: dict, path) -> None:
    """Replace the model's weights by what the GGUF at `path` holds (dequantized), in place."""
    _, layout, hp = resolve(model, config)
    table = name_table(layout, hp["num_hidden_layers"])
    stored = {t.name: (t.data, t.tensor_type) for t in GGUFReader(str(path)).tensors}
    heads = {"q_proj": hp["num_attention_heads"], "k_proj": hp["num_key_value_heads"]}
    updates = []
    for name, value in tree_flatten(model.parameters()):
        data, kind = stored[gguf_name(table, strip_prefix(name))]
        w = mx.array(decode(np.asarray(data), kind).reshape(value.shape))
        module = name.rsplit(".", 2)[-2]
        if layout.permute_qk and module in heads:
            w = unpermute_qk(w, heads[module])
        if layout.norm_offset and name.endswith("norm.weight"):
            w = w - layout.norm_offset
        updates.append((name, w.astype(value.dtype)))
    model.update(tree_unflatten(updates))
    mx.eval(model.parameters())


SPM_CORPUS = [
    "the cat sat on the mat",
    "a quick brown fox jumps over the lazy dog",
    "hello world, it is 2024 today",
    "print(x) for x in range(10)",
]


def spm_tokenizer(folder: Path):
    """A SentencePiece BPE (byte fallback, like Gemma's and Mistral's) trained here, in an HF folder."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "tokenizer.model", "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(SPM_CORPUS * 20),
            model_writer=f,
            vocab_size=320,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            hard_vocab_limit=False,
            minloglevel=2,
        )
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return mlx_lm_compat.load_folder_tokenizer(folder), folder
