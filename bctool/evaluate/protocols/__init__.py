"""Retrieval protocols, one file each, registered by name (the contract: ``base.py``).

Every module of this package is imported here, so a new file that registers a protocol is all
it takes to add one.
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
