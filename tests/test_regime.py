"""Training regimes (bctool, paper), the training views, and the consistency floor."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bctool.checkpoint import load_checkpoint, read_checkpoint_metadata
from bctool.data.sources import load_image_set
from bctool.data.transforms import TRAINING_VIEWS, EvalTransform, Preprocess
from bctool.embeddings import save_embeddings
from bctool.errors import ConfigError
from bctool.extract import extract
from bctool.train import TrainConfig, train
from bctool.train.compat import compute_old_stats
from bctool.train.consistency import consistency_floor, discriminator_accuracy
from bctool.train.log import read_records
from bctool.train.loop import lr_at
from bctool.train.regime import REGIMES, regime, step_milestones
from helpers import docs_page


def _config(**options: object) -> TrainConfig:
    return TrainConfig.from_options(**{"arch": "small", "image_size": 16, "epochs": 2, "batch_size": 8, "workers": 0,
                                       "device": "cpu", **options})


def test_paper_regime_steps_the_rate_down_at_epochs_5_10_and_20_of_30() -> None:
    config = _config(regime="paper", epochs=30).with_regime()
    assert (config.optim.schedule, config.optim.warmup_epochs, config.model.head_bias) == ("step", 0.0, False)
    per_epoch = 7
    milestones = tuple(m * per_epoch for m in step_milestones(30))
    rates = [lr_at(e * per_epoch, 30 * per_epoch, 0, 0.1, milestones) for e in range(30)]
    # every epoch boundary: 0.1 for epochs 0-4, 0.01 for 5-9, 0.001 for 10-19, 1e-4 for 20-29
    expected = [0.1] * 5 + [0.01] * 5 + [0.001] * 10 + [0.0001] * 10
    assert rates == pytest.approx(expected, rel=1e-12)
    # and constant inside an epoch (the last step of epoch 4 is still at 0.1)
    assert lr_at(5 * per_epoch - 1, 30 * per_epoch, 0, 0.1, milestones) == pytest.approx(0.1)
    assert step_milestones(10) == (2, 3, 7) and step_milestones(3) == (1, 2) and step_milestones(1) == ()


def test_paper_regime_rates_in_a_real_run_follow_the_scaled_milestones(emoji_dir: Path, tmp_path: Path) -> None:
    images = load_image_set(emoji_dir / "old_train.txt")
    config = _config(regime="paper", epochs=6, log_dir=str(tmp_path / "log"))
    train(images, config, tmp_path / "m.safetensors")
    steps = read_records(tmp_path / "log" / "steps.jsonl")
    first_of_epoch = {s["epoch"]: s["lr"] for s in reversed(steps)}
    # 6 epochs: x0.1 at epochs 1, 2 and 4 (5, 10, 20 of 30 scaled)
    assert [first_of_epoch[e] for e in range(1, 7)] == pytest.approx([0.1, 0.01, 0.001, 0.001, 1e-4, 1e-4])
    assert len({round(s["lr"], 12) for s in steps if s["epoch"] == 1}) == 1  # no warm-up
    meta = read_checkpoint_metadata(tmp_path / "m.safetensors")
    record = json.loads(meta["train"])
    assert (record["regime"], record["augment"], record["schedule"], record["warmup_epochs"], record["head_bias"]) == (
        "paper", "none", "step", 0.0, False)
    model = load_checkpoint(tmp_path / "m.safetensors").model
    assert model.head.fc.bias is None  # the authors' head: Linear(D, classes, bias=False)


def test_paper_training_views_have_no_random_op() -> None:
    """The paper regime's training transform is the extraction transform: the same tensor
    whatever the random state; flip and crop (its controls) do draw."""
    image = Image.frombytes("RGB", (24, 20), bytes(range(256)) * 6 + bytes(range(0, 96)))
    pre = Preprocess(image_size=16)
    view = TRAINING_VIEWS[regime("paper").augment](pre)
    outs = []
    for seed in range(8):
        torch.manual_seed(seed)
        outs.append(view(image))
    assert all(torch.equal(outs[0], o) for o in outs) and torch.equal(outs[0], EvalTransform(pre)(image))
    for name in ("flip", "crop"):
        draws = []
        for seed in range(8):
            torch.manual_seed(seed)
            draws.append(TRAINING_VIEWS[name](pre)(image))
        assert not all(torch.equal(draws[0], d) for d in draws), name


def test_each_part_overrides_its_regime_and_bad_values_name_the_choices() -> None:
    config = _config(regime="paper", augment="crop", schedule="cosine", head_bias=True).with_regime()
    assert (config.optim.augment, config.optim.schedule, config.optim.warmup_epochs, config.model.head_bias) == (
        "crop", "cosine", 0.0, True)
    # bctool's views follow the old side: clean against precomputed (clean) old embeddings
    assert REGIMES["bctool"].augment == "auto"
    assert _config().with_regime().optim.augment == "crop"
    assert _config(method="bct", old_model="old.safetensors").with_regime().optim.augment == "crop"
    assert _config(method="bct", old_embeddings="old.safetensors").with_regime().optim.augment == "none"
    with pytest.raises(ConfigError, match=r"--regime 'fancy' is unknown; choose one of \['bctool', 'paper'\]"):
        _config(regime="fancy")
    with pytest.raises(ConfigError, match=r"--augment 'jitter' must be one of \['none', 'flip', 'crop'\]"):
        _config(augment="jitter")


def test_cli_regime_options_are_choices(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bctool.cli import app

    result = CliRunner().invoke(app, ["train", "x.txt", "--out", str(tmp_path / "m.safetensors"), "--schedule", "linear"])
    assert result.exit_code == 2 and "'linear' is unknown; choose one of ['cosine', 'step']" in result.output


@pytest.fixture(scope="module")
def old_side(emoji_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny old model trained on clean views, and its embeddings of the new training list."""
    folder = tmp_path_factory.mktemp("old")
    train(load_image_set(emoji_dir / "old_train.txt"), _config(epochs=2), folder / "old.safetensors")
    embeddings = folder / "old_emb.safetensors"
    save_embeddings(extract(load_image_set(emoji_dir / "new_train.txt"), load_checkpoint(folder / "old.safetensors")),
                    embeddings)
    return folder / "old.safetensors", embeddings


def test_precomputed_old_embeddings_with_augmented_views_warn_and_are_recorded(
    emoji_dir: Path, old_side: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    images = load_image_set(emoji_dir / "new_train.txt")
    base = dict(method="advbct", old_embeddings=str(old_side[1]), init_from=None, epochs=1)
    with caplog.at_level(logging.WARNING, logger="bctool"):
        train(images, _config(**base), tmp_path / "clean.safetensors")
    assert "other views" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="bctool"):
        train(images, _config(**base, augment="crop"), tmp_path / "crop.safetensors")
    assert "--augment crop with --old-embeddings: the old embeddings were made from clean images" in caplog.text
    views = {name: json.loads(read_checkpoint_metadata(tmp_path / f"{name}.safetensors")["extra"])["old_view"]
             for name in ("clean", "crop")}
    assert views["clean"].startswith("same") and views["crop"].startswith("different")


def test_diagnostics_report_the_consistency_floor(emoji_dir: Path, old_side: tuple[Path, Path], tmp_path: Path) -> None:
    """Clean views against clean old embeddings: the old model is its own perfect match."""
    images = load_image_set(emoji_dir / "new_train.txt")
    result = train(images, _config(method="advbct", old_embeddings=str(old_side[1]), init_from=None, epochs=1,
                                   diagnostics=True), tmp_path / "m.safetensors")
    floor = result.to_dict()["consistency"]
    assert floor["augment"] == "none" and floor["disc_acc"] == 0.5 and floor["outside_r_max"] == 0.0
    assert floor["cosine"] == pytest.approx(1.0, abs=1e-5) and floor["rows"] > 0
    extra = json.loads(read_checkpoint_metadata(tmp_path / "m.safetensors")["extra"])
    assert extra["consistency"] == floor


class _Shapes(Dataset):
    """Seeded images of bright squares on a dark ground; ``views``: a random crop and brightness."""

    def __init__(self, n: int, views: bool) -> None:
        gen = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, 24, 24, generator=gen) * 0.2
        for i in range(n):
            x, y, s = (int(v) for v in torch.randint(0, 12, (3,), generator=gen))
            self.images[i, i % 3, y:y + s + 4, x:x + s + 4] = 1.0
        self.labels = torch.arange(n) % 10
        self.views = views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        x = self.images[i]
        if self.views:
            dx, dy = (int(v) for v in torch.randint(0, 9, (2,)))
            crop = x[:, dy:dy + 16, dx:dx + 16]
            x = nn.functional.interpolate(crop[None], size=24, mode="bilinear", align_corners=False)[0]
            x = x * (0.6 + 0.8 * torch.rand(()))
        return x, int(self.labels[i]), i


class _Old(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                 nn.Linear(256, 32))

    @torch.no_grad()
    def forward(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def test_consistency_floor_is_chance_when_consistent_and_high_when_views_differ() -> None:
    old = _Old().eval()
    clean = _Shapes(600, views=False)
    stored = old(clean.images, torch.arange(600))
    stats = compute_old_stats(stored, clean.labels, 10)
    floors = {}
    for views in (False, True):
        loader = DataLoader(_Shapes(600, views=views), batch_size=100)
        floors[views] = consistency_floor(old, loader, stored, clean.labels, stats, "crop" if views else "none",
                                          torch.device("cpu"))
    consistent, mismatched = floors[False], floors[True]
    # consistent: chance, and no sample outside r_max but the stored side's own IQR outliers
    assert consistent.disc_acc == pytest.approx(0.5, abs=0.02)
    assert consistent.outside_r_max == consistent.outside_r_max_stored < 0.05
    assert mismatched.disc_acc > 0.8 and mismatched.cosine < consistent.cosine
    assert mismatched.outside_r_max > 5 * mismatched.outside_r_max_stored
    assert consistent.outside_r_max_stored == mismatched.outside_r_max_stored  # the stored side is the same


def test_discriminator_accuracy_leaves_the_random_streams_alone() -> None:
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    a = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    discriminator_accuracy(a, a + 1, steps=5)
    assert torch.equal(torch.rand(3), expected)


def test_readme_names_every_regime_and_the_method_table_names_advbcts() -> None:
    """The README's regime table lists every registered regime with its parts, and the method
    table says which regime trains AdvBCT as its authors do."""
    readme = docs_page("guides/training.md")
    table = readme[readme.index("| regime | `--augment` |"):]
    table = table[:table.index("\n\n")]
    for name, chosen in REGIMES.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}`"))
        assert f"`{chosen.augment}`" in row and f"`{chosen.schedule}`" in row, name
        assert f"| {chosen.warmup_epochs:g} |" in row and ("| yes |" if chosen.head_bias else "| no |") in row, name
    methods = readme[readme.index("| method | compatibility term |"):readme.index("A method of your own")]
    advbct = next(line for line in methods.splitlines() if line.startswith("| `advbct` |"))
    assert "`--regime paper`" in advbct
