"""ONNX and TorchScript files as models: run as black boxes, images in, embeddings out.

A model someone exported years ago often survives only as such a file. bctool runs it wherever
it runs a checkpoint for its embeddings: ``extract --model``, ``verify --model``, ``train
--old-model`` (the old side needs no gradients). It cannot warm-start from one: the file holds a
graph, not weights bctool can copy (the adapters are the tool there).

The file's input is a batch ``(N, 3, S, S)`` of float32 images and its first output the
embeddings ``(N, D)``. How images become that input is the file's bctool metadata: ``bctool
export`` writes it, and ``bctool import FILE --image-size S ...`` writes a copy of any such file
with it. The metadata is JSON under the key ``bctool`` of the ONNX file's metadata properties,
or in the TorchScript archive's extra file ``bctool.json``; its ``preprocess`` is a
:class:`~bctool.data.transforms.Preprocess` and ``export.normalize_included`` says that the
graph normalises its input itself (the input is then RGB in [0, 1]).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bctool.data.transforms import Preprocess
from bctool.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

ONNX_METADATA_KEY = "bctool"  # the ONNX metadata property holding bctool's JSON
TORCHSCRIPT_METADATA_FILE = "bctool.json"  # the TorchScript extra file holding it
RUNTIME_EXTRA = "pip install \"bctool[export]\" (onnx, onnxscript and onnxruntime)"
ONNX_SUFFIXES = (".onnx",)
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")


def named_like_model_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path``'s suffix is an ONNX or TorchScript one (the file need not exist)."""
    return Path(path).suffix.lower() in (*ONNX_SUFFIXES, *TORCHSCRIPT_SUFFIXES)


def model_file_kind(path: str | os.PathLike[str]) -> str | None:
    """``"onnx"`` or ``"torchscript"`` for such a file, None for anything else (a safetensors
    checkpoint). A TorchScript archive is a zip holding compiled code; a state dict saved by
    ``torch.save`` is a zip too, without it, and is refused with the command that imports it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    if not path.is_file():
        return None
    named = suffix in TORCHSCRIPT_SUFFIXES
    try:
        with zipfile.ZipFile(path) as archive:
            code = any("/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        if not named:
            return None  # another name and not a zip: a checkpoint, for load_checkpoint to judge
        raise ModelError(f"{str(path)!r} is neither a TorchScript archive nor a torch state dict; pass a file "
                         "written by torch.jit.save, an ONNX file or a bctool checkpoint") from None
    if code:
        return "torchscript"  # told by its contents, whatever its name
    if not named:
        return None
    raise ModelError(f"{str(path)!r} is a torch state dict (weights without the network), not a model bctool can "
                     "run; make a checkpoint of it with `bctool import ARCH --pretrained "
                     f"{path} --out model.safetensors` (ARCH: its backbone, e.g. resnet18)")


@dataclass(frozen=True)
class ExternalConfig:
    """What bctool knows of a model file's structure: its format (as ``arch``) and width."""

    arch: str
    embedding_dim: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


class ExternalModel(nn.Module):
    """A model file run as a black box; ``embed`` maps input images to raw embeddings."""

    def __init__(self, kind: str, run: Callable[[torch.Tensor], torch.Tensor], embedding_dim: int) -> None:
        super().__init__()
        self.kind, self._run = kind, run
        self.config = ExternalConfig(arch=kind, embedding_dim=embedding_dim)
        self.embedding_dim = embedding_dim
        self.head = None  # no classification head: the file holds the embedding graph alone
        # Where its inputs go (the runtime moves them on): a buffer, as it has no parameters.
        self.register_buffer("anchor", torch.zeros(0), persistent=False)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Raw embeddings ``(N, D)`` of a batch of input images, on the images' device."""
        out = self._run(images)
        if out.ndim != 2 or out.shape[0] != images.shape[0]:
            raise ModelError(f"the {self.kind} model gave an output of shape {tuple(out.shape)} for {images.shape[0]} "
                             "images; bctool needs its first output to be (images, embedding dimension)")
        return out.to(images.device, torch.float32)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`embed`."""
        return self.embed(images)


def _onnx_session(path: Path, device: torch.device) -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"running the ONNX file {str(path)!r} needs onnxruntime, which is not installed: "
                          f"{RUNTIME_EXTRA}") from None
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        else:
            logger.warning("%s runs on the CPU: this onnxruntime has no CUDA provider (pip install "
                           "onnxruntime-gpu)", path)
    try:
        return onnxruntime.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
        raise ModelError(f"{str(path)!r} is not an ONNX model onnxruntime can load ({exc}); pass the .onnx file "
                         "that torch.onnx.export or `bctool export` wrote") from exc


def _onnx_runner(path: Path, device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, str]]:
    session = _onnx_session(path, device)
    name = session.get_inputs()[0].name
    batch = session.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) and batch > 0 else None  # a file exported with a fixed batch size

    def run(images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        if step is None:
            return torch.from_numpy(np.asarray(session.run(None, {name: array})[0]))
        parts = []
        for start in range(0, len(array), step):
            chunk = array[start : start + step]
            pad = step - len(chunk)  # the last chunk filled up to the fixed size, its extra rows dropped
            filled = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
            parts.append(np.asarray(session.run(None, {name: filled})[0])[: len(chunk)])
        return torch.from_numpy(np.concatenate(parts))

    return run, dict(session.get_modelmeta().custom_metadata_map)


def _torchscript_runner(path: Path, device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, str]]:
    extra = {TORCHSCRIPT_METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still served
        try:
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except RuntimeError as exc:
            raise ModelError(f"{str(path)!r} is not a TorchScript archive torch can load ({str(exc).splitlines()[0]})"
                             ) from exc
    module.eval()

    def run(images: torch.Tensor) -> torch.Tensor:
        out = module(images)
        if isinstance(out, dict):
            tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
            if len(tensors) != 1:
                raise ModelError(f"{str(path)!r} returns a dict with keys {sorted(out)}; bctool needs one tensor of "
                                 "embeddings: export a wrapper that returns it")
            return next(iter(tensors.values()))
        return out[0] if isinstance(out, (tuple, list)) else out

    metadata = {ONNX_METADATA_KEY: extra[TORCHSCRIPT_METADATA_FILE]} if extra[TORCHSCRIPT_METADATA_FILE] else {}
    return run, metadata


RUNNERS = {"onnx": _onnx_runner, "torchscript": _torchscript_runner}


def read_model_file_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The bctool metadata of an ONNX or TorchScript file ({} when it has none)."""
    kind = model_file_kind(path)
    if kind is None:
        raise ModelError(f"{os.fspath(path)!r} is not an ONNX or TorchScript file")
    _, metadata = RUNNERS[kind](Path(path), torch.device("cpu"))
    return _parse_metadata(metadata, Path(path))


def _parse_metadata(metadata: dict[str, str], path: Path) -> dict[str, Any]:
    if ONNX_METADATA_KEY not in metadata:
        return {}
    try:
        record = json.loads(metadata[ONNX_METADATA_KEY])
    except ValueError as exc:
        raise ModelError(f"{str(path)!r} holds corrupt bctool metadata ({exc}); write it again with `bctool import "
                         f"{path} --image-size S --out FIXED{path.suffix}`") from exc
    return record if isinstance(record, dict) else {}


def input_preprocess(record: dict[str, Any]) -> Preprocess:
    """The preprocessing that makes a model file's input, from its metadata: the recorded steps,
    with no normalisation when the graph normalises its input itself."""
    pre = Preprocess.from_dict(record["preprocess"])
    if record.get("export", {}).get("normalize_included"):
        pre = dataclasses.replace(pre, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return pre


def load_model_file(path: str | os.PathLike[str], device: torch.device | str = "cpu",
                    preprocess: Preprocess | None = None) -> tuple[ExternalModel, Preprocess, dict[str, Any]]:
    """The model of an ONNX or TorchScript file, the preprocessing of its input (its metadata's,
    or ``preprocess`` for a file without any) and its metadata; its width is measured on one
    blank image."""
    path, device = Path(path), torch.device(device)
    kind = model_file_kind(path)
    if kind is None:
        raise ModelError(f"{str(path)!r} is not an ONNX or TorchScript file")
    run, metadata = RUNNERS[kind](path, device)
    record = _parse_metadata(metadata, path)
    if preprocess is None:
        if "preprocess" not in record:
            raise ModelError(
                f"{str(path)!r} records no preprocessing (how images become its input), so bctool cannot feed it; "
                f"write a copy that does with `bctool import {path} --image-size S [--resize, --crop, "
                f"--interpolation, --mean, --std] --out MODEL{path.suffix}`"
            )
        preprocess = input_preprocess(record)
    probe = torch.zeros(2, 3, preprocess.image_size, preprocess.image_size, device=device)
    try:
        width = int(run(probe).shape[-1])
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - a runtime's own error on a wrong input shape
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{str(path)!r} does not take ({preprocess.image_size} x {preprocess.image_size}) images "
                         f"({first}); give the image size it was exported with") from exc
    return ExternalModel(kind, run, width), preprocess, record


def write_model_file_with_metadata(source: str | os.PathLike[str], out: str | os.PathLike[str],
                                   record: dict[str, Any]) -> None:
    """Copy the ONNX or TorchScript file ``source`` to ``out`` (atomically) with ``record`` as its
    bctool metadata, after checking that the copy runs on one image of its preprocessing."""
    from bctool.utils.io import atomic_path

    kind = model_file_kind(source)
    suffixes = ONNX_SUFFIXES if kind == "onnx" else TORCHSCRIPT_SUFFIXES
    if kind is None or Path(out).suffix.lower() not in suffixes:
        raise ConfigError(f"--out {os.fspath(out)!r} must be a file of the same kind as {os.fspath(source)!r} "
                          f"(ending in {ONNX_SUFFIXES[0] if kind == 'onnx' else TORCHSCRIPT_SUFFIXES[0]})")
    text = json.dumps(record)
    with atomic_path(out) as tmp:
        if kind == "onnx":
            _write_onnx_metadata(Path(source), tmp, text)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(source), map_location="cpu")
                torch.jit.save(module, str(tmp), _extra_files={TORCHSCRIPT_METADATA_FILE: text})
        run, metadata = RUNNERS[kind](tmp, torch.device("cpu"))
        size = int(record["preprocess"]["image_size"])
        try:
            ExternalModel(kind, run, 0).embed(torch.zeros(2, 3, size, size))  # two images: a batch axis that varies
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - the runtime's own error on a wrong input shape
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{os.fspath(source)!r} does not take ({size} x {size}) images ({first}); give the "
                             "--image-size it was exported with") from exc


def _write_onnx_metadata(source: Path, target: Path, text: str) -> None:
    try:
        import onnx
    except ImportError:
        raise ConfigError(f"writing metadata into an ONNX file needs the onnx package: {RUNTIME_EXTRA}") from None
    proto = onnx.load(str(source))
    kept = [p for p in proto.metadata_props if p.key != ONNX_METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, text
    onnx.save(proto, str(target))
