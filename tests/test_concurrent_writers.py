"""One writer per output: a second process writing the same output is refused at once, and the
first one's file comes out exactly as a lone run's. Real processes throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_train
from typer.testing import CliRunner

from bctool.cli import app
from bctool.utils.io import lock_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = tiny_train(epochs=1, image_size=16, batch_size=8)


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bctool", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bctool", *args], capture_output=True, text=True, env=ENV, timeout=300)


def _frozen_while_holding(proc: subprocess.Popen, out: Path) -> None:
    """Wait until ``proc`` holds the lock of ``out``, then stop it there (SIGSTOP)."""
    deadline = time.monotonic() + 120
    while not _holder_pid(out) == str(proc.pid):  # its pid is written once it holds the record lock
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the first writer never took the lock"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGSTOP)
    # Still holding it (not finished between the check and the stop): the test sees a real overlap.
    assert _holder_pid(out) == str(proc.pid)


def _holder_pid(out: Path) -> str | None:
    """The pid written in ``out``'s lock file, or None when there is none (yet)."""
    try:
        return lock_path(out).read_text().strip() or None
    except OSError:
        return None


@pytest.fixture(scope="module")
def model(emoji_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bctool.data import load_image_set
    from bctool.train import TrainConfig, train

    out = tmp_path_factory.mktemp("model") / "m.safetensors"
    config = TrainConfig.from_options(arch="small", image_size=16, epochs=1, batch_size=8, workers=0, device="cpu")
    train(load_image_set(emoji_dir / "old_train.txt"), config, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("command", ["extract", "train"])
def test_a_second_writer_is_refused_and_the_first_file_is_intact(command: str, emoji_dir: Path, model: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    if command == "extract":
        args = ["extract", str(emoji_dir / "new_train.txt"), "--model", str(model), "--out", str(out), "--batch-size",
                "1", "--workers", "0", "--device", "cpu", "-q"]
    else:  # long enough (a second or two) that the first run is caught holding its lock
        args = ["train", str(emoji_dir / "new_train.txt"), "--out", str(out), *TRAIN[:3], "32", *TRAIN[4:5], "3",
                *TRAIN[6:]]
    alone = _run(*args)
    assert alone.returncode == 0, alone.stderr
    reference = out.read_bytes()
    out.unlink()
    first = _start(*args)
    try:
        _frozen_while_holding(first, out)
        second = _run(*args)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 1
    assert f"is being written by another process (pid {first.pid}" in " ".join(second.stderr.split())
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert out.read_bytes() == reference  # the first run's file, as a lone run writes it
    assert not lock_path(out).exists()


def _holder(out: Path) -> subprocess.Popen:
    """A process holding ``out``'s lock until killed."""
    code = ("import sys, time\nfrom bctool.utils.io import output_lock\nwith output_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_every_command_writing_a_file_refuses_a_held_output(emoji_dir: Path, model: Path, tmp_path: Path,
                                                            training_log: Path) -> None:
    log_dir = training_log
    csv = tmp_path / "index.csv"
    csv.write_text("id\n0123456789abcdef\n")
    out = tmp_path / "held.out"
    from bctool.checkpoint import load_checkpoint
    from bctool.data import load_image_set
    from bctool.embeddings import save_embeddings
    from bctool.extract import extract

    emb = tmp_path / "q.safetensors"
    save_embeddings(extract(load_image_set(emoji_dir / "query.txt"), load_checkpoint(model), workers=0), emb)
    commands = {
        "export": ["export", str(model), "--out", str(out.with_suffix(".onnx"))],
        "merge": ["merge", str(model), "--out", str(out.with_suffix(".safetensors"))],
        "plot": ["plot", str(log_dir), "--out", str(out.with_suffix(".png"))],
        "dataset gldv2": ["dataset", "gldv2", str(csv), "--images", str(tmp_path), "--out", str(out.with_suffix(".txt"))],
        "evaluate --plot": ["evaluate", "--backfill", "0,1", "--query", str(emb), "--old-gallery", str(emb),
                            "--new-gallery", str(emb), "--plot", str(out.with_suffix(".svg"))],
    }
    for name, args in commands.items():
        target = Path(args[args.index("--out" if "--out" in args else "--plot") + 1])
        holder = _holder(target)
        try:
            result = CliRunner().invoke(app, args)
        finally:
            holder.kill()
            holder.wait()
        assert result.exit_code == 1, (name, result.output)
        assert f"is being written by another process (pid {holder.pid}" in " ".join(result.output.split()), name
        assert not target.exists(), name


def test_a_killed_writer_leaves_no_lock_behind(tmp_path: Path) -> None:
    """A record lock is released by the kernel when its holder dies: the next writer gets the output."""
    from bctool.utils.io import output_lock

    out = tmp_path / "x.safetensors"
    holder = _holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_path(out).exists()  # the dead holder could not remove it...
    with output_lock(out):  # ...but its lock went with it
        with output_lock(out):  # and this process may take its own lock again
            pass
    assert not lock_path(out).exists()


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_an_output_that_is_a_fifo_or_device_is_refused(kind: str, emoji_dir: Path, model: Path, tmp_path: Path) -> None:
    out = tmp_path / "special"
    if kind == "fifo":
        os.mkfifo(out)
    else:
        out = Path("/dev/null")
    result = CliRunner().invoke(app, ["extract", str(emoji_dir / "query.txt"), "--model", str(model), "--out", str(out)])
    assert result.exit_code == 1
    assert f"is {'a FIFO' if kind == 'fifo' else 'a device'}, not a file" in " ".join(result.output.split())
    assert (out.is_fifo() if kind == "fifo" else out.is_char_device())
