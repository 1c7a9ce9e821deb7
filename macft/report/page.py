"""The report command: one self-contained HTML page with a run's curves, eval tables and samples."""

import base64
import json
from html import escape
from pathlib import Path

from macft.atomic import atomic_write_text
from macft.errors import RunError
from macft.inference.scoring import overfitting
from macft.report.plots import curve_pngs
from macft.runs.folder import RunDir

CSS = """
body{font:15px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;
 margin:0 auto;max-width:1120px;padding:24px;color:#1d1d1f;background:#fff}
h1{font-size:26px;margin:0 0 4px} h2{font-size:19px;margin:32px 0 10px;border-bottom:1px solid #ddd}
.sub{color:#666;margin-bottom:16px}
table{border-collapse:collapse;margin:8px 0 16px} td,th{border:1px solid #ddd;padding:5px 10px}
th{background:#f5f5f7;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
.figs{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0} figcaption{color:#666;font-size:13px}
img{border:1px solid #eee;max-width:100%}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:8px 12px;margin:8px 0}
.ok{background:#eef8ee;border-left:4px solid #3a3;padding:8px 12px;margin:8px 0}
.good{color:#1a7f1a} .bad{color:#c0392b}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font:13px/1.4 ui-monospace,Menlo,monospace}
table.samples td{vertical-align:top;width:25%;text-align:left}
"""


def _num(x, digits: int = 4) -> str:
    """A figure for the page; anything else a hand-edited summary holds is shown as text."""
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if isinstance(x, float) else escape(str(x))


def _pct(before, after) -> str:
    if before is None or after is None or not before:
        return "-"
    return f"{100 * (after - before) / before:+.1f}%"


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="n">{c}</td>' if i else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f'<table class="{cls}"><tr>{th}</tr>{body}</table>'


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}


def _summary_section(run: RunDir, metrics: list[dict], over: dict) -> str:
    recipe = run.recipe() if run.recipe_path.is_file() else {}
    state = run.state
    train = [r["train_loss"] for r in metrics if r.get("train_loss") is not None]
    vals = [(r["step"], r["val_loss"]) for r in metrics if r.get("val_loss") is not None]
    speed = [r["tokens_per_s"] for r in metrics if r.get("tokens_per_s")]
    memory = [r["peak_memory_gb"] for r in metrics if r.get("peak_memory_gb") is not None]
    rows = [
        ["base model", escape(str((recipe.get("model") or {}).get("path", "-")))],
        ["data", escape(str((recipe.get("data") or {}).get("path", "-")))],
        ["status", escape(f"{state.get('status', '-')} at step {state.get('step', '-')}")],
        ["final training loss", _num(train[-1] if train else None)],
        [
            "validation loss, first eval",
            _num(vals[0][1] if vals else None) + (f" (step {vals[0][0]})" if vals else ""),
        ],
        [
            "validation loss, last eval",
            _num(vals[-1][1] if vals else None) + (f" (step {vals[-1][0]})" if vals else ""),
        ],
        [
            "best validation loss",
            _num(over["best_val_loss"])
            + (
                f" (step {over['best_step']}, checkpoints/best)"
                if over["best_step"] is not None
                else ""
            ),
        ],
        ["mean throughput", f"{sum(speed) / len(speed):,.0f} tokens/s" if speed else "-"],
        ["peak memory", f"{max(memory):.2f} GB" if memory else "-"],
    ]
    html = "<h2>Training</h2>" + _table(["", "value"], rows)
    if over["overfitting"]:
        a, z = over["window_steps"]
        html += (
            f'<div class="warn"><b>Overfitting:</b> from step {a} to {z} the validation loss rose '
            f"{over['val_change']:+.4f} while the training loss fell {over['train_change']:+.4f}. "
            f"The best adapters (step {over['best_step']}) are in <code>checkpoints/best</code>.</div>"
        )
    elif over["evals"] >= 2:
        html += '<div class="ok">No overfitting signal: validation loss did not rise while training loss fell over the last evaluations.</div>'
    return html


def _figures(metrics: list[dict], best_step) -> str:
    figs = curve_pngs(metrics, best_step)
    if not figs:
        return "<h2>Curves</h2><p>No metrics yet.</p>"
    items = "".join(
        f'<figure><img alt="{escape(cap)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}"><figcaption>{escape(cap)}</figcaption></figure>'
        for cap, png in figs
    )
    return f'<h2>Curves</h2><div class="figs">{items}</div>'


def _eval_table(s: dict) -> str:
    b, f = s["loss"]["base"], s["loss"]["fine_tune"]
    rows = [
        ["held-out loss", _num(b["loss"]), _num(f["loss"]), _pct(b["loss"], f["loss"])],
        [
            "perplexity",
            _num(b["perplexity"]),
            _num(f["perplexity"]),
            _pct(b["perplexity"], f["perplexity"]),
        ],
    ]
    g = s.get("generation")
    if g:
        for m in ("exact", "contains", "f1"):
            bb, ff = g["base"][m], g["fine_tune"][m]
            cls = "good" if ff > bb else "bad" if ff < bb else ""
            rows.append(
                [
                    f"{escape(m)} ({_num(g['examples'])} answers)",
                    f"{bb:.1%}",
                    f"{ff:.1%}",
                    f'<span class="{cls}">{100 * (ff - bb):+.1f} pts</span>',
                ]
            )
    p = s.get("preference")
    if p:  # preference pairs: how often each model finds the chosen answer more likely
        bb, ff = p["base"]["accuracy"], p["fine_tune"]["accuracy"]
        rows.append(
            [f"chosen more likely ({_num(p['pairs'])} pairs)", f"{bb:.1%}", f"{ff:.1%}",
             f"{100 * (ff - bb):+.1f} pts"]
        )  # fmt: skip
        rows.append(
            ["reward accuracy", "-", f"{p['fine_tune']['reward_accuracy']:.1%}", ""]
        )  # fmt: skip
    fg = s["forgetting"]
    cls = "bad" if fg["warning"] else ""
    rows.append(
        [
            "general-English perplexity",
            _num(fg["base_perplexity"]),
            _num(fg["fine_tune_perplexity"]),
            f'<span class="{cls}">{fg["change_pct"]:+.1f}%</span>',
        ]
    )
    title = (
        f"{escape(str(s['data']))}: {_num(s['loss']['examples'])} examples "
        f"({escape(str(s['format']))}), adapters: {escape(str(s['checkpoint']))}"
    )
    html = f"<h3>{title}</h3>" + _table(["", "base", "fine-tune", "change"], rows, "eval")
    if fg["warning"]:
        html += (
            f'<div class="warn"><b>Forgetting:</b> perplexity on general English grew '
            f"{fg['change_pct']:.1f}% (threshold {fg['threshold_pct']:g}%).</div>"
        )
    return html


def _is_summary(s) -> bool:
    return isinstance(s, dict) and "loss" in s and "forgetting" in s


def _eval_section(run: RunDir, path: Path, s: dict) -> str:
    """One eval's tables and samples; a summary edited into other shapes is named, not fatal."""
    try:
        return _eval_table(s) + _samples(run, s)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError):
        return f"<p>{escape(path.name)}: not a summary macft eval wrote; left out.</p>"


def _pick_samples(rows: list[dict], n: int = 6) -> list[dict]:
    """Where the fine-tune fixed the base first, then its failures, then the rest."""
    fixed = [r for r in rows if r["fine_tune"]["exact"] > r["base"]["exact"]]
    failed = [r for r in rows if not r["fine_tune"]["exact"]]
    picked = fixed[: n // 2] + failed[: n // 3]
    picked += [r for r in rows if r not in picked][: n - len(picked)]
    return sorted(picked[:n], key=lambda r: r["line"])


def _mark(side: dict) -> str:
    return (
        '<span class="good">✓ exact</span>'
        if side["exact"]
        else f'<span class="bad">✗</span> F1 {side["f1"]:.2f}'
    )


def _samples(run: RunDir, s: dict) -> str:
    g = s.get("generation")
    path = run.path / g["per_example"] if g else None
    if path is None or not path.is_file():
        return ""
    rows = [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    body = [
        [
            f"<pre>{escape(r['prompt'][-600:])}</pre>",
            f"<pre>{escape(r['reference'])}</pre>",
            f"<pre>{escape(r['base']['answer'])}</pre>{_mark(r['base'])}",
            f"<pre>{escape(r['fine_tune']['answer'])}</pre>{_mark(r['fine_tune'])}",
        ]
        for r in _pick_samples(rows)
    ]
    return f"<h3>Sample answers ({escape(g['per_example'])}, greedy)</h3>" + _table(
        ["prompt (end)", "reference", "base", "fine-tune"], body, "samples"
    )


def _export_section(run: RunDir) -> str:
    """What `macft fuse`'s fidelity check measured for each export in RUN/export."""
    from macft.export.fidelity import read  # MLX comes with it: only when a report is made

    checks = read(run.path / "export")
    if not checks:
        return ""
    rows, warns = [], []
    for name, e in checks.items():
        loss = e.get("loss") or {}
        if e.get("kind") == "peft":
            rows.append([escape(name), "peft", "exact" if e.get("exact") else "differs",
                         "-", "-", "-", "-", "-"])  # fmt: skip
        else:
            kept = e.get("kept")
            rows.append([
                escape(name), escape(str(e.get("kind"))),
                f"{e.get('next_token_agreement', 0):.0%}",
                _num(loss.get("export")), _num(loss.get("adapters")), _num(loss.get("base")),
                "-" if kept is None else f"{kept:.0%}",
                f"{e.get('greedy_same', 0)}/{e.get('greedy_compared', 0)}",
            ])  # fmt: skip
        if e.get("lost"):
            tips = "; or ".join(e.get("advice") or [])
            warns.append(f"<b>{escape(name)}</b> lost much of what the adapters learned"
                         + (f"; try {escape(tips)}" if tips else ""))  # fmt: skip
    head = ["export", "kind", "next tokens agree", "loss", "adapters' loss", "base's loss",
            "gain kept", "greedy answers the same"]  # fmt: skip
    first = next(iter(checks.values()))
    html = "<h2>Exports: do they keep the fine-tune?</h2>"
    html += f"<p>{escape(str(first.get('source', '')))}; checked by macft fuse.</p>"
    html += _table(head, rows)
    html += "".join(f'<div class="warn">{w}</div>' for w in warns)
    return html


def write_report(run_path: str, out: str | None = None) -> Path:
    p = Path(run_path).expanduser()
    run = RunDir(p)
    if not p.is_dir() or not run.holds_run():
        raise RunError(f"{p}: no run there; give the --out folder of a macft train run")
    metrics = run.read_metrics()
    over = overfitting(metrics)
    summaries = sorted((p / "eval").glob("*.summary.json"), key=lambda f: f.stat().st_mtime)
    evals = [(f, s) for f, s in ((f, _read_json(f)) for f in summaries) if _is_summary(s)]
    parts = [
        f"<h1>macft report: {escape(p.name)}</h1>",
        f'<div class="sub">{escape(str(p.resolve()))}</div>',
        _summary_section(run, metrics, over),
        _figures(metrics, over["best_step"]),
        _export_section(run),
        "<h2>Evaluation: base vs fine-tune</h2>",
    ]
    if evals:
        for f, s in reversed(evals):  # newest first
            parts.append(_eval_section(run, f, s))
    else:
        parts.append(
            f"<p>No eval yet: run <code>macft eval {escape(str(p))} --data FILE</code>.</p>"
        )
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>macft report: {escape(p.name)}</title><style>{CSS}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )
    dest = Path(out).expanduser() if out else p / "report.html"
    atomic_write_text(dest, page)
    return dest
