"""`python -m trustplane` is the `trustplane` command."""

from trustplane.cli.main import run

run()
