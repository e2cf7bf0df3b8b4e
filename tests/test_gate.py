"""Negative and positive flips at rank 1, the classes that regressed, and the release gate
(`bctool evaluate --require`, exit 3 on a failed requirement)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bctool.cli import app
from bctool.embeddings import Embeddings, save_embeddings
from bctool.errors import ConfigError
from bctool.evaluate.gate import check_requirements, parse_requirement
from bctool.evaluate.protocols import make_protocol
from bctool.evaluate.reports import CompatibilityOptions, compatibility_report

runner = CliRunner()


def _emb(rows, labels, ids, names, sha: str) -> Embeddings:
    return Embeddings(np.asarray(rows, np.float32), np.asarray(labels, np.int64), list(ids), list(names),
                      model={"sha256": sha}, root="/data")


def _slow_top1(query: Embeddings, gallery: Embeddings) -> dict[str, bool]:
    """Rank 1 by brute force: highest cosine, ties to the lower gallery row, the query's own
    image left out; only queries with a relevant gallery row."""
    q = query.embeddings / np.linalg.norm(query.embeddings, axis=1, keepdims=True)
    g = gallery.embeddings / np.linalg.norm(gallery.embeddings, axis=1, keepdims=True)
    out = {}
    for i, image_id in enumerate(query.ids):
        label = query.label_names[query.labels[i]]
        candidates = [j for j in range(len(gallery)) if gallery.ids[j] != image_id]
        if not any(gallery.label_names[gallery.labels[j]] == label for j in candidates):
            continue
        scores = [(-float(np.float32(q[i] @ g[j])), j) for j in candidates]
        best = min(scores)[1]
        out[image_id] = gallery.label_names[gallery.labels[best]] == label
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flips_match_a_slow_reference_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    names = ["a", "b", "c", "d"]

    def model(sha: str) -> tuple[Embeddings, Embeddings]:
        # Few distinct directions, so many scores tie exactly.
        directions = rng.normal(size=(5, 6))
        g_rows = directions[rng.integers(0, 5, 40)]
        q_rows = directions[rng.integers(0, 5, 30)]
        return (_emb(q_rows, rng.integers(0, 4, 30), [f"q{i}" for i in range(30)], names, sha),
                _emb(g_rows, rng.integers(0, 4, 40), [f"g{i}" for i in range(40)], names, sha))

    old, new = model("o" * 64), model("n" * 64)
    new = (Embeddings(new[0].embeddings, old[0].labels, old[0].ids, names, model=new[0].model, root="/data"),
           Embeddings(new[1].embeddings, old[1].labels, old[1].ids, names, model=new[1].model, root="/data"))
    report = compatibility_report(old, new, make_protocol(), options=CompatibilityOptions(bootstrap=200, seed=seed))
    before, after = _slow_top1(*old), _slow_top1(new[0], old[1])
    shared = sorted(set(before) & set(after))
    negative = sum(before[i] and not after[i] for i in shared)
    positive = sum(after[i] and not before[i] for i in shared)
    flips = report["flips"]["new/old"]
    assert (flips["nfr_count"], flips["pfr_count"], flips["queries"]) == (negative, positive, len(shared))
    assert flips["nfr"] == pytest.approx(negative / len(shared))
    assert flips["nfr_low"] <= flips["nfr"] <= flips["nfr_high"]


def test_a_flip_at_rank_1_is_counted_exactly() -> None:
    """Three queries: q0 right before and wrong after (a negative flip), q1 wrong before and
    right after (a positive flip), q2 right both times."""
    names = ["x", "y"]
    gallery = _emb([[1, 0], [0, 1]], [0, 1], ["gx", "gy"], names, "o" * 64)
    old_query = _emb([[1, 0.1], [1, 0.2], [0.1, 1]], [0, 1, 1], ["q0", "q1", "q2"], names, "o" * 64)
    new_query = _emb([[0.1, 1], [0.2, 1], [0.1, 1]], [0, 1, 1], ["q0", "q1", "q2"], names, "n" * 64)
    new_gallery = _emb([[1, 0], [0, 1]], [0, 1], ["gx", "gy"], names, "n" * 64)
    report = compatibility_report((old_query, gallery), (new_query, new_gallery), make_protocol(),
                                  options=CompatibilityOptions(bootstrap=0))
    flips = report["flips"]["new/old"]
    assert (flips["nfr_count"], flips["pfr_count"], flips["queries"]) == (1, 1, 3)
    assert flips["nfr"] == pytest.approx(1 / 3) and "nfr_low" not in flips
    assert report["regressed_classes"]["new/old"] == [{"class": "x", "old": 1.0, "new": 0.5, "queries": 1}]


def test_requirements_parse_and_check() -> None:
    report = {"compatible": True, "compatible_significant": False, "delta": 0.02, "m_star": None,
              "flips": {"new/old": {"nfr": 0.04, "pfr": 0.1}, "new/new": {"nfr": 0.07}}}
    checked = check_requirements([parse_requirement(t) for t in
                                  ("compatible", "compatible_significant", "nfr<=0.05", "delta >= 0.01",
                                   "nfr_new_new<0.05", "pfr>1e-2")], report)
    assert [c["passed"] for c in checked] == [True, False, True, True, False, True]
    assert checked[2] == {"expression": "nfr<=0.05", "key": "nfr", "value": 0.04, "passed": True}
    for bad in ("nfr <= ", "nfr=0.05", "<= 0.1", "delta >= x", "a b"):
        with pytest.raises(ConfigError, match="is not a requirement; write KEY"):
            parse_requirement(bad)
    with pytest.raises(ConfigError, match="this report has no 'm_total'; its keys: compatible, compatible_significant, delta, m_star, nfr"):
        check_requirements([parse_requirement("m_total>0")], report)
    # A figure the report left empty fails its requirement (exit 3), it is not an unknown key.
    assert check_requirements([parse_requirement("m_star>0"), parse_requirement("m_star")], report)[0]["passed"] is False
    with pytest.raises(ConfigError, match="delta is a number"):
        check_requirements([parse_requirement("delta")], report)


@pytest.fixture
def report_files(tmp_path: Path) -> list[str]:
    names = ["x", "y"]
    files = {"oq": ([[1, 0.1], [0.1, 1]], "o"), "og": ([[1, 0], [0, 1]], "o"),
             "nq": ([[1, 0.2], [0.2, 1]], "n"), "ng": ([[1, 0], [0, 1]], "n")}
    for name, (rows, sha) in files.items():
        ids = ["q0", "q1"] if name.endswith("q") else ["g0", "g1"]
        save_embeddings(_emb(rows, [0, 1], ids, names, sha * 64), tmp_path / f"{name}.safetensors")
    return ["evaluate", "--old-query", str(tmp_path / "oq.safetensors"), "--old-gallery", str(tmp_path / "og.safetensors"),
            "--new-query", str(tmp_path / "nq.safetensors"), "--new-gallery", str(tmp_path / "ng.safetensors"),
            "--bootstrap", "50", "-q"]


def test_the_gate_passes_fails_and_refuses_bad_expressions(report_files: list[str]) -> None:
    passed = runner.invoke(app, [*report_files, "--require", "delta>=0", "--require", "nfr<=0.05"])
    assert passed.exit_code == 0, passed.stderr
    out = json.loads(passed.stdout)
    assert [r["passed"] for r in out["requirements"]] == [True, True] and out["flips"]["new/old"]["nfr"] == 0.0
    # M(n,o) equals M(o,o) here: "compatible" (strictly above) fails, the JSON still comes out.
    failed = runner.invoke(app, [*report_files, "--require", "compatible", "--require", "nfr<=0.05"])
    assert failed.exit_code == 3
    assert [r["passed"] for r in json.loads(failed.stdout)["requirements"]] == [False, True]
    malformed = runner.invoke(app, [*report_files, "--require", "nfr=<0.05"])
    assert malformed.exit_code == 2 and "is not a requirement; write KEY" in malformed.stderr
    assert malformed.stdout == ""
    unknown = runner.invoke(app, [*report_files, "--require", "nfr_total<0.1"])
    assert unknown.exit_code == 2 and "this report has no 'nfr_total'; its keys:" in unknown.stderr
    assert "nfr_new_new" in unknown.stderr
    plain = runner.invoke(app, ["evaluate", "--query", report_files[2], "--gallery", report_files[4],
                                "--require", "map>=0.5", "-q"])
    assert plain.exit_code == 0 and json.loads(plain.stdout)["requirements"][0]["passed"]
