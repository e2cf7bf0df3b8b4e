"""No command overwrites one of its inputs: an --out (or --plot) that is an input, by path,
through a symbolic link or as a hard link, is refused before any work, naming both."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bctool.cli import app
from helpers import tiny_checkpoint, tiny_train

runner = CliRunner()


@pytest.fixture(scope="module")
def files(emoji_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every kind of input a command reads: list files, a checkpoint, embeddings, a log folder."""
    work = tmp_path_factory.mktemp("inputs")
    model = tiny_checkpoint(work / "model.safetensors")
    emb = work / "emb.safetensors"
    result = runner.invoke(app, ["extract", str(emoji_dir / "new_train.txt"), "-m", str(model), "-o", str(emb),
                                 "--workers", "0", "-q"])
    assert result.exit_code == 0, result.stderr
    shard = work / "part0.safetensors"
    assert runner.invoke(app, ["extract", str(emoji_dir / "query.txt"), "-m", str(model), "-o", str(shard),
                               "--shard", "0/2", "--workers", "0", "-q"]).exit_code == 0
    classes = work / "classes.txt"
    classes.write_text("a\n")
    logs = work / "logs"
    logs.mkdir()
    (logs / "steps.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (logs / "epochs.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n')
    csv = work / "index.csv"
    csv.write_text("id,url\nabc,http://x\n")
    lists = {name: shutil.copy(emoji_dir / f"{name}.txt", work / f"{name}.txt") for name in ("new_train", "query")}
    # the list files' image paths are relative to their folder: keep the images next to them
    os.symlink(emoji_dir / "images", work / "images")
    return {"model": model, "emb": emb, "shard": shard, "classes": classes, "logs": logs, "csv": csv,
            "train_list": Path(lists["new_train"]), "query_list": Path(lists["query"])}


TRAIN = tiny_train(epochs=1, embedding_dim=8)
CASES = {  # name: (command before the output option, which input the output is, flag)
    "train DATA": (lambda f: ["train", str(f["train_list"]), *TRAIN], "train_list", "--out"),
    "train --old-embeddings": (lambda f: ["train", str(f["train_list"]), "--old-embeddings", str(f["emb"]), *TRAIN], "emb", "--out"),
    "train --old-model": (lambda f: ["train", str(f["train_list"]), "--old-model", str(f["model"]), *TRAIN], "model", "--out"),
    "train --init-from": (lambda f: ["train", str(f["train_list"]), "--init-from", str(f["model"]), *TRAIN], "model", "--out"),
    "train --pretrained": (lambda f: ["train", str(f["train_list"]), "--pretrained", str(f["model"]), *TRAIN], "model", "--out"),
    "train --old-classes": (lambda f: ["train", str(f["train_list"]), "--old-embeddings", str(f["emb"]), "--old-classes",
                                       str(f["classes"]), *TRAIN], "classes", "--out"),
    "extract --model": (lambda f: ["extract", str(f["query_list"]), "--model", str(f["model"]), "-q"], "model", "--out"),
    "extract DATA": (lambda f: ["extract", str(f["query_list"]), "--model", str(f["model"]), "-q"], "query_list", "--out"),
    "merge PARTS": (lambda f: ["merge", str(f["shard"])], "shard", "--out"),
    "adapt SOURCE": (lambda f: ["adapt", str(f["emb"]), str(f["shard"]), "-q"], "emb", "--out"),
    "adapt TARGET": (lambda f: ["adapt", str(f["shard"]), str(f["emb"]), "-q"], "emb", "--out"),
    "transform EMB": (lambda f: ["transform", str(f["emb"]), "--adapter", str(f["shard"]), "-q"], "emb", "--out"),
    "export MODEL": (lambda f: ["export", str(f["model"]), "-f", "torchscript", "-q"], "model", "--out"),
    "plot LOG_DIR": (lambda f: ["plot", str(f["logs"])], "steps", "--out"),
    "dataset gldv2 CSV_FILE": (lambda f: ["dataset", "gldv2", str(f["csv"]), "--images", str(f["logs"])], "csv", "--out"),
    "evaluate --plot": (lambda f: ["evaluate", "--backfill", "0,1", "--query", str(f["emb"]), "--old-gallery", str(f["emb"]),
                                   "--new-gallery", str(f["emb"]), "-q"], "emb", "--plot"),
}


def _target(files: dict[str, Path], which: str) -> Path:
    return files["logs"] / "steps.jsonl" if which == "steps" else files[which]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("how", ["same path", "symbolic link", "hard link"])
def test_an_output_that_is_an_input_is_refused(case: str, how: str, files: dict[str, Path], tmp_path: Path) -> None:
    command, which, flag = CASES[case]
    target = _target(files, which)
    out = {"same path": target, "symbolic link": tmp_path / "link", "hard link": tmp_path / "hard"}[how]
    if how == "symbolic link":
        out.symlink_to(target)
    elif how == "hard link":
        os.link(target, out)
    before = _digest(target)
    result = runner.invoke(app, [*command(files), flag, str(out)])
    assert result.exit_code == 1, (case, result.stdout, result.stderr)
    assert f"{flag} {str(out)!r} is the" in result.stderr and str(target) in result.stderr
    assert "choose another" in result.stderr
    assert _digest(target) == before


def test_a_suggested_command_never_points_at_an_existing_file(files: dict[str, Path], emoji_dir: Path,
                                                               tmp_path: Path) -> None:
    """The old embeddings lack training images: the fix it suggests writes a new file."""
    taken = files["emb"].with_name("old_train_old_emb.safetensors")
    shutil.copy(files["emb"], taken)
    result = runner.invoke(app, ["train", str(emoji_dir / "old_train.txt"), "--out", str(tmp_path / "n.safetensors"),
                                 "--old-embeddings", str(files["shard"]), "--init-from", "none", *TRAIN])
    assert result.exit_code == 1 and "have no old embedding" in result.stderr
    suggested = result.stderr.split("--out ")[-1].split()[0]
    assert not Path(suggested).exists() and Path(suggested).name == "old_train_old_emb-2.safetensors"
