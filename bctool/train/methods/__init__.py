"""Compatibility methods, one file each, registered by name (the contract: ``base.py``).

Every module of this package is imported here, so a new file that registers a method is all
it takes to add one.
"""

import importlib
import pkgutil

from bctool.train.methods.base import (
    METHODS,
    Method,
    MethodContext,
    NoParams,
    create_method,
    describe_methods,
    method_class,
    register_method,
    resolve_params,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in ("base", "parts"):
        importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "METHODS",
    "Method",
    "MethodContext",
    "NoParams",
    "create_method",
    "describe_methods",
    "method_class",
    "register_method",
    "resolve_params",
]
