"""bctool export: ONNX and TorchScript files that match `bctool extract`, with bctool's metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bctool.checkpoint import load_checkpoint, save_checkpoint
from bctool.cli import app
from bctool.data import load_image_set
from bctool.data.transforms import Preprocess
from bctool.embeddings import load_embeddings
from bctool.errors import BctoolError, ConfigError
from bctool.export import export_model, read_exported_metadata
from bctool.models import ModelConfig, create_model
from helpers import docs_page

runner = CliRunner()


def _checkpoint(tmp_path: Path, arch: str, size: int) -> Path:
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch=arch, embedding_dim=16, num_classes=3))
    with torch.no_grad():  # BatchNorm statistics other than the defaults, as after training
        model.train()(torch.randn(8, 3, size, size))
    path = tmp_path / f"{arch}.safetensors"
    save_checkpoint(path, model.eval(), Preprocess(image_size=size), ["a", "b", "c"], train_config={"seed": 0})
    return path


def _onnx_embed(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embeddings"], {"images": images})[0]


@pytest.mark.parametrize(("arch", "fmt"), [("small", "onnx"), ("resnet18", "onnx"), ("small", "torchscript"),
                                           ("resnet18", "torchscript")])
@pytest.mark.slow
def test_export_matches_extract_on_real_images(arch: str, fmt: str, emoji_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime") if fmt == "onnx" else None
    model = _checkpoint(tmp_path, arch, 32)
    out = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt")
    result = runner.invoke(app, ["export", str(model), "--out", str(out), "--format", fmt,
                                 "--images", str(emoji_dir / "query.txt"), "--check", "5", "-q"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["images_checked"] == 5 and summary["max_difference"] <= 1e-4
    assert summary["input"]["shape"] == ["batch", 3, 32, 32] and summary["output"]["shape"] == ["batch", 16]

    # Independently of the command's own check: the exported file on 7 images (another batch
    # size than the export's example) against the embeddings `bctool extract` writes.
    emb = tmp_path / "emb.safetensors"
    assert runner.invoke(app, ["extract", str(emoji_dir / "query.txt"), "-m", str(model), "-o", str(emb),
                               "--workers", "0", "-q"]).exit_code == 0
    from bctool.data.dataset import load_record
    from bctool.data.transforms import EvalTransform

    images = load_image_set(emoji_dir / "query.txt")
    batch = torch.stack([EvalTransform(Preprocess(image_size=32))(load_record(r)) for r in images.records[:7]])
    got = _onnx_embed(out, batch.numpy()) if fmt == "onnx" else torch.jit.load(str(out))(batch).detach().numpy()
    want = load_embeddings(emb).embeddings[:7]
    assert np.abs(got - want).max() / np.linalg.norm(want, axis=1).min() < 1e-4

    meta = read_exported_metadata(out)
    assert meta["model"]["arch"] == arch and meta["format"] == "bctool.checkpoint"
    assert "class_names" not in meta and meta["export"]["normalize_included"] is False


def test_normalisation_inside_takes_rgb_in_unit_range(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(_checkpoint(tmp_path, "small", 32))
    out = tmp_path / "m.pt"
    result = export_model(checkpoint, out, "torchscript", normalize=True)
    assert result.input["values"] == "RGB in [0, 1]" and result.images_checked == 8
    unit = torch.rand(3, 3, 32, 32)
    mean, std = torch.tensor(checkpoint.preprocess.mean).view(1, 3, 1, 1), torch.tensor(checkpoint.preprocess.std).view(1, 3, 1, 1)
    with torch.no_grad():
        want = checkpoint.model.embed((unit - mean) / std)
        got = torch.jit.load(str(out))(unit)
    assert torch.allclose(got, want, atol=1e-5)


def test_a_mismatch_refuses_the_export_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from bctool import export

    checkpoint = load_checkpoint(_checkpoint(tmp_path, "small", 32))
    saved = export.FORMATS.snapshot()
    broken = replace(export.FORMATS["torchscript"], run=lambda path, images: np.zeros((len(images), 16), np.float32))
    export.FORMATS.register("torchscript", broken, replace=True)
    out = tmp_path / "m.pt"
    try:
        with pytest.raises(BctoolError, match=r"differs from bctool extract by 0\.\d+ \(relative to the embedding norm\) on 8 images"):
            export_model(checkpoint, out, "torchscript")
    finally:
        export.FORMATS.restore(saved)
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "small.safetensors"]


def test_missing_extra_and_bad_options_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    checkpoint = load_checkpoint(_checkpoint(tmp_path, "small", 32))
    real_import = builtins.__import__

    def no_onnxruntime(name: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if name == "onnxruntime":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(ConfigError, match=r'needs onnxruntime, which is not installed: pip install -e "\.\[export\]"'):
        export_model(checkpoint, tmp_path / "m.onnx", "onnx")
    monkeypatch.setattr(builtins, "__import__", real_import)
    with pytest.raises(ConfigError, match=r"--format 'tflite' is unknown; choose one of \['onnx', 'torchscript'\]"):
        export_model(checkpoint, tmp_path / "m.x", "tflite")
    model = tmp_path / "small.safetensors"
    same = runner.invoke(app, ["export", str(model), "--out", str(model), "-f", "torchscript"])
    assert same.exit_code == 1 and "is the MODEL input" in same.stderr
    assert load_checkpoint(model).config.arch == "small"  # untouched


def _readme_snippet() -> str:
    """The README's onnxruntime serving snippet, as written."""
    readme = docs_page("guides/rolling-out.md")
    after = readme[readme.index("Serving it with onnxruntime"):]
    return after[after.index("```python\n") + len("```python\n"):after.index("```\n", after.index("```python"))]


def test_the_readme_serving_snippet_matches_extract_on_a_transparent_png(tmp_path: Path) -> None:
    """Every preprocessing step comes from the file: a checkpoint that composites on green and
    resizes bicubic, a transparent, non-square PNG, the snippet against `bctool extract`."""
    pytest.importorskip("onnxruntime")
    from PIL import Image

    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="small", embedding_dim=16, num_classes=3))
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 24, 24))
    pre = Preprocess(image_size=24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bicubic",
                     background=(0, 160, 0))
    checkpoint = tmp_path / "m.safetensors"
    save_checkpoint(checkpoint, model.eval(), pre, ["a", "b", "c"], train_config={"seed": 0})
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 57, 4), dtype=np.uint8)
    pixels[..., 3] = np.where(rng.uniform(size=(40, 57)) < 0.5, 0, rng.integers(0, 256, (40, 57)))
    Image.fromarray(pixels, "RGBA").save(tmp_path / "query.png")
    (tmp_path / "list.txt").write_text("query.png a\n")
    emb = tmp_path / "emb.safetensors"
    assert runner.invoke(app, ["extract", str(tmp_path / "list.txt"), "-m", str(checkpoint), "-o", str(emb),
                               "--workers", "0", "-q"]).exit_code == 0
    onnx = tmp_path / "new.onnx"
    assert runner.invoke(app, ["export", str(checkpoint), "--out", str(onnx), "-q"]).exit_code == 0
    code = _readme_snippet().replace('"new.onnx"', repr(str(onnx))).replace('"query.png"', repr(str(tmp_path / "query.png")))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the documented snippet itself
    want = load_embeddings(emb).normalized_embeddings()
    assert np.abs(scope["emb"] - want).max() < 1e-4
    # The background matters here: composited on white, the same image embeds elsewhere.
    white = code.replace('(*pre["background"], 255)', "(255, 255, 255, 255)")
    exec(compile(white, "README.md", "exec"), scope)  # noqa: S102
    assert np.abs(scope["emb"] - want).max() > 1e-3
    assert read_exported_metadata(onnx)["preprocess"]["background"] == [0, 160, 0]


def test_a_checkpoint_without_recorded_steps_reads_as_bctool_applied_them() -> None:
    """Checkpoints from before interpolation, resize, crop and background were recorded."""
    old = Preprocess.from_dict({"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]})
    assert (old.interpolation, old.resize, old.crop, old.background) == ("bilinear", "shorter-side", "center", (255, 255, 255))
    with pytest.raises(ValueError, match="interpolation 'area' is not one bctool implements"):
        Preprocess(interpolation="area")
