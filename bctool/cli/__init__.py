"""The ``bctool`` command line: parses options, calls one library function, renders results."""

from bctool.cli.app import app, main

__all__ = ["app", "main"]
