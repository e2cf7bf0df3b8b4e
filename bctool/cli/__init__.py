"""The ``bctool`` command line: parses options, calls one library function, renders results.

One module per command group, in the order of the data flow (each registers its commands on
:data:`bctool.cli.app.app` when imported): ``datasets`` (write a dataset), ``importing`` (a
pretrained network as a checkpoint), ``embed`` (extract, export, convert, merge), ``train``
(train, plot), ``adapt`` (adapt, transform), ``evaluate`` (evaluate, backfill plan),
``listing`` (methods, list) and ``demo``. Shared option types live in
``options``, JSON and tables in ``output``, error handling in ``errors``.
"""

# isort: off
# The order of the imports is the order of the commands in `bctool --help`: the data flow.
from bctool.cli import datasets, importing, embed, train, adapt, evaluate, listing, demo  # noqa: F401 - they register commands
# isort: on
from bctool.cli.app import app, main

__all__ = ["app", "main"]
