"""The fidelity check after `macft fuse`: does each export still say what the adapters say?

On a few held-out examples of the run, the base + adapters (as chat loads them) are compared
with each export as its own consumer runs it: GGUF files in llama.cpp, the MLX folder in
mlx_lm. Per export: the share of answer positions where both pick the same next token, the
held-out loss beside the adapters' and the base's, and how many greedy answers are the same.
An export whose loss sits closer to the base's than to the adapters' lost the fine-tune: the
user is told so, with what to try. Results go to export/fidelity.json (macft report shows it).
"""

import contextlib
import gc
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from rich.markup import escape

from macft.atomic import json_text
from macft.config.schema import DataConfig, TrainConfig
from macft.data.dataset import held_out_records
from macft.data.encode import Example
from macft.data.heldout import chosen_records, loss_examples, make_case
from macft.errors import MacftError
from macft.export.peft import PREFIX
from macft.inference.evaluation import answer_budget, finish_answer, generate
from macft.lora.apply import lora_disabled
from macft.runs.folder import RunDir

FILE = "fidelity.json"
MAX_TARGETS = 64  # answer tokens scored per example (llama.cpp scores them one by one)
KEPT_WARN = 0.5  # below: the export's loss is closer to the base's than to the adapters'
MIN_GAIN = 0.05  # nats: below, "kept" would be a ratio of rounding noise (1 step: 0.01)
SPLIT_ON = "A: "  # text data: the greedy answer starts after this (as macft eval's default)
MARGIN_TOKENS = 128  # room in llama.cpp's context for a greedy answer past the prompt


@dataclass
class Sample:
    """The check's examples: answer tokens to score, and prompts to answer greedily."""

    examples: list[Example]
    cases: list  # heldout.Case, one per example that has a prompt and an answer
    source: str  # where they came from, for the user


@dataclass
class Side:
    """One model's view of the sample."""

    logps: list[np.ndarray]  # log-probability of each answer token, per example
    tops: list[np.ndarray]  # its own most likely token at each answer position
    answers: list[str]  # greedy answers, one per case

    @property
    def loss(self) -> float:
        return float(-np.concatenate(self.logps).mean())


def _cut(ex: Example) -> Example:
    """The last MAX_TARGETS answer tokens: more add time, not evidence (llama.cpp scores one
    token per request), and a text line's answer is at its end."""
    where = np.flatnonzero(ex.mask)
    if len(where) <= MAX_TARGETS:
        return ex
    mask = ex.mask.copy()
    mask[: where[-MAX_TARGETS]] = False
    return Example(ex.ids, mask)


def sample(run: RunDir, tokenizer, n: int, data: str | None = None) -> Sample:
    """n examples the run held out (its training lines when it held none), tokenized as
    training tokenized them; `data` (a .jsonl file or folder) replaces the run's own."""
    recipe = run.recipe() if run.recipe_path.is_file() else {}
    d, t = recipe.get("data") or {}, recipe.get("train") or {}
    path = data or d.get("path")
    fraction = 0.0 if data else d.get("valid_fraction", DataConfig.valid_fraction)
    records, fmt, source = held_out_records(path, fraction, t.get("seed", TrainConfig.seed))
    source = f"--check-data {data}" if data else source
    if fmt == "preference":  # the chosen answers: what preference tuning moved towards
        records, fmt = chosen_records(records)
    records = records[:n]
    max_len, system = d.get("max_seq_length", DataConfig.max_seq_length), d.get("system")
    examples = [_cut(ex) for ex in loss_examples(records, fmt, tokenizer, max_len, system)]
    cases = [make_case(i, r, fmt, tokenizer, SPLIT_ON, system) for i, r in enumerate(records, 1)]
    cases = [c for c in cases if c is not None and c.reference]
    return Sample(examples, cases, f"{len(examples)} examples, {source}")


def _mlx_scores(model, ex: Example) -> tuple[np.ndarray, np.ndarray]:
    targets = np.flatnonzero(ex.mask)
    logits = model(mx.array(ex.ids[None]))[0].astype(mx.float32)
    logits = logits[mx.array(targets - 1)]
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    logp = np.array(logp)
    return logp[np.arange(len(targets)), ex.ids[targets]], logp.argmax(-1)


def mlx_side(model, tokenizer, s: Sample, lora: bool = True, answers: bool = True) -> Side:
    """A model in MLX (LoRA off with lora=False, as the base); answers=False skips greedy."""
    was_training = model.training
    model.eval()
    try:
        with contextlib.nullcontext() if lora else lora_disabled(model):
            scores = [_mlx_scores(model, ex) for ex in s.examples]
        said = [generate(model, tokenizer, c, lora) for c in s.cases] if answers else []
    finally:
        model.train(was_training)
    return Side([a for a, _ in scores], [b for _, b in scores], said)


def llamacpp_side(llama, tokenizer, s: Sample) -> Side:
    """A GGUF as llama.cpp runs it (macft.export.llamacpp.LlamaCpp)."""
    logps, tops = [], []
    for ex in s.examples:
        ids = ex.ids.tolist()
        first = int(np.flatnonzero(ex.mask)[0])
        lp, top = llama.score(ids[: int(np.flatnonzero(ex.mask)[-1]) + 1], first)
        keep = ex.mask[first:][: len(lp)]  # answer tokens only, not a turn's template between
        logps.append(np.array(lp)[keep])
        tops.append(np.array(top)[keep])
    answers, eos = [], set(tokenizer.eos_token_ids)
    for c in s.cases:
        ids = llama.greedy(c.prompt_ids, answer_budget(tokenizer, c))
        # llama.cpp hands back the end-of-turn token it stopped at; mlx_lm does not
        ids = ids[: next((i for i, t in enumerate(ids) if t in eos), len(ids))]
        answers.append(finish_answer(tokenizer.decode(ids), c))
    return Side(logps, tops, answers)


def compare(export: Side, adapters: Side, base: Side) -> dict:
    """How close the export is to the adapters, and how much of their gain it kept."""
    same = sum(int((a == b).sum()) for a, b in zip(export.tops, adapters.tops, strict=True))
    positions = sum(len(a) for a in adapters.tops)
    gain = base.loss - adapters.loss
    finite = math.isfinite(export.loss)  # f16 can overflow a model's activations: NaN, inf
    kept = (base.loss - export.loss) / gain if gain >= MIN_GAIN and finite else None
    greedy = sum(a == b for a, b in zip(export.answers, adapters.answers, strict=True))
    return {
        "next_token_agreement": same / max(positions, 1),
        "positions": positions,
        "loss": {"export": export.loss, "adapters": adapters.loss, "base": base.loss},
        "kept": kept,
        "greedy_same": greedy,
        "greedy_compared": len(adapters.answers),
        "finite": finite,
        "lost": not finite or (kept is not None and kept < KEPT_WARN),
    }


def summary_line(name: str, r: dict) -> str:
    """One line: 'net-q4_k_m.gguf: 97% of next tokens agree with the adapters, loss ...'."""
    loss = r["loss"]
    kept = "" if r["kept"] is None else f", keeps {r['kept']:.0%} of the gain over the base"
    greedy = (
        f"; {r['greedy_same']}/{r['greedy_compared']} greedy answers the same"
        if r["greedy_compared"]
        else ""
    )
    return (
        f"{name}: {r['next_token_agreement']:.0%} of next tokens agree with the adapters, "
        f"loss {loss['export']:.3f} vs {loss['adapters']:.3f} (base {loss['base']:.3f}){kept}"
        f"{greedy}"
    )


def advice(kind: str, r: dict, plan: dict, merged_into: str) -> list[str]:
    """What to try when an export lost the fine-tune, most likely cause first."""
    tips = []
    if not r.get("finite", True) and plan.get("dtype") == "f16":
        tips.append("--dtype bf16 (float16 overflows this model's activations: NaN or inf)")
    if kind == "gguf" and plan.get("gguf") not in ("f16", "bf16", "f32", "q8_0"):
        tips.append("--quant q8_0 (re-quantizing to 4 bits rounds away small changes)")
        tips.append(
            "--adapter-only --gguf: the adapters kept in f16 beside a 4-bit base GGUF "
            "(llama.cpp --lora, Ollama ADAPTER)"
        )
    if kind == "mlx" and plan.get("quantize") == 4:
        tips.append("--quantize 8, or no --quantize")
    if merged_into == "quantized":
        tips.append("--base-weights FOLDER with the base's full-precision weights")
    tips.append("a higher lora.rank or more training, so the change outlives rounding")
    return tips


def warning(name: str, r: dict, tips: list[str]) -> str:
    loss = r["loss"]
    if not r["finite"]:
        return (
            f"{name} lost the fine-tune: its held-out loss is {loss['export']} (adapters "
            f"{loss['adapters']:.3f}); try {'; or '.join(tips)}"
        )
    return (
        f"{name} lost much of what the adapters learned: it keeps {r['kept']:.0%} of their "
        f"gain over the base (loss {loss['export']:.3f}; adapters {loss['adapters']:.3f}, "
        f"base {loss['base']:.3f}); try {'; or '.join(tips)}"
    )


def entry(kind: str, r: dict, s: Sample | None, checkpoint: str | None, tips: list[str]) -> dict:
    return {
        "kind": kind,
        **r,
        "examples": len(s.examples) if s else 0,
        "source": s.source if s else "the adapters' tensors",
        "checkpoint": checkpoint or "final",
        "checked": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "advice": tips if r["lost"] else [],
    }


def read(folder: Path) -> dict:
    """fidelity.json of an export folder: {file name: entry}; {} when there is none."""
    try:
        data = json.loads((Path(folder) / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    exports = data.get("exports") if isinstance(data, dict) else None
    return {k: v for k, v in (exports or {}).items() if isinstance(v, dict)}


def merged(folder: Path, entries: dict, rewritten: list[str]) -> str:
    """fidelity.json's new text: these entries, and the earlier ones of files this export
    left alone (an entry of a file rewritten without a check would describe the old file)."""
    old = {
        k: v for k, v in read(folder).items() if k not in rewritten and (Path(folder) / k).exists()
    }
    return json_text({"exports": dict(sorted({**old, **entries}.items()))}, indent=2) + "\n"


def release() -> None:
    """After the caller dropped a model: give its memory back before the next one loads (two
    at once may not fit a Mac's memory)."""
    gc.collect()
    mx.clear_cache()


@dataclass
class Reference:
    """The run's base + adapters (and the base alone) on the sample, computed before the
    export is written: the yardstick every export is held against."""

    sample: Sample | None  # None: only a PEFT folder to check, nothing to score
    adapters: Side | None
    base: Side | None
    tokenizer: object
    checkpoint: str | None
    weights: dict  # the adapters as saved, mlx-lm's names: the PEFT check's reference
    scale: float


def reference(
    run: RunDir, checkpoint: str | None, n: int, data: str | None, score: bool = True
) -> Reference:
    """Load the run as chat does, score the sample with and without its adapters, let go.
    score=False: the adapters' tensors alone (all a PEFT folder is checked against)."""
    from macft.runs.model import load_run_model, read_adapters

    ra = read_adapters(run, None, checkpoint)
    if not score:
        return Reference(None, None, None, None, checkpoint, ra.weights, ra.scale)
    cm = load_run_model(str(run.path), None, checkpoint)
    s = sample(run, cm.tokenizer, n, data)
    if not s.examples:
        raise MacftError(f"{s.source}: no example keeps an answer token; give --check-data FILE")
    adapters = mlx_side(cm.model, cm.tokenizer, s, lora=True)
    base = mlx_side(cm.model, cm.tokenizer, s, lora=False, answers=False)
    tokenizer = cm.tokenizer
    del cm
    release()
    return Reference(s, adapters, base, tokenizer, checkpoint, ra.weights, ra.scale)


# PEFT's tensor names -> the adapters' own, and whether PEFT stores the matrix transposed
PEFT_NAMES = {
    ".lora_A.weight": (".lora_a", True),
    ".lora_B.weight": (".lora_b", True),
    ".lora_magnitude_vector": (".m", False),
}


def peft_result(folder: Path, ref: Reference) -> dict:
    """A PEFT folder read back by PEFT's rules (names, lora_A/B layouts, lora_alpha / r):
    does it give back the run's adapters exactly?"""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    tensors = mx.load(str(folder / "adapter_model.safetensors"))
    ours = {}
    for name, value in tensors.items():
        key = name.removeprefix(PREFIX)
        for suffix, (theirs, transpose) in PEFT_NAMES.items():
            if key.endswith(suffix):
                ours[key.removesuffix(suffix) + theirs] = value.T if transpose else value
    missing = sorted(set(ref.weights) - set(ours))
    diff = max(
        (float(mx.abs(ours[k] - v).max()) for k, v in ref.weights.items() if k in ours),
        default=0.0,
    )
    scale = config["lora_alpha"] / config["r"]
    same = not missing and diff == 0.0 and abs(scale - ref.scale) < 1e-6
    return {"tensors": len(tensors), "missing": len(missing), "max_abs_diff": diff,
            "scale": scale, "adapters_scale": ref.scale, "exact": same, "lost": not same}  # fmt: skip


def peft_line(name: str, r: dict) -> str:
    if r["exact"]:
        return (
            f"{name}: its {r['tensors']} tensors and lora_alpha / r = {r['scale']:g} give back "
            "the adapters exactly"
        )
    return (
        f"{name} does not give back the adapters: {r['missing']} missing, largest difference "
        f"{r['max_abs_diff']:.3g}, scale {r['scale']:g} vs {r['adapters_scale']:g}"
    )


def export_side(kind: str, path: Path, ref: Reference, gguf_base: str | None) -> Side:
    """Load one export as its consumer does and score the sample with it."""
    if kind in ("mlx", "hf"):  # mlx_lm reads a Hugging Face folder too
        import mlx_lm

        # mlx_lm globs the folder's path: a name with [ or * in it finds no weights, so it
        # is read through a link of a plain name
        with tempfile.TemporaryDirectory() as tmp:
            link = Path(tmp) / "export"
            link.symlink_to(path.resolve(), target_is_directory=True)
            model, tokenizer = mlx_lm.load(str(link))
        try:
            return mlx_side(model, tokenizer, ref.sample)
        finally:
            del model
            release()
    from macft.export.llamacpp import LlamaCpp

    longest = max(len(ex.ids) for ex in ref.sample.examples)
    longest = max([longest, *(len(c.prompt_ids) for c in ref.sample.cases)])
    n_ctx = 256 * (1 + (longest + MARGIN_TOKENS) // 256)
    if kind == "adapter_gguf":
        llama = LlamaCpp(Path(gguf_base), lora=path, n_ctx=n_ctx)
    else:
        llama = LlamaCpp(path, n_ctx=n_ctx)
    try:
        return llamacpp_side(llama, ref.tokenizer, ref.sample)
    finally:
        llama.close()


def prepare(
    run: RunDir, checkpoint, n: int | None, data: str | None, kinds, console
) -> Reference | None:
    """The reference for exports of these kinds, or None (told why) when the check is off or
    cannot run: the export itself goes ahead either way."""
    if not n:
        return None
    score = bool(set(kinds) - {"peft", "modelfile"})
    try:
        with console.status(f"scoring {n} held-out examples with the adapters and the base ..."):
            return reference(run, checkpoint, n, data, score)
    except MacftError as e:
        console.print(
            f"[yellow]note:[/] no fidelity check: {escape(str(e))} (--check-data FILE checks on "
            "other data; --no-check skips it)"
        )
        return None


def check_exports(out: Path, written: dict, ref: Reference, plan: dict, merged_into: str,
                  gguf_base: str | None, console) -> dict:  # fmt: skip
    """Score each written export ({kind: file name}) against the reference, say how close it
    is, warn where the fine-tune was lost; the fidelity.json entries."""
    entries = {}
    for kind, name in written.items():
        if kind == "modelfile":
            continue
        if kind == "adapter_gguf" and gguf_base is None:
            console.print(f"note: {escape(name)} not checked: llama.cpp needs the base as a GGUF")
            continue
        try:
            with console.status(f"checking {escape(name)} against the adapters ..."):
                if kind == "peft":
                    r = peft_result(out / name, ref)
                else:
                    side = export_side(kind, out / name, ref, gguf_base)
                    r = compare(side, ref.adapters, ref.base)
        except MacftError as e:
            console.print(f"[yellow]note:[/] {escape(name)} not checked: {escape(str(e))}")
            continue
        except Exception as e:  # the export is written and good: a failed check must not hide it
            why = f"{type(e).__name__}: {e}"
            console.print(f"[yellow]note:[/] {escape(name)} not checked ({escape(why)})")
            continue
        tips = advice(kind, r, plan, merged_into)
        entries[name] = entry(kind, r, ref.sample, ref.checkpoint, tips)
        line = peft_line(name, r) if kind == "peft" else summary_line(name, r)
        console.print(escape(f"fidelity: {line}"), highlight=False, soft_wrap=True)
        if r["lost"] and kind != "peft":
            console.print(f"[bold yellow]warning:[/] {escape(warning(name, r, tips))}")
    return entries


def record(out: Path, entries: dict, rewritten: list[str]) -> None:
    """fidelity.json updated in place (atomically, listed as macft's in the export folder)."""
    from macft.export.staging import Staging

    if not entries and not (out / FILE).exists():
        return
    with Staging(out) as stage:
        stage.file(FILE).write_text(merged(out, entries, rewritten), encoding="utf-8")
        stage.commit()
