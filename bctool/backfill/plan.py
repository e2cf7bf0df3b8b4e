"""Backfill plans: a policy's order (:mod:`bctool.backfill.policies`) as a text file.

One gallery id a line with its batch number (``ID<TAB>BATCH``), so a backfill runs, stops and
resumes batch by batch; ``bctool evaluate --backfill ... --order PLAN`` measures its curve
(:mod:`bctool.backfill.curve`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from bctool.backfill.policies import DEFAULT_POLICY, POLICIES, sample_pairs
from bctool.embeddings import Embeddings, load_embeddings
from bctool.errors import ConfigError, EmbeddingsError
from bctool.utils.io import atomic_write_text

logger = logging.getLogger(__name__)


def plan_order(old: Embeddings, policy: str = DEFAULT_POLICY, new_sample: Embeddings | None = None,
               seed: int = 0) -> list[str]:
    """The old gallery's ids in the order ``policy`` re-embeds them."""
    entry = POLICIES.entry(policy)
    sample = sample_pairs(old, new_sample) if new_sample is not None else None
    rows = np.asarray(entry.obj(old, sample, seed))
    if sorted(rows.tolist()) != list(range(len(old))):
        raise ConfigError(f"backfill policy {policy!r} returned an order that is not every gallery row once")
    return [old.ids[i] for i in rows]


def write_plan(old_gallery: str | os.PathLike[str], out: str | os.PathLike[str], policy: str = DEFAULT_POLICY,
               batch: int = 0, new_sample: str | os.PathLike[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """Write the plan of ``old_gallery`` to ``out`` (``ID<TAB>BATCH`` lines; ``batch`` ids a batch,
    0: one batch); return a summary."""
    if batch < 0:
        raise ConfigError(f"--batch {batch} must be 0 (one batch) or more")
    old = load_embeddings(old_gallery, mmap=True)
    if not old.ids_known:
        raise EmbeddingsError("the old gallery has no ids, so a plan cannot name its images; write it with `bctool extract`")
    bad = [image_id for image_id in old.ids if "\t" in image_id or len(image_id.splitlines()) != 1]
    if bad:
        raise EmbeddingsError(
            f"a plan names each gallery image by its id, one a line: the old gallery has {len(bad)} ids with a tab "
            f"or line break ({', '.join(map(repr, bad[:3]))}); give every image its own id (`bctool extract` does)")
    # The check `bctool evaluate` makes.
    from bctool.evaluate.inputs import check_unique_ids

    check_unique_ids(old.ids, "a plan names each gallery image by its id, one a line, but in the old gallery")
    sample = load_embeddings(new_sample, mmap=True) if new_sample is not None else None
    ids = plan_order(old, policy, sample, seed)
    size = batch or len(ids)
    atomic_write_text(Path(out), "".join(f"{image_id}\t{i // size}\n" for i, image_id in enumerate(ids)))
    logger.info("wrote the %s plan of %d gallery ids to %s", policy, len(ids), out)
    return {"out": str(out), "policy": policy, "ids": len(ids), "batches": -(-len(ids) // size) if ids else 0,
            "batch_size": size, "seed": seed, "new_sample": str(new_sample) if new_sample else None}


def read_plan(path: str | os.PathLike[str]) -> list[str]:
    """The ids of a plan file in their order (``ID`` or ``ID<TAB>BATCH`` lines)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the backfill order {str(path)!r}: {exc}; write it with `bctool backfill plan`") from exc
    return [line.rsplit("\t", 1)[0] if "\t" in line else line for line in lines if line.strip()]
