"""Extraction: embed every image of a dataset with a checkpoint, in batches."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader

from bctool.checkpoint import Checkpoint
from bctool.data.dataset import ImageDataset
from bctool.data.sources import ImageSet
from bctool.data.transforms import EvalTransform
from bctool.embeddings import Embeddings
from bctool.progress import NULL_PROGRESS, Progress


@torch.inference_mode()
def extract(
    images: ImageSet,
    checkpoint: Checkpoint,
    batch_size: int = 256,
    workers: int = 2,
    progress: Progress = NULL_PROGRESS,
) -> Embeddings:
    """Embed ``images`` with the checkpoint's model (already on its device, in eval mode).

    Rows are written into one preallocated array as batches arrive, so memory holds the
    embeddings and a few batches of images, never the whole dataset.
    """
    model = checkpoint.model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(
        ImageDataset(images, EvalTransform(checkpoint.preprocess)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    out = np.empty((len(images), checkpoint.config.embedding_dim), dtype=np.float32)
    progress.start("extract", len(images))
    try:
        for batch, _, indices in loader:
            emb = model.embed(batch.to(device, non_blocking=True)).float().cpu().numpy()
            out[indices.numpy()] = emb
            progress.advance(len(indices))
    finally:
        progress.stop()
    return Embeddings(
        embeddings=out,
        labels=np.asarray(images.labels, dtype=np.int64),
        ids=images.ids,
        label_names=list(images.label_names),
        model=checkpoint.identity(),
        normalized=False,
        root=os.path.abspath(images.root),
    )
