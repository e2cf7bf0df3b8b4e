"""Small images: ``--arch auto`` picks the small CNN below 64 px, and it beats raw pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bctool.checkpoint import load_checkpoint
from bctool.data.emoji import EmojiSplit, write_emoji_dataset
from bctool.data.images import load_rgb
from bctool.data.sources import load_image_set
from bctool.data.transforms import EvalTransform, Preprocess
from bctool.evaluate import evaluate_retrieval
from bctool.extract import extract, pixel_embeddings
from bctool.train import TrainConfig, train
from bctool.train.defaults import default_arch, resolve_defaults


def test_auto_arch_is_small_below_64_px_and_resnet18_from_64() -> None:
    assert [default_arch(size) for size in (16, 32, 63, 64, 224)] == ["small"] * 3 + ["resnet18"] * 2
    def arch(config: TrainConfig) -> str:
        return resolve_defaults(config).config.model.arch

    assert arch(TrainConfig.from_options(image_size=32)) == "small" and arch(TrainConfig()) == "resnet18"
    assert arch(TrainConfig.from_options(image_size=32, arch="resnet50")) == "resnet50"  # an explicit choice stays


def test_pixel_embeddings_are_the_flattened_eval_transform(emoji_dir: Path) -> None:
    images = load_image_set(emoji_dir / "query.txt")
    pre = Preprocess(image_size=16)
    emb = pixel_embeddings(images, pre, batch_size=5)
    assert emb.embeddings.shape == (len(images), 3 * 16 * 16) and emb.ids == images.ids
    first = EvalTransform(pre)(load_rgb(images.records[3].path)).flatten().numpy()
    np.testing.assert_array_equal(emb.embeddings[3], first)


@pytest.fixture(scope="module")
def emoji300(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("emoji300")
    write_emoji_dataset(out, EmojiSplit(seed=0, limit=300))  # 210 training classes, 90 held out
    return out


@pytest.mark.slow
def test_the_small_image_default_beats_raw_pixels_on_the_emoji_set(emoji300: Path, tmp_path: Path) -> None:
    query, gallery = load_image_set(emoji300 / "query.txt"), load_image_set(emoji300 / "gallery.txt")
    pre = Preprocess(image_size=32)
    pixels = evaluate_retrieval(pixel_embeddings(query, pre), pixel_embeddings(gallery, pre))["map"]
    config = TrainConfig.from_options(image_size=32, epochs=12, batch_size=64, workers=0, device="cpu")
    assert resolve_defaults(config).config.model.arch == "small"
    train(load_image_set(emoji300 / "new_train.txt"), config, tmp_path / "m.safetensors")
    model = load_checkpoint(tmp_path / "m.safetensors")
    learned = evaluate_retrieval(extract(query, model, workers=0), extract(gallery, model, workers=0))["map"]
    assert learned > pixels + 0.02, (learned, pixels)
