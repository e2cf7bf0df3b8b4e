"""The command line: help text everywhere, one end-to-end run, exit codes, stdout vs stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from helpers import tiny_train
from typer.testing import CliRunner

from bctool.checkpoint import file_sha256, load_checkpoint
from bctool.cli import app
from bctool.embeddings import Embeddings, load_embeddings, save_embeddings
from bctool.train.recipe import RECOMMENDED_METHOD

runner = CliRunner()
TINY = tiny_train()


def _commands(group: object, prefix: str = "") -> list[tuple[str, object]]:
    # Typer ships its own copy of click, so walk the tree by duck typing.
    found = []
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        found.append((f"{prefix}{name}", cmd))
        if hasattr(cmd, "commands"):
            found += _commands(cmd, f"{prefix}{name} ")
    return found


def test_every_command_and_option_has_help() -> None:
    root = typer.main.get_command(app)
    assert hasattr(root, "commands")
    commands = _commands(root)
    assert {"train", "extract", "evaluate", "demo", "dataset", "dataset emoji"} <= {n for n, _ in commands}
    for name, cmd in commands:
        assert cmd.help, f"`bctool {name}` has no help text"
        for param in cmd.params:
            if param.name == "help":
                continue
            assert getattr(param, "help", None), f"`bctool {name}` parameter {param.name} has no help"
        result = runner.invoke(app, [*name.split(), "--help"])
        assert result.exit_code == 0, result.output


def test_version_and_python_m() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("bctool ")
    proc = subprocess.run([sys.executable, "-m", "bctool", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "extract" in proc.stdout


def _run(args: list[str]) -> dict:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, f"{args}: {result.stderr}{result.exception!r}"
    return json.loads(result.stdout)


def test_end_to_end_train_extract_evaluate(emoji_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.safetensors"
    summary = _run(["train", str(emoji_dir / "new_train.txt"), "--out", str(model), *TINY])
    assert summary["epochs"] == 2 and summary["classes"] == 28 and model.is_file()
    assert set(summary["final"]) == {"cls", "loss"}
    for split in ("query", "gallery"):
        out = _run(["extract", str(emoji_dir / f"{split}.txt"), "--model", str(model),
                    "--out", str(tmp_path / f"{split}.safetensors"), "--workers", "0", "-q"])
        assert out["images"] == 12 and out["embedding_dim"] == 256
    emb = load_embeddings(tmp_path / "query.safetensors")
    assert emb.ids[0].startswith("images/google/") and emb.model["arch"] == "small"
    result = runner.invoke(app, ["evaluate", "--query", str(tmp_path / "query.safetensors"),
                                 "--gallery", str(tmp_path / "gallery.safetensors")])
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)  # stdout holds only the JSON ...
    assert "mAP" in result.stderr and "R@1" in result.stderr  # ... the table is on stderr
    for key in ("map", "map@100", "recall@1", "recall@5", "recall@10"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["queries"] == 12 and metrics["gallery"] == 12


def test_extract_is_deterministic_and_batch_independent(emoji_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    _run(["train", str(emoji_dir / "old_train.txt"), "--out", str(model), *TINY])
    outs = []
    for bs in ("3", "64"):
        path = tmp_path / f"e{bs}.safetensors"
        _run(["extract", str(emoji_dir / "query.txt"), "-m", str(model), "-o", str(path),
              "--batch-size", bs, "--workers", "0", "-q"])
        outs.append(load_embeddings(path).embeddings)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_errors_exit_1_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("Error: data ") and "missing.txt" in result.stderr
    assert "Traceback" not in result.stderr

    def emb(d: int) -> Embeddings:
        return Embeddings(np.ones((2, d), np.float32), np.zeros(2, np.int64), ["a", "b"], ["x"])

    save_embeddings(emb(4), tmp_path / "q.safetensors")
    save_embeddings(emb(8), tmp_path / "g.safetensors")
    result = runner.invoke(app, ["evaluate", "--query", str(tmp_path / "q.safetensors"),
                                 "--gallery", str(tmp_path / "g.safetensors")])
    assert result.exit_code == 1 and "Error:" in result.stderr
    assert "4" in result.stderr and "8" in result.stderr


def test_usage_errors_exit_2() -> None:
    assert runner.invoke(app, ["train"]).exit_code == 2
    assert runner.invoke(app, ["evaluate", "--query"]).exit_code == 2
    assert runner.invoke(app, ["nonsense"]).exit_code == 2


def test_bad_option_value_is_a_clear_error(emoji_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(emoji_dir / "new_train.txt"), "--out",
                                 str(tmp_path / "m.safetensors"), "--arch", "vgg"])
    assert result.exit_code in (1, 2)
    assert "vgg" in result.stderr and "resnet18" in result.stderr


def test_cuda_without_gpu_is_a_clear_error(emoji_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = runner.invoke(app, ["train", str(emoji_dir / "new_train.txt"), "--out",
                                 str(tmp_path / "m.safetensors"), "--device", "cuda", *TINY[:-3]])
    assert result.exit_code == 1 and "--device cpu" in result.stderr


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    summary = _run(["demo", "--workdir", str(tmp_path), "--limit", "30", "--epochs", "2",
                    "--workers", "0", "--device", "cpu", "--bootstrap", "200", "-q"])
    assert set(summary["results"]) == {"old/old", "new/new", "new/old", "advbct/advbct", "advbct/old",
                                       "ind/ind", "ind/old"}
    for metrics in summary["results"].values():
        assert 0.0 <= metrics["map"] <= 1.0 and metrics["queries"] == 9
    new, published = summary["models"]["new"], summary["models"]["advbct"]
    assert (new["method"], published["method"], summary["models"]["independent"]["method"]) == (
        RECOMMENDED_METHOD, "advbct", "independent")
    # The recommended new model starts from the old one, on the clean views its old embeddings
    # are of; AdvBCT in the authors' regime from scratch; the old model on crops.
    init = load_checkpoint(tmp_path / "new_model.safetensors").train_config
    assert init["init_from"]["sha256"] == file_sha256(tmp_path / "old_model.safetensors") and init["lr"] == 0.03
    assert (init["regime"], init["augment"]) == ("bctool", "none")
    paper = load_checkpoint(tmp_path / "advbct_model.safetensors").train_config
    assert paper["init_from"] is None and (paper["regime"], paper["schedule"], paper["head_bias"]) == ("paper", "step", False)
    assert load_checkpoint(tmp_path / "old_model.safetensors").train_config["augment"] == "crop"
    assert summary["published"]["regime"] == "paper"
    assert (tmp_path / "new_query.safetensors").is_file()
    assert summary["M(n,o)"] == summary["results"]["new/old"]["map"]
    assert summary["compatible"] == (summary["M(n,o)"] > summary["M(o,o)"])
    changes = summary["changes"]  # the label-free verdict beside the labelled one
    assert 0 <= changes["new/old"][f"overlap@{changes['k']}"] <= 1 and changes["identity"]["identity_images"] == len(
        load_embeddings(tmp_path / "new_gallery.safetensors"))
    stored = json.loads((tmp_path / "summary.json").read_text())  # the figures, with what made them
    assert stored["M(n,o)"] == summary["M(n,o)"] and {"command", "revision"} <= set(stored)
    assert summary["delta"] == pytest.approx(summary["M(n,o)"] - summary["M(o,o)"])
    assert summary["delta_low"] <= summary["delta"] <= summary["delta_high"] and summary["bootstrap"] == 200
    assert summary["compatible_significant"] == (summary["delta_low"] > 0)
    assert summary["published"]["M(n,o)"] == summary["results"]["advbct/old"]["map"]


def test_evaluate_with_revisited_ground_truth(tmp_path: Path) -> None:
    import pickle

    rng = np.random.default_rng(0)
    gallery_names = [f"g{i}" for i in range(8)]
    gallery = Embeddings(rng.normal(size=(8, 4)).astype(np.float32), np.full(8, -1, np.int64),
                         [f"jpg/{n}" for n in gallery_names], [])
    # The query is gallery image g0 seen again: it must rank g0 first.
    query = Embeddings(gallery.embeddings[:1].copy(), np.full(1, -1, np.int64), ["jpg/q0"], [])
    gnd = {"imlist": gallery_names, "qimlist": ["q0"],
           "gnd": [{"easy": [0], "hard": [3], "junk": [5], "bbx": [0, 0, 10, 10]}]}
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps(gnd))
    save_embeddings(query, tmp_path / "q.safetensors")
    save_embeddings(gallery, tmp_path / "g.safetensors")
    result = runner.invoke(app, ["evaluate", "--query", str(tmp_path / "q.safetensors"), "--gallery",
                                 str(tmp_path / "g.safetensors"), "--gnd", str(tmp_path / "gnd.pkl")])
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["map_easy"] == 1.0 and metrics["mp@1_easy"] == 1.0
    assert metrics["map"] == metrics["map_medium"] and metrics["queries"] == 1
    assert 0.0 < metrics["map_hard"] <= 1.0
    assert "mP@5" in result.stderr and "medium" in result.stderr


def test_worker_errors_are_one_line(tmp_path: Path) -> None:
    """A missing image found inside a DataLoader worker (--strict) still gives one clean Error: line."""
    from PIL import Image

    for name in ("a", "b"):
        Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / f"{name}.png")
    (tmp_path / "list.txt").write_text("a.png x\nmissing.png x\nb.png y\n")
    model = tmp_path / "m.safetensors"
    result = runner.invoke(app, ["train", str(tmp_path / "list.txt"), "--out", str(model), "--arch", "small",
                                 "--image-size", "16", "--epochs", "1", "--batch-size", "2", "--workers", "1",
                                 "--device", "cpu", "-q", "--strict"])
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr and "missing.png' does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3  # one message, maybe soft-wrapped


def test_out_is_checked_before_training(emoji_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(emoji_dir / "old_train.txt"), "--out", str(tmp_path), *TINY])
    assert result.exit_code == 1 and "is a folder" in result.stderr
    assert not list(tmp_path.glob("*.state.safetensors"))


def test_outputs_are_readable_by_others(emoji_dir: Path, tmp_path: Path) -> None:
    import os
    import stat

    umask = os.umask(0o022)
    try:
        _run(["train", str(emoji_dir / "old_train.txt"), "--out", str(tmp_path / "m.safetensors"), *TINY])
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644


def test_checkpoint_passed_as_embeddings_says_so(emoji_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    _run(["train", str(emoji_dir / "old_train.txt"), "--out", str(model), *TINY])
    result = runner.invoke(app, ["evaluate", "--query", str(model), "--gallery", str(model)])
    assert result.exit_code == 1 and "is a model checkpoint, not an embeddings file" in result.stderr


def _emb_files(tmp_path: Path, name: str, emb: np.ndarray, labels: list[int], ids: list[str]) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_embeddings(Embeddings(emb.astype(np.float32), np.array(labels, np.int64), ids, ["a", "b", "c"]), path)
    return path


def test_compatibility_report_chain_and_backfill(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8))
    labels = [0, 1, 2, 0, 1, 2]
    noisy = {name: centers[labels] + scale * rng.normal(size=(6, 8)) for name, scale in
             (("oq", 0.8), ("og", 0.8), ("nq", 0.3), ("ng", 0.3))}
    files = {name: _emb_files(tmp_path, name, e, labels, [f"{name}/{i}" for i in range(6)])
             for name, e in noisy.items()}
    # Same gallery images for the backfill: the new gallery shares the old gallery's ids; the same
    # query images for the paired delta: the new queries share the old queries' ids.
    files["ng"] = _emb_files(tmp_path, "ng_same", noisy["ng"], labels, [f"og/{i}" for i in range(6)])
    files["nq"] = _emb_files(tmp_path, "nq_same", noisy["nq"], labels, [f"oq/{i}" for i in range(6)])
    compat_args = ["evaluate", "--old-query", str(files["oq"]), "--old-gallery", str(files["og"]),
                   "--new-query", str(files["nq"]), "--new-gallery", str(files["ng"])]
    result = runner.invoke(app, [*compat_args, "--seed", "3"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["metric"] == "map" and set(report["results"]) == {"old/old", "new/new", "new/old"}
    assert report["m_no"] == report["results"]["new/old"]["map"]
    assert report["compatible"] == (report["m_no"] > report["m_oo"])
    assert report["delta"] == pytest.approx(report["m_no"] - report["m_oo"], abs=1e-12)
    assert report["delta_low"] <= report["delta"] <= report["delta_high"] and report["bootstrap"] == 1000
    assert report["compatible_significant"] == (report["delta_low"] > 0)
    verdict = "(significant)" if report["compatible_significant"] else "(not significant)"
    line = (f"delta M(n,o) - M(o,o): {100 * report['delta']:+.2f} [95% CI {100 * report['delta_low']:+.2f}, "
            f"{100 * report['delta_high']:+.2f}] {verdict}")
    assert line in result.stderr and "CI" not in result.stdout
    assert _run([*compat_args, "--seed", "3", "-q"]) == report  # the seed fixes the interval
    off = runner.invoke(app, [*compat_args, "--bootstrap", "0"])
    assert off.exit_code == 0 and "(no bootstrap)" in off.stderr
    assert json.loads(off.stdout)["delta"] == report["delta"]
    assert not {"delta_low", "delta_high", "bootstrap", "compatible_significant"} & set(json.loads(off.stdout))
    negative = runner.invoke(app, [*compat_args, "--bootstrap", "-1"])
    assert negative.exit_code == 2 and "'--bootstrap': -1 is below 0; pass 0 or more" in negative.stderr
    chain = _run(["evaluate", "--chain", f"{files['oq']},{files['og']}", f"{files['nq']},{files['ng']}", "-q"])
    assert len(chain["matrix"]) == 2 and chain["matrix"][1][0] == report["m_no"]
    assert chain["ac"] == (1.0 if report["compatible"] else 0.0)
    curve = _run(["evaluate", "--backfill", "0,0.5,1", "--query", str(files["nq"]), "--old-gallery",
                  str(files["og"]), "--new-gallery", str(files["ng"]), "-q"])["curve"]
    assert [c["fraction"] for c in curve] == [0.0, 0.5, 1.0]
    assert curve[0]["map"] == report["m_no"] and curve[-1]["map"] == report["m_nn"]
    backfill = _run(["evaluate", "--backfill", "0,1", "--query", str(files["nq"]), "--old-query", str(files["oq"]),
                     "--old-gallery", str(files["og"]), "--new-gallery", str(files["ng"]), "-q"])
    assert backfill["m_oo"] == report["m_oo"] and backfill["m_nn"] == report["m_nn"]


def test_evaluate_mode_errors_are_usage_errors(tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--chain", "only_one.safetensors,g.safetensors"])
    assert result.exit_code == 2 and "at least two" in result.stderr
    result = runner.invoke(app, ["evaluate", "--backfill", "0,x", "--query", "q", "--old-gallery", "o",
                                 "--new-gallery", "n"])
    assert result.exit_code == 2
    assert runner.invoke(app, ["evaluate"]).exit_code == 2


def test_extract_revisited_queries_cropped_and_gallery_in_gnd_order(emoji_dir: Path, tmp_path: Path) -> None:
    import pickle

    from PIL import Image

    root = tmp_path / "roxford5k"
    (root / "jpg").mkdir(parents=True)
    sources = sorted((emoji_dir / "images" / "google").glob("*.png"))[:6]
    names = [f"img_{i}" for i in range(6)]
    for name, src in zip(names, sources):
        Image.open(src).convert("RGB").resize((64, 48)).save(root / "jpg" / f"{name}.jpg")
    gnd = {"imlist": names[::-1], "qimlist": names[:2],
           "gnd": [{"easy": [5], "hard": [], "junk": [], "bbx": [0, 0, 32, 24]},
                   {"easy": [4], "hard": [3], "junk": [0], "bbx": [10.5, 5, 60, 40]}]}
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps(gnd))
    model = tmp_path / "m.safetensors"
    _run(["train", str(emoji_dir / "old_train.txt"), "--out", str(model), *TINY])
    common = ["--model", str(model), "--gnd", str(tmp_path / "gnd.pkl"), "--workers", "0", "-q"]
    _run(["extract", str(root), "--out", str(tmp_path / "g.safetensors"), *common])
    _run(["extract", str(root), "--out", str(tmp_path / "q.safetensors"), "--queries", *common])
    _run(["extract", str(root), "--out", str(tmp_path / "qf.safetensors"), "--queries", "--no-crop", *common])
    g, q, qf = (load_embeddings(tmp_path / f"{n}.safetensors") for n in ("g", "q", "qf"))
    assert g.ids == [f"jpg/{n}" for n in names[::-1]]  # ground-truth order
    assert q.ids == qf.ids == ["jpg/img_0", "jpg/img_1"]
    assert not np.allclose(q.embeddings, qf.embeddings)  # the crop changed what was embedded
    # The uncropped query is the gallery image itself.
    np.testing.assert_allclose(qf.embeddings[0], g.embeddings[5], rtol=1e-4, atol=1e-5)
    metrics = _run(["evaluate", "--query", str(tmp_path / "q.safetensors"), "--gallery",
                    str(tmp_path / "g.safetensors"), "--gnd", str(tmp_path / "gnd.pkl"), "-q"])
    assert 0.0 < metrics["map_medium"] <= 1.0 and metrics["queries_medium"] == 2
    result = runner.invoke(app, ["extract", str(root), "--out", str(tmp_path / "x.safetensors"),
                                 "--queries", "--model", str(model)])
    assert result.exit_code == 2 and "--gnd" in result.stderr
    (root / "jpg" / "img_3.jpg").unlink()
    result = runner.invoke(app, ["extract", str(root), "--out", str(tmp_path / "x.safetensors"), *common])
    assert result.exit_code == 1 and "'img_3' is not under" in result.stderr


def test_evaluate_index_choices(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(3, 16))
    labels = [0, 1, 2] * 40
    emb = centers[labels] + 0.1 * rng.normal(size=(120, 16))
    path = _emb_files(tmp_path, "e", emb, labels, [f"e/{i}" for i in range(120)])
    results = {ix: _run(["evaluate", "--query", str(path), "--gallery", str(path), "--index", ix, "-q"])
               for ix in ("flat", "hnsw")}
    assert results["flat"]["recall@1"] == 1.0 and results["hnsw"]["recall@1"] >= 0.95
    result = runner.invoke(app, ["evaluate", "--query", str(path), "--gallery", str(path), "--index", "lsh"])
    assert result.exit_code == 2 and "'lsh' is unknown; choose one of ['flat', 'ivf', 'hnsw']" in " ".join(
        result.stderr.replace("│", " ").split())


def test_dataset_gldv2_writes_list_files(tmp_path: Path) -> None:
    from bctool.data import load_image_set

    (tmp_path / "train.csv").write_text("id,url,landmark_id\nabc123,http://x,7\nabd456,http://y,9\n")
    (tmp_path / "index.csv").write_text("id\nfff000\n")
    out = _run(["dataset", "gldv2", str(tmp_path / "train.csv"), "--images", str(tmp_path / "train"),
                "--out", str(tmp_path / "train.txt")])
    assert out == {"out": str(tmp_path / "train.txt"), "images": 2, "labelled": True}
    train = load_image_set(tmp_path / "train.txt")
    assert train.ids == ["train/a/b/c/abc123", "train/a/b/d/abd456"] and train.label_names == ("7", "9")
    index = _run(["dataset", "gldv2", str(tmp_path / "index.csv"), "--images", str(tmp_path / "index"),
                  "--out", str(tmp_path / "index.txt")])
    assert index["labelled"] is False and index["images"] == 1
    result = runner.invoke(app, ["dataset", "gldv2", str(tmp_path / "missing.csv"), "--images", "x",
                                 "--out", str(tmp_path / "o.txt")])
    assert result.exit_code == 1 and "Error:" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["train", "x", "--out", "y", "--arch", "resnet9"], "'resnet9' is unknown; choose one of ['auto'"),
    (["train", "x", "--out", "y", "--method", "bct2"], "'bct2' is unknown; choose one of ['advbct'"),
    (["train", "x", "--out", "y", "--amp", "fp8"], "'fp8' is unknown; choose one of ['off', 'bf16', 'fp16']"),
    (["train", "x", "--out", "y", "--head", "dot"], "'dot' is unknown; choose one of ['linear'"),
    (["train", "x", "--out", "y", "--lr", "nan"], "nan must be a positive, finite number"),
    (["train", "x", "--out", "y", "--lr", "-1"], "-1.0 must be a positive, finite number"),
    (["extract", "x", "-m", "y", "-o", "z", "--shard", "3/2"], "'3/2': I must lie in 0..N-1"),
    (["export", "x", "-o", "y", "-f", "tflite"], "'tflite' is unknown; choose one of ['onnx', 'torchscript']"),
    (["evaluate", "--query", "a", "--gallery", "b", "--index", "lsh"], "'lsh' is unknown; choose one of ['flat', 'ivf', 'hnsw']"),
    (["demo", "--method", "nope"], "'nope' is unknown; choose one of"),
])
def test_invalid_choices_are_usage_errors(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.stderr
    assert message in " ".join(result.stderr.replace("│", " ").split())


# The instant commands: they draw nothing on stderr, so -q is accepted (scripts pass it to every
# command) but hidden from their help. Every other command shows it and quiets something.
QUIET_HIDDEN = {"list", "methods", "plot", "backfill plan", "dataset gldv2"}


def test_every_command_takes_quiet_and_shows_it_where_it_quiets_something() -> None:
    commands = {name: cmd for name, cmd in _commands(typer.main.get_command(app)) if not hasattr(cmd, "commands")}
    assert QUIET_HIDDEN <= set(commands)
    for name, command in commands.items():
        quiet = [param for param in command.params if "--quiet" in getattr(param, "opts", [])]
        assert quiet and {"-q", "--quiet"} <= set(quiet[0].opts), f"`bctool {name}` does not take -q/--quiet"
        assert quiet[0].hidden == (name in QUIET_HIDDEN), name
        shown = runner.invoke(app, [*name.split(), "--help"]).stdout
        assert ("--quiet" in shown) == (name not in QUIET_HIDDEN), name
