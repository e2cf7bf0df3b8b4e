"""The documentation site: its generated pages are current, and mkdocs builds it without a warning.

(That every command and option has help text, which reference/cli.md is made from, is
`test_cli.py::test_every_command_and_option_has_help`.)
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _make_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "scripts" / "make_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_pages_are_what_make_docs_writes(capsys: pytest.CaptureFixture[str]) -> None:
    code = _make_docs().main(["--check"])
    assert code == 0, f"run `python scripts/make_docs.py`:\n{capsys.readouterr().err}"


def test_check_names_a_stale_page_and_a_write_keeps_the_prose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    make_docs = _make_docs()
    docs = tmp_path / "docs"
    (docs / "results").mkdir(parents=True)
    (docs / "table.md").write_text("| a | b |\n| --- | --- |\n| 1 | 2 |\n")
    page = docs / "results" / "study.md"
    prose = "# A study\n\nWritten by hand.\n\n"
    page.write_text(prose + "<!-- generated from docs/table.md -->\n\n| a | b |\n| 1 | 9 |\n\n<!-- end -->\n\nMore prose.\n")
    (docs / "results" / "fresh.md").write_text("# Nothing generated here\n")
    monkeypatch.setattr(make_docs, "ROOT", tmp_path)
    monkeypatch.setattr(make_docs, "DOCS", docs)
    monkeypatch.setattr(make_docs, "REQUIRED", {"results/study.md": ["docs/table.md"], "results/gone.md": ["docs/table.md"]})

    assert make_docs.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "docs/results/study.md" in err and "docs/results/gone.md (missing)" in err
    assert "fresh.md" not in err
    assert "| 1 | 9 |" in page.read_text()  # --check writes nothing

    make_docs.main([])
    assert page.read_text() == (prose + "<!-- generated from docs/table.md -->\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n"
                                "<!-- end -->\n\nMore prose.\n")
    monkeypatch.setattr(make_docs, "REQUIRED", {"results/study.md": ["docs/table.md"]})
    assert make_docs.main(["--check"]) == 0

    page.write_text(prose + "<!-- generated from docs/nowhere.md -->\n<!-- end -->\n")
    assert make_docs.main(["--check"]) == 2
    assert "'docs/nowhere.md' does not exist" in capsys.readouterr().err


def test_the_site_builds_without_a_warning(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs-material is not installed: pip install -e '.[dev]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                           "--site-dir", str(tmp_path / "site")], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    site = tmp_path / "site"
    assert (site / "reference" / "cli" / "index.html").is_file()
    assert not list(site.rglob("runs*")), "the run folders are left out of the site"


# A measured figure: a decimal (61.5, +2.11, -0.3), a per-seed count (3 of 3, 2/3) or a percentage.
FIGURE = re.compile(r"(?<![\w.])[+\-−]?\d+\.\d+(?![\w.])|\b\d+ of \d+\b|(?<![\w/])\d+/\d+(?![\w/])|\b\d+(?:\.\d+)?\s?%")


def hand_typed_figures(text: str) -> list[str]:
    """The figures of a page outside its generated blocks, code and links: those typed by hand."""
    text = re.sub(r"^<!-- generated from .*?^<!-- end -->$", "", text, flags=re.S | re.M)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"\]\([^)\s]*\)", "]", text)
    return FIGURE.findall(text)


def test_hand_typed_figures_are_found_and_generated_ones_are_not() -> None:
    page = ("M(o,o) 60.2 and +2.11, 3 of 3 seeds, 2/3, 95% and `0.03` [t](../a-1.2.md)\n"
            "<!-- generated from docs/x.md -->\n| 61.5 |\n<!-- end -->\n```bash\nx --lr 0.1\n```\n")
    assert hand_typed_figures(page) == ["60.2", "+2.11", "3 of 3", "2/3", "95%"]


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs" / "results").glob("*.md")))
def test_no_figure_on_a_results_page_is_typed_by_hand(page: str) -> None:
    """Every figure of a results page comes from a stored file, through a generated block."""
    figures = hand_typed_figures((ROOT / "docs" / "results" / page).read_text(encoding="utf-8"))
    assert not figures, f"docs/results/{page} types figures by hand: {figures[:12]}"
