"""Revisited Oxford/Paris ground truth (``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl``).

The pickle holds a dict with ``imlist`` (gallery image names), ``qimlist`` (query image names)
and ``gnd``: one dict per query with ``easy``, ``hard`` and ``junk`` (gallery indices into
``imlist``) and ``bbx`` (the query crop box ``[x1, y1, x2, y2]``).

A pickle can run any code while it loads, and these files come from the internet, so they are
read by an unpickler that only builds plain containers and numpy arrays and refuses every other
global by name.
"""

from __future__ import annotations

import _codecs
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bctool.errors import DataError

logger = logging.getLogger(__name__)

_GND_FIX = (
    "download the ground truth again (gnd_roxford5k.pkl / gnd_rparis6k.pkl from the Revisited "
    "Oxford/Paris site, http://cmp.felk.cvut.cz/revisitop/)"
)
_INDEX_KEYS = ("easy", "hard", "junk")
# What a truncated or corrupt pickle raises while loading.
_UNREADABLE = (
    pickle.UnpicklingError,
    EOFError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
    TypeError,
    ValueError,
    OSError,
    RecursionError,
)


def _numpy_globals() -> dict[str, Any]:
    """The numpy functions that array and scalar pickles name, taken from the installed numpy.

    They are read from numpy's own reduce results rather than imported by module path, because
    numpy 2 renamed ``numpy.core`` to ``numpy._core`` and pickles may use either name.
    """
    array = np.zeros(1)
    return {
        "_reconstruct": array.__reduce__()[0],
        "scalar": np.float64(0).__reduce__()[0],
        "_frombuffer": array.__reduce_ex__(5)[0],
    }


def _bytes(*args: Any) -> bytes:
    """``bytes`` without ``bytes(n)``, which would let a small file allocate n zero bytes."""
    if args and isinstance(args[0], int):
        raise pickle.UnpicklingError("bytes(<size>) is not allowed in a ground-truth file")
    return bytes(*args)


def _bytearray(*args: Any) -> bytearray:
    """``bytearray`` without ``bytearray(n)``, as for :func:`_bytes`."""
    if args and isinstance(args[0], int):
        raise pickle.UnpicklingError("bytearray(<size>) is not allowed in a ground-truth file")
    return bytearray(*args)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    fn = _numpy_globals()
    allowed: dict[tuple[str, str], Any] = {}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = fn["_reconstruct"]
        allowed[(f"{core}.multiarray", "scalar")] = fn["scalar"]
        allowed[(f"{core}.numeric", "_frombuffer")] = fn["_frombuffer"]
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # Protocols 0-2 store bytes (numpy's raw array data) as ``_codecs.encode(text, "latin1")``.
    allowed[("_codecs", "encode")] = _codecs.encode
    for builtins_module in ("builtins", "__builtin__"):  # Python 3 and Python 2 pickles
        for name, obj in (
            ("set", set),
            ("frozenset", frozenset),
            ("complex", complex),
            ("bytes", _bytes),  # protocols 0-2 write empty bytes as ``bytes()``
            ("bytearray", _bytearray),
        ):
            allowed[(builtins_module, name)] = obj
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals plain containers and numpy arrays need."""

    def __init__(self, file: Any, source: str) -> None:
        # latin1 is what numpy documents for arrays pickled by Python 2.
        super().__init__(file, encoding="latin1")
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._source!r} refers to the Python global {module}.{name}, which a ground-truth "
                "file never needs (only lists, dicts and numpy arrays are allowed), so it was not "
                f"loaded; the file may be malicious or not a ground-truth file: {_GND_FIX}"
            ) from None


@dataclass(frozen=True)
class RevisitedGroundTruth:
    """Ground truth of Revisited Oxford/Paris: per query, easy/hard/junk gallery indices and box.

    Indices point into ``gallery_names``; index arrays are int64 and read-only.
    """

    gallery_names: tuple[str, ...]
    query_names: tuple[str, ...]
    easy: tuple[np.ndarray, ...]
    hard: tuple[np.ndarray, ...]
    junk: tuple[np.ndarray, ...]
    bbx: np.ndarray  # (Q, 4) float64, [x1, y1, x2, y2] per query
    source: str = ""

    def __len__(self) -> int:
        return len(self.query_names)


def _names(value: Any, key: str, source: str) -> tuple[str, ...]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataError(
            f"{source!r}: {key!r} must be a list of image names (strings), got "
            f"{type(value).__name__}; {_GND_FIX}"
        )
    if not value:
        raise DataError(f"{source!r}: {key!r} is empty; {_GND_FIX}")
    return tuple(value)


def _indices(value: Any, key: str, query: int, n_gallery: int, source: str) -> np.ndarray:
    where = f"{source!r}: gnd[{query}][{key!r}]"
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where} is not a list of gallery indices ({exc}); {_GND_FIX}") from exc
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise DataError(
            f"{where} must be a flat list of integer gallery indices, got {arr.dtype} array of "
            f"shape {arr.shape}; {_GND_FIX}"
        )
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n_gallery):
        bad = arr[(arr < 0) | (arr >= n_gallery)]
        raise DataError(
            f"{where} holds index {int(bad[0])}, outside [0, {n_gallery - 1}] (imlist has "
            f"{n_gallery} names); {_GND_FIX}"
        )
    arr.setflags(write=False)
    return arr


def _box(value: Any, query: int, source: str) -> np.ndarray:
    where = f"{source!r}: gnd[{query}]['bbx']"
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where} must be 4 numbers [x1, y1, x2, y2] ({exc}); {_GND_FIX}") from exc
    if arr.shape != (4,) or not np.all(np.isfinite(arr)):
        raise DataError(
            f"{where} must be 4 finite numbers [x1, y1, x2, y2], got {np.asarray(value).tolist()!r}; "
            f"{_GND_FIX}"
        )
    return arr


def _read_pickle(path: Path) -> Any:
    source = str(path)
    if not path.is_file():
        raise DataError(f"ground-truth file {source!r} does not exist; {_GND_FIX}")
    try:
        with path.open("rb") as fh:
            return _RestrictedUnpickler(fh, source).load()
    except DataError:
        raise
    except _UNREADABLE as exc:
        raise DataError(f"{source!r} is not a readable ground-truth pickle ({exc}); {_GND_FIX}") from exc


def _check_structure(data: Any, source: str) -> RevisitedGroundTruth:
    if not isinstance(data, dict):
        raise DataError(
            f"{source!r} holds a {type(data).__name__}, not a dict with imlist, qimlist and gnd; "
            f"{_GND_FIX}"
        )
    missing = [key for key in ("imlist", "qimlist", "gnd") if key not in data]
    if missing:
        raise DataError(
            f"{source!r} lacks the key(s) {missing} (found {sorted(map(str, data))}); {_GND_FIX}"
        )
    gallery = _names(data["imlist"], "imlist", source)
    queries = _names(data["qimlist"], "qimlist", source)
    if len(set(gallery)) != len(gallery):
        names, counts = np.unique(np.array(gallery, dtype=object), return_counts=True)
        raise DataError(
            f"{source!r}: 'imlist' names {names[counts > 1][0]!r} more than once; {_GND_FIX}"
        )
    entries = data["gnd"]
    if not isinstance(entries, (list, tuple)) or len(entries) != len(queries):
        got = f"{len(entries)} entries" if isinstance(entries, (list, tuple)) else type(entries).__name__
        raise DataError(
            f"{source!r}: 'gnd' must be a list with one dict per query ({len(queries)} queries in "
            f"'qimlist'), got {got}; {_GND_FIX}"
        )
    per_key: dict[str, list[np.ndarray]] = {key: [] for key in _INDEX_KEYS}
    boxes = []
    for q, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(
                f"{source!r}: gnd[{q}] (query {queries[q]!r}) must be a dict, got "
                f"{type(entry).__name__}; {_GND_FIX}"
            )
        absent = [key for key in (*_INDEX_KEYS, "bbx") if key not in entry]
        if absent:
            raise DataError(
                f"{source!r}: gnd[{q}] (query {queries[q]!r}) lacks the key(s) {absent}; {_GND_FIX}"
            )
        for key in _INDEX_KEYS:
            per_key[key].append(_indices(entry[key], key, q, len(gallery), source))
        boxes.append(_box(entry["bbx"], q, source))
    bbx = np.stack(boxes)
    bbx.setflags(write=False)
    return RevisitedGroundTruth(
        gallery_names=gallery,
        query_names=queries,
        easy=tuple(per_key["easy"]),
        hard=tuple(per_key["hard"]),
        junk=tuple(per_key["junk"]),
        bbx=bbx,
        source=source,
    )


def load_gnd(path: str | os.PathLike[str]) -> RevisitedGroundTruth:
    """Read and validate a Revisited Oxford/Paris ground-truth pickle, safely."""
    path = Path(path)
    gnd = _check_structure(_read_pickle(path), str(path))
    logger.info(
        "%s: %d queries, %d gallery images", path, len(gnd.query_names), len(gnd.gallery_names)
    )
    return gnd

