"""A pretrained network as it is, as a bctool checkpoint (``bctool import``).

The checkpoint's model is the backbone with its pretrained weights and an identity neck: the
neck's Linear is the identity matrix and its BatchNorm passes its input through unchanged in
eval mode (zero mean, unit scale, zero shift, running variance ``1 - eps`` so that
``var + eps`` is exactly 1), so ``embed`` returns the backbone's pooled features bit for bit.
The embedding dimension is the backbone's feature width; there is no classification head.
Being an ordinary checkpoint, it works everywhere one does: ``extract``, ``export``,
``--old-model`` and the warm start ``--init-from`` (which then starts from the identity neck).
The preprocessing is the named weights' own (resolution, interpolation, normalisation, crop),
or bctool's default for a weights file; any of its steps can be given instead.

With a :class:`Projection`, the neck is the user's own projection head instead of the identity:
a Linear (with or without a bias) and optionally a BatchNorm1d after it, read from the weights
file or a second one. bctool's neck is a bias-free Linear and a BatchNorm, so the Linear's bias
moves into the BatchNorm's running mean (``BN(Wx + b) = BN'(Wx)`` with ``mean' = mean - b``), and
without a BatchNorm the neck's is the identity shifted by the bias: the embedding is the
projection's output, exactly (to float rounding). With a :class:`Classifier` (the user's Linear
over their training classes, and the classes' names), the checkpoint has a linear head, so that
a warm start copies the rows of the classes it knows, as from a model bctool trained.
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

BATCHNORM_KEYS = ("weight", "bias", "running_mean", "running_var")

DEFAULT_IMAGE_SIZE = 224  # of a weights file, which records no resolution


@dataclass(frozen=True)
class Projection:
    """A user's projection head in a weights file: the Linear at key prefix ``linear``
    (``PREFIX.weight``, ``PREFIX.bias`` if it has one), optionally a BatchNorm1d at ``norm``
    (``weight``, ``bias``, ``running_mean``, ``running_var``; ``eps`` its epsilon), read from
    ``file`` (default: the backbone's weights file, whose other keys are then the backbone's)."""

    linear: str
    norm: str | None = None
    file: str | None = None
    eps: float = 1e-5

    def keys(self) -> list[str]:
        """Every key the projection may take from its file."""
        keys = [f"{self.linear}.weight", f"{self.linear}.bias"]
        if self.norm:
            keys += [f"{self.norm}.{k}" for k in (*BATCHNORM_KEYS, "num_batches_tracked")]
        return keys


@dataclass(frozen=True)
class Classifier:
    """A user's classifier on the embedding: the Linear at key prefix ``linear`` (``weight``
    of shape (classes, embedding dim), ``bias`` if it has one), its rows named by ``classes`` in
    order, read from ``file`` (default: the backbone's weights file). It becomes the checkpoint's
    linear head, so that a warm start copies the rows of the classes it knows, as it does from a
    model bctool trained."""

    linear: str
    classes: tuple[str, ...]
    file: str | None = None

    def keys(self) -> list[str]:
        """Every key the classifier may take from its file."""
        return [f"{self.linear}.weight", f"{self.linear}.bias"]


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_pretrained` wrote."""

    out: str
    arch: str
    embedding_dim: int
    pretrained: dict[str, Any]  # the weights' record (name, sha256, package...) or the file's
    preprocess: dict[str, Any]
    neck: dict[str, Any]  # {"kind": "identity"} or the projection's record
    classes: int  # rows of the imported classifier (0: none)
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


def imported_model(arch: str, pretrained: str, projection: Projection | None = None,
                   classifier: Classifier | None = None,
                   drop: tuple[str, ...] = ()) -> tuple[EmbeddingModel, dict[str, Any], dict[str, Any]]:
    """The pretrained backbone ``arch`` with an identity neck (or ``projection``) and no head (or
    ``classifier``'s), in eval mode, the record of the weights loaded and the neck's record.
    The keys under the prefixes in ``drop`` are left out of the weights file (a classifier or
    any other part not imported)."""
    width = int(build_backbone(arch).num_features)
    files: dict[str, dict[str, torch.Tensor]] = {}  # each file read once for the projection and classifier
    tensors = read_projection(projection, pretrained, files=files) if projection else None
    dim = int(tensors["weight"].shape[0]) if tensors else width
    if tensors and tensors["weight"].shape[1] != width:
        raise ModelError(f"projection {projection.linear!r} maps {tensors['weight'].shape[1]} features to {dim}, "
                         f"but the {arch} backbone gives {width}: pass the Linear that follows this backbone's "
                         "pooled features")
    head = _read_classifier(classifier, pretrained, dim, files) if classifier else None
    model = create_model(ModelConfig(arch=arch, embedding_dim=dim, num_classes=len(classifier.classes) if head else 0,
                                     head="linear", head_bias=bool(head and "bias" in head)))
    leave_out = [*(projection.keys() if projection and projection.file is None else []),
                 *(classifier.keys() if classifier and classifier.file is None else []),
                 *(f"{prefix.rstrip('.')}." for prefix in drop)]
    record = load_pretrained(model.backbone, arch, pretrained, leave_out=leave_out)
    if tensors is None:
        set_identity_neck(model)
    else:
        set_projection_neck(model, tensors, projection.eps)
    if head is not None:
        with torch.no_grad():
            model.head.fc.weight.copy_(head["weight"])
            if "bias" in head:
                model.head.fc.bias.copy_(head["bias"])
    neck: dict[str, Any] = {"kind": "identity"}
    if projection is not None:
        neck = {"kind": "projection", **asdict(projection), "out_features": dim,
                "bias": "bias" in tensors, "batchnorm": projection.norm is not None}
    return model.eval(), record, neck


def _read_classifier(classifier: Classifier, pretrained: str, dim: int,
                     files: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    head = read_projection(Projection(classifier.linear, file=classifier.file), pretrained, "--classifier", files)
    rows, width = head["weight"].shape
    if width != dim:
        raise ModelError(f"classifier {classifier.linear!r} takes {width}-d inputs, but the embedding is {dim}-d: "
                         "pass the Linear that classifies the embedding (after the projection)")
    if rows != len(classifier.classes) or len(set(classifier.classes)) != rows:
        raise ConfigError(f"classifier {classifier.linear!r} has {rows} rows, and --classes names "
                          f"{len(classifier.classes)} ({len(set(classifier.classes))} distinct): give one distinct "
                          "class name a line, in the order of the rows")
    return head


def read_projection(projection: Projection, pretrained: str, option: str = "--projection",
                    files: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """The projection's tensors by role (``weight``, ``bias``; ``bn_weight``, ``bn_bias``,
    ``bn_running_mean``, ``bn_running_var``), from its file (kept in ``files``, by name, for the
    next read); a missing or misshapen key names the keys the file holds under that prefix."""
    from bctool.models.pretrained import read_weights_file, strip_wrapper_prefixes

    if projection.file is None and is_weights_name(pretrained):
        raise ConfigError(f"--pretrained {pretrained} is named weights with no {option} in them; give the "
                          "file that holds it with --projection-file")
    name = projection.file or pretrained
    files = {} if files is None else files
    raw = files[str(name)] = files.get(str(name)) or read_weights_file(name)
    wanted = {"weight": f"{projection.linear}.weight"}
    if projection.norm:
        wanted.update({f"bn_{k}": f"{projection.norm}.{k}" for k in BATCHNORM_KEYS})
    # The keys as the file names them, or without a wrapper prefix every key shares.
    state = raw if all(key in raw for key in wanted.values()) else strip_wrapper_prefixes(raw)
    missing = [key for key in wanted.values() if key not in state]
    if missing:
        prefixes = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".weight") and state[k].ndim == 2})
        raise ModelError(f"weights file {str(name)!r} has no {', '.join(missing)}; the Linear layers it holds are "
                         f"{prefixes[:10] or 'none'}: name one with {option}")
    tensors = {role: state[key].float() for role, key in wanted.items()}
    if f"{projection.linear}.bias" in state:
        tensors["bias"] = state[f"{projection.linear}.bias"].float()
    out = tensors["weight"].shape[0]
    bad = [f"{key} {tuple(state[key].shape)}" for role, key in wanted.items() if role != "weight"
           and tuple(state[key].shape) != (out,)]
    if tensors["weight"].ndim != 2 or bad or ("bias" in tensors and tuple(tensors["bias"].shape) != (out,)):
        raise ModelError(f"{option} in {str(name)!r} is misshapen: {projection.linear}.weight "
                         f"{tuple(tensors['weight'].shape)} must be (out, in) and every other tensor (out,): {bad}")
    return tensors


def set_projection_neck(model: EmbeddingModel, tensors: dict[str, torch.Tensor], eps: float) -> None:
    """Make ``model``'s neck compute the projection ``tensors`` (see the module docstring)."""
    linear, norm = model.neck[0], model.neck[1]
    bias = tensors.get("bias", torch.zeros(linear.weight.shape[0]))
    with torch.no_grad():
        linear.weight.copy_(tensors["weight"])
        if "bn_weight" in tensors:
            norm.weight.copy_(tensors["bn_weight"])
            norm.bias.copy_(tensors["bn_bias"])
            norm.running_mean.copy_(tensors["bn_running_mean"] - bias)
            # The user's epsilon, in the neck's: var' + eps_neck = var + eps_user.
            norm.running_var.copy_(tensors["bn_running_var"] + eps - norm.eps)
        else:
            norm.weight.fill_(1.0)
            norm.bias.copy_(bias)
            norm.running_mean.zero_()
            norm.running_var.fill_(1.0 - norm.eps)


def imported_preprocess(arch: str, pretrained: str, **steps: Any) -> Preprocess:
    """The preprocessing an imported network keeps: the named weights' own, or bctool's default
    for a file (224 px), with each step given in ``steps`` (:class:`Preprocess` fields; None:
    keep it) instead."""
    base = (named_weights(arch, pretrained).preprocess if is_weights_name(pretrained)
            else Preprocess(image_size=DEFAULT_IMAGE_SIZE))
    unknown = sorted(set(steps) - {f.name for f in dataclasses.fields(Preprocess)})
    if unknown:
        raise ConfigError(f"unknown preprocessing steps {unknown}")
    return dataclasses.replace(base, **{k: v for k, v in steps.items() if v is not None})


def import_pretrained(arch: str, pretrained: str, out: str | os.PathLike[str], *,
                      projection: Projection | None = None, classifier: Classifier | None = None,
                      drop: tuple[str, ...] = (), **steps: Any) -> ImportResult:
    """Write the checkpoint of the pretrained network ``arch`` (weights ``pretrained``: a name
    such as ``imagenet``, or a file), with ``projection`` as its neck and ``classifier`` as its
    head when given, preprocessing as ``steps`` say (see :func:`imported_preprocess`), the keys
    under ``drop`` left out, to ``out``."""
    from bctool.checkpoint import file_sha256, save_checkpoint

    try:
        preprocess = imported_preprocess(arch, pretrained, **steps)
    except ValueError as exc:  # a crop fraction, size or normalisation out of range
        raise ConfigError(str(exc)) from exc
    check_pretrained(arch, pretrained)
    model, record, neck = imported_model(arch, pretrained, projection, classifier, drop)
    imported: dict[str, Any] = {"neck": neck["kind"], **({"projection": neck} if projection else {}),
                                **({"dropped": list(drop)} if drop else {})}
    if classifier is not None:
        imported["classifier"] = {"linear": classifier.linear, "file": classifier.file, "classes": len(classifier.classes)}
    classes = list(classifier.classes) if classifier else []
    extra: dict[str, Any] = {"imported": imported, "pretrained": record}
    if classes:  # the classes the old model was trained on: compatible training treats only these as old
        extra["trained_classes"] = classes
    save_checkpoint(out, model, preprocess, classes, train_config={}, extra=extra)
    return ImportResult(out=str(out), arch=arch, embedding_dim=model.embedding_dim, pretrained=record,
                        preprocess=asdict(preprocess), neck=neck, classes=len(classes), sha256=file_sha256(Path(out)))
