"""Plugins: the example package in examples/plugin, installed with pip into a folder, adds one
entry of every kind that bctool lists and uses end to end, with no file of bctool changed; a
plugin that fails to load is an error naming it, only where its kind is read."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bctool.checkpoint import load_checkpoint
from bctool.cli import app
from bctool.registry import KIND_MODULES, registry

PLUGIN = Path(__file__).parents[1] / "examples" / "plugin"
DIST = "bctool-example-plugin"
ADDED = {"methods": "cos-to-old", "protocols": "recall-at-1", "backbones": "tiny-cnn", "heads": "unit-linear",
         "index-kinds": "flat-l2-normed", "export-formats": "torchscript-frozen", "datasets": "noise-blobs"}
BROKEN = {
    "pyproject.toml": """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"
[project]
name = "bctool-broken-plugin"
version = "0.1"
[project.entry-points."bctool.methods"]
broken-method = "bctool_broken_plugin:Method"
[tool.setuptools]
packages = ["bctool_broken_plugin"]
""",
    "bctool_broken_plugin/__init__.py": "raise ImportError('this plugin needs a package that is not installed')\n",
}
runner = CliRunner()
# The built-in names of every kind, read before any test puts the plugins on sys.path.
BUILTINS = {plural: set(registry(plural).builtin_names()) for plural in KIND_MODULES}
SMALL = ["--image-size", "32", "--epochs", "2", "--batch-size", "16", "--workers", "0", "--device", "cpu", "-q"]


def _pip_install(source: Path, site: Path) -> None:
    """``pip install`` into ``site`` (offline: the build backend is the installed setuptools)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--disable-pip-version-check", "--target", str(site), str(source)],
                   check=True, capture_output=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder the example plugin and a broken one are installed into (each built from a copy,
    so no build files land in the repository)."""
    work = tmp_path_factory.mktemp("plugins")
    shutil.copytree(PLUGIN, work / "example", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    for name, text in BROKEN.items():
        (work / "broken" / name).parent.mkdir(parents=True, exist_ok=True)
        (work / "broken" / name).write_text(text)
    target = work / "site"
    for source in ("example", "broken"):
        _pip_install(work / source, target)
    return target


def _reload_every_kind() -> None:
    importlib.invalidate_caches()
    for plural in KIND_MODULES:
        registry(plural).reload_plugins()


@pytest.fixture
def plugins(site: Path):  # noqa: ANN201 - the installed plugins, on sys.path for one test
    sys.path.insert(0, str(site))
    _reload_every_kind()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        for module in [m for m in sys.modules if m.startswith(("bctool_example_plugin", "bctool_broken_plugin"))]:
            del sys.modules[module]
        _reload_every_kind()


def _ok(args: list[str]) -> dict:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, f"{args}: {result.stderr}{result.exception!r}"
    return json.loads(result.stdout)


def test_every_kind_is_listed_with_its_origin(plugins: Path) -> None:
    listed = _ok(["list"])
    for plural, name in ADDED.items():
        entry = next(e for e in listed["kinds"][plural] if e["name"] == name)
        assert DIST in entry["origin"] and f"bctool.{plural.replace('-', '_')}" in entry["origin"] and entry["description"]
    method = next(e for e in listed["kinds"]["methods"] if e["name"] == "cos-to-old")
    assert method["declares"]["parts"] == ["cos"] and method["params"] == {"weight": 1.0}
    assert next(e for e in listed["kinds"]["index-kinds"] if e["name"] == "flat-l2-normed")["declares"] == {"exact": True}
    assert next(e for e in listed["kinds"]["heads"] if e["name"] == "unit-linear")["declares"]["class_weights"]
    # The broken plugin is listed as such, by name, and every built-in is still there.
    assert "bctool-broken-plugin" in listed["plugin_errors"]["methods"]["broken-method"]
    # Loading a plugin leaves the built-ins' origin as it is.
    for plural, entries in listed["kinds"].items():
        assert BUILTINS[plural] == {e["name"] for e in entries if e["origin"] == "bctool"}, plural
    assert {"bct", "lce", "advbct"} <= {e["name"] for e in listed["kinds"]["methods"] if e["origin"] == "bctool"}
    assert "plugin_errors" in _ok(["list", "methods"])


def test_plugins_train_extract_evaluate_and_export(plugins: Path, emoji_dir: Path, tmp_path: Path) -> None:
    net = ["--arch", "tiny-cnn", "--head", "unit-linear", *SMALL]
    old = tmp_path / "old.safetensors"
    _ok(["train", str(emoji_dir / "old_train.txt"), "--out", str(old), *net])
    old_emb = tmp_path / "old_emb.safetensors"
    _ok(["extract", str(emoji_dir / "new_train.txt"), "-m", str(old), "-o", str(old_emb), "--workers", "0", "-q"])
    new = tmp_path / "new.safetensors"
    summary = _ok(["train", str(emoji_dir / "new_train.txt"), "--out", str(new), "--old-embeddings", str(old_emb),
                   "--method", "cos-to-old", "--param", "weight=0.5", *net])
    assert set(summary["final"]) == {"cls", "cos", "loss"}
    ckpt = load_checkpoint(new)
    assert ckpt.config.arch == "tiny-cnn" and ckpt.config.head == "unit-linear"
    assert ckpt.train_config["method_params"] == {"weight": 0.5}
    # The warm start copied the plugin head's rows of the shared classes, as the head declares them.
    assert ckpt.train_config["init_from"]["head_rows"] > 0
    wrong = runner.invoke(app, ["train", str(emoji_dir / "new_train.txt"), "--out", str(tmp_path / "w.safetensors"),
                                "--old-embeddings", str(old_emb), "--method", "cos-to-old", "--param", "weight=-1", *net])
    assert wrong.exit_code == 1 and "cos-to-old parameter weight=-1.0 is out of range; pass a value 0.0 or more" in wrong.stderr

    files = {}
    for split in ("query", "gallery"):
        files[split] = tmp_path / f"{split}.safetensors"
        _ok(["extract", str(emoji_dir / f"{split}.txt"), "-m", str(new), "-o", str(files[split]), "--workers", "0", "-q"])
    pair = ["--query", str(files["query"]), "--gallery", str(files["gallery"]), "-q"]
    flat, plugin_index = _ok(["evaluate", *pair]), _ok(["evaluate", *pair, "--index", "flat-l2-normed"])
    assert plugin_index["map"] == flat["map"] and plugin_index["recall@1"] == flat["recall@1"]
    truth = tmp_path / "listed.txt"
    from bctool.embeddings import load_embeddings

    queries = load_embeddings(files["query"]).ids[:5]
    truth.write_text("\n".join(queries))
    recall = _ok(["evaluate", *pair, "--truth", f"recall_truth={truth}"])
    assert recall["queries"] == 5 and 0.0 <= recall["recall@1"] <= 1.0

    exported = tmp_path / "new.frozen"
    result = _ok(["export", str(new), "--out", str(exported), "--format", "torchscript-frozen", "-q"])
    assert result["format"] == "torchscript-frozen" and result["max_difference"] <= result["tolerance"]
    assert exported.exists()

    blobs = _ok(["dataset", "make", "noise-blobs", str(tmp_path / "blobs"), "--param", "classes=3"])
    assert blobs["images"] == 12 and len((tmp_path / "blobs" / "train.txt").read_text().split("\n")) == 7


def test_a_failing_plugin_is_an_error_naming_it_only_where_its_kind_is_used(
        plugins: Path, emoji_dir: Path, tmp_path: Path) -> None:
    import numpy as np

    from bctool.embeddings import Embeddings, save_embeddings

    for name, ids in (("q", ["a", "b", "c"]), ("g", ["d", "e", "f"])):
        save_embeddings(Embeddings(np.eye(3, dtype=np.float32), np.arange(3), ids, ["x", "y", "z"]),
                        tmp_path / f"{name}.safetensors")
    # Evaluation never reads methods: the broken method plugin costs it nothing.
    assert _ok(["evaluate", "--query", str(tmp_path / "q.safetensors"), "--gallery", str(tmp_path / "g.safetensors"),
                "-q"])["map"] == 1.0
    broken = runner.invoke(app, ["train", str(emoji_dir / "new_train.txt"), "--out", str(tmp_path / "b.safetensors"),
                                 "--old-model", str(tmp_path / "missing.safetensors"), "--method", "broken-method", *SMALL])
    assert broken.exit_code == 1, broken.stderr
    assert "bctool-broken-plugin" in broken.stderr and "this plugin needs a package that is not installed" in broken.stderr
    assert "fix or uninstall bctool-broken-plugin" in broken.stderr and "Traceback" not in broken.stderr
    assert not (tmp_path / "b.safetensors").exists()
