"""The `ftune` command line (app.py registers every command)."""

from ftune.cli.app import app, main

__all__ = ["app", "main"]
