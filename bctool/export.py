"""Export: the embedding model of a checkpoint as ONNX or TorchScript, checked against bctool.

The exported model maps a batch of images, ``(N, 3, S, S)`` float32 RGB with S the checkpoint's
image size (any N: the batch axis is dynamic), to raw embeddings ``(N, D)``; retrieval
L2-normalises them, as ``bctool extract`` does. Resizing and cropping stay outside the graph
(resize the shorter side to S with bilinear filtering, centre-crop a square): they depend on
each image's size. The per-channel normalisation is outside too, unless ``normalize`` puts it
inside, so that the input is the image's RGB in [0, 1].

Before the file is written to its place, the exported model runs on a few images (the ones
given, else seeded random images) in its own runtime (onnxruntime, the TorchScript runtime) and
its embeddings are compared with ``bctool extract``'s; the largest difference, relative to the
embedding's norm, must stay within the tolerance (1e-4), or the export is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bctool.checkpoint import Checkpoint, read_checkpoint_metadata
from bctool.data.dataset import load_record
from bctool.data.sources import ImageSet
from bctool.data.transforms import EvalTransform, Preprocess
from bctool.errors import BctoolError, ConfigError
from bctool.models.external import ONNX_METADATA_KEY, TORCHSCRIPT_METADATA_FILE, read_model_file_metadata
from bctool.utils.io import atomic_path
from bctool.registry import Registry

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest |exported - bctool| / |bctool| allowed, per embedding
INPUT, OUTPUT = "images", "embeddings"
METADATA_KEY = ONNX_METADATA_KEY  # ONNX metadata_props key; TorchScript's extra file is TORCHSCRIPT_METADATA_FILE
_ONNX_EXTRA = "pip install -e \".[export]\" (onnx, onnxscript and onnxruntime)"


class Embedder(nn.Module):
    """What is exported: images -> raw embeddings, with the normalisation inside if asked; with
    an adapter's map, images -> L2-normalised embeddings in the adapter's target space."""

    def __init__(self, checkpoint: Checkpoint, normalize: bool, adapter: nn.Module | None = None) -> None:
        super().__init__()
        self.model = checkpoint.model
        pre = checkpoint.preprocess
        self.normalize = normalize
        self.adapter = adapter
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            images = (images - self.mean) / self.std
        embedding = self.model.embed(images)
        if self.adapter is None:
            return embedding
        return _unit(self.adapter(_unit(embedding)))


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their norm (as :func:`bctool.embeddings.normalize_rows`, zero rows kept)."""
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-30)


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and measured."""

    out: str
    format: str
    input: dict[str, Any]  # name, shape, dtype and what the values must be
    output: dict[str, Any]
    images_checked: int
    max_difference: float  # largest |exported - bctool| / |bctool| over the checked images
    tolerance: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return asdict(self)


def export_metadata(checkpoint_path: str | os.PathLike[str], normalize: bool) -> dict[str, Any]:
    """The checkpoint's metadata (class names aside) and how to feed the exported model."""
    meta = read_checkpoint_metadata(checkpoint_path)
    record: dict[str, Any] = {}
    for key, value in meta.items():
        if key == "class_names":
            continue
        try:
            record[key] = json.loads(value)
        except ValueError:
            record[key] = value
    # Every preprocessing step, resolved (a checkpoint from before they were recorded gets the
    # steps bctool applied then): what a serving stack rebuilds its input pipeline from.
    record["preprocess"] = dataclasses.asdict(Preprocess.from_dict(record["preprocess"]))
    record["export"] = {"normalize_included": normalize, "input": INPUT, "output": OUTPUT}
    return record


def _input_spec(pre: Preprocess, normalize: bool) -> dict[str, Any]:
    values = ("RGB in [0, 1]" if normalize else
              f"RGB in [0, 1], then (x - mean) / std per channel, mean {list(pre.mean)}, std {list(pre.std)}")
    return {"name": INPUT, "shape": ["batch", 3, pre.image_size, pre.image_size], "dtype": "float32",
            "values": values,
            "resize": _resize_text(pre),
            "background": f"transparent pixels composited on RGB {list(pre.background)}",
            "preprocess": dataclasses.asdict(pre)}


def _resize_text(pre: Preprocess) -> str:
    """The resize and crop steps of ``pre``, in words a serving stack can follow."""
    size, how = pre.image_size, pre.interpolation
    if pre.resize == "torchvision":
        return (f"shorter side to floor({size} / {pre.crop_fraction:g}) px ({how}), the longer side in proportion "
                f"(truncated), then the centred {size} x {size} square: torchvision's Resize + CenterCrop")
    if pre.resize == "squash":
        part = "the whole image" if pre.crop_fraction == 1 else f"the centred {pre.crop_fraction:g} of each side"
        return f"{part} resized to {size} x {size} px ({how}), the aspect ratio not kept"
    if pre.crop_fraction == 1:
        return f"shorter side to {size} px ({how}), then a centre crop of {size} x {size}"
    return f"the centred square of {pre.crop_fraction:g} of the shorter side, resized to {size} x {size} px ({how})"


def check_batch(checkpoint: Checkpoint, images: ImageSet | None, count: int, normalize: bool,
                seed: int = 0, adapter: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exported model's input for ``count`` images and what ``bctool extract`` (``--adapter``)
    gives for them: the first images of ``images``, else seeded random images (uniform RGB)."""
    pre = checkpoint.preprocess
    raw = dataclasses.replace(pre, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    if images is not None and len(images):
        records = images.records[:count]
        unit = torch.stack([EvalTransform(raw)(load_record(r, background=pre.background)) for r in records])
    else:
        generator = torch.Generator().manual_seed(seed)
        unit = torch.rand(count, 3, pre.image_size, pre.image_size, generator=generator)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    normalized = (unit - mean) / std
    with torch.inference_mode():
        expected = checkpoint.model.embed(normalized).float()
    if adapter is not None:
        expected = torch.from_numpy(adapter.apply(expected.numpy()))
    return (unit if normalize else normalized), expected


def check_adapter_source(adapter: Any, checkpoint: Checkpoint) -> None:
    """The adapter must map the space of this checkpoint (its sha256, where the adapter records one)."""
    want = adapter.source_model.get("sha256")
    if checkpoint.config.embedding_dim != adapter.source_dim or (want and want != checkpoint.sha256):
        raise ConfigError(
            f"the adapter maps the space of model {str(want)[:12]} ({adapter.source_model.get('path', '?')}, "
            f"{adapter.source_dim}-d), not this checkpoint {checkpoint.sha256[:12]} ({checkpoint.path}); pass the "
            "adapter fitted on this model's embeddings (`bctool adapt`)")


def _relative_difference(got: np.ndarray, expected: torch.Tensor) -> float:
    want = expected.numpy().astype(np.float64)
    norms = np.linalg.norm(want, axis=1).clip(min=1e-12)
    return float((np.abs(got.astype(np.float64) - want).max(axis=1) / norms).max())


def _require_onnx() -> None:
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"--format onnx needs {', '.join(missing)}, which is not installed: {_ONNX_EXTRA}")


def _export_onnx(module: Embedder, example: torch.Tensor, path: Path, metadata: dict[str, Any]) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1)
    # The exporter reports its steps on stdout, which is for JSON here, and logs warnings about
    # packages bctool does not use (torchvision): both go to the log, at debug level.
    quiet = logging.getLogger("torch.onnx").getEffectiveLevel() > logging.DEBUG
    with contextlib.redirect_stdout(sys.stderr if not quiet else io.StringIO()), _torch_logs_quiet(quiet):
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes={"images": {0: batch}}, verbose=False)
    program.save(str(path))
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.save(proto, str(path))


@contextlib.contextmanager
def _torch_logs_quiet(quiet: bool):  # noqa: ANN202 - a context manager
    """Torch's own loggers at ERROR while exporting, unless bctool logs at debug level."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._dynamo", "torch.export", "torch")]
    levels = [lg.level for lg in loggers]
    if quiet:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            if quiet:  # the exporter's own deprecation notices, not the user's concern
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _run_onnx(path: Path, images: torch.Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {INPUT: images.numpy()})[0]


def _export_torchscript(module: Embedder, example: torch.Tensor, path: Path, metadata: dict[str, Any]) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still served
        # The input side is fixed (the checkpoint's image size), so sizes read while tracing (the
        # TensorFlow padding of EfficientNet-Lite) are constants, as the warning fears: right here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, example)
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(metadata)})


def _run_torchscript(path: Path, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu")(images).numpy()


def _file_metadata(path: Path) -> dict[str, Any]:
    """The bctool metadata an exported ONNX or TorchScript file carries
    (:func:`bctool.models.external.read_model_file_metadata`)."""
    return read_model_file_metadata(path)


@dataclass(frozen=True)
class ExportFormat:
    """How one format is written, run (to check it) and read back.

    ``export(module, example, path, metadata)`` writes ``module`` (images -> embeddings, a
    dynamic batch axis) to ``path``, which ends in ``suffix``, with the JSON ``metadata``;
    ``run(path, images)`` returns the embeddings the written file computes; ``metadata(path)``
    reads the metadata back; ``require()`` raises a :class:`ConfigError` naming what to install.
    """

    export: Callable[[nn.Module, torch.Tensor, Path, dict[str, Any]], None]
    run: Callable[[Path, torch.Tensor], np.ndarray]
    metadata: Callable[[Path], dict[str, Any]]
    suffix: str
    runtime: str  # what serves the file, for people
    require: Callable[[], None] = lambda: None


def _admit_format(name: str, fmt: object) -> None:
    if not isinstance(fmt, ExportFormat):
        raise ConfigError(f"export format {name!r} must be a bctool.export.ExportFormat, got {fmt!r}")


# Export formats by --format name; the entry-point group bctool.export_formats adds others
# (bctool.registry).
FORMATS: Registry[ExportFormat] = Registry(
    "export format", "export-formats", admit=_admit_format,
    derive=lambda name, fmt: {"suffix": fmt.suffix, "runtime": fmt.runtime},
)
FORMATS.register("onnx", ExportFormat(_export_onnx, _run_onnx, _file_metadata, ".onnx", "onnxruntime", _require_onnx),
                 description=f"ONNX with a dynamic batch axis, run by onnxruntime; needs {_ONNX_EXTRA}")
FORMATS.register("torchscript", ExportFormat(_export_torchscript, _run_torchscript, _file_metadata, ".pt",
                                             "torch.jit.load"),
                 description="TorchScript (traced), loaded with torch.jit.load")


def read_exported_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The bctool metadata of an exported file, by the suffix of its format."""
    path = Path(path)
    by_suffix = {FORMATS[name].suffix: FORMATS[name] for name in FORMATS}
    fmt = by_suffix.get(path.suffix, FORMATS["torchscript"])
    return fmt.metadata(path)


def export_model(
    checkpoint: Checkpoint,
    out: str | os.PathLike[str],
    fmt: str = "onnx",
    normalize: bool = False,
    images: ImageSet | None = None,
    check: int = 8,
    tolerance: float = TOLERANCE,
    adapter: Any = None,
) -> ExportResult:
    """Export ``checkpoint``'s embedding model to ``out`` in ``fmt`` after checking it; with an
    :class:`bctool.adapt.Adapter` whose source is this checkpoint, the model followed by the map
    (one file; its output is L2-normalised rows in the adapter's target space).

    The exported file runs in its own runtime on ``check`` images (the first of ``images``,
    else seeded random ones) in a batch of another size than the export's example, so the
    dynamic batch axis is exercised too. A difference above ``tolerance`` (relative to the
    embedding norm) is an error and leaves nothing at ``out``.
    """
    if fmt not in FORMATS:
        FORMATS.raise_if_failed(fmt)
        raise ConfigError(f"--format {fmt!r} is unknown; choose one of {list(FORMATS)}")
    writer = FORMATS[fmt]
    if check < 1:
        raise ConfigError(f"--check {check} must be at least 1: the export is always checked")
    writer.require()
    started = time.perf_counter()
    checkpoint.model.to("cpu").eval()  # exported and checked on the CPU, where the runtimes run
    if adapter is not None:
        check_adapter_source(adapter, checkpoint)
    module = Embedder(checkpoint, normalize, adapter.module if adapter is not None else None).eval()
    inputs, expected = check_batch(checkpoint, images, check, normalize, adapter=adapter)
    example = inputs[:2] if len(inputs) > 2 else torch.cat([inputs, inputs])[:2]
    metadata = export_metadata(checkpoint.path, normalize)
    if adapter is not None:
        metadata["adapter"] = adapter.describe()
    difference = _write_checked(fmt, module, (example, inputs, expected), out, metadata, tolerance)
    logger.info("exported %s to %s: largest relative difference %.3g on %d images", fmt, out, difference, len(inputs))
    return ExportResult(
        out=str(out), format=fmt, input=_input_spec(checkpoint.preprocess, normalize),
        output=_output_spec(checkpoint, adapter), images_checked=len(inputs), max_difference=difference,
        tolerance=tolerance, seconds=round(time.perf_counter() - started, 2),
    )


def _write_checked(fmt: str, module: nn.Module, batches: tuple[torch.Tensor, torch.Tensor, np.ndarray],
                   out: str | os.PathLike[str], metadata: dict[str, Any], tolerance: float) -> float:
    """Export ``module`` in format ``fmt`` (traced on the example batch), run the file on the
    check inputs and keep it at ``out`` only when it matches the expected rows within
    ``tolerance``; return the largest relative difference."""
    writer = FORMATS[fmt]
    example, inputs, expected = batches
    with atomic_path(out) as tmp:
        staged = tmp.with_name(tmp.name + writer.suffix)  # exporters and runtimes look at the suffix
        try:
            writer.export(module, example, staged, metadata)
            difference = _relative_difference(writer.run(staged, inputs), expected)
            if not np.isfinite(difference) or difference > tolerance:
                raise BctoolError(
                    f"the exported {fmt} model differs from bctool extract by {difference:.3g} (relative to "
                    f"the embedding norm) on {len(inputs)} images, above the tolerance {tolerance:g}; nothing was "
                    "written. Try the other --format, or report it with the checkpoint's arch"
                )
            os.replace(staged, tmp)
        finally:
            staged.unlink(missing_ok=True)
    return difference


def _output_spec(checkpoint: Checkpoint, adapter: Any) -> dict[str, Any]:
    """The exported model's output: raw embeddings, or normalised rows in the adapter's space."""
    if adapter is None:
        return {"name": OUTPUT, "shape": ["batch", checkpoint.config.embedding_dim], "dtype": "float32",
                "values": "raw embeddings: L2-normalise them before searching"}
    return {"name": OUTPUT, "shape": ["batch", adapter.target_dim], "dtype": "float32",
            "values": "L2-normalised embeddings in the adapter's target space", "adapter": adapter.describe()}
