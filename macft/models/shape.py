"""The shape of a decoder: layers, widths, heads, vocabulary, experts; read from a config.json."""

from dataclasses import dataclass

# Mixture-of-experts layers: the stacked experts and the shared expert, as the memory plan names them.
EXPERT_KEYS = ("experts.gate_proj", "experts.up_proj", "experts.down_proj")
SHARED_KEYS = ("shared.gate_proj", "shared.up_proj", "shared.down_proj")


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
