"""Ollama Modelfiles: a Go TEMPLATE and stop tokens per chat format, SYSTEM, FROM / ADAPTER."""

import re
import shlex
from pathlib import Path

from macft.data.encode import has_chat_template
from macft.errors import ExportError
from macft.models.catalog import ENTRIES, lookup

# Go text/template over Ollama's .Messages (Role, Content); written without {{- -}} trimming so
# that every newline in the text is one the model saw in training. Ollama puts the Modelfile's
# SYSTEM first in .Messages when a request has no system message of its own.
TEMPLATES = {
    "chatml": (
        "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n"
    ),
    "llama3": (
        "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    # Mistral and Gemma have no system turn: the system text opens the first user turn.
    "mistral": (
        '{{ $sys := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $sys = .Content }}'
        '{{ else if eq .Role "user" }}[INST] {{ if $sys }}{{ $sys }}\n\n{{ $sys = "" }}{{ end }}'
        "{{ .Content }}[/INST]{{ else }} {{ .Content }}</s>{{ end }}{{ end }}"
    ),
    "gemma": (
        '{{ $sys := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $sys = .Content }}'
        '{{ else if eq .Role "user" }}<start_of_turn>user\n{{ if $sys }}{{ $sys }}\n\n'
        '{{ $sys = "" }}{{ end }}{{ .Content }}<end_of_turn>\n{{ else }}<start_of_turn>model\n'
        "{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n"
    ),
    "phi3": (
        "{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"
    ),
}
STOPS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "mistral": ["[INST]", "[/INST]", "</s>"],
    "gemma": ["<start_of_turn>", "<end_of_turn>"],
    "phi3": ["<|end|>", "<|user|>", "<|assistant|>", "<|endoftext|>"],
}
# A marker only one family's template contains, checked in this order.
MARKERS = [
    ("<|start_header_id|>", "llama3"),
    ("<|im_start|>", "chatml"),
    ("<start_of_turn>", "gemma"),
    ("<|assistant|>", "phi3"),
    ("[INST]", "mistral"),
]
# The system turn each format renders, to find a template's built-in default system prompt.
SYSTEM_TURN = {
    "chatml": r"<\|im_start\|>system\n(.*?)<\|im_end\|>",
    "llama3": r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>",
    "phi3": r"<\|system\|>\n(.*?)<\|end\|>",
}
NAME_RE = re.compile(
    r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)?(:[a-zA-Z0-9][a-zA-Z0-9._-]*)?$"
)


def chat_template_text(tokenizer) -> str:
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    template = getattr(hf, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one is what chat uses
        template = template.get("default") or next(iter(template.values()), None)
    return template or ""


def detect_format(tokenizer, model_path: str | None = None, source: dict | None = None):
    """chatml | llama3 | mistral | gemma | phi3 from the tokenizer's template, else the catalog."""
    template = chat_template_text(tokenizer)
    for marker, fmt in MARKERS:
        if marker in template:
            return fmt
    entry = lookup(model_path) if model_path else None
    if entry is None and source and source.get("path"):
        name = Path(source["path"]).name
        entry = next((e for e in ENTRIES if e.pypi and e.pypi[2] == name), None)
    return entry.chat_format if entry else None


def default_system(tokenizer, fmt: str | None) -> str | None:
    """The system prompt a template adds on its own (SmolLM2's does); training saw it too."""
    if fmt not in SYSTEM_TURN or not has_chat_template(tokenizer):
        return None
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "?"}], add_generation_prompt=False, tokenize=False
        )
    except Exception:  # a template that needs other arguments: no default to find
        return None
    m = re.search(SYSTEM_TURN[fmt], text, re.S)
    return m[1] if m else None


def default_name(run_path: Path) -> str:
    """An Ollama model name from a run folder's name: lower case, [a-z0-9._-]."""
    name = re.sub(r"[^a-z0-9._-]+", "-", Path(run_path).resolve().name.lower()).strip("-._")
    return name or "macft-model"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ExportError(
            f"--name {name!r} is not a valid Ollama model name; use lower-case letters, digits, "
            "'.', '_' and '-', optionally NAMESPACE/NAME and :TAG (e.g. net or me/net:v1)"
        )
    return name


def _quoted(keyword: str, text: str) -> str:
    if '"""' in text:
        raise ExportError(
            f'the {keyword} text contains """, which a Modelfile cannot hold; remove it'
        )
    return f'{keyword} """{text}"""'


def modelfile(
    from_: str,
    fmt: str | None,
    system: str | None = None,
    adapter: str | None = None,
    parameters: dict | None = None,
) -> str:
    """The Modelfile text; fmt None leaves TEMPLATE out (Ollama then guesses from the GGUF)."""
    lines = [f"FROM {from_}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if fmt is not None:
        if fmt not in TEMPLATES:
            raise ExportError(f"chat format {fmt!r} unknown; known: {', '.join(TEMPLATES)}")
        lines.append(_quoted("TEMPLATE", TEMPLATES[fmt]))
        lines += [f'PARAMETER stop "{s}"' for s in STOPS[fmt]]
    for key, value in (parameters or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    if system:
        lines.append(_quoted("SYSTEM", system))
    return "\n".join(lines) + "\n"


def create_command(name: str, modelfile_path: Path) -> str:
    """The line to paste into a shell: a path with spaces or quotes stays one argument."""
    return f"ollama create {shlex.quote(name)} -f {shlex.quote(str(modelfile_path))}"
