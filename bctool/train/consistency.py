"""The consistency floor: the old model's own training views against the old embeddings a run
trains against.

Precomputed old embeddings are made from clean images. A new model trained on other views (crops,
flips) is asked to match embeddings of images it never sees, and a discriminator or a boundary
then measures the difference of views, not of models. The floor puts the old model itself in
the new model's place: it embeds one pass of the run's training views and compares them with the
stored embeddings, the way AdvBCT's diagnostics compare the new model's:

* ``disc_acc``: held-out accuracy of AdvBCT's discriminator (separate passes, as the method runs
  it) trained to tell view embeddings from stored ones: 0.5 when the old side is consistent;
* ``outside_r_max``: share of old-class samples whose view embedding lies farther from its class
  center than the class's r_max (``outside_r_max_stored``: the stored embeddings' own share, the
  IQR outliers);
* ``cosine``: mean cosine between a view's embedding and the stored embedding of its image.

Whatever the new model shows above the floor is its own; at the floor it is the views.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from bctool.train.compat.stats import OldStats
from bctool.train.methods.advbct import make_discriminator


@dataclass(frozen=True)
class ConsistencyFloor:
    """What a perfect new model (the old model itself) would show against the stored old side."""

    augment: str
    rows: int
    disc_acc: float
    outside_r_max: float
    outside_r_max_stored: float
    cosine: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready, figures rounded to 4 digits."""
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


@torch.no_grad()
def view_embeddings(old: nn.Module, loader: DataLoader, rows: int, dim: int, device: torch.device) -> Tensor:
    """(rows, dim) embeddings by ``old`` (an old side's module: (images, indices) -> (B, D)) of
    one pass of ``loader``'s views, placed by the row index the loader yields; rows it skips
    (``drop_last``) stay NaN."""
    out = torch.full((rows, dim), float("nan"))
    for images, _, indices in loader:
        out[indices] = old(images.to(device), indices.to(device)).float().cpu()
    return out


def outside_share(embeddings: Tensor, labels: Tensor, stats: OldStats) -> float:
    """Share of the rows of classes with a boundary whose normalised embedding lies farther
    than r_max from its class center (0.0 when no row has a boundary)."""
    bounded = stats.has_boundary[labels]
    if not bounded.any():
        return 0.0
    distance = (F.normalize(embeddings, dim=1) - stats.centers[labels]).norm(dim=1)
    return float((distance[bounded] > stats.radius_max[labels][bounded]).float().mean())


def discriminator_accuracy(views: Tensor, stored: Tensor, steps: int = 300, batch: int = 128, seed: int = 0) -> float:
    """Held-out accuracy of AdvBCT's discriminator trained to tell ``views`` (0) from ``stored``
    (1), row-paired (N, D) tensors: trained on the first half of a shuffled row order and tested
    on the second, new and old batches passed separately as AdvBCT does. 0.5 for equal inputs."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(views.shape[0], generator=generator)
    half = max(2, views.shape[0] // 2)
    train_rows, test_rows = order[:half], order[half:] if views.shape[0] - half >= 2 else order[:half]
    with torch.random.fork_rng(devices=[]):  # leaves the caller's random streams as they were
        torch.manual_seed(seed)
        disc = make_discriminator(views.shape[1])
        optimizer = torch.optim.Adam(disc.parameters(), lr=1e-3)
        size = min(batch, train_rows.numel())
        for _ in range(steps):
            pick = train_rows[torch.randperm(train_rows.numel(), generator=generator)[:size]]
            zeros = torch.zeros(size, dtype=torch.long)
            loss = F.nll_loss(disc(views[pick]), zeros) + F.nll_loss(disc(stored[pick]), zeros + 1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        right, total = 0, 0
        with torch.no_grad():  # train-mode BatchNorm on each held-out batch, as the method's own figure
            for start in range(0, test_rows.numel(), size):
                pick = test_rows[start:start + size]
                if pick.numel() < 2:
                    continue
                right += int((disc(views[pick]).argmax(1) == 0).sum() + (disc(stored[pick]).argmax(1) == 1).sum())
                total += 2 * pick.numel()
    return right / max(total, 1)


def consistency_floor(
    old: nn.Module, loader: DataLoader, stored: Tensor, labels: Tensor, stats: OldStats, augment: str,
    device: torch.device, seed: int = 0,
) -> ConsistencyFloor:
    """The floor of one run: ``old`` (the old model run on a batch, e.g.
    :class:`~bctool.train.old_side.OnTheFlyOld`) over one pass of ``loader`` (the run's training
    views) against ``stored`` (the (N, D) old embeddings the run trains against)."""
    with torch.random.fork_rng(devices=[]):  # the views' draws leave the training's streams alone
        torch.manual_seed(seed)
        views = view_embeddings(old, loader, stored.shape[0], stored.shape[1], device)
    seen = ~torch.isnan(views).any(dim=1)
    views, stored, labels = views[seen], stored[seen].float().cpu(), labels[seen]
    stats = stats.to("cpu")
    return ConsistencyFloor(
        augment=augment,
        rows=int(seen.sum()),
        disc_acc=discriminator_accuracy(views, stored, seed=seed),
        outside_r_max=outside_share(views, labels, stats),
        outside_r_max_stored=outside_share(stored, labels, stats),
        cosine=float(F.cosine_similarity(views, stored, dim=1).mean()),
    )
