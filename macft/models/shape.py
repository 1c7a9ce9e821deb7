"""The shape of a decoder: layers, widths, heads, vocabulary, experts; read from a config.json."""

import re
from dataclasses import dataclass

from macft.errors import ModelError

# Mixture-of-experts layers: the stacked experts and the shared expert, as the memory plan names them.
EXPERT_KEYS = ("experts.gate_proj", "experts.up_proj", "experts.down_proj")
SHARED_KEYS = ("shared.gate_proj", "shared.up_proj", "shared.down_proj")


# Bounds on a config's counts: far beyond any released model, far below what would exhaust
# memory or divide by zero before a clear error (a 400-byte GGUF can claim 3,000,000 layers).
LIMITS = {
    "num_hidden_layers": (1, 1024),
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 18),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (1, 4096),
    "vocab_size": (1, 1 << 22),
    "max_position_embeddings": (1, 1 << 24),
    "num_experts": (0, 4096),
    "num_local_experts": (0, 4096),
    "num_experts_per_tok": (0, 4096),
    "moe_intermediate_size": (0, 1 << 18),
}
LAYER_RE = re.compile(r"(?:^|\.)(?:blk|layers)\.(\d+)\.")  # GGUF blk.N., HF model.layers.N.


def layers_in(tensor_names) -> int | None:
    """How many layers the weights hold (None: no layer-numbered names to count)."""
    found = [int(m[1]) for n in tensor_names if (m := LAYER_RE.search(n))]
    return max(found) + 1 if found else None


def _problems(c: dict, layers: int | None, name) -> list[str]:
    out = []
    for key, (lo, hi) in LIMITS.items():
        v = c.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi):
            out.append(f"{name(key)} is {v!r}, not a whole number from {lo} to {hi:,}")
    if out:
        return out
    heads, kv = c.get("num_attention_heads"), c.get("num_key_value_heads")
    if heads and kv and heads % kv:
        out.append(
            f"{name('num_attention_heads')} {heads} is not a multiple of "
            f"{name('num_key_value_heads')} {kv}"
        )
    hidden = c.get("hidden_size")
    if heads and hidden and not c.get("head_dim") and hidden % heads:
        out.append(f"{name('hidden_size')} {hidden} does not split into {heads} heads")
    n = c.get("num_hidden_layers")
    if layers is not None and n is not None and n != layers:
        out.append(f"{name('num_hidden_layers')} is {n:,} but the weights hold {layers} layers")
    return out


def check_config(config: dict, where, tensor_names=None, labels: dict | None = None,
                 layers: int | None = None) -> None:  # fmt: skip
    """Refuse a config (config.json or a GGUF's metadata) whose counts no model has, or that
    its weights contradict, before anything is built from it. `labels` name the keys as the
    file does (a GGUF's llama.block_count); `layers` is how many the weights hold, when the
    tensor names do not say (a GGUF without blk.N tensors holds none)."""
    c = config.get("text_config", config)
    if tensor_names is not None:
        layers = layers_in(tensor_names) or layers
    problems = _problems(c, layers, lambda key: (labels or {}).get(key, key))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ModelError(
            f"{where}: {problems[0]}{more}; the file is damaged or not a model macft can "
            "load: download it again"
        )


@dataclass(frozen=True)
class Shape:
    """The shape facts of a decoder that decide its memory."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int = 0  # 0: hidden // heads
    norms: int = 2  # RMSNorms per layer (Gemma 3 has 4)
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm on queries and keys
    fused: bool = False  # Phi-3: qkv_proj and gate_up_proj are single linears
    experts: int = 0  # mixture of experts: experts per layer, all resident in memory (0: dense)
    active: int = 0  # experts each token is routed to
    expert_intermediate: int = 0  # each expert's MLP width
    shared_intermediate: int = 0  # an always-active shared expert's width (0: none)

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @classmethod
    def from_config(cls, c: dict) -> "Shape":
        c = c.get("text_config", c)
        heads = c["num_attention_heads"]
        experts = c.get("num_experts") or c.get("num_local_experts") or 0
        moe = {}
        if experts:
            moe = {
                "experts": experts,
                "active": c.get("num_experts_per_tok") or 1,
                "expert_intermediate": c.get("moe_intermediate_size") or c["intermediate_size"],
                "shared_intermediate": c.get("shared_expert_intermediate_size") or 0,
            }
        return cls(
            layers=c["num_hidden_layers"],
            hidden=c["hidden_size"],
            intermediate=c["intermediate_size"],
            heads=heads,
            kv_heads=c.get("num_key_value_heads") or heads,
            vocab=c["vocab_size"],
            tied=bool(c.get("tie_word_embeddings", False)),
            head_dim=c.get("head_dim") or 0,
            norms=4 if str(c.get("model_type", "")).startswith("gemma3") else 2,
            qk_norm=str(c.get("model_type", "")).startswith(("qwen3", "gemma3")),
            fused=c.get("model_type") == "phi3",
            **moe,
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear of one layer."""
        h, q, kv, i = self.hidden, self.heads * self.hd, self.kv_heads * self.hd, self.intermediate
        if self.fused:
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i),
                    "down_proj": (i, h)}  # fmt: skip
        attn = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        if not self.experts:
            return {**attn, "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        e, s = self.expert_intermediate, self.shared_intermediate
        ex, sh = EXPERT_KEYS, SHARED_KEYS
        moe = {ex[0]: (h, e), ex[1]: (h, e), ex[2]: (e, h), "router": (h, self.experts)}
        if s:
            moe |= {sh[0]: (h, s), sh[1]: (h, s), sh[2]: (s, h), "shared_gate": (h, 1)}
        return {**attn, **moe}

    @property
    def mlp_width(self) -> int:
        """MLP units a token passes through: its routed experts' and the shared expert's."""
        if not self.experts:
            return self.intermediate
        return self.active * self.expert_intermediate + self.shared_intermediate

    def copies(self, name: str) -> int:
        """How many of this linear a layer holds: one per expert for the stacked experts."""
        return self.experts if name in EXPERT_KEYS else 1

    def parameters(self) -> int:
        lin = self.linears()
        per_layer = sum(self.copies(k) * a * b for k, (a, b) in lin.items())
        per_layer += self.norms * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return self.layers * per_layer + self.vocab * self.hidden + head + self.hidden
