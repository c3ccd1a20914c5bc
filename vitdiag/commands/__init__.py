"""One module per CLI command; each function is a Typer command with typed options."""
