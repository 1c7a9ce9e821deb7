"""Each export output, written into a Staging area: MLX, HF, PEFT, GGUF, GGUF adapter, Modelfile."""

import json
import shlex
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from macft.atomic import human
from macft.console import Column, print_table
from macft.errors import ExportError, RunError
from macft.export import ollama
from macft.export.merge import DTYPES, REQUANT_GROUP, TORCH_DTYPES
from macft.export.mlx_folder import write_fused
from macft.export.staging import Staging
from macft.lora.apply import lora_layers
from macft.models import Base
from macft.models.catalog import ENTRIES, lookup
from macft.runs.folder import RunDir


class Steps:
    """A live rich bar per step on a terminal; one line per finished step elsewhere."""

    def __init__(self, console: Console):
        self.console = console
        self.live = console.is_terminal

    def run(self, label: str, work):
        """work(progress) -> result, with progress(done, total) to call as it goes."""
        start = time.monotonic()
        if not self.live:
            result = work(lambda done, total: None)
        else:
            columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=self.console, transient=True) as bar:
                task = bar.add_task(label, total=None)
                result = work(lambda done, total: bar.update(task, completed=done, total=total))
        seconds = time.monotonic() - start
        self.console.print(f"{label}: done in {seconds:.1f} s", highlight=False)
        return result, seconds


def base_model_id(model_path: str, source: dict) -> str:
    """What PEFT's base_model_name_or_path should say: an HF repo when macft knows it."""
    entry = lookup(model_path) if model_path else None
    if entry is None and source.get("kind") == "gguf":
        name = Path(source.get("path", "")).name
        entry = next((e for e in ENTRIES if e.pypi and e.pypi[2] == name), None)
    if entry is not None:
        return entry.hf_repo
    path = Path(source.get("path") or model_path)
    parts = path.parts
    for i, part in enumerate(parts[:-1]):  # an HF cache snapshot: models--org--name/snapshots/...
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    return str(path.resolve()) if path.exists() else str(model_path)


def adapter_config(cm, run: RunDir) -> dict:
    folder = Path(cm.adapters).parent
    for p in (folder / "adapter_config.json", run.config_path):
        if p.is_file():
            try:
                config = json.loads(p.read_text(encoding="utf-8"))
            except (ValueError, RecursionError):
                config = None
            if not isinstance(config, dict):
                raise RunError(f"{p}: not readable JSON; copy the one written with the adapters")
            return config
    raise RunError(f"{folder}: no adapter_config.json beside the adapters; the run is incomplete")


def adapter_base(cm, model_path: str) -> str | None:
    """What an ADAPTER Modelfile's FROM names: the GGUF or HF folder the run trained on."""
    if str(model_path).startswith("ollama:"):
        return str(model_path).removeprefix("ollama:")
    if cm.source.get("kind") in ("gguf", "hf") and cm.source.get("path"):
        return str(Path(cm.source["path"]).resolve())
    return None  # an MLX-quantized folder: Ollama cannot import it


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_peft_folder(stage: Staging, cm, run: RunDir, steps: Steps) -> dict:
    from macft.export.peft import write_peft

    tmp = stage.folder("peft")
    dropout = adapter_config(cm, run).get("lora_parameters", {}).get("dropout", 0.0)
    base_id = base_model_id(cm.base_path, cm.source)
    info, seconds = steps.run(
        "writing the PEFT folder", lambda p: write_peft(tmp, cm.model, base_id, dropout)
    )
    kind = "PEFT DoRA" if info["config"]["use_dora"] else "PEFT LoRA"
    size = _folder_size(tmp)
    return {
        "file": stage.out / "peft",
        "size": size,
        "type": f"{kind} r={info['config']['r']}, base {base_id}",
        "tensors": info["tensors"],
        "seconds": seconds,
    }


def _folder_output(stage: Staging, name: str, kind: str, label: str, work, steps: Steps) -> dict:
    """A folder output: work(folder, progress) -> tensor count, its summary row."""
    tmp = stage.folder(name)
    tensors, seconds = steps.run(label, lambda p: work(tmp, p))
    return {
        "file": stage.out / name,
        "size": _folder_size(tmp),
        "type": kind,
        "tensors": tensors,
        "seconds": seconds,
    }


def write_mlx(stage: Staging, cm, dtype: str, quantize: int | None, steps: Steps) -> dict:
    """The fused model as an MLX folder, written tensor by tensor in shards; the run's model
    is consumed (its last use)."""
    config = dict(cm.config)
    config["torch_dtype"] = TORCH_DTYPES[dtype]
    kind = f"MLX {dtype}"
    if quantize:
        kind = f"MLX {quantize}-bit (group {REQUANT_GROUP}, {dtype} scales)"
    base = Base(model=cm.model, tokenizer=cm.tokenizer, config=config, source=cm.source)
    return _folder_output(
        stage, "mlx", kind, "merging and writing the MLX folder",
        lambda tmp, p: write_fused(tmp, base, DTYPES[dtype], quantize, p, consume=True), steps,
    )  # fmt: skip


def write_hf(stage: Staging, cm, dtype: str, steps: Steps) -> dict:
    """The fused model as a Hugging Face folder (transformers, vLLM, the Hub); the run's model
    is consumed (its last use)."""
    from macft.export.hf_folder import write_hf_folder

    return _folder_output(
        stage, "hf", f"Hugging Face {dtype} ({cm.config.get('model_type')})",
        "merging and writing the Hugging Face folder",
        lambda tmp, p: write_hf_folder(tmp, cm, dtype, p), steps,
    )  # fmt: skip


def write_gguf(stage: Staging, cm, fname: str, quant: str, steps: Steps) -> dict:
    from macft.export.gguf.writer import export_gguf

    tmp = stage.file(fname)
    summary, seconds = steps.run(
        f"writing GGUF {quant}",
        lambda p: export_gguf(
            cm.model, cm.config, cm.tokenizer, cm.source, tmp, quant, p, consume=True
        ),
    )
    summary = summary or {}
    return {
        "file": stage.out / fname,
        "size": tmp.stat().st_size,
        "type": f"GGUF {quant.upper()} ({summary.get('arch', '?')})",
        "tensors": summary.get("tensors", "?"),
        "seconds": seconds,
    }


def write_adapter_gguf(stage: Staging, cm, run: RunDir, fname: str, steps: Steps) -> dict:
    from macft.export.gguf.adapter import export_adapter_gguf

    if any(m.dora for _, m in lora_layers(cm.model)):
        raise ExportError(
            "DoRA adapters cannot be a GGUF LoRA (llama.cpp and Ollama have no DoRA); "
            f"export the fused model instead: macft fuse {run.path} --gguf"
        )
    tmp = stage.file(fname)
    config = adapter_config(cm, run)
    summary, seconds = steps.run(
        "writing the GGUF adapter",
        lambda p: export_adapter_gguf(cm.model, cm.config, config, tmp, cm.source, p),
    )
    summary = summary or {}
    n = summary.get("tensors", 2 * len(lora_layers(cm.model)))
    return {
        "file": stage.out / fname,
        "size": tmp.stat().st_size,
        "type": "GGUF LoRA adapter",
        "tensors": n,
        "seconds": seconds,
    }


def write_modelfile(
    stage: Staging, cm, from_: str | None, adapter: str | None, console
) -> dict | None:
    if from_ is None:
        console.print(
            "[yellow]note:[/] no Modelfile: the run's base is an MLX-quantized folder, which Ollama "
            "cannot import; use the GGUF adapter with llama.cpp (--lora) on a GGUF of that base"
        )
        return None
    fmt = ollama.detect_format(cm.tokenizer, cm.base_path, cm.source)
    if fmt is None:
        console.print(
            "[yellow]note:[/] chat format not recognised: the Modelfile has no TEMPLATE, so "
            "Ollama guesses one from the GGUF's chat template"
        )
    system = cm.system or ollama.default_system(cm.tokenizer, fmt)
    start = time.monotonic()
    tmp = stage.file("Modelfile")
    tmp.write_text(ollama.modelfile(from_, fmt, system, adapter), encoding="utf-8")
    kind = f"Ollama Modelfile ({fmt or 'no template'}{', system' if system else ''})"
    return {
        "file": stage.out / "Modelfile",
        "size": tmp.stat().st_size,
        "type": kind,
        "tensors": "",
        "seconds": time.monotonic() - start,
    }


SUMMARY_COLUMNS = [Column("file"), Column("size", right=True), Column("type"),
                   Column("tensors", right=True), Column("time", right=True)]  # fmt: skip


def print_summary(console: Console, rows: list[dict], name: str, gguf: bool) -> None:
    folder = rows[0]["file"].parent if rows else None
    cells = [
        [
            r["file"].name + ("/" if r["file"].is_dir() else ""),
            human(r["size"]),
            r["type"],
            str(r["tensors"]),
            f"{r['seconds']:.1f} s",
        ]
        for r in rows
    ]
    print_table(console, SUMMARY_COLUMNS, cells, f"export in {folder}")
    by_name = {r["file"].name: r["file"] for r in rows}
    if gguf and "Modelfile" in by_name:
        console.print("import into Ollama with:")
        console.print(
            escape(ollama.create_command(name, by_name["Modelfile"].resolve())),
            highlight=False,
            soft_wrap=True,
        )
    if "mlx" in by_name:
        folder = by_name["mlx"]
        console.print(
            escape(
                f"chat with it: macft chat --model {shlex.quote(str(folder))}   "
                f"(mlx_lm.load({str(folder)!r}) loads it too)"
            ),  # fmt: skip
            highlight=False,
            soft_wrap=True,
        )
    if "hf" in by_name:
        console.print(
            escape(f"transformers: AutoModelForCausalLM.from_pretrained({str(by_name['hf'])!r})"),
            highlight=False,
            soft_wrap=True,
        )
    if "peft" in by_name:
        console.print(
            escape(f"PEFT: PeftModel.from_pretrained(base_model, {str(by_name['peft'])!r})"),
            highlight=False,
            soft_wrap=True,
        )
