"""Load pretrained backbone weights from a file: safetensors, or a torch state dict (``.pth``)
read weights-only.

A file loads into any backbone whose state-dict keys and shapes it fits, strictly. A backbone
declares the classifier its published weights carry as ``classifier_keys`` (default ``fc.weight``
and ``fc.bias``, the ResNets'; ``_fc.weight`` and ``_fc.bias`` for EfficientNet-Lite): those keys
are dropped, as are wrapper prefixes and a BatchNorm step counter the backbone lacks.

ResNets: torchvision's ``torchvision/models/resnet.py`` and timm's ``timm/models/resnet.py`` share one
key layout for the plain 7x7-stem ResNets (``conv1``, ``bn1``, ``layerI.J.convK``/``bnK``,
``layerI.0.downsample.0``/``.1``, head ``fc``); timm's activation and pooling modules carry no
tensors. timm's ``save_for_hf`` writes ``model.state_dict()`` unprefixed, so hub files need no
renaming; wrapper prefixes only come from training code (DataParallel, Lightning, compile).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection, Iterable
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from bctool.errors import ModelError
from bctool.models.efficientnet import VARIANTS, guess_efficientnet_arch
from bctool.models.resnet import ARCHS, BasicBlock, Bottleneck
from bctool.models.small import SmallCNN

logger = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "_orig_mod.")
CLASSIFIER_KEYS = ("fc.weight", "fc.bias")
SOURCE = "timm/torchvision"
MAX_LISTED = 5

# Depths of ResNets we cannot build, so a mismatch message can still name what a file holds.
_OTHER_ARCHS = {
    (Bottleneck, (3, 4, 23, 3)): "resnet101",
    (Bottleneck, (3, 8, 36, 3)): "resnet152",
}


def load_backbone_weights(
    backbone: torch.nn.Module, path: str | os.PathLike[str], leave_out: Collection[str] = ()
) -> dict[str, Any]:
    """Load a weights file (safetensors, or a ``.pth`` state dict) into ``backbone`` strictly.

    Wrapper prefixes and the backbone's ``classifier_keys`` are dropped, and the keys in
    ``leave_out`` (after the prefixes are stripped: a projection head read from the same file;
    an entry ending in ``.`` leaves out every key it begins);
    a missing ``num_batches_tracked`` keeps the backbone's own. Any other missing, unexpected or
    mis-shaped key raises ``ModelError``. Returns ``{"loaded": int, "dropped": [keys],
    "source": the key layout}`` (``"timm/torchvision"`` for the ResNets).
    """
    keys, prefixes = set(leave_out), tuple(k for k in leave_out if k.endswith("."))

    def kept(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if k not in keys and not k.startswith(prefixes)}

    # Left out by their names in the file, and again once a shared wrapper prefix is stripped (a
    # ``backbone.`` that only the backbone's keys carry is a wrapper prefix once the rest is out).
    state = kept(strip_wrapper_prefixes(kept(read_weights_file(path))))
    expected = backbone.state_dict()
    classifier = tuple(getattr(backbone, "classifier_keys", CLASSIFIER_KEYS))
    dropped = [k for k in classifier if k in state and k not in expected]
    # The BN step counter only matters for momentum=None BN; files often omit or add it.
    dropped += [k for k in state if k.endswith("num_batches_tracked") and k not in expected]
    for key in dropped:
        del state[key]

    problems = _mismatches(expected, state)
    if problems:
        raise ModelError(_mismatch_message(path, problems, backbone, state))

    full = {k: state.get(k, v) for k, v in expected.items()}
    backbone.load_state_dict(full, strict=True)
    logger.info("loaded %d tensors from %s (dropped %s)", len(state), os.fspath(path), dropped)
    return {"loaded": len(state), "dropped": dropped, "source": _layout(backbone)}


def read_weights_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of a torch state dict (``torch.save``) loaded with
    ``weights_only=True`` (a dict of tensors, or one under ``state_dict`` or ``model``)."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ModelError(
            f"weights file {name!r} does not exist; pass the path of a .safetensors file or a .pth state dict"
        )
    with open(name, "rb") as fh:
        torch_zip = fh.read(4) == b"PK\x03\x04"  # torch.save's format; safetensors starts with a length
    if not torch_zip:
        try:
            return load_file(name, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            safetensors_error = str(exc)
    else:
        safetensors_error = "a zip archive"
    try:
        loaded = torch.load(name, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"weights file {name!r} is not a safetensors file ({safetensors_error}) nor a torch state dict that "
            f"loads with weights_only=True ({first}); save the weights with "
            "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')"
        ) from exc
    return _state_dict_of(loaded, name)


def _state_dict_of(loaded: object, name: str) -> dict[str, torch.Tensor]:
    """The dict of tensors a ``.pth`` file holds, directly or under ``state_dict`` or ``model``."""
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if isinstance(loaded, dict) and loaded and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in loaded.items()):
        return dict(loaded)
    raise ModelError(
        f"weights file {name!r} holds a {type(loaded).__name__}, not a state dict of named tensors; save "
        "model.state_dict() (torch.save, or safetensors.torch.save_file)"
    )


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the wrapper prefix every key shares (``module.``, ``model.``...)."""
    # Strip only a prefix that every key shares, so no key of the model itself gets renamed;
    # loop because wrappers nest (``module.model.``).
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _mismatches(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> list[str]:
    problems = []
    for key, want in expected.items():
        if key not in found:
            if not key.endswith("num_batches_tracked"):
                problems.append(f"{key} (expected {_shape(want)}, found: missing)")
        elif found[key].shape != want.shape:
            problems.append(f"{key} (expected {_shape(want)}, found {_shape(found[key])})")
    problems += [
        f"{key} (expected: not in model, found {_shape(t)})"
        for key, t in found.items()
        if key not in expected
    ]
    return problems


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _mismatch_message(
    path: str | os.PathLike[str],
    problems: list[str],
    backbone: torch.nn.Module,
    file_state: dict[str, torch.Tensor],
) -> str:
    listed = "; ".join(problems[:MAX_LISTED])
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    model_arch = guess_arch(backbone.state_dict()) or _display_name(backbone)
    file_arch = guess_arch(file_state)
    if file_arch in (*ARCHS, *VARIANTS) and file_arch != model_arch:
        fix = f"pass weights of a {model_arch}, or choose --arch {file_arch}"
    elif file_arch is not None and file_arch != model_arch:
        fix = (
            f"the file holds a {file_arch}, which bctool does not build; "
            f"pass weights of a {model_arch}"
        )
    else:
        fix = f"pass weights of a {model_arch} with {_layout(backbone)} key names"
    return (
        f"weights file {os.fspath(path)!r} does not fit the {model_arch} backbone: "
        f"{len(problems)} mismatched keys: {listed}{more}. Fix: {fix}"
    )


def _display_name(backbone: torch.nn.Module) -> str:
    if isinstance(backbone, SmallCNN):
        return "SmallCNN (--arch small)"
    return type(backbone).__name__


def _layout(backbone: torch.nn.Module) -> str:
    """The key layout of the weights a backbone takes, for reports and messages."""
    return str(getattr(backbone, "weights_layout", SOURCE))


def guess_arch(state: dict[str, torch.Tensor]) -> str | None:
    """The backbone (``resnet18``, ``efficientnet_lite0``...) whose state dict this is, or None."""
    if isinstance(next(iter(state.values()), None), torch.Tensor):
        efficientnet = guess_efficientnet_arch({k: tuple(v.shape) for k, v in state.items()})
        if efficientnet is not None:
            return efficientnet
    return guess_resnet_arch(state.keys())


def guess_resnet_arch(keys: Iterable[str]) -> str | None:
    """Name the ResNet (``resnet18``...) whose state-dict keys these are, or None if none fits."""
    blocks: dict[int, set[int]] = {1: set(), 2: set(), 3: set(), 4: set()}
    bottleneck = False
    for key in keys:
        m = re.match(r"layer([1-4])\.(\d+)\.", key)
        if m:
            blocks[int(m.group(1))].add(int(m.group(2)))
            bottleneck = bottleneck or key.startswith(f"{m.group(0)}conv3.")
    depths = tuple(len(blocks[i]) for i in range(1, 5))
    block = Bottleneck if bottleneck else BasicBlock
    for name, (arch_block, arch_depths) in ARCHS.items():
        if (arch_block, arch_depths) == (block, depths):
            return name
    return _OTHER_ARCHS.get((block, depths))
