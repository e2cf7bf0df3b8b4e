"""--trainable: a backbone's stages, the frozen ones left alone, and their outputs computed once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bctool.checkpoint import load_checkpoint
from bctool.data.sources import load_image_set
from bctool.errors import ConfigError
from bctool.models.model import build_backbone
from bctool.models.stages import backbone_stages, frozen_stage_count
from bctool.train import TrainConfig, train
from bctool.utils.interrupt import Interrupted


@pytest.fixture(autouse=True)
def cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own cache folder (frozen outputs are stored there)."""
    monkeypatch.setenv("BCTOOL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize(("arch", "count"), [("small", 4), ("resnet18", 5), ("efficientnet_lite0", 9)])
def test_the_stages_compute_the_backbone_exactly_and_register_nothing(arch: str, count: int) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(arch).eval()
    keys = list(backbone.state_dict())
    stages = backbone_stages(backbone)
    assert len(stages) == count and list(backbone.state_dict()) == keys
    assert {id(p) for s in stages for p in s.parameters()} == {id(p) for p in backbone.parameters()}
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        out = x
        for stage in stages:
            out = stage(out)
        assert torch.equal(out, backbone(x))


def test_trainable_names_the_stages_it_can_train() -> None:
    assert [frozen_stage_count(t, 5) for t in ("all", "neck", "1", "4")] == [0, 5, 4, 1]
    with pytest.raises(ConfigError, match=r"--trainable 5: this backbone has 5 stages, so N must be from 1 to 4"):
        frozen_stage_count("5", 5)
    with pytest.raises(ConfigError, match=r"--trainable 'top'"):
        TrainConfig.from_options(trainable="top")


def _train(emoji_dir: Path, out: Path, **options: object) -> dict:
    defaults = {"arch": "small", "image_size": 32, "epochs": 2, "batch_size": 8, "workers": 0, "device": "cpu",
                "lr": 0.1, "init_from": None, "augment": "none"}
    config = TrainConfig.from_options(**{**defaults, **options})
    return train(load_image_set(emoji_dir / "old_train.txt"), config, out).to_dict()


@pytest.mark.parametrize("trainable", ["neck", "1"])
def test_the_cache_trains_the_same_weights_as_running_the_frozen_stages(emoji_dir: Path, tmp_path: Path,
                                                                        trainable: str) -> None:
    cached = _train(emoji_dir, tmp_path / "cached.safetensors", trainable=trainable)
    direct = _train(emoji_dir, tmp_path / "direct.safetensors", trainable=trainable, frozen_cache=False)
    assert cached["frozen"]["cache"].startswith("yes") and direct["frozen"]["cache"] == "no: --no-frozen-cache"
    a, b = load_file(tmp_path / "cached.safetensors"), load_file(tmp_path / "direct.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert cached["final"] == pytest.approx(direct["final"], rel=1e-5)


def test_frozen_stages_keep_their_weights_and_statistics(emoji_dir: Path, tmp_path: Path) -> None:
    _train(emoji_dir, tmp_path / "all.safetensors", seed=3)
    _train(emoji_dir, tmp_path / "top.safetensors", seed=3, trainable="1")
    torch.manual_seed(3)
    start = build_backbone("small").state_dict()  # the same seeded start as both runs
    top = load_file(tmp_path / "top.safetensors")
    full = load_file(tmp_path / "all.safetensors")
    for key, value in start.items():  # the stem and the first two stages: frozen
        if key.startswith(("stem.", "stages.0.", "stages.1.")) and value.is_floating_point():
            assert torch.equal(top[f"backbone.{key}"], value), key
    assert not torch.equal(top["backbone.stages.2.0.0.weight"], start["stages.2.0.0.weight"])  # the last stage trains
    assert not torch.equal(full["backbone.stem.0.weight"], start["stem.0.weight"])
    assert load_checkpoint(tmp_path / "top.safetensors").extra["frozen"]["frozen_stages"] == 3


def test_augmented_views_run_the_frozen_stages_every_batch(emoji_dir: Path, tmp_path: Path) -> None:
    result = _train(emoji_dir, tmp_path / "crop.safetensors", trainable="neck", augment="crop")
    assert result["frozen"]["cache"] == "no: --augment crop shows other pixels every epoch"


def test_a_cached_run_resumes_to_the_same_weights(emoji_dir: Path, tmp_path: Path, sigterm_at_step) -> None:  # noqa: ANN001
    _train(emoji_dir, tmp_path / "whole.safetensors", trainable="1")
    with sigterm_at_step(3), pytest.raises(Interrupted):  # 2 steps an epoch: in the second
        _train(emoji_dir, tmp_path / "cut.safetensors", trainable="1")
    _train(emoji_dir, tmp_path / "cut.safetensors", trainable="1", resume=True)
    a, b = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "cut.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_second_run_reads_the_frozen_outputs_back(emoji_dir: Path, tmp_path: Path, cache_folder: Path) -> None:
    first = _train(emoji_dir, tmp_path / "a.safetensors", trainable="neck")
    second = _train(emoji_dir, tmp_path / "b.safetensors", trainable="neck")
    assert "computed, stored in" in first["frozen"]["cache"] and "read from" in second["frozen"]["cache"]
    assert len(list((cache_folder / "frozen").iterdir())) == 1
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
    other = _train(emoji_dir, tmp_path / "c.safetensors", trainable="neck", seed=1)  # other frozen weights
    assert "computed" in other["frozen"]["cache"] and len(list((cache_folder / "frozen").iterdir())) == 2


def test_a_model_with_frozen_stages_embeds_through_their_cached_outputs(emoji_dir: Path, tmp_path: Path,
                                                                        cache_folder: Path) -> None:
    from bctool.extract import extract
    from bctool.train.frozen import embed_through_frozen

    _train(emoji_dir, tmp_path / "top.safetensors", trainable="1")
    images = load_image_set(emoji_dir / "query.txt")
    direct = extract(images, load_checkpoint(tmp_path / "top.safetensors"), workers=0)
    cached = embed_through_frozen(load_checkpoint(tmp_path / "top.safetensors"), images)
    again = embed_through_frozen(load_checkpoint(tmp_path / "top.safetensors"), images)  # read back from the cache
    torch.testing.assert_close(torch.from_numpy(cached.embeddings), torch.from_numpy(direct.embeddings),
                               rtol=1e-5, atol=1e-5)
    assert (cached.model, list(cached.ids)) == (direct.model, list(direct.ids))
    assert (again.embeddings == cached.embeddings).all() and len(list((cache_folder / "frozen").iterdir())) == 2
