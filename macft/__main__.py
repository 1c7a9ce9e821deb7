"""`python -m macft` runs the CLI."""

from macft.cli import main

main()
