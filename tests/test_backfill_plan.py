"""Backfill plans (`bctool backfill plan`), curves in a given order, and the calibrated mixed
gallery."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bctool.backfill.curve import (
    _calibrated,
    backfill_curve,
    calibrated_query,
    fit_calibration,
    order_rows,
)
from bctool.backfill.plan import plan_order, read_plan
from bctool.backfill.policies import POLICIES
from bctool.cli import app
from bctool.embeddings import Embeddings, save_embeddings
from bctool.errors import ConfigError, EmbeddingsError
from bctool.evaluate.retrieval import evaluate_retrieval

runner = CliRunner()


def _gallery(n: int = 60, dim: int = 8, seed: int = 0, sha: str = "o") -> Embeddings:
    rng = np.random.default_rng(seed)
    return Embeddings(rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, 5, n), [f"g{i}" for i in range(n)],
                      [f"c{i}" for i in range(5)], model={"sha256": sha * 64})


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_orders_every_gallery_row_once(policy: str) -> None:
    old = _gallery()
    sample = Embeddings(_gallery(seed=1).embeddings[:20], old.labels[:20], old.ids[:20], old.label_names)
    order = plan_order(old, policy, sample)
    assert sorted(order) == sorted(old.ids)


def test_policies_order_as_they_say() -> None:
    old = _gallery()
    norms = np.linalg.norm(old.embeddings, axis=1)
    assert plan_order(old, "norm")[:3] == [old.ids[i] for i in np.argsort(norms)[:3]]
    # Two rows made near twins are the most crowded.
    rows = old.embeddings.copy()
    rows[7] = rows[3] * 1.01
    crowded = plan_order(Embeddings(rows, old.labels, old.ids, old.label_names), "crowded")
    assert set(crowded[:2]) == {"g3", "g7"}
    # The sample goes first (already embedded), then rows like the sample's most disagreeing ones.
    unit = old.embeddings / np.linalg.norm(old.embeddings, axis=1, keepdims=True)
    new = unit.copy()
    new[:, 0] += 4 * unit[:, 1] ** 2  # the models disagree where |x1| is large: no affine map explains it
    sample = Embeddings(new[:30], old.labels[:30], old.ids[:30], old.label_names)
    order = plan_order(old, "disagreement", sample)
    assert set(order[:30]) == set(old.ids[:30])
    rest = [int(i[1:]) for i in order[30:]]
    assert np.mean(np.abs(unit[rest[:10], 1])) > np.mean(np.abs(unit[rest[-10:], 1]))
    with pytest.raises(ConfigError, match="needs the new model's embeddings of a sample"):
        plan_order(old, "disagreement")


def test_a_curve_in_a_given_order_and_a_bad_order(tmp_path: Path) -> None:
    old, new = _gallery(sha="o"), _gallery(seed=5, sha="n")
    new = Embeddings(new.embeddings, old.labels, old.ids, old.label_names, model=new.model)
    query = Embeddings(new.embeddings[:20] + 0.01, old.labels[:20], [f"q{i}" for i in range(20)], old.label_names)
    order = list(reversed(old.ids))
    curve = backfill_curve(query, old, new, (0.0, 0.5, 1.0), order=order)
    # At one half, exactly the second half of the gallery rows (the first of the order) is new.
    half = evaluate_retrieval(query, Embeddings(np.vstack([old.embeddings[:30], new.embeddings[30:]]), old.labels,
                                                old.ids, old.label_names))
    assert curve[1]["map"] == pytest.approx(half["map"])
    np.testing.assert_array_equal(order_rows(old, order, 0), np.arange(59, -1, -1))
    with pytest.raises(EmbeddingsError, match="must list every gallery id once"):
        order_rows(old, order[:-1] + ["nope"], 0)


def test_calibrated_scores_are_what_the_extra_coordinates_say() -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(10, 4)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    old_rows = np.array([1, 4, 7])
    query = rng.normal(size=(3, 4)).astype(np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    gallery = _calibrated(rows, old_rows, (0.8, 0.1))
    assert np.allclose(np.linalg.norm(gallery, axis=1), np.linalg.norm(gallery[0]))  # one norm for every row
    q = calibrated_query(Embeddings(query, np.zeros(3, np.int64), ["a", "b", "c"], ["x"])).embeddings
    want = query @ rows.T
    want[:, old_rows] = 0.8 * want[:, old_rows] + 0.1
    np.testing.assert_allclose(q @ gallery.T, want, atol=1e-6)
    # A known linear relation between the two models' cosines is recovered.
    old = Embeddings(rows, np.zeros(10, np.int64), [f"g{i}" for i in range(10)], ["x"])
    new = Embeddings(rows, np.zeros(10, np.int64), [f"g{i}" for i in range(10)], ["x"])
    a, b = fit_calibration(Embeddings(query, np.zeros(3, np.int64), ["a", "b", "c"], ["x"]), old, new, np.arange(10))
    assert (a, b) == (pytest.approx(1.0, abs=1e-5), pytest.approx(0.0, abs=1e-5))


def test_cli_plan_then_evaluate_the_order(tmp_path: Path) -> None:
    old, new = _gallery(sha="o"), _gallery(seed=5, sha="n")
    new = Embeddings(new.embeddings, old.labels, old.ids, old.label_names, model=new.model)
    query = Embeddings(new.embeddings[:20] + 0.01, old.labels[:20], [f"q{i}" for i in range(20)], old.label_names,
                       model=new.model)
    for name, emb in (("old", old), ("new", new), ("q", query)):
        save_embeddings(emb, tmp_path / f"{name}.safetensors")
    save_embeddings(Embeddings(new.embeddings[:12], old.labels[:12], old.ids[:12], old.label_names, model=new.model),
                    tmp_path / "sample.safetensors")
    plan = runner.invoke(app, ["backfill", "plan", str(tmp_path / "old.safetensors"), "--out", str(tmp_path / "plan.txt"),
                               "--policy", "disagreement", "--new-sample", str(tmp_path / "sample.safetensors"),
                               "--batch", "25"])
    assert plan.exit_code == 0, plan.stderr
    summary = json.loads(plan.stdout)
    assert (summary["ids"], summary["batches"], summary["batch_size"]) == (60, 3, 25)
    lines = (tmp_path / "plan.txt").read_text().splitlines()
    assert lines[0].split("\t")[1] == "0" and lines[-1].split("\t")[1] == "2"
    assert len(read_plan(tmp_path / "plan.txt")) == 60
    curve = runner.invoke(app, ["evaluate", "--backfill", "0,0.5,1", "--query", str(tmp_path / "q.safetensors"),
                                "--old-gallery", str(tmp_path / "old.safetensors"), "--new-gallery",
                                str(tmp_path / "new.safetensors"), "--order", str(tmp_path / "plan.txt"),
                                "--backfill-scoring", "calibrated", "-q"])
    assert curve.exit_code == 0, curve.stderr
    out = json.loads(curve.stdout)
    assert (out["order"], out["scoring"]) == ("plan", "calibrated") and len(out["curve"]) == 3
    assert out["area"] == pytest.approx((out["curve"][0]["map"] + 2 * out["curve"][1]["map"] + out["curve"][2]["map"]) / 4)


def test_the_cli_default_policy_is_the_library_one() -> None:
    from bctool.backfill import DEFAULT_POLICY
    from bctool.cli.evaluate import DEFAULT_POLICY as CLI_DEFAULT

    assert CLI_DEFAULT == DEFAULT_POLICY and DEFAULT_POLICY in POLICIES


def test_a_plan_refuses_ids_it_cannot_name_and_norm_refuses_unit_rows(tmp_path: Path) -> None:
    from bctool.backfill import write_plan

    old = _gallery(n=6)
    for name, ids in (("twice", ["a", "a", "b", "c", "d", "e"]), ("tab", ["a\tb", "c", "d", "e", "f", "g"])):
        save_embeddings(Embeddings(old.embeddings, old.labels, ids, old.label_names), tmp_path / f"{name}.safetensors")
        with pytest.raises(EmbeddingsError, match="a plan names each gallery image by its id, one a line"):
            write_plan(tmp_path / f"{name}.safetensors", tmp_path / "p.txt")
    unit = Embeddings(old.embeddings / np.linalg.norm(old.embeddings, axis=1, keepdims=True), old.labels, old.ids,
                      old.label_names, normalized=True)
    with pytest.raises(ConfigError, match="the norm policy has nothing to order by; pass --policy crowded or random"):
        plan_order(unit, "norm")
