"""A recipe + model + data -> a memory plan: what `macft plan` shows, and the check before training."""

from dataclasses import dataclass, replace
from pathlib import Path

from mlx.utils import tree_flatten

from macft import device
from macft.config import schema
from macft.config.recipes import load_recipe, resolve_data_path, shipped_recipes
from macft.data.batches import width_bucket
from macft.data.dataset import load_data
from macft.data.jsonl import read_jsonl
from macft.errors import MacftError, ModelError
from macft.models import catalog, hub, resolve_model_path
from macft.models.gguf import gguf_config, gguf_kept_quantization, gguf_tokenizer
from macft.models.hf import read_config
from macft.models.load import choose_compute
from macft.models.shape import Shape, check_config
from macft.train import memory as mp
from macft.train.lean_ops import lean_ops

CHARS_PER_TOKEN = 3.5  # English and code with a 32k-150k BPE vocabulary: about 3.5 characters


def model_shape(path: str) -> tuple[Shape, str]:
    """The shape of a catalog alias (no weights needed), an HF/MLX folder or a GGUF file."""
    entry = catalog.lookup(path)
    if entry is not None and not Path(path).exists():
        return entry.shape, "shapes from the catalog"
    p = resolve_model_path(path)
    if p.is_dir():
        config = read_config(p)
        check_config(config, p / "config.json")
        try:
            return Shape.from_config(config), str(p)
        except (KeyError, TypeError) as e:  # a key the plan needs is missing
            raise ModelError(f"{p}/config.json: no usable {e} for the memory plan") from None
    return Shape.from_config(gguf_config(p)), str(p)


def kept_quantization(path: str) -> tuple[int, int] | None:
    """(bits, group size) the model's file keeps when it loads, when that is its own (a GGUF)."""
    entry = catalog.lookup(path)
    if entry is not None and entry.pypi is None and not Path(path).exists():
        return None  # a Hugging Face repo: quantized to the recipe's bits as it loads
    try:
        p = resolve_model_path(path)
    except ModelError:
        return None
    return None if p.is_dir() else gguf_kept_quantization(p)


def local_tokenizer(path: str):
    """The model's tokenizer when it is on this machine without downloading, else None."""
    entry = catalog.lookup(path)
    try:
        if entry is not None and entry.pypi is None and not Path(path).exists():
            folder = next(filter(None, (hub.cached_snapshot(r) for r in entry.repos)), None)
            if folder is None:
                return None
            path = str(folder)
        p = resolve_model_path(path)
        if p.is_dir():
            from macft.models.mlx_lm_compat import load_folder_tokenizer

            return load_folder_tokenizer(p)
        return gguf_tokenizer(p)
    except Exception:  # no tokenizer here: the plan estimates from characters instead
        return None


def data_lengths(recipe: dict, tokenizer) -> tuple[list[int], str]:
    """Token lengths of the training examples, measured or estimated from characters."""
    d = recipe["data"]
    if tokenizer is not None:
        _, _, rep = load_data(d["path"], tokenizer, d["max_seq_length"], d["valid_fraction"], 0)
        return rep.lengths, "tokenized"
    p = Path(d["path"])
    records, _ = read_jsonl(p / "train.jsonl" if p.is_dir() else p)
    lengths = []
    for rec in records:
        chars = sum(len(str(v)) for v in _strings(rec))
        turns = len(rec.get("messages", [])) or 2
        # Chat templates add a few tokens per turn (role headers, end-of-turn markers).
        lengths.append(min(d["max_seq_length"], int(chars / CHARS_PER_TOKEN) + 8 * turns))
    return lengths, f"estimated at {CHARS_PER_TOKEN} characters a token: the tokenizer is not local"


def _strings(rec):
    for v in rec.values():
        if isinstance(v, str):
            yield v
        elif isinstance(v, list):
            for m in v:
                if isinstance(m, dict):
                    yield from (x for x in m.values() if isinstance(x, str))


def setup_for(recipe: dict, seq_len: int, compute: str, on_mac: bool, machines: int = 1):
    """The step as the trainer will run it for this recipe, compute and machine."""
    lo, t, m = (schema.of(recipe, k) for k in ("lora", "train", "model"))
    act_bytes, scale_bytes = compute_bytes(compute, on_mac)
    return mp.Setup(
        # a preference pair is two rows; DPO's reference pass (no gradient, one pair) keeps less
        batch_size=t.batch_size * (1 if t.method == "sft" else 2),
        seq_len=seq_len,
        rank=lo.rank,
        targets=mp.target_keys(lo.targets, lo.router),
        lora_layers=None if lo.layers == "all" else lo.layers,
        dropout=lo.dropout,
        grad_checkpoint=t.grad_checkpoint,
        grad_accumulation=t.grad_accumulation,
        compute=compute,
        bits=m.bits,
        group_size=m.group_size,
        act_bytes=act_bytes,
        scale_bytes=scale_bytes,
        loss_chunk=schema.resolve_loss_chunk(t.loss_chunk, on_mac),
        compiled=t.compile,  # the trainer compiles no MoE step: see plan(), shape.experts
        machines=machines,
        lean=lean_ops(on_mac, t.grad_checkpoint),  # as the trainer's speed stack picks them
        dora=lo.dora,
    )


def compute_bytes(compute: str, on_mac: bool) -> tuple[int, int]:
    """(activation, scale) bytes: a quantized base computes in 16 bits on a Mac; on a CPU its
    scales are cast to float32 (load_base), and so is everything computed from them."""
    if compute == "quantized":
        return (2, 2) if on_mac else (4, 4)
    return (4, 4) if compute == "float32" else (2, 2)


def make_plan(
    recipe: dict, shape: Shape, seq_len: int, usable: int, on_mac: bool, machines: int = 1
) -> mp.Plan:
    """The plan before any weights load: compute as load_base would choose it."""
    compute = choose_compute(recipe["model"]["compute"], 4 * shape.parameters(), on_mac, usable)
    return mp.plan(shape, setup_for(recipe, seq_len, compute, on_mac, machines), usable)


def longest(lengths: list[int], max_seq_length: int) -> int:
    """The widest row the trainer will build: the longest example, padded to 32."""
    return width_bucket(max(1, min(max(lengths, default=1), max_seq_length) - 1))


def fit_changes(recipe: dict, plan: mp.Plan) -> list[tuple[str, object]]:
    """The recipe changes, in order of cost to quality and speed, that make the plan fit."""
    s, changes = plan.setup, []

    def attempt(new_setup, new_changes):
        nonlocal s, changes
        s, changes = new_setup, changes + new_changes
        return mp.plan(plan.shape, s, plan.usable).fits

    if s.batch_size > 1:
        eff = s.batch_size * s.grad_accumulation
        ch = [("train.batch_size", 1), ("train.grad_accumulation", eff)]
        if attempt(replace(s, batch_size=1, grad_accumulation=eff), ch):
            return changes
    if not s.grad_checkpoint and attempt(
        replace(s, grad_checkpoint=True), [("train.grad_checkpoint", True)]
    ):
        return changes
    seq = recipe["data"]["max_seq_length"]
    while seq > 256:
        seq //= 2
        trial = replace(s, seq_len=min(s.seq_len, width_bucket(seq)))
        if mp.plan(plan.shape, trial, plan.usable).fits:
            return changes + [("data.max_seq_length", seq)]
    s = replace(s, seq_len=min(s.seq_len, 256))
    changes.append(("data.max_seq_length", 256))
    layers = s.lora_layers or plan.shape.layers
    while layers > 1:
        layers //= 2
        if mp.plan(plan.shape, replace(s, lora_layers=layers), plan.usable).fits:
            return changes + [("lora.layers", layers)]
    raise MacftError(
        f"the base weights alone ({mp.gb(plan.parts['weights'])}) leave no room in "
        f"{mp.gb(plan.usable)}; pick a smaller model (macft models lists them)"
    )


def usable_gb() -> str:
    return mp.gb(device.usable_memory_bytes())


def default_recipe(model: str | None) -> str | None:
    """The shipped recipe of a catalog alias for this machine's memory tier, if there is one."""
    entry = catalog.lookup(model) if model else None
    if entry is None or Path(model).exists():
        return None
    name = catalog.recipe_name(entry.alias, catalog.memory_tier(device.usable_memory_bytes()))
    return name if name in shipped_recipes() else None


def check_before_training(
    recipe: dict, config: dict, source: dict, lengths, console, force, machines=1, model=None
):
    """Print the plan for the loaded model; refuse on a Mac when it cannot fit (unless --force).

    With the model at hand the plan counts its real weights (a GGUF's group size and 8-bit
    embedding, its dtypes) and the activations' real dtype, not the recipe's guess of them.
    """
    on_mac = device.mac_path()
    usable = device.usable_memory_bytes()
    shape = Shape.from_config(config)
    seq = longest(lengths, recipe["data"]["max_seq_length"])
    setup = setup_for(recipe, seq, source.get("compute", "quantized"), on_mac, machines)
    if model is not None:
        act = FLOAT_BYTES.get(source.get("activations"), setup.act_bytes)
        setup = replace(setup, act_bytes=act, weights=frozen_bytes(model))
    plan = mp.plan(shape, setup, usable)
    console.print(plan.summary())
    if plan.fits:
        return plan
    sets = set_flags(fit_changes(recipe, plan))
    advice = f"to fit: {sets}" if sets else "use a smaller model"
    if on_mac and not force:
        raise MacftError(
            f"this run needs about {mp.gb(plan.total)} but Metal's working set is "
            f"{mp.gb(usable)}: it would swap or fail; {advice} (or pass --force to start anyway)"
        )
    console.print(f"[yellow]warning:[/] the plan exceeds usable memory; {advice}")
    return plan


FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def frozen_bytes(model) -> int:
    """Bytes of the model's frozen parameters (the base as it sits in memory, LoRA aside)."""
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k not in trainable)


def set_flags(changes: list[tuple[str, object]]) -> str:
    """Recipe changes as the --set options that make them: --set train.batch_size=1 ..."""
    return " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes)


@dataclass
class RecipePlan:
    """What `macft plan` found: the recipe, the model's shape, the data's lengths, the plan."""

    recipe: dict
    plan: mp.Plan
    shape_from: str  # "shapes from the catalog" or the model's path
    lengths: list[int]
    lengths_how: str  # tokenized, or estimated from characters
    seq: int  # the widest row
    where: str  # "here" or "a 24.0 GB Mac"

    def fit(self) -> list[tuple[str, object]]:
        """The --set changes that make it fit (none when it fits)."""
        return [] if self.plan.fits else fit_changes(self.recipe, self.plan)


def plan_recipe(model, data, recipe_arg, sets, memory: str | None, machines: int = 1):
    """The plan for a recipe (file, --model, --data, --set) on this machine or a Mac of `memory`."""
    recipe, origin = load_recipe(recipe_arg, tuple(sets), {"model.path": model, "data.path": data})
    recipe["data"]["path"] = resolve_data_path(recipe["data"]["path"], origin)
    m = recipe["model"]["path"]
    shape, shape_from = model_shape(m)
    if kept := kept_quantization(m):  # a GGUF's own 4/8 bits in groups of 32, not the recipe's
        recipe["model"].update(bits=kept[0], group_size=kept[1])
    lengths, how = data_lengths(recipe, local_tokenizer(m))
    seq = longest(lengths, recipe["data"]["max_seq_length"])
    if memory:
        ram = device.parse_size(memory)
        usable, on_mac, where = mp.usable_for(ram), True, f"a {mp.gb(ram)} Mac"
    else:
        usable, on_mac, where = device.usable_memory_bytes(), device.mac_path(), "here"
    p = make_plan(recipe, shape, seq, usable, on_mac, machines)
    return RecipePlan(recipe, p, shape_from, lengths, how, seq, where)
