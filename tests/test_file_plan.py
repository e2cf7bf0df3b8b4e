"""Every command declares the files it reads and writes, and one check refuses an output that
would destroy an input: a part of an input shard set, an adapter, a side file (the training
state, the unadapted rows, a sidecar ids file). A test enumerates the commands, runs each one
while recording every file it opens (Python's audit hooks), and checks that the declaration
covers them."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bctool.cli import app
from bctool.utils.files import FilePlan, watch_plans
from helpers import tiny_checkpoint, tiny_train

runner = CliRunner()
TINY = tiny_train(epochs=1, embedding_dim=8)


def _ok(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def world(emoji_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An old checkpoint, its embeddings, a two-part shard set (folder and manifest) of the
    queries, the new model's queries and an adapter between the two spaces."""
    work = tmp_path_factory.mktemp("plan")
    old = tiny_checkpoint(work / "old.safetensors", seed=0)
    new = tiny_checkpoint(work / "new.safetensors", seed=1)
    files = {"old": old, "new": new, "old_emb": work / "old_emb.safetensors", "parts": work / "parts",
             "new_q": work / "new_q.safetensors", "new_g": work / "new_g.safetensors", "adapter": work / "A.safetensors", "manifest": work / "m.txt"}
    quiet = ["--workers", "0", "-q"]
    _ok(["extract", str(emoji_dir / "new_train.txt"), "-m", str(old), "-o", str(files["old_emb"]), *quiet])
    for i in range(2):
        _ok(["extract", str(emoji_dir / "gallery.txt"), "-m", str(old), "-o", str(files["parts"] / f"g.part{i}.safetensors"),
             "--shard", f"{i}/2", *quiet])
    files["manifest"].write_text("parts/g.part0.safetensors\nparts/g.part1.safetensors\n")
    _ok(["extract", str(emoji_dir / "query.txt"), "-m", str(new), "-o", str(files["new_q"]), *quiet])
    _ok(["extract", str(emoji_dir / "gallery.txt"), "-m", str(new), "-o", str(files["new_g"]), *quiet])
    _ok(["adapt", str(files["new_g"]), str(files["parts"]), "-o", str(files["adapter"]), "-q"])
    return files


def _copy_set(world: dict[str, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "pcopy"
    shutil.copytree(world["parts"], copy)
    return copy


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# -- the overlaps the probes found ---------------------------------------------------------------
# name: (arguments given the world, the shard-set copy and tmp_path; the input that must survive)
OVERLAPS: dict[str, Callable[[dict[str, Path], Path, Path], list[str]]] = {
    "backfill plan into a part": lambda w, s, t: ["backfill", "plan", str(s), "--out", str(s / "g.part0.safetensors")],
    "backfill plan --new-sample part": lambda w, s, t: ["backfill", "plan", str(w["new_q"]), "--policy", "disagreement",
                                                       "--new-sample", str(s), "--out", str(s / "g.part1.safetensors")],
    "transform into a part": lambda w, s, t: ["transform", str(s), "--adapter", str(w["adapter"]), "--out",
                                              str(s / "g.part1.safetensors")],
    "adapt SOURCE set into a part": lambda w, s, t: ["adapt", str(s), str(w["new_q"]), "--out", str(s / "g.part0.safetensors")],
    "adapt TARGET manifest into a part": lambda w, s, t: ["adapt", str(w["new_q"]), str(_manifest(s)), "--out",
                                                         str(s / "g.part0.safetensors")],
    "a new file inside an input set": lambda w, s, t: ["transform", str(s), "--adapter", str(w["adapter"]), "--out",
                                                      str(s / "mapped.safetensors")],
    "convert a part into its own set": lambda w, s, t: ["convert", str(s), "--out", str(s / "g.part1.npy")],
    "train --old-embeddings set into a part": lambda w, s, t: ["train", str(s.parent / "list.txt"), "--old-embeddings",
                                                               str(s), "--out", str(s / "g.part1.safetensors")],
}


def _manifest(shards: Path) -> Path:
    manifest = shards / "set.txt"
    manifest.write_text("g.part0.safetensors\ng.part1.safetensors\n")
    return manifest


@pytest.mark.parametrize("case", sorted(OVERLAPS))
def test_writing_over_or_into_an_input_shard_set_is_refused(case: str, world: dict[str, Path], tmp_path: Path,
                                                            emoji_dir: Path) -> None:
    shards = _copy_set(world, tmp_path)
    shutil.copy(emoji_dir / "query.txt", tmp_path / "list.txt")
    before = _digests(shards)
    result = runner.invoke(app, OVERLAPS[case](world, shards, tmp_path))
    assert result.exit_code == 1, (case, result.stdout, result.stderr)
    assert "choose another --out" in result.stderr and str(shards) in result.stderr
    after = _digests(shards)
    after.pop("set.txt", None)
    before.pop("set.txt", None)
    assert after == before, case


def test_a_refused_overlap_is_refused_by_a_real_process_and_the_set_still_loads(world: dict[str, Path],
                                                                                tmp_path: Path) -> None:
    """The probe as a user runs it: `bctool backfill plan pcopy --out pcopy/g.part0.safetensors`."""
    from bctool.embeddings import load_embeddings

    shards = _copy_set(world, tmp_path)
    done = subprocess.run([sys.executable, "-m", "bctool", "backfill", "plan", str(shards), "--out",
                           str(shards / "g.part0.safetensors")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "is the OLD_GALLERY (a part of the shard set" in done.stderr and "choose another --out" in done.stderr
    assert len(load_embeddings(shards)) == len(load_embeddings(world["parts"]))


SIDE_FILES = {  # name: (arguments given the world and a folder holding copies; the file that must survive)
    "extract --adapter A --out A": (lambda w, d: ["extract", "LIST", "-m", str(w["new"]), "--adapter", str(d / "A.safetensors"),
                                                  "--out", str(d / "A.safetensors")], "A.safetensors"),
    "extract --model X.unadapted --adapter --out X": (
        lambda w, d: ["extract", "LIST", "-m", str(d / "m.unadapted.safetensors"), "--adapter", str(w["adapter"]),
                      "--out", str(d / "m.safetensors")], "m.unadapted.safetensors"),
    "train --old-embeddings OUT.state": (
        lambda w, d: ["train", "LIST", "--old-embeddings", str(d / "m2.state.safetensors"), "--out",
                      str(d / "m2.safetensors"), *TINY], "m2.state.safetensors"),
    "train --out the checkpoint that made --old-embeddings": (
        lambda w, d: ["train", "LIST", "--old-embeddings", str(w["old_emb"]), "--out", str(w["old"]), *TINY], None),
    "convert --out whose ids file is --ids": (
        lambda w, d: ["convert", str(d / "c.npy"), "--ids", str(d / "out.ids.txt"), "--out", str(d / "out.npy")], "out.ids.txt"),
}


@pytest.mark.parametrize("case", sorted(SIDE_FILES))
def test_side_files_and_adapters_are_checked_as_outputs(case: str, world: dict[str, Path], emoji_dir: Path,
                                                        tmp_path: Path) -> None:
    side = tmp_path / "side"
    side.mkdir()
    shutil.copy(world["adapter"], side / "A.safetensors")
    shutil.copy(world["new"], side / "m.unadapted.safetensors")
    shutil.copy(world["old_emb"], side / "m2.state.safetensors")
    _ok(["convert", str(world["new_q"]), "--out", str(side / "c.npy")])
    shutil.copy(side / "c.ids.txt", side / "out.ids.txt")
    args, kept = SIDE_FILES[case]
    args = [str(emoji_dir / "old_train.txt") if a == "LIST" else a for a in args(world, side)]
    target = side / kept if kept else world["old"]
    before = hashlib.sha256(target.read_bytes()).hexdigest()
    result = runner.invoke(app, args)
    assert result.exit_code == 1, (case, result.stdout, result.stderr)
    assert "choose another --out" in result.stderr and str(target) in result.stderr, result.stderr
    assert target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == before


def test_options_a_command_would_ignore_are_usage_errors(world: dict[str, Path], tmp_path: Path) -> None:
    cases = {
        "--blend-weight": ["transform", str(world["new_q"]), "--adapter", str(world["adapter"]), "--out",
                           str(tmp_path / "t.safetensors"), "--blend-weight", "0.3"],
        "--order": ["evaluate", "--query", str(world["new_q"]), "--gallery", str(world["new_q"]), "--order",
                    str(tmp_path / "plan.tsv")],
        "--plot": ["evaluate", "--query", str(world["new_q"]), "--gallery", str(world["new_q"]), "--plot",
                   str(tmp_path / "c.png")],
        "--new-sample": ["backfill", "plan", str(world["parts"]), "--new-sample", str(world["new_q"]), "--out",
                         str(tmp_path / "plan.tsv")],
    }
    for option, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and option in result.stderr, (option, result.stderr)
        assert not any(tmp_path.iterdir()), option


# -- every command's declaration covers what it opens ----------------------------------------------
class _Opened:
    """Files opened (for reading or writing), renamed onto and removed, under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = os.path.realpath(root)
        self.reads: set[str] = set()
        self.writes: set[str] = set()

    def event(self, name: str, args: tuple) -> None:
        if name == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))
            self._add(self.writes if writing else self.reads, path)
        elif name == "os.rename":
            self._add(self.writes, args[1])
        elif name == "os.remove":
            self._add(self.writes, args[0])

    def _add(self, into: set[str], path: object) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            text = os.path.abspath(os.fsdecode(path))
            if text.startswith(self.root + os.sep):
                into.add(text)


_RECORDERS: list[_Opened] = []


def _hook(name: str, args: tuple) -> None:
    for recorder in _RECORDERS:
        recorder.event(name, args)


sys.addaudithook(_hook)  # an audit hook stays for the process: it does nothing while no test records


def _run_recorded(args: list[str], root: Path) -> tuple[FilePlan, _Opened]:
    opened = _Opened(root)
    with watch_plans() as plans:
        _RECORDERS.append(opened)
        try:
            result = runner.invoke(app, args)
        finally:
            _RECORDERS.remove(opened)
    assert result.exit_code == 0, (args, result.stdout, result.stderr)
    assert len(plans) == 1, (args, plans)
    return plans[0], opened


def _gldv2(tmp: Path) -> list[str]:
    (tmp / "gl" / "a" / "b" / "c").mkdir(parents=True)
    (tmp / "gl" / "a" / "b" / "c" / "abc.jpg").write_bytes(b"")
    (tmp / "index.csv").write_text("id\nabc\n")
    return ["dataset", "gldv2", str(tmp / "index.csv"), "--images", str(tmp / "gl"), "--out", str(tmp / "gl.txt")]


# Each command with a run that reads and writes what a user's run would; commands that only
# print (methods, list) are run too: they declare nothing and must open nothing under the root.
RUNS: dict[str, Callable[[dict[str, Path], Path, Path], list[str]]] = {
    "train": lambda w, e, t: ["train", str(e / "new_train.txt"), "--old-embeddings", str(w["old_emb"]), "--out",
                              str(t / "n.safetensors"), "--log-dir", str(t / "log"), "--diagnostics", *TINY],
    "extract": lambda w, e, t: ["extract", str(e / "gallery.txt"), "-m", str(w["new"]), "--adapter", str(w["adapter"]),
                                "--out", str(t / "qa.safetensors"), "--workers", "0", "-q"],
    "convert": lambda w, e, t: ["convert", str(w["manifest"]), "--out", str(t / "c.npy")],
    "merge": lambda w, e, t: ["merge", *map(str, sorted(w["parts"].iterdir())), "--out", str(t / "merged.safetensors")],
    "adapt": lambda w, e, t: ["adapt", str(w["new_g"]), str(w["manifest"]), "--out", str(t / "a.safetensors"), "-q"],
    "transform": lambda w, e, t: ["transform", str(w["new_g"]), "--adapter", str(w["adapter"]), "--blend",
                                  str(w["parts"]), "--out", str(t / "t.safetensors"), "-q"],
    "evaluate": lambda w, e, t: ["evaluate", "--backfill", "0,0.5,1", "--query", str(w["new_q"]), "--old-gallery",
                                 str(w["parts"]), "--new-gallery", str(w["new_g"]), "--order", str(_plan(w, t)),
                                 "--plot", str(t / "curve.png"), "-q"],
    "export": lambda w, e, t: ["export", str(w["new"]), "-f", "torchscript", "--images", str(e / "query.txt"),
                               "--out", str(t / "m.pt"), "-q"],
    "plot": lambda w, e, t: ["plot", str(_log(t)), "--out", str(t / "log.png")],
    "backfill plan": lambda w, e, t: ["backfill", "plan", str(w["parts"]), "--out", str(t / "p.tsv")],
    "dataset emoji": lambda w, e, t: ["dataset", "emoji", str(t / "emoji"), "--limit", "4"],
    "dataset make": lambda w, e, t: ["dataset", "make", "emoji", str(t / "emoji"), "--param", "limit=4"],
    "dataset gldv2": lambda w, e, t: _gldv2(t),
    "import": lambda w, e, t: ["import", "efficientnet_lite0", "--pretrained", "imagenet", "--out",
                               str(t / "lite0.safetensors"), "--image-size", "32"],
    "verify": lambda w, e, t: ["verify", str(w["new_q"]), "-m", str(w["new"]), "--sample", "2", "--workers", "0", "-q"],
    "methods": lambda w, e, t: ["methods"],
    "list": lambda w, e, t: ["list", "regimes"],
}
# Commands not run here, and why; each still declares its files (checked by reading its code).
NOT_RUN = {
    "demo": "trains four models (minutes); it writes only under --workdir, declared as a write folder",
    "dataset fashion-mnist": "needs the Fashion-MNIST files (Debian's dataset-fashion-mnist); it reads --source and "
                             "writes under OUT_DIR, as dataset make does",
}


def _plan(world: dict[str, Path], tmp: Path) -> Path:
    plan = tmp / "order.tsv"
    _ok(["backfill", "plan", str(world["parts"]), "--policy", "random", "--out", str(plan)])
    return plan


def _log(tmp: Path) -> Path:
    log = tmp / "trainlog"
    log.mkdir()
    (log / "steps.jsonl").write_text("".join(f'{{"step": {i}, "epoch": 1, "lr": 0.1, "loss": {1 / i}}}\n' for i in (1, 2)))
    (log / "epochs.jsonl").write_text('{"epoch": 1, "step": 2, "loss": 0.5}\n')
    return log


def _commands() -> list[str]:
    """Every command of the CLI, sub-commands by their group: `dataset emoji`, `backfill plan`."""
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    for group in app.registered_groups:
        names += [f"{group.name} {c.name or c.callback.__name__}" for c in group.typer_instance.registered_commands]
    return sorted(names)


def test_every_command_is_checked_for_the_files_it_opens() -> None:
    assert sorted([*RUNS, *NOT_RUN]) == _commands()


@pytest.mark.parametrize("command", sorted(RUNS))
def test_a_command_opens_only_what_it_declares(command: str, world: dict[str, Path], emoji_dir: Path,
                                               tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    args = RUNS[command](world, emoji_dir, tmp_path)
    if command == "import":  # named weights, converted into a cache folder under the recorded root
        from bctool.models.weights import WEIGHTS

        weights = WEIGHTS["efficientnet_lite0.imagenet"]
        if not weights.installed():
            pytest.skip(f"the weights package is not installed: {weights.install_command}")
        monkeypatch.setenv("BCTOOL_CACHE", str(tmp_path / "cache"))
    if command in ("methods", "list"):
        opened = _Opened(tmp_path_factory.getbasetemp())
        _RECORDERS.append(opened)
        try:
            assert runner.invoke(app, args).exit_code == 0
        finally:
            _RECORDERS.remove(opened)
        assert not opened.writes, opened.writes
        return
    plan, opened = _run_recorded(args, tmp_path_factory.getbasetemp())  # the tests' temporary root: inputs too
    assert opened.writes or command == "verify", f"{command} wrote nothing the recorder saw"  # verify only reads
    unread = sorted(p for p in opened.reads if not plan.covers_read(p))
    unwritten = sorted(p for p in opened.writes if not plan.covers_write(p))
    assert not unread, f"{command} read files it does not declare: {unread}"
    assert not unwritten, f"{command} wrote files it does not declare: {unwritten}"
