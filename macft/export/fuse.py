"""The fuse command: run folder -> base + adapters -> fused MLX or HF folder, GGUF + Modelfile,
or PEFT."""

import json
from pathlib import Path

import mlx.core as mx
from rich.console import Console
from rich.markup import escape

from macft import device
from macft.console import make_console
from macft.errors import ExportError, ModelError, RunError
from macft.export import CHECK_EXAMPLES, fidelity, ollama
from macft.export.merge import DTYPES, REQUANT_GROUP, float_source, load_float_base
from macft.export.outputs import (
    Steps,
    adapter_base,
    print_summary,
    write_adapter_gguf,
    write_gguf,
    write_hf,
    write_mlx,
    write_modelfile,
    write_peft_folder,
)
from macft.export.staging import Staging, check_free_space, check_replaceable
from macft.lora.apply import lora_layers
from macft.models import Base, load_base, resolve_model_path
from macft.models.quant import parameter_count
from macft.runs.folder import RunDir
from macft.runs.model import load_run_model

# Bytes per weight in each GGUF type (Q4_K_M mixes Q4_K, 4.5 bits, with some Q6_K, 6.6 bits).
GGUF_BPW = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_k_m": 0.66}
MARGIN = 64 * 2**20  # tokenizer files, metadata, headers
EXPORT_CACHE_BYTES = 64 * 2**20


def _check_options(gguf, quant, adapter_only, peft, quantize, dtype) -> None:
    if adapter_only and not (gguf or peft):
        raise ExportError(
            "--adapter-only needs --gguf (a GGUF LoRA for llama.cpp / Ollama ADAPTER) or --peft; "
            "the run's adapters.safetensors already is the MLX adapter"
        )
    if quant is not None and not gguf:
        raise ExportError("--quant sets the GGUF type; add --gguf (or use --quantize for MLX)")
    if adapter_only and (quant is not None or quantize or dtype):
        raise ExportError(
            "--adapter-only writes the adapters as they are; drop --quant/--quantize/--dtype"
        )
    if quantize and gguf:
        raise ExportError(
            "--quantize re-quantizes the MLX folder; for GGUF use --quant q8_0|q4_0|q4_k_m"
        )
    if quantize and peft:
        raise ExportError("--quantize is for the fused MLX folder; --peft writes adapters only")


def _check_hf(hf, gguf, quantize, adapter_only) -> None:
    if hf and gguf:
        raise ExportError("--hf and --gguf are two exports of the fused model; run fuse once each")
    if hf and quantize:
        raise ExportError(
            "--hf writes float weights (--dtype f16|bf16|f32); --quantize is for the MLX folder"
        )
    if hf and adapter_only:
        raise ExportError("--hf writes the fused model; for the adapters alone use --peft")


def _open_run(run_arg: str, base_weights: str | None) -> RunDir:
    run = RunDir(Path(run_arg).expanduser())
    if not run.path.is_dir() or not (run.holds_run() or run.config_path.is_file()):
        what = (
            "does not exist"
            if not run.path.exists()
            else "holds no run (no recipe.yaml, adapters or checkpoints)"
        )
        raise RunError(
            f"{run.path} {what}; macft fuse needs a run folder that macft train wrote adapters into"
        )
    if not run.recipe_path.is_file() and base_weights in (None, "quantized"):
        raise RunError(
            f"{run.path}: no recipe.yaml says which base these adapters belong to; "
            f"name it: macft fuse {run.path} --base-weights PATH"
        )
    return run


def default_dtype(quant: str, config: dict, float_src: dict) -> str:
    """f16, except where bf16 is safer: a bf16 source or GGUF type, and Gemma (f16 overflows)."""
    gemma = str(config.get("model_type", "")).startswith("gemma")
    if quant == "bf16" or gemma or float_src.get("dtype") == "bfloat16":
        return "bf16"
    return "f16"


def choose_base(run: RunDir, base_weights: str | None) -> tuple[str, Path | None]:
    """("float", folder) to merge into full-precision weights, or ("quantized", path or None)."""
    if base_weights == "quantized":
        return "quantized", None
    if base_weights:
        p = resolve_model_path(base_weights)
        return ("float" if float_source(p) else "quantized"), p
    try:
        source = json.loads(run.base_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        source = {}
    source = source if isinstance(source, dict) else {}
    if source.get("kind") == "hf" and float_source(Path(source.get("path", ""))):
        return "float", Path(source["path"])
    return "quantized", None


def _loader(mode: str, path: Path | None, run: RunDir):
    def load(base_path, model_cfg, origin) -> Base:
        if mode == "float":
            return load_float_base(path)
        kw = {k: model_cfg[k] for k in ("bits", "group_size") if k in model_cfg}
        try:  # kept quantized: each layer is dequantized as it is fused
            return load_base(str(path or base_path), compute="quantized", **kw)
        except ModelError as e:
            if origin is None:
                raise
            raise ModelError(
                f"{origin}: model.path {base_path} is not available: {e}. Fix it, or point at "
                f"a copy of that base: macft fuse {run.path} --base-weights PATH"
            ) from None

    return load


def _estimate(n_params: int, n_adapter: int, plan: dict) -> int:
    need = MARGIN
    if plan.get("mlx"):
        bits, dtype_bytes = plan.get("quantize"), plan["dtype_bytes"]
        per = bits / 8 + 2 * dtype_bytes / REQUANT_GROUP if bits else dtype_bytes
        need += n_params * per
    if plan.get("hf"):
        need += n_params * plan["dtype_bytes"]
    if plan.get("gguf"):
        need += n_params * GGUF_BPW[plan["gguf"]]
    need += n_adapter * 4 * (plan.get("peft", 0) + plan.get("adapter_gguf", 0))
    return int(need * 1.05)


def _merge_target(mode: str, path: Path | None, cm, layers, base_weights: str | None) -> str:
    if mode == "float":
        return f"the full-precision weights in {path} ({cm.source.get('dtype')})"
    bits = {m.linear.bits for _, m in layers if hasattr(m.linear, "bits")}
    what = f"{'/'.join(map(str, sorted(bits)))}-bit" if bits else "float"
    why = (
        "as --base-weights quantized asks"
        if base_weights == "quantized"
        else "no full-precision weights at hand; --base-weights FOLDER gives them"
    )
    return f"{cm.base_path}, {what} weights dequantized ({why})"


def run_fuse(
    run_arg: str,
    out: str | None = None,
    dtype: str | None = None,
    quantize: int | None = None,
    gguf: bool = False,
    quant: str | None = None,
    adapter_only: bool = False,
    peft: bool = False,
    checkpoint: str | None = None,
    base_weights: str | None = None,
    name: str | None = None,
    console: Console | None = None,
    force: bool = False,
    hf: bool = False,
    check: int | None = CHECK_EXAMPLES,
    check_data: str | None = None,
) -> list[dict]:
    console = console or make_console(soft_wrap=True)
    _check_options(gguf, quant, adapter_only, peft, quantize, dtype)
    _check_hf(hf, gguf, quantize, adapter_only)
    run = _open_run(run_arg, base_weights)
    name = ollama.check_name(name or ollama.default_name(run.path))
    out_dir = Path(out).expanduser() if out else run.path / "export"
    quant = quant or "f16"
    fused_wanted = not adapter_only and (gguf or hf or not peft)
    names = output_names(gguf, quant, adapter_only, peft, fused_wanted, name, hf)
    own = [*names.values(), fidelity.FILE]
    check_replaceable(out_dir, own, own=out is None, force=force)
    mode, path = choose_base(run, base_weights)
    console.print(f"[bold]macft fuse[/] {escape(str(run.path))} -> {escape(str(out_dir))}")
    # Loading and merging free one float matrix after another: MLX would keep each for reuse
    # (its buffer cache), and an export needs memory more than it needs the reuse.
    device.limit_cache(EXPORT_CACHE_BYTES)
    # The yardstick first, from the run as chat loads it, then let go: the export's own
    # model never shares memory with it.
    ref = fidelity.prepare(run, checkpoint, check, check_data, names, console)
    with console.status("loading the base and the adapters ..."):
        cm = load_run_model(
            str(run.path), str(path) if path else None, checkpoint, _loader(mode, path, run)
        )
    if gguf:
        from macft.export.gguf.layout import resolve

        resolve(cm.model, cm.config)  # an architecture GGUF cannot hold: say so before any work
    if hf:
        from macft.export.hf_folder import check_hf

        check_hf(cm.config)  # likewise for transformers
    for note in cm.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    layers = lora_layers(cm.model)
    console.print(
        f"adapters: {escape(str(cm.adapters))} ({len(layers)} LoRA layers"
        f"{', DoRA' if layers and layers[0][1].dora else ''})"
    )
    if fused_wanted:
        target = _merge_target(mode, path, cm, layers, base_weights)
        console.print(f"merging into: {escape(target)}")

    dtype = dtype or default_dtype(quant, cm.config, cm.source if mode == "float" else {})
    plan = {
        "mlx": fused_wanted and not gguf and not hf,
        "hf": fused_wanted and hf,
        "quantize": quantize,
        "dtype_bytes": mx.zeros((), DTYPES[dtype]).itemsize,
        "gguf": quant if gguf and fused_wanted else None,
        "peft": int(peft),
        "adapter_gguf": int(gguf and adapter_only),
        "dtype": dtype,
    }
    n_adapter = sum(m.lora_a.size + m.lora_b.size for _, m in layers)
    check_free_space(out_dir, _estimate(parameter_count(cm.model), n_adapter, plan))
    with Staging(out_dir) as stage:
        rows = _write(stage, cm, run, plan, dtype, names, Steps(console), console)
        stage.commit()
    gguf_base = cm.source.get("path") if cm.source.get("kind") == "gguf" else None
    del cm
    fidelity.release()
    print_summary(console, rows, name, gguf)
    entries = {}
    if ref is not None:
        entries = fidelity.check_exports(out_dir, names, ref, plan, mode, gguf_base, console)
    fidelity.record(out_dir, entries, list(names.values()))
    return rows


def output_names(gguf, quant, adapter_only, peft, fused, name: str, hf=False) -> dict[str, str]:
    """What an export writes in its folder, by kind: known before anything loads."""
    slug = name.split("/")[-1].split(":")[0]
    names = {"peft": "peft"} if peft else {}
    if gguf and adapter_only:
        names["adapter_gguf"] = f"{slug}-lora.gguf"
    if fused:
        folder = "hf" if hf else "mlx"
        names.update({"gguf": f"{slug}-{quant}.gguf"} if gguf else {folder: folder})
    if gguf:
        names["modelfile"] = "Modelfile"
    return names


def _write(stage: Staging, cm, run: RunDir, plan: dict, dtype: str, names: dict, steps, console):
    """Every output the plan asks for, into the staging area; their summary rows."""
    rows = []
    if plan["peft"]:
        rows.append(write_peft_folder(stage, cm, run, steps))
    modelfile_from = modelfile_adapter = None
    if plan["adapter_gguf"]:
        row = write_adapter_gguf(stage, cm, run, names["adapter_gguf"], steps)
        rows.append(row)
        modelfile_from = adapter_base(cm, cm.base_path)
        modelfile_adapter = f"./{row['file'].name}"
    if plan["gguf"]:  # the adapters are merged one tensor at a time as the file is written
        row = write_gguf(stage, cm, names["gguf"], plan["gguf"], steps)
        modelfile_from = f"./{row['file'].name}"
        rows.append(row)
    elif plan["mlx"]:
        rows.append(write_mlx(stage, cm, dtype, plan["quantize"], steps))
    elif plan.get("hf"):
        rows.append(write_hf(stage, cm, dtype, steps))
    if plan["gguf"] or plan["adapter_gguf"]:
        row = write_modelfile(stage, cm, modelfile_from, modelfile_adapter, console)
        rows += [row] if row else []
    return rows
