"""The bad-input catalogue (README "Bad input"): rows not covered by the feature tests."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from bctool.checkpoint import load_checkpoint, save_checkpoint
from bctool.cli import app
from bctool.data import load_image_set, load_rgb
from bctool.data.transforms import Preprocess
from bctool.embeddings import Embeddings, load_embeddings, save_embeddings
from bctool.errors import BctoolError, ConfigError, DataError, EmbeddingsError
from bctool.evaluate.retrieval import evaluate_retrieval
from bctool.extract import ExtractOptions, extract_to_file, partial_paths
from bctool.models import ModelConfig, create_model

runner = CliRunner()


def test_sixteen_bit_cmyk_and_grey_images_decode_to_8_bit_rgb(tmp_path: Path) -> None:
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode == "I;16"
    wide = np.asarray(load_rgb(tmp_path / "wide.png"))
    assert wide.dtype == np.uint8 and wide.shape == (16, 16, 3)
    np.testing.assert_array_equal(wide[..., 0], np.arange(256).reshape(16, 16))  # scaled, not clipped to white
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert load_rgb(tmp_path / "cmyk.jpg").getpixel((4, 4))[1] < 40  # magenta ink: little green
    Image.new("L", (8, 8), 90).save(tmp_path / "grey.png")
    assert load_rgb(tmp_path / "grey.png").getpixel((0, 0)) == (90, 90, 90)


def test_huge_image_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is over twice the limit
    with pytest.raises(DataError, match="is too large to decode safely .*shrink it or drop it"):
        load_rgb(tmp_path / "big.png")


def test_list_with_a_comma_separator_gets_a_hint(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("a.png,cat\n")
    with pytest.raises(DataError, match=r"list.txt:1: 'a.png,cat' has no label \(separated by ','\? use a tab"):
        load_image_set(tmp_path / "list.txt")


def test_path_outside_the_root_is_read_and_keeps_an_absolute_id(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "list.txt").write_text("../outside.png cat\ninside.png dog\n")
    images = load_image_set(tmp_path / "lists" / "list.txt")
    assert images.ids == [str((tmp_path / "outside").as_posix()), "inside"]


def test_empty_class_folder_is_no_class_and_one_image_class_is_one(tmp_path: Path) -> None:
    for name in ("a/1.png", "a/2.png", "b/1.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "empty").mkdir()
    images = load_image_set(tmp_path)
    assert images.label_names == ("a", "b") and images.class_counts() == [2, 1]


def _emb(rows: np.ndarray, model: dict | None = None) -> Embeddings:
    n = len(rows)
    return Embeddings(rows.astype(np.float32), np.arange(n) % 2, [f"i{k}" for k in range(n)], ["x", "y"],
                      model or {})


def test_non_finite_embeddings_are_refused_with_the_row(tmp_path: Path) -> None:
    good = np.random.default_rng(0).normal(size=(6, 4))
    bad = good.copy()
    bad[4, 2] = np.nan
    with pytest.raises(EmbeddingsError, match=r"1 embedding rows hold NaN or inf values, first 'i4' \(row 4\)"):
        evaluate_retrieval(_emb(bad), _emb(good))
    bad[4, 2] = np.inf
    with pytest.raises(EmbeddingsError, match="1 gallery rows from row 4 on hold NaN or inf"):
        evaluate_retrieval(_emb(good), _emb(bad))
    save_embeddings(_emb(bad), tmp_path / "g.safetensors")
    save_embeddings(_emb(good), tmp_path / "q.safetensors")
    result = runner.invoke(app, ["evaluate", "--query", str(tmp_path / "q.safetensors"), "--gallery",
                                 str(tmp_path / "g.safetensors")])
    assert result.exit_code == 1 and "NaN or inf" in result.stderr and "Traceback" not in result.stderr


def test_compat_report_refuses_a_pair_from_two_models(tmp_path: Path) -> None:
    rows = np.random.default_rng(1).normal(size=(6, 4))
    files = {}
    for name, sha in [("oq", "a" * 64), ("og", "b" * 64), ("nq", "c" * 64), ("ng", "c" * 64)]:
        files[name] = tmp_path / f"{name}.safetensors"
        save_embeddings(_emb(rows, {"sha256": sha, "path": f"/models/{sha[0]}.safetensors"}), files[name])
    result = runner.invoke(app, ["evaluate", "--old-query", str(files["oq"]), "--old-gallery", str(files["og"]),
                                 "--new-query", str(files["nq"]), "--new-gallery", str(files["ng"])])
    assert result.exit_code == 1
    assert "--old-query was made by model aaaaaaaaaaaa (/models/a.safetensors) but --old-gallery by model" in result.stderr


def test_unknown_old_class_names_are_named_in_a_warning(
    emoji_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from bctool.train.old_side import OldSource, load_old_side

    images = load_image_set(emoji_dir / "new_train.txt")
    rows = np.random.default_rng(2).normal(size=(len(images), 8)).astype(np.float32)
    save_embeddings(Embeddings(rows, np.asarray(images.labels), images.ids, list(images.label_names)),
                    tmp_path / "old.safetensors")
    (tmp_path / "classes.txt").write_text(f"{images.label_names[0]}\nno-such-class\n")
    with caplog.at_level(logging.WARNING):
        source = OldSource(old_embeddings=str(tmp_path / "old.safetensors"), old_classes=str(tmp_path / "classes.txt"))
        old = load_old_side(images, 8, Preprocess(32), torch.device("cpu"), source)
    assert int(old.old_classes.sum()) == 1
    assert "1 of the 2 --old-classes names are not training labels ('no-such-class')" in caplog.text


@pytest.fixture()
def checkpoint_path(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, create_model(ModelConfig(arch="small", embedding_dim=8, num_classes=2)), Preprocess(16), ["a", "b"])
    return path


def _disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_keeps_the_old_file_and_says_so(checkpoint_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = checkpoint_path.read_bytes()
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(BctoolError, match="cannot write .*No space left on device; check free disk space"):
        save_checkpoint(checkpoint_path, create_model(ModelConfig(arch="small", embedding_dim=8, num_classes=2)),
                        Preprocess(16), ["a", "b"])
    assert checkpoint_path.read_bytes() == before
    assert [p.name for p in checkpoint_path.parent.iterdir()] == ["m.safetensors"]  # no temp left


def test_full_disk_during_extraction_then_resume(
    emoji_dir: Path, checkpoint_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bctool.embeddings import EmbeddingsWriter

    images = load_image_set(emoji_dir / "gallery.txt")
    out = tmp_path / "e.safetensors"
    real_write, calls = EmbeddingsWriter.write, []

    def fills_up(self, start: int, rows: np.ndarray) -> None:  # noqa: ANN001
        calls.append(start)
        if len(calls) == 3:
            _disk_full()
        real_write(self, start, rows)

    monkeypatch.setattr(EmbeddingsWriter, "write", fills_up)
    with pytest.raises(BctoolError, match="No space left on device; free disk space .*then continue with --resume"):
        extract_to_file(images, load_checkpoint(checkpoint_path), out, options=ExtractOptions(batch_size=3, workers=0))
    assert not out.exists() and json.loads(partial_paths(out)[1].read_text())["rows_done"] == 6
    monkeypatch.setattr(EmbeddingsWriter, "write", real_write)
    result = extract_to_file(images, load_checkpoint(checkpoint_path), out,
                             options=ExtractOptions(batch_size=3, workers=0, resume=True))
    assert result.resumed_from_row == 6 and len(load_embeddings(out)) == len(images)


def test_output_under_a_file_is_a_clear_error(emoji_dir: Path, checkpoint_path: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = runner.invoke(app, ["extract", str(emoji_dir / "query.txt"), "-m", str(checkpoint_path),
                                 "-o", str(tmp_path / "file" / "e.safetensors"), "--workers", "0"])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "cannot write" in result.stderr and "choose a writable --out" in result.stderr


def test_no_code_loads_a_pickle_or_torch_file_unsafely() -> None:
    """Files from elsewhere are data: no pickle.load/loads, no torch.load without weights_only,
    no numpy allow_pickle anywhere in the package (gnd files go through a restricted unpickler)."""
    import re

    root = Path(__file__).resolve().parents[1] / "bctool"
    offending = []
    for path in root.rglob("*.py"):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bpickle\.loads?\(|allow_pickle\s*=\s*True", code) or (
                re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code
            ):
                offending.append(f"{path.relative_to(root.parent)}:{lineno}: {line.strip()}")
    assert not offending, offending
    assert "pickle.Unpickler" in (root / "evaluate" / "protocols" / "revisited" / "files.py").read_text()


def test_dataset_with_one_class_is_refused(tmp_path: Path) -> None:
    for name in ("1.png", "2.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "list.txt").write_text("1.png cat\n2.png cat\n")
    result = runner.invoke(app, ["train", str(tmp_path / "list.txt"), "--out", str(tmp_path / "m.safetensors"),
                                 "--arch", "small", "--image-size", "16", "--workers", "0"])
    assert result.exit_code == 1 and "has 1 class; classification training needs at least 2 classes" in result.stderr


def test_nan_old_embeddings_are_refused_before_training(emoji_dir: Path, tmp_path: Path) -> None:
    images = load_image_set(emoji_dir / "new_train.txt")
    rows = np.random.default_rng(3).normal(size=(len(images), 256)).astype(np.float32)
    rows[7, 3] = np.nan
    save_embeddings(Embeddings(rows, np.asarray(images.labels), images.ids, list(images.label_names)),
                    tmp_path / "old.safetensors")
    result = runner.invoke(app, ["train", str(emoji_dir / "new_train.txt"), "--out", str(tmp_path / "m.safetensors"),
                                 "--old-embeddings", str(tmp_path / "old.safetensors"), "--arch", "small",
                                 "--image-size", "32", "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 1 and "holds non-finite values (NaN or inf); re-extract" in result.stderr


def test_non_finite_loss_names_the_step_and_keeps_the_last_state(
    emoji_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bctool.train import TrainConfig, train
    from bctool.train.state import state_path
    from bctool.train.tasks import ClassificationTask

    real, calls = ClassificationTask.forward, []

    def nan_at_step_5(self, *args: object) -> dict:  # noqa: ANN001
        parts = real(self, *args)
        calls.append(1)
        if len(calls) == 5:
            parts["cls"] = parts["cls"] * float("nan")
            parts["loss"] = parts["cls"]
        return parts

    monkeypatch.setattr(ClassificationTask, "forward", nan_at_step_5)
    out = tmp_path / "m.safetensors"
    config = TrainConfig.from_options(arch="small", image_size=32, epochs=3, batch_size=16, workers=0, device="cpu")
    with pytest.raises(BctoolError, match=r"loss became non-finite at epoch 2, step 5 \(parts \['cls', 'loss'\]\).*kept for --resume"):
        train(load_image_set(emoji_dir / "new_train.txt"), config, out)
    assert not out.exists() and state_path(out).exists()
    with safe_open(str(state_path(out)), framework="pt") as fh:
        assert json.loads(fh.metadata()["progress"])["epoch"] == 1  # the last good state


def test_checkpoint_header_is_size_checked_before_reading(checkpoint_path: Path, tmp_path: Path) -> None:
    from bctool.errors import ModelError

    raw = bytearray(checkpoint_path.read_bytes())
    raw[:8] = (2**40).to_bytes(8, "little")  # a 1 TB header in a small file
    (tmp_path / "big.safetensors").write_bytes(bytes(raw))
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    for name in ("big", "short"):
        with pytest.raises(ModelError, match=r"not a readable safetensors checkpoint \((header of \d+ bytes, over|2 bytes, shorter)"):
            load_checkpoint(tmp_path / f"{name}.safetensors")


def test_the_ids_live_in_tensors_so_the_header_cap_does_not_bound_the_rows(
    emoji_dir: Path, checkpoint_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors caps the header at 100 MB. Version 1 kept the ids there (about 1.5 million
    rows at most); version 2 keeps them in tensors: with the cap just above the header of a file
    without ids, the file is still written and reads back whole. What still lives in the header
    (the label names) is checked before any image is embedded, pointing to what to do."""
    import bctool.extract as extract_module
    import bctool.utils.io

    checkpoint = load_checkpoint(checkpoint_path)
    images = load_image_set(emoji_dir / "gallery.txt")
    first = tmp_path / "first.safetensors"
    extract_to_file(images, checkpoint, first, options=ExtractOptions(workers=0))
    header_bytes = int.from_bytes(first.read_bytes()[:8], "little")
    ids_json = len(json.dumps(list(images.ids)))
    monkeypatch.setattr(bctool.utils.io, "MAX_HEADER_BYTES", header_bytes)  # a version-1 file would need ids_json more
    assert ids_json > 8
    extract_to_file(images, checkpoint, tmp_path / "e.safetensors", options=ExtractOptions(workers=0))
    assert load_embeddings(tmp_path / "e.safetensors").ids == images.ids
    monkeypatch.setattr(bctool.utils.io, "MAX_HEADER_BYTES", header_bytes - 8)
    monkeypatch.setattr(extract_module, "_embed_batches", lambda *a, **k: pytest.fail("embedded first"))
    with pytest.raises(EmbeddingsError, match=r"label names: the file's header would take .* over safetensors' limit"):
        extract_to_file(images, checkpoint, tmp_path / "f.safetensors", options=ExtractOptions(workers=0))


def test_a_file_where_a_folder_is_needed_is_a_clear_error(tmp_path: Path) -> None:
    taken = tmp_path / "afile"
    taken.write_text("not a folder")
    result = runner.invoke(app, ["dataset", "make", "emoji", str(taken), "--param", "limit=5"])
    assert result.exit_code == 1
    assert "a file stands where a folder is needed" in result.stderr and "unexpected" not in result.stderr
    assert taken.read_text() == "not a folder"


def test_long_lists_are_capped_in_messages_and_stdout(tmp_path: Path) -> None:
    """A class list of 400 names shows a few and a count, in errors and on stdout."""
    names = [f"class_{i:03d}" for i in range(400)]
    query = _emb(np.ones((3, 4), np.float32), {"arch": "small", "trained_classes": names})
    gallery = _emb(np.ones((3, 8), np.float32), {"arch": "small", "trained_classes": names})
    with pytest.raises(EmbeddingsError) as caught:
        evaluate_retrieval(query, gallery)
    message = str(caught.value)
    assert "'class_000', 'class_001', 'class_002' and 397 more" in message and "class_399" not in message
    assert len(message) < 600

    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="small", embedding_dim=4, num_classes=400)).eval()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, Preprocess(image_size=16), names, extra={"trained_classes": names})
    listing = tmp_path / "one.txt"
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "a.png")
    listing.write_text("a.png class_000\n")
    result = runner.invoke(app, ["extract", str(listing), "-m", str(path), "-o", str(tmp_path / "e.safetensors"),
                                 "--workers", "0", "-q"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"]["trained_classes"] == 400
    assert load_embeddings(tmp_path / "e.safetensors").model["trained_classes"] == names  # the file keeps them


def test_queries_without_positives_are_counted_in_the_table_and_warned(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """A one-image gallery: 11 of 12 queries have no relevant item; the warning and the table say so."""
    rng = np.random.default_rng(0)
    query = Embeddings(rng.normal(size=(12, 4)).astype(np.float32), np.arange(12), [f"q{i}" for i in range(12)],
                       [f"c{i}" for i in range(12)], {})
    gallery = Embeddings(rng.normal(size=(1, 4)).astype(np.float32), np.zeros(1, np.int64), ["g0"], ["c0"], {})
    save_embeddings(query, tmp_path / "q.safetensors")
    save_embeddings(gallery, tmp_path / "g.safetensors")
    with caplog.at_level(logging.WARNING):
        assert evaluate_retrieval(query, gallery)["queries_without_positives"] == 11
    assert "11 of 12 queries have no relevant gallery item" in caplog.text
    result = runner.invoke(app, ["evaluate", "--query", str(tmp_path / "q.safetensors"), "--gallery",
                                 str(tmp_path / "g.safetensors")])
    assert result.exit_code == 0
    text = " ".join(result.stderr.split())
    assert "11 of 12 queries have no relevant" in text and "│ 11 │" in text  # the table's "no positive" column


def test_a_folder_with_one_class_folder_warns_how_labels_are_given(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    (tmp_path / "data" / "images").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / "data" / "images" / f"{i}.png")
    with caplog.at_level(logging.WARNING):
        images = load_image_set(tmp_path / "data", require_labels=False)
    assert images.label_names == ("images",)
    assert "has one subfolder, 'images': each of its 3 images is labelled 'images'" in caplog.text


def test_float_tiff_is_scaled_by_its_range_or_refused(tmp_path: Path) -> None:
    unit = np.full((4, 4), 0.5, np.float32)
    Image.fromarray(unit, mode="F").save(tmp_path / "unit.tif")
    assert load_rgb(tmp_path / "unit.tif").getpixel((0, 0)) == (128, 128, 128)  # not near-black
    Image.fromarray(np.full((4, 4), 200.0, np.float32), mode="F").save(tmp_path / "bytes.tif")
    assert load_rgb(tmp_path / "bytes.tif").getpixel((0, 0)) == (200, 200, 200)
    Image.fromarray(np.full((4, 4), -3.0, np.float32), mode="F").save(tmp_path / "odd.tif")
    with pytest.raises(DataError, match=r"odd.tif.*float image with values from -3 to -3: its range is unclear"):
        load_rgb(tmp_path / "odd.tif")


def test_help_and_messages_read_as_written(tmp_path: Path) -> None:
    """No Rich markup eaten, no type placeholders on flags, upper-case argument names; a folder
    as --model and a Latin-1 list file get errors that say what they are."""
    chain_help = runner.invoke(app, ["evaluate", "--help"], terminal_width=200).stdout
    assert "the matrix M[i][j]" in chain_help and "<bool>" not in chain_help
    assert "Usage: bctool train [OPTIONS] {DATA}" in runner.invoke(app, ["train", "--help"]).stdout
    extract_help = " ".join(runner.invoke(app, ["extract", "--help"], terminal_width=200).stdout.split())
    assert "--verbose Log what happens to stderr: files read and written" in extract_help.replace("-v, ", "")
    assert "loss parts" not in extract_help
    folder = tmp_path / "models"
    folder.mkdir()
    listing = tmp_path / "list.txt"
    listing.write_bytes("caf\xe9.png a\n".encode("latin-1"))
    result = runner.invoke(app, ["extract", str(listing), "-m", str(folder), "-o", str(tmp_path / "e.safetensors")])
    assert result.exit_code == 1 and "is a folder; pass the checkpoint file in it" in result.stderr
    from bctool.errors import DataError as Data

    with pytest.raises(Data, match=r"is not UTF-8 text \(byte 0xe9 on line 1\); save it as UTF-8"):
        load_image_set(listing)
    png = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(png)
    with pytest.raises(Data, match="is an image, not a list file"):
        load_image_set(png)


def test_embeddings_without_ids_never_match_rows_by_number(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A query and a gallery file without ids: query row i is not gallery row i's image, so no
    gallery row is dropped (mAP as with distinct ids, not the 1.0 of a self-match), with a
    warning; training refuses such a file as old embeddings."""
    from types import SimpleNamespace

    from safetensors.numpy import save_file

    from bctool.train.old_side import match_by_id

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 3).astype(np.int64)
    query, gallery = rng.normal(size=(12, 8)).astype(np.float32), rng.normal(size=(12, 8)).astype(np.float32)
    meta = {"format": "bctool.embeddings", "label_names": json.dumps(["a", "b", "c", "d"])}
    for name, rows in (("q", query), ("g", gallery)):
        save_file({"embeddings": rows, "labels": labels}, str(tmp_path / f"{name}.safetensors"), metadata=meta)
    q, g = load_embeddings(tmp_path / "q.safetensors"), load_embeddings(tmp_path / "g.safetensors")
    assert not q.ids_known and not g.ids_known
    with caplog.at_level(logging.WARNING):
        got = evaluate_retrieval(q, g)
    assert "has no ids, so no gallery row is taken for a query's own image" in caplog.text
    named = evaluate_retrieval(Embeddings(query, labels, [f"q{i}" for i in range(12)], ["a", "b", "c", "d"]),
                               Embeddings(gallery, labels, [f"g{i}" for i in range(12)], ["a", "b", "c", "d"]))
    assert got["map"] == pytest.approx(named["map"]) and got["queries"] == 12 and got["gallery"] == 12
    with pytest.raises(EmbeddingsError, match="has no ids, so its rows cannot be matched"):
        match_by_id(SimpleNamespace(source="train.txt", ids=[str(i) for i in range(12)]), g, "g.safetensors")


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    model = create_model(ModelConfig(arch="small", embedding_dim=8, num_classes=3))
    with torch.no_grad():
        model.neck[0].weight[0, 0] = float("nan")
    save_checkpoint(tmp_path / "m.safetensors", model, Preprocess(image_size=16), ["a", "b", "c"], train_config={})
    with pytest.raises(BctoolError, match=r"holds NaN or inf weights: tensor 'neck.0.weight'; it cannot embed"):
        load_checkpoint(tmp_path / "m.safetensors")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "tensor 'neck.0.weight'" in result.output


def test_an_old_side_given_to_a_method_without_one_is_refused(tmp_path: Path) -> None:
    """`--method independent --old-embeddings X` used to ignore X (even a missing one) and record it."""
    result = CliRunner().invoke(app, ["train", str(tmp_path / "t.txt"), "--out", str(tmp_path / "m.safetensors"),
                                      "--method", "independent", "--old-embeddings", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 1
    assert "method 'independent' trains without an old side, so --old-embeddings" in result.output
    assert "would be ignored: drop it" in result.output and not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("args, message", [
    (["--boundary-threshold", "nan"], "advbct parameter threshold=nan must be a finite number"),
    (["--param", "threshold=-1"], "advbct parameter threshold=-1.0 must be positive"),
    (["--method", "hotrefresh", "--param", "temperature=inf"], "hotrefresh parameter temperature='inf' must be a finite number"),
    (["--method", "unibct", "--param", "margin=nan"], "unibct parameter margin='nan' must be a finite number"),
    (["--head-scale", "0"], "--head-scale 0.0 must be a positive finite number"),
    (["--head-scale", "nan"], "--head-scale nan must be a positive finite number"),
    (["--head-margin", "-5"], "--head-margin -5.0 must be in [0, pi)"),
])
def test_values_that_would_switch_a_term_off_are_refused(args: list[str], message: str, tmp_path: Path) -> None:
    """NaN, inf and out-of-range method or head parameters used to train with a term switched
    off (or fail at step 1 blaming --lr); each is refused before any work, naming option and value."""
    base = ["train", str(tmp_path / "t.txt"), "--out", str(tmp_path / "m.safetensors"), "--old-embeddings",
            str(tmp_path / "old.safetensors"), "--method", "advbct"]
    result = CliRunner().invoke(app, [*base, *args])
    assert result.exit_code == 1 and message in result.output, result.output


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "Invalid value for '--batch-size': 0 is below 2; pass 2 or more"),
    (["--epochs", "0"], "Invalid value for '--epochs': 0 is below 1; pass 1 or more"),
    (["--embedding-dim", "-5"], "Invalid value for '--embedding-dim': -5 is below 1; pass 1 or more"),
    (["--compat-weight", "nan"], "Invalid value for '--compat-weight': nan must be a finite number, 0.0 or more"),
])
def test_numbers_out_of_range_are_usage_errors_naming_option_and_value(args: list[str], message: str,
                                                                       tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", str(tmp_path / "t.txt"), "--out", str(tmp_path / "m.safetensors"), *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


@pytest.mark.parametrize("args", [["demo", "--seed", "-1"], ["train", "x.txt", "--out", "m.safetensors", "--seed", str(2**70)],
                                  ["evaluate", "--query", "q", "--gallery", "g", "--seed", "-1"]])
def test_seeds_out_of_range_are_usage_errors_before_any_work(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "is outside [0, 4294967295]; pass a seed in that range" in result.output


def test_a_checkpoint_with_image_size_0_is_corrupt_metadata(tmp_path: Path) -> None:
    model = create_model(ModelConfig(arch="small", embedding_dim=8, num_classes=2))
    save_checkpoint(tmp_path / "m.safetensors", model, Preprocess(image_size=16), ["a", "b"], train_config={})
    tensors, meta = {}, {}
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["preprocess"] = json.dumps({**json.loads(meta["preprocess"]), "image_size": 0})
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(BctoolError, match=r"has corrupt metadata \(image_size 0 must be at least 1\); re-train it"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_a_closed_stdout_ends_the_command_quietly_with_status_0() -> None:
    """`bctool list methods | head -0`: the reader is gone before the JSON is written."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "bctool", "list", "methods"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader closes the pipe before the command writes
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err == b""


def test_zero_rows_are_warned_about_and_huge_rows_keep_their_direction(caplog: pytest.LogCaptureFixture) -> None:
    """A gallery row of zeros scores by tie order alone (warned, naming it); a row of 3e38 used
    to overflow its norm and silently become zeros."""
    rows = np.array([[3e38, 3e38, 0], [0, 0, 0], [1, 2, 2]], np.float32)
    emb = Embeddings(rows, np.zeros(3, np.int64), ["huge", "empty", "plain"], ["k"])
    with caplog.at_level(logging.WARNING):
        unit = emb.normalized_embeddings()
        list(emb.iter_normalized_blocks(1))
    np.testing.assert_allclose(unit[0], [2**-0.5, 2**-0.5, 0], rtol=1e-6)
    np.testing.assert_allclose(unit[2], [1 / 3, 2 / 3, 2 / 3], rtol=1e-6)
    assert caplog.text.count("1 embedding rows are all zero (first 'empty', row 1)") == 1  # once per file


def test_data_that_is_a_link_loop_fifo_or_device_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    os.mkfifo(tmp_path / "fifo")
    expected = {tmp_path / "a": "is a symbolic link that loops or points nowhere",
                tmp_path / "fifo": "is a FIFO (a named pipe), not a file", Path("/dev/null"): "is a device, not a file",
                tmp_path / "missing": "does not exist"}
    for path, words in expected.items():
        with pytest.raises(DataError, match=f"data '{path}' {re.escape(words)}; pass a list file"):
            load_image_set(path)


def test_float16_and_float64_files_work_as_gallery_as_they_do_as_query(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    emb = Embeddings(rng.normal(size=(9, 4)).astype(np.float32), np.arange(9) % 3, [f"i{i}" for i in range(9)],
                     ["a", "b", "c"])
    save_embeddings(emb, tmp_path / "f32.safetensors")
    expected = evaluate_retrieval(emb, emb)["map"]
    with safe_open(str(tmp_path / "f32.safetensors"), "np") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for dtype in (np.float16, np.float64):
        path = tmp_path / f"{np.dtype(dtype).name}.safetensors"
        save_file({**tensors, "embeddings": tensors["embeddings"].astype(dtype)}, str(path), metadata=meta)
        result = CliRunner().invoke(app, ["evaluate", "--query", str(tmp_path / "f32.safetensors"), "--gallery", str(path), "-q"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["map"] == pytest.approx(expected, abs=1e-3)


def test_labels_without_label_names_say_so() -> None:
    with pytest.raises(EmbeddingsError, match=r"3 rows have labels but there are no label names"):
        Embeddings(np.zeros((3, 2), np.float32), np.array([0, 1, 1]), ["a", "b", "c"], [])


def test_a_folder_as_out_is_refused_before_the_work(tmp_path: Path, training_log: Path) -> None:
    out = str(tmp_path / "dir")
    (tmp_path / "dir").mkdir()
    for args in (["export", str(tmp_path / "missing.safetensors"), "--out", out], ["plot", str(training_log), "--out", out],
                 ["merge", str(tmp_path / "p.safetensors"), "--out", out]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and "is a folder; pass the name of a file" in result.output, (args, result.output)


def test_a_plot_is_written_in_the_format_its_suffix_names(tmp_path: Path, training_log: Path) -> None:
    pytest.importorskip("matplotlib")
    log = training_log
    assert CliRunner().invoke(app, ["plot", str(log), "--out", str(tmp_path / "c.svg"), "-q"]).exit_code == 0
    assert (tmp_path / "c.svg").read_bytes().lstrip().startswith(b"<?xml")
    result = CliRunner().invoke(app, ["plot", str(log), "--out", str(tmp_path / "c.jpg")])
    assert result.exit_code == 1 and "name a .png, .svg or .pdf file" in result.output


def test_dataset_emoji_refuses_a_folder_holding_another_image_under_an_emoji_name(tmp_path: Path) -> None:
    from bctool.data.emoji import EmojiSplit, write_emoji_dataset

    write_emoji_dataset(tmp_path / "e", EmojiSplit(seed=0, limit=12))
    write_emoji_dataset(tmp_path / "e", EmojiSplit(seed=0, limit=12))  # a rerun finds its own images
    victim = sorted((tmp_path / "e" / "images" / "google").glob("*.png"))[0]
    Image.new("RGB", (64, 64), "red").save(victim)
    with pytest.raises(DataError, match=r"is already there and is not the google .* emoji bctool ships"):
        write_emoji_dataset(tmp_path / "e", EmojiSplit(seed=0, limit=12))


def test_a_reused_log_dir_is_refused_instead_of_truncated(tmp_path: Path) -> None:
    from bctool.train.log import TrainLog

    (tmp_path / "steps.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ConfigError, match=r"holds another run's log \(steps.jsonl\); a new run would overwrite it"):
        TrainLog(tmp_path)
    assert (tmp_path / "steps.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    TrainLog(tmp_path, resume_step=1).close()  # a resumed run continues its own log


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A file stored sideways with EXIF orientation 6 (rotate 90 clockwise to display) loads as
    its upright copy."""
    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 255, size=(20, 40, 3), dtype=np.uint8))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "sideways.png", exif=exif)
    loaded = load_rgb(tmp_path / "sideways.png")
    assert loaded.size == upright.size and loaded.tobytes() == upright.tobytes()


def test_a_listed_file_whose_name_starts_with_hash_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "#x.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "y.png")
    (tmp_path / "list.txt").write_text("#x.png a\n# a real comment\ny.png b\n./#x.png a\n")
    with caplog.at_level(logging.WARNING):
        images = load_image_set(tmp_path / "list.txt")
    assert "list.txt:1: '#x.png' is skipped as a comment" in caplog.text and "write ./#x.png" in caplog.text
    assert caplog.text.count("skipped as a comment") == 1 and len(images) == 2  # ./#x.png is listed


@pytest.mark.parametrize("command", [["train", "d.txt"], ["extract", "d.txt", "--model", "m.safetensors"],
                                     ["export", "m.safetensors"], ["merge", "p.safetensors"], ["plot", "log"]])
def test_an_out_ending_in_a_slash_is_a_usage_error(command: list[str], tmp_path: Path) -> None:
    """`--out newdir/` used to write a file named newdir."""
    result = CliRunner().invoke(app, [*command, "--out", f"{tmp_path}/newdir/"])
    assert result.exit_code == 2 and "ends with a path separator, so it names a folder" in " ".join(result.output.split())
    assert not (tmp_path / "newdir").exists()


def test_extract_under_a_file_size_limit_names_the_file_and_leaves_nothing_to_resume(
    emoji_dir: Path, checkpoint_path: Path, tmp_path: Path
) -> None:
    import resource
    import subprocess
    import sys

    out = tmp_path / "e.safetensors"

    def small_files() -> None:  # in the child: files of 256 bytes at most (the header is larger)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))

    proc = subprocess.run([sys.executable, "-m", "bctool", "extract", str(emoji_dir / "new_train.txt"), "--model",
                           str(checkpoint_path), "--out", str(out), "--workers", "0", "-q"],
                          capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    assert proc.returncode == 1
    assert f"cannot write '{out}.partial': the file-size limit is reached" in " ".join(proc.stderr.split())
    assert not list(tmp_path.glob("e.safetensors*"))  # no partial file that --resume could not use


def test_files_of_a_newer_format_version_are_refused_naming_both(tmp_path: Path) -> None:
    """A checkpoint, an embeddings file or an adapter written by a future bctool."""
    import numpy as np
    from safetensors.numpy import load_file as load_np
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import load_file as load_pt
    from safetensors.torch import save_file as save_pt

    from bctool.checkpoint import (
        load_checkpoint,
        read_checkpoint_metadata,
        save_checkpoint,
    )
    from bctool.data.transforms import Preprocess
    from bctool.embeddings import Embeddings, load_embeddings, save_embeddings
    from bctool.errors import EmbeddingsError, ModelError
    from bctool.models import ModelConfig, create_model

    model = tmp_path / "m.safetensors"
    save_checkpoint(model, create_model(ModelConfig(arch="small", embedding_dim=4, num_classes=2)), Preprocess(image_size=16),
                    ["a", "b"])
    meta = read_checkpoint_metadata(model)
    save_pt(load_pt(str(model)), str(tmp_path / "m2.safetensors"), metadata={**meta, "format_version": "2"})
    with pytest.raises(ModelError,
                       match="is bctool checkpoint format version 2; this bctool reads versions up to 1: upgrade bctool"):
        load_checkpoint(tmp_path / "m2.safetensors")
    emb = tmp_path / "e.safetensors"
    save_embeddings(Embeddings(np.eye(2, dtype=np.float32), np.array([0, 1]), ["x", "y"], ["a", "b"]), emb)
    from safetensors import safe_open

    with safe_open(str(emb), framework="np") as fh:
        emeta = fh.metadata()
    save_np(load_np(str(emb)), str(tmp_path / "e2.safetensors"), metadata={**emeta, "format_version": "3"})
    for mmap in (False, True):
        with pytest.raises(EmbeddingsError,
                           match="is bctool embeddings format version 3; this bctool reads versions up to 2"):
            load_embeddings(tmp_path / "e2.safetensors", mmap=mmap)
