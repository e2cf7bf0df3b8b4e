"""Old-model statistics ("old meta"): per-class centers and boundary radii of old embeddings.

Everything is computed with batched tensor ops (sorts, scatters, gathers), never a Python loop
over classes or samples, so a million embeddings over ten thousand classes take seconds and
O(N + C·D) memory beyond the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bctool.errors import ConfigError, EmbeddingsError

# Rows normalised at a time: bounds the float32 copy of the embeddings that the statistics need.
_CHUNK_ROWS = 1 << 16


@dataclass(frozen=True)
class OldStats:
    """Per-class statistics of the old model's L2-normalised training embeddings."""

    centers: torch.Tensor  # (C, D) float32 mean of ô per class (not re-normalised); 0 if empty
    counts: torch.Tensor  # (C,) int64 number of old embeddings per class
    radius_max: torch.Tensor  # (C,) float32 IQR-filtered max of |ô - c_k|; 0 where count <= 1
    theta_max: torch.Tensor  # (C,) float32 the same rule on angles arccos(ô · c_k/|c_k|)
    is_old: torch.Tensor  # (C,) bool the old model was trained on the class and it has samples

    @property
    def num_classes(self) -> int:
        """C, the number of classes (the new model's label space)."""
        return int(self.centers.shape[0])

    @property
    def has_boundary(self) -> torch.Tensor:
        """(C,) bool: old classes with at least two old embeddings, so a boundary exists."""
        return self.is_old & (self.counts > 1)

    def to(self, device: torch.device | str) -> OldStats:
        """A copy with every tensor on ``device``."""
        return OldStats(
            centers=self.centers.to(device),
            counts=self.counts.to(device),
            radius_max=self.radius_max.to(device),
            theta_max=self.theta_max.to(device),
            is_old=self.is_old.to(device),
        )


def compute_old_stats(
    old_embeddings: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    old_classes: torch.Tensor | None = None,
) -> OldStats:
    """Per-class centers and IQR-filtered radius/angle maxima of old embeddings.

    ``old_embeddings`` are the raw (N, D) old-model embeddings of training images, ``labels`` their
    (N,) classes in the new model's label space, ``old_classes`` an optional (C,) bool mask of
    the classes the old model was trained on (None: every class with an old embedding).
    """
    _check_inputs(old_embeddings, labels, num_classes, old_classes)
    device = old_embeddings.device
    labels = labels.to(device=device, dtype=torch.int64)
    counts = torch.bincount(labels, minlength=num_classes)
    centers = _class_centers(old_embeddings, labels, counts, num_classes)
    radii, angles = _distances_to_centers(old_embeddings, labels, centers)
    is_old = counts >= 1
    if old_classes is not None:
        is_old = is_old & old_classes.to(device=device, dtype=torch.bool)
    return OldStats(
        centers=centers,
        counts=counts,
        radius_max=_filtered_max(radii, labels, counts),
        theta_max=_filtered_max(angles, labels, counts),
        is_old=is_old,
    )


def _check_inputs(
    old_embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, old_classes: torch.Tensor | None
) -> None:
    if old_embeddings.ndim != 2:
        raise EmbeddingsError(f"old embeddings must be a 2-d (N, D) tensor, got shape {tuple(old_embeddings.shape)}")
    if labels.ndim != 1 or labels.shape[0] != old_embeddings.shape[0]:
        raise EmbeddingsError(
            f"labels must be a 1-d tensor with one label per old embedding ({old_embeddings.shape[0]}), "
            f"got shape {tuple(labels.shape)}"
        )
    if num_classes < 1:
        raise ConfigError(f"the number of classes must be positive, got {num_classes}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise EmbeddingsError(
            f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
        )
    if old_classes is not None and tuple(old_classes.shape) != (num_classes,):
        raise ConfigError(
            f"the old-class mask must have shape ({num_classes},), got {tuple(old_classes.shape)}"
        )


def _normalised_chunks(old_embeddings: torch.Tensor, labels: torch.Tensor):
    """Yield (slice, L2-normalised float32 rows, labels) in chunks of bounded size."""
    for start in range(0, old_embeddings.shape[0], _CHUNK_ROWS):
        rows = slice(start, start + _CHUNK_ROWS)
        yield rows, F.normalize(old_embeddings[rows].float(), dim=1), labels[rows]


def _class_centers(
    old_embeddings: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, num_classes: int
) -> torch.Tensor:
    # Sums in float64: a class may hold 10^5 unit vectors, and float32 sums would drift.
    sums = torch.zeros(num_classes, old_embeddings.shape[1], dtype=torch.float64, device=old_embeddings.device)
    for _, normed, chunk_labels in _normalised_chunks(old_embeddings, labels):
        sums.index_add_(0, chunk_labels, normed.double())
    return (sums / counts.clamp(min=1).unsqueeze(1).double()).float()


def _distances_to_centers(
    old_embeddings: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample radius |ô - c_y| and angle arccos(ô · c_y/|c_y|)."""
    radii = torch.empty(labels.shape[0], dtype=torch.float32, device=centers.device)
    angles = torch.empty_like(radii)
    unit_centers = F.normalize(centers, dim=1)
    for rows, normed, chunk_labels in _normalised_chunks(old_embeddings, labels):
        radii[rows] = (normed - centers[chunk_labels]).norm(dim=1)
        cosine = (normed * unit_centers[chunk_labels]).sum(dim=1)
        angles[rows] = torch.arccos(cosine.clamp(-1.0, 1.0))
    return radii, angles


def _filtered_max(values: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-class max of ``values`` after the 1.5·IQR outlier filter (classes with n >= 4).

    Classes with n in {2, 3} keep every value; classes with n <= 1 get 0.
    """
    num_classes = counts.shape[0]
    result = torch.zeros(num_classes, dtype=torch.float32, device=values.device)
    if values.numel() == 0:
        return result
    # Sort by value, then stably by label: each class becomes a contiguous, ascending run.
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]
    sorted_values = values[order]
    starts = torch.cumsum(counts, 0) - counts
    last = values.shape[0] - 1
    q1 = sorted_values[(starts + counts // 4).clamp(max=last)]
    q3 = sorted_values[(starts + (3 * counts) // 4).clamp(max=last)]
    iqr = q3 - q1
    filtered = counts >= 4
    low = torch.where(filtered, q1 - 1.5 * iqr, torch.full_like(q1, -torch.inf))
    high = torch.where(filtered, q3 + 1.5 * iqr, torch.full_like(q3, torch.inf))
    keep = (values >= low[labels]) & (values <= high[labels])
    # Values are radii or angles, all >= 0, so 0 is a neutral start for the max.
    result.scatter_reduce_(0, labels, torch.where(keep, values, torch.zeros_like(values)), reduce="amax")
    return torch.where(counts > 1, result, torch.zeros_like(result))
