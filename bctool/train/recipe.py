"""The recommended compatible upgrade: what `bctool train` does with an old side by default.

Warm-start the new model from the old checkpoint and fine-tune it at a lower learning rate
(:data:`WARM_LR`) with :data:`RECOMMENDED_METHOD`, on the clean training views its precomputed
old embeddings are of (the bctool regime's views, :mod:`bctool.train.regime`). Chosen on a pilot
seed (100) on the emoji extended-class and Fashion-MNIST extended-data sets, and judged over
seeds 0-4 by the paired t test on the seed differences (docs/results/seed-tests.md, generated
from docs/paper/seeds5/tests.md). A config asks for it with
``init_from="auto"`` and ``lr=None`` (the defaults); :func:`bctool.train.defaults.resolve_defaults`
turns those into concrete values, which are what the checkpoint records.
"""

from __future__ import annotations

import json
import logging

from bctool.checkpoint import read_checkpoint_metadata
from bctool.errors import BctoolError
from bctool.models.external import named_like_model_file
from bctool.train.config import TrainConfig

logger = logging.getLogger(__name__)

RECOMMENDED_METHOD = "lce"  # the compatibility method with an old side
COLD_LR = 0.1  # peak learning rate from a fresh initialisation (the AdvBCT authors' SGD rate)
WARM_LR = 0.03  # peak learning rate of a warm start: fine-tuning, not training anew


def known_old_checkpoint(config: TrainConfig) -> str | None:
    """The old checkpoint of a compatible run, when it is known: ``old_model``, or the checkpoint
    that made ``old_embeddings`` if it is still where it was and unchanged."""
    if config.compat.old_model:
        return config.compat.old_model
    if not config.compat.old_embeddings:
        return None
    from bctool.embeddings import load_embeddings
    from bctool.train.old_side import checkpoint_path_of

    return checkpoint_path_of(load_embeddings(config.compat.old_embeddings, mmap=True))


def warm_start_source(config: TrainConfig) -> str | None:
    """What ``init_from="auto"`` means for ``config``: the known old checkpoint when it has the
    run's architecture and embedding dimension, else nothing (a fresh start, logged)."""
    if not config.compatible or config.model.pretrained:
        return None
    path = known_old_checkpoint(config)
    if path is None:
        logger.info("no warm start: the old checkpoint is not known (pass --old-model or --init-from OLD)")
        return None
    if named_like_model_file(path):
        logger.warning("no warm start: the old model %s is a model file, a graph without weights to copy (a fresh "
                       "start; `bctool adapt` maps between the spaces instead)", path)
        return None
    try:
        model = json.loads(read_checkpoint_metadata(path)["model"])
    except (BctoolError, KeyError, ValueError):
        return None
    if (model.get("arch"), model.get("embedding_dim")) != (config.model.arch, config.model.embedding_dim):
        logger.warning(
            "no warm start: the old checkpoint %s is a %s with dimension %s, this run a %s with %s",
            path, model.get("arch"), model.get("embedding_dim"), config.model.arch, config.model.embedding_dim,
        )
        return None
    return path
