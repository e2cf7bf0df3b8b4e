"""The one registry mechanism: names, duplicates, unknown names, parameters with ranges,
declarations, and that the CLI's help and `bctool list` are derived from the registries."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from bctool.cli import app
from bctool.errors import ConfigError
from bctool.registry import KIND_MODULES, Registry, param, registry, resolve_params
from helpers import docs_page

runner = CliRunner()


@dataclass(frozen=True)
class Knobs:
    """Test parameters."""

    rate: float = param(0.5, low=0.0, high=1.0)
    count: int = param(3, low=0, low_open=True)
    name: str = "x"
    limit: int | None = None


def test_register_get_and_refuse_duplicates() -> None:
    things = Registry("thing", "things-test")

    @things.register("a", params=Knobs, colour="red")
    def a() -> None:
        """Thing A.

        More words."""

    things.register("b", len)
    assert list(things) == ["a", "b"] and things["a"] is a and "b" in things and len(things) == 2
    entry = things.entry("a")
    assert entry.description == "Thing A." and entry.declares == {"colour": "red"} and entry.origin == "bctool"
    assert entry.describe()["params"] == {"rate": 0.5, "count": 3, "name": "x", "limit": None}
    things.register("a", a)  # the same object again (a module imported twice) is fine
    with pytest.raises(ConfigError, match=r"thing 'a' is registered twice \(bctool: .*a; bctool: builtins.len\); pick another name"):
        things.register("a", len)
    with pytest.raises(ConfigError, match=r"unknown thing 'c'; choose one of \['a', 'b'\]"):
        things.entry("c")
    for bad in ("", "x y", "m:f"):
        with pytest.raises(ConfigError, match="must be non-empty, with no spaces and without ':'"):
            things.register(bad, len)
    saved = things.snapshot()
    del things["b"]
    assert things.names() == ["a"]
    things.restore(saved)
    assert things.names() == ["a", "b"]


def test_parameters_are_typed_and_range_checked() -> None:
    assert resolve_params("thing", "t", Knobs, {"rate": "1", "count": "2", "limit": "none"}) == Knobs(1.0, 2, "x", None)
    assert resolve_params("thing", "t", Knobs, {"limit": "7"}).limit == 7
    with pytest.raises(ConfigError, match=r"t parameter rate=1.5 is out of range; pass 1.0 or less"):
        resolve_params("thing", "t", Knobs, {"rate": 1.5})
    with pytest.raises(ConfigError, match=r"t parameter count=0 is out of range; pass a value above 0"):
        resolve_params("thing", "t", Knobs, {"count": "0"})
    with pytest.raises(ConfigError, match=r"t parameter rate='nan' must be a finite number"):
        resolve_params("thing", "t", Knobs, {"rate": "nan"})
    with pytest.raises(ConfigError, match=r"thing 't' has no parameter 'speed'; its parameters: rate=0.5, count=3"):
        resolve_params("thing", "t", Knobs, {"speed": 1})
    with pytest.raises(ConfigError, match=r"thing 't' has no parameters; got 'rate'"):
        resolve_params("thing", "t", None, {"rate": 1})


def test_every_kind_lists_its_built_ins() -> None:
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0, result.stderr
    listed = json.loads(result.stdout)["kinds"]
    assert list(listed) == list(KIND_MODULES)
    for plural, entries in listed.items():
        assert [e["name"] for e in entries] == registry(plural).names() and entries, plural
        assert all(e["description"] and e["origin"] == "bctool" for e in entries), plural
    methods = {e["name"]: e for e in listed["methods"]}
    assert methods["lce"]["declares"]["parts"] == ["lce_boundary", "lce_align"]
    assert {e["name"]: e["declares"]["exact"] for e in listed["index-kinds"]} == {"flat": True, "hnsw": False, "ivf": False}
    one = runner.invoke(app, ["list", "heads"])
    assert list(json.loads(one.stdout)["kinds"]) == ["heads"]
    bad = runner.invoke(app, ["list", "gadgets"])
    assert bad.exit_code == 2 and "'gadgets' is unknown; choose one of ['methods'," in bad.stderr


# Each option whose values are a registry's names, and its registry (--method's help points at
# `bctool methods` instead: thirteen names do not read as help).
CHOICES = [
    (["train"], "--head", "heads"),
    (["train"], "--regime", "regimes"),
    (["train"], "--augment", "views"),
    (["train"], "--schedule", "schedules"),
    (["evaluate"], "--index", "index-kinds"),
    (["export"], "--format", "export-formats"),
    (["dataset", "make"], "name", "datasets"),
    (["adapt"], "--kind", "adapters"),
    (["backfill", "plan"], "--policy", "backfill-policies"),
]


@pytest.mark.parametrize(("command", "option", "kind"), CHOICES)
def test_help_names_every_built_in_choice(command: list[str], option: str, kind: str) -> None:
    """An option's help names every built-in of its registry: adding one without saying so fails."""
    import typer

    click_command = typer.main.get_command(app)
    for name in command:
        click_command = click_command.commands[name]
    (help_text,) = [p.help for p in click_command.params if option in (*p.opts, p.name)]
    for name in registry(kind).builtin_names():
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", help_text), f"{option}'s help does not name {name}: {help_text}"


def test_the_readme_names_every_kind_and_its_entry_point_group() -> None:

    page = docs_page("reference/registries.md")
    listing = page[page.index("## `bctool list [KIND]`"):]
    for plural in KIND_MODULES:
        assert plural in listing and f"`{registry(plural).group}`" in listing, plural
