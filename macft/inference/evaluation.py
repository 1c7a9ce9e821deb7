"""The eval command: base vs fine-tune loss, generated answers, forgetting and overfitting."""

import contextlib
import json
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler
from rich.console import Console
from rich.markup import escape

from macft import device
from macft.atomic import atomic_write_json, atomic_write_text
from macft.config.schema import DataConfig, TrainConfig, resolve_loss_chunk
from macft.console import Column, make_console, print_table
from macft.data.batches import make_pair_batch
from macft.data.dataset import prepare_pairs
from macft.data.heldout import (
    chosen_records,
    general_examples,
    load_eval_data,
    loss_examples,
    make_cases,
)
from macft.data.heldout import target_tokens as count_targets
from macft.errors import MacftError, RunError
from macft.inference.scoring import SCORERS, forgetting, overfitting, perplexity
from macft.lora.apply import lora_disabled
from macft.runs.folder import RunDir
from macft.runs.model import load_run_model
from macft.train.evaluate import evaluate
from macft.train.preference import row_logps

METRICS = ("loss", *SCORERS)
SIDES = ("base", "fine_tune")
MARGIN = 16  # generated tokens allowed beyond the reference's length


def parse_metrics(value: str) -> list[str]:
    """'exact,f1' -> the generation metrics asked for; 'loss' alone means no generation."""
    names = [v.strip().lower() for v in value.split(",") if v.strip()]
    if "all" in names:
        names = list(METRICS)
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise MacftError(
            f"--metric {value!r}: unknown {', '.join(bad) or '(empty)'}; use loss, exact, "
            "contains, f1 or all (comma-separated; loss and perplexity are always reported)"
        )
    return [n for n in SCORERS if n in names]


def open_run(path: str) -> RunDir:
    p = Path(path).expanduser()
    run = RunDir(p)
    if not p.is_dir():
        raise RunError(f"{p}: no such run folder; give the --out folder of a macft train run")
    if not run.holds_run():
        raise RunError(
            f"{p} holds no run (no recipe.yaml, adapters or checkpoints); "
            "give the --out folder of a macft train run"
        )
    return run


def side_losses(model, examples, batch_size: int, pad_id: int) -> dict:
    """Token-weighted mean loss and perplexity, LoRA off (base) and on (fine-tune)."""
    out = {}
    for side in SIDES:
        with lora_disabled(model) if side == "base" else contextlib.nullcontext():
            loss = evaluate(model, examples, batch_size, pad_id)
        out[side] = {"loss": loss, "perplexity": perplexity(loss)}
    return out


def pair_scores(model, pairs, batch_size: int, pad_id: int, beta: float) -> dict:
    """Preference pairs, base (LoRA off) and fine-tune: the share of pairs whose chosen answer
    is the more likely (summed log-probabilities) and the mean margin; for the fine-tune also
    DPO's implicit reward against the base as reference: its accuracy and mean margin."""
    chunk = resolve_loss_chunk("auto", device.mac_path())
    margins = {}
    was_training = model.training
    model.eval()
    try:
        for side in SIDES:
            with lora_disabled(model) if side == "base" else contextlib.nullcontext():
                parts = []
                for s in range(0, len(pairs), batch_size):
                    logps, _ = row_logps(
                        model, make_pair_batch(pairs[s : s + batch_size], pad_id), chunk
                    )
                    n = logps.shape[0] // 2
                    parts.append(logps[:n] - logps[n:])
                margins[side] = mx.concatenate(parts)
    finally:
        model.train(was_training)
    out = {
        side: {
            "accuracy": (m > 0).astype(mx.float32).mean().item(),
            "margin": m.mean().item(),
        }
        for side, m in margins.items()
    }
    reward = beta * (margins["fine_tune"] - margins["base"])
    out["fine_tune"]["reward_accuracy"] = (reward > 0).astype(mx.float32).mean().item()
    out["fine_tune"]["reward_margin"] = reward.mean().item()
    out["pairs"], out["beta"] = len(pairs), beta
    return out


def answer_budget(tokenizer, case) -> int:
    """How many tokens a greedy answer may take: the reference's length plus a margin."""
    return len(tokenizer.encode(case.reference, add_special_tokens=False)) + MARGIN


def finish_answer(text: str, case) -> str:
    """A generated answer as it is scored: stripped, and cut at a line break for one-line
    references (text data has no end-of-turn token)."""
    text = text.strip()
    return text.split("\n", 1)[0].strip() if case.one_line else text


def generate(model, tokenizer, case, lora: bool) -> str:
    """A greedy answer, bounded by answer_budget."""
    text, sampler = "", make_sampler(temp=0.0)
    with lora_disabled(model) if not lora else contextlib.nullcontext():
        for r in stream_generate(
            model, tokenizer, case.prompt_ids, max_tokens=answer_budget(tokenizer, case),
            sampler=sampler,
        ):  # fmt: skip
            text += r.text
            if case.one_line and "\n" in text.lstrip():
                break  # the rest would be cut anyway
    return finish_answer(text, case)


def score_cases(cm, cases, scorers, case_sensitive: bool, console: Console) -> list[dict]:
    rows = []
    with console.status("generating ...") as status:
        for n, case in enumerate(cases, 1):
            status.update(f"generating answers: {n}/{len(cases)}")
            row = {"line": case.index, "prompt": case.prompt, "reference": case.reference}
            for side in SIDES:
                answer = generate(cm.model, cm.tokenizer, case, side == "fine_tune")
                scores = {m: f(answer, case.reference, case_sensitive) for m, f in scorers.items()}
                row[side] = {"answer": answer, **scores}
            rows.append(row)
    return rows


def mean_scores(rows: list[dict], scorers) -> dict:
    return {side: {m: sum(r[side][m] for r in rows) / len(rows) for m in scorers} for side in SIDES}


def run_eval(
    run_path: str,
    data: str,
    metric: str = "loss",
    limit: int | None = None,
    split_on: str = "A: ",
    case_sensitive: bool = False,
    forget_threshold: float = 10.0,
    checkpoint: str | None = None,
    model: str | None = None,
    console: Console | None = None,
) -> dict:
    console = console or make_console()
    wanted = parse_metrics(metric)
    run = open_run(run_path)
    records, fmt = load_eval_data(data, limit)
    pair_records = None
    if fmt == "preference":  # loss and answers on the chosen side, and the pairs compared
        pair_records = records
        records, fmt = chosen_records(pair_records)
    recipe = run.recipe() if run.recipe_path.is_file() else {}
    d, t = recipe.get("data") or {}, recipe.get("train") or {}
    max_len = d.get("max_seq_length", DataConfig.max_seq_length)
    system, batch_size = d.get("system"), t.get("batch_size", TrainConfig.batch_size)

    device.set_wired_limit()
    with console.status(f"loading {escape(str(run.path))} ..."):
        cm = load_run_model(str(run.path), model, checkpoint)
    for note in cm.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    started = time.time()
    examples = loss_examples(records, fmt, cm.tokenizer, max_len, system)
    if not examples:
        raise MacftError(f"{data}: no example keeps a target token within {max_len} tokens")
    held, forgot = losses(cm, examples, batch_size, max_len, forget_threshold, console)
    summary = {
        "data": str(data),
        "format": "preference" if pair_records is not None else fmt,
        "lines": len(records),
        "limit": limit,
        "adapters": str(cm.adapters),
        "checkpoint": checkpoint or "final",
        "loss": held,
        "forgetting": forgot,
        "overfitting": overfitting(run.read_metrics()),
        "generation": None,  # answers scored, when --metric asks for them
        "preference": None,  # preference pairs: base and fine-tune compared on each pair
    }
    if pair_records is not None:
        tok = cm.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        numbered = [(data, i, r) for i, r in enumerate(pair_records, 1)]
        counts = {"truncated": 0, "dropped": 0, "longest": 0}
        pairs = prepare_pairs(numbered, tok, max_len, system, counts)
        beta = t.get("beta", TrainConfig.beta)
        with console.status(f"comparing {len(pairs)} preference pairs ..."):
            summary["preference"] = pair_scores(cm.model, pairs, batch_size, pad_id, beta)
    out_dir = run.path / "eval"
    out_dir.mkdir(exist_ok=True)
    stem = Path(data).stem + (f"@{checkpoint}" if checkpoint else "")
    per_example = out_dir / f"{stem}.jsonl"
    if wanted:
        cases, skipped = make_cases(records, fmt, cm.tokenizer, split_on, system)
        rows = score_cases(cm, cases, SCORERS, case_sensitive, console)  # all: cheap once answered
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        atomic_write_text(per_example, text)
        summary["generation"] = {
            "metrics": wanted,
            "examples": len(rows),
            "skipped": skipped,
            "split_on": split_on if fmt == "text" else None,
            "case_sensitive": case_sensitive,
            "max_new_tokens": f"reference tokens + {MARGIN}",
            "per_example": str(per_example.relative_to(run.path)),
            **mean_scores(rows, SCORERS),
        }
    summary["seconds"] = round(time.time() - started, 1)
    summary_path = out_dir / f"{stem}.summary.json"
    atomic_write_json(summary_path, summary)
    print_summary(summary, console)
    saved = f"saved: {summary_path}" + (f"  answers: {per_example}" if wanted else "")
    console.print(escape(saved))
    return summary


def losses(cm, examples, batch_size: int, max_len: int, threshold: float, console):
    """(held-out loss of base and fine-tune, the forgetting check on general English)."""
    tok = cm.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with console.status(f"held-out loss on {len(examples)} examples ..."):
        held = side_losses(cm.model, examples, batch_size, pad_id)
    held["examples"], held["target_tokens"] = len(examples), count_targets(examples)
    general = general_examples(tok, max_len)
    with console.status(f"forgetting check on {len(general)} general paragraphs ..."):
        gen_loss = side_losses(cm.model, general, batch_size, pad_id)
    forgot = forgetting(
        gen_loss["base"]["perplexity"], gen_loss["fine_tune"]["perplexity"], threshold
    )
    forgot["paragraphs"] = len(general)
    return held, forgot


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _pct(before, after) -> str:
    if before is None or after is None or before == 0:
        return "-"
    return f"{100 * (after - before) / before:+.1f}%"


SUMMARY_COLUMNS = [Column(""), *(Column(h, right=True) for h in ("base", "fine-tune", "change"))]


def _versus(name: str, base, tuned) -> list[str]:
    return [name, _fmt(base), _fmt(tuned), _pct(base, tuned)]


def summary_rows(s: dict) -> list[list[str]]:
    """The eval table's rows, made from the summary that is saved and that --json prints."""
    b, f = s["loss"]["base"], s["loss"]["fine_tune"]
    rows = [
        _versus("held-out loss", b["loss"], f["loss"]),
        _versus("perplexity", b["perplexity"], f["perplexity"]),
    ]
    g = s.get("generation")
    for m in g["metrics"] if g else ():
        bb, ff = g["base"][m], g["fine_tune"][m]
        rows.append(
            [
                f"{m} ({g['examples']} answers)",
                f"{bb:.1%}",
                f"{ff:.1%}",
                f"{100 * (ff - bb):+.1f} pts",
            ]
        )
    p = s.get("preference")
    if p:
        b, f = p["base"], p["fine_tune"]
        n = p["pairs"]
        rows.append(
            [
                f"chosen more likely ({n} pairs)",
                f"{b['accuracy']:.1%}",
                f"{f['accuracy']:.1%}",
                f"{100 * (f['accuracy'] - b['accuracy']):+.1f} pts",
            ]
        )
        rows.append(_versus("log-prob margin", b["margin"], f["margin"]))
        rows.append(
            [f"reward accuracy (beta {p['beta']:g})", "-", f"{f['reward_accuracy']:.1%}", ""]
        )
        rows.append(["reward margin", "-", _fmt(f["reward_margin"]), ""])
    fg = s["forgetting"]
    ppl = _fmt(fg["base_perplexity"]), _fmt(fg["fine_tune_perplexity"])
    rows.append(["general-text perplexity", *ppl, f"{fg['change_pct']:+.1f}%"])
    return rows


def print_summary(s: dict, console: Console) -> None:
    title = f"{s['data']} ({s['loss']['examples']} examples, checkpoint {s['checkpoint']})"
    print_table(console, SUMMARY_COLUMNS, summary_rows(s), title)
    fg = s["forgetting"]
    if fg["warning"]:
        console.print(
            f"[yellow]warning:[/] perplexity on general English grew {fg['change_pct']:.1f}% "
            f"(> {fg['threshold_pct']:g}%): the fine-tune is forgetting; try fewer steps, a lower "
            "learning rate or a smaller lora.rank, or mix general data into the training set"
        )
    o = s["overfitting"]
    if o["best_step"] is not None:
        console.print(
            f"best validation loss {o['best_val_loss']:.4f} at step {o['best_step']} (checkpoints/best)"
        )
    if o["overfitting"]:
        a, z = o["window_steps"]
        console.print(
            f"[yellow]warning:[/] overfitting: from step {a} to {z} validation loss rose "
            f"{o['val_change']:+.4f} while training loss fell {o['train_change']:+.4f}; "
            f"the best adapters are in checkpoints/best (step {o['best_step']}): "
            "eval them with --checkpoint best"
        )
