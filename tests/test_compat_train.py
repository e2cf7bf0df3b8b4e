"""Compatible training end to end: every method from the CLI, the old side, resuming."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from bctool.checkpoint import load_checkpoint
from bctool.cli import app
from bctool.data import load_image_set, load_rgb
from bctool.data.transforms import EvalTransform, Preprocess
from bctool.embeddings import load_embeddings
from bctool.errors import ConfigError
from bctool.utils.interrupt import Interrupted
from bctool.train import TrainConfig, train
from bctool.train import loop as train_loop
from bctool.train.methods import METHODS
from bctool.train.old_side import OnTheFlyOld, PrecomputedOld, match_by_id
from bctool.train.state import state_path
from helpers import docs_page, tiny_train

runner = CliRunner()
TINY = tiny_train()


def _invoke(args: list[str]) -> dict:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, f"{args}: {result.stderr}{result.exception!r}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def old(emoji_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny old model and its embeddings of the new training list."""
    work = tmp_path_factory.mktemp("old")
    model = work / "old.safetensors"
    _invoke(["train", str(emoji_dir / "old_train.txt"), "--out", str(model), *TINY])
    emb = work / "old_train_emb.safetensors"
    _invoke(["extract", str(emoji_dir / "new_train.txt"), "-m", str(model), "-o", str(emb),
             "--workers", "0", "-q"])
    return {"model": model, "embeddings": emb, "work": work}


@pytest.mark.parametrize("method", METHODS.builtin_names())
def test_every_method_trains_from_the_cli(method: str, emoji_dir: Path, old: dict, tmp_path: Path) -> None:
    from bctool.train.methods import method_class

    out = tmp_path / "new.safetensors"
    # A method without an old side is given none (one would be refused, not ignored).
    side = ["--old-embeddings", str(old["embeddings"])] if method_class(method).needs_old_side else []
    summary = _invoke(["train", str(emoji_dir / "new_train.txt"), "--out", str(out), *side, "--method", method, *TINY])
    assert summary["method"] == method
    parts = set(METHODS.entry(method).declares["parts"])
    assert set(summary["final"]) == {"cls", "loss"} | parts
    total = summary["final"]["cls"] + sum(summary["final"][p] for p in parts)
    assert summary["final"]["loss"] == pytest.approx(total, rel=1e-4)
    ckpt = load_checkpoint(out)
    assert ckpt.extra["method"] == method
    assert not state_path(out).exists()  # removed once the run finished
    from bctool.train.methods import resolve_params

    # Every parameter of the method is recorded, defaults included.
    assert ckpt.train_config["method_params"] == vars(resolve_params(method))


def test_method_parameters_are_options_recorded_in_the_checkpoint(emoji_dir: Path, old: dict, tmp_path: Path) -> None:
    out = tmp_path / "new.safetensors"
    _invoke(["train", str(emoji_dir / "new_train.txt"), "--out", str(out), "--old-embeddings", str(old["embeddings"]),
             "--method", "hotrefresh", "--param", "negatives=3", "--param", "temperature=0.05", *TINY])
    assert load_checkpoint(out).train_config["method_params"] == {"negatives": 3, "temperature": 0.05}
    _invoke(["train", str(emoji_dir / "new_train.txt"), "--out", str(out), "--old-embeddings", str(old["embeddings"]),
             "--method", "advbct", "--boundary-threshold", "0.5", *TINY])  # the older spelling of --param threshold
    assert load_checkpoint(out).train_config["method_params"] == {"threshold": 0.5}
    base = ["train", str(emoji_dir / "new_train.txt"), "--out", str(tmp_path / "x.safetensors"),
            "--old-embeddings", str(old["embeddings"]), *TINY]
    wrong = runner.invoke(app, [*base, "--method", "bct", "--param", "threshold=0.5"])
    assert wrong.exit_code == 1
    assert "method 'bct' has no parameter 'threshold'; its parameters: scale=30.0" in wrong.stderr
    bad = runner.invoke(app, [*base, "--method", "hotrefresh", "--param", "negatives=many"])
    assert bad.exit_code == 1 and "hotrefresh parameter negatives='many' is not a valid int" in bad.stderr
    shape = runner.invoke(app, [*base, "--method", "advbct", "--param", "threshold"])
    assert shape.exit_code == 2 and "expected NAME=VALUE" in shape.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_methods_command_lists_the_registry() -> None:
    from bctool.train.methods import METHODS
    from bctool.train.recipe import RECOMMENDED_METHOD

    output = _invoke(["list", "methods"])
    listed = output["kinds"]["methods"]
    assert [m["name"] for m in listed] == sorted(METHODS) and output["recommended"] == {"methods": RECOMMENDED_METHOD}
    advbct = next(m for m in listed if m["name"] == "advbct")
    assert advbct["params"] == {"threshold": 1.0} and advbct["description"].startswith("AdvBCT")
    assert all(m["description"] for m in listed)


def test_a_method_is_one_registered_class(emoji_dir: Path, old: dict, tmp_path: Path) -> None:
    """A user's method, defined and registered here, trains with no other change."""
    from dataclasses import dataclass

    import torch.nn.functional as F

    from bctool.train.methods import METHODS, Method, register_method

    @dataclass(frozen=True)
    class CosineParams:
        weight: float = 2.0

    @register_method("test-cosine")
    class CosineToOld(Method):
        """Test: 1 - cos(new, old) of each image."""

        Params = CosineParams
        parts = ("cosine",)

        def forward(self, embeddings, labels, ref_embeddings, ref_labels):  # noqa: ANN001, ANN201
            return {"cosine": self.params.weight * (1 - F.cosine_similarity(embeddings, ref_embeddings)).mean()}

    try:
        out = tmp_path / "new.safetensors"
        summary = _invoke(["train", str(emoji_dir / "new_train.txt"), "--out", str(out), "--old-embeddings",
                           str(old["embeddings"]), "--method", "test-cosine", "--param", "weight=0.5", *TINY])
        assert set(summary["final"]) == {"cls", "cosine", "loss"}
        assert load_checkpoint(out).train_config["method_params"] == {"weight": 0.5}
        CosineToOld.parts = ("cos",)  # a part it does not return: refused on the first batch, by name
        wrong = runner.invoke(app, ["train", str(emoji_dir / "new_train.txt"), "--out", str(tmp_path / "w.safetensors"),
                                    "--old-embeddings", str(old["embeddings"]), "--method", "test-cosine", *TINY])
        assert wrong.exit_code == 1
        assert "method 'test-cosine' returned the loss parts ['cosine'] but declares ['cos']" in wrong.stderr
    finally:
        del METHODS["test-cosine"]


def test_the_recommended_recipe_is_the_default_with_an_old_side(emoji_dir: Path, old: dict, tmp_path: Path) -> None:
    from bctool.checkpoint import file_sha256
    from bctool.train.recipe import COLD_LR, RECOMMENDED_METHOD, WARM_LR

    def trained(name: str, *args: str) -> dict:
        summary = _invoke(["train", str(emoji_dir / "new_train.txt"), "--out", str(tmp_path / name), *args, *TINY])
        return {"method": summary["method"], **load_checkpoint(tmp_path / name).train_config}

    # The old embeddings name their checkpoint: warm-start from it, at the warm learning rate.
    recipe = trained("n.safetensors", "--old-embeddings", str(old["embeddings"]))
    assert (recipe["method"], recipe["lr"]) == (RECOMMENDED_METHOD, WARM_LR)
    assert recipe["init_from"]["sha256"] == file_sha256(old["model"])
    assert (recipe["regime"], recipe["augment"]) == ("bctool", "none")  # the clean views its old embeddings are of
    fresh = trained("f.safetensors", "--old-embeddings", str(old["embeddings"]), "--init-from", "none")
    assert (fresh["method"], fresh["lr"], fresh["init_from"]) == (RECOMMENDED_METHOD, COLD_LR, None)
    explicit = trained("e.safetensors", "--old-model", str(old["model"]), "--lr", "0.05", "--method", "bct")
    assert (explicit["lr"], explicit["init_from"]["sha256"]) == (0.05, file_sha256(old["model"]))
    assert explicit["augment"] == "crop"  # the old model runs on the very crops the new model sees
    plain = trained("p.safetensors")
    assert (plain["method"], plain["lr"], plain["init_from"]) == ("independent", COLD_LR, None)


def test_warm_start_is_skipped_when_the_old_checkpoint_is_gone_or_does_not_fit(
    emoji_dir: Path, old: dict, tmp_path: Path
) -> None:
    from bctool.train.defaults import resolve_defaults
    from bctool.train.recipe import COLD_LR

    other = resolve_defaults(_config(old, arch="resnet18", embedding_dim=256, init_from="auto", lr=None)).config
    assert (other.model.init_from, other.optim.lr) == (None, COLD_LR)  # the old one is small
    moved = tmp_path / "emb.safetensors"
    moved.write_bytes(old["embeddings"].read_bytes())
    gone = old["work"] / "gone.safetensors"
    gone.write_bytes(old["model"].read_bytes())
    emb = load_embeddings(moved)
    emb.model["path"] = str(gone)  # made by a checkpoint that is then removed
    from bctool.embeddings import save_embeddings

    save_embeddings(emb, moved)
    gone.unlink()
    resolved = resolve_defaults(_config(old, old_embeddings=str(moved), init_from="auto", lr=None)).config
    assert resolved.model.init_from is None


def test_old_model_on_the_fly(emoji_dir: Path, old: dict, tmp_path: Path) -> None:
    summary = _invoke(["train", str(emoji_dir / "new_train.txt"), "--out", str(tmp_path / "n.safetensors"),
                       "--old-model", str(old["model"]), "--method", "bct", *TINY])
    assert set(summary["final"]) == {"cls", "bct", "loss"}
    assert "old checkpoint head" in json.dumps(load_checkpoint(tmp_path / "n.safetensors").extra)


def test_on_the_fly_old_equals_precomputed_embeddings(emoji_dir: Path, old: dict) -> None:
    images = load_image_set(emoji_dir / "new_train.txt")
    ckpt = load_checkpoint(old["model"])
    table = match_by_id(images, load_embeddings(old["embeddings"]), "old")
    transform = EvalTransform(ckpt.preprocess)
    batch = torch.stack([transform(load_rgb(images.records[i].path)) for i in range(4)])
    idx = torch.arange(4)
    fly = OnTheFlyOld(ckpt, ckpt.preprocess)
    fly.train()  # must stay in eval mode
    torch.testing.assert_close(fly(batch, idx), PrecomputedOld(table)(batch, idx), rtol=1e-4, atol=1e-4)
    # A new model with another normalisation gets the old model's own inputs back.
    other = Preprocess(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    renorm = (batch * torch.tensor(ckpt.preprocess.std).view(1, 3, 1, 1)
              + torch.tensor(ckpt.preprocess.mean).view(1, 3, 1, 1) - 0.5) / 0.5
    torch.testing.assert_close(OnTheFlyOld(ckpt, other)(renorm, idx), fly(batch, idx), rtol=1e-4, atol=1e-4)


def test_training_image_without_old_embedding_is_named(emoji_dir: Path, old: dict, tmp_path: Path) -> None:
    partial = old["work"] / "old_only.safetensors"
    _invoke(["extract", str(emoji_dir / "old_train.txt"), "-m", str(old["model"]), "-o", str(partial),
             "--workers", "0", "-q"])
    result = runner.invoke(app, ["train", str(emoji_dir / "new_train.txt"), "--out",
                                 str(tmp_path / "n.safetensors"), "--old-embeddings", str(partial), *TINY])
    assert result.exit_code == 1
    n_new, n_old = len(load_image_set(emoji_dir / "new_train.txt")), len(load_image_set(emoji_dir / "old_train.txt"))
    assert f"{n_new - n_old} of {n_new} training images have no old embedding" in result.stderr
    assert "images/google/" in result.stderr and "bctool extract" in result.stderr


def test_dimension_mismatch_names_both(emoji_dir: Path, tmp_path: Path, old: dict) -> None:
    result = runner.invoke(app, ["train", str(emoji_dir / "new_train.txt"), "--out",
                                 str(tmp_path / "n.safetensors"), "--old-embeddings", str(old["embeddings"]),
                                 "--embedding-dim", "64", *TINY])
    assert result.exit_code == 1
    assert "dimension 256" in result.stderr and "is 64" in result.stderr and "--embedding-dim 256" in result.stderr


def test_method_needs_an_old_side() -> None:
    with pytest.raises(ConfigError, match="method 'bct' trains against an old model: pass --old-embeddings"):
        TrainConfig.from_options(method="bct")
    with pytest.raises(ConfigError, match=r"unknown method 'bct2'; choose one of \['advbct'"):
        TrainConfig.from_options(method="bct2", old_embeddings="x")


def _config(old: dict, **kw: object) -> TrainConfig:
    base = TrainConfig.from_options(arch="small", image_size=32, epochs=3, batch_size=16, workers=0, device="cpu",
                       method="advbct", old_embeddings=str(old["embeddings"]))
    return base.replace(**kw)


def _interrupted_run(images, config: TrainConfig, out: Path, epochs_done: int) -> None:  # noqa: ANN001
    """Run ``train`` but kill it (KeyboardInterrupt) as epoch ``epochs_done`` (0-based) begins."""
    real_train = train_loop._EpochRun.train

    def dies(self, *args: object, **kwargs: object) -> bool:  # noqa: ANN001
        if self.epoch == epochs_done:
            raise KeyboardInterrupt
        return real_train(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_loop._EpochRun, "train", dies)
        with pytest.raises(KeyboardInterrupt):
            train(images, config, out)


def _assert_same_weights(a_path: Path, b_path: Path) -> None:
    a, b = load_file(str(a_path)), load_file(str(b_path))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_after_interruption_gives_the_same_model(emoji_dir: Path, old: dict, tmp_path: Path) -> None:
    images = load_image_set(emoji_dir / "new_train.txt")
    straight = tmp_path / "straight.safetensors"
    reference = train(images, _config(old), straight)

    interrupted = tmp_path / "interrupted.safetensors"
    _interrupted_run(images, _config(old), interrupted, epochs_done=2)
    assert state_path(interrupted).exists() and not interrupted.exists()
    result = train(images, _config(old, resume=True), interrupted)
    assert result.resumed_from_epoch == 2 and len(result.history) == 3
    _assert_same_weights(straight, interrupted)

    # SIGTERM in the middle of epoch 2: the loop finishes the step, saves and stops; --resume
    # continues inside the epoch (the data order and the random stream are restored).
    stopped = tmp_path / "stopped.safetensors"
    real_lr = train_loop.lr_at
    calls = []

    def signal_at_step_5(step: int, *args: object) -> float:
        calls.append(step)
        if step == 5 and len(calls) == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr(step, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_loop, "lr_at", signal_at_step_5)
        with pytest.raises(Interrupted, match=r"SIGTERM: stopped after step 6 of 9 \(epoch 2\)"):
            train(images, _config(old), stopped)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    result = train(images, _config(old, resume=True), stopped)
    assert result.resumed_from_epoch == 1
    for got, want in zip(result.history, reference.history, strict=True):  # the split epoch's means too
        assert got == pytest.approx(want, rel=1e-6)
    _assert_same_weights(straight, stopped)


def test_save_every_steps_keeps_a_mid_epoch_state(emoji_dir: Path, old: dict, tmp_path: Path) -> None:
    images = load_image_set(emoji_dir / "new_train.txt")
    saved: list[dict] = []
    real_save = train_loop.save_train_state

    def spy(path, modules, optimizer, scaler, generator_state, progress, config) -> None:  # noqa: ANN001
        saved.append(json.loads(json.dumps(progress)))
        real_save(path, modules, optimizer, scaler, generator_state, progress, config)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_loop, "save_train_state", spy)
        train(images, _config(old, save_every=2), tmp_path / "m.safetensors")
    # 3 steps per epoch: saves after steps 2, 4 and 8 (mid-epoch) and after each epoch (3, 6, 9).
    assert [(s["epoch"], s["step"], (s["partial"] or {}).get("batches")) for s in saved] == [
        (0, 2, 2), (1, 3, None), (1, 4, 1), (2, 6, None), (2, 8, 2), (3, 9, None)]


def test_resume_refuses_changed_options_and_missing_state(emoji_dir: Path, old: dict, tmp_path: Path) -> None:
    images = load_image_set(emoji_dir / "new_train.txt")
    with pytest.raises(ConfigError, match="no training state at .*start without --resume"):
        train(images, _config(old, resume=True), tmp_path / "none.safetensors")
    out = tmp_path / "m.safetensors"
    _interrupted_run(images, _config(old), out, epochs_done=1)
    with pytest.raises(ConfigError, match=r"options differ .*lr: 0.03 -> 0.05"):
        train(images, _config(old, resume=True, lr=0.05), out)


def test_old_stats_ignore_classes_the_old_model_never_saw(emoji_dir: Path, old: dict) -> None:
    """The old checkpoint's class list travels in its embeddings file and picks the old classes."""
    emb = load_embeddings(old["embeddings"])
    old_names = set(load_image_set(emoji_dir / "old_train.txt").label_names)
    assert set(emb.model["trained_classes"]) == old_names
    assert len(old_names) < len(emb.label_names)


def test_bf16_autocast_trains_on_the_cpu(emoji_dir: Path, old: dict, tmp_path: Path) -> None:
    summary = _invoke(["train", str(emoji_dir / "new_train.txt"), "--out", str(tmp_path / "n.safetensors"),
                       "--old-embeddings", str(old["embeddings"]), "--amp", "bf16", *TINY])
    assert all(value == value and abs(value) < 1e4 for value in summary["final"].values())  # finite


def test_unknown_amp_mode_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"--amp 'fp8' is unknown; choose one of \['off', 'bf16', 'fp16'\]"):
        TrainConfig.from_options(amp="fp8")


def test_compat_weight_scales_every_part_and_the_total() -> None:
    from torch import nn

    from bctool.models import ModelConfig, create_model
    from bctool.train.tasks import CompatibleTask

    class Fixed(nn.Module):
        def set_progress(self, *args: int) -> None:
            pass

        def forward(self, emb, labels, ref, ref_labels):  # noqa: ANN001, ANN202
            return {"a": emb.pow(2).mean(), "b": (emb - ref).abs().mean()}

    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="small", embedding_dim=8, num_classes=3))
    images, labels, idx = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]), torch.arange(4)
    old = PrecomputedOld(torch.randn(4, 8))
    one = CompatibleTask(model, old, Fixed(), weight=1.0).eval()(images, labels, idx)
    three = CompatibleTask(model, old, Fixed(), weight=3.0).eval()(images, labels, idx)
    for part in ("a", "b"):
        torch.testing.assert_close(three[part], 3 * one[part])
    torch.testing.assert_close(three["loss"], one["cls"] + 3 * (one["a"] + one["b"]))


def test_bct_old_head_mapping_keeps_only_old_classes() -> None:
    from bctool.train.old_side import _head_mapping

    mask = torch.tensor([True, False, True, True])
    mapping = _head_mapping(("a", "b", "c", "d"), ["c", "a", "b"], mask)
    # "b" is in the old head but not an old class here; "d" is old but unknown to the head.
    assert mapping.tolist() == [1, -1, 0, -1]


def test_resume_refuses_other_data(emoji_dir: Path, old: dict, tmp_path: Path) -> None:
    images = load_image_set(emoji_dir / "new_train.txt")
    out = tmp_path / "m.safetensors"
    _interrupted_run(images, _config(old), out, epochs_done=1)
    fewer = replace(images, records=images.records[:-2])
    with pytest.raises(ConfigError, match=r"options differ .*data:"):
        train(fewer, _config(old, resume=True), out)


def test_diagnostics_measure_gradient_norms_at_the_embedding() -> None:
    """grad_PART is the norm of d PART / d embedding: for sum(f^2) it is 2|f|."""
    from bctool.models import ModelConfig, create_model
    from bctool.train.compat import compute_old_stats
    from bctool.train.methods import MethodContext, create_method
    from bctool.train.tasks import CompatibleTask

    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="small", embedding_dim=8, num_classes=3))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    stats = compute_old_stats(torch.randn(6, 8), labels, 3, torch.tensor([True, True, False]))
    compat = create_method("advbct", MethodContext(stats=stats, model=model))
    task = CompatibleTask(model, PrecomputedOld(torch.randn(6, 8)), compat, diagnose=True)
    embedding = model.embed(torch.randn(6, 3, 32, 32))
    facts = task.diagnostics(embedding, {"square": embedding.pow(2).sum()})
    torch.testing.assert_close(facts["grad_square"], 2 * embedding.detach().norm())
    parts = task(torch.randn(6, 3, 32, 32), labels, torch.arange(6))
    assert {"grad_cls", "grad_adv", "grad_bound", "disc_acc", "disc_acc_new", "violating", "radius_mean"} <= set(parts)
    assert 0 <= float(parts["disc_acc"]) <= 1 and 0 <= float(parts["violating"]) <= 1
    torch.testing.assert_close(parts["loss"], parts["cls"] + parts["adv"] + parts["bound"])


def test_diagnostics_change_nothing_and_write_the_final_radii(emoji_dir: Path, old: dict, tmp_path: Path) -> None:
    images = load_image_set(emoji_dir / "new_train.txt")
    plain, diagnosed = tmp_path / "plain.safetensors", tmp_path / "diagnosed.safetensors"
    train(images, _config(old, epochs=1), plain)
    result = train(images, _config(old, epochs=1, diagnostics=True, log_dir=str(tmp_path / "log")), diagnosed)
    _assert_same_weights(plain, diagnosed)  # side measurements do not touch the training
    assert {"grad_cls", "grad_bound", "disc_acc"} <= set(result.final)
    summary = json.loads((tmp_path / "log" / "compat.json").read_text())
    radius_max, radius = torch.tensor(summary["radius_max"]), torch.tensor(summary["radius"])
    assert summary["threshold"] == 1.0 and len(radius) == len(radius_max) > 0
    # r̃ lies between r_max and T (here every r_max is below T = 1)
    assert bool((radius_max < 1).all() and (radius >= radius_max).all() and (radius <= 1).all())


def test_readme_lists_every_registered_method_and_parameter() -> None:
    from bctool.train.methods import describe_methods

    page = docs_page("guides/training.md")
    tables = page[page.index("| method | compatibility term |"):page.index("A method of your own")]
    for method in describe_methods():
        assert f"`{method['name']}`" in tables, method["name"]
        for name, default in method["params"].items():
            assert f"`{name}` {default:g}" in tables, (method["name"], name)
