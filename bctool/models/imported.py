"""A pretrained network as it is, as a bctool checkpoint (``bctool import``).

The checkpoint's model is the backbone with its pretrained weights and an identity neck: the
neck's Linear is the identity matrix and its BatchNorm passes its input through unchanged in
eval mode (zero mean, unit scale, zero shift, running variance ``1 - eps`` so that
``var + eps`` is exactly 1), so ``embed`` returns the backbone's pooled features bit for bit.
The embedding dimension is the backbone's feature width; there is no classification head.
Being an ordinary checkpoint, it works everywhere one does: ``extract``, ``export``,
``--old-model`` and the warm start ``--init-from`` (which then starts from the identity neck).
The preprocessing is the named weights' own (resolution, interpolation, normalisation, crop),
or bctool's default for a weights file; ``image_size`` and ``crop_fraction`` override it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bctool.data.transforms import Preprocess
from bctool.errors import ConfigError, ModelError
from bctool.models.model import (
    EmbeddingModel,
    ModelConfig,
    build_backbone,
    create_model,
)
from bctool.models.weights import (
    check_pretrained,
    is_weights_name,
    load_pretrained,
    named_weights,
)

DEFAULT_IMAGE_SIZE = 224  # of a weights file, which records no resolution


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_pretrained` wrote."""

    out: str
    arch: str
    embedding_dim: int
    pretrained: dict[str, Any]  # the weights' record (name, sha256, package...) or the file's
    preprocess: dict[str, Any]
    sha256: str  # of the checkpoint written

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return asdict(self)


def set_identity_neck(model: EmbeddingModel) -> None:
    """Make ``model``'s neck the exact identity in eval mode (its dimension must be the
    backbone's feature width)."""
    linear, norm = model.neck[0], model.neck[1]
    if linear.weight.shape[0] != linear.weight.shape[1]:
        raise ModelError(f"an identity neck maps the backbone's features to themselves, so embedding_dim must be "
                         f"the backbone's width; got a neck of shape {tuple(linear.weight.shape)}")
    with torch.no_grad():
        linear.weight.copy_(torch.eye(linear.weight.shape[0]))
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        norm.running_mean.zero_()
        # float32(1 - eps) + eps rounds to exactly 1: the BatchNorm then scales by exactly 1.
        norm.running_var.fill_(1.0 - norm.eps)


def imported_model(arch: str, pretrained: str) -> tuple[EmbeddingModel, dict[str, Any]]:
    """The pretrained backbone ``arch`` with an identity neck and no head, in eval mode, and the
    record of the weights loaded."""
    width = int(build_backbone(arch).num_features)
    model = create_model(ModelConfig(arch=arch, embedding_dim=width, num_classes=0))
    record = load_pretrained(model.backbone, arch, pretrained)
    set_identity_neck(model)
    return model.eval(), record


def imported_preprocess(arch: str, pretrained: str, image_size: int | None = None,
                        crop_fraction: float | None = None) -> Preprocess:
    """The preprocessing an imported network keeps: the named weights' own, or bctool's default
    for a file (224 px), with ``image_size`` and ``crop_fraction`` overriding it when given."""
    base = (named_weights(arch, pretrained).preprocess if is_weights_name(pretrained)
            else Preprocess(image_size=DEFAULT_IMAGE_SIZE))
    changes: dict[str, Any] = {}
    if image_size is not None:
        changes["image_size"] = image_size
    if crop_fraction is not None:
        changes["crop_fraction"] = crop_fraction
    return dataclasses.replace(base, **changes)


def import_pretrained(arch: str, pretrained: str, out: str | os.PathLike[str], image_size: int | None = None,
                      crop_fraction: float | None = None) -> ImportResult:
    """Write the checkpoint of the pretrained network ``arch`` (weights ``pretrained``: a name
    such as ``imagenet``, or a file) as it is, to ``out`` (see the module docstring)."""
    from bctool.checkpoint import file_sha256, save_checkpoint

    try:
        preprocess = imported_preprocess(arch, pretrained, image_size, crop_fraction)
    except ValueError as exc:  # a crop fraction or size out of range
        raise ConfigError(str(exc)) from exc
    check_pretrained(arch, pretrained)
    model, record = imported_model(arch, pretrained)
    extra = {"imported": {"neck": "identity"}, "pretrained": record}
    save_checkpoint(out, model, preprocess, [], train_config={}, extra=extra)
    return ImportResult(out=str(out), arch=arch, embedding_dim=model.embedding_dim, pretrained=record,
                        preprocess=asdict(preprocess), sha256=file_sha256(Path(out)))
