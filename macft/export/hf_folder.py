"""A fused model as a Hugging Face folder: the tensors under HF's names, a config.json that
transformers reads, the tokenizer files (chat template included) and generation_config.json.

mlx-lm keeps HF's module paths for the dense architectures macft trains, so their weights go
out under their own names; the MoE experts mlx-lm stacks into one tensor per projection are
split back into HF's tensor per expert. Shards, index and tokenizer files are the MLX
writer's (mlx_folder.write_mlx_files): the two folders differ in names and config only.
"""

import json
import re
from collections.abc import Iterator
from pathlib import Path

from macft.errors import ExportError
from macft.export.merge import DTYPES, TORCH_DTYPES, fused_tensors
from macft.export.mlx_folder import write_mlx_files

# model_type -> the transformers class config.json's `architectures` names.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
# mlx-lm's stacked experts (sanitize stacks HF's per-expert tensors) -> HF's name per expert.
_STACKED = re.compile(r"^(.*)\.switch_mlp\.(gate|up|down)_proj\.(weight|bias)$")
_MIXTRAL = {"gate": "w1", "down": "w2", "up": "w3"}


def check_hf(config: dict) -> None:
    """Refuse, before any work, a model transformers would not read back as macft computes it."""
    model_type = config.get("model_type")
    if model_type == "gemma3":
        raise ExportError(
            "--hf writes text models, and this gemma3 base is multimodal (mlx-lm keeps its text "
            "part only); export --peft onto the original HF model, or the MLX folder"
        )
    if model_type not in ARCHITECTURES:
        raise ExportError(
            f"--hf does not support model_type {model_type!r} (supported: "
            f"{', '.join(sorted(ARCHITECTURES))}); export --peft or the MLX folder instead"
        )


def hf_name(name: str, expert: int | None = None) -> str:
    """The HF tensor name of an mlx-lm one (of one expert of a stacked expert tensor)."""
    m = _STACKED.match(name)
    if m is None:
        return name
    prefix, proj, leaf = m.groups()
    proj = _MIXTRAL[proj] if prefix.endswith("block_sparse_moe") else f"{proj}_proj"
    return f"{prefix}.experts.{expert}.{proj}.{leaf}"


def hf_tensors(model, dtype) -> tuple[Iterator, int]:
    """(name, array) of the fused model under HF's names, each made as it is reached; how many."""
    tensors = fused_tensors(model, dtype, release=True)
    count = sum(t.shape[0] if _STACKED.match(t.name) else 1 for t in tensors)

    def params():
        for t in tensors:
            value = t.take()
            if _STACKED.match(t.name) is None:
                yield t.name, value
                continue
            for e in range(value.shape[0]):
                yield hf_name(t.name, e), value[e]

    return params(), count


def _eos(ids) -> dict:
    """eos_token_id as HF writes it: one id, or the list of them."""
    ids = sorted(ids)
    return {"eos_token_id": ids[0] if len(ids) == 1 else ids} if ids else {}


def _ids(value) -> set:
    return {value} if isinstance(value, int) else {v for v in value or [] if isinstance(v, int)}


def token_ids(tokenizer) -> dict:
    """bos/eos/pad ids as config.json and generation_config.json name them."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    eos = set(getattr(tokenizer, "eos_token_ids", None) or _ids(hf.eos_token_id))
    ids = {"bos_token_id": hf.bos_token_id, "pad_token_id": hf.pad_token_id}
    return {**{k: v for k, v in ids.items() if v is not None}, **_eos(eos)}


def hf_config(config: dict, dtype: str, tokenizer) -> dict:
    """config.json: the base's, with the class to build, the weights' dtype and the token ids."""
    check_hf(config)
    out = {**config, **token_ids(tokenizer)}
    out.setdefault("architectures", [ARCHITECTURES[config["model_type"]]])
    # transformers 5 reads `dtype`, earlier releases (and vLLM's) `torch_dtype`
    out["dtype"] = out["torch_dtype"] = TORCH_DTYPES[dtype]
    return out


def generation_config(config: dict, source: dict) -> dict:
    """The base folder's generation_config.json (its sampling defaults), if it had one, with
    the run's token ids; it stops on the end tokens of both."""
    path = Path(source["path"]) / "generation_config.json" if source.get("path") else None
    try:
        own = json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else {}
    except (OSError, ValueError, RecursionError):
        own = {}  # a damaged file: the ids alone still make a working one
    own = own if isinstance(own, dict) else {}
    ids = {k: config[k] for k in ("bos_token_id", "pad_token_id") if k in config}
    eos = _ids(own.get("eos_token_id")) | _ids(config.get("eos_token_id"))
    return {**own, **ids, **_eos(eos)}


def write_hf_folder(folder: Path, base, dtype: str, progress=None) -> int:
    """The base with its adapters merged as an HF folder, one tensor at a time (the model
    empties as it goes); how many tensors."""
    config = hf_config(base.config, dtype, base.tokenizer)
    params, count = hf_tensors(base.model, DTYPES[dtype])
    write_mlx_files(folder, params, count, config, base.tokenizer, {}, progress=progress)
    generation = generation_config(config, base.source or {})
    text = json.dumps(generation, indent=2, sort_keys=True) + "\n"
    (Path(folder) / "generation_config.json").write_text(text)
    return count
