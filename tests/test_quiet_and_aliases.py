"""`-q` silences the progress bars of the long commands (stderr keeps only warnings); the library
reports each bar to the Progress it is given; the deprecated spellings (`bctool methods`,
`dataset emoji`, `dataset fashion-mnist`) warn and give what their replacements give."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import bctool.cli.output as output
from bctool.adapt import fit_adapter, load_adapter, save_adapter, transform_file
from bctool.cli import app
from bctool.convert import convert
from bctool.data.fashion_mnist import CLASS_NAMES, FILES
from bctool.data.writers import DATASETS, write_dataset
from bctool.embeddings import Embeddings, load_embeddings, merge_shards, save_embeddings

runner = CliRunner()


class Recorder:
    """A Progress that records every event."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def start(self, description: str, total: int | None) -> None:
        self.events.append(("start", description, total))

    def advance(self, steps: int = 1, status: str = "") -> None:
        self.events.append(("advance", steps))

    def stop(self) -> None:
        self.events.append(("stop",))

    def bars(self) -> list[tuple[str, int | None, int]]:
        """``(description, total, steps advanced)`` per bar; each bar is stopped before the next starts."""
        bars: list[tuple[str, int | None, int]] = []
        open_bar = False
        for event in self.events:
            if event[0] == "start":
                assert not open_bar, self.events
                bars.append((event[1], event[2], 0))
                open_bar = True
            elif event[0] == "advance":
                assert open_bar, self.events
                description, total, steps = bars[-1]
                bars[-1] = (description, total, steps + event[1])
            else:
                assert open_bar, self.events
                open_bar = False
        assert not open_bar, "a bar was never stopped"
        return bars


def _emb(rows: int, dim: int = 4, shard: dict | None = None, start: int = 0, model: str = "s") -> Embeddings:
    rng = np.random.default_rng(start)
    return Embeddings(rng.normal(size=(rows, dim)).astype(np.float32), np.arange(start, start + rows) % 3,
                      [f"img{i}" for i in range(start, start + rows)], ["a", "b", "c"], {"sha256": model * 64},
                      shard=shard)


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    """An embeddings file (the new model's), two shard parts of it, and an adapter into another space."""
    made = {"emb": tmp_path / "emb.safetensors", "adapter": tmp_path / "adapter.safetensors", "parts": tmp_path / "parts"}
    source, target = _emb(20), _emb(20, model="t")
    save_embeddings(source, made["emb"])
    save_adapter(fit_adapter(source, target, "procrustes", holdout=0), made["adapter"])
    made["parts"].mkdir()
    for index, (start, stop) in enumerate(((0, 12), (12, 20))):
        shard = {"index": index, "count": 2, "start": start, "stop": stop, "total": 20, "list": "f" * 64}
        part = _emb(20)
        save_embeddings(Embeddings(part.embeddings[start:stop], part.labels[start:stop], part.ids[start:stop],
                                   part.label_names, part.model, shard=shard), made["parts"] / f"p{index}.safetensors")
    return made


def _digits_source(path: Path, per_class: int = 5) -> Path:
    """A digits.csv.gz as scikit-learn ships it: 64 grey values 0-16 and the digit, one image a line."""
    rng = np.random.default_rng(0)
    lines = [",".join(map(str, [*rng.integers(0, 17, 64), digit])) for digit in range(10) for _ in range(per_class)]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return path


def _fashion_source(folder: Path, per_class: int = 2) -> Path:
    """The four gzipped IDX files with ``per_class`` random images of every class in each part."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for images_stem, labels_stem in FILES.values():
        labels = np.repeat(np.arange(len(CLASS_NAMES), dtype=np.uint8), per_class)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        for stem, array, code in ((images_stem, images, 0x08), (labels_stem, labels, 0x08)):
            header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
            (folder / f"{stem}.gz").write_bytes(gzip.compress(header + array.tobytes()))
    return folder


# 1. The library reports each bar ----------------------------------------------------------

def test_convert_transform_and_merge_report_every_row_on_one_bar(files: dict[str, Path], tmp_path: Path) -> None:
    for out in ("c.npy", "c.safetensors"):
        recorder = Recorder()
        src = files["emb"] if out.endswith(".npy") else tmp_path / "c.npy"
        convert(src, tmp_path / out, progress=recorder)
        assert recorder.bars() == [("convert", 20, 20)], out
    recorder = Recorder()
    transform_file(files["emb"], load_adapter(files["adapter"]), tmp_path / "t.safetensors", block_rows=8,
                   progress=recorder)
    assert recorder.bars() == [("transform", 20, 20)]
    assert [e[1] for e in recorder.events if e[0] == "advance"] == [8, 8, 4]  # block by block
    recorder = Recorder()
    merge_shards(sorted(files["parts"].iterdir()), tmp_path / "m.safetensors", block_rows=5, progress=recorder)
    assert recorder.bars() == [("merge", 20, 20)]
    assert len(load_embeddings(tmp_path / "m.safetensors")) == 20


def test_every_dataset_writer_counts_the_images_it_writes(tmp_path: Path) -> None:
    runs = {
        "emoji": ({"limit": 4}, 8),  # two vendors' renderings of 4 emoji
        "digits": ({"source": str(_digits_source(tmp_path / "digits.csv.gz")), "query_per_class": 1}, 50),
        "fashion-mnist": ({"source": str(_fashion_source(tmp_path / "fm-src")), "query_per_class": 1}, 40),
    }
    for name, (params, images) in runs.items():
        recorder = Recorder()
        write_dataset(name, tmp_path / name, params, recorder)
        assert recorder.bars() == [("write images", images, images)], name
        again = Recorder()  # a rerun into the same folder counts the images already there
        write_dataset(name, tmp_path / name, params, again)
        assert again.bars() == recorder.bars(), name


def test_a_writer_that_takes_no_progress_still_writes(tmp_path: Path) -> None:
    """A plugin's writer may be ``write(out_dir, params)`` alone: it gets no Progress."""
    snapshot = DATASETS.snapshot()

    def plain(out_dir: Path, params: None) -> dict:
        out_dir.mkdir()
        return {"out_dir": str(out_dir)}

    try:
        DATASETS.register("plain", plain, description="A writer without progress.", params=None)
        assert write_dataset("plain", tmp_path / "p", None, Recorder()) == {"out_dir": str(tmp_path / "p")}
    finally:
        DATASETS.restore(snapshot)


# 2. -q on the command line ----------------------------------------------------------------

def _long_commands(files: dict[str, Path], tmp: Path) -> dict[str, list[str]]:
    return {
        "convert": ["convert", str(files["emb"]), "--out", str(tmp / "c.npy")],
        "merge": ["merge", *map(str, sorted(files["parts"].iterdir())), "--out", str(tmp / "m.safetensors")],
        "transform": ["transform", str(files["emb"]), "--adapter", str(files["adapter"]), "--out",
                      str(tmp / "t.safetensors")],
        "dataset make": ["dataset", "make", "emoji", str(tmp / "emoji"), "--param", "limit=4"],
    }


@pytest.mark.parametrize("command", ["convert", "merge", "transform", "dataset make"])
def test_a_long_command_draws_a_bar_that_quiet_turns_off(command: str, files: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output.stderr, "_force_terminal", True)  # as on a terminal: bars are drawn
    drawn = runner.invoke(app, _long_commands(files, tmp_path / "drawn")[command])
    assert drawn.exit_code == 0, drawn.stderr
    assert drawn.stderr.strip(), f"{command} drew no bar on a terminal"
    quiet = runner.invoke(app, [*_long_commands(files, tmp_path / "quiet")[command], "-q"])
    assert quiet.exit_code == 0, quiet.stderr
    assert quiet.stderr == "" and isinstance(json.loads(quiet.stdout), dict)  # stdout: one JSON document


def test_quiet_keeps_warnings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dataset emoji -q` on a terminal: no bar, the deprecation warning alone."""
    monkeypatch.setattr(output.stderr, "_force_terminal", True)
    result = runner.invoke(app, ["dataset", "emoji", str(tmp_path / "e"), "--limit", "4", "-q"])
    assert result.exit_code == 0, result.stderr
    said = " ".join(result.stderr.split())
    assert said.startswith("WARNING") and said.count("WARNING") == 1 and "deprecated" in said
    assert "write images" not in said and "━" not in result.stderr


def test_instant_commands_accept_quiet(tmp_path: Path, training_log: Path) -> None:
    for args in (["list", "regimes", "-q"], ["plot", str(training_log), "-q"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and result.stderr == "", (args, result.stderr)


# 3. Deprecated spellings ------------------------------------------------------------------

def test_methods_prints_what_list_methods_prints_and_warns() -> None:
    old, new = runner.invoke(app, ["methods"]), runner.invoke(app, ["list", "methods"])
    assert old.exit_code == new.exit_code == 0
    assert old.stdout == new.stdout and new.stderr == ""
    listed = json.loads(new.stdout)
    assert listed["recommended"] == {"methods": "lce"} and "lce" in {e["name"] for e in listed["kinds"]["methods"]}
    said = " ".join(old.stderr.split())
    assert "`bctool methods` is deprecated" in said and "use `bctool list methods`" in said
    assert "recommended" not in json.loads(runner.invoke(app, ["list", "heads"]).stdout)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_summary(a: str, b: str, a_dir: Path, b_dir: Path) -> None:
    assert json.loads(a.replace(str(a_dir), "OUT")) == json.loads(b.replace(str(b_dir), "OUT"))


def test_dataset_emoji_is_dataset_make_emoji_with_a_warning(tmp_path: Path) -> None:
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old = runner.invoke(app, ["dataset", "emoji", str(old_dir), "--limit", "5", "--seed", "3", "-q"])
    new = runner.invoke(app, ["dataset", "make", "emoji", str(new_dir), "--param", "limit=5", "--param", "seed=3", "-q"])
    assert old.exit_code == new.exit_code == 0, old.stderr + new.stderr
    _same_summary(old.stdout, new.stdout, old_dir, new_dir)
    assert _tree(old_dir) == _tree(new_dir) and new.stderr == ""
    said = " ".join(old.stderr.split())
    assert "`bctool dataset emoji` is deprecated" in said
    assert f"use `bctool dataset make emoji {old_dir} --param seed=3 --param limit=5`" in said


def test_dataset_fashion_mnist_is_dataset_make_fashion_mnist_with_a_warning(tmp_path: Path) -> None:
    source = _fashion_source(tmp_path / "src")
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old = runner.invoke(app, ["dataset", "fashion-mnist", str(old_dir), "--source", str(source),
                              "--query-per-class", "1", "--train-per-class", "2"])
    new = runner.invoke(app, ["dataset", "make", "fashion-mnist", str(new_dir), "--param", f"source={source}",
                              "--param", "query_per_class=1", "--param", "train_per_class=2"])
    assert old.exit_code == new.exit_code == 0, old.stderr + new.stderr
    _same_summary(old.stdout, new.stdout, old_dir, new_dir)
    assert _tree(old_dir) == _tree(new_dir)
    said = " ".join(old.stderr.split())
    assert "`bctool dataset fashion-mnist` is deprecated" in said
    assert (f"use `bctool dataset make fashion-mnist {old_dir} --param source={source} --param train_per_class=2 "
            "--param query_per_class=1`") in said


def test_the_deprecated_commands_are_hidden_from_the_help() -> None:
    top, dataset = runner.invoke(app, ["--help"]).stdout, runner.invoke(app, ["dataset", "--help"]).stdout
    assert " methods " not in top and " list " in top
    assert " emoji " not in dataset and " fashion-mnist " not in dataset and " make " in dataset
