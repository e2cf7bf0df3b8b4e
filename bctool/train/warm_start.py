"""Warm start: a new model initialised from an old bctool checkpoint (``--init-from``).

The backbone and the embedding neck are copied whole (BatchNorm running statistics included);
the classification head's rows are copied by class name for the classes both models know, and
the rows of new classes keep their fresh initialisation. The new model then starts in the old
model's embedding space, which is what backward-compatible fine-tuning wants to stay close to.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from bctool.checkpoint import load_checkpoint
from bctool.errors import ModelError
from bctool.models import EmbeddingModel
from bctool.models.external import named_like_model_file
from bctool.models.heads import Head

logger = logging.getLogger(__name__)

COPIED_PREFIXES = ("backbone.", "neck.")


@dataclass(frozen=True)
class WarmStart:
    """What ``--init-from`` copied, as recorded in the checkpoint (``train.init_from``)."""

    path: str  # absolute path of the old checkpoint
    sha256: str  # of the old checkpoint file
    tensors: int  # backbone and neck tensors copied
    head_rows: int  # classes whose head rows came from the old model
    head: str  # "copied by class name", or why the head was left fresh

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def copy_head_rows(new_head: Head, new_names: Sequence[str], old_head: Head, old_names: Sequence[str]) -> int:
    """Copy the old head's row of every class named in both lists (the per-class tensors both
    heads declare, :meth:`Head.class_rows`); return how many. A tensor only one of the heads
    has (a bias) is left as it is (fresh, or unused)."""
    old_index = {name: i for i, name in enumerate(old_names)}
    pairs = [(i, old_index[name]) for i, name in enumerate(new_names) if name in old_index]
    if not pairs or not new_head.class_rows():
        return 0
    new_rows, old_rows = (torch.tensor(p, dtype=torch.int64) for p in zip(*pairs))
    old_tensors = old_head.class_rows()
    with torch.no_grad():
        for key, target in new_head.class_rows().items():
            if key not in old_tensors:
                continue
            target[new_rows] = old_tensors[key].detach().to(target.device, target.dtype)[old_rows]
    return len(pairs)


def refuse_model_file(path: str | os.PathLike[str]) -> None:
    """A :class:`ModelError` when ``--init-from`` names an ONNX or TorchScript file: a graph with
    no weights to copy, so no warm start (the adapters, or importing the weights, instead)."""
    if named_like_model_file(path):
        raise ModelError(
            f"--init-from {os.fspath(path)!r} is a model file (ONNX or TorchScript): a graph with no weights bctool "
            "can copy, so nothing can start from it. Train with --init-from none (it can still be --old-model), "
            "fit an adapter between the two spaces (`bctool adapt`), or import the network's state dict if you "
            "have it (`bctool import ARCH --pretrained WEIGHTS`) and start from that"
        )


def warm_start(model: EmbeddingModel, class_names: Sequence[str], path: str | os.PathLike[str]) -> WarmStart:
    """Initialise ``model`` (built for ``class_names``) from the old checkpoint at ``path``.

    The old model must have the same architecture and embedding dimension; anything else is a
    :class:`ModelError` naming both. A head of another kind (say cosine against linear) is left
    freshly initialised, and the record says so.
    """
    refuse_model_file(path)
    old = load_checkpoint(path)
    new_cfg, old_cfg = model.config, old.config
    if (old_cfg.arch, old_cfg.embedding_dim) != (new_cfg.arch, new_cfg.embedding_dim):
        raise ModelError(
            f"--init-from {str(path)!r} is a {old_cfg.arch} with embedding dimension "
            f"{old_cfg.embedding_dim}, but this run trains a {new_cfg.arch} with dimension "
            f"{new_cfg.embedding_dim}; pass --arch {old_cfg.arch} --embedding-dim "
            f"{old_cfg.embedding_dim}, or warm-start from a checkpoint of this architecture"
        )
    old_state = old.model.state_dict()
    copied = {k: v for k, v in old_state.items() if k.startswith(COPIED_PREFIXES)}
    own = {k for k in model.state_dict() if k.startswith(COPIED_PREFIXES)}
    if set(copied) != own:  # same arch and dimension: only a damaged file gets here
        raise ModelError(f"--init-from {str(path)!r}: its backbone and neck tensors do not match a {new_cfg.arch}")
    model.load_state_dict(copied, strict=False)
    if model.head is None or old.model.head is None:
        rows, head = 0, "no head to copy"
    elif old_cfg.head != new_cfg.head:
        rows, head = 0, f"left fresh: the old head is {old_cfg.head}, the new one {new_cfg.head}"
        logger.warning("--init-from: %s", head)
    else:
        rows = copy_head_rows(model.head, class_names, old.model.head, old.class_names)
        head = "copied by class name"
    logger.info("warm start from %s: %d tensors, head rows of %d of %d classes", path, len(copied), rows,
                len(class_names))
    return WarmStart(path=old.path, sha256=old.sha256, tensors=len(copied), head_rows=rows, head=head)
