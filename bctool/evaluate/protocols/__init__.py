"""Retrieval protocols, one module each, registered by name (the contract: ``base.py``).

``labels.py`` is the default protocol; a benchmark is a package holding its files' reader, its
metric and its registry entry (``gldv2/``, ``revisited/``).

Every module and package here is imported, so a new one that registers a protocol is all it
takes to add one.
"""

import importlib
import pkgutil

from bctool.evaluate.protocols.base import (
    PROTOCOLS,
    Evaluator,
    PerQueryEvaluator,
    Protocol,
    ProtocolOptions,
    ProtocolSpec,
    Table,
    build_protocol,
    make_protocol,
    protocol_spec,
    register_protocol,
    select_protocol,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "PROTOCOLS",
    "Evaluator",
    "PerQueryEvaluator",
    "Protocol",
    "ProtocolOptions",
    "ProtocolSpec",
    "Table",
    "build_protocol",
    "make_protocol",
    "protocol_spec",
    "register_protocol",
    "select_protocol",
]
