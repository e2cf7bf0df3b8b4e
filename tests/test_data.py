"""List files, ImageFolder trees, image decoding, transforms and the emoji dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bctool.data import Preprocess, load_image_set, load_rgb
from bctool.data.emoji import EmojiSplit, load_index, split_classes, write_emoji_dataset
from bctool.data.transforms import EvalTransform, TrainTransform
from bctool.errors import DataError


def _png(path: Path, color: tuple[int, ...] = (200, 10, 10), mode: str = "RGB", size: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), color).save(path)
    return path


def test_list_file_paths_labels_ids_and_comments(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "x.png")
    _png(tmp_path / "b" / "y y.png")
    absolute = _png(tmp_path / "elsewhere" / "z.jpg")
    lst = tmp_path / "list.txt"
    lst.write_text(
        "# a comment\n\n"
        "a/x.png   cat\n"
        "b/y y.png\tdog\n"  # tab separator: the path may hold a space
        f"{absolute} cat\n"
    )
    images = load_image_set(lst)
    assert images.label_names == ("cat", "dog")
    assert [r.label for r in images.records] == [0, 1, 0]
    assert images.ids == ["a/x", "b/y y", "elsewhere/z"]
    assert images.records[1].path == tmp_path / "b" / "y y.png"
    assert images.class_counts() == [2, 1]


def test_list_file_labels_optional_only_for_extract(tmp_path: Path) -> None:
    lst = tmp_path / "list.txt"
    lst.write_text("a.png\nb.png lbl\n")
    images = load_image_set(lst, require_labels=False)
    assert [r.label for r in images.records] == [-1, 0]
    assert not images.has_labels()
    with pytest.raises(DataError, match=r"list.txt:1: 'a.png' has no label"):
        load_image_set(lst, require_labels=True)


def test_list_file_too_many_fields_names_line(tmp_path: Path) -> None:
    lst = tmp_path / "list.txt"
    lst.write_text("a.png cat\nb c.png dog\n")
    with pytest.raises(DataError, match=r"list.txt:2: expected `PATH LABEL` \(2 fields\), got 3"):
        load_image_set(lst)


def test_duplicate_ids_are_rejected(tmp_path: Path) -> None:
    lst = tmp_path / "list.txt"
    lst.write_text("a.png cat\na.jpg dog\n")
    with pytest.raises(DataError, match="id 'a' appears twice"):
        load_image_set(lst)


def test_missing_data_and_empty_list(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist; pass a list file"):
        load_image_set(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(DataError, match="lists no images"):
        load_image_set(tmp_path / "empty.txt")


def test_image_folder_layout(tmp_path: Path) -> None:
    _png(tmp_path / "zebra" / "1.png")
    _png(tmp_path / "apple" / "sub" / "2.jpg")
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    images = load_image_set(tmp_path)
    assert images.label_names == ("apple", "zebra")
    assert images.ids == ["apple/sub/2", "zebra/1"]
    assert images.labels == [0, 1]


def test_image_folder_without_classes(tmp_path: Path) -> None:
    _png(tmp_path / "loose.png")
    with pytest.raises(DataError, match="no class subfolders"):
        load_image_set(tmp_path)


def test_load_rgb_composites_alpha_on_white_and_converts_modes(tmp_path: Path) -> None:
    transparent = load_rgb(_png(tmp_path / "t.png", (0, 0, 0, 0), mode="RGBA"))
    assert transparent.mode == "RGB" and transparent.getpixel((0, 0)) == (255, 255, 255)
    gray = load_rgb(_png(tmp_path / "g.png", 77, mode="L"))
    assert gray.getpixel((3, 3)) == (77, 77, 77)


def test_load_rgb_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.png' does not exist"):
        load_rgb(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="bad.png' cannot be decoded"):
        load_rgb(bad)


def test_transforms_shape_normalisation_and_seeded_randomness() -> None:
    pre = Preprocess(image_size=16)
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    x = EvalTransform(pre)(img)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    expected = (1 - np.asarray(pre.mean)) / np.asarray(pre.std)
    np.testing.assert_allclose(x[:, 0, 0].numpy(), expected, rtol=1e-5)
    rng_img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 30, 3), dtype=np.uint8))
    torch.manual_seed(3)
    a = TrainTransform(pre)(rng_img)
    torch.manual_seed(3)
    b = TrainTransform(pre)(rng_img)
    c = TrainTransform(pre)(rng_img)
    assert a.shape == (3, 16, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_split_is_disjoint_and_nested() -> None:
    names = [f"c{i}" for i in range(100)]
    parts = split_classes(names, EmojiSplit(seed=1))
    assert len(parts["test"]) == 30 and len(parts["train"]) == 70 and len(parts["old"]) == 21
    assert not set(parts["test"]) & set(parts["train"])
    assert set(parts["old"]) <= set(parts["train"])
    assert parts == split_classes(names, EmojiSplit(seed=1))
    assert parts != split_classes(names, EmojiSplit(seed=2))


def test_embedded_emoji_set_is_real_and_complete() -> None:
    index = load_index()
    assert len(index["emoji"]) > 1800 and index["vendors"] == ["google", "twitter"]
    modifiers = ("1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff")
    # Skin-tone variants are sequences holding a modifier; the bare swatches are emoji of their own.
    variants = [e for e in index["emoji"] if any(m in e["unified"].split("-")[1:] for m in modifiers)]
    assert variants == []


def test_write_emoji_dataset_lists(emoji_dir: Path) -> None:
    query, gallery = load_image_set(emoji_dir / "query.txt"), load_image_set(emoji_dir / "gallery.txt")
    old, new = load_image_set(emoji_dir / "old_train.txt"), load_image_set(emoji_dir / "new_train.txt")
    assert query.label_names == gallery.label_names and len(query) == len(gallery) == 12
    assert all(i.startswith("images/google/") for i in query.ids)
    assert all(i.startswith("images/twitter/") for i in gallery.ids)
    assert set(old.label_names) < set(new.label_names)
    assert not set(new.label_names) & set(query.label_names)
    assert new.class_counts() == [2] * len(new.label_names)  # both vendors per training class
    img = load_rgb(query.records[0].path)
    assert img.size == (32, 32)
    assert np.asarray(img).std() > 10  # a real drawing, not a blank tile


def test_write_emoji_dataset_rejects_same_vendor(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="vendors must differ"):
        write_emoji_dataset(tmp_path, EmojiSplit(limit=5, query_vendor="google", gallery_vendor="google"))


def test_ids_do_not_depend_on_symlinks_or_how_the_path_is_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _png(tmp_path / "real" / "images" / "x.png")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "images").symlink_to(tmp_path / "real" / "images")
    (tmp_path / "linked" / "list.txt").write_text("images/x.png cat\n")
    monkeypatch.chdir(tmp_path)
    relative = load_image_set(Path("linked/list.txt"))
    absolute = load_image_set(tmp_path / "linked" / "list.txt")
    assert relative.ids == absolute.ids == ["images/x"]
