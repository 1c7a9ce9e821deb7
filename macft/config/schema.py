"""Every recipe key once: its type, default, bounds and help, as one dataclass per section.

The trainer takes these dataclasses, `macft train --help` lists the keys from them, and the
README's recipe reference is made from `reference_yaml()` (a test compares the two).
Defaults are chosen so an 8B model trains on a 24 GB Mac: batch 1 with accumulation,
gradient checkpointing, rank 16 on all linear layers.
"""

from dataclasses import dataclass, field, fields
from typing import Any

REQUIRED = object()  # the default of a key that has none: the user must give it
COMPUTE = ("auto", "quantized", "float32", "bfloat16", "float16")
DEFAULT_EPOCHS = 2.0  # when neither train.iters nor train.epochs is set
METHODS = ("sft", "dpo", "orpo")  # train.method; dpo and orpo train on preference pairs
MAX_STEPS = 10**9  # a bound for step counts: beyond it a number is a typo, not a plan
# Sections a resumed run must keep whole: the checkpoint's adapters depend on them.
FIXED_ON_RESUME = ("model", "lora")


@dataclass(frozen=True)
class Key:
    default: Any
    kind: (
        str  # int, auto_int, float, bool, str, choice, targets, layers, opt_int, opt_float, opt_str
    )
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()
    help: str = ""
    example: str = ""  # shown in the reference for a required key
    flag: str = ""  # the command-line option that sets it too
    # --resume refuses a change (unless --force): it changes the data order or the result
    same_on_resume: bool = False


def key(default, kind: str, help: str = "", **spec):
    """A dataclass field that carries its recipe key (Key) as metadata."""
    spec = Key(default, kind, help=help, **spec)
    return field(default=default, metadata={"key": spec})


@dataclass(frozen=True)
class ModelConfig:
    path: str = key(
        REQUIRED, "str", "HF/MLX folder, .gguf file, alias or ollama:NAME",
        example="smollm2-135m", flag="--model PATH",
    )  # fmt: skip
    bits: int = key(4, "choice", "bits of the quantized base", choices=(2, 3, 4, 5, 6, 8))
    group_size: int = key(64, "choice", "quantization group size", choices=(32, 64, 128))
    compute: str = key("auto", "choice", "auto: 4-bit on a Mac, float32 on a CPU", choices=COMPUTE)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = key(16, "int", lo=1, hi=1024)
    alpha: float = key(32.0, "float", "scale = alpha / rank, as in PEFT", lo=1e-9, hi=1e6)
    dropout: float = key(0.05, "float", lo=0.0, hi=0.9)
    targets: Any = key(
        "all-linear", "targets",
        "attention | mlp | all-linear | [q_proj, v_proj, ...]; MoE: experts | shared-expert",
    )  # fmt: skip
    layers: Any = key("all", "layers", "all, or the number of last layers")
    dora: bool = key(False, "bool", "DoRA: LoRA plus a learned magnitude per output row")
    router: bool = key(False, "bool", "MoE: train the routers too (LoRA on each gate)")


@dataclass(frozen=True)
class DataConfig:
    path: str = key(
        REQUIRED, "str", "a .jsonl file or a folder with train.jsonl",
        example="net.jsonl", flag="--data FILE",
    )  # fmt: skip
    max_seq_length: int = key(
        2048, "int", "longer examples are cut", lo=8, hi=1 << 20, same_on_resume=True
    )
    valid_fraction: float = key(
        0.1, "float", "held out for validation when there is no valid.jsonl", lo=0.0, hi=0.5,
        same_on_resume=True,
    )  # fmt: skip
    system: str | None = key(
        None, "opt_str", "system prompt for chat data that has none", same_on_resume=True
    )


@dataclass(frozen=True)
class TrainConfig:
    iters: int | None = key(None, "opt_int", "optimizer steps; or", lo=1, hi=MAX_STEPS)
    epochs: float | None = key(
        None, "opt_float", f"passes over the data ({DEFAULT_EPOCHS:g} when neither is set)",
        lo=0.01, hi=1e6,
    )  # fmt: skip
    batch_size: int = key(1, "int", "examples per micro-batch", lo=1, hi=4096, same_on_resume=True)
    grad_accumulation: int = key(
        8, "int", "micro-batches per step, weighted by tokens", lo=1, hi=4096,
        same_on_resume=True,
    )  # fmt: skip
    learning_rate: float = key(2e-4, "float", lo=1e-9, hi=1.0, same_on_resume=True)
    warmup: int = key(
        10, "int", "steps of linear warmup from 0", lo=0, hi=MAX_STEPS, same_on_resume=True
    )
    schedule: str = key("cosine", "choice", choices=("cosine", "constant"), same_on_resume=True)
    min_lr_ratio: float = key(
        0.1, "float", "cosine ends at this share of lr", lo=0.0, hi=1.0, same_on_resume=True
    )
    weight_decay: float = key(0.0, "float", lo=0.0, hi=1.0, same_on_resume=True)
    max_grad_norm: float = key(
        1.0, "float", "gradient clipping; 0 = off", lo=0.0, hi=1e6, same_on_resume=True
    )
    eval_every: int = key(
        50, "int", "steps between validations; 0 = only at the end", lo=0, hi=MAX_STEPS
    )
    eval_batches: int = key(
        0, "int", "0 = the whole validation set", lo=0, hi=MAX_STEPS, same_on_resume=True
    )
    save_every: int = key(
        100, "int", "steps between checkpoints; 0 = only at the end", lo=0, hi=MAX_STEPS
    )
    grad_checkpoint: bool = key(True, "bool", "recompute each layer in the backward pass")
    seed: int = key(0, "int", lo=0, hi=2**32 - 1, same_on_resume=True)
    early_stopping: int = key(
        0, "int", "evaluations without improvement before stopping; 0 = off", lo=0, hi=MAX_STEPS
    )
    report_every: int = key(5, "int", "steps between progress lines", lo=1, hi=MAX_STEPS)
    pack: bool = key(
        True, "bool", "several examples per row, each seeing only itself, positions from 0"
    )
    loss_chunk: int | str = key(
        "auto", "auto_int",
        "LM head + loss on target positions only, N at a time; 0 = full logits; "
        "auto: 64 on a CPU, 128 on a Mac",
        lo=0, hi=1 << 20,
    )  # fmt: skip
    compile: bool = key(True, "bool", "one compiled graph per batch shape; false = op by op")
    method: str = key(
        "sft", "choice",
        "sft: learn the answers; dpo | orpo: prefer chosen over rejected (preference data)",
        choices=METHODS, same_on_resume=True,
    )  # fmt: skip
    beta: float = key(
        0.1, "float", "DPO: how far from the base (reference) the tuned model may move",
        lo=1e-6, hi=100.0, same_on_resume=True,
    )  # fmt: skip
    dpo_nll: float = key(
        0.0, "float",
        "DPO: weight of the chosen answer's mean token loss added (TRL's rpo_alpha); 0 = off",
        lo=0.0, hi=100.0, same_on_resume=True,
    )  # fmt: skip
    orpo_lambda: float = key(
        0.1, "float", "ORPO: weight of the odds-ratio term beside the chosen answer's loss",
        lo=0.0, hi=100.0, same_on_resume=True,
    )  # fmt: skip
    moe_aux_loss: float = key(
        0.0, "float", "MoE load-balancing loss weight (with lora.router: true); 0 = off",
        lo=0.0, hi=1.0, same_on_resume=True,
    )  # fmt: skip


# train.loss_chunk: auto. On a CPU 64 rows: as fast as 256 and a third of the memory (measured).
# On a GPU a larger chunk keeps the head's matmuls wider for the same dispatches; 128 is a
# reasoned guess (MLX queues ~10 chunks of logits: Llama 3's vocabulary makes that 0.65 GB)
# that wants measuring on a Mac.
AUTO_LOSS_CHUNK = {"cpu": 64, "mac": 128}


def resolve_loss_chunk(setting, mac: bool) -> int:
    """train.loss_chunk as it runs: `auto` is the machine's size, a number is itself."""
    return AUTO_LOSS_CHUNK["mac" if mac else "cpu"] if setting == "auto" else int(setting)


SECTIONS = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig}
TOP_LEVEL = {
    "out": Key(None, "opt_str", help="run folder; default runs/<data name>", flag="--out DIR")
}


def section_keys(section: str) -> dict[str, Key]:
    return {f.name: f.metadata["key"] for f in fields(SECTIONS[section])}


SCHEMA: dict[str, dict[str, Key]] = {name: section_keys(name) for name in SECTIONS}


def of(recipe: dict, section: str):
    """A validated recipe's section as its dataclass, e.g. of(recipe, "train") -> TrainConfig."""
    return SECTIONS[section](**recipe[section])


def _yaml_value(k: Key) -> str:
    if k.default is REQUIRED:
        return k.example
    if k.default is None:
        return "null"
    if isinstance(k.default, bool):
        return str(k.default).lower()
    return str(k.default)


def _comment(k: Key) -> str:
    parts = []
    if k.default is REQUIRED:
        parts.append("required" + (f"; {k.flag}" if k.flag else ""))
    if k.kind == "choice" and k.choices and "|" not in k.help:
        parts.append(" | ".join(str(c) for c in k.choices))
    if k.help:
        parts.append(k.help)
    return "; ".join(parts)


def _line(indent: str, name: str, k: Key) -> str:
    text = f"{indent}{name}: {_yaml_value(k)}"
    comment = _comment(k)
    return f"{text:<26} # {comment}" if comment else text


def reference_yaml() -> str:
    """Every key with its default and help, as a YAML recipe (README's reference)."""
    lines = []
    for section in SECTIONS:
        lines.append(f"{section}:")
        lines += [_line("  ", name, k) for name, k in SCHEMA[section].items()]
    lines += [_line("", name, k) for name, k in TOP_LEVEL.items()]
    return "\n".join(lines) + "\n"


def reference_help() -> str:
    """The keys for `--set KEY=VALUE`, one per line (the train command's help)."""
    rows = []
    for section in SECTIONS:
        for name, k in SCHEMA[section].items():
            value = "(required)" if k.default is REQUIRED else _yaml_value(k)
            rows.append(f"{section}.{name}={value}" + (f"  {_comment(k)}" if _comment(k) else ""))
    return "\n".join(rows)
