"""bctool verify: a model re-embeds a sample of a stored file's images and each row is compared
with its stored row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from bctool.cli import app
from tests.helpers import tiny_checkpoint

runner = CliRunner()


def _stored(emoji_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    model = tiny_checkpoint(tmp_path / "m.safetensors", embedding_dim=16)
    stored = tmp_path / "stored.safetensors"
    result = runner.invoke(app, ["extract", str(emoji_dir / "query.txt"), "-m", str(model), "--out", str(stored),
                                 "--workers", "0", "-q"])
    assert result.exit_code == 0, result.stderr
    return model, stored


def test_the_model_behind_a_file_reproduces_it(emoji_dir: Path, tmp_path: Path) -> None:
    model, stored = _stored(emoji_dir, tmp_path)
    result = runner.invoke(app, ["verify", str(stored), "-m", str(model), "--sample", "5", "--workers", "0", "-q"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["checked"] == 5 and report["min"] > 0.9999
    assert report["model"]["sha256"] == report["stored_model"]["sha256"]


def test_another_model_is_caught_with_the_worst_rows_named(emoji_dir: Path, tmp_path: Path) -> None:
    _, stored = _stored(emoji_dir, tmp_path)
    other = tiny_checkpoint(tmp_path / "other.safetensors", embedding_dim=16, seed=1)
    result = runner.invoke(app, ["verify", str(stored), "-m", str(other), "--workers", "0", "-q"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert not report["passed"] and report["below_threshold"] == report["checked"] == report["rows"]
    assert report["worst"][0]["cosine"] == report["min"] < 0.99


def test_images_are_found_by_a_list_when_the_root_moved_and_an_ambiguous_id_is_refused(emoji_dir: Path,
                                                                                      tmp_path: Path) -> None:
    model, stored = _stored(emoji_dir, tmp_path)
    moved = tmp_path / "moved"
    shutil.copytree(emoji_dir, moved)
    with_list = runner.invoke(app, ["verify", str(stored), "-m", str(model), "--data", str(moved / "query.txt"),
                                    "--sample", "3", "--workers", "0", "-q"])
    assert with_list.exit_code == 0, with_list.stderr
    assert json.loads(with_list.stdout)["images"] == str(moved)
    first = next(p for p in sorted((emoji_dir).rglob("*.png")) if "google" in str(p))
    twin = first.with_suffix(".jpg")
    shutil.copy(first, twin)
    try:
        ambiguous = runner.invoke(app, ["verify", str(stored), "-m", str(model), "--workers", "0", "-q"])
    finally:
        twin.unlink()
    assert ambiguous.exit_code == 1 and "matches 2 files" in ambiguous.stderr and "--data" in ambiguous.stderr
