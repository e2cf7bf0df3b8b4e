"""Write the generated parts of the documentation site (docs/, built by mkdocs).

    python scripts/make_docs.py            # write every generated block that changed
    python scripts/make_docs.py --check    # write nothing; exit 1 naming the pages that differ

A generated block lies between two comments in any page of docs/:

    <!-- generated from SOURCE -->
    ...
    <!-- end -->

Everything outside the blocks is written by hand and kept as it is. SOURCE is one of

- ``bctool --help``: the ``--help`` of every command and sub-command of ``bctool.cli.app``, in the
  app's order, hidden commands left out (reference/cli.md);
- ``bctool.registry.describe_kinds()``: every kind, and each of its built-in entries with its
  description, parameters and defaults, declarations and origin (reference/registries.md);
- a file of the site, ``docs/...`` (a result table that a script writes, such as
  ``docs/paper/table.md``): its content as it is, so a results page never holds a hand-typed copy.

The output depends on the sources alone: no dates, a fixed help width, the registries' entries
sorted by name (their kinds in the registry's order), and no entry of an installed plugin.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

CLI = "bctool --help"
REGISTRIES = "bctool.registry.describe_kinds()"

# Blocks that must be there: a page that lost one is reported as differing, not skipped.
REQUIRED = {
    "reference/cli.md": [CLI],
    "reference/registries.md": [REGISTRIES],
    "results/adapters.md": ["docs/adapters/seeds5/table-seeds-0-1-2-3-4.md", "docs/adapters/seeds5/tests.md"],
    "results/rolling-out.md": ["docs/backfill/seeds5/table.md", "docs/backfill/seeds5/tests.md", "docs/backfill/seeds5/scoring-tests.md", "docs/demo/seeds5/backfill.md"],
    "results/demo.md": ["docs/demo/seeds5/table.md", "docs/demo/seeds5/backfill.md"],
    "results/benchmarks.md": ["docs/benchmarks/table.md", "docs/benchmarks/frozen-cache.md",
                              "docs/benchmarks/model-files.md"],
    "results/production-galleries.md": ["docs/benchmarks/eval-scale.md"],
    "results/recipe.md": ["docs/paper/seeds5/table-seeds-0-1-2-3-4.md", "docs/paper/seeds5/tests.md"],
    "results/paper-table.md": ["docs/paper/table.md", "docs/paper/diagnostics/diagnostics.md"],
    "results/shared-init.md": ["docs/paper/shared-init/table.md"],
    "results/label-free.md": ["docs/label-free/table.md"],
    "results/pretrained.md": ["docs/paper/pretrained/frozen.md", "docs/paper/pretrained/table-seeds-0-1-2-3-4.md",
                              "docs/paper/pretrained/tests.md", "docs/adapters/pretrained/tests.md",
                              "docs/paper/pretrained-fashion/table-seeds-0-1-2-3-4.md",
                              "docs/paper/pretrained-fashion/tests.md"],
    "guides/without-labels.md": ["docs/label-free/table.md"],
    "guides/foreign-models.md": ["docs/imported/table.md"],
    "results/imported.md": ["docs/imported/table.md", "docs/imported/tests.md"],
    "results/seed-tests.md": ["docs/paper/seeds5/tests.md", "docs/backfill/seeds5/tests.md", "docs/adapters/seeds5/tests.md"],
}

START = "<!-- generated from {source} -->"
END = "<!-- end -->"
# A marker is a line of its own: the same words inside a sentence or a code span are text.
BLOCK = re.compile(r"^<!-- generated from (?P<source>[^\n]+?) -->\n(?P<body>.*?)^<!-- end -->$", re.DOTALL | re.MULTILINE)
OPENING = re.compile(r"^<!-- generated from ", re.MULTILINE)
HELP_WIDTH = 100  # columns of the --help text, whatever the terminal


class DocsError(Exception):
    """A block that cannot be made: an unknown source, a missing file, an unclosed block."""


# -- the command line ----------------------------------------------------------------------------
def _commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(path, command) of ``group`` and of every visible command under it, in the app's order."""
    found = [(path, group)]
    for name in group.list_commands(None):  # typer keeps the order in which commands were added
        command = group.commands[name]
        if getattr(command, "hidden", False):
            continue
        if hasattr(command, "commands"):
            found += _commands(command, (*path, name))
        else:
            found.append(((*path, name), command))
    return found


def cli_reference() -> str:
    """Each command's own ``--help``, under a heading of its name."""
    import typer
    from typer.testing import CliRunner

    from bctool.cli import app

    runner = CliRunner()
    parts = []
    for path, _ in _commands(typer.main.get_command(app)):
        result = runner.invoke(app, [*path, "--help"], prog_name="bctool", terminal_width=HELP_WIDTH,
                               max_content_width=HELP_WIDTH)
        if result.exit_code != 0:
            raise DocsError(f"`bctool {' '.join(path)} --help` exited with {result.exit_code}: {result.output}")
        text = "\n".join(line.rstrip() for line in result.stdout.strip("\n").splitlines())
        level = "#" * min(2 + max(len(path) - 1, 0), 4)
        parts.append(f"{level} `{' '.join(('bctool', *path))}`\n\n```text\n{text}\n```")
    return "\n\n".join(parts)


# -- the registries ------------------------------------------------------------------------------
def _escape(text: str) -> str:
    """Plain text for a Markdown table cell."""
    return text.replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;").replace(">", "&gt;")


def _code(text: str) -> str:
    """``text`` as a Markdown code span, whatever backticks it holds."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _pairs(values: dict[str, Any]) -> str:
    return "<br>".join(f"{_code(key)} = {_code(json.dumps(value, ensure_ascii=False))}" for key, value in values.items())


def registries_reference() -> str:
    """A table per kind: each built-in entry's name, description, parameters, declarations, origin."""
    from bctool.registry import BUILTIN, describe_kinds, registry

    parts = []
    for kind, entries in describe_kinds()["kinds"].items():
        rows = ["| name | description | parameters (default) | declares | origin |", "| --- | --- | --- | --- | --- |"]
        for entry in sorted((e for e in entries if e["origin"] == BUILTIN), key=lambda e: e["name"]):
            rows.append(f"| `{entry['name']}` | {_escape(entry['description'])} | {_pairs(entry['params'])} | "
                        f"{_pairs(entry['declares'])} | {entry['origin']} |")
        parts.append(f"## `{kind}`\n\n`bctool list {kind}`; plugins add to the entry-point group "
                     f"`{registry(kind).group}`.\n\n" + "\n".join(rows))
    return "\n\n".join(parts)


# -- blocks --------------------------------------------------------------------------------------
def _file(source: str) -> str:
    path = (ROOT / source).resolve()
    if not source.startswith("docs/") or DOCS not in path.parents:
        raise DocsError(f"{source!r} is not a file of the site: name a file under docs/")
    if not path.is_file():
        raise DocsError(f"{source!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if OPENING.search(text):
        raise DocsError(f"{source!r} holds generated blocks itself; include its sources instead")
    return text.strip("\n")


def render(source: str, cache: dict[str, str]) -> str:
    """The text of a block from ``source`` (each source made once per run)."""
    if source not in cache:
        if source == CLI:
            cache[source] = cli_reference()
        elif source == REGISTRIES:
            cache[source] = registries_reference()
        else:
            cache[source] = _file(source)
    return f"{START.format(source=source)}\n\n{cache[source]}\n\n{END}"


def regenerate(page: Path, text: str, cache: dict[str, str]) -> str:
    """``text`` of ``page`` with every generated block made again from its source."""
    name = page.relative_to(DOCS).as_posix()
    if len(OPENING.findall(text)) != len(BLOCK.findall(text)):
        raise DocsError(f"docs/{name}: a `<!-- generated from ... -->` comment without its `{END}`")
    return BLOCK.sub(lambda m: render(m.group("source"), cache), text)


def pages() -> list[Path]:
    """The site's Markdown pages, sorted."""
    return sorted(DOCS.rglob("*.md"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming the pages that differ from what would be written")
    args = parser.parse_args(argv)
    cache: dict[str, str] = {}
    differ: list[str] = []
    try:
        for page in pages():
            name = page.relative_to(DOCS).as_posix()
            text = page.read_text(encoding="utf-8")
            new = regenerate(page, text, cache)
            missing = [s for s in REQUIRED.get(name, []) if START.format(source=s) not in text]
            if missing:
                differ.append(f"docs/{name} (no block generated from {', '.join(missing)})")
            elif new != text:
                differ.append(f"docs/{name}")
                if not args.check:
                    page.write_text(new, encoding="utf-8")
        absent = [f"docs/{name} (missing)" for name in REQUIRED if not (DOCS / name).is_file()]
    except DocsError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    differ += absent
    if args.check:
        if differ:
            print("These pages differ from what scripts/make_docs.py writes (run it):", file=sys.stderr)
            for name in differ:
                print(f"  {name}", file=sys.stderr)
            return 1
        return 0
    for name in differ:
        print(f"wrote {name}" if "(" not in name else f"cannot write {name}: add the block by hand")
    return 1 if any("(" in name for name in differ) else 0


if __name__ == "__main__":
    sys.exit(main())
