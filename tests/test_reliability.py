"""Reliability: runs killed or stopped at any moment lose nothing, and resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_train
from safetensors.torch import load_file

from bctool.train.state import state_path

TRAIN = tiny_train(epochs=6, batch_size=8, augment="none")


def _bctool(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "bctool", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_state(path: Path, proc: subprocess.Popen, min_step: int, timeout: float = 120) -> None:
    """Wait until the training state at ``path`` records at least ``min_step`` steps."""
    from safetensors import safe_open

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with safe_open(str(path), framework="pt") as fh:
                if json.loads(fh.metadata()["progress"])["step"] >= min_step:
                    return
        except Exception:  # noqa: BLE001 - not there yet (it is renamed into place atomically)
            pass
        time.sleep(0.05)
    raise AssertionError(f"no training state with {min_step} steps at {path}")


def _same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_same_model(emoji_dir: Path, tmp_path: Path) -> None:
    data = str(emoji_dir / "new_train.txt")
    straight = tmp_path / "straight.safetensors"
    proc = _bctool("train", data, "--out", str(straight), *TRAIN)
    assert proc.wait(timeout=300) == 0, proc.communicate()

    out = tmp_path / "killed.safetensors"
    proc = _bctool("train", data, "--out", str(out), *TRAIN, "--save-every", "2")
    _wait_for_state(state_path(out), proc, min_step=8)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not out.exists() and state_path(out).exists()
    proc = _bctool("train", data, "--out", str(out), *TRAIN, "--save-every", "2", "--resume")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["epochs"] == 6 and summary["resumed_from_epoch"] >= 1
    assert not state_path(out).exists()
    _same_weights(straight, out)


@pytest.mark.slow
def test_sigterm_saves_and_exits_143(emoji_dir: Path, tmp_path: Path) -> None:
    data = str(emoji_dir / "new_train.txt")
    out = tmp_path / "m.safetensors"
    proc = _bctool("train", data, "--out", str(out), *TRAIN, "--save-every", "1")
    _wait_for_state(state_path(out), proc, min_step=3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM: stopped after step" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert stdout == "" and not out.exists()
    proc = _bctool("train", data, "--out", str(out), *TRAIN, "--resume")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["epochs"] == 6 and out.exists()


def _list_with_broken_images(emoji_dir: Path, tmp_path: Path, whole_class: bool = False) -> tuple[Path, list[str]]:
    """new_train.txt with its first image truncated, its second a zero-byte file, and (if
    ``whole_class``) every image of one class missing."""
    lines = (emoji_dir / "new_train.txt").read_text().splitlines()
    (tmp_path / "images").symlink_to(emoji_dir / "images")
    truncated = (emoji_dir / lines[0].split("\t")[0]).read_bytes()[:40]
    (tmp_path / "truncated.png").write_bytes(truncated)
    (tmp_path / "empty.png").write_bytes(b"")
    lines[0] = f"truncated.png\t{lines[0].split(chr(9))[1]}"
    lines[1] = f"empty.png\t{lines[1].split(chr(9))[1]}"
    bad = ["truncated", "empty"]
    if whole_class:
        label = lines[5].split("\t")[1]
        for i, line in enumerate(lines):
            if line.split("\t")[1] == label and i > 1:
                lines[i] = f"gone-{i}.png\t{label}"
                bad.append(f"gone-{i}")
    data = tmp_path / "list.txt"
    data.write_text("\n".join(lines) + "\n")
    return data, bad


def test_training_leaves_unreadable_images_out_or_stops_with_strict(emoji_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bctool.cli import app

    data, bad = _list_with_broken_images(emoji_dir, tmp_path, whole_class=True)
    out = tmp_path / "m.safetensors"
    args = ["train", str(data), "--out", str(out), "--arch", "small", "--image-size", "32", "--epochs", "1",
            "--batch-size", "8", "--workers", "0", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["skipped_images"] == len(bad)
    said = " ".join(result.stderr.split())
    assert said.count(f"{len(bad)} unreadable images are left out of training") == 1  # said once
    report = (tmp_path / "m.safetensors.failed.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in report[1:]] == bad
    # A class left without images: compatible training (old statistics per class) still runs.
    compat = [*args[:3], str(tmp_path / "n.safetensors"), *args[4:], "--old-model", str(out), "-q"]
    result = CliRunner().invoke(app, compat)
    assert result.exit_code == 0, result.stderr
    assert all(math.isfinite(v) for v in json.loads(result.stdout)["final"].values())

    result = CliRunner().invoke(app, [*args, "--strict"])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("Error: image ") and ("cannot be decoded" in result.stderr or "does not exist" in result.stderr)


@pytest.mark.slow
def test_same_seed_and_data_give_the_same_checkpoint_bytes(emoji_dir: Path, tmp_path: Path) -> None:
    """Two processes, one command: identical files; the metadata names seed, versions, command."""
    from bctool.checkpoint import read_checkpoint_metadata

    args = ["train", str(emoji_dir / "old_train.txt"), *TRAIN[:5], "2", *TRAIN[6:], "--workers", "1", "--augment", "crop"]
    outputs = []
    out = tmp_path / "m.safetensors"  # the same command line twice (it is in the metadata)
    for name in ("a", "b"):
        proc = _bctool(*args, "--out", str(out))
        assert proc.wait(timeout=300) == 0, proc.communicate()
        outputs.append(out.rename(tmp_path / f"{name}.safetensors"))
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    meta = read_checkpoint_metadata(outputs[0])
    assert json.loads(meta["train"])["seed"] == 0
    env = json.loads(meta["environment"])
    assert env["torch"] == torch.__version__ and {"python", "numpy", "safetensors", "bctool"} <= set(env)
    assert meta["command"].startswith("__main__.py train ") or meta["command"].startswith("bctool train ")
    assert "--augment crop" in meta["command"]


@pytest.mark.slow
def test_sigterm_stops_extraction_which_resumes(emoji_dir: Path, tmp_path: Path) -> None:
    """Extraction saves its rows on SIGTERM (exit 143) and --resume finishes the same file."""
    from bctool.checkpoint import save_checkpoint
    from bctool.data.transforms import Preprocess
    from bctool.models import ModelConfig, create_model

    torch.manual_seed(0)
    model = tmp_path / "m.safetensors"
    # A model slow enough (about 0.1 s an image on 2 cores) that the signal lands mid-run.
    save_checkpoint(model, create_model(ModelConfig(arch="resnet50", embedding_dim=8, num_classes=2)),
                    Preprocess(128), ["a", "b"])
    # The first 24 images (of 56): the signal lands after the first few.
    lines = (emoji_dir / "new_train.txt").read_text().splitlines()[:24]
    subset = tmp_path / "subset.txt"
    subset.write_text("".join(f"{emoji_dir / line}\n" for line in lines))
    args = ["extract", str(subset), "-m", str(model), "--batch-size", "1", "--workers", "0"]
    straight = tmp_path / "straight.safetensors"
    assert _bctool(*args, "-o", str(straight)).wait(timeout=300) == 0
    out = tmp_path / "e.safetensors"
    proc = _bctool(*args, "-o", str(out))
    progress = tmp_path / "e.safetensors.partial.json"  # written as the first batch starts
    deadline = time.monotonic() + 120
    while not progress.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM: stopped after" in stderr and "--resume" in stderr and stdout == "" and not out.exists()
    proc = _bctool(*args, "-o", str(out), "--resume")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["resumed_from_row"] > 0
    assert out.read_bytes() == straight.read_bytes()


@pytest.mark.slow
def test_a_run_killed_with_live_loader_workers_resumes_at_once(emoji_dir: Path, tmp_path: Path) -> None:
    """A scheduler requeueing a preempted job: the main process is SIGKILLed while its data
    loader workers live on for a few seconds; the same command with --resume, started at
    once, takes the output (the lock belongs to the killed process alone) and finishes."""
    data = str(emoji_dir / "new_train.txt")
    out = tmp_path / "m.safetensors"
    workers = [*TRAIN, "--workers", "2"]  # the last --workers wins
    proc = _bctool("train", data, "--out", str(out), *workers, "--save-every", "1")
    _wait_for_state(state_path(out), proc, min_step=3)
    proc.send_signal(signal.SIGKILL)  # the main process only, as the kernel's OOM killer or a node loss would
    proc.wait(timeout=60)
    resumed = _bctool("train", data, "--out", str(out), *workers, "--save-every", "1", "--resume")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert json.loads(stdout)["resumed_from_epoch"] >= 0 and out.exists()
