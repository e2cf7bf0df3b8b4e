"""The training configuration: built once from CLI options, written into the checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from bctool.errors import ConfigError
from bctool.models import ModelConfig


AMP_MODES = ("off", "bf16", "fp16")
# Below this image side, ``arch="auto"`` picks the small CNN: a ResNet's ImageNet stem and four
# stride-2 stages leave a 1x1 map at 32 px; there the small CNN retrieves better (emoji set,
# 32 px: small 61.3 mAP, resnet18 54.5, raw pixels 44.9; examples/small_images.py).
SMALL_IMAGE_SIDE = 64


def default_arch(image_size: int) -> str:
    """The backbone ``--arch auto`` means: ``small`` below 64 px, ``resnet18`` from 64 px on."""
    return "small" if image_size < SMALL_IMAGE_SIDE else "resnet18"


@dataclass(frozen=True)
class TrainConfig:
    """How to train one model. Defaults follow the AdvBCT paper where it states them."""

    arch: str = "auto"  # resolved from image_size by default_arch
    embedding_dim: int = 256
    head: str = "linear"
    head_scale: float = 30.0
    head_margin: float = 0.3
    epochs: int = 30
    batch_size: int = 128
    lr: float | None = 0.1  # None: the recipe's (0.1 from scratch, less for a warm start)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    image_size: int = 224
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    pretrained: str | None = None
    init_from: str | None = None  # old bctool checkpoint to warm-start from, or "auto" (the recipe)
    method: str = "independent"
    old_embeddings: str | None = None
    old_model: str | None = None
    old_classes: str | None = None
    method_params: dict[str, Any] = field(default_factory=dict)  # over the method's defaults; resolved
    compat_weight: float = 1.0
    amp: str = "off"
    sync_bn: bool = False
    save_every: int = 0  # steps between mid-epoch saves of the training state (0: epochs only)
    strict: bool = False  # an unreadable image stops training (default: left out, reported)
    log_dir: str | None = None  # where steps.jsonl and epochs.jsonl go (bctool plot draws them)
    diagnostics: bool = False  # also log gradient norms per loss part and the method's facts
    resume: bool = False

    def __post_init__(self) -> None:
        if self.arch == "auto":  # frozen: the resolved name is what the checkpoint records
            object.__setattr__(self, "arch", default_arch(self.image_size))
        rules = {
            "epochs": (self.epochs >= 1, "at least 1"),
            "batch_size": (self.batch_size >= 2, "at least 2 (BatchNorm needs two samples)"),
            "lr": (self.lr is None or self.lr > 0, "positive"),
            "image_size": (self.image_size >= 8, "at least 8"),
            "workers": (self.workers >= 0, "0 or more"),
            "warmup_epochs": (self.warmup_epochs >= 0, "0 or more"),
            "weight_decay": (self.weight_decay >= 0, "0 or more"),
            "compat_weight": (self.compat_weight >= 0, "0 or more"),
            "save_every": (self.save_every >= 0, "0 (epochs only) or more"),
        }
        for name, (ok, rule) in rules.items():
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)!r} must be {rule}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"--amp {self.amp!r} is unknown; choose one of {list(AMP_MODES)}")
        from bctool.train.methods import resolve_params

        # Every parameter of the method, defaults filled in: what the checkpoint records.
        object.__setattr__(self, "method_params", asdict(resolve_params(self.method, self.method_params)))
        if self.init_from not in (None, "auto") and self.pretrained:
            raise ConfigError(
                "pass only one of --init-from (a bctool checkpoint: backbone, neck and head rows) "
                "and --pretrained (backbone weights only)"
            )
        if self.old_embeddings and self.old_model:
            raise ConfigError("pass only one of --old-embeddings and --old-model")
        if self.compatible and not (self.old_embeddings or self.old_model):
            raise ConfigError(
                f"method {self.method!r} trains against an old model: pass --old-embeddings "
                "OLD_EMB.safetensors (from `bctool extract` with the old model over the training "
                "list) or --old-model OLD.safetensors"
            )

    def model_config(self, num_classes: int) -> ModelConfig:
        """The model structure this config trains, for ``num_classes`` classes."""
        return ModelConfig(
            arch=self.arch,
            embedding_dim=self.embedding_dim,
            num_classes=num_classes,
            head=self.head,
            head_scale=self.head_scale,
            head_margin=self.head_margin,
        )

    @property
    def compatible(self) -> bool:
        """True when the run trains against an old side."""
        from bctool.train.methods import method_class

        return method_class(self.method).needs_old_side

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)
