"""Row ids: the ids of a file held as one byte buffer (:class:`RowIds`), their vectorised
hashing, and what is built on it: repeated ids, and the rows of two files paired by id
(:func:`find_rows`, :func:`pair_rows`; every place that pairs rows by id goes through them)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from bctool.errors import EmbeddingsError, shown


class RowIds(Sequence[str]):
    """The ids of a version-2 file: ``data`` (uint8, every id's UTF-8 one after the other) and
    ``offsets`` (N + 1 int64), both possibly memory-mapped; an id is decoded when it is read,
    so a gallery of millions of rows holds no Python string per row."""

    def __init__(self, offsets: np.ndarray, data: np.ndarray) -> None:
        self.offsets, self.data = offsets, data

    @classmethod
    def encode(cls, ids: Iterable[str]) -> RowIds:
        """The ids as one buffer and offsets (a :class:`RowIds` is returned as it is)."""
        if isinstance(ids, RowIds):
            return ids
        raw = [str(i).encode("utf-8") for i in ids]
        offsets = np.zeros(len(raw) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in raw], out=offsets[1:])
        return cls(offsets, np.frombuffer(b"".join(raw), dtype=np.uint8))

    def check(self, path: object) -> RowIds:
        """``self``, after refusing offsets that do not cut ``data`` into ids."""
        o = self.offsets
        if o.ndim != 1 or len(o) < 1 or o[0] != 0 or o[-1] != len(self.data) or bool((np.diff(o) < 0).any()):
            raise EmbeddingsError(f"{str(path)!r}: 'id_offsets' do not cut 'id_bytes' into ids; re-create the file")
        return self

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _decode(self, begin: int, end: int) -> str:
        try:
            return self.data[begin:end].tobytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EmbeddingsError(f"an id is not UTF-8 ({exc}); re-create the file") from exc

    def __getitem__(self, index):  # noqa: ANN001, ANN204 - int -> str, slice -> list[str]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        i = int(index) + n if int(index) < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"id {index} of {n}")
        return self._decode(int(self.offsets[i]), int(self.offsets[i + 1]))

    def __iter__(self) -> Iterator[str]:
        block = 65536
        for start in range(0, len(self), block):
            offsets = self.offsets[start : start + block + 1].tolist()
            raw = self.data[offsets[0] : offsets[-1]].tobytes()
            base = offsets[0]
            try:
                yield from (raw[a - base : b - base].decode("utf-8") for a, b in zip(offsets, offsets[1:]))
            except UnicodeDecodeError as exc:
                raise EmbeddingsError(f"an id is not UTF-8 ({exc}); re-create the file") from exc

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RowIds):
            return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.data, other.data)
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RowIds({len(self)} ids)"

    def rows_of(self, wanted: Iterable[str]) -> dict[str, int]:
        """The first row of each ``wanted`` id that is there: one vectorised pass over the
        buffer (lengths, then a hash of each id, then an exact check of the few candidates).
        A repeated id keeps its first row here; :func:`find_rows` and :func:`pair_rows` refuse one."""
        targets = {w.encode("utf-8"): w for w in wanted}
        if not targets or not len(self):
            return {}
        # A cheap key first (length, first and last byte), a block of ids at a time: ids that
        # cannot match are dropped without hashing; few candidates are checked one by one.
        wanted_keys = _cheap_keys(*_buffers([*targets]))
        step = 1 << 20
        candidates = np.concatenate([np.zeros(0, np.int64)] + [
            start + np.flatnonzero(np.isin(_cheap_keys(self.offsets[start : start + step + 1], self.data), wanted_keys))
            for start in range(0, len(self), step)])
        if candidates.size <= _CHECK_ONE_BY_ONE:
            found_rows: dict[str, int] = {}
            for i in candidates.tolist():
                name = targets.get(self.data[self.offsets[i] : self.offsets[i + 1]].tobytes())
                if name is not None and name not in found_rows:
                    found_rows[name] = i
            return found_rows
        found: dict[str, int] = {}
        keys = _hash_ids(RowIds.encode(list(targets.values())))
        block = _HASH_BLOCK
        for start in range(0, len(self), block):
            part = RowIds(self.offsets[start : start + block + 1] - self.offsets[start],
                          self.data[self.offsets[start] : self.offsets[min(start + block, len(self))]])
            for i in np.flatnonzero(np.isin(_hash_ids(part), keys)).tolist():
                raw = part.data[part.offsets[i] : part.offsets[i + 1]].tobytes()
                name = targets.get(raw)
                if name is not None and name not in found:
                    found[name] = start + i
        return found


_CHECK_ONE_BY_ONE = 200_000  # candidate ids compared as bytes, without hashing
_HASH_BLOCK = 1 << 18  # ids hashed at once: a few arrays of 8 bytes per byte of their ids


def has_repeats(ids: Sequence[str]) -> bool:
    """True when some id appears twice. A :class:`RowIds` is checked by hashing its buffer a block
    at a time (8 bytes an id) and comparing only the ids whose hashes meet; a list by a set."""
    if not isinstance(ids, RowIds):
        return len(set(ids)) != len(ids)
    return _repeats_among(ids, _suspects(_hashes(ids)))


def repeated_ids(ids: Sequence[str]) -> list[str]:
    """The ids that name more than one row, sorted. A :class:`RowIds` is hashed a block at a time
    (8 bytes an id), and only the ids whose hashes meet are decoded."""
    encoded = RowIds.encode(ids)
    counts = Counter(encoded[int(i)] for i in _suspects(_hashes(encoded)))
    return sorted(image_id for image_id, count in counts.items() if count > 1)


def check_unique_ids(ids: Sequence[str], where: str) -> None:
    """Refuse ids that name two rows (the message ``bctool evaluate``, ``bctool convert`` and
    ``bctool backfill plan`` give): an id is one image, and a query skips its own image in the
    gallery by id.

    ``where`` names the file or role, such as ``the gallery 'g.safetensors'``. The check is
    :func:`has_repeats` (vectorised for a file's ids); the repeated ids are looked up only on the
    way to the error.
    """
    if not has_repeats(ids):
        return
    twice = repeated_ids(ids)
    first = twice[0] if twice else "?"
    raise EmbeddingsError(
        f"{where}: id {first!r} is given twice; ids must be unique ({len(twice)} ids repeat: {shown(twice)}); "
        "give every image its own id (`bctool extract` does) or leave the copies out"
    )


def _hashes(ids: RowIds) -> np.ndarray:
    """:func:`_hash_ids` of every id, a block of ids at a time (the result is 8 bytes an id)."""
    step = _HASH_BLOCK
    return np.concatenate([np.zeros(0, np.uint64)] + [
        _hash_ids(RowIds(ids.offsets[start : start + step + 1], ids.data)) for start in range(0, len(ids), step)])


def _suspects(hashes: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """The rows (sorted) whose hash meets another row's: only they can repeat an id. ``order``:
    ``np.argsort(hashes, kind="stable")`` when the caller has it."""
    order = np.argsort(hashes, kind="stable") if order is None else order
    ordered = hashes[order]
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    return np.unique(np.concatenate([order[same], order[same + 1]])) if same.size else same


def _repeats_among(ids: RowIds, suspects: np.ndarray) -> bool:
    """True when two of the rows ``suspects`` hold one id (they are decoded and compared)."""
    seen = [ids[int(i)] for i in suspects]
    return len(set(seen)) != len(seen)


def _buffers(raw: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and data of byte strings laid end to end."""
    offsets = np.zeros(len(raw) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in raw], out=offsets[1:])
    return offsets, np.frombuffer(b"".join(raw), dtype=np.uint8)


def _cheap_keys(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Per id of ``offsets`` (positions in ``data``): its length, first and last byte in one
    int64 (256 for the bytes of an empty id)."""
    begin, end = np.asarray(offsets[:-1], np.int64), np.asarray(offsets[1:], np.int64)
    lengths = end - begin
    nonempty = lengths > 0
    first = np.full(len(lengths), 256, np.int64)
    last = np.full(len(lengths), 256, np.int64)
    first[nonempty] = data[begin[nonempty]]
    last[nonempty] = data[end[nonempty] - 1]
    return (lengths << 18) | (first << 9) | last


_HASH_BASE = np.uint64(1099511628211)  # FNV's 64-bit prime: any odd number mixes well enough here


def _hash_ids(ids: RowIds) -> np.ndarray:
    """A 64-bit polynomial hash of every id of ``ids`` (uint64, wrapping), vectorised; the
    offsets may be a slice of a larger file's (its data is then read from ``offsets[0]`` on)."""
    first = int(ids.offsets[0]) if len(ids.offsets) else 0
    offsets = ids.offsets - first
    lengths = np.diff(offsets)
    n_bytes = int(offsets[-1]) if len(offsets) else 0
    out = np.zeros(len(ids), dtype=np.uint64)
    if n_bytes == 0:
        return out
    position = np.arange(n_bytes, dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    longest = int(lengths.max())
    powers = np.ones(longest, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(1, longest):
            powers[k] = powers[k - 1] * _HASH_BASE
        data = np.asarray(ids.data[first : first + n_bytes], dtype=np.uint64)
        terms = (data + np.uint64(1)) * powers[position]
    nonempty = lengths > 0
    out[nonempty] = np.add.reduceat(terms, offsets[:-1][nonempty])
    return out + lengths.astype(np.uint64)


def concat_ids(parts: Sequence[Sequence[str]]) -> RowIds:
    """The ids of several files one after the other, as one :class:`RowIds` (buffers joined)."""
    encoded = [RowIds.encode(p) for p in parts]
    data = np.concatenate([np.asarray(e.data[e.offsets[0] : e.offsets[-1]], dtype=np.uint8) for e in encoded]
                          or [np.zeros(0, np.uint8)])
    offsets = [np.zeros(1, np.int64)]
    base = 0
    for e in encoded:
        offsets.append(e.offsets[1:] - e.offsets[0] + base)
        base += int(e.offsets[-1] - e.offsets[0])
    return RowIds(np.concatenate(offsets), data)


def find_rows(ids: Sequence[str], wanted: Sequence[str], where: str = "the ids") -> np.ndarray:
    """The row of ``ids`` holding each id of ``wanted``, -1 where none does: ``(len(wanted),)`` int64.

    ``ids`` must name every row once: a repeated id is refused with :func:`check_unique_ids`'s
    error naming ``where`` (which row would keep it is then no guess); ``wanted`` may repeat ids.
    When either side is a :class:`RowIds` the two are matched as hashed buffers (8 bytes an id,
    candidates then compared byte for byte), with no Python string or dict per row of a file;
    plain lists go through a dict.
    """
    return _find_rows(ids, wanted, where, None)


def pair_rows(left: Sequence[str], right: Sequence[str],
              where: tuple[str, str] = ("the left ids", "the right ids")) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``left`` and ``right`` that hold the same ids: ``(left_rows, right_rows)``, int64,
    ``left_rows`` ascending (left's order) and ``right[right_rows[k]] == left[left_rows[k]]``.

    Ids on one side only are left out (the caller reports them). Neither side may repeat an id:
    :func:`check_unique_ids`'s error names ``where[0]`` or ``where[1]``. Vectorised as
    :func:`find_rows`.
    """
    rows = _find_rows(right, left, where[1], where[0])
    left_rows = np.flatnonzero(rows >= 0).astype(np.int64)
    return left_rows, rows[left_rows]


def _find_rows(ids: Sequence[str], wanted: Sequence[str], where: str, wanted_where: str | None) -> np.ndarray:
    """:func:`find_rows`; ``wanted`` must not repeat an id either when ``wanted_where`` names it."""
    if not isinstance(ids, RowIds) and not isinstance(wanted, RowIds):
        row_of = {image_id: i for i, image_id in enumerate(ids)}
        if len(row_of) != len(ids):
            check_unique_ids(ids, where)
        if wanted_where is not None:
            check_unique_ids(wanted, wanted_where)
        return np.array([row_of.get(image_id, -1) for image_id in wanted], dtype=np.int64)
    ids, wanted = RowIds.encode(ids), RowIds.encode(wanted)
    hashes = _hashes(ids)
    order = np.argsort(hashes, kind="stable")
    if _repeats_among(ids, _suspects(hashes, order)):
        check_unique_ids(ids, where)
    wanted_hashes = _hashes(wanted)
    if wanted_where is not None and _repeats_among(wanted, _suspects(wanted_hashes)):
        check_unique_ids(wanted, wanted_where)
    ordered = hashes[order]
    first = np.searchsorted(ordered, wanted_hashes, side="left")
    count = np.searchsorted(ordered, wanted_hashes, side="right") - first
    rows = np.full(len(wanted), -1, dtype=np.int64)
    one = np.flatnonzero(count == 1)
    candidates = order[first[one]]
    equal = _same_ids(ids, candidates, wanted, one)
    rows[one[equal]] = candidates[equal]
    # Distinct ids of one hash (a collision: rare) are compared one by one.
    for j in np.flatnonzero(count > 1).tolist():
        raw = wanted.data[wanted.offsets[j] : wanted.offsets[j + 1]].tobytes()
        for i in order[first[j] : first[j] + count[j]].tolist():
            if ids.data[ids.offsets[i] : ids.offsets[i + 1]].tobytes() == raw:
                rows[j] = i
                break
    return rows


_COMPARE_BYTES = 1 << 22  # id bytes compared at once: a few arrays of 8 bytes per byte


def _same_ids(a: RowIds, a_rows: np.ndarray, b: RowIds, b_rows: np.ndarray) -> np.ndarray:
    """For every k, whether id ``a_rows[k]`` of ``a`` equals id ``b_rows[k]`` of ``b``, byte for
    byte, vectorised over blocks of about :data:`_COMPARE_BYTES` bytes."""
    a_begin = np.asarray(a.offsets[a_rows], dtype=np.int64)
    b_begin = np.asarray(b.offsets[b_rows], dtype=np.int64)
    lengths = np.asarray(a.offsets[a_rows + 1], dtype=np.int64) - a_begin
    same = lengths == np.asarray(b.offsets[b_rows + 1], dtype=np.int64) - b_begin
    todo = np.flatnonzero(same & (lengths > 0))
    ends = np.cumsum(lengths[todo])
    start = 0
    while start < len(todo):
        done = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, done + _COMPARE_BYTES, side="right")))
        block, n = todo[start:stop], lengths[todo[start:stop]]
        heads = np.cumsum(n) - n
        within = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(heads, n)
        differs = (np.asarray(a.data[np.repeat(a_begin[block], n) + within])
                   != np.asarray(b.data[np.repeat(b_begin[block], n) + within]))
        same[block[np.logical_or.reduceat(differs, heads)]] = False
        start = stop
    return same
