"""One place resolves every training default: a library ``TrainConfig()`` and ``bctool train``
resolve the same values, each recorded with where it came from; a checkpoint's recorded options,
given back with ``--config``, repeat its run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bctool.checkpoint import load_checkpoint
from bctool.cli import app
from bctool.train import TrainConfig
from bctool.train import loop as train_loop
from bctool.train.defaults import Resolved, resolve_defaults
from bctool.train.recipe import COLD_LR, RECOMMENDED_METHOD, WARM_LR

runner = CliRunner()
BASE = {"image_size": 32, "epochs": 1, "batch_size": 16, "workers": 0, "device": "cpu"}
CLI_BASE = ["--image-size", "32", "--epochs", "1", "--batch-size", "16", "--workers", "0", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def old(emoji_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An old model and its embeddings of the new training list."""
    work = tmp_path_factory.mktemp("defaults")
    model, emb = work / "old.safetensors", work / "old_emb.safetensors"
    for args in (["train", str(emoji_dir / "old_train.txt"), "--out", str(model), "--embedding-dim", "16", *CLI_BASE],
                 ["extract", str(emoji_dir / "new_train.txt"), "--model", str(model), "--out", str(emb), "--workers", "0",
                  "-q"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.stderr
    return {"model": model, "embeddings": emb}


def _resolved_by_cli(args: list[str], monkeypatch: pytest.MonkeyPatch) -> Resolved:
    """What `bctool train ARGS` resolves, caught where training would start."""
    seen: list[Resolved] = []

    class Caught(BaseException):  # past the command's error handling
        pass

    def catch(images, resolved, out, progress):  # noqa: ANN001, ANN202
        seen.append(resolved)
        raise Caught

    monkeypatch.setattr(train_loop, "_train", catch)
    with pytest.raises(Caught):
        runner.invoke(app, args, catch_exceptions=False)
    return seen[0]


STARTS = {  # name: (library options, command-line options) of the same run
    "no old side": (lambda o: {}, lambda o: []),
    "old embeddings, warm": (lambda o: {"old_embeddings": str(o["embeddings"]), "embedding_dim": 16},
                             lambda o: ["--old-embeddings", str(o["embeddings"]), "--embedding-dim", "16"]),
    "old embeddings, fresh": (lambda o: {"old_embeddings": str(o["embeddings"]), "init_from": None},
                              lambda o: ["--old-embeddings", str(o["embeddings"]), "--init-from", "none"]),
    "old model": (lambda o: {"old_model": str(o["model"]), "embedding_dim": 16},
                  lambda o: ["--old-model", str(o["model"]), "--embedding-dim", "16"]),
}


@pytest.mark.parametrize("regime", ["bctool", "paper"])
@pytest.mark.parametrize("start", sorted(STARTS))
def test_the_library_and_the_command_line_resolve_the_same_values(
    regime: str, start: str, old: dict[str, Path], emoji_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    library_options, cli_options = STARTS[start]
    library = resolve_defaults(TrainConfig.from_options(**BASE, regime=regime, **library_options(old))).config
    cli = _resolved_by_cli(["train", str(emoji_dir / "new_train.txt"), "--out", str(tmp_path / "m.safetensors"),
                            "--regime", regime, *CLI_BASE, *cli_options(old)], monkeypatch).config
    assert library == cli
    concrete = cli.to_dict()
    assert None not in (concrete["method"], concrete["lr"], concrete["augment"], concrete["schedule"])
    assert concrete["arch"] == "small" and concrete["init_from"] != "auto"


def test_each_value_records_where_it_came_from(old: dict[str, Path], emoji_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    result = runner.invoke(app, ["train", str(emoji_dir / "new_train.txt"), "--out", str(out), "--old-embeddings",
                                 str(old["embeddings"]), "--embedding-dim", "16", *CLI_BASE])
    assert result.exit_code == 0, result.stderr
    sources = json.loads(result.stdout)["defaults_from"]
    assert (sources["method"], sources["init_from"], sources["lr"]) == ("recipe", "recipe", "recipe")
    assert (sources["augment"], sources["schedule"], sources["head_bias"]) == ("regime bctool",) * 3
    assert (sources["arch"], sources["epochs"], sources["momentum"]) == ("image size", "given", "default")
    record = load_checkpoint(out).train_config
    assert record["defaults_from"] == sources
    assert (record["method"], record["lr"], record["arch"]) == (RECOMMENDED_METHOD, WARM_LR, "small")


def test_a_library_config_left_open_gets_the_recipe() -> None:
    resolved = resolve_defaults(TrainConfig())
    assert (resolved.config.compat.method, resolved.config.optim.lr, resolved.config.model.init_from) == (
        "independent", COLD_LR, None)
    assert resolved.config.model.arch == "resnet18" and resolved.sources["arch"] == "image size"
    assert resolve_defaults(resolved.config).config == resolved.config  # resolving twice changes nothing


def test_a_checkpoints_recorded_options_repeat_its_run(old: dict[str, Path], emoji_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    first, again = tmp_path / "first.safetensors", tmp_path / "again.safetensors"
    data = str(emoji_dir / "new_train.txt")
    result = runner.invoke(app, ["train", data, "--out", str(first), "--old-embeddings", str(old["embeddings"]),
                                 "--embedding-dim", "16", "--method", "advbct", "--param", "threshold=0.7",
                                 "--head", "cosine", "--seed", "3", *CLI_BASE])
    assert result.exit_code == 0, result.stderr
    result = runner.invoke(app, ["train", data, "--out", str(again), "--config", str(first), "-q"])
    assert result.exit_code == 0, result.stderr
    a, b = load_file(str(first)), load_file(str(again))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    record = load_checkpoint(again).train_config
    assert (record["method_params"]["threshold"], record["head"], record["seed"]) == (0.7, "cosine", 3)


def test_a_toml_file_sets_options_and_the_command_line_wins(old: dict[str, Path], emoji_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    options = tmp_path / "run.toml"
    options.write_text(f'method = "advbct"\nembedding-dim = 16\nepochs = 4\nold_embeddings = "{old["embeddings"]}"\n'
                       "[method_params]\nthreshold = 0.5\n")
    resolved = _resolved_by_cli(["train", str(emoji_dir / "new_train.txt"), "--out", str(tmp_path / "m.safetensors"),
                                 "--config", str(options), "--epochs", "2", "-q"], monkeypatch)
    config = resolved.config
    assert (config.compat.method, config.model.embedding_dim, config.optim.epochs) == ("advbct", 16, 2)
    assert config.compat.method_params["threshold"] == 0.5 and resolved.sources["epochs"] == "given"
    options.write_text("epoch = 3\n")
    result = runner.invoke(app, ["train", str(emoji_dir / "new_train.txt"), "--out", str(tmp_path / "m.safetensors"),
                                 "--config", str(options)])
    assert result.exit_code == 1 and "sets unknown option(s) ['epoch']" in result.stderr


def test_the_deprecated_boundary_threshold_is_hidden_and_warns(old: dict[str, Path], emoji_dir: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "--boundary-threshold" not in runner.invoke(app, ["train", "--help"]).stdout
    resolved = _resolved_by_cli(["train", str(emoji_dir / "new_train.txt"), "--out", str(tmp_path / "m.safetensors"),
                                 "--old-embeddings", str(old["embeddings"]), "--method", "advbct",
                                 "--boundary-threshold", "0.6", *CLI_BASE], monkeypatch)
    assert resolved.config.compat.method_params["threshold"] == 0.6


def test_the_former_no_augment_flag_still_means_augment_none(old: dict[str, Path], emoji_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    assert "--no-augment" not in runner.invoke(app, ["train", "--help"]).stdout
    resolved = _resolved_by_cli(["train", str(emoji_dir / "new_train.txt"), "--out", str(tmp_path / "m.safetensors"),
                                 "--no-augment", *CLI_BASE], monkeypatch)
    assert resolved.config.optim.augment == "none" and resolved.sources["augment"] == "given"
    result = runner.invoke(app, ["train", str(emoji_dir / "new_train.txt"), "--out", str(tmp_path / "m.safetensors"),
                                 "--no-augment", "--augment", "crop"])
    assert result.exit_code == 2 and "contradict" in result.stderr


def test_trainable_auto_is_the_neck_for_a_pretrained_start_on_the_cpu(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from bctool.checkpoint import save_checkpoint
    from bctool.data.transforms import Preprocess
    from bctool.models import ModelConfig, create_model

    cpu = {**BASE, "arch": "small"}
    scratch = resolve_defaults(TrainConfig.from_options(**cpu))
    assert (scratch.config.optim.trainable, scratch.sources["trainable"]) == ("all", "default")
    weights = tmp_path / "backbone.safetensors"  # a backbone weights file is a pretrained start
    from safetensors.torch import save_file

    save_file(create_model(ModelConfig(arch="small", embedding_dim=8)).backbone.state_dict(), str(weights))
    pretrained = resolve_defaults(TrainConfig.from_options(**cpu, pretrained=str(weights)))
    assert (pretrained.config.optim.trainable, pretrained.sources["trainable"]) == (
        "neck", "recipe (pretrained start on the CPU)")
    assert pretrained.config.optim.augment == "none" and pretrained.sources["augment"].startswith("recipe")
    assert scratch.config.optim.augment == "crop"  # a backbone that trains sees the regime's crops
    for trained, expected in (("neck", "neck"), ("all", "all")):  # a warm start keeps a neck-only model's choice
        old = tmp_path / f"old-{trained}.safetensors"
        save_checkpoint(old, create_model(ModelConfig(arch="small", embedding_dim=8, num_classes=2)),
                        Preprocess(image_size=32), ["a", "b"], train_config={"trainable": trained})
        warm = resolve_defaults(TrainConfig.from_options(**cpu, embedding_dim=8, init_from=str(old)))
        assert warm.config.optim.trainable == expected
    given = resolve_defaults(TrainConfig.from_options(**cpu, pretrained=str(weights), trainable="all"))
    assert given.config.optim.trainable == "all" and given.sources["trainable"] == "given"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # on a GPU the whole backbone trains
    gpu = resolve_defaults(TrainConfig.from_options(**{**cpu, "device": "auto"}, pretrained=str(weights)))
    assert (gpu.config.optim.trainable, gpu.sources["trainable"]) == ("all", "device")
