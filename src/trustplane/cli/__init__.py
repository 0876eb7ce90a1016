"""The `trustplane` command line: one module per command group."""
