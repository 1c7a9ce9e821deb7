"""Predicted peak memory of a LoRA training step, split by cause, and the changes that make it fit."""

from dataclasses import dataclass, field

from macft.config.schema import AUTO_LOSS_CHUNK, LoraConfig, ModelConfig, TrainConfig
from macft.models.shape import EXPERT_KEYS, SHARED_KEYS, Shape

GB = 1e9
LORA_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_KEYS += ("qkv_proj", "gate_up_proj")  # Phi-3's fused ones
# Mixture-of-experts routers (the experts' own keys are the model shape's).
ROUTER_KEYS = ("router", "shared_gate")
# Python, the tokenizer, MLX's kernels and (on a Mac) Metal's command buffers: what a process
# holds beyond the arrays that mx.get_peak_memory counts.
OVERHEAD_BYTES = int(0.6 * GB)
# The compiled step (train.compile) keeps more at its peak: its fused kernels write to new
# buffers where the eager ops overwrite their input. Measured on a CPU over hidden sizes
# 64-576, 64-1024 tokens and 2-30 layers: +2-25% of the planned activations, the most on the
# tiniest models (tests/test_memory_plan.py holds the plan to the measured peak).
COMPILED_EXTRA = {True: 0.15, False: 0.25}  # by grad_checkpoint, float32 activations
# With 16-bit activations (the Mac's path) the compiled step kept less than the eager one (its
# fused kernels skip the float32 copies between ops): counted as no extra.


@dataclass(frozen=True)
class Setup:
    """How the step runs: what the recipe and the trainer decide (recipe defaults by default)."""

    batch_size: int = TrainConfig.batch_size
    seq_len: int = 2048  # tokens in the longest row of a micro-batch
    rank: int = LoraConfig.rank
    targets: tuple = LORA_KEYS
    lora_layers: int | None = None  # None: all
    dropout: float = LoraConfig.dropout
    grad_checkpoint: bool = TrainConfig.grad_checkpoint
    grad_accumulation: int = TrainConfig.grad_accumulation
    compute: str = "quantized"  # quantized | float32 | bfloat16 | float16
    bits: int = ModelConfig.bits
    group_size: int = ModelConfig.group_size
    act_bytes: int = 2  # activations: bfloat16 on a Mac's quantized base, float32 on CPU
    scale_bytes: int = 2  # quantization scales and biases
    loss_chunk: int = AUTO_LOSS_CHUNK["mac"]  # rows of logits at a time; 0 = all at once
    machines: int = 1  # data-parallel ranks, each with this batch (macft train --hosts)
    lean: tuple = ()  # lean ops (train/lean_ops.py): attention, norm, swiglu
    dora: bool = LoraConfig.dora  # each adapted layer's weight, dequantized to float32
    weights: int | None = None  # the base's bytes, measured on the loaded model
    compiled: bool = TrainConfig.compile  # the trainer's compiled step


@dataclass
class Plan:
    parts: dict[str, int]  # bytes by cause
    setup: Setup
    shape: Shape
    usable: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def mlx_peak(self) -> int:
        """What mx.get_peak_memory should report: every part but the process overhead."""
        return sum(v for k, v in self.parts.items() if k != "overhead")

    @property
    def step_bytes(self) -> int:
        """What one step allocates and frees beyond the weights: MLX's cache need keep no more."""
        return self.mlx_peak - self.parts["weights"]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.usable is None or self.total <= self.usable

    def summary(self) -> str:
        s = self.setup
        ck = "checkpointing" if s.grad_checkpoint else "no checkpointing"
        line = (
            f"memory plan: {gb(self.total)} peak (weights {gb(self.parts['weights'])}, "
            f"activations {gb(self.parts['activations'])}, logits {gb(self.parts['logits'])}, "
            f"LoRA+AdamW {gb(self.parts['lora'])}) at batch {s.batch_size} x {s.seq_len} tokens, "
            f"{ck}"
        )
        if s.machines > 1:
            line += f", on each of {s.machines} machines"
        if self.usable is not None:
            line += f"; {'fits' if self.fits else 'does NOT fit'} in {gb(self.usable)}"
        return line


def gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def _lora_dims(shape: Shape, setup: Setup) -> list[tuple[int, int]]:
    """(in, out) of each adapted linear a token passes through: an expert's once per route."""
    lin = shape.linears()
    return [lin[k] for k in setup.targets if k in lin for _ in range(_slots(shape, k))]


def _slots(shape: Shape, name: str) -> int:
    return shape.active if name in EXPERT_KEYS else 1


def weight_bytes(shape: Shape, setup: Setup) -> int:
    """The frozen base as it sits in memory: packed ints plus a scale and a bias per group."""
    if setup.weights is not None:
        return setup.weights
    n = shape.parameters()
    norms = (shape.norms * shape.layers + 1) * shape.hidden
    if setup.compute != "quantized":
        return n * {"float32": 4}.get(setup.compute, 2)
    # mlx-lm quantizes every linear and the embedding (and an untied head); norms stay float.
    q = n - norms
    per_group = 2 * setup.scale_bytes / setup.group_size
    return int(q * setup.bits / 8 + q * per_group) + norms * setup.act_bytes


def lora_params(shape: Shape, setup: Setup) -> int:
    """Every expert has its own adapter, though a token trains only the ones it is routed to."""
    layers, lin = setup.lora_layers or shape.layers, shape.linears()
    per_layer = sum(shape.copies(k) * setup.rank * sum(lin[k]) for k in setup.targets if k in lin)
    return layers * per_layer


def layer_activation_bytes(shape: Shape, setup: Setup, tokens: int, width: int) -> int:
    """Bytes one adapted layer keeps for its backward pass (per the whole micro-batch).

    Per token: each RMSNorm keeps its input and output plus the rsqrt-scaled copy MLX's VJP
    holds (3 x hidden each, measured on an isolated norm + linear); attention keeps the scaled
    queries, keys, values and the merged head output (the inputs of its matmuls) and the softmax
    output, heads x width; the SwiGLU MLP keeps gate, up, sigmoid, silu and their product
    (5 x intermediate: the compiled activation's VJP re-traces it); each LoRA keeps x @ A (rank).
    """
    h, a = shape.hidden, setup.act_bytes
    q_dim, kv_dim = shape.heads * shape.hd, shape.kv_heads * shape.hd
    lora = _lora_dims(shape, setup)
    # The lean ops (train/lean_ops.py) keep a norm's input only (its output is the next LoRA's
    # input), no attention probabilities, and (without checkpointing) the MLP's gate, up and
    # product.
    lean = setup.lean
    norm_copies = 2 if "norm" in lean else 3
    mlp_copies = 3 if "swiglu" in lean and not setup.grad_checkpoint else 5
    per_token = a * (norm_copies * shape.norms * h + 2 * q_dim + 2 * kv_dim)
    per_token += a * mlp_copies * shape.mlp_width
    if shape.experts:
        # A copy of the input per routed expert (sorted by expert), the experts' outputs before
        # and after unsorting; the router's scores and probabilities.
        per_token += a * (3 * shape.active * h + 3 * shape.experts)
    per_token += a * shape.heads * (1 if "attention" in lean else width)
    if shape.qk_norm:
        per_token += a * 2 * (q_dim + kv_dim)  # the normed queries and keys, and their inputs
    per_token += 4 * setup.rank * len(lora)  # x @ A is float32: LoRA weights are float32
    if a < 4:
        # x @ A with float32 A promotes x: each LoRA input is kept as its own float32 copy.
        per_token += sum(4 * d_in for d_in, _ in lora) - a * (2 * h + q_dim + shape.mlp_width)
    if setup.dropout > 0:
        per_token += sum(4 * d_in for d_in, _ in lora)  # the dropped-out copy of each input
    return tokens * per_token


def logits_bytes(shape: Shape, setup: Setup, tokens: int) -> int:
    """Logits and cross-entropy: float32 logits, the softmax and its gradient (3 x tokens x vocab).

    A chunked loss computes them `loss_chunk` rows at a time and keeps the hidden states and
    their gradient instead; it pays off once a micro-batch holds more than ~3 chunks of tokens.
    """
    v, a = shape.vocab, setup.act_bytes
    cast = a * v if a < 4 else 0  # the head's output before the float32 cast
    if setup.loss_chunk:
        # MLX allocates an op's output when it queues the op, ahead of running it: measured,
        # about 640 rows of n x V arrays are alive at once (10 chunks of 64, 6 of 256), and at
        # most 3 per token.
        rows = min(3 * tokens, max(640, 6 * setup.loss_chunk))
        return rows * (4 * v + cast) + 2 * tokens * shape.hidden * a
    return tokens * (3 * 4 * v + cast)


def plan(shape: Shape, setup: Setup, usable: int | None = None) -> Plan:
    tokens, width = setup.batch_size * setup.seq_len, setup.seq_len
    adapted = setup.lora_layers or shape.layers
    layer = layer_activation_bytes(shape, setup, tokens, width)
    h_bytes = tokens * shape.hidden * setup.act_bytes
    if setup.grad_checkpoint:
        # Each layer keeps its input and its output's gradient; one layer is recomputed at a time.
        acts = adapted * 2 * h_bytes + layer
    else:
        acts = adapted * layer
    # The backward pass of one layer holds gradients on top: of the softmax and the scores (the
    # lean attention: its recomputed probabilities and their gradient, float32), of the MLP's
    # gate and up outputs, of the layer's input and output.
    a = setup.act_bytes
    scores = 2 * 4 if "attention" in setup.lean else 2 * a
    acts += scores * setup.batch_size * shape.heads * width * width
    acts += tokens * a * 2 * shape.mlp_width + 2 * h_bytes
    if setup.compiled and not shape.experts and a == 4:  # MoE steps run uncompiled
        acts = int(acts * (1 + COMPILED_EXTRA[setup.grad_checkpoint]))
    if setup.dora:  # each DoRA layer's float32 weight and adapted weight, one layer at a time
        acts += 2 * 4 * max(d_in * d_out for d_in, d_out in _lora_dims(shape, setup))
    p = lora_params(shape, setup)
    logits = logits_bytes(shape, setup, tokens)
    # AdamW: parameters, m and v persist (12 bytes a parameter). The backward pass adds this
    # micro-batch's float32 gradients (and the running sum when accumulating); the update
    # phase, after the activations are gone, holds the raw and the scaled gradients.
    # Across machines the summed gradients arrive beside this machine's own.
    grads = 4 * p * (2 if setup.grad_accumulation > 1 or setup.machines > 1 else 1)
    lora = 12 * p + max(grads, 8 * p - acts - logits)
    parts = {
        "weights": weight_bytes(shape, setup),
        "lora": lora,
        "activations": acts,
        "logits": logits,
        "overhead": OVERHEAD_BYTES,
    }
    return Plan(parts, setup, shape, usable)


def usable_for(ram_bytes: float) -> int:
    """Metal's recommended working set on a Mac with this much memory: about 2/3 up to 36 GB."""
    return int(ram_bytes * (2 / 3 if ram_bytes <= 36e9 else 3 / 4))


def target_keys(targets, router: bool = False) -> tuple:
    """lora.targets (preset or names) and lora.router -> the linear names the plan counts."""
    extra = ROUTER_KEYS if router else ()
    if targets == "attention":
        return ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", *extra)
    if targets == "mlp":
        return ("gate_proj", "up_proj", "down_proj", "gate_up_proj", *EXPERT_KEYS, *SHARED_KEYS,
                *extra)  # fmt: skip
    if targets == "all-linear":
        return LORA_KEYS + EXPERT_KEYS + SHARED_KEYS + extra
    if targets == "experts":
        return EXPERT_KEYS + extra
    if targets == "shared-expert":
        return SHARED_KEYS + extra
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else targets
    keys = []
    for name in names:
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("gate", "router"):
            keys.append("router")
        elif leaf == "shared_expert_gate":
            keys.append("shared_gate")
        elif "shared_expert" in name:
            keys.append(f"shared.{leaf}")
        elif "switch_mlp" in name or "experts" in name:
            keys.append(f"experts.{leaf}")
        else:  # a bare leaf: the dense linear, and on an MoE model the experts' and shared one
            keys += [leaf, f"experts.{leaf}", f"shared.{leaf}"]
    return tuple(dict.fromkeys([*keys, *extra]))
