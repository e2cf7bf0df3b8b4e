"""Rows of two files paired by id (`find_rows`, `pair_rows`): the same answer as a dict loop, for
lists and for the buffered ids of a file, and one rule for a repeated id: refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bctool.embeddings.ids
from bctool.embeddings import Embeddings, RowIds, find_rows, pair_rows, save_embeddings
from bctool.errors import EmbeddingsError

ALPHABET = ["a", "b", "/", "é", "😀", "_"]
TWICE = "id 'dup' is given twice; ids must be unique"


def _reference_rows(ids: list[str], wanted: list[str]) -> list[int]:
    """The obvious look-up: a dict of every id's row."""
    row_of: dict[str, int] = {}
    for i, image_id in enumerate(ids):
        row_of.setdefault(image_id, i)
    return [row_of.get(image_id, -1) for image_id in wanted]


def _reference_pairs(left: list[str], right: list[str]) -> tuple[list[int], list[int]]:
    rows = _reference_rows(right, left)
    return [i for i, r in enumerate(rows) if r >= 0], [r for r in rows if r >= 0]


def _random_ids(rng: np.random.Generator, n: int, longest: int = 6) -> list[str]:
    """``n`` distinct ids, some empty, some of several-byte characters, one long."""
    pool = {"".join(rng.choice(ALPHABET, size=int(rng.integers(0, longest)))) for _ in range(3 * n)}
    pool.add("x" * 300)
    ids = sorted(pool)
    rng.shuffle(ids)
    return ids[:n]


def _sides(ids: list[str], kind: str) -> list[str] | RowIds:
    return RowIds.encode(ids) if kind == "rowids" else list(ids)


KINDS = [("list", "list"), ("rowids", "list"), ("list", "rowids"), ("rowids", "rowids")]


@pytest.mark.parametrize(("ids_kind", "wanted_kind"), KINDS)
def test_find_rows_answers_as_a_dict_loop_does(ids_kind: str, wanted_kind: str) -> None:
    rng = np.random.default_rng(0)
    ids = _random_ids(rng, 2000)
    # Half there (some asked twice), half not; an empty id among them.
    wanted = [*rng.choice(ids, size=300).tolist(), *(f"missing/{i}" for i in range(300)), ""]
    rng.shuffle(wanted)
    rows = find_rows(_sides(ids, ids_kind), _sides(wanted, wanted_kind))
    assert rows.dtype == np.int64 and rows.shape == (len(wanted),)
    assert rows.tolist() == _reference_rows(ids, wanted)


@pytest.mark.parametrize(("left_kind", "right_kind"), KINDS)
def test_pair_rows_answers_as_a_dict_loop_does(left_kind: str, right_kind: str) -> None:
    rng = np.random.default_rng(1)
    shared = _random_ids(rng, 800)
    left = shared[:600] + [f"left/{i}" for i in range(100)]
    right = shared[200:] + [f"right/{i}" for i in range(100)]
    rng.shuffle(left)
    rng.shuffle(right)
    left_rows, right_rows = pair_rows(_sides(left, left_kind), _sides(right, right_kind))
    assert left_rows.dtype == right_rows.dtype == np.int64
    assert (left_rows.tolist(), right_rows.tolist()) == _reference_pairs(left, right)
    assert [left[i] for i in left_rows] == [right[j] for j in right_rows]


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.text(st.sampled_from(ALPHABET), max_size=5), unique=True, max_size=40),
    extra=st.lists(st.text(st.sampled_from(ALPHABET), max_size=5), max_size=20),
    ids_kind=st.sampled_from(["list", "rowids"]),
    wanted_kind=st.sampled_from(["list", "rowids"]),
    data=st.data(),
)
def test_find_rows_on_any_ids(ids: list[str], extra: list[str], ids_kind: str, wanted_kind: str,
                              data: st.DataObject) -> None:
    wanted = data.draw(st.permutations([*ids[: len(ids) // 2], *extra]))
    assert find_rows(_sides(ids, ids_kind), _sides(wanted, wanted_kind)).tolist() == _reference_rows(ids, wanted)
    left = list(dict.fromkeys(wanted))
    left_rows, right_rows = pair_rows(_sides(left, wanted_kind), _sides(ids, ids_kind))
    assert (left_rows.tolist(), right_rows.tolist()) == _reference_pairs(left, ids)


@pytest.mark.parametrize("hashing", ["colliding", "small blocks"])
def test_hash_collisions_and_byte_blocks_do_not_change_the_answer(hashing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if hashing == "colliding":  # ids of one length share a hash: only the exact comparison decides
        monkeypatch.setattr(bctool.embeddings.ids, "_hash_ids", lambda ids: np.diff(ids.offsets).astype(np.uint64))
    else:  # a few bytes compared at once: ids straddle the blocks
        monkeypatch.setattr(bctool.embeddings.ids, "_COMPARE_BYTES", 7)
    rng = np.random.default_rng(2)
    ids = _random_ids(rng, 300)
    wanted = [*rng.choice(ids, size=100).tolist(), "nope", "ab", "x" * 299 + "y"]
    assert find_rows(RowIds.encode(ids), wanted).tolist() == _reference_rows(ids, wanted)
    with pytest.raises(EmbeddingsError, match=TWICE):
        find_rows(RowIds.encode([*ids, "dup", "dup"]), wanted)


def test_ids_of_a_slice_of_a_buffer_are_found() -> None:
    whole = RowIds.encode([f"img/{i}" for i in range(50)])
    part = RowIds(whole.offsets[10:21], whole.data)  # ids 10..19: offsets not from 0
    assert list(part) == [f"img/{i}" for i in range(10, 20)]
    assert find_rows(part, ["img/12", "img/9", "img/19"]).tolist() == [2, -1, 9]
    assert find_rows(whole, part).tolist() == list(range(10, 20))


def test_empty_sides() -> None:
    assert find_rows([], ["a"]).tolist() == [-1] and find_rows(RowIds.encode([]), ["a"]).tolist() == [-1]
    assert find_rows(["a"], []).shape == (0,) and find_rows(RowIds.encode(["a"]), RowIds.encode([])).shape == (0,)
    left_rows, right_rows = pair_rows(RowIds.encode([]), ["a"])
    assert left_rows.shape == right_rows.shape == (0,)


# --- the rule for a repeated id: refused, in the words of check_unique_ids --------------------


@pytest.mark.parametrize("kind", ["list", "rowids"])
def test_a_repeated_id_is_refused_where_it_is_looked_up(kind: str) -> None:
    ids = ["a", "dup", "b", "dup"]
    with pytest.raises(EmbeddingsError, match=f"the gallery: {TWICE} \\(1 ids repeat: 'dup'\\)"):
        find_rows(_sides(ids, kind), ["a"], "the gallery")
    # Asking for an id twice is no repeat: each asks for its row.
    assert find_rows(_sides(["a", "dup", "b"], kind), _sides(["dup", "dup", "c"], kind)).tolist() == [1, 1, -1]


@pytest.mark.parametrize(("left_kind", "right_kind"), KINDS)
def test_pair_rows_refuses_a_repeated_id_on_either_side(left_kind: str, right_kind: str) -> None:
    unique, twice = ["a", "dup", "b"], ["dup", "a", "dup"]
    with pytest.raises(EmbeddingsError, match=f"^LEFT: {TWICE}"):
        pair_rows(_sides(twice, left_kind), _sides(unique, right_kind), ("LEFT", "RIGHT"))
    with pytest.raises(EmbeddingsError, match=f"^RIGHT: {TWICE}"):
        pair_rows(_sides(unique, left_kind), _sides(twice, right_kind), ("LEFT", "RIGHT"))


def _emb(ids: list[str], dim: int = 3) -> Embeddings:
    rows = np.random.default_rng(len(ids)).normal(size=(len(ids), dim)).astype(np.float32)
    return Embeddings(rows, np.zeros(len(ids), np.int64), ids, ["c"])


def test_every_pairing_refuses_a_repeated_id(tmp_path: Path) -> None:
    """The places that pair rows by id answer a repeated id alike."""
    from bctool.adapt.transform import _blend_rows
    from bctool.backfill.curve import order_rows, partial_backfill
    from bctool.backfill.policies import sample_pairs
    from bctool.evaluate.inputs import match_rows
    from bctool.train.old_side import match_by_id

    twice, unique = _emb(["a", "dup", "b", "dup"]), _emb(["a", "dup", "b", "c"])
    save_embeddings(twice, tmp_path / "twice.safetensors")
    images = SimpleNamespace(source="train.txt", ids=["a", "b"])
    calls = {
        "the query embeddings": lambda: match_rows(twice, ["a"], "query"),
        "the old gallery": lambda: order_rows(twice, ["a", "dup", "b", "dup"], 0),
        "the new gallery": lambda: partial_backfill(unique, twice, 0.5, 0),
        "the old embeddings 'old.safetensors'": lambda: match_by_id(images, twice, "old.safetensors"),
        "the --blend file": lambda: _blend_rows(twice, ["a"]),
        "the --new-sample": lambda: sample_pairs(unique, twice),
    }
    for where, call in calls.items():
        with pytest.raises(EmbeddingsError, match=f"^{where}: {TWICE}"):
            call()
