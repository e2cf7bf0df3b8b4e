"""The frozen old side of compatible training: old embeddings for each training batch.

Either precomputed (an embeddings file written by ``bctool extract`` with the old model over
the same training images, matched by id) or computed on the fly by the old checkpoint on the
same augmented batch. Also gathers what the compatibility losses need from the old side: the
old class statistics, the old classifier for BCT, and which classes count as old.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bctool.checkpoint import Checkpoint, file_sha256, load_checkpoint, load_model
from bctool.data.sources import ImageSet
from bctool.data.transforms import TORCH_MODES, Preprocess, StoredView
from bctool.embeddings import Embeddings, find_rows, load_embeddings
from bctool.errors import ConfigError, DataError, EmbeddingsError
from bctool.utils.io import unused_path
from bctool.utils.progress import NULL_PROGRESS, Progress
from bctool.train.config import CompatOptions

logger = logging.getLogger(__name__)


class PrecomputedOld(nn.Module):
    """Old embeddings looked up by training-set row: ``table[indices]``, kept on the device.

    With stored ``views`` the table holds the clean rows (0 .. N-1) then each view's N rows, and
    the loader's index names the row of the view it drew (:class:`~bctool.data.dataset.StoredViewsDataset`).
    """

    def __init__(self, table: torch.Tensor, views: tuple[StoredView, ...] = ()) -> None:
        super().__init__()
        self.register_buffer("table", table.float(), persistent=False)
        self.views = views

    def forward(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Old embeddings (B, D) of the batch rows."""
        return self.table[indices]


class OnTheFlyOld(nn.Module):
    """The old model run on the same (augmented) batch, frozen and always in eval mode."""

    def __init__(self, checkpoint: Checkpoint, new_preprocess: Preprocess) -> None:
        super().__init__()
        self.model = checkpoint.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        old, new = checkpoint.preprocess, new_preprocess
        self.size = old.image_size if old.image_size != new.image_size else None
        self.mode = TORCH_MODES[old.interpolation]  # tensors resized with the old model's filter
        if old.background != new.background:
            logger.warning(
                "the old model composites transparent pixels on %s, this run on %s: with --old-model the old side "
                "sees this run's images; precompute its embeddings with `bctool extract` to give it its own",
                old.background, new.background,
            )
        if (old.crop_fraction, old.resize) != (new.crop_fraction, new.resize):
            logger.warning(
                "the old model crops %g of each image (%s), this run %g (%s): with --old-model the old side "
                "sees this run's crop; precompute its embeddings with `bctool extract` to give it its own",
                old.crop_fraction, old.resize, new.crop_fraction, new.resize,
            )
        # Undo the new normalisation and apply the old one, as one affine map per channel.
        scale = torch.tensor(new.std) / torch.tensor(old.std)
        shift = (torch.tensor(new.mean) - torch.tensor(old.mean)) / torch.tensor(old.std)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> OnTheFlyOld:
        """Stay in eval mode: the old model's BatchNorm statistics are part of its identity."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Old embeddings (B, D) of the batch images."""
        x = images * self.scale + self.shift
        if self.size is not None:
            x = F.interpolate(x, size=(self.size, self.size), mode=self.mode,
                              **({} if self.mode == "nearest" else {"align_corners": False}))
        return self.model.embed(x).float()


@dataclass
class OldSide:
    """Everything compatible training takes from the old model."""

    module: nn.Module  # PrecomputedOld or OnTheFlyOld
    # (N_train, D) old embeddings of the training rows (for statistics); with stored views
    # (K + 1) N_train rows: the clean ones, then each view's, in the module's table order.
    embeddings: torch.Tensor
    old_classes: torch.Tensor  # (C,) bool over the new label space
    old_head: nn.Module | None  # the old classifier (frozen), if known
    old_label_index: torch.Tensor | None  # (C,) new label -> old head index, -1 if none
    description: str  # for logs and the checkpoint


def match_by_id(images: ImageSet, old: Embeddings, source: str) -> torch.Tensor:
    """Rows of ``old`` in the order of ``images``; every training image needs one."""
    if not old.ids_known:
        raise EmbeddingsError(
            f"{source!r} has no ids, so its rows cannot be matched to the training images; extract the old "
            f"embeddings with `bctool extract {images.source} --model OLD.safetensors --out OLD_EMB.safetensors`, "
            "which records them"
        )
    rows = find_rows(old.ids, images.ids, f"the old embeddings {source!r}")
    missing = [image_id for image_id, r in zip(images.ids, rows.tolist()) if r < 0]
    if missing:
        # A new file beside the old one: the suggested command must not overwrite anything.
        suggestion = unused_path(Path(source).with_name(f"{Path(images.source).stem}_old_emb.safetensors"))
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise EmbeddingsError(
            f"{len(missing)} of {len(images)} training images have no old embedding in "
            f"{source!r} ({shown}{more}); extract the old embeddings over the same training "
            f"list: bctool extract {images.source} --model OLD.safetensors --out {suggestion}"
        )
    return torch.from_numpy(old.embeddings[rows].copy())


def _read_class_list(path: Path) -> list[str]:
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8-sig").split("\n")]
    except OSError as exc:
        raise DataError(f"cannot read --old-classes file {str(path)!r}: {exc.strerror}") from exc
    return [n for n in names if n and not n.startswith("#")]


def old_class_mask(
    label_names: tuple[str, ...], trained: list[str] | None, fallback: list[str], where: str
) -> torch.Tensor:
    """(C,) bool: which new labels the old model was trained on."""
    names = set(trained if trained is not None else fallback)
    mask = torch.tensor([name in names for name in label_names], dtype=torch.bool)
    if not bool(mask.any()):
        raise DataError(
            f"none of the {len(label_names)} training classes is an old class ({where}); "
            "the old model must share classes with the new training set (or pass --old-classes)"
        )
    return mask


def _head_mapping(label_names: tuple[str, ...], old_names: list[str], old_classes: torch.Tensor) -> torch.Tensor:
    """(C,) new label -> old head class, -1 where the class is not old (or not in the head)."""
    index = {name: i for i, name in enumerate(old_names)}
    mapping = torch.tensor([index.get(name, -1) for name in label_names], dtype=torch.int64)
    return torch.where(old_classes, mapping, torch.full_like(mapping, -1))


def _frozen_head(checkpoint: Checkpoint) -> nn.Module | None:
    head = checkpoint.model.head
    if head is None:
        return None
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return head


def checkpoint_path_of(emb: Embeddings) -> str | None:
    """The path of the checkpoint that made ``emb``, when it is still there and unchanged."""
    path, sha = emb.model.get("path"), emb.model.get("sha256")
    if not path or not sha or not Path(path).is_file():
        return None
    try:
        return path if file_sha256(path) == sha else None
    except OSError:
        return None


def _checkpoint_of(emb: Embeddings, device: torch.device) -> Checkpoint | None:
    """The checkpoint that made ``emb``, when it is still where it was and unchanged."""
    path = checkpoint_path_of(emb)
    try:
        return load_checkpoint(path, device=device) if path else None
    except Exception:  # noqa: BLE001 - an optional convenience, never an error
        return None


@dataclass(frozen=True)
class OldSource:
    """Where the old side comes from (the options of the same names): an embeddings file or an
    old checkpoint (exactly one), the old embeddings of stored augmented views (``extract
    --view``), and a file naming the old classes."""

    old_embeddings: str | None = None
    old_model: str | None = None
    old_classes: str | None = None
    old_views: Sequence[str] = ()

    @classmethod
    def of(cls, compat: CompatOptions) -> OldSource:
        """The old side a training configuration's compatibility options name."""
        return cls(compat.old_embeddings, compat.old_model, compat.old_classes, compat.old_views)


def load_old_side(
    images: ImageSet,
    embedding_dim: int,
    preprocess: Preprocess,
    device: torch.device,
    source: OldSource,
    *,
    need_old_head: bool = False,
    workers: int = 0,
    progress: Progress = NULL_PROGRESS,
) -> OldSide:
    """Build the old side from an embeddings file or an old checkpoint (exactly one); with
    ``source.old_views``, also the old embeddings of stored augmented views (``extract --view``)."""
    old_embeddings, old_model, old_classes = source.old_embeddings, source.old_model, source.old_classes
    if bool(old_embeddings) == bool(old_model):
        raise ConfigError("pass exactly one of --old-embeddings OLD_EMB.safetensors or --old-model OLD.safetensors")
    explicit = _read_class_list(Path(old_classes)) if old_classes else None
    if explicit is not None:
        unknown = sorted(set(explicit) - set(images.label_names))
        if unknown:
            logger.warning(
                "%d of the %d --old-classes names are not training labels (%s%s); they are ignored",
                len(unknown), len(set(explicit)), ", ".join(map(repr, unknown[:5])), " ..." if len(unknown) > 5 else "",
            )
    if old_model:
        return _from_model(images, embedding_dim, preprocess, device, old_model, explicit, workers, progress)
    assert old_embeddings is not None
    side = _from_embeddings(images, embedding_dim, device, old_embeddings, explicit, need_old_head)
    if source.old_views:
        views, tables = _stored_views(images, side.embeddings, old_embeddings, source.old_views)
        # The class statistics (centers, r_max) come from every view the new model trains on.
        side.embeddings = torch.cat([side.embeddings, *tables])
        side.module = PrecomputedOld(side.embeddings, views)
        side.description += f" and {len(views)} stored views"
    return side


def _view_of(emb: Embeddings) -> StoredView | None:
    view = emb.model.get("view")
    return StoredView.from_dict(view) if isinstance(view, dict) else None


def _stored_views(
    images: ImageSet, clean: torch.Tensor, old_embeddings: str, old_views: Sequence[str],
) -> tuple[tuple[StoredView, ...], list[torch.Tensor]]:
    """The views recorded in the ``old_views`` files and their rows in training order; each file
    must hold one seeded view of every training image, made by the model of ``old_embeddings``."""
    sha = load_embeddings(old_embeddings, mmap=True).model.get("sha256")
    views: list[StoredView] = []
    tables: list[torch.Tensor] = []
    for path in old_views:
        emb = load_embeddings(path, mmap=True)
        view = _view_of(emb)
        if view is None:
            raise EmbeddingsError(
                f"--old-views {path!r} holds clean embeddings, not a stored view; make one with `bctool extract "
                f"{images.source} --model OLD.safetensors --view crop --view-index K --out OLD_VIEW_K.safetensors`"
            )
        if view in views:
            raise EmbeddingsError(f"--old-views {path!r} repeats view {view.to_dict()} of an earlier file; "
                                  "give each --view-index once")
        if emb.model.get("sha256") != sha:
            raise EmbeddingsError(
                f"--old-views {path!r} was made by model {emb.model.get('path', '?')!r} (sha256 "
                f"{str(emb.model.get('sha256'))[:12]}), --old-embeddings {old_embeddings!r} by another "
                f"(sha256 {str(sha)[:12]}); extract every file with the same old checkpoint"
            )
        _check_dim(emb.dim, clean.shape[1], path)
        table = match_by_id(images, emb, path)
        if not torch.isfinite(table).all():
            raise EmbeddingsError(f"{path!r} holds non-finite values (NaN or inf); re-extract it")
        views.append(view)
        tables.append(table)
    return tuple(views), tables


def _from_model(
    images: ImageSet, embedding_dim: int, preprocess: Preprocess, device: torch.device, old_model: str,
    explicit: list[str] | None, workers: int, progress: Progress,
) -> OldSide:
    """The old checkpoint run on every batch; its statistics from un-augmented training images."""
    checkpoint = load_model(old_model, device=device)
    _check_dim(checkpoint.config.embedding_dim, embedding_dim, old_model)
    module: nn.Module = OnTheFlyOld(checkpoint, preprocess)
    # Statistics come from the old model on un-augmented training images, as with a file.
    from bctool.extract import extract

    table = torch.from_numpy(extract(images, checkpoint, workers=workers, progress=progress).embeddings)
    trained = explicit if explicit is not None else checkpoint.extra.get("trained_classes")
    # A model that knows no classes (an imported pretrained network) embeds every class as the
    # old system does: every training class is old, as with an embeddings file of every label.
    known = checkpoint.class_names or list(images.label_names)
    mask = old_class_mask(images.label_names, trained, known, f"--old-model {old_model}")
    head = _frozen_head(checkpoint)
    mapping = _head_mapping(images.label_names, checkpoint.class_names, mask) if head else None
    return OldSide(module, table, mask, head, mapping, f"old model {old_model}")


def _from_embeddings(
    images: ImageSet, embedding_dim: int, device: torch.device, old_embeddings: str, explicit: list[str] | None,
    need_old_head: bool,
) -> OldSide:
    """Precomputed old embeddings matched to the training images by id; the old classifier
    from the checkpoint the file names, when the method uses it and that file is unchanged."""
    emb = load_embeddings(old_embeddings)
    if _view_of(emb) is not None:
        raise EmbeddingsError(
            f"--old-embeddings {old_embeddings!r} holds a stored augmented view ({emb.model['view']}), not the clean "
            "images the class statistics come from; pass the clean old embeddings (`bctool extract` without --view) "
            "as --old-embeddings and this file as --old-views"
        )
    _check_dim(emb.dim, embedding_dim, old_embeddings)
    table = match_by_id(images, emb, old_embeddings)
    if not torch.isfinite(table).all():
        raise EmbeddingsError(
            f"{old_embeddings!r} holds non-finite values (NaN or inf); re-extract the old embeddings"
        )
    trained = explicit if explicit is not None else emb.model.get("trained_classes")
    present = sorted({n for n in emb.label_strings() if n is not None})
    mask = old_class_mask(images.label_names, trained, present, f"--old-embeddings {old_embeddings}")
    head, mapping = None, None
    if need_old_head:
        checkpoint = _checkpoint_of(emb, device)
        if checkpoint is not None and checkpoint.model.head is not None:
            head = _frozen_head(checkpoint)
            mapping = _head_mapping(images.label_names, checkpoint.class_names, mask)
            logger.info("using the old classifier of %s", checkpoint.path)
        else:
            logger.warning(
                "the old checkpoint named in %s (%s) is not there or has changed, so its "
                "classifier is not available; using the old class centers as prototypes "
                "(pass --old-model to use the old classifier)",
                old_embeddings, emb.model.get("path", "unknown"),
            )
    return OldSide(PrecomputedOld(table), table, mask, head, mapping, f"old embeddings {old_embeddings}")


def _check_dim(old_dim: int, new_dim: int, source: str) -> None:
    if old_dim != new_dim:
        raise EmbeddingsError(
            f"old embeddings from {source!r} have dimension {old_dim} but the new model's is "
            f"{new_dim}; compatible training needs the same dimension: pass --embedding-dim {old_dim}"
        )
