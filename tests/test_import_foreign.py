"""An old model made outside bctool (examples/foreign: a plain-torch ResNet-18 with a projection,
its own preprocessing, its state dict, ONNX and TorchScript exports, and the gallery it wrote as
.npy) goes through `import`, `verify`, `extract` and `train --old-model`."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from typer.testing import CliRunner

from bctool.cli import app
from bctool.data.transforms import Preprocess, parse_background, parse_channels
from bctool.embeddings import load_embeddings
from bctool.errors import ModelError
from bctool.models.imported import Projection, import_pretrained
from bctool.train.warm_start import refuse_model_file

runner = CliRunner()
EXAMPLE = Path(__file__).parents[1] / "examples" / "foreign" / "foreign_model.py"
SIZE = 32
# The user's preprocessing, in bctool's words.
RIGHT = ["--image-size", str(SIZE), "--resize", "torchvision", "--crop", "0.875", "--interpolation", "bicubic",
         "--mean", "clip", "--std", "clip"]


def _foreign():  # noqa: ANN202 - the example module
    spec = importlib.util.spec_from_file_location("foreign_model", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["foreign_model"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def old_system(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Images of several shapes (transparent backgrounds, two classes), the foreign network, its
    files and the gallery it embedded."""
    fm = _foreign()
    root = tmp_path_factory.mktemp("foreign")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(16):
        w, h = int(rng.integers(30, 90)), int(rng.integers(30, 90))
        img = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            draw.ellipse([x0, y0, x0 + int(rng.integers(5, w)), y0 + int(rng.integers(5, h))],
                         fill=tuple(int(v) for v in rng.integers(0, 255, 4)))
        path = root / "images" / ("x" if i < 8 else "y") / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        paths.append(path)
    pre = fm.Preprocessing(size=SIZE)
    net = fm.make_net(fm.inputs(paths, pre))
    ids = [str(p.relative_to(root / "images").with_suffix("")) for p in paths]
    embeddings = fm.embed(net, paths, pre)
    fm.write_stored(embeddings, ids, root / "stored.npy", [i.split("/")[0] for i in ids])
    fm.save_state_dict(net, root / "weights.pth")
    fm.export_torchscript(net, root / "net.pt", SIZE)
    fm.export_onnx(net, root / "net.onnx", SIZE)
    return {"root": root, "net": net, "ids": ids, "embeddings": embeddings, "images": root / "images"}


def _json(args: list[str], code: int = 0) -> dict:
    result = runner.invoke(app, [*args, "-q"])
    assert result.exit_code == code, result.stderr or result.stdout
    return json.loads(result.stdout)


def _by_id(path: Path, ids: list[str]) -> np.ndarray:
    emb = load_embeddings(path)
    order = [list(emb.ids).index(i) for i in ids]
    return np.asarray(emb.embeddings)[order]


def test_a_state_dict_with_its_projection_reproduces_the_users_gallery(old_system: dict, tmp_path: Path) -> None:
    root = old_system["root"]
    out = tmp_path / "old.safetensors"
    result = _json(["import", "resnet18", "--pretrained", str(root / "weights.pth"), "--projection", "fc",
                    "--projection-norm", "fc_norm", *RIGHT, "--background", "white", "--out", str(out),
                    "--check", str(root / "stored.npy"), "--data", str(old_system["images"]), "--workers", "0"])
    assert result["neck"]["kind"] == "projection" and result["neck"]["bias"] and result["neck"]["batchnorm"]
    assert result["preprocess"] == {"image_size": SIZE, "mean": list(parse_channels("clip", "mean")),
                                    "std": list(parse_channels("clip", "std")), "interpolation": "bicubic",
                                    "resize": "torchvision", "crop": "center", "background": [255, 255, 255],
                                    "crop_fraction": 0.875}
    assert result["check"]["passed"] and result["check"]["min"] >= 0.9999
    # The checkpoint extracts the user's rows (raw, before normalisation) to float rounding.
    emb = tmp_path / "emb.safetensors"
    _json(["extract", str(old_system["images"]), "-m", str(out), "--out", str(emb), "--workers", "0"])
    got, want = _by_id(emb, old_system["ids"]), old_system["embeddings"]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize(("wrong", "named"), [
    ({"--interpolation": "bilinear"}, "--interpolation bicubic"),
    ({"--mean": "imagenet", "--std": "imagenet"}, "--mean clip --std clip"),
    ({"--resize": "shorter-side"}, "--resize torchvision"),
    ({"--crop": "1"}, "--crop 0.875"),
    ({"--background": "black"}, "--background white"),
])
def test_a_wrong_preprocessing_step_is_caught_and_named(old_system: dict, tmp_path: Path, wrong: dict[str, str],
                                                        named: str) -> None:
    """verify (and import --check) exit 1 and name the one change that reproduces the rows."""
    root, out = old_system["root"], tmp_path / "old.safetensors"
    steps = dict(zip(RIGHT[::2], RIGHT[1::2])) | wrong
    args = [part for item in steps.items() for part in item]
    imported = _json(["import", "resnet18", "--pretrained", str(root / "weights.pth"), "--projection", "fc",
                      "--projection-norm", "fc_norm", *args, "--out", str(out), "--check", str(root / "stored.npy"),
                      "--data", str(old_system["images"]), "--workers", "0"], code=1)
    report = imported["check"]  # `bctool verify`'s report (its exit codes: tests/test_verify.py)
    assert out.exists() and not report["passed"] and report["min"] < 0.99
    assert report["diagnosis"][0]["change"] == named and report["diagnosis"][0]["passes"]


def test_a_projection_from_a_second_file_with_a_bias_and_no_batchnorm(old_system: dict, tmp_path: Path) -> None:
    """The Linear's bias becomes the neck's shift: the embedding is the projection's output."""
    root, net = old_system["root"], old_system["net"]
    state = {f"module.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc")}
    save_file(state, tmp_path / "body.safetensors")  # a wrapper prefix, as DataParallel leaves
    torch.manual_seed(1)
    proj = torch.nn.Linear(512, 24)
    save_file({"head.proj.weight": proj.weight.detach().clone(), "head.proj.bias": proj.bias.detach().clone()},
              tmp_path / "proj.safetensors")
    result = import_pretrained("resnet18", str(tmp_path / "body.safetensors"), tmp_path / "m.safetensors",
                               projection=Projection("head.proj", file=str(tmp_path / "proj.safetensors")),
                               image_size=SIZE)
    assert result.embedding_dim == 24 and result.neck["bias"] and not result.neck["batchnorm"]
    from bctool.checkpoint import load_checkpoint

    model = load_checkpoint(tmp_path / "m.safetensors").model
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        pooled = torch.nn.functional.max_pool2d(torch.relu(net.bn1(net.conv1(x))), 3, 2, 1)
        pooled = net.layer4(net.layer3(net.layer2(net.layer1(pooled)))).mean(dim=(2, 3))
        assert torch.allclose(model.embed(x), proj(pooled), atol=1e-5)
    assert root.exists()


def test_a_projection_that_is_missing_or_misshapen_names_what_the_file_holds(old_system: dict,
                                                                             tmp_path: Path) -> None:
    weights = str(old_system["root"] / "weights.pth")
    with pytest.raises(ModelError, match=r"no head\.weight.*\['fc'\]"):
        import_pretrained("resnet18", weights, tmp_path / "a.safetensors", projection=Projection("head"))
    save_file({"p.weight": torch.zeros(8, 256)}, tmp_path / "p.safetensors")
    with pytest.raises(ModelError, match=r"maps 256 features to 8.*gives 512"):
        import_pretrained("resnet18", weights, tmp_path / "b.safetensors",
                          projection=Projection("p", file=str(tmp_path / "p.safetensors")))
    save_file({"p.weight": torch.zeros(8, 512), "n.weight": torch.ones(8), "n.bias": torch.zeros(8),
               "n.running_mean": torch.zeros(9), "n.running_var": torch.ones(8)}, tmp_path / "q.safetensors")
    with pytest.raises(ModelError, match=r"misshapen.*n\.running_mean \(9,\)"):
        import_pretrained("resnet18", weights, tmp_path / "c.safetensors",
                          projection=Projection("p", "n", file=str(tmp_path / "q.safetensors")))
    usage = runner.invoke(app, ["import", "resnet18", "--pretrained", weights, "--projection-norm", "n",
                                "--out", str(tmp_path / "d.safetensors")])
    assert usage.exit_code == 2 and "--projection PREFIX" in usage.stderr


@pytest.mark.parametrize("name", ["net.onnx", "net.pt"])
def test_onnx_and_torchscript_files_run_as_models(old_system: dict, tmp_path: Path, name: str) -> None:
    root, images = old_system["root"], old_system["images"]
    bare = runner.invoke(app, ["extract", str(images), "-m", str(root / name), "--out", str(tmp_path / "x.safetensors"),
                               "-q"])
    assert bare.exit_code == 1 and "bctool import" in bare.stderr and "records no preprocessing" in bare.stderr
    stamped = tmp_path / f"stamped{Path(name).suffix}"
    result = _json(["import", str(root / name), *RIGHT, "--out", str(stamped), "--check", str(root / "stored.npy"),
                    "--data", str(images), "--workers", "0"])
    assert result["format"] == ("onnx" if name.endswith("onnx") else "torchscript")
    assert result["check"]["passed"] and result["check"]["min"] >= 0.9999
    emb = tmp_path / "emb.safetensors"
    summary = _json(["extract", str(images), "-m", str(stamped), "--out", str(emb), "--workers", "0"])
    assert summary["model"]["arch"] == result["format"]
    got, want = _by_id(emb, old_system["ids"]), old_system["embeddings"]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    with pytest.raises(ModelError, match="no weights bctool can copy"):
        refuse_model_file(stamped)


def test_a_state_dict_or_extra_options_given_as_a_model_file_are_refused(old_system: dict, tmp_path: Path) -> None:
    root = old_system["root"]
    state_dict = runner.invoke(app, ["import", str(root / "weights.pth"), *RIGHT, "--out", str(tmp_path / "x.pt")])
    assert state_dict.exit_code == 2 and "bctool import ARCH --pretrained" in state_dict.stderr
    onnx = runner.invoke(app, ["import", str(root / "net.onnx"), *RIGHT, "--pretrained", "imagenet",
                               "--out", str(tmp_path / "x.onnx")])
    assert onnx.exit_code == 2 and "leave them out" in onnx.stderr
    no_size = runner.invoke(app, ["import", str(root / "net.pt"), "--out", str(tmp_path / "x.pt")])
    assert no_size.exit_code == 2 and "--image-size" in no_size.stderr
    wrong_kind = runner.invoke(app, ["import", str(root / "net.pt"), *RIGHT, "--out", str(tmp_path / "x.onnx")])
    assert wrong_kind.exit_code == 1 and "same kind" in wrong_kind.stderr


def test_an_imported_old_model_trains_a_compatible_model(old_system: dict, tmp_path: Path) -> None:
    """As --old-model: the imported checkpoint is also the warm start; a model file is run as a
    black box, with a fresh start."""
    root, images = old_system["root"], old_system["images"]
    old = tmp_path / "old.safetensors"
    _json(["import", "resnet18", "--pretrained", str(root / "weights.pth"), "--projection", "fc",
           "--projection-norm", "fc_norm", *RIGHT, "--out", str(old)])
    stamped = tmp_path / "old.pt"
    _json(["import", str(root / "net.pt"), *RIGHT, "--out", str(stamped)])
    tiny = ["--epochs", "1", "--image-size", str(SIZE), "--batch-size", "8", "--workers", "0"]
    warm = _json(["train", str(images), "--out", str(tmp_path / "warm.safetensors"), "--old-model", str(old),
                  "--arch", "resnet18", "--embedding-dim", "64", *tiny])
    assert warm["defaults_from"]["init_from"] == "recipe" and warm["method"] == "lce"
    from bctool.checkpoint import read_checkpoint_metadata

    record = json.loads(read_checkpoint_metadata(tmp_path / "warm.safetensors")["train"])
    assert record["init_from"]["path"] == str(old) and record["init_from"]["head"] == "no head to copy"
    # ... and the new model is evaluated against the old system's stored gallery.
    new_rows = tmp_path / "new.safetensors"
    _json(["extract", str(images), "-m", str(tmp_path / "warm.safetensors"), "--out", str(new_rows), "--workers", "0"])
    stored = tmp_path / "stored.safetensors"
    _json(["convert", str(root / "stored.npy"), "--out", str(stored)])
    cross = _json(["evaluate", "--query", str(new_rows), "--gallery", str(stored)])
    assert 0 <= cross["map"] <= 1
    black_box = _json(["train", str(images), "--out", str(tmp_path / "box.safetensors"), "--old-model", str(stamped),
                       "--arch", "small", "--embedding-dim", "64", *tiny])
    record = json.loads(read_checkpoint_metadata(tmp_path / "box.safetensors")["train"])
    assert black_box["method"] == "lce" and record["init_from"] is None


def test_preprocessing_options_parse_and_every_resize_rule_cuts_its_box() -> None:
    assert parse_channels("0.1,0.2,0.3", "mean") == (0.1, 0.2, 0.3)
    assert parse_channels("inception", "std") == (0.5, 0.5, 0.5)
    assert parse_background("black") == (0, 0, 0) and parse_background("1,2,3") == (1, 2, 3)
    for bad in ("0.1,0.2", "a,b,c", "nan,1,1"):
        with pytest.raises(ValueError, match="three numbers"):
            parse_channels(bad, "mean")
    with pytest.raises(ValueError, match="0-255"):
        parse_background("300,0,0")
    assert Preprocess(image_size=8, resize="squash", crop_fraction=0.5).crop_box(20, 10) == (5.0, 2.5, 15.0, 7.5)
    assert Preprocess(image_size=8, crop_fraction=0.5).crop_box(20, 10) == (7.5, 2.5, 12.5, 7.5)
    with pytest.raises(ValueError, match="resize 'stretch'"):
        Preprocess(resize="stretch")


def test_a_classifier_comes_in_as_the_head_with_its_classes_and_other_keys_are_dropped_by_name(
        old_system: dict, tmp_path: Path) -> None:
    """The user's classifier on the embedding becomes a linear head whose rows a warm start copies
    by name, and its classes are the ones the old model knew; a key the backbone does not take
    is refused unless --drop names its prefix."""
    net = old_system["net"]
    torch.manual_seed(2)
    classifier = torch.nn.Linear(64, 3)
    state = {**net.state_dict(), "cls.weight": classifier.weight.detach().clone(),
             "cls.bias": classifier.bias.detach().clone(), "aux.weight": torch.zeros(2, 2)}
    torch.save(state, tmp_path / "with_head.pth")
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    common = ["import", "resnet18", "--pretrained", str(tmp_path / "with_head.pth"), "--projection", "fc",
              "--projection-norm", "fc_norm", *RIGHT]
    refused = runner.invoke(app, [*common, "--out", str(tmp_path / "x.safetensors"), "-q"])
    assert refused.exit_code == 1 and "aux.weight" in refused.stderr and "cls.weight" in refused.stderr
    result = _json([*common, "--classifier", "cls", "--classes", str(tmp_path / "classes.txt"), "--drop", "aux",
                    "--out", str(tmp_path / "m.safetensors")])
    assert result["classes"] == 3
    from bctool.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(tmp_path / "m.safetensors")
    assert checkpoint.class_names == ["cat", "dog", "bird"] and checkpoint.extra["trained_classes"] == ["cat", "dog", "bird"]
    assert torch.equal(checkpoint.model.head.fc.weight, classifier.weight.detach())
    assert checkpoint.identity()["trained_classes"] == ["cat", "dog", "bird"]
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    wrong = runner.invoke(app, [*common, "--classifier", "cls", "--classes", str(tmp_path / "two.txt"), "--drop", "aux",
                                "--out", str(tmp_path / "y.safetensors"), "-q"])
    assert wrong.exit_code == 1 and "3 rows" in wrong.stderr
    alone = runner.invoke(app, [*common, "--classifier", "cls", "--out", str(tmp_path / "z.safetensors"), "-q"])
    assert alone.exit_code == 2 and "go together" in alone.stderr


def test_an_imported_network_embeds_through_the_frozen_output_cache(old_system: dict, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Its whole backbone is fixed weights: the workflow's extraction reads the cache, same rows."""
    monkeypatch.setenv("BCTOOL_CACHE", str(tmp_path / "cache"))
    from bctool.checkpoint import load_checkpoint
    from bctool.data.sources import load_image_set
    from bctool.extract import extract
    from bctool.train.frozen import embed_through_frozen

    model = tmp_path / "m.safetensors"
    import_pretrained("resnet18", str(old_system["root"] / "weights.pth"), model, projection=Projection("fc", "fc_norm"),
                      image_size=SIZE)
    images = load_image_set(old_system["images"], require_labels=False)
    plain = extract(images, load_checkpoint(model), workers=0).embeddings
    cached = embed_through_frozen(load_checkpoint(model), images).embeddings
    assert any((tmp_path / "cache" / "frozen").iterdir())
    np.testing.assert_allclose(cached, plain, atol=1e-5, rtol=1e-5)


def test_a_file_bctool_exported_runs_as_a_model_with_no_import(old_system: dict, tmp_path: Path) -> None:
    """`bctool export` records the preprocessing (here with the normalisation in the graph):
    extract takes the file directly and gives the checkpoint's rows."""
    from bctool.checkpoint import load_checkpoint
    from bctool.export import export_model

    model = tmp_path / "m.safetensors"
    import_pretrained("resnet18", str(old_system["root"] / "weights.pth"), model, projection=Projection("fc", "fc_norm"),
                      image_size=SIZE, interpolation="bicubic", mean=parse_channels("clip", "mean"))
    export_model(load_checkpoint(model), tmp_path / "m.pt", "torchscript", normalize=True)
    rows = {}
    for name in ("m.safetensors", "m.pt"):
        rows[name] = tmp_path / f"{name}.emb.safetensors"
        _json(["extract", str(old_system["images"]), "-m", str(tmp_path / name), "--out", str(rows[name]),
               "--workers", "0"])
    a, b = (np.asarray(load_embeddings(p).embeddings) for p in rows.values())
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()


def test_awkward_files_from_the_wild_still_come_in(old_system: dict, tmp_path: Path) -> None:
    """A state dict whose backbone sits under ``backbone.`` beside its projection; a TorchScript
    model returning a dict of one tensor; an ONNX file with a fixed batch size of 1; a
    re-import of a file whose graph normalises its input keeps that fact."""
    from bctool.checkpoint import load_checkpoint, load_model
    from bctool.export import export_model
    from bctool.models.model import build_backbone

    class Nested(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.proj, self.bn = build_backbone("small"), torch.nn.Linear(256, 16), torch.nn.BatchNorm1d(16)

    torch.save(Nested().state_dict(), tmp_path / "nested.pth")
    _json(["import", "small", "--pretrained", str(tmp_path / "nested.pth"), "--projection", "proj",
           "--projection-norm", "bn", "--image-size", "16", "--out", str(tmp_path / "n.safetensors")])

    class Pooled(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> dict:
            return {"embedding": x.mean(dim=(2, 3))}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation notices
        torch.jit.save(torch.jit.trace(Pooled(), torch.zeros(2, 3, 8, 8), strict=False), tmp_path / "dict.pt")
        torch.onnx.export(torch.nn.Flatten(), (torch.zeros(1, 3, 8, 8),), str(tmp_path / "fixed.onnx"), dynamo=False)
    for name in ("dict.pt", "fixed.onnx"):
        stamped = tmp_path / f"stamped-{name}"
        _json(["import", str(tmp_path / name), "--image-size", "8", "--out", str(stamped)])
        assert load_model(stamped).model.embed(torch.ones(5, 3, 8, 8)).shape[0] == 5

    export_model(load_checkpoint(tmp_path / "n.safetensors"), tmp_path / "inside.pt", "torchscript", normalize=True)
    twice = runner.invoke(app, ["import", str(tmp_path / "inside.pt"), "--mean", "clip", "--out", str(tmp_path / "x.pt")])
    assert twice.exit_code == 2 and "normalise twice" in twice.stderr
    _json(["import", str(tmp_path / "inside.pt"), "--interpolation", "bicubic", "--out", str(tmp_path / "again.pt")])
    assert load_model(tmp_path / "again.pt").preprocess.std == (1.0, 1.0, 1.0)  # the graph still normalises
