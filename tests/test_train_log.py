"""Training curves: --log-dir records, resumed logs without repeated steps, bctool plot."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bctool.cli import app
from bctool.data import load_image_set
from bctool.utils.interrupt import Interrupted
from bctool.utils.plotting import _moving_mean
from bctool.train import TrainConfig, train
from bctool.train.log import read_records

runner = CliRunner()


def _config(log_dir: Path, **kw: object) -> TrainConfig:
    return TrainConfig.from_options(arch="small", image_size=32, epochs=3, batch_size=16, workers=0, device="cpu",
                       log_dir=str(log_dir), **kw)


def test_log_records_every_step_and_epoch(emoji_dir: Path, tmp_path: Path) -> None:
    result = train(load_image_set(emoji_dir / "new_train.txt"), _config(tmp_path / "log"), tmp_path / "m.safetensors")
    steps, epochs = read_records(tmp_path / "log" / "steps.jsonl"), read_records(tmp_path / "log" / "epochs.jsonl")
    assert [s["step"] for s in steps] == list(range(1, result.steps + 1))
    assert [s["epoch"] for s in steps] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert {"lr", "cls", "loss"} <= set(steps[0])
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and [e["step"] for e in epochs] == [3, 6, 9]
    for epoch, logged in zip(result.history, epochs):
        assert logged["loss"] == pytest.approx(epoch["loss"])
        mean = sum(s["loss"] for s in steps if s["epoch"] == logged["epoch"]) / 3
        assert logged["loss"] == pytest.approx(mean, rel=1e-5)


def test_resumed_log_holds_each_step_once_and_matches_a_straight_run(
    emoji_dir: Path, tmp_path: Path, sigterm_at_step: Callable[[int], AbstractContextManager[None]],
) -> None:
    images = load_image_set(emoji_dir / "new_train.txt")
    train(images, _config(tmp_path / "straight"), tmp_path / "a.safetensors")
    with sigterm_at_step(5), pytest.raises(Interrupted):
        train(images, _config(tmp_path / "log", save_every=2), tmp_path / "b.safetensors")
    # The signal lets step 5 finish; it is logged and saved, and the resumed run goes on from 6.
    train(images, _config(tmp_path / "log", resume=True), tmp_path / "b.safetensors")
    straight = read_records(tmp_path / "straight" / "steps.jsonl")
    resumed = read_records(tmp_path / "log" / "steps.jsonl")
    assert [s["step"] for s in resumed] == [s["step"] for s in straight]
    for a, b in zip(straight, resumed):
        assert a == pytest.approx(b, rel=1e-6)


def test_resume_drops_logged_steps_past_the_saved_state(emoji_dir: Path, tmp_path: Path) -> None:
    """Killed right after logging step 5, with the state saved at step 4: the resumed run
    drops the logged step 5 and logs it again, once."""
    from bctool.train.log import TrainLog

    images = load_image_set(emoji_dir / "new_train.txt")
    log = tmp_path / "log"
    real_step = TrainLog.step

    def killed_after_step_5(self: TrainLog, record: dict) -> None:
        real_step(self, record)
        if record["step"] == 5:
            raise KeyboardInterrupt  # stands in for SIGKILL: nothing is saved after step 4

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrainLog, "step", killed_after_step_5)
        with pytest.raises(KeyboardInterrupt):
            train(images, _config(log, save_every=2), tmp_path / "m.safetensors")
    assert [s["step"] for s in read_records(log / "steps.jsonl")] == [1, 2, 3, 4, 5]
    train(images, _config(log, save_every=2, resume=True), tmp_path / "m.safetensors")
    assert [s["step"] for s in read_records(log / "steps.jsonl")] == list(range(1, 10))
    assert [e["epoch"] for e in read_records(log / "epochs.jsonl")] == [1, 2, 3]


def test_moving_mean_against_a_loop() -> None:
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    for window in (1, 2, 3, 10):
        expected = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                    for i in range(len(values))]
        assert _moving_mean(values, window).tolist() == pytest.approx(expected)


def test_plot_draws_a_png_or_names_the_missing_log(emoji_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 1 and "holds no training log" in result.stderr and "--log-dir" in result.stderr
    pytest.importorskip("matplotlib")
    train(load_image_set(emoji_dir / "new_train.txt"), _config(tmp_path / "log"), tmp_path / "m.safetensors")
    result = runner.invoke(app, ["plot", str(tmp_path / "log")])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == 9 and summary["epochs"] == 3 and summary["parts"] == ["cls", "loss"]
    assert (tmp_path / "log" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
