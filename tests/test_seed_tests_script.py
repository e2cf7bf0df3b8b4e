"""scripts/seed_tests.py: the verdicts on the results pages are the paired test of the run files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from bctool.evaluate.seeds import crossed_test, paired_seed_test

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "seed_tests.py"


@pytest.fixture(scope="module")
def seed_tests():  # noqa: ANN201 - the script as a module
    spec = importlib.util.spec_from_file_location("seed_tests", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["seed_tests"] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _score(old: np.ndarray, new: np.ndarray) -> dict:
    return {"map": float(new.mean()), "per_query": {"ids_sha256": "q", "old": old.tolist(), "new": new.tolist()}}


def _adapter_run(seed: int, rng: np.random.Generator) -> dict:
    old = rng.uniform(0, 1, 40)
    shifted = {k: np.clip(old + rng.normal(shift, 0.05, 40), 0, 1) for k, shift in (("a", 0.02), ("b", -0.03))}
    recipe = np.clip(old + rng.normal(0.01, 0.05, 40), 0, 1)
    return {"setting": "s", "seed": seed, "revision": "abc", "m_oo": float(old.mean()),
            "query_adapter": {"procrustes": {"alone": _score(old, shifted["a"])}},
            "gallery_transform": {"procrustes": _score(old, shifted["b"])},
            "recipe": {"cross": _score(old, recipe), "gallery_transform": {"affine": _score(old, shifted["a"])}}}


def test_adapter_figures_are_judged_by_the_paired_test_over_seeds(seed_tests) -> None:  # noqa: ANN001
    rng = np.random.default_rng(0)
    runs = {s: _adapter_run(s, rng) for s in range(5)}
    judged = seed_tests.judge_adapters(runs)
    assert set(judged) == {"query adapter procrustes, alone - old/old", "gallery transform procrustes - old/old",
                           "recipe - old/old", "recipe + gallery transform affine - old/old",
                           "recipe + gallery transform affine - recipe"}
    row = judged["gallery transform procrustes - old/old"]
    deltas = [100 * (runs[s]["gallery_transform"]["procrustes"]["map"] - runs[s]["m_oo"]) for s in range(5)]
    expected = paired_seed_test(deltas)
    assert row["paired"]["mean"] == pytest.approx(expected.mean) and row["paired"]["p"] == pytest.approx(expected.p)
    table = 100 * np.array([np.subtract(runs[s]["gallery_transform"]["procrustes"]["per_query"]["new"],
                                        runs[s]["gallery_transform"]["procrustes"]["per_query"]["old"]) for s in range(5)])
    assert row["crossed"]["mean"] == pytest.approx(crossed_test(table).mean) and row["queries"] == 40
    against_recipe = judged["recipe + gallery transform affine - recipe"]["deltas"]
    assert against_recipe == [round(100 * (runs[s]["recipe"]["gallery_transform"]["affine"]["map"]
                                           - runs[s]["recipe"]["cross"]["map"]), 3) for s in range(5)]
    assert seed_tests.verdict(row["paired"]) == "below 0"  # the transform was built 3 points worse
    assert "| s | gallery transform procrustes - old/old | 5 |" in seed_tests.markdown({"s": judged})


def test_the_verdict_names_both_directions_and_not_shown(seed_tests) -> None:  # noqa: ANN001
    assert seed_tests.verdict({"low": 0.1, "high": 2}) == "above 0"
    assert seed_tests.verdict({"low": -2, "high": -0.1}) == "below 0"
    assert seed_tests.verdict({"low": -1, "high": 1}) == "not shown"


ROOT = SCRIPT.parents[1]


@pytest.mark.parametrize(("folder", "mode"), [("docs/paper/seeds5", "paper"), ("docs/backfill/seeds5", "backfill"),
                                              ("docs/adapters/seeds5", "adapters"), ("docs/paper/pretrained", "paper"),
                                              ("docs/paper/pretrained-fashion", "paper"),
                                              ("docs/adapters/pretrained", "adapters"), ("docs/imported", "paper")])
def test_the_stored_verdicts_are_what_the_run_files_give(seed_tests, folder: str, mode: str) -> None:  # noqa: ANN001
    """The tables the results pages show are made again from the committed run files, here."""
    judged = seed_tests.judge_folder(ROOT / folder / "runs", mode)
    assert seed_tests.markdown(judged) == (ROOT / folder / "tests.md").read_text()
