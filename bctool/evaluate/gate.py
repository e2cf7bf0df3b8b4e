"""A release gate: requirements on a report's figures (``bctool evaluate --require EXPR``).

An expression is a key alone (a yes/no figure that must hold, ``compatible_significant``) or
``KEY OP NUMBER`` with OP one of ``<= >= < > == !=`` (``nfr<=0.05``, ``delta>=0.01``). The keys
are the report's own numbers and yes/no figures (its top level), and the flips of a
compatibility report: ``nfr``, ``pfr`` (and their counts and interval) of new/old against
old/old, and the same of new/new with the suffix ``_new_new``; with ``--changes`` or
``--label-free`` the label-free figures the same way (``top1_changed``, ``overlap@10``, ``rbo``,
``identity_top1``, ``identity_mrr``).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bctool.errors import ConfigError

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<": operator.lt, ">": operator.gt,
}
_EXPRESSION = re.compile(r"^\s*([A-Za-z_][\w@.]*)\s*(?:(<=|>=|==|!=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*)?$")


class UnknownKey(ConfigError):
    """A requirement names a key the report does not have."""


@dataclass(frozen=True)
class Requirement:
    """One parsed expression."""

    expression: str
    key: str
    op: str | None = None  # None: the key itself must be true
    value: float | None = None


def parse_requirement(text: str) -> Requirement:
    """``KEY`` or ``KEY OP NUMBER``; anything else is a :class:`ConfigError` saying the form."""
    match = _EXPRESSION.match(text)
    if not match:
        raise ConfigError(f"{text!r} is not a requirement; write KEY (a yes/no figure, e.g. compatible_significant) "
                          f"or KEY OP NUMBER with OP one of {' '.join(OPERATORS)} (e.g. 'nfr<=0.05')")
    key, op, value = match.groups()
    return Requirement(text, key, op, float(value) if value is not None else None)


def gate_values(report: Mapping[str, Any]) -> dict[str, float | bool]:
    """The figures a requirement may name: the report's top-level numbers and yes/no values, and
    its flips flattened (``nfr``, ``pfr``, ... of new/old; ``nfr_new_new``, ... of new/new)."""
    # A figure the report left empty (null, say update_gain without M(*,*) above M(o,o)) is a key
    # whose requirement fails, not an unknown key.
    values = {key: value for key, value in report.items() if value is None or isinstance(value, (bool, int, float))}
    for section in ("flips", "changes"):
        for pair, suffix in (("new/old", ""), ("new/new", "_new_new")):
            for key, value in (report.get(section, {}) or {}).get(pair, {}).items():
                values[f"{key}{suffix}"] = value
    values.update((report.get("changes", {}) or {}).get("identity", {}))
    return values


def check_requirements(requirements: list[Requirement], report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each requirement with its value and whether it passed; an :class:`UnknownKey` names the
    keys the report has. A requirement on a figure the report left null fails, with a
    ``reason``: the report's own (its ``undefined`` mapping, e.g. why ``update_gain`` is null)."""
    values = gate_values(report)
    reasons = report.get("undefined") or {}
    out = []
    for req in requirements:
        if req.key not in values:
            raise UnknownKey(f"--require {req.expression!r}: this report has no {req.key!r}; its keys: "
                             f"{', '.join(sorted(values))}")
        value = values[req.key]
        if req.op is None:
            passed = bool(value) if isinstance(value, bool) else None
            if passed is None and value is not None:
                raise UnknownKey(f"--require {req.expression!r}: {req.key} is a number ({value}), not yes/no; "
                                 f"compare it, e.g. '{req.key}>=0'")
        else:
            passed = (value is not None and not (isinstance(value, float) and math.isnan(value))
                      and OPERATORS[req.op](float(value), req.value))
        row = {"expression": req.expression, "key": req.key, "value": value, "passed": bool(passed)}
        if value is None:
            row["reason"] = f"{req.key} is undefined (null): {reasons.get(req.key, 'this report could not compute it')}"
        out.append(row)
    return out
