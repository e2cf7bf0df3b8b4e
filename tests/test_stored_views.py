"""Stored augmented views: `extract --view` embeds seeded views with the old model, and training
with `--old-views` shows the new model those very views against their old embeddings."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bctool.checkpoint import load_checkpoint, read_checkpoint_metadata
from bctool.cli import app
from bctool.data.dataset import StoredViewsDataset, load_record
from bctool.data.sources import load_image_set
from bctool.data.transforms import EvalTransform, Preprocess, StoredView
from bctool.embeddings import load_embeddings, save_embeddings
from bctool.errors import ConfigError, DataError, EmbeddingsError
from bctool.extract import ExtractOptions, extract, extract_to_file
from bctool.train import TrainConfig, train


def _config(**options: object) -> TrainConfig:
    return TrainConfig.from_options(**{"arch": "small", "image_size": 16, "epochs": 1, "batch_size": 8, "workers": 0,
                                       "device": "cpu", "init_from": None, **options})


@pytest.fixture(scope="module")
def old_files(emoji_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny old model, its clean embeddings of the new training list and two stored crop views."""
    folder = tmp_path_factory.mktemp("views")
    train(load_image_set(emoji_dir / "old_train.txt"), _config(epochs=2), folder / "old.safetensors")
    old = load_checkpoint(folder / "old.safetensors")
    images = load_image_set(emoji_dir / "new_train.txt")
    files = {"old": folder / "old.safetensors", "clean": folder / "clean.safetensors"}
    save_embeddings(extract(images, old, workers=0), files["clean"])
    for k in (0, 1):
        files[f"view{k}"] = folder / f"view{k}.safetensors"
        extract_to_file(images, old, files[f"view{k}"],
                        options=ExtractOptions(workers=0, view=StoredView("crop", k, seed=3)))
    return files


def test_a_stored_view_is_the_same_draw_every_time_and_differs_by_index_and_seed(emoji_dir: Path) -> None:
    images = load_image_set(emoji_dir / "new_train.txt")
    pre = Preprocess(image_size=16)
    image = load_record(images.records[0])
    first = StoredView("crop", 0, 7).transform(pre)
    torch.manual_seed(1)  # the global stream plays no part
    a = first(image, images.ids[0])
    torch.manual_seed(2)
    assert torch.equal(a, first(image, images.ids[0]))
    assert not torch.equal(a, StoredView("crop", 1, 7).transform(pre)(image, images.ids[0]))
    assert not torch.equal(a, StoredView("crop", 0, 8).transform(pre)(image, images.ids[0]))
    assert not torch.equal(a, EvalTransform(pre)(image))
    with pytest.raises(DataError, match="view 'none' cannot be stored"):
        StoredView("none")


def test_extract_view_writes_the_old_model_on_each_seeded_view(emoji_dir: Path, old_files: dict[str, Path]) -> None:
    images = load_image_set(emoji_dir / "new_train.txt")
    old = load_checkpoint(old_files["old"])
    view = load_embeddings(old_files["view1"])
    assert view.model["view"] == {"augment": "crop", "index": 1, "seed": 3} and view.ids == images.ids
    transform = StoredView("crop", 1, 3).transform(old.preprocess)
    rows = [0, len(images) - 1]
    batch = torch.stack([transform(load_record(images.records[r]), images.ids[r]) for r in rows])
    with torch.inference_mode():
        expected = old.model.eval().embed(batch).numpy()
    np.testing.assert_allclose(view.embeddings[rows], expected, rtol=1e-4, atol=1e-5)
    clean = load_embeddings(old_files["clean"])
    assert "view" not in clean.model and not np.allclose(clean.embeddings, view.embeddings)


def test_the_loader_draws_the_clean_image_or_a_stored_view_with_its_old_row(emoji_dir: Path) -> None:
    images = load_image_set(emoji_dir / "new_train.txt")
    pre = Preprocess(image_size=16)
    views = [StoredView("crop", k, 3).transform(pre) for k in (0, 1)]
    dataset = StoredViewsDataset(images, EvalTransform(pre), views)
    n, drawn = len(images), set()
    torch.manual_seed(0)
    for _ in range(30):
        x, label, row = dataset[5]
        k = row // n
        assert row % n == 5 and label == images.labels[5]
        image = load_record(images.records[5])
        expected = EvalTransform(pre)(image) if k == 0 else views[k - 1](image, images.ids[5])
        assert torch.equal(x, expected)
        drawn.add(k)
    assert drawn == {0, 1, 2}


def test_training_against_stored_views_is_consistent(emoji_dir: Path, old_files: dict[str, Path],
                                                     tmp_path: Path) -> None:
    """The consistency floor with stored views: the old model's own views are the stored rows."""
    images = load_image_set(emoji_dir / "new_train.txt")
    config = _config(method="lce", old_embeddings=str(old_files["clean"]),
                     old_views=(str(old_files["view0"]), str(old_files["view1"])), diagnostics=True)
    result = train(images, config, tmp_path / "m.safetensors").to_dict()
    floor = result["consistency"]
    assert floor["cosine"] == pytest.approx(1.0, abs=1e-5) and floor["disc_acc"] == pytest.approx(0.5, abs=0.1)
    assert floor["outside_r_max"] <= 0.1 and "2 stored views" in floor["augment"]
    extra = json.loads(read_checkpoint_metadata(tmp_path / "m.safetensors")["extra"])
    assert extra["old_view"].startswith("same: the clean image and 2 stored views")
    config_record = json.loads(read_checkpoint_metadata(tmp_path / "m.safetensors")["train"])
    assert config_record["old_views"] == [str(old_files["view0"]), str(old_files["view1"])]


def test_stored_views_are_refused_where_they_do_not_fit(emoji_dir: Path, old_files: dict[str, Path],
                                                        tmp_path: Path) -> None:
    images = load_image_set(emoji_dir / "new_train.txt")
    clean, view = str(old_files["clean"]), str(old_files["view0"])
    with pytest.raises(ConfigError, match="pass the old model's clean embeddings"):
        _config(method="lce", old_model=str(old_files["old"]), old_views=(view,))
    with pytest.raises(ConfigError, match="--augment crop would be ignored"):
        _config(method="lce", old_embeddings=clean, old_views=(view,), augment="crop").with_regime()
    with pytest.raises(EmbeddingsError, match="holds a stored augmented view"):
        train(images, _config(method="lce", old_embeddings=view), tmp_path / "a.safetensors")
    with pytest.raises(EmbeddingsError, match="holds clean embeddings, not a stored view"):
        train(images, _config(method="lce", old_embeddings=clean, old_views=(clean,)), tmp_path / "b.safetensors")
    with pytest.raises(EmbeddingsError, match="repeats view"):
        train(images, _config(method="lce", old_embeddings=clean, old_views=(view, view)), tmp_path / "c.safetensors")
    other = load_embeddings(old_files["view1"])
    moved = tmp_path / "other_model_view.safetensors"
    save_embeddings(type(other)(other.embeddings, other.labels, other.ids, other.label_names,
                                {**other.model, "sha256": "0" * 64}, root=other.root), moved)
    with pytest.raises(EmbeddingsError, match="extract every file with the same old checkpoint"):
        train(images, _config(method="lce", old_embeddings=clean, old_views=(str(moved),)), tmp_path / "d.safetensors")
    assert not any(tmp_path.glob("[abcd].safetensors"))


def test_cli_view_options(emoji_dir: Path, old_files: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["extract", str(emoji_dir / "new_train.txt"), "--model", str(old_files["old"]), "--workers", "0", "-q"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "v.safetensors"), "--view", "crop", "--view-index", "2"])
    assert result.exit_code == 0, result.output
    assert load_embeddings(tmp_path / "v.safetensors").model["view"] == {"augment": "crop", "index": 2, "seed": 0}
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "w.safetensors"), "--view-index", "2"])
    assert result.exit_code == 2 and "pass --view crop" in result.output
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "w.safetensors"), "--view", "none"])
    assert result.exit_code == 1 and "cannot be stored" in result.output
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "w.safetensors"), "--view", "blur"])
    assert result.exit_code == 2 and "'blur' is unknown" in result.output


def test_a_run_against_stored_views_resumes_to_the_straight_run(
    emoji_dir: Path, old_files: dict[str, Path], tmp_path: Path,
    sigterm_at_step: Callable[[int], AbstractContextManager[None]],
) -> None:
    """The options (a tuple of files) compare equal to the saved state's; the views drawn after the
    resumption are those of the straight run."""
    from bctool.utils.interrupt import Interrupted

    images = load_image_set(emoji_dir / "new_train.txt")
    options = dict(method="lce", old_embeddings=str(old_files["clean"]), old_views=(str(old_files["view0"]),),
                   epochs=2)
    train(images, _config(**options), tmp_path / "a.safetensors")
    with sigterm_at_step(3), pytest.raises(Interrupted):
        train(images, _config(**options, save_every=1), tmp_path / "b.safetensors")
    train(images, _config(**options, resume=True), tmp_path / "b.safetensors")
    a, b = load_checkpoint(tmp_path / "a.safetensors").model, load_checkpoint(tmp_path / "b.safetensors").model
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-5), name
