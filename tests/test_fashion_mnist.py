"""Fashion-MNIST: the IDX reader and the extended-data lists, on small IDX files made here."""

from __future__ import annotations

import gzip
import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bctool.cli import app
from bctool.data.fashion_mnist import (
    CLASS_NAMES,
    DEFAULT_SOURCE,
    FILES,
    FashionSplit,
    load_fashion_mnist,
    read_idx,
    write_fashion_mnist_dataset,
)
from bctool.data.sources import load_image_set
from bctool.errors import DataError

runner = CliRunner()


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``, written out by hand from the format's definition."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_source(folder: Path, per_class: dict[str, int], seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Gzipped IDX files with ``per_class[part]`` random 28x28 images of every class."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for part, (images_stem, labels_stem) in FILES.items():
        labels = rng.permutation(np.repeat(np.arange(len(CLASS_NAMES), dtype=np.uint8), per_class[part]))
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        (folder / f"{images_stem}.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (folder / f"{labels_stem}.gz").write_bytes(gzip.compress(idx_bytes(labels)))
        made[part] = (images, labels)
    return made


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_read_idx_round_trips_gzipped_and_raw(tmp_path: Path, dtype: type) -> None:
    array = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype) if dtype != np.uint8 else \
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = tmp_path / "a-idx3-ubyte"
    raw.write_bytes(idx_bytes(array))
    packed = tmp_path / "a-idx3-ubyte.gz"
    packed.write_bytes(gzip.compress(idx_bytes(array)))
    for path in (raw, packed):
        got = read_idx(path)
        assert got.shape == array.shape and got.dtype.kind == np.dtype(dtype).kind
        np.testing.assert_array_equal(got, array)


def test_read_idx_refuses_bad_magic_and_truncation(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x89PNG....")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-10])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(short)
    torn = tmp_path / "torn.gz"
    torn.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 2), np.uint8)))[:-6])
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(torn)


def test_missing_files_name_the_package(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_extended_data_lists(tmp_path: Path) -> None:
    made = write_source(tmp_path / "src", {"train": 10, "test": 5})
    out = tmp_path / "fm"
    split = FashionSplit(seed=3, train_per_class=8, old_fraction=0.25, query_per_class=2)
    summary = write_fashion_mnist_dataset(out, split, tmp_path / "src")
    assert summary["images"] == {"old_train.txt": 20, "new_train.txt": 80, "query.txt": 20, "gallery.txt": 30}

    sets = {name: load_image_set(out / f"{name}.txt") for name in ("old_train", "new_train", "query", "gallery")}
    assert set(sets["old_train"].ids) < set(sets["new_train"].ids)  # extended-data: a subset of the images
    assert not set(sets["query"].ids) & set(sets["gallery"].ids)
    for name, per_class in (("old_train", 2), ("new_train", 8), ("query", 2), ("gallery", 3)):
        names = [sets[name].label_names[label] for label in sets[name].labels]
        assert Counter(names) == {c: per_class for c in CLASS_NAMES}, name
    # every listed image is the source image, under its source label
    for name, part in (("new_train", "train"), ("gallery", "test")):
        images, labels = made[part]
        for record in sets[name].records[:15]:
            index = int(record.id.rsplit("/", 1)[1])
            np.testing.assert_array_equal(np.asarray(Image.open(record.path)), images[index])
            assert sets[name].label_names[record.label] == CLASS_NAMES[labels[index]]

    again = tmp_path / "fm2"
    write_fashion_mnist_dataset(again, split, tmp_path / "src")
    assert (again / "old_train.txt").read_text() == (out / "old_train.txt").read_text()  # seeded


def test_bad_split_values_are_refused(tmp_path: Path) -> None:
    write_source(tmp_path / "src", {"train": 3, "test": 2})
    with pytest.raises(DataError, match="old_fraction 1.5"):
        write_fashion_mnist_dataset(tmp_path / "o", FashionSplit(old_fraction=1.5), tmp_path / "src")
    with pytest.raises(DataError, match="leaves no test image for the gallery"):
        write_fashion_mnist_dataset(tmp_path / "o", FashionSplit(query_per_class=2), tmp_path / "src")


def test_cli_writes_lists_and_reports_missing_source(tmp_path: Path) -> None:
    write_source(tmp_path / "src", {"train": 4, "test": 3})
    result = runner.invoke(app, ["dataset", "make", "fashion-mnist", str(tmp_path / "fm"), "--param",
                                 f"source={tmp_path / 'src'}", "--param", "query_per_class=1"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"]["gallery.txt"] == 20 and summary["images"]["new_train.txt"] == 40
    missing = runner.invoke(app, ["dataset", "make", "fashion-mnist", str(tmp_path / "x"), "--param",
                                  f"source={tmp_path / 'none'}"])
    assert missing.exit_code == 1
    assert "apt install dataset-fashion-mnist" in missing.stderr and not missing.stdout


@pytest.mark.skipif(not DEFAULT_SOURCE.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_installed_dataset_reads() -> None:
    data = load_fashion_mnist()
    images, labels = data["train"]
    assert images.shape == (60000, 28, 28) and data["test"][0].shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [6000] * 10
