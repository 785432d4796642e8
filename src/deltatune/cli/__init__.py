"""The `deltatune` command (typer). Every subcommand calls the library; the library never imports this."""

from deltatune.cli.main import app, main

__all__ = ["app", "main"]
