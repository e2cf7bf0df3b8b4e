"""What many test files share: tiny training options, a checkpoint built in a second, the slow
average-precision reference, and a CLI call that must succeed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from typer.testing import CliRunner


def tiny_train(epochs: int = 2, image_size: int = 32, batch_size: int = 16, embedding_dim: int | None = None,
               arch: str | None = "small", **extra: str) -> list[str]:
    """`bctool train` options for a run of seconds on the CPU (``extra``: more options by name,
    ``augment="none"`` -> ``--augment none``)."""
    args = [*(["--arch", arch] if arch else []), "--image-size", str(image_size), "--epochs", str(epochs),
            "--batch-size", str(batch_size), "--workers", "0", "--device", "cpu", "-q"]
    if embedding_dim is not None:
        args += ["--embedding-dim", str(embedding_dim)]
    for name, value in extra.items():
        args += [f"--{name.replace('_', '-')}", value]
    return args


def tiny_checkpoint(path: Path, embedding_dim: int = 8, classes: Sequence[str] = ("a", "b", "c"), seed: int = 0) -> Path:
    """A `small` checkpoint of random weights at 32 px, written to ``path``."""
    from bctool.checkpoint import save_checkpoint
    from bctool.data.transforms import Preprocess
    from bctool.models import ModelConfig, create_model

    torch.manual_seed(seed)
    model = create_model(ModelConfig(arch="small", embedding_dim=embedding_dim, num_classes=len(classes))).eval()
    save_checkpoint(path, model, Preprocess(image_size=32), list(classes))
    return path


def ref_ap(relevant: Sequence[bool], n_pos: int, k: int | None = None) -> float:
    """Slow average precision (or AP@k, GLDv2's: divided by min(n_pos, k)) of one ranked list:
    the mean over the positives of the precision at each relevant rank; NaN without positives."""
    if n_pos == 0:
        return math.nan
    ranked = list(relevant) if k is None else list(relevant)[:k]
    hits, total = 0, 0.0
    for rank, is_relevant in enumerate(ranked):
        if is_relevant:
            hits += 1
            total += hits / (rank + 1)
    return total / (n_pos if k is None else min(n_pos, k))


def invoke_ok(args: Sequence[str]) -> str:
    """Run `bctool ARGS` in this process; fail the test with stderr unless it exits 0; return stdout."""
    from bctool.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (list(args), result.stdout, result.stderr)
    return result.stdout


def docs_page(page: str) -> str:
    """The text of a page of the documentation site (``guides/training.md``): tests that hold a
    page to the code read it here."""
    return (Path(__file__).parents[1] / "docs" / page).read_text(encoding="utf-8")
