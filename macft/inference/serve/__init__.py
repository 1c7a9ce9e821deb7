"""`macft serve`: one base in memory, runs' adapters loaded on it as requests ask for them (up
to a cap), an OpenAI-compatible API that picks the adapter per request: catalog (what is served), engine (the generation
worker and its continuous batch), api (OpenAI's requests and answers), server (HTTP)."""

from macft.errors import MacftError

# How many adapters are loaded at once by default: a rank-8 adapter on every linear of an 8B
# model is ~40 MB, so 8 stay well under 1 GB, while most servers name fewer runs than that.
DEFAULT_MAX_ADAPTERS = 8


def parse_max_adapters(value: str) -> int:
    """--max-adapters: a whole number, 1 or more (here, so the CLI loads no MLX to check it)."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise MacftError(
            f"--max-adapters must be a whole number of adapters, 1 or more (not {value!r})"
        )
    return n
