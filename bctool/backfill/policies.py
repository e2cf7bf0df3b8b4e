"""Backfill policies: the order in which to re-embed a gallery with the new model.

A policy orders the old gallery's rows from what a user has: the old gallery itself and,
optionally, the new model's embeddings of a sample of it (rows paired by id). Re-embedding in
that order, the retrieval curve over the share re-embedded should rise faster than in random
order (FastFill, Jaeckle et al., ICLR 2023: the most uncertain items first). Policies are a
registry kind (``bctool list backfill-policies``, entry-point group ``bctool.backfill_policies``):
``policy(old, sample, seed) -> rows``, ``sample`` a ``(old rows, new rows)`` pair of
:class:`Embeddings` of the same images or None.

* ``random``: a seeded permutation (the baseline);
* ``norm``: the old rows with the smallest norm first (a softmax-trained embedding's norm grows
  with the model's confidence);
* ``crowded``: the old rows closest to another gallery row first (where the old model confuses
  items, the new one helps most);
* ``disagreement`` (needs a sample): an affine map old -> new is fitted on the sample, the
  sample's rows where map and new model disagree most teach a ridge regression from the old row
  (and its squares) to that disagreement, and the rows it predicts to disagree most go first (the sample itself,
  already embedded, first of all).

The order is written as a plan (:mod:`bctool.backfill.plan`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bctool.embeddings import (
    Embeddings,
    find_rows,
    normalize_rows,
    pair_rows,
    release_rows,
)
from bctool.errors import ConfigError, EmbeddingsError
from bctool.utils.linear import ridge_least_squares
from bctool.registry import Registry

Policy = Callable[[Embeddings, "tuple[Embeddings, Embeddings] | None", int], np.ndarray]
# The default order, by measurement (experiments/backfill_policies.py, docs/backfill/table.md): the
# only policy ahead of random order on both sets (emoji +0.72, Fashion-MNIST +1.12 mAP of area,
# means over 3 seeds), with no point of its curve below the unconverted gallery.
DEFAULT_POLICY = "norm"
BLOCK = 65536
RIDGE = 1e-2  # the disagreement policy's ridge penalty (bctool.utils.linear)


def _admit(name: str, policy: object) -> None:
    if not callable(policy):
        raise ConfigError(f"backfill policy {name!r} must be a function policy(old, sample, seed) -> rows")


POLICIES: Registry[Policy] = Registry("backfill policy", "backfill-policies", admit=_admit,
                                      derive=lambda name, policy: {"needs_sample": bool(getattr(policy, "needs_sample", False))})


@POLICIES.register("random")
def random_order(old: Embeddings, sample: tuple[Embeddings, Embeddings] | None, seed: int) -> np.ndarray:
    """A seeded random order: the baseline."""
    return np.random.default_rng(seed).permutation(len(old))


def _norms(old: Embeddings) -> np.ndarray:
    out = np.empty(len(old), dtype=np.float64)
    for start in range(0, len(old), BLOCK):
        rows = np.asarray(old.embeddings[start : start + BLOCK], dtype=np.float64)
        out[start : start + len(rows)] = np.linalg.norm(rows, axis=1)
        release_rows(old.embeddings, start, start + BLOCK)
    return out


@POLICIES.register("norm")
def norm_order(old: Embeddings, sample: tuple[Embeddings, Embeddings] | None, seed: int) -> np.ndarray:
    """The old rows of smallest norm first (least confident)."""
    norms = _norms(old)
    if old.normalized or np.ptp(norms) <= 1e-5 * max(1.0, float(norms.max(initial=0.0))):
        raise ConfigError("the old gallery's rows all have the same norm (it stores normalised rows), so the norm policy "
                          "has nothing to order by; pass --policy crowded or random, or plan from the raw embeddings "
                          "`bctool extract` wrote")
    return np.argsort(norms, kind="stable")


@POLICIES.register("crowded")
def crowded_order(old: Embeddings, sample: tuple[Embeddings, Embeddings] | None, seed: int) -> np.ndarray:
    """The old rows closest to another gallery row first."""
    from bctool.evaluate.search import rank_gallery

    n = len(old)
    if n < 2:
        return np.arange(n)
    scores, _ = rank_gallery(old.normalized_embeddings(), old.embeddings, k=1, exclude=np.arange(n), normalize=True)
    return np.argsort(-scores[:, 0], kind="stable")


def disagreement_order(old: Embeddings, sample: tuple[Embeddings, Embeddings] | None, seed: int) -> np.ndarray:
    """The sample first, then the rows predicted to disagree most between the two models."""
    if sample is None:
        raise ConfigError("the disagreement policy needs the new model's embeddings of a sample of the gallery "
                          "(--new-sample NEW.safetensors, rows of the same ids as the old gallery's)")
    sample_old, sample_new = sample
    if len(sample_old) < 8:
        raise ConfigError(f"the --new-sample has {len(sample_old)} rows shared with the gallery; the disagreement "
                          "policy needs at least 8 (a few hundred is better)")
    x = normalize_rows(np.asarray(sample_old.embeddings, dtype=np.float32)).astype(np.float64)
    y = normalize_rows(np.asarray(sample_new.embeddings, dtype=np.float32)).astype(np.float64)
    weight, bias = ridge_least_squares(x, y, RIDGE)
    mapped = x @ weight + bias
    residual = 1 - (mapped * y).sum(1) / np.maximum(np.linalg.norm(mapped, axis=1), 1e-30)
    # What an affine map misses is not linear in the row: the predictor also sees its squares.
    w2, b2 = ridge_least_squares(np.hstack([x, x * x]), residual[:, None], RIDGE)
    predicted = np.empty(len(old))
    for start in range(0, len(old), BLOCK):
        rows = normalize_rows(np.asarray(old.embeddings[start : start + BLOCK], dtype=np.float32)).astype(np.float64)
        predicted[start : start + len(rows)] = (np.hstack([rows, rows * rows]) @ w2 + b2)[:, 0]
        release_rows(old.embeddings, start, start + BLOCK)
    in_sample = np.zeros(len(old), dtype=bool)
    sample_rows = find_rows(old.ids, sample_old.ids, "the old gallery")
    if (sample_rows < 0).any():
        raise EmbeddingsError(f"{int((sample_rows < 0).sum())} ids of the sample are not in the old gallery; pass the "
                              "pairs that sample_pairs(old, new_sample) returns")
    in_sample[sample_rows] = True
    predicted[in_sample] = np.inf  # already embedded by the new model: they go first, free
    return np.argsort(-predicted, kind="stable")


disagreement_order.needs_sample = True  # type: ignore[attr-defined]
POLICIES.register("disagreement", disagreement_order)


def sample_pairs(old: Embeddings, new_sample: Embeddings) -> tuple[Embeddings, Embeddings]:
    """The rows of ``old`` and ``new_sample`` with the ids they share (the sample's order)."""
    shared, old_rows = pair_rows(new_sample.ids, old.ids, ("the --new-sample", "the old gallery"))
    if not shared.size:
        raise EmbeddingsError("the --new-sample shares no id with the old gallery; embed some of the gallery's own "
                              "images with the new model (`bctool extract`)")

    def subset(emb: Embeddings, rows: np.ndarray) -> Embeddings:
        return Embeddings(np.asarray(emb.embeddings[rows], dtype=np.float32), emb.labels[rows],
                          [emb.ids[i] for i in rows], emb.label_names, model=emb.model)

    return subset(old, old_rows), subset(new_sample, shared)
