"""Checkpoints: safetensors weights plus JSON metadata that rebuilds the model from the file.

Metadata keys (JSON strings): ``format`` (``"bctool.checkpoint"``), ``format_version``,
``model`` (:class:`ModelConfig`), ``preprocess`` (:class:`Preprocess`), ``class_names``,
``train`` (the training config, seed included), ``bctool_version``, ``environment`` (the
python, torch, numpy and safetensors versions and the platform), ``command`` (the command line
that wrote it) and ``extra`` (method-specific facts, e.g. which classes an old model was
trained on; ``pretrained``: the name, sha256, package and preprocessing of the weights the
backbone started from, or a weights file's path and sha256; ``imported``: a network written as
it is by ``bctool import``, with an identity neck). ``preprocess`` holds every step extraction
applies, ``crop_fraction`` included (absent from files written before it: the whole shorter
side). The same seed, data, options and device give the same file, byte for byte, on the
CPU (safetensors' own writer orders metadata keys at random; bctool writes them in order).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from bctool import __version__
from bctool.data.transforms import Preprocess
from bctool.errors import BctoolError, ModelError
from bctool.utils.io import check_format_version, read_safetensors_header, save_safetensors
from bctool.models import EmbeddingModel, ModelConfig, create_model
from bctool.models.external import ExternalConfig, ExternalModel, load_model_file, model_file_kind

FORMAT = "bctool.checkpoint"
FORMAT_VERSION = "1"


@dataclass
class Checkpoint:
    """A model rebuilt from a checkpoint file, with everything the file says about it (or an
    ONNX or TorchScript file run as a black box: see :func:`load_model`)."""

    model: EmbeddingModel | ExternalModel
    preprocess: Preprocess
    class_names: list[str]
    train_config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    path: str = ""

    @property
    def config(self) -> ModelConfig | ExternalConfig:
        """The model's structural config."""
        return self.model.config

    def identity(self) -> dict[str, Any]:
        """What embeddings files record about the model that made them."""
        identity: dict[str, Any] = {
            "sha256": self.sha256,
            "arch": self.config.arch,
            "embedding_dim": self.config.embedding_dim,
            "path": self.path,
        }
        # Compatible training reads which classes an old model knew from its embeddings file.
        if "trained_classes" in self.extra:
            identity["trained_classes"] = self.extra["trained_classes"]
        return identity


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    path: str | os.PathLike[str],
    model: EmbeddingModel,
    preprocess: Preprocess,
    class_names: list[str],
    train_config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the model's weights and metadata to ``path`` atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": json.dumps(model.config.to_dict()),
        "preprocess": json.dumps(asdict(preprocess)),
        "class_names": json.dumps(list(class_names)),
        "train": json.dumps(train_config or {}),
        "extra": json.dumps(extra or {}),
        "bctool_version": __version__,
        "environment": json.dumps(environment()),
        "command": command_line(),
    }
    save_safetensors(path, tensors, metadata)


def environment() -> dict[str, str]:
    """The versions a file was made with (results may change across them)."""
    import platform

    import numpy
    import safetensors

    return {"bctool": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "safetensors": safetensors.__version__,
            "platform": f"{platform.system()}-{platform.machine()}"}


def command_line() -> str:
    """The command that is running, as a shell would take it (program name without its folder)."""
    import shlex
    import sys

    argv = list(sys.argv) or [""]
    return shlex.join([os.path.basename(argv[0]), *argv[1:]])


def _check_header_size(path: Path) -> None:
    """Refuse, before safetensors parses it, a header longer than the limit or than the file."""
    try:
        read_safetensors_header(path)
    except ValueError as exc:
        raise ModelError(
            f"{str(path)!r} is not a readable safetensors checkpoint ({exc}); pass a file written by `bctool train`"
        ) from exc


def read_checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The raw metadata of a checkpoint, checked to be a bctool checkpoint."""
    p = Path(path)
    if p.is_dir():
        raise ModelError(f"checkpoint {str(p)!r} is a folder; pass the checkpoint file in it (MODEL.safetensors)")
    if not p.is_file():
        raise ModelError(f"checkpoint {str(p)!r} does not exist; train one with `bctool train`")
    _check_header_size(p)
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(
            f"{str(p)!r} is not a readable safetensors checkpoint ({exc}); pass a file written "
            "by `bctool train`"
        ) from exc
    if meta.get("format") != FORMAT:
        found = meta.get("format", "no bctool metadata")
        raise ModelError(
            f"{str(p)!r} is not a bctool checkpoint (format: {found}); pass a model written by "
            "`bctool train` (an embeddings file goes to --old-embeddings or evaluate)"
        )
    check_format_version(p, meta, "bctool checkpoint", FORMAT_VERSION, ModelError)
    return meta


def _check_finite_weights(state: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """A :class:`ModelError` naming the first tensor (in file order) with a NaN or inf value and
    how many tensors have one: such a model embeds every image to NaN."""
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ModelError(
            f"checkpoint {str(path)!r} holds NaN or inf weights: tensor {bad[0]!r}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}; it cannot embed anything. Train it again "
            "(a lower --lr keeps a loss finite), or use the checkpoint before it went wrong"
        )


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model of a checkpoint file, in eval mode, on ``device``."""
    meta = read_checkpoint_metadata(path)
    try:
        config = ModelConfig.from_dict(json.loads(meta["model"]))
        preprocess = Preprocess.from_dict(json.loads(meta["preprocess"]))
        class_names = [str(c) for c in json.loads(meta.get("class_names", "[]"))]
        train_config = json.loads(meta.get("train", "{}"))
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelError(f"checkpoint {str(path)!r} has corrupt metadata ({exc}); re-train it") from exc
    except BctoolError as exc:
        raise ModelError(f"checkpoint {str(path)!r}: {exc}") from exc
    model = create_model(config)
    state = load_file(str(path))
    _check_finite_weights(state, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"weights in {str(path)!r} do not fit a {config.arch} with embedding dimension "
            f"{config.embedding_dim} ({str(exc).splitlines()[0]}); the file is damaged or was "
            "edited: re-train it"
        ) from exc
    model.to(device).eval()
    return Checkpoint(
        model=model,
        preprocess=preprocess,
        class_names=class_names,
        train_config=train_config,
        extra=extra,
        sha256=file_sha256(path),
        path=str(Path(path).resolve()),
    )


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's inputs go to: its parameters' (or buffers', for a model file)."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Checkpoint:
    """A model to embed with: a bctool checkpoint, or an ONNX or TorchScript file run as a black
    box with the preprocessing its bctool metadata records (:mod:`bctool.models.external`). A
    warm start needs weights: it reads checkpoints alone (:func:`load_checkpoint`)."""
    kind = model_file_kind(path)
    if kind is None:
        return load_checkpoint(path, device=device)
    model, preprocess, record = load_model_file(path, device)
    extra = dict(record.get("extra") or {})
    extra["model_file"] = {"format": kind}
    return Checkpoint(model=model.to(device), preprocess=preprocess, class_names=[], extra=extra,
                      sha256=file_sha256(path), path=str(Path(path).resolve()))
