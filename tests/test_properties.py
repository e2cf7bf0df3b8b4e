"""Property-based tests (hypothesis) for the list-file parser, the retrieval metrics and the
embeddings file reader.

Every test runs a modest, fixed (derandomized) set of examples with no deadline and no example
database; the whole file runs in a few seconds.
Properties that once failed carry an explicit ``@example`` of the input that broke them.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bctool.data.sources import load_image_set
from bctool.embeddings import Embeddings, load_embeddings, save_embeddings
from bctool.embeddings.format import _metadata
from bctool.errors import DataError, EmbeddingsError
from bctool.evaluate.metrics import (
    average_precision,
    average_precision_at_k,
    recall_at_k,
)

from helpers import ref_ap

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,  # the same examples on every run: no flaky CI
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder shared by the examples of this module (each example overwrites its files)."""
    return tmp_path_factory.mktemp("properties")


# ============================================================================ list files

# Every character str.splitlines() breaks a line at (read_text already turns \r, \r\n into \n).
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
SAFE = string.ascii_letters + string.digits + "_-"

segments = st.text(alphabet=SAFE, min_size=1, max_size=6)
extensions = st.sampled_from(["", ".jpg", ".JPEG", ".png", ".webp", ".txt", ".tar"])
# A label: any non-empty text without whitespace (str.split()'s notion of it) or surrogates.
labels_text = st.text(
    st.characters(exclude_categories=("Cs",)).filter(lambda c: not c.isspace()), min_size=1, max_size=6
)
comment_text = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters=LINE_BREAKS), max_size=12
)
blank = st.sampled_from(["", " ", "\t", "  \t "])
separator = st.sampled_from([" ", "  ", "\t", " \t", "\t ", "\t\t"])
trailing = st.sampled_from(["", " ", "\t", " \t "])
leading = st.sampled_from(["", " ", "\t"])


@st.composite
def image_paths(draw: st.DrawFn) -> tuple[str, str]:
    """``(relative path, expected id)``: safe segments, maybe a dotted stem, maybe an extension."""
    dirs = draw(st.lists(segments, max_size=2))
    ext = draw(extensions)
    stem = draw(segments)
    if ext and draw(st.booleans()):
        stem += "." + draw(segments)  # "img.v2.jpg" has id "img.v2"
    return "/".join([*dirs, stem + ext]), "/".join([*dirs, stem])


@st.composite
def junk_lines(draw: st.DrawFn) -> list[str]:
    """Blank and comment lines to put between entries."""
    comment = st.builds(lambda lead, text: f"{lead}#{text}", leading, comment_text)
    return draw(st.lists(st.one_of(blank, comment), max_size=2))


@st.composite
def list_files(
    draw: st.DrawFn, labelled: bool = True
) -> tuple[list[str], list[tuple[str, str, str | None]]]:
    """Lines of a list file and its entries ``(path, id, label or None)`` in file order."""
    entries = draw(
        st.lists(
            st.tuples(image_paths(), labels_text if labelled else st.none() | labels_text),
            min_size=1,
            max_size=8,
            unique_by=lambda e: e[0][1],  # ids must be unique
        )
    )
    lines: list[str] = []
    out: list[tuple[str, str, str | None]] = []
    for (path, rid), label in entries:
        lines += draw(junk_lines())
        body = path if label is None else path + draw(separator) + label
        lines.append(draw(leading) + body + draw(trailing))
        out.append((path, rid, label))
    lines += draw(junk_lines())
    return lines, out


def write_list(path: Path, lines: list[str], newline: str = "\n", encoding: str = "utf-8") -> None:
    """Write ``lines`` to ``path`` as a list file (bytes exactly as given)."""
    path.write_bytes(newline.join(lines).encode(encoding) + newline.encode())


@SETTINGS
@given(data=list_files(), newline=st.sampled_from(["\n", "\r\n"]))
def test_list_file_round_trip(
    workdir: Path, data: tuple[list[str], list[tuple[str, str, str | None]]], newline: str
) -> None:
    """Records come back in file order with ids = path without extension, label names sorted
    and unique, and every record's label name the one written; no file needs to exist."""
    lines, entries = data
    list_path = workdir / "list.txt"
    write_list(list_path, lines, newline)
    images = load_image_set(list_path)
    assert [r.id for r in images.records] == [rid for _, rid, _ in entries]
    assert [r.path for r in images.records] == [workdir / p for p, _, _ in entries]
    assert list(images.label_names) == sorted({label for _, _, label in entries})
    assert len(set(images.label_names)) == len(images.label_names)
    assert [images.label_names[r.label] for r in images.records] == [label for _, _, label in entries]
    assert images.has_labels() and sum(images.class_counts()) == len(entries)


@SETTINGS
@given(data=list_files(labelled=False))
def test_list_file_optional_labels(
    workdir: Path, data: tuple[list[str], list[tuple[str, str, str | None]]]
) -> None:
    """With ``require_labels=False`` a line without a label gives label -1; the others keep
    theirs. With ``require_labels=True`` the first unlabelled line is a DataError naming it."""
    lines, entries = data
    list_path = workdir / "list.txt"
    write_list(list_path, lines)
    images = load_image_set(list_path, require_labels=False)
    assert images.ids == [rid for _, rid, _ in entries]
    assert list(images.label_names) == sorted({lab for _, _, lab in entries if lab is not None})
    got = [images.label_names[r.label] if r.label >= 0 else None for r in images.records]
    assert got == [lab for _, _, lab in entries]
    unlabelled = [i for i, line in enumerate(lines, 1) if _is_unlabelled_entry(line)]
    if unlabelled:
        with pytest.raises(DataError) as info:
            load_image_set(list_path, require_labels=True)
        assert str(info.value).startswith(f"{list_path}:{unlabelled[0]}:")
    else:
        assert load_image_set(list_path, require_labels=True).ids == images.ids


def _is_unlabelled_entry(line: str) -> bool:
    text = line.strip()
    return bool(text) and not text.startswith("#") and len(text.split()) == 1


token = labels_text.filter(lambda t: not t.startswith("#"))


@st.composite
def malformed_lines(draw: st.DrawFn) -> str:
    """A line of 3 or more fields: space-separated without tabs, or tab-separated."""
    fields = draw(st.lists(token, min_size=3, max_size=5))
    sep = draw(st.sampled_from([" ", "\t"]))
    return draw(leading.filter(lambda s: sep == "\t" or "\t" not in s)) + sep.join(fields)


@SETTINGS
@given(data=list_files(), bad=malformed_lines(), where=st.integers(0, 100))
def test_list_file_malformed_line_names_its_number(
    workdir: Path, data: tuple[list[str], list[tuple[str, str, str | None]]], bad: str, where: int
) -> None:
    """A line with 3+ fields anywhere is a DataError whose message starts ``FILE:LINE:``."""
    lines, _ = data
    index = where % (len(lines) + 1)
    lines = [*lines[:index], bad, *lines[index:]]
    list_path = workdir / "list.txt"
    write_list(list_path, lines)
    with pytest.raises(DataError) as info:
        load_image_set(list_path)
    assert str(info.value).startswith(f"{list_path}:{index + 1}:")


@SETTINGS
@given(
    content=st.one_of(
        st.binary(max_size=200),
        st.text(st.characters(exclude_categories=("Cs",)), max_size=200).map(str.encode),
    )
)
def test_list_file_fuzz_raises_only_data_error(workdir: Path, content: bytes) -> None:
    """Arbitrary bytes as a list file either parse or raise DataError, nothing else."""
    list_path = workdir / "fuzz.txt"
    list_path.write_bytes(content)
    for require_labels in (True, False):
        try:
            images = load_image_set(list_path, require_labels=require_labels)
        except DataError:
            continue
        assert len(images) >= 1 and len(set(images.ids)) == len(images)


@SETTINGS
@example(data=(["a.jpg x"], [("a.jpg", "a", "x")]), head="", brk="\x85", tail="b")
@given(
    data=list_files(),
    head=comment_text,
    brk=st.sampled_from(LINE_BREAKS[2:]),
    tail=st.text(alphabet=SAFE, min_size=1, max_size=5),
)
def test_list_file_comment_with_unicode_line_separator(
    workdir: Path, data: tuple[list[str], list[tuple[str, str, str | None]]], head: str, brk: str, tail: str
) -> None:
    """A comment line is skipped whatever characters it holds (besides a newline)."""
    lines, entries = data
    list_path = workdir / "list.txt"
    write_list(list_path, [f"#{head}{brk}{tail} label", *lines])
    assert load_image_set(list_path).ids == [rid for _, rid, _ in entries]


@SETTINGS
@example(data=(["a.jpg x"], [("a.jpg", "a", "x")]))
@given(data=list_files())
def test_list_file_utf8_bom_is_ignored(
    workdir: Path, data: tuple[list[str], list[tuple[str, str, str | None]]]
) -> None:
    """A UTF-8 byte-order mark at the start of the file does not end up in the first id."""
    lines, entries = data
    list_path = workdir / "list.txt"
    write_list(list_path, lines, encoding="utf-8-sig")
    assert load_image_set(list_path).ids == [rid for _, rid, _ in entries]


# ============================================================================ metrics


@st.composite
def rankings(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """``(relevance (Q, K) bool, n_positives (Q,))`` with n_positives >= relevant ranked items."""
    q, k = draw(st.integers(0, 6)), draw(st.integers(0, 12))
    rel = draw(arrays(np.bool_, (q, k)))
    extra = draw(arrays(np.int64, (q,), elements=st.integers(0, 3)))
    return rel, rel.sum(axis=1) + extra


def assert_close(got: np.ndarray, want: list[float]) -> None:
    """Element-wise equality up to 1e-12 relative, NaN matching NaN."""
    assert got.shape == (len(want),) and got.dtype == np.float64
    for g, w in zip(got.tolist(), want):
        assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, rel=1e-12, abs=1e-15)


@SETTINGS
@given(data=rankings(), k=st.integers(1, 15))
def test_ap_matches_slow_reference(data: tuple[np.ndarray, np.ndarray], k: int) -> None:
    """Vectorised AP and AP@k equal a per-query Python loop."""
    rel, n_pos = data
    rows = rel.tolist()
    assert_close(average_precision(rel, n_pos), [ref_ap(r, int(n)) for r, n in zip(rows, n_pos)])
    assert_close(
        average_precision_at_k(rel, n_pos, k), [ref_ap(r, int(n), k) for r, n in zip(rows, n_pos)]
    )


@SETTINGS
@given(data=rankings(), k=st.integers(1, 15))
def test_ap_in_unit_interval_nan_only_without_positives(
    data: tuple[np.ndarray, np.ndarray], k: int
) -> None:
    """AP and AP@k lie in [0, 1]; they are NaN exactly for queries with no positives."""
    rel, n_pos = data
    for values in (average_precision(rel, n_pos), average_precision_at_k(rel, n_pos, k)):
        assert values.shape == (rel.shape[0],)
        nan = np.isnan(values)
        np.testing.assert_array_equal(nan, n_pos == 0)
        assert np.all((values[~nan] >= 0.0) & (values[~nan] <= 1.0))


@SETTINGS
@given(data=rankings(), k=st.integers(1, 15))
def test_ap_is_one_exactly_for_perfect_rankings(data: tuple[np.ndarray, np.ndarray], k: int) -> None:
    """AP == 1.0 exactly iff all positives are ranked first; AP@k == 1.0 exactly iff the first
    min(n_positives, k) ranks are all relevant."""
    rel, n_pos = data
    ap, ap_k = average_precision(rel, n_pos), average_precision_at_k(rel, n_pos, k)
    for q, (row, n) in enumerate(zip(rel, n_pos.tolist())):
        perfect = n > 0 and n <= len(row) and bool(row[:n].all())
        assert (ap[q] == 1.0) == perfect
        m = min(n, k)
        assert (ap_k[q] == 1.0) == (n > 0 and m <= len(row) and bool(row[:m].all()))


@SETTINGS
@given(n=st.integers(1, 20), misses=st.integers(0, 20), k=st.integers(1, 40))
def test_ap_perfect_ranking_constructed(n: int, misses: int, k: int) -> None:
    """All n positives first, then misses: AP and AP@k are exactly 1.0."""
    rel = np.array([[True] * n + [False] * misses])
    assert average_precision(rel, np.array([n]))[0] == 1.0
    assert average_precision_at_k(rel, np.array([n]), k)[0] == 1.0


@SETTINGS
@given(data=rankings(), k=st.integers(1, 15), seed=st.integers(0, 2**32 - 1))
def test_metrics_are_per_query(data: tuple[np.ndarray, np.ndarray], k: int, seed: int) -> None:
    """Permuting the queries permutes AP, AP@k and recall@k; each row alone gives its value."""
    rel, n_pos = data
    perm = np.random.default_rng(seed).permutation(rel.shape[0])
    ks = (1, k)
    ap, ap_k = average_precision(rel, n_pos), average_precision_at_k(rel, n_pos, k)
    rec = recall_at_k(rel, ks)
    np.testing.assert_array_equal(average_precision(rel[perm], n_pos[perm]), ap[perm])
    np.testing.assert_array_equal(average_precision_at_k(rel[perm], n_pos[perm], k), ap_k[perm])
    rec_perm = recall_at_k(rel[perm], ks)
    for kk in ks:
        np.testing.assert_array_equal(rec_perm[kk], rec[kk][perm])
    for q in range(rel.shape[0]):
        np.testing.assert_array_equal(average_precision(rel[q : q + 1], n_pos[q : q + 1]), ap[q : q + 1])


@SETTINGS
@given(data=rankings())
def test_ap_at_large_k_equals_ap(data: tuple[np.ndarray, np.ndarray]) -> None:
    """AP@k with k >= the ranking length and >= every n_positives is AP, bit for bit."""
    rel, n_pos = data
    k = max([rel.shape[1], 1, *n_pos.tolist()])
    np.testing.assert_array_equal(average_precision_at_k(rel, n_pos, k), average_precision(rel, n_pos))


@SETTINGS
@given(data=rankings())
def test_recall_at_k_monotone_and_matches_reference(data: tuple[np.ndarray, np.ndarray]) -> None:
    """recall@k is 1.0 iff a relevant item is in the top k, so it never decreases with k."""
    rel, _ = data
    ks = tuple(range(1, rel.shape[1] + 3))
    rec = recall_at_k(rel, ks)
    assert sorted(rec) == list(ks)
    for a, b in zip(ks, ks[1:]):
        assert np.all(rec[a] <= rec[b])
    for kk in ks:
        assert rec[kk].tolist() == [1.0 if any(row[:kk]) else 0.0 for row in rel.tolist()]


# ============================================================================ embeddings files

unicode_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=8)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), unicode_text)


def float32_arrays(n: int, d: int) -> st.SearchStrategy[np.ndarray]:
    """(n, d) float32 arrays: ordinary floats with NaN/inf, or any 32-bit pattern (NaN payloads)."""
    floats = arrays(np.float32, (n, d), elements=st.floats(width=32, allow_nan=True, allow_infinity=True))
    bits = arrays(np.uint32, (n, d), elements=st.integers(0, 2**32 - 1)).map(lambda a: a.view(np.float32))
    return st.one_of(floats, bits)


@st.composite
def embeddings_sets(draw: st.DrawFn, max_rows: int = 5) -> Embeddings:
    """Any valid :class:`Embeddings`: rows, unicode ids and label names, labels in [-1, C-1]."""
    n, d = draw(st.integers(0, max_rows)), draw(st.integers(1, 5))
    names = draw(st.lists(unicode_text, max_size=4))
    labels = draw(arrays(np.int64, (n,), elements=st.integers(-1, len(names) - 1)))
    shard = draw(st.none() | st.dictionaries(unicode_text, json_scalars, max_size=3))
    return Embeddings(
        embeddings=draw(float32_arrays(n, d)),
        labels=labels,
        ids=draw(st.lists(unicode_text, min_size=n, max_size=n)),
        label_names=names,
        model=draw(st.dictionaries(unicode_text, json_scalars, max_size=3)),
        normalized=draw(st.booleans()),
        root=draw(unicode_text),
        shard=shard,
    )


@SETTINGS
@given(emb=embeddings_sets())
def test_embeddings_round_trip_bit_exact(workdir: Path, emb: Embeddings) -> None:
    """save then load (both modes) gives every row bit for bit (NaN payloads, inf, -0.0 kept)
    and the same ids, labels, label names, model, normalized flag, root and shard."""
    path = workdir / "round.safetensors"
    save_embeddings(emb, path, block_rows=2)
    for mmap in (False, True):
        got = load_embeddings(path, mmap=mmap)
        assert got.embeddings.dtype == np.float32 and got.embeddings.shape == emb.embeddings.shape
        np.testing.assert_array_equal(got.embeddings.view(np.uint32), emb.embeddings.view(np.uint32))
        if mmap and emb.embeddings.size:
            assert isinstance(got.embeddings, np.memmap) and not got.embeddings.flags.writeable
        assert got.labels.dtype == np.int64
        np.testing.assert_array_equal(got.labels, emb.labels)
        assert got.ids == emb.ids and got.label_names == emb.label_names
        assert got.model == emb.model and got.normalized == emb.normalized
        assert got.root == emb.root and got.shard == emb.shard
        del got


def load_or_error(path: Path, mmap: bool) -> Embeddings | None:
    """``load_embeddings``, or None when it raised EmbeddingsError (other exceptions propagate)."""
    try:
        return load_embeddings(path, mmap=mmap)
    except EmbeddingsError:
        return None


@SETTINGS
@given(emb=embeddings_sets(max_rows=3), cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_file_raises_embeddings_error(workdir: Path, emb: Embeddings, cut: float) -> None:
    """Any strict prefix of a valid file is rejected with EmbeddingsError, in both modes."""
    valid = workdir / "valid.safetensors"
    save_embeddings(emb, valid)
    raw = valid.read_bytes()
    broken = workdir / "truncated.safetensors"
    broken.write_bytes(raw[: int(cut * len(raw))])
    for mmap in (False, True):
        with pytest.raises(EmbeddingsError):
            load_embeddings(broken, mmap=mmap)


@st.composite
def byte_flips(draw: st.DrawFn) -> list[tuple[float, int]]:
    """1-4 flips: (relative position, non-zero xor mask)."""
    flip_one = st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 255))
    return draw(st.lists(flip_one, min_size=1, max_size=4))


def flip(raw: bytes, flips: list[tuple[float, int]], span: int) -> bytes:
    """``raw`` with the bytes at ``pos * span`` xored with their masks."""
    out = bytearray(raw)
    for pos, mask in flips:
        out[int(pos * span)] ^= mask
    return bytes(out)


@SETTINGS
@given(emb=embeddings_sets(max_rows=3), flips=byte_flips(), anywhere=st.booleans())
def test_flipped_bytes_load_or_raise_embeddings_error(
    workdir: Path, emb: Embeddings, flips: list[tuple[float, int]], anywhere: bool
) -> None:
    """Byte flips in the first 64 bytes (or anywhere in the file) give a loaded Embeddings or an
    EmbeddingsError, in both modes; never another exception."""
    valid = workdir / "valid.safetensors"
    save_embeddings(emb, valid)
    raw = valid.read_bytes()
    broken = workdir / "flipped.safetensors"
    broken.write_bytes(flip(raw, flips, len(raw) if anywhere else min(64, len(raw))))
    for mmap in (False, True):
        got = load_or_error(broken, mmap)
        if got is not None:
            assert got.embeddings.ndim == 2 and len(got.ids) == len(got) == len(got.labels)


def craft_file(path: Path, header: dict[str, Any], data: bytes) -> None:
    """Write a safetensors-like file: 8-byte length, space-padded JSON header, data buffer."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def valid_metadata() -> dict[str, str]:
    """The metadata of a 2-row version-1 file (ids in the metadata) with one label name."""
    return {**_metadata(["x"], {}, False, "", None), "format_version": "1", "ids": json.dumps(["a", "b"])}


junk = st.one_of(json_scalars, st.lists(st.integers(-3, 40), max_size=3))
dtypes = st.sampled_from(["F32", "I64", "F64", "I32", "F16", "U8", "BOOL", "XYZ"])
tensor_entries = st.one_of(
    junk,
    st.fixed_dictionaries(
        {
            "dtype": st.one_of(dtypes, junk),
            "shape": st.one_of(st.lists(st.integers(-2, 8), max_size=3), junk),
            "data_offsets": st.one_of(st.lists(st.integers(-8, 120), min_size=2, max_size=2), junk),
        }
    ),
)


@SETTINGS
@given(
    labels=tensor_entries,
    embeddings=tensor_entries,
    metadata=st.one_of(st.just(valid_metadata()), junk),
    size=st.integers(0, 120),
)
def test_crafted_header_loads_or_raises_embeddings_error(
    workdir: Path, labels: Any, embeddings: Any, metadata: Any, size: int
) -> None:
    """Headers with arbitrary tensor entries (dtypes, shapes, offsets, junk) give a loaded
    Embeddings or an EmbeddingsError in both modes."""
    path = workdir / "crafted.safetensors"
    craft_file(path, {"__metadata__": metadata, "labels": labels, "embeddings": embeddings}, bytes(size))
    for mmap in (False, True):
        got = load_or_error(path, mmap)
        if got is not None:
            assert got.embeddings.ndim == 2 and len(got.ids) == len(got) == len(got.labels)


@pytest.mark.parametrize(
    "mmap",
    [
        False,
        True,
    ],
)
@SETTINGS
@example(huge=1e400, position=0)
@given(
    huge=st.one_of(
        st.integers(2**63, 2**80), st.integers(-(2**80), -(2**63) - 1), st.sampled_from([1e400, -1e400])
    ),
    position=st.integers(0, 1),
)
def test_header_shape_overflow_raises_embeddings_error(
    workdir: Path, mmap: bool, huge: Any, position: int
) -> None:
    """A shape entry no int64 can hold (inf, or an integer of 64+ bits) is an EmbeddingsError."""
    shape: list[Any] = [2, 3]
    shape[position] = huge
    header = {
        "__metadata__": valid_metadata(),
        "labels": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]},
        "embeddings": {"dtype": "F32", "shape": shape, "data_offsets": [16, 40]},
    }
    path = workdir / "overflow.safetensors"
    craft_file(path, header, bytes(40))
    with pytest.raises(EmbeddingsError):
        load_embeddings(path, mmap=mmap)


@pytest.mark.parametrize(
    "mmap",
    [
        False,
        True,
    ],
)
@SETTINGS
@example(dtype=("BF16", 2), tensor="embeddings")
@given(
    dtype=st.sampled_from([("BF16", 2), ("F8_E4M3", 1), ("F8_E5M2", 1)]),
    tensor=st.sampled_from(["labels", "embeddings"]),
)
def test_dtype_numpy_cannot_hold_raises_embeddings_error(
    workdir: Path, mmap: bool, dtype: tuple[str, int], tensor: str
) -> None:
    """A tensor in a dtype numpy lacks (BF16, F8) is an EmbeddingsError, not a numpy error."""
    name, itemsize = dtype
    tensors = {"labels": ("I64", 8, [2]), "embeddings": ("F32", 4, [2, 3])}
    tensors[tensor] = (name, itemsize, tensors[tensor][2])
    header: dict[str, Any] = {"__metadata__": valid_metadata()}
    offset = 0
    for key, (dt, size, shape) in tensors.items():
        nbytes = size * int(np.prod(shape))
        header[key] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    path = workdir / "dtype.safetensors"
    craft_file(path, header, bytes(offset))
    with pytest.raises(EmbeddingsError):
        load_embeddings(path, mmap=mmap)


@pytest.mark.parametrize("mmap", [False, True])
@SETTINGS
@example(value=None)
@given(value=st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False)))
def test_label_names_metadata_not_a_list_raises_embeddings_error(
    workdir: Path, mmap: bool, value: Any
) -> None:
    """'label_names' metadata that is valid JSON but no list is an EmbeddingsError."""
    metadata = dict(valid_metadata(), label_names=json.dumps(value))
    header = {
        "__metadata__": metadata,
        "labels": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]},
        "embeddings": {"dtype": "F32", "shape": [2, 3], "data_offsets": [16, 40]},
    }
    path = workdir / "names.safetensors"
    craft_file(path, header, bytes(40))
    with pytest.raises(EmbeddingsError):
        load_embeddings(path, mmap=mmap)
