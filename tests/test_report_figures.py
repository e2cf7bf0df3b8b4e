"""Report figures that must stay honest on awkward input: the update gain (and P_comp, P_1) is
null unless the independent model beats the old one, all-zero gallery rows are warned about on
every evaluation path, and ids given twice are refused as `bctool convert` refuses them."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bctool.cli import app
from bctool.embeddings import (
    Embeddings,
    LazyRows,
    RowIds,
    load_embeddings,
    save_embeddings,
)
from bctool.errors import EmbeddingsError
from bctool.evaluate.inputs import repeated_ids, warn_zero_rows
from bctool.evaluate.protocols import make_protocol
from bctool.evaluate.reports import (
    BackfillOptions,
    CompatibilityOptions,
    backfill_report,
    chain_report,
    compatibility_report,
)
from bctool.evaluate.retrieval import evaluate_retrieval
from bctool.evaluate.search import SearchOptions
from bctool.evaluate.scores import compatibility_verdict, paper_scores, update_gain

runner = CliRunner()
NAMES = ["x", "y"]
UNDEFINED = "not above M(o,o)=1.0000: the update gain is undefined"


def _emb(rows, labels, ids, sha: str) -> Embeddings:
    return Embeddings(np.asarray(rows, np.float32), np.asarray(labels, np.int64), list(ids), list(NAMES),
                      model={"sha256": sha * 64}, root="/data")


def _text(output: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(output.split())


# --- the update gain ------------------------------------------------------------------------


def test_the_update_gain_and_p_comp_are_null_unless_the_independent_model_improves() -> None:
    assert update_gain(0.45, 0.5, 0.4) is None and update_gain(0.6, 0.5, 0.5) is None
    assert update_gain(0.6, 0.5, float("nan")) is None
    assert update_gain(0.45, 0.5, 0.7) == pytest.approx(-0.25)  # a worse new model under a better one: defined
    report = compatibility_verdict({"m_oo": 0.5, "m_nn": 0.45, "m_no": 0.42, "m_star": 0.4})
    # Before: (0.42 - 0.5) / (0.4 - 0.5) = 0.8, a "gain" for a new model below the old one.
    assert (report["update_gain"], report["p_comp"], report["p_1"]) == (None, None, None)
    assert report["p_up"] == pytest.approx(100 / (1 + np.exp(-0.125)))  # (0.45 - 0.4) / 0.4 is defined
    reason = report["undefined"]["update_gain"]
    assert "the independent model scores M(*,*)=0.4000, not above M(o,o)=0.5000: the update gain is undefined" in reason
    assert set(report["undefined"]) == {"update_gain", "p_comp", "p_1"}
    assert json.loads(json.dumps(report))["update_gain"] is None


def test_paper_scores_are_null_when_one_dataset_has_no_gain(caplog: pytest.LogCaptureFixture) -> None:
    good = {"m_oo": 0.5, "m_nn": 0.72, "m_no": 0.6, "m_star": 0.8}
    worse = {"m_oo": 0.5, "m_nn": 0.45, "m_no": 0.42, "m_star": 0.4}
    with caplog.at_level(logging.WARNING, logger="bctool.evaluate.scores"):
        scores = paper_scores([good, worse])
    assert scores["p_comp"] is None and scores["p_1"] is None
    assert scores["p_up"] == pytest.approx(100 / (1 + np.exp(-(-0.1 + 0.125) / 2)))
    assert "dataset 1: the independent model scores M(*,*)=0.4000" in caplog.text
    assert paper_scores([good])["p_comp"] == pytest.approx(58.2570206, abs=1e-6)


@pytest.fixture
def worse_independent(tmp_path: Path) -> dict[str, Path]:
    """Old model perfect (M(o,o) = 1), an independent model that ranks one query wrong and a new
    model that ranks both wrong against the old gallery: M(n,o) < M(*,*) < M(o,o)."""
    gallery = ([[1, 0], [0, 1], [1, 0.1], [0.1, 1]], [0, 1, 0, 1], ["g0", "g1", "g2", "g3"])
    files = {
        "oq": _emb([[1, 0.05], [0.05, 1]], [0, 1], ["q0", "q1"], "o"), "og": _emb(*gallery, "o"),
        "nq": _emb([[0.05, 1], [1, 0.05]], [0, 1], ["q0", "q1"], "n"), "ng": _emb(*gallery, "n"),
        "iq": _emb([[1, 0.05], [1, 0.05]], [0, 1], ["q0", "q1"], "i"), "ig": _emb(*gallery, "i"),
    }
    paths = {}
    for name, emb in files.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        save_embeddings(emb, paths[name])
    return paths


def _report_args(paths: dict[str, Path], independent: tuple[str, str] = ("iq", "ig")) -> list[str]:
    return ["evaluate", "--old-query", str(paths["oq"]), "--old-gallery", str(paths["og"]),
            "--new-query", str(paths["nq"]), "--new-gallery", str(paths["ng"]),
            "--independent-query", str(paths[independent[0]]), "--independent-gallery", str(paths[independent[1]]),
            "--bootstrap", "0"]


def test_a_gate_on_the_update_gain_of_a_worse_independent_model_fails(worse_independent: dict[str, Path]) -> None:
    result = runner.invoke(app, [*_report_args(worse_independent), "--require", "update_gain>=0.5", "-q"])
    assert result.exit_code == 3, result.output
    out = json.loads(result.stdout)
    assert out["m_star"] < out["m_oo"] == 1.0 and out["m_no"] < out["m_star"]
    assert (out["update_gain"], out["p_comp"], out["p_1"]) == (None, None, None)
    [requirement] = out["requirements"]
    assert requirement["passed"] is False and requirement["value"] is None
    assert requirement["reason"].startswith("update_gain is undefined (null): the independent model scores M(*,*)=")
    assert UNDEFINED in requirement["reason"]
    assert UNDEFINED in _text(result.stderr)  # the warning says why, too


def test_an_independent_model_equal_to_the_old_one_reports_a_null_gain(worse_independent: dict[str, Path]) -> None:
    result = runner.invoke(app, [*_report_args(worse_independent, ("oq", "og")), "-q"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["m_star"] == out["m_oo"] and (out["update_gain"], out["p_comp"], out["p_1"]) == (None, None, None)
    assert out["undefined"]["p_comp"] == out["undefined"]["update_gain"]
    assert f"the independent model scores M(*,*)=1.0000, {UNDEFINED}" in out["undefined"]["update_gain"]


def test_the_demo_takes_the_reports_update_gain(worse_independent: dict[str, Path]) -> None:
    """The demo's summary once divided M(n,o) - M(o,o) by M(*,*) - M(o,o) itself: two negatives
    made a gain (1.0 where M(*,*) happened to equal M(n,o))."""
    from bctool.demo import DemoConfig, _evaluate, update_gain_figures

    files = {name: load_embeddings(path) for name, path in worse_independent.items()}
    embeddings = {model: {"query": files[f"{model[0]}q"], "gallery": files[f"{model[0]}g"]}
                  for model in ("old", "new", "independent")}
    report, results = _evaluate(embeddings, ["old", "new", "independent"], DemoConfig(bootstrap=0))
    assert results["ind/ind"]["map"] < results["old/old"]["map"] and report["update_gain"] is None
    figures = update_gain_figures(report)
    assert figures["update_gain"] is None and UNDEFINED in figures["undefined"]["update_gain"]
    better = {**report, "update_gain": 0.25}
    better.pop("undefined")
    assert update_gain_figures(better) == {"update_gain": 0.25}


# --- all-zero gallery rows ------------------------------------------------------------------


def _labelled(n: int, seed: int, sha: str, zero: tuple[int, ...] = ()) -> Embeddings:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    rows = rng.normal(size=(n, 4)).astype(np.float32) + labels[:, None]
    rows[list(zero)] = 0
    return _emb(rows, labels, [f"img{i}" for i in range(n)], sha)


def test_an_all_zero_gallery_is_warned_about_on_the_command_line(tmp_path: Path) -> None:
    save_embeddings(_labelled(6, 0, "n"), tmp_path / "q.safetensors")
    zero = _labelled(8, 1, "n", zero=tuple(range(8)))
    zero = Embeddings(zero.embeddings, zero.labels, [f"g{i}" for i in range(8)], NAMES)
    save_embeddings(zero, tmp_path / "g.safetensors")
    result = runner.invoke(app, ["evaluate", "--query", str(tmp_path / "q.safetensors"),
                                 "--gallery", str(tmp_path / "g.safetensors"), "-q"])
    assert result.exit_code == 0, result.output
    assert "8 of 8 gallery rows are all zero (first 'g0', row 0)" in _text(result.stderr)


def _every_path(old: tuple[Embeddings, Embeddings], new: tuple[Embeddings, Embeddings]) -> dict[str, object]:
    protocol = make_protocol()
    return {
        "single": lambda: protocol.evaluate(new[0], old[1]),
        "streamed top-k": lambda: evaluate_retrieval(new[0], old[1], search=SearchOptions(top_k=5)),
        "compatibility": lambda: compatibility_report(old, new, protocol, options=CompatibilityOptions(bootstrap=0)),
        "chain": lambda: chain_report([old, new], protocol),
        "backfill": lambda: backfill_report(new[0], old[1], new[1], protocol, BackfillOptions((0.0, 0.5, 1.0))),
    }


@pytest.mark.parametrize("path", ["single", "streamed top-k", "compatibility", "chain", "backfill"])
def test_zero_gallery_rows_are_warned_about_once_on_every_path(path: str, caplog: pytest.LogCaptureFixture) -> None:
    n = 130  # more than the 100 ranks searched, so --top-k streams the gallery
    old = (_labelled(10, 0, "o"), _labelled(n, 1, "o", zero=(7, 50, 51)))
    new = (_labelled(10, 2, "n"), _labelled(n, 3, "n"))
    with caplog.at_level(logging.WARNING, logger="bctool.evaluate"):
        _every_path(old, new)[path]()
    warnings = [r.getMessage() for r in caplog.records if "rows are all zero" in r.getMessage()]
    assert len(warnings) == 1, warnings  # each gallery once, however many pairs read it
    assert "3 of 130" in warnings[0] and "(first 'img7', row 7)" in warnings[0]


class _Blocks(LazyRows):
    """Rows read on demand that remember the largest read."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows, self.shape, self.dtype, self.largest = rows, rows.shape, rows.dtype, 0

    def _slice(self, start: int, stop: int) -> np.ndarray:
        self.largest = max(self.largest, stop - start)
        return self.rows[start:stop]

    def _take(self, index: np.ndarray) -> np.ndarray:
        raise AssertionError("zero rows are counted in blocks, not by row numbers")


def test_zero_rows_are_counted_block_by_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    import bctool.evaluate.inputs

    monkeypatch.setattr(bctool.evaluate.inputs, "_ZERO_BLOCK_BYTES", 10 * 4 * 4)  # 10 rows a block
    gallery = _labelled(95, 4, "o", zero=(33, 34, 90))
    lazy = _Blocks(gallery.embeddings)
    with caplog.at_level(logging.WARNING, logger="bctool.evaluate.inputs"):
        assert warn_zero_rows(Embeddings(lazy, gallery.labels, gallery.ids, NAMES)) == 3
    assert lazy.largest == 10 and "3 of 95 gallery rows are all zero (first 'img33', row 33)" in caplog.text
    save_embeddings(gallery, tmp_path / "g.safetensors")
    mapped = load_embeddings(tmp_path / "g.safetensors", mmap=True)
    assert warn_zero_rows(mapped) == 3 and warn_zero_rows(mapped) == 0  # a file is read once
    assert warn_zero_rows(_labelled(95, 4, "o")) == 0


# --- ids given twice ------------------------------------------------------------------------

TWICE = "id 'g1' is given twice; ids must be unique"


def test_repeated_ids_are_found_by_hashing() -> None:
    rng = np.random.default_rng(0)
    ids = [f"img/{i}" for i in rng.integers(0, 400, 500)]
    expected = sorted(i for i, c in Counter(ids).items() if c > 1)
    assert repeated_ids(RowIds.encode(ids)) == expected == repeated_ids(ids)
    assert repeated_ids(RowIds.encode(["a", "b", ""])) == []


@pytest.fixture
def twice(tmp_path: Path) -> dict[str, Path]:
    """Queries and a gallery whose ids repeat, with files of unique ids beside them."""
    rows = [[1, 0], [0, 1], [1, 0.2], [0.2, 1]]
    paths = {}
    for name, ids in (("unique", ["g0", "g1", "g2", "g3"]), ("twice", ["g0", "g1", "g1", "g3"])):
        for sha in "on":
            paths[f"{name}-{sha}"] = tmp_path / f"{name}-{sha}.safetensors"
            save_embeddings(_emb(rows, [0, 1, 0, 1], ids, sha), paths[f"{name}-{sha}"])
    return paths


@pytest.mark.parametrize("repeated", ["query", "gallery"])
def test_evaluate_refuses_ids_given_twice(twice: dict[str, Path], repeated: str) -> None:
    files = {"query": twice["unique-o"], "gallery": twice["unique-o"], repeated: twice["twice-o"]}
    result = runner.invoke(app, ["evaluate", "--query", str(files["query"]), "--gallery", str(files["gallery"]), "-q"])
    assert result.exit_code == 1 and f"the {repeated} embeddings: {TWICE}" in _text(result.stderr)
    assert result.stdout == ""


@pytest.mark.parametrize("role", ["old", "new"])
@pytest.mark.parametrize("part", ["query", "gallery"])
def test_the_compatibility_report_refuses_ids_given_twice(twice: dict[str, Path], role: str, part: str) -> None:
    files = {"old-query": twice["unique-o"], "old-gallery": twice["unique-o"],
             "new-query": twice["unique-n"], "new-gallery": twice["unique-n"]}
    files[f"{role}-{part}"] = twice[f"twice-{role[0]}"]
    args = [arg for flag, path in files.items() for arg in (f"--{flag}", str(path))]
    result = runner.invoke(app, ["evaluate", *args, "--bootstrap", "0", "-q"])
    what = "queries" if part == "query" else "gallery"
    assert result.exit_code == 1 and f"the {role} {what}: {TWICE}" in _text(result.stderr), result.output


def test_convert_backfill_plan_and_evaluate_give_one_answer(twice: dict[str, Path], tmp_path: Path) -> None:
    path = str(twice["twice-o"])
    outputs = [
        runner.invoke(app, ["convert", path, "--out", str(tmp_path / "c.npy")]),
        runner.invoke(app, ["backfill", "plan", path, "--out", str(tmp_path / "plan.txt"), "--policy", "random"]),
        runner.invoke(app, ["evaluate", "--query", path, "--gallery", path, "-q"]),
    ]
    for result in outputs:
        assert result.exit_code == 1 and TWICE in _text(result.stderr), result.output
    with pytest.raises(EmbeddingsError, match="the query embeddings: id 'g1' is given twice"):
        evaluate_retrieval(load_embeddings(path), load_embeddings(twice["unique-o"]))
