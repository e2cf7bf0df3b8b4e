"""The digits writer (scikit-learn's 8x8 digits file), on a small file of the same layout."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bctool.data.digits import DigitsSplit, load_digits, write_digits_dataset
from bctool.data.sources import load_image_set
from bctool.errors import DataError


def _digits_file(path: Path, per_class: int = 12) -> np.ndarray:
    rng = np.random.default_rng(0)
    rows = np.hstack([rng.integers(0, 17, (10 * per_class, 64)), np.repeat(np.arange(10), per_class)[:, None]])
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(",".join(str(v) for v in row) for row in rows))
    return rows


def test_the_lists_split_every_class_and_the_images_keep_their_grey_values(tmp_path: Path) -> None:
    rows = _digits_file(tmp_path / "digits.csv.gz")
    summary = write_digits_dataset(tmp_path / "out", DigitsSplit(test_fraction=0.5, query_per_class=2, old_fraction=0.5),
                                   tmp_path / "digits.csv.gz")
    assert summary["images"] == {"old_train.txt": 30, "new_train.txt": 60, "query.txt": 20, "gallery.txt": 40}
    lists = {name: load_image_set(tmp_path / "out" / name) for name in summary["images"]}
    new, old = ({r.path for r in lists[n].records} for n in ("new_train.txt", "old_train.txt"))
    test = {r.path for r in lists["query.txt"].records} | {r.path for r in lists["gallery.txt"].records}
    assert old <= new and not (new & test) and len(new | test) == 120
    first = np.asarray(Image.open(tmp_path / "out" / "images" / "0000.png"))
    np.testing.assert_array_equal(first, np.rint(rows[0, :64] * 255 / 16).reshape(8, 8))


def test_a_file_that_is_not_the_digits_is_refused(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "bad.csv.gz", "wt") as fh:
        fh.write("1,2,3\n")
    with pytest.raises(DataError, match="is not scikit-learn's digits file: 3 columns"):
        load_digits(tmp_path / "bad.csv.gz")
    _digits_file(tmp_path / "d.csv.gz", per_class=3)
    with pytest.raises(DataError, match="leaves no held-out image of digit 0 for the gallery"):
        write_digits_dataset(tmp_path / "o", DigitsSplit(test_fraction=0.4, query_per_class=5), tmp_path / "d.csv.gz")
