"""The label-free change report: overlap, rank-biased overlap, changed first results and the
identity check, against slow references and on models that change nothing or everything."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bctool.cli import app
from bctool.embeddings import Embeddings, save_embeddings
from bctool.evaluate.changes import ChangeOptions, change_report, overlaps, rank_biased_overlap


def _rbo_reference(a: list[int], b: list[int], p: float) -> float:
    k = len(a)
    x = [len(set(a[:d]) & set(b[:d])) for d in range(1, k + 1)]
    return x[-1] / k * p**k + (1 - p) / p * sum(x[d - 1] / d * p**d for d in range(1, k + 1))


def test_overlap_and_rbo_match_the_slow_reference() -> None:
    rng = np.random.default_rng(0)
    a = np.stack([rng.permutation(30)[:10] for _ in range(50)])
    b = np.stack([rng.permutation(30)[:10] for _ in range(50)])
    b[:5] = a[:5]  # identical lists: RBO 1
    for i in range(50):
        assert overlaps(a, b)[i, -1] == len(set(a[i]) & set(b[i]))
    expected = [_rbo_reference(list(x), list(y), 0.9) for x, y in zip(a, b)]
    np.testing.assert_allclose(rank_biased_overlap(a, b, 0.9), expected, atol=1e-12)
    assert rank_biased_overlap(a[:5], b[:5]).tolist() == pytest.approx([1.0] * 5)


def _emb(rows: np.ndarray, prefix: str) -> Embeddings:
    return Embeddings(rows.astype(np.float32), np.full(len(rows), -1), [f"{prefix}{i}" for i in range(len(rows))], [])


def _world(seed: int = 0) -> dict[str, Embeddings]:
    rng = np.random.default_rng(seed)
    return {"oq": _emb(rng.normal(size=(40, 16)), "q"), "og": _emb(rng.normal(size=(300, 16)), "g"),
            "iq": _emb(rng.normal(size=(40, 16)), "q"), "ig": _emb(rng.normal(size=(300, 16)), "g")}


def test_a_model_that_changes_nothing_keeps_every_list_and_identity() -> None:
    w = _world()
    report = change_report((w["oq"], w["og"]), (w["oq"], w["og"]), ChangeOptions(bootstrap=100))
    for pair in ("new/old", "new/new"):
        assert report[pair]["overlap@10"] == 1 and report[pair]["rbo"] == pytest.approx(1)
        assert report[pair]["top1_changed"] == 0
    assert report["identity"]["identity_top1"] == 1 and report["identity"]["identity_mrr"] == 1


def test_an_unrelated_model_changes_nearly_everything() -> None:
    w = _world()
    report = change_report((w["oq"], w["og"]), (w["iq"], w["ig"]), ChangeOptions(bootstrap=200))
    assert report["new/old"]["overlap@10"] < 0.15 and report["new/old"]["top1_changed"] > 0.85
    assert report["new/new"]["rbo"] < 0.15
    assert report["identity"]["identity_top1"] < 0.05 and report["identity"]["identity_images"] == 300
    low, high = report["new/old"]["top1_changed_low"], report["new/old"]["top1_changed_high"]
    assert low <= report["new/old"]["top1_changed"] <= high


def test_the_gate_reads_the_label_free_keys(tmp_path: Path) -> None:
    w = _world(1)
    for name, emb in w.items():
        save_embeddings(emb, tmp_path / f"{name}.safetensors")
    files = {k: str(tmp_path / f"{k}.safetensors") for k in w}
    args = ["evaluate", "--label-free", "--old-query", files["oq"], "--old-gallery", files["og"], "--bootstrap", "50", "-q"]
    same = CliRunner().invoke(app, [*args, "--new-query", files["oq"], "--new-gallery", files["og"],
                                    "--require", "top1_changed<=0.05", "--require", "identity_top1>=0.99"])
    assert same.exit_code == 0, same.stderr
    assert json.loads(same.stdout)["changes"]["new/new"]["overlap@10"] == 1
    other = CliRunner().invoke(app, [*args, "--new-query", files["iq"], "--new-gallery", files["ig"],
                                     "--require", "top1_changed<=0.05"])
    assert other.exit_code == 3 and json.loads(other.stdout)["requirements"][0]["passed"] is False
    lone = CliRunner().invoke(app, ["evaluate", "--query", files["oq"], "--gallery", files["og"], "--changes"])
    assert lone.exit_code == 2 and "--changes" in lone.stderr
