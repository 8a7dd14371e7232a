"""`python -m flows ...` is the same as the `pixart` command."""

from flows.cli import main

main()
