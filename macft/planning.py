"""A recipe + model + data -> memory plan: the `macft plan` command and the check before training."""

import json
from dataclasses import replace
from pathlib import Path

from macft import backend, catalog
from macft import memory_plan as mp
from macft.errors import MacftError, ModelError
from macft.trainer import TrainConfig

CHARS_PER_TOKEN = 3.5  # English and code with a 32k-150k BPE vocabulary: about 3.5 characters


def train_config(recipe: dict) -> TrainConfig:
    t = recipe["train"]
    return TrainConfig(**{k: v for k, v in t.items() if k in TrainConfig.__dataclass_fields__})


def model_shape(path: str) -> tuple[mp.Shape, str]:
    """The shape of a catalog alias (no weights needed), an HF/MLX folder or a GGUF file."""
    entry = catalog.lookup(path)
    if entry is not None and not Path(path).exists():
        return entry.shape, "shapes from the catalog"
    from macft.models import resolve_model_path

    p = resolve_model_path(path)
    if p.is_dir():
        try:
            config = json.loads((p / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"{p}: cannot read config.json ({e})") from None
        return mp.Shape.from_config(config), str(p)
    import gguf

    from macft.models import arch as archs
    from macft.models.gguf import _check_magic

    _check_magic(p)
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception:  # gguf-py raises ValueError, IndexError... on a damaged file
        raise ModelError(
            f"{p}: cannot read GGUF ({p.stat().st_size:,} bytes): the file is corrupt or "
            "truncated; download it again"
        ) from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    names = {t.name for t in reader.tensors}
    arch = archs.get_arch(meta.get("general.architecture"), p)
    return mp.Shape.from_config(archs.config_from_gguf(arch, meta, names, p)), str(p)


def local_tokenizer(path: str):
    """The model's tokenizer when it is on this machine without downloading, else None."""
    entry = catalog.lookup(path)
    try:
        if entry is not None and entry.pypi is None and not Path(path).exists():
            from macft.models import hub

            folder = next(filter(None, (hub.cached_snapshot(r) for r in entry.repos)), None)
            if folder is None:
                return None
            path = str(folder)
        from macft.models import resolve_model_path

        p = resolve_model_path(path)
        if p.is_dir():
            from macft.mlx_lm_compat import load_folder_tokenizer

            return load_folder_tokenizer(p)
        from macft.models.gguf import _Tensors
        from macft.models.gguf_tokenizer import build_tokenizer

        return build_tokenizer(_Tensors(p).meta, str(p))
    except Exception:  # no tokenizer here: the plan estimates from characters instead
        return None


def data_lengths(recipe: dict, tokenizer) -> tuple[list[int], str]:
    """Token lengths of the training examples, measured or estimated from characters."""
    from macft.data import load_data, read_jsonl

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


def setup_for(recipe: dict, seq_len: int, compute: str, act_bytes: int, scale_bytes: int):
    lo, t, m = recipe["lora"], recipe["train"], recipe["model"]
    cfg = train_config(recipe)
    return mp.Setup(
        batch_size=t["batch_size"],
        seq_len=seq_len,
        rank=lo["rank"],
        targets=mp.target_keys(lo["targets"], lo.get("router", False)),
        lora_layers=None if lo["layers"] == "all" else lo["layers"],
        dropout=lo["dropout"],
        grad_checkpoint=t["grad_checkpoint"],
        grad_accumulation=t["grad_accumulation"],
        compute=compute,
        bits=m["bits"],
        group_size=m["group_size"],
        act_bytes=act_bytes,
        scale_bytes=scale_bytes,
        # The trainer's chunked loss (TrainConfig.loss_chunk), when this version has one.
        loss_chunk=int(getattr(cfg, "loss_chunk", 0) or 0),
        compiled=bool(getattr(cfg, "compile", False)),
    )


def _for_machine(setup: mp.Setup, shape: mp.Shape, machines: int, on_mac: bool) -> mp.Setup:
    # The trainer compiles no MoE step (macft.trainer.uses_compile) and uses lean ops on a CPU.
    compiled = setup.compiled and not shape.experts
    return replace(setup, machines=machines, lean=not on_mac, compiled=compiled)


def mac_compute(recipe: dict, on_mac: bool, shape: mp.Shape, usable: int):
    """(compute, activation bytes, scale bytes) as load_base would pick them."""
    c = recipe["model"]["compute"]
    if c == "auto":
        c = "quantized" if on_mac or 4 * shape.parameters() > usable // 2 else "float32"
    if c == "quantized":
        return c, (2, 2) if on_mac else (4, 4)  # on a CPU the scales are cast to float32
    return c, ({"float32": 4}.get(c, 2),) * 2


def make_plan(
    recipe: dict, shape: mp.Shape, seq_len: int, usable: int, on_mac: bool, machines: int = 1
) -> mp.Plan:
    compute, (act, scale) = mac_compute(recipe, on_mac, shape, usable)
    setup = setup_for(recipe, seq_len, compute, act, scale)
    return mp.plan(shape, _for_machine(setup, shape, machines, on_mac), usable)


def longest(lengths: list[int], max_seq_length: int) -> int:
    """The widest row the trainer will build: the longest example, padded to 32."""
    return mp.padded(max(1, min(max(lengths, default=1), max_seq_length) - 1))


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
        trial = replace(s, seq_len=min(s.seq_len, mp.padded(seq)))
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
    return mp.gb(backend.usable_memory_bytes())


def default_recipe(model: str | None) -> str | None:
    """The shipped recipe of a catalog alias for this machine's memory tier, if there is one."""
    entry = catalog.lookup(model) if model else None
    if entry is None or Path(model).exists():
        return None
    from macft.recipe import shipped_recipes

    name = catalog.recipe_name(entry.alias, catalog.memory_tier(backend.usable_memory_bytes()))
    return name if name in shipped_recipes() else None


def check_before_training(
    recipe: dict, config: dict, source: dict, lengths, console, force, machines: int = 1
):
    """Print the plan for the loaded model; refuse on Metal when it cannot fit (unless --force)."""
    on_mac = backend.metal_available()
    usable = backend.usable_memory_bytes()
    shape = mp.Shape.from_config(config)
    seq = longest(lengths, recipe["data"]["max_seq_length"])
    compute = source.get("compute", "quantized")
    act = 4 if compute == "float32" or (compute == "quantized" and not on_mac) else 2
    setup = setup_for(recipe, seq, compute, act, 4 if not on_mac else 2)
    plan = mp.plan(shape, _for_machine(setup, shape, machines, on_mac), usable)
    console.print(plan.summary())
    if plan.fits:
        return plan
    sets = " ".join(f"--set {k}={_yaml(v)}" for k, v in fit_changes(recipe, plan))
    advice = f"to fit: {sets}" if sets else "use a smaller model"
    if on_mac and not force:
        raise MacftError(
            f"this run needs about {mp.gb(plan.total)} but Metal's working set is "
            f"{mp.gb(usable)}: it would swap or fail; {advice} (or pass --force to start anyway)"
        )
    console.print(f"[yellow]warning:[/] the plan exceeds usable memory; {advice}")
    return plan


def _yaml(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)
