"""What an upgrade changes for each query, without any relevance judgment.

The old system ranks the old gallery with the old query embeddings (old/old). After the upgrade
the new queries rank the old gallery (new/old) and, once it is re-embedded, the new gallery
(new/new). For each query, with ``A`` the old system's first ``k`` results and ``B`` the new one's:

- ``overlap@k``: ``|A ∩ B| / k``;
- ``rbo``: rank-biased overlap (Webber, Moffat and Zobel 2010), extrapolated from depth ``k``
  (their RBO_ext), persistence ``p`` (0.9: the first ten ranks weigh most): 1 for the same
  list, 0 for disjoint ones, with agreement near the top counting more;
- ``top1_changed``: the first result differs.

And the cross-model identity check: each image's new embedding searched among the old
gallery's embeddings; the rank of its own old embedding (``identity_top1``: the share found
first; ``identity_mrr``: the mean of one over that rank, 0 beyond ``depth``). A sample of the
gallery's images is searched when it is large.

Each mean comes with a bootstrap interval over queries (images). These figures say how much
changes, not whether it got better: a new model that changes nothing scores a perfect overlap
and identity; read them next to a labelled verdict where one exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bctool.embeddings import Embeddings
from bctool.embeddings.ids import pair_rows
from bctool.errors import ConfigError
from bctool.evaluate.scores import DEFAULT_BOOTSTRAP, DEFAULT_LEVEL, bootstrap_means
from bctool.evaluate.search import stream_rankings


@dataclass(frozen=True)
class ChangeOptions:
    """How the change report ranks and resamples."""

    k: int = 10  # results compared a query
    persistence: float = 0.9  # RBO's p
    identity_depth: int = 100  # ranks searched for an image's own old embedding
    identity_sample: int = 10_000  # gallery images searched at most (a seeded sample beyond)
    bootstrap: int = DEFAULT_BOOTSTRAP
    seed: int = 0
    level: float = DEFAULT_LEVEL

    def __post_init__(self) -> None:
        if self.k < 1 or self.identity_depth < 1 or self.identity_sample < 1:
            raise ConfigError(f"k, the identity depth and sample must be at least 1, got {self.k}, "
                              f"{self.identity_depth}, {self.identity_sample}")
        if not 0 < self.persistence < 1:
            raise ConfigError(f"RBO's persistence p must lie strictly between 0 and 1, got {self.persistence}")


def overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``X[:, d - 1] = |a[:, :d] ∩ b[:, :d]|`` for d = 1..k, of two (Q, k) lists of distinct items."""
    q, k = a.shape
    x = np.zeros((q, k), dtype=np.int64)
    count = np.zeros(q, dtype=np.int64)
    for d in range(k):
        count = count + (a[:, d] == b[:, d])
        if d:
            count = count + (a[:, d : d + 1] == b[:, :d]).any(axis=1) + (b[:, d : d + 1] == a[:, :d]).any(axis=1)
        x[:, d] = count
    return x


def rank_biased_overlap(a: np.ndarray, b: np.ndarray, p: float = 0.9) -> np.ndarray:
    """RBO_ext of each row of two (Q, k) rankings: ``X_k/k p^k + (1-p)/p sum_d X_d/d p^d``."""
    x = overlaps(a, b).astype(np.float64)
    k = a.shape[1]
    d = np.arange(1, k + 1)
    return x[:, -1] / k * p**k + (1 - p) / p * (x / d * p**d).sum(axis=1)


def _interval(values: np.ndarray, name: str, options: ChangeOptions) -> dict[str, float]:
    """``name`` (the mean) and, with resamples, ``name_low`` and ``name_high``."""
    out = {name: float(np.mean(values))}
    if options.bootstrap and values.size:
        means = bootstrap_means(values, options.bootstrap, options.seed)
        low, high = np.quantile(means, [(1 - options.level) / 2, (1 + options.level) / 2])
        out.update({f"{name}_low": float(low), f"{name}_high": float(high)})
    return out


def compare_rankings(before: np.ndarray, after: np.ndarray, options: ChangeOptions) -> dict[str, float]:
    """Overlap@k, RBO and the share of changed first results of two (Q, k) rankings of the same
    queries, items named by the same numbers, with their intervals."""
    k = before.shape[1]
    return {
        **_interval(overlaps(before, after)[:, -1] / k, f"overlap@{k}", options),
        **_interval(rank_biased_overlap(before, after, options.persistence), "rbo", options),
        **_interval((before[:, 0] != after[:, 0]).astype(np.float64), "top1_changed", options),
        "queries": int(before.shape[0]),
    }


def identity_ranks(new: Embeddings, old: Embeddings, options: ChangeOptions) -> dict[str, Any]:
    """Each image's new embedding searched among ``old``'s rows (paired by id): the share whose own
    old row comes first, the mean reciprocal rank (0 beyond the depth) and how many were searched."""
    new_rows, old_rows = pair_rows(new.ids, old.ids, ("the new embeddings", "the old embeddings"))
    if new_rows.size == 0:
        raise ConfigError("the new and old embeddings share no id: the identity check needs the same images in both")
    if new_rows.size > options.identity_sample:
        keep = np.sort(np.random.default_rng(options.seed).choice(new_rows.size, options.identity_sample, replace=False))
        new_rows, old_rows = new_rows[keep], old_rows[keep]
    depth = min(options.identity_depth, len(old))
    _, ranked = stream_rankings(new.normalized_embeddings()[new_rows], old.embeddings, depth, normalize=True)
    hit = ranked == old_rows[:, None]
    found = hit.any(axis=1)
    reciprocal = np.where(found, 1.0 / (hit.argmax(axis=1) + 1), 0.0)
    return {**_interval((reciprocal == 1.0).astype(np.float64), "identity_top1", options),
            **_interval(reciprocal, "identity_mrr", options), "identity_images": int(new_rows.size),
            "identity_depth": depth}


def change_report(old: tuple[Embeddings, Embeddings], new: tuple[Embeddings, Embeddings | None],
                  options: ChangeOptions = ChangeOptions()) -> dict[str, Any]:
    """What changes between the old system and the new one, for every query (see the module
    docstring): ``new/old`` (new queries, old gallery) and, with a new gallery, ``new/new``,
    each against old/old; and the identity check of the new gallery (else the new queries)
    against the old one."""
    (old_q, old_g), (new_q, new_g) = old, new
    q_old, q_new = pair_rows(old_q.ids, new_q.ids, ("the old queries", "the new queries"))
    if q_old.size == 0:
        raise ConfigError("the old and new queries share no id: the change report compares the same queries")
    k = min(options.k, len(old_g))
    _, before = stream_rankings(old_q.normalized_embeddings()[q_old], old_g.embeddings, k, normalize=True)
    _, cross = stream_rankings(new_q.normalized_embeddings()[q_new], old_g.embeddings, k, normalize=True)
    report: dict[str, Any] = {"k": k, "new/old": compare_rankings(before, cross, options)}
    if new_g is not None:
        g_new, g_old = pair_rows(new_g.ids, old_g.ids, ("the new gallery", "the old gallery"))
        as_old = np.full(len(new_g), -1, dtype=np.int64)  # a new gallery row named by its old row
        as_old[g_new] = g_old
        _, own = stream_rankings(new_q.normalized_embeddings()[q_new], new_g.embeddings, k, normalize=True)
        mapped = np.where(as_old[own] >= 0, as_old[own], -1 - own)  # rows only in the new gallery match nothing
        report["new/new"] = compare_rankings(before, mapped, options)
    report["identity"] = identity_ranks(new_g if new_g is not None else new_q, old_g if new_g is not None else old_q,
                                        options)
    return report
