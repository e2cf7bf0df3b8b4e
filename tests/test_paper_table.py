"""examples/paper_table.py: the summary and table from finished runs (no training here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from bctool.evaluate.compat import paper_scores

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "paper_table.py"


@pytest.fixture(scope="module")
def paper():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("paper_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_table"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _row(setting: str, seed: int, method: str, oo: float, nn: float, no: float) -> dict:
    curve = [{"fraction": f, "map": no + f * (nn - no)} for f in (0.0, 0.5, 1.0)]
    return {"setting": setting, "seed": seed, "method": method, "old": {"map": oo},
            "self": {"map": nn, "recall@1": nn}, "cross": {"map": no, "recall@1": no / 2}, "backfill": curve}


def test_summary_and_table_from_cached_runs(paper, tmp_path: Path) -> None:  # noqa: ANN001
    figures = {  # method: per seed (M(o,o), M(n,n), M(n,o))
        "independent": [(0.5, 0.7, 0.02), (0.6, 0.8, 0.03)],
        "bct": [(0.5, 0.6, 0.55), (0.6, 0.7, 0.58)],
    }
    for method, seeds in figures.items():
        for seed, (oo, nn, no) in enumerate(seeds):
            path = tmp_path / "extended-class" / f"seed{seed}" / f"{method}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_row("extended-class", seed, method, oo, nn, no)))
    runs = paper.collect(tmp_path)
    assert sorted(runs["extended-class"]) == ["bct", "independent"]
    summary = paper.summarise(runs["extended-class"])
    bct = summary["bct"]["per_seed"]
    assert bct[0]["gain"] == pytest.approx((0.55 - 0.5) / (0.7 - 0.5))
    expected = paper_scores([{"m_oo": 0.6, "m_nn": 0.7, "m_no": 0.58, "m_star": 0.8}])
    assert bct[1]["p_1"] == pytest.approx(expected["p_1"])
    text = paper.table("extended-class", summary, ["independent", "bct", "advbct"])
    assert "M(o,o) = 55.0 ± 7.1" in text
    assert "| bct | 65.0 ± 7.1 | 56.5 ± 2.1 | 28.2 ± 1.1 | 1/2 | 0.08 ± 0.25 |" in text  # seed 1: 58 < 60
    assert "advbct" not in text  # no runs, no row
