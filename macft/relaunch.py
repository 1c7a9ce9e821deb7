"""How macft starts Python again: macft importable, the working folder never on sys.path.

`python -m macft` and `python -c CODE` put the working folder first on sys.path, so a
click.py, yaml.py or mlx/ lying there would run inside macft. The OpenBLAS restart
(cpu/blas.py), mlx.launch and every rank that --hosts starts (train/parallel/hosts.py) go
through here. `python -I` would drop the working folder too, but also PYTHONPATH and the
user's site-packages, which editable installs and tests need.
"""

import sys

# Runs before anything else is imported: "" (and ".") on sys.path mean the working folder.
_NO_CWD = "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
_MACFT = "sys.argv[0] = 'macft'; from macft.cli import main; main()"


def python_code(code: str) -> list[str]:
    """A command that runs `code` in this Python without the working folder on sys.path."""
    return [sys.executable, "-c", _NO_CWD + code]


def macft_command(*args: str) -> list[str]:
    """`macft ARGS` in this Python, as safe as the `macft` script (which never adds the cwd)."""
    return [*python_code(_MACFT), *args]
