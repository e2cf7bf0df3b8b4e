"""The protocol contract and its registry: how a query/gallery pair of embeddings is scored.

A protocol declares, when it registers (:func:`register_protocol`):

* its ``name`` and a ``title`` for people ("Revisited Oxford/Paris");
* its ``headline`` metric key, the one every report (compatibility, chain, backfill) compares;
* the ``option`` naming the ground-truth file that selects it (``gnd``, ``solution``; the
  default protocol, scored by labels, has none), and whether it can search approximately;
* how its metrics read as a table (``rows`` and ``columns``);
* a constructor from :class:`ProtocolOptions` returning its two evaluators.

Adding a protocol is one module (or package) here that registers it (the package imports every
module in it), or a builder so decorated in a user's package and named in the entry-point group
``bctool.protocols`` (:mod:`bctool.registry`). :func:`make_protocol` is the one entry point that picks and builds one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bctool.embeddings import Embeddings
from bctool.errors import ConfigError
from bctool.evaluate.metrics import QueryAP
from bctool.evaluate.search import DEFAULT_EF_SEARCH, DEFAULT_NPROBE, INDEX_KINDS, SearchOptions
from bctool.registry import Registry

Evaluator = Callable[[Embeddings, Embeddings], dict[str, Any]]
PerQueryEvaluator = Callable[[Embeddings, Embeddings], tuple[dict[str, Any], QueryAP]]
Rows = dict[str, dict[str, Any]]
RowsOf = Callable[[Mapping[str, Any]], Rows]


@dataclass(frozen=True)
class Table:
    """A table for people: a title, named rows of ``{column: value}`` and the columns shown."""

    title: str
    rows: Rows
    columns: tuple[str, ...]


def one_row(metrics: Mapping[str, Any]) -> Rows:
    """All of ``metrics`` as the single, unnamed row of a table."""
    return {"": dict(metrics)}


@dataclass(frozen=True)
class Protocol:
    """An evaluator, the key of its headline mAP, and ``per_query``: the same evaluation that
    also returns the headline AP of every evaluated query (their mean is the headline value).
    ``rows`` and ``columns`` lay its metrics out as a table (:meth:`table`)."""

    name: str
    evaluate: Evaluator
    headline: str
    per_query: PerQueryEvaluator
    rows: RowsOf = one_row
    columns: tuple[str, ...] = ()

    def table(self, title: str, metrics: Mapping[str, Any]) -> Table:
        """``metrics`` (what :attr:`evaluate` returned) as a table; every metric when the
        protocol names no columns."""
        return Table(title, self.rows(metrics), self.columns or tuple(metrics))


@dataclass(frozen=True)
class ProtocolOptions:
    """What picks and configures a protocol.

    ``truth`` maps a protocol's option to its ground-truth file (``{"gnd": path}``); entries
    that are None are not passed. ``search`` is that of
    :func:`bctool.evaluate.retrieval.evaluate_retrieval`.
    """

    truth: Mapping[str, str | os.PathLike[str] | None] = field(default_factory=dict)
    search: SearchOptions = SearchOptions()

    def given(self) -> dict[str, str | os.PathLike[str]]:
        """The ground-truth files passed (``truth`` without its empty entries)."""
        return {name: path for name, path in self.truth.items() if path}


Builder = Callable[[ProtocolOptions], tuple[Evaluator, PerQueryEvaluator]]


@dataclass(frozen=True)
class ProtocolSpec:
    """A registered protocol: what :func:`register_protocol` was told (see the module docstring)."""

    name: str
    title: str
    headline: str
    build: Builder
    columns: tuple[str, ...] = ()
    rows: RowsOf = one_row
    option: str | None = None
    approximate_index: bool = False

    def create(self, options: ProtocolOptions) -> Protocol:
        """The protocol built from ``options``."""
        evaluate, per_query = self.build(options)
        return Protocol(self.name, evaluate, self.headline, per_query, self.rows, self.columns)


def _admit_protocol(name: str, spec: Any) -> None:
    """Only a :class:`ProtocolSpec` of that name may register, and no two protocols claim one option."""
    if not isinstance(spec, ProtocolSpec):
        raise ConfigError(f"protocol {name!r} must be a ProtocolSpec; decorate its builder with "
                          f"@register_protocol({name!r}, title=..., headline=...), got {spec!r}")
    if spec.name != name:
        raise ConfigError(f"protocol {name!r}: its spec is named {spec.name!r}")
    for other in PROTOCOLS.snapshot().values():
        if other.name != name and other.obj.option == spec.option:
            which = f"option {spec.option!r}" if spec.option else "the default (no option)"
            raise ConfigError(f"protocols {other.name!r} and {name!r} both claim {which}")


def _protocol_entry(name: str, spec: ProtocolSpec) -> dict[str, Any]:
    return {"description": spec.title, "title": spec.title, "headline": spec.headline, "columns": spec.columns,
            "option": spec.option, "approximate_index": spec.approximate_index}


PROTOCOLS: Registry[ProtocolSpec] = Registry("protocol", "protocols", derive=_protocol_entry, admit=_admit_protocol)


def register_protocol(
    name: str,
    *,
    title: str,
    headline: str,
    columns: tuple[str, ...] = (),
    rows: RowsOf = one_row,
    option: str | None = None,
    approximate_index: bool = False,
) -> Callable[[Builder], Builder]:
    """Decorator of a protocol's constructor (options -> ``(evaluate, per_query)``): make the
    protocol available under ``name``, selected by ``option`` (None: the default protocol)."""

    def add(build: Builder) -> Builder:
        spec = ProtocolSpec(name, title, headline, build, tuple(columns), rows, option, approximate_index)
        known = PROTOCOLS.snapshot().get(name)
        if known is not None and known.obj.build is build:
            return build  # the same module imported again
        PROTOCOLS.register(name, spec)
        return build

    return add


def protocol_spec(name: str) -> ProtocolSpec:
    """The protocol registered as ``name``; a clear error naming the choices otherwise."""
    return PROTOCOLS.get_obj(name)


def _flag(spec: ProtocolSpec) -> str:
    return f"--{spec.option} ({spec.title})"


def select_protocol(options: ProtocolOptions) -> ProtocolSpec:
    """The protocol whose ground-truth option is passed, else the default protocol.

    Unknown options, two ground truths at once, and an approximate index for a protocol that
    searches exactly are :class:`ConfigError`.
    """
    by_option = {spec.option: spec for spec in PROTOCOLS.values()}
    given = options.given()
    unknown = sorted(set(options.truth) - set(by_option))
    if unknown:
        known = sorted(o for o in by_option if o)
        raise ConfigError(f"unknown ground-truth option(s) {unknown}; the protocols take {known}")
    chosen = [by_option[name] for name in given]
    if len(chosen) > 1:
        how_many = "not both" if len(chosen) == 2 else "only one"
        raise ConfigError(f"pass {' or '.join(_flag(s) for s in chosen)}, {how_many}")
    if not chosen:
        if None not in by_option:
            raise ConfigError(f"no default protocol is registered; pass one of {sorted(o for o in by_option if o)}")
        chosen = [by_option[None]]
    spec = chosen[0]
    if not INDEX_KINDS.entry(options.search.index).declares.get("exact") and not spec.approximate_index:
        flags = sorted(f"--{s.option}" for s in PROTOCOLS.values() if s.option and not s.approximate_index)
        exact = " and ".join(filter(None, [", ".join(flags[:-1]), flags[-1]]))
        plural = "search" if len(flags) > 1 else "searches"
        raise ConfigError(
            f"--index {options.search.index} is for labelled galleries; {exact} {plural} exactly (--index flat)"
        )
    return spec


def build_protocol(options: ProtocolOptions) -> Protocol:
    """The protocol :func:`select_protocol` picks, built from ``options``."""
    return select_protocol(options).create(options)


def make_protocol(
    *,
    top_k: int | None = None,
    index: str = "flat",
    nprobe: int = DEFAULT_NPROBE,
    ef_search: int = DEFAULT_EF_SEARCH,
    **truth: str | os.PathLike[str] | None,
) -> Protocol:
    """Labels by default; a ground-truth file by its protocol's option for a benchmark:
    ``gnd=`` for Revisited Oxford/Paris, ``solution=`` for GLDv2.

    ``index`` (flat, ivf, hnsw), ``nprobe`` and ``ef_search`` apply to the labelled protocol,
    the one for large galleries; the benchmark protocols always search exactly.
    """
    return build_protocol(ProtocolOptions(truth, SearchOptions(top_k, index, nprobe, ef_search)))
