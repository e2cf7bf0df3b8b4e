"""One way to extend bctool: named registries of every kind, and plugins that add to them.

A :class:`Registry` holds the entries of one kind (methods, protocols, backbones, heads, index
kinds, export formats, dataset writers, regimes ...). Each :class:`Entry` has a name, the object
itself (a class, a factory, a spec), a one-line description, its parameters (a frozen dataclass
whose fields may carry a range, :func:`param`) and what it declares (a method's loss parts, a
protocol's columns). A registry reads like a ``Mapping`` from names to objects, so
``sorted(METHODS)`` and ``METHODS["bct"]`` work as they did for the dicts it replaces.

Built-in entries register when their module is imported (``@METHODS.register("bct")``). Plugins
are installed packages that name their objects in an entry-point group ``bctool.<kind>``
(``bctool.methods``, ``bctool.protocols``, ``bctool.index_kinds``, ...; :data:`KINDS` lists
them)::

    [project.entry-points."bctool.methods"]
    my-method = "my_package.methods:MyMethod"

The group is read the first time a registry is looked into, never at import: a plugin that fails
to load is recorded, reported by name when its entry is asked for (or in a listing), and costs
nothing to commands that never read its kind. Loading the object imports its module, which may
register it by decorator; an object its import did not register is registered under the entry
point's name, with the declarations the registry derives from it. A name claimed twice (two
plugins, or a plugin and a built-in) resolves to neither: asking for it is a
:class:`PluginError` naming both origins, as the first one found would be a guess.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeVar

from bctool.errors import BctoolError, ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")
BUILTIN = "bctool"
_MISSING: Any = object()
# The plugin being loaded: what it registers, in any registry, is recorded as coming from it.
_loading_origin: str | None = None


class PluginError(BctoolError):
    """An installed plugin could not be loaded, or registered something it may not."""


def param(default: Any, *, low: float | None = None, high: float | None = None, low_open: bool = False,
          help: str = "") -> Any:  # noqa: A002 - the word users read
    """A parameter field with an allowed range (``low`` inclusive unless ``low_open``; ``high``
    inclusive) and a line of help, for the frozen ``Params`` dataclass of an entry."""
    return field(default=default, metadata={"low": low, "high": high, "low_open": low_open, "help": help})


def _kind_of(f: dataclasses.Field) -> tuple[type, bool]:
    """The field's type, and whether it may be None (``int | None``)."""
    if isinstance(f.type, type):
        return f.type, False
    text = str(f.type).replace(" ", "")
    optional = text.endswith("|None") or text.startswith("None|")
    text = text.removesuffix("|None").removeprefix("None|")
    return {"int": int, "float": float, "bool": bool, "str": str}.get(text, str), optional


def _coerce(owner: str, f: dataclasses.Field, value: Any) -> Any:
    """``value`` as the field's type (options arrive as strings); a clear error otherwise."""
    kind, optional = _kind_of(f)
    if optional and (value is None or (isinstance(value, str) and value.lower() == "none")):
        return None
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)) and not (
            kind is float and not math.isfinite(value)):
        return value
    try:
        if kind is bool:
            text = str(value).lower()
            if text not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return text in ("true", "1")
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
        converted = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{owner} parameter {f.name}={value!r} is not a valid {kind.__name__}") from None
    if kind is float and not math.isfinite(converted):
        # NaN or inf switches a term off or makes it constant without a word: never what was meant.
        raise ConfigError(f"{owner} parameter {f.name}={value!r} must be a finite number")
    return converted


def _check_range(owner: str, f: dataclasses.Field, value: Any) -> None:
    low, high, low_open = f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("low_open", False)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if low is not None and (value <= low if low_open else value < low):
        bound = f"above {low}" if low_open else f"{low} or more"
        raise ConfigError(f"{owner} parameter {f.name}={value!r} is out of range; pass a value {bound}")
    if high is not None and value > high:
        raise ConfigError(f"{owner} parameter {f.name}={value!r} is out of range; pass {high} or less")


def resolve_params(kind: str, name: str, params: type | None, given: Mapping[str, Any] | None = None) -> Any:
    """An instance of the frozen dataclass ``params`` (of the ``kind`` entry ``name``) with
    ``given`` over its defaults: values coerced to the fields' types and checked against their
    ranges; unknown names are a :class:`ConfigError` naming the entry's parameters."""
    given = dict(given or {})
    if params is None:
        if given:
            raise ConfigError(f"{kind} {name!r} has no parameters; got {', '.join(map(repr, sorted(given)))}")
        return None
    fields = {f.name: f for f in dataclasses.fields(params)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        allowed = ", ".join(f"{n}={f.default!r}" for n, f in fields.items()) or "none"
        raise ConfigError(f"{kind} {name!r} has no parameter {', '.join(map(repr, unknown))}; its parameters: {allowed}")
    values = {key: _coerce(name, fields[key], value) for key, value in given.items()}
    for key, value in values.items():
        _check_range(name, fields[key], value)
    return params(**values)


def describe_params(params: type | None) -> dict[str, Any]:
    """``{name: default}`` of a ``Params`` dataclass (empty for none)."""
    return {f.name: f.default for f in dataclasses.fields(params)} if params is not None else {}


def _json_safe(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_safe(v) for v in (sorted(value) if isinstance(value, (set, frozenset)) else value)]
    return getattr(value, "__name__", repr(value))


def first_line(obj: Any) -> str:
    """The first paragraph of ``obj``'s docstring on one line ("" without one)."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return " ".join(doc.split("\n\n")[0].split()) if doc else ""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered name: its object, description, parameters, declarations and origin."""

    name: str
    obj: T
    description: str = ""
    params: type | None = None  # a frozen dataclass, or None for no parameters
    declares: Mapping[str, Any] = field(default_factory=dict)
    origin: str = BUILTIN  # "bctool", or the plugin's distribution and entry point

    def describe(self) -> dict[str, Any]:
        """JSON-ready: name, description, parameters with their defaults, declarations, origin."""
        return {"name": self.name, "description": self.description, "params": _json_safe(describe_params(self.params)),
                "declares": _json_safe(dict(self.declares)), "origin": self.origin}


Derive = Callable[[str, Any], Mapping[str, Any]]


class Registry(Mapping[str, T]):
    """Named entries of one kind, plus the plugins of its entry-point group (see the module
    docstring). ``derive(name, obj)`` returns the keyword arguments of :meth:`register` for an
    object registered without them (a plugin's, or a plain ``register(name, obj)``)."""

    def __init__(self, kind: str, plural: str, *, error: type[BctoolError] = ConfigError,
                 derive: Derive | None = None, admit: Callable[[str, Any], None] | None = None) -> None:
        self.kind, self.plural = kind, plural
        self.group = f"bctool.{plural.replace('-', '_')}"  # entry-point groups allow no hyphen
        self._error, self._derive, self._admit = error, derive, admit
        self._entries: dict[str, Entry[T]] = {}
        self._plugins_loaded = False
        self._loading = False
        self._failures: dict[str, str] = {}  # entry-point name -> why its plugin did not load
        self.clashes: dict[str, str] = {}  # a name a plugin claimed when it was taken -> both origins
        KINDS[plural] = self

    # -- registering ------------------------------------------------------------------------
    def register(self, name: str, obj: T = _MISSING, *, description: str | None = None,
                 params: type | None = _MISSING, replace: bool = False, **declares: Any) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, a decorator that registers what it
        decorates. Unset ``description``/``params``/declarations come from ``derive``. A name
        taken by another object is refused unless ``replace``."""
        if obj is _MISSING:
            def add(target: T) -> T:
                self.register(name, target, description=description, params=params, replace=replace, **declares)
                return target
            return add
        if not isinstance(name, str) or not name or ":" in name or any(c.isspace() for c in name):
            raise self._error(f"{self.kind} name {name!r} must be non-empty, with no spaces and without ':' "
                              "(that form names a module: package.module:factory)")
        derived = dict(self._derive(name, obj)) if self._derive else {}
        if description is None:
            description = derived.pop("description", None) or first_line(obj)
        derived.pop("description", None)
        if params is _MISSING:
            params = derived.pop("params", None)
        derived.pop("params", None)
        if self._admit is not None:
            self._admit(name, obj)
        origin = _loading_origin or BUILTIN
        old = self._entries.get(name)
        if old is not None and old.obj is not obj and not replace:
            both = (f"{self.kind} {name!r} is registered twice ({old.origin}: {_where(old.obj)}; "
                    f"{origin}: {_where(obj)})")
            if _loading_origin is not None:  # a plugin claims a taken name: neither may answer to it
                self.clashes[name] = f"{both}; {self._clash_fix(old.origin)}"
            raise self._error(f"{both}; pick another name")
        self._entries[name] = Entry(name, obj, description, params, {**derived, **declares}, origin)
        return obj

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests, and a user replacing a built-in on purpose)."""
        self._entries.pop(name, None)

    def __delitem__(self, name: str) -> None:
        self.unregister(name)

    def snapshot(self) -> dict[str, Entry[T]]:
        """The entries registered so far (no plugin is loaded for this); :meth:`restore` takes it back."""
        return dict(self._entries)

    def restore(self, snapshot: Mapping[str, Entry[T]]) -> None:
        """Make the entries exactly ``snapshot`` (tests that register and must leave no trace)."""
        self._entries = dict(snapshot)

    # -- reading ----------------------------------------------------------------------------
    @property
    def failures(self) -> dict[str, str]:
        """Why each plugin of this kind that failed to load did not, by entry-point name (the
        plugins are read first, so a caller never sees the empty record of a group not read yet)."""
        self.load_plugins()
        return self._failures

    def entry(self, name: str) -> Entry[T]:
        """The entry ``name``; an unknown name is an error listing the registered ones (and a
        plugin that failed to load, when it claimed that name); a name two origins claim is a
        :class:`PluginError` naming both."""
        self.load_plugins()
        if name in self._entries:
            self._refuse_ambiguous(name)
            return self._entries[name]
        self.raise_if_failed(name)
        hint = f"; {len(self.failures)} plugin(s) failed to load: `bctool list {self.plural}`" if self.failures else ""
        raise self._error(f"unknown {self.kind} {name!r}; choose one of {sorted(self._entries)}{hint}")

    def raise_if_failed(self, name: str) -> None:
        """A :class:`PluginError` naming the plugin when ``name`` is one a plugin failed to load."""
        self.load_plugins()
        if name in self.failures:
            raise PluginError(self.failures[name])

    def _refuse_ambiguous(self, name: str) -> None:
        """A :class:`PluginError` when ``name`` is registered and also claimed by a plugin that
        failed to load (a second plugin of that name): using the first found would be a guess."""
        if name in self.clashes:
            raise PluginError(self.clashes[name])
        if name in self.failures and name in self._entries:
            origin = self._entries[name].origin
            raise PluginError(f"{self.kind} {name!r} is claimed twice: {origin} registers it, and "
                              f"{self.failures[name]}; {self._clash_fix(origin)}")

    def _clash_fix(self, first: str) -> str:
        """What ends a clash between the entry registered by ``first`` and a plugin's."""
        if first == BUILTIN:
            return (f"a plugin may not take the name of a built-in {self.kind}: rename the plugin's entry point, "
                    "or uninstall it")
        return f"uninstall one of the two packages, or rename the entry point of one (`bctool list {self.plural}`)"

    def __getitem__(self, name: str) -> T:
        self.load_plugins()
        if name not in self._entries:
            raise KeyError(name)
        self._refuse_ambiguous(name)
        return self._entries[name].obj

    def get_obj(self, name: str) -> T:
        """The object registered as ``name``, or the error of :meth:`entry`."""
        return self.entry(name).obj

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self.load_plugins()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self.load_plugins()
        return len(self._entries)

    def entries(self) -> list[Entry[T]]:
        """Every entry, sorted by name."""
        self.load_plugins()
        return [self._entries[n] for n in sorted(self._entries)]

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return [e.name for e in self.entries()]

    def builtin_names(self) -> list[str]:
        """The names bctool itself registers (no plugin is loaded for this)."""
        return sorted(n for n, e in self._entries.items() if e.origin == BUILTIN)

    def describe(self) -> list[dict[str, Any]]:
        """JSON-ready listing of every entry (the plugins that failed are in :attr:`failures`)."""
        return [e.describe() for e in self.entries()]

    # -- plugins ----------------------------------------------------------------------------
    def load_plugins(self) -> None:
        """Load this kind's entry points once; failures are recorded in :attr:`failures` and
        logged as warnings, never raised here."""
        if self._plugins_loaded or self._loading:
            return
        self._loading = True
        try:
            points = _group(self.group)
            if points:
                # Every built-in registers first: a plugin that imports a bctool module must
                # not be taken for the origin of that module's entries.
                for module in KIND_MODULES.values():
                    importlib.import_module(module)
            for point in points:
                self._load(point)
        finally:
            self._loading, self._plugins_loaded = False, True

    def _load(self, point: EntryPoint) -> None:
        dist = getattr(point.dist, "name", None) or "an installed package"
        origin = f"plugin {dist} ({self.group}: {point.name} = {point.value})"
        global _loading_origin
        _loading_origin = origin
        try:
            obj = point.load()
            known = self._entries.get(point.name)
            if known is None or known.origin != origin:  # its import did not register it by decorator
                self.register(point.name, obj)
        except Exception as exc:  # noqa: BLE001 - a plugin may fail in any way; report it by name
            message = f"{origin} failed to load: {type(exc).__name__}: {exc}"
            self._failures[point.name] = f"{message}; fix or uninstall {dist}"
            logger.warning("%s", message)
        finally:
            _loading_origin = None

    def reload_plugins(self) -> None:
        """Forget the plugins read so far and read the group again (tests)."""
        for name in [n for n, e in self._entries.items() if e.origin != BUILTIN]:
            del self._entries[name]
        self._failures.clear()
        self.clashes.clear()
        self._plugins_loaded = False


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _group(group: str) -> list[EntryPoint]:
    return sorted(entry_points(group=group), key=lambda p: p.name)


# Every registry by its plural name (the entry-point group is bctool.<plural>, "_" for "-"). The modules that
# define them, imported by `all_kinds` so that every kind is listed with its built-ins.
KINDS: dict[str, Registry[Any]] = {}
KIND_MODULES = {
    "methods": "bctool.train.methods",
    "protocols": "bctool.evaluate.protocols",
    "backbones": "bctool.models.model",
    "weights": "bctool.models.weights",
    "heads": "bctool.models.heads",
    "regimes": "bctool.train.regime",
    "schedules": "bctool.train.regime",
    "views": "bctool.data.transforms",
    "index-kinds": "bctool.evaluate.search",
    "export-formats": "bctool.export",
    "datasets": "bctool.data.writers",
    "adapters": "bctool.adapt.maps",
    "backfill-policies": "bctool.backfill.policies",
}


def describe_kinds(kinds: list[str] | None = None) -> dict[str, Any]:
    """JSON-ready listing of ``kinds`` (default: every kind): ``{"kinds": {plural: [entry...]}}``,
    plus ``plugin_errors`` (``{plural: {name: why}}``) when a plugin failed to load."""
    listed, failed = {}, {}
    for plural in kinds or list(KIND_MODULES):
        reg = registry(plural)
        listed[plural] = reg.describe()
        if reg.failures:
            failed[plural] = dict(reg.failures)
    return {"kinds": listed, **({"plugin_errors": failed} if failed else {})}


def registry(plural: str) -> Registry[Any]:
    """The registry of one kind by its plural name, its built-ins imported; an unknown kind is a
    :class:`ConfigError` naming the kinds."""
    if plural not in KIND_MODULES:
        raise ConfigError(f"unknown kind {plural!r}; choose one of {sorted(KIND_MODULES)}")
    importlib.import_module(KIND_MODULES[plural])
    return KINDS[plural]
