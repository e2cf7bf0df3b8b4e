"""experiments/paper_table.py: the summary and table from finished runs (no training here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from bctool.evaluate.scores import paper_scores

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "paper_table.py"


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
    text = paper.table("extended-class", {"extended-class": summary}, ["independent", "bct", "advbct"])
    assert "M(o,o) = 55.0 ± 7.1" in text
    assert "| bct | 65.0 ± 7.1 / 56.5 ± 2.1 | 28.2 ± 1.1 / 0.08 ± 0.25 | 1/2 |" in text  # seed 1: 58 < 60
    assert "advbct" not in text  # no runs, no row


def test_scores_summarise_over_the_datasets_of_a_setting(paper, tmp_path: Path) -> None:  # noqa: ANN001
    figures = {  # (setting, seed, method): (M(o,o), M(n,n), M(n,o))
        ("extended-data", 0, "independent"): (0.5, 0.7, 0.01),
        ("extended-data", 0, "bct"): (0.5, 0.65, 0.45),
        ("extended-data", 1, "independent"): (0.5, 0.72, 0.01),
        ("extended-data", 1, "bct"): (0.5, 0.66, 0.47),
        ("extended-data-fashion", 0, "independent"): (0.8, 0.85, 0.1),
        ("extended-data-fashion", 0, "bct"): (0.8, 0.84, 0.82),
        ("extended-class", 0, "independent"): (0.6, 0.7, 0.02),
    }
    for (setting, seed, method), (oo, nn, no) in figures.items():
        path = tmp_path / setting / f"seed{seed}" / f"{method}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_row(setting, seed, method, oo, nn, no)))
    sections, summaries = paper.report(paper.collect(tmp_path))
    assert [s.splitlines()[0].split("**")[1] for s in sections] == ["extended-class", "extended-data"]
    data = sections[1]
    assert "emoji self / cross" in data and "Fashion-MNIST self / cross" in data
    seed0 = paper_scores([{"m_oo": 0.5, "m_nn": 0.65, "m_no": 0.45, "m_star": 0.7},
                          {"m_oo": 0.8, "m_nn": 0.84, "m_no": 0.82, "m_star": 0.85}])
    seed1 = paper_scores([{"m_oo": 0.5, "m_nn": 0.66, "m_no": 0.47, "m_star": 0.72}])  # emoji alone
    bct = next(line for line in data.splitlines() if line.startswith("| bct |"))
    cells = [c.strip() for c in bct.strip("|").split("|")]
    assert cells[5] == "1/3"  # fashion seed 0 beats its old model (0.82 > 0.8)
    p1 = [seed0["p_1"], seed1["p_1"]]
    mean, spread = cells[-1].split(" ± ")
    assert float(mean) == pytest.approx(sum(p1) / 2, abs=0.05)
    assert float(spread) == pytest.approx(abs(p1[0] - p1[1]) / 2 ** 0.5, abs=0.05)
    assert set(summaries) == {"extended-class", "extended-data", "extended-data-fashion"}


def test_seeds_are_judged_by_the_paired_test_on_their_deltas(paper) -> None:  # noqa: ANN001
    """experiments/compat_significance.py: the seeds' mean delta is judged by the paired t test on the
    seed deltas (in mAP points), with the crossed seeds x queries estimate beside it; one seed
    gives no test over seeds."""
    import numpy as np

    from bctool.evaluate.seeds import paired_seed_test

    spec = importlib.util.spec_from_file_location("compat_significance", SCRIPT.with_name("compat_significance.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    rng = np.random.default_rng(0)
    per_seed = {s: {"diff": rng.normal(0.01 * s, 0.2, 500)} for s in range(3)}
    for r in per_seed.values():
        r["delta"] = float(r["diff"].mean())
    judged = module.over_seeds(per_seed)
    expected = paired_seed_test([100 * per_seed[s]["delta"] for s in range(3)])
    assert judged["paired"]["mean"] == pytest.approx(expected.mean) and judged["paired"]["p"] == pytest.approx(expected.p)
    assert judged["crossed"]["seeds"] == 3 and judged["crossed"]["low"] < judged["crossed"]["mean"] < judged["crossed"]["high"]
    assert module.over_seeds({0: per_seed[0]}) == {}


def test_a_cached_run_of_other_views_or_old_side_is_refused(paper, tmp_path: Path) -> None:  # noqa: ANN001
    """Runs from before the regime options (crops for every model, no record) and runs against
    another old side are not silently reused for a table of clean views."""
    from bctool.train import TrainConfig

    base = TrainConfig.from_options(image_size=32, lr=0.03, epochs=30)
    old_base = base.replace(lr=0.1)
    legacy = {**_row("extended-class-warm", 0, "bct", 0.5, 0.6, 0.55), "lr": 0.03, "epochs": 30, "old_epochs": 30,
              "old_seed": 1000, "compat_weight": 1.0}
    path = tmp_path / "extended-class-warm" / "seed0" / "bct.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(legacy))
    with pytest.raises(SystemExit, match=r"augment crop there, none asked"):
        paper.run_method(paper.Study(tmp_path, tmp_path, tmp_path, base, old_base), "extended-class-warm", 0, "bct", 1000)
    # against the old model on the same views, bctool's views are crops: the legacy run matches but its old side
    with pytest.raises(SystemExit, match=r"old_source embeddings there, model asked"):
        paper.run_method(paper.Study(tmp_path, tmp_path, tmp_path, base, old_base, old_source="model"),
                         "extended-class-warm", 0, "bct", 1000)
    path.write_text(json.dumps({**legacy, **paper._views(base, old_base, "embeddings")}))
    assert paper.run_method(paper.Study(tmp_path, tmp_path, tmp_path, base, old_base), "extended-class-warm", 0, "bct", 1000)["seed"] == 0


def test_significance_finds_the_old_model_of_a_tagged_run() -> None:
    spec = importlib.util.spec_from_file_location("compat_significance", SCRIPT.parent / "compat_significance.py")
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert module.old_tag("-lr0.03") == "" and module.old_tag("-lr0.03-none") == ""  # old model on crops
    assert module.old_tag("-lr0.03-none-old-none") == "-none"
    assert module.old_tag("-paper-paper-old-none") == "-paper-none"


@pytest.mark.parametrize(("folder", "seeds"), [("docs/paper/seeds5", [0, 1, 2, 3, 4]),
                                               ("docs/paper/seeds5/fresh", [0, 1, 2, 3, 4])])
def test_a_stored_table_is_what_its_run_files_give(paper, folder: str, seeds: list[int]) -> None:  # noqa: ANN001
    """The tables the results pages include are made again from the committed run files, here."""
    root = SCRIPT.parents[1] / folder
    sections, _ = paper.report(paper.collect(root / "runs", seeds))
    suffix = "-seeds-" + "-".join(map(str, seeds))
    assert "\n\n".join(sections) + "\n" == (root / f"table{suffix}.md").read_text()


def test_the_adapter_table_is_what_its_run_files_give() -> None:
    spec = importlib.util.spec_from_file_location("adapter_table", SCRIPT.parent / "adapter_table.py")
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        module = importlib.util.module_from_spec(spec)
        sys.modules["adapter_table"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        sys.path.remove(str(SCRIPT.parent))
    root = SCRIPT.parents[1] / "docs" / "adapters" / "seeds5"
    rows = [json.loads(p.read_text()) for p in sorted((root / "runs").glob("*/seed*.json"))]
    assert module.report(rows, [0.25, 0.5, 0.75]) + "\n" == (root / "table-seeds-0-1-2-3-4.md").read_text()


def test_the_imported_old_model_table_is_what_its_run_files_give() -> None:
    """docs/imported/table.md, made again from the committed runs: the imported old model gives
    the native one's figures in every seed, and the table says so."""
    spec = importlib.util.spec_from_file_location("imported_old_model", SCRIPT.parent / "imported_old_model.py")
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        module = importlib.util.module_from_spec(spec)
        sys.modules["imported_old_model"] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        sys.path.remove(str(SCRIPT.parent))
    root = SCRIPT.parents[1] / "docs" / "imported"
    table = module.report(root / "runs", [0, 1, 2, 3, 4])
    assert table == (root / "table.md").read_text()
    assert "| imported: M(n,o) | 5 | 0 (every seed identical) |" in table
