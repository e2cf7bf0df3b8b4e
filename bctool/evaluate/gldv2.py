"""Google Landmarks v2 (GLDv2): its CSV files, its image layout and retrieval mAP@100.

Files (https://github.com/cvdfoundation/google-landmark):

- ``retrieval_solution_v2.1.csv``: ``id,images,Usage``; ``images`` lists the relevant index
  image ids separated by spaces (``None`` for ignored queries); ``Usage`` is ``Public``,
  ``Private`` or ``Ignored``;
- ``train.csv``: ``id,url,landmark_id`` (also ``id,landmark_id``), or the clean variant
  ``train_clean.csv``: ``landmark_id,images`` with space-separated image ids;
- ``index.csv`` / ``test.csv``: ``id`` or ``id,url``.

Image ``0123456789abcdef`` is stored as ``0/1/2/0123456789abcdef.jpg``.

The metric follows the official Kaggle scorer (``MeanAveragePrecision`` in
tensorflow/models ``delf/python/datasets/google_landmarks_dataset/metrics.py``):
``AP@100_q = (1 / min(m_q, 100)) * sum_{k <= 100} P_q(k) rel_q(k)``, where ``m_q`` is the
number of relevant images the solution lists for ``q``, whether or not they are in the gallery
that was searched: a relevant image missing from the gallery counts as missed. Public and
Private are scored apart, as on Kaggle; ``map@100`` is the mean over both.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bctool.embeddings import Embeddings
from bctool.errors import ConfigError, DataError, EmbeddingsError
from bctool.evaluate.gnd import match_rows
from bctool.evaluate.metrics import QueryAP, average_precision_at_k
from bctool.evaluate.search import iter_rankings
from bctool.io import atomic_write_text

logger = logging.getLogger(__name__)

USAGES = ("Public", "Private")
IGNORED = "Ignored"
_SOLUTION_HEADER = ("id", "images", "Usage")
_GLDV2_FIX = "download it again from https://github.com/cvdfoundation/google-landmark"
_HEX_ID = re.compile(r"[0-9a-fA-F]{3,}")
_WHITESPACE = re.compile(r"\s")
# Most (queries x ranks) entries of rankings and relevance masks held at once.
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class GLDv2Solution:
    """Retrieval ground truth: per scored query, its relevant index ids and its Usage.

    Ignored queries are not kept. ``relevant_ids[i]`` holds distinct ids, in file order.
    """

    query_ids: tuple[str, ...]
    relevant_ids: tuple[tuple[str, ...], ...]
    usage: tuple[str, ...]  # "Public" or "Private" per query
    source: str = ""

    def __post_init__(self) -> None:
        n = len(self.query_ids)
        if len(self.relevant_ids) != n or len(self.usage) != n:
            raise DataError(
                f"a GLDv2 solution needs one relevant-id list and one Usage per query: got "
                f"{n} queries, {len(self.relevant_ids)} lists and {len(self.usage)} usages"
            )

    def __len__(self) -> int:
        return len(self.query_ids)


# ---------------------------------------------------------------------------------------------
# CSV reading


def _open_rows(path: Path, what: str) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of every non-blank CSV record of ``path``, header included."""
    if not path.is_file():
        raise DataError(f"{what} {str(path)!r} does not exist; {_GLDV2_FIX}")
    try:
        # utf-8-sig: a byte-order mark must not end up in the first header name.
        with path.open("r", encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            for row in reader:
                if row and any(field.strip() for field in row):
                    yield reader.line_num, [field.strip() for field in row]
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {str(path)!r} is not UTF-8 text ({exc}); {_GLDV2_FIX}") from exc
    except csv.Error as exc:
        raise DataError(
            f"{what} {str(path)!r} is not a readable CSV file ({exc}); {_GLDV2_FIX}"
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from exc


def _header(
    rows: Iterator[tuple[int, list[str]]], path: Path, allowed: Sequence[tuple[str, ...]], what: str
) -> tuple[str, ...]:
    first = next(rows, None)
    if first is None:
        raise DataError(f"{what} {str(path)!r} is empty; {_GLDV2_FIX}")
    lineno, header = first
    if tuple(header) not in allowed:
        choices = " or ".join(repr(",".join(h)) for h in allowed)
        raise DataError(
            f"{path}:{lineno}: header must be {choices}, got {','.join(header)!r}; pass the "
            f"GLDv2 {what} (or {_GLDV2_FIX})"
        )
    return tuple(header)


def _fields(row: list[str], header: tuple[str, ...], lineno: int, path: Path) -> dict[str, str]:
    if len(row) != len(header):
        raise DataError(
            f"{path}:{lineno}: expected {len(header)} fields ({','.join(header)}), got {len(row)} "
            f"in {','.join(row)!r}; quote fields that contain commas or {_GLDV2_FIX}"
        )
    return dict(zip(header, row))


def _image_id(value: str, field: str, lineno: int, path: Path) -> str:
    if not value or _WHITESPACE.search(value):
        raise DataError(
            f"{path}:{lineno}: {field} {value!r} is not an image id (a non-empty string without "
            f"spaces, such as '0123456789abcdef'); {_GLDV2_FIX}"
        )
    return value


def _id_list(value: str, field: str, lineno: int, path: Path) -> tuple[str, ...]:
    ids = value.split()
    if not ids or value == "None":
        raise DataError(
            f"{path}:{lineno}: {field} is {value!r}, but it must list at least one image id "
            f"separated by spaces; {_GLDV2_FIX}"
        )
    return tuple(dict.fromkeys(ids))  # distinct, in file order


def _check_unique(ids: Sequence[str], lines: Sequence[int], path: Path, what: str) -> None:
    seen: dict[str, int] = {}
    for image_id, lineno in zip(ids, lines):
        if image_id in seen:
            raise DataError(
                f"{path}:{lineno}: {what} {image_id!r} appears again (first on line "
                f"{seen[image_id]}); every id must appear once: {_GLDV2_FIX}"
            )
        seen[image_id] = lineno


def read_retrieval_solution(path: str | os.PathLike[str]) -> GLDv2Solution:
    """Read and validate ``retrieval_solution_v2.1.csv``; Ignored queries are dropped."""
    path = Path(path)
    what = "retrieval solution (retrieval_solution_v2.1.csv)"
    rows = _open_rows(path, what)
    header = _header(rows, path, [_SOLUTION_HEADER], what)
    query_ids: list[str] = []
    relevant: list[tuple[str, ...]] = []
    usage: list[str] = []
    lines: list[int] = []
    ignored = 0
    for lineno, row in rows:
        fields = _fields(row, header, lineno, path)
        query = _image_id(fields["id"], "query id", lineno, path)
        tag = fields["Usage"]
        if tag == IGNORED:
            ignored += 1
            continue
        if tag not in USAGES:
            raise DataError(
                f"{path}:{lineno}: Usage {tag!r} of query {query!r} must be one of "
                f"{[*USAGES, IGNORED]}; {_GLDV2_FIX}"
            )
        query_ids.append(query)
        relevant.append(_id_list(fields["images"], f"images of query {query!r}", lineno, path))
        usage.append(tag)
        lines.append(lineno)
    _check_unique(query_ids, lines, path, "query id")
    if not query_ids:
        raise DataError(
            f"{what} {str(path)!r} has no Public or Private query ({ignored} Ignored); {_GLDV2_FIX}"
        )
    logger.info("%s: %d queries scored, %d ignored", path, len(query_ids), ignored)
    return GLDv2Solution(tuple(query_ids), tuple(relevant), tuple(usage), str(path))


def read_train_csv(path: str | os.PathLike[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Image ids and their landmark ids (as strings) from ``train.csv`` or ``train_clean.csv``.

    ``train.csv`` has ``id,url,landmark_id`` (Kaggle's copy ``id,landmark_id``);
    ``train_clean.csv`` has ``landmark_id,images`` with the class's image ids separated by spaces.
    """
    path = Path(path)
    what = "train CSV (train.csv or train_clean.csv)"
    rows = _open_rows(path, what)
    header = _header(
        rows,
        path,
        [("id", "url", "landmark_id"), ("id", "landmark_id"), ("landmark_id", "images")],
        what,
    )
    ids: list[str] = []
    labels: list[str] = []
    lines: list[int] = []
    for lineno, row in rows:
        fields = _fields(row, header, lineno, path)
        label = _image_id(fields["landmark_id"], "landmark_id", lineno, path)
        if "images" in fields:
            members = _id_list(fields["images"], f"images of landmark {label!r}", lineno, path)
        else:
            members = (_image_id(fields["id"], "image id", lineno, path),)
        ids.extend(members)
        labels.extend([label] * len(members))
        lines.extend([lineno] * len(members))
    _check_unique(ids, lines, path, "image id")
    if not ids:
        raise DataError(f"{what} {str(path)!r} lists no images; {_GLDV2_FIX}")
    return tuple(ids), tuple(labels)


def read_index_or_test_csv(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Image ids from ``index.csv`` or ``test.csv`` (header ``id`` or ``id,url``)."""
    path = Path(path)
    what = "index/test CSV (index.csv or test.csv)"
    rows = _open_rows(path, what)
    header = _header(rows, path, [("id",), ("id", "url")], what)
    ids: list[str] = []
    lines: list[int] = []
    for lineno, row in rows:
        fields = _fields(row, header, lineno, path)
        ids.append(_image_id(fields["id"], "image id", lineno, path))
        lines.append(lineno)
    _check_unique(ids, lines, path, "image id")
    if not ids:
        raise DataError(f"{what} {str(path)!r} lists no images; {_GLDV2_FIX}")
    return tuple(ids)


# ---------------------------------------------------------------------------------------------
# Image layout and list files


def gldv2_image_path(root: str | os.PathLike[str], image_id: str) -> Path:
    """Where GLDv2 stores ``image_id`` under ``root``: ``root/a/b/c/abc....jpg``."""
    if not isinstance(image_id, str) or not _HEX_ID.fullmatch(image_id):
        raise DataError(
            f"GLDv2 image id {image_id!r} must be a hexadecimal string of at least 3 characters "
            "(such as '0123456789abcdef'); take ids from the GLDv2 CSV files"
        )
    return Path(root) / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def _list_line(rel: str, label: str | None, image_id: str) -> str:
    if label is None:
        if _WHITESPACE.search(rel):
            raise DataError(
                f"image path {rel!r} of {image_id!r} contains whitespace, which an unlabelled list "
                "line cannot hold; write the list file into a folder whose path has no spaces"
            )
        return rel
    if not label or _WHITESPACE.search(label):
        raise DataError(
            f"label {label!r} of image {image_id!r} must be a non-empty string without spaces "
            "or tabs (GLDv2 landmark ids are integers)"
        )
    if "\t" in rel or "\n" in rel:
        raise DataError(f"image path {rel!r} contains a tab or newline; move the dataset root")
    return f"{rel}\t{label}"


def write_list_file(
    root: str | os.PathLike[str],
    ids: Sequence[str],
    labels: Sequence[str] | None,
    out_path: str | os.PathLike[str],
) -> int:
    """Write a bctool list file for GLDv2 images under ``root``; return the number of lines.

    One ``PATH<TAB>LABEL`` line per image (``PATH`` alone when ``labels`` is None), ``PATH``
    relative to the list file's folder. Written atomically.
    """
    if labels is not None and len(labels) != len(ids):
        raise DataError(f"{len(ids)} image ids but {len(labels)} labels; pass one label per id")
    if not ids:
        raise DataError("no image ids to write; a list file must name at least one image")
    out = Path(out_path)
    folder = os.path.abspath(out.parent if str(out.parent) else Path("."))
    lines = []
    for i, image_id in enumerate(ids):
        absolute = os.path.abspath(gldv2_image_path(root, image_id))
        rel = Path(os.path.relpath(absolute, folder)).as_posix()
        if rel.startswith("#"):  # would read as a comment
            rel = f"./{rel}"
        lines.append(_list_line(rel, None if labels is None else str(labels[i]), image_id))
    atomic_write_text(out, "\n".join(lines) + "\n")
    logger.info("wrote %d GLDv2 images to %s", len(lines), out)
    return len(lines)


# ---------------------------------------------------------------------------------------------
# Evaluation


def _stem(image_id: str) -> str:
    return image_id.rsplit("/", 1)[-1]


def _gallery_stems(gallery: Embeddings) -> np.ndarray:
    """File stem of every gallery row, as a numpy string array; stems must be unique."""
    stems = np.array([_stem(i) for i in gallery.ids], dtype=str)
    values, first, counts = np.unique(stems, return_index=True, return_counts=True)
    if np.any(counts > 1):
        name = str(values[counts > 1][0])
        clash = [image_id for image_id in gallery.ids if _stem(image_id) == name][:5]
        raise EmbeddingsError(
            f"gallery image {name!r} matches {int(counts[counts > 1][0])} embedding rows "
            f"({clash}); extract each GLDv2 index image once so every image name is unique"
        )
    return stems


def _relevance_keys(
    solution: GLDv2Solution, gallery_stems: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``query * G + gallery_row`` keys of the relevant pairs present in the gallery,
    and the number of relevant ids per query (``m_q``, counted from the solution)."""
    n_gallery = len(gallery_stems)
    lengths = np.array([len(r) for r in solution.relevant_ids], dtype=np.int64)
    flat = np.array([i for r in solution.relevant_ids for i in r], dtype=str)
    query = np.repeat(np.arange(len(solution), dtype=np.int64), lengths)
    order = np.argsort(gallery_stems, kind="stable")
    sorted_stems = gallery_stems[order]
    pos = np.minimum(np.searchsorted(sorted_stems, flat), n_gallery - 1)
    found = sorted_stems[pos] == flat if flat.size else np.zeros(0, dtype=bool)
    keys = np.unique(query[found] * n_gallery + order[pos[found]])
    missing = int(flat.size - found.sum())
    if missing:
        logger.warning(
            "%d of %d relevant index images are not in the gallery; they count as missed",
            missing,
            flat.size,
        )
    return keys, lengths


def _block_relevance(
    keys: np.ndarray, start: int, indices: np.ndarray, n_gallery: int
) -> np.ndarray:
    """Bool ``(B, K)``: is ``indices[i, r]`` relevant to query ``start + i``."""
    rows = indices.shape[0]
    lo, hi = np.searchsorted(keys, [start * n_gallery, (start + rows) * n_gallery])
    query = np.arange(start, start + rows, dtype=np.int64)[:, None]
    return np.isin(query * n_gallery + indices, keys[lo:hi])


def evaluate_gldv2(
    query: Embeddings,
    gallery: Embeddings,
    solution: GLDv2Solution,
    k: int = 100,
    *,
    block_size: int | None = None,
) -> dict[str, float | int]:
    """mAP@k of the GLDv2 retrieval task (k = 100 is the official metric).

    Query rows are found by id or file stem (:func:`match_rows`); every gallery row is ranked,
    and is the index image named by its file stem. Keys: ``map@{k}`` (all scored queries),
    ``map@{k}_public``, ``map@{k}_private`` (NaN when a subset has no query), ``queries``,
    ``queries_public``, ``queries_private``, ``gallery``. Ties are ranked by gallery index.
    """
    return _evaluate(query, gallery, solution, k, block_size)[0]


def evaluate_gldv2_per_query(
    query: Embeddings,
    gallery: Embeddings,
    solution: GLDv2Solution,
    k: int = 100,
    *,
    block_size: int | None = None,
) -> tuple[dict[str, float | int], QueryAP]:
    """:func:`evaluate_gldv2`'s metrics and the AP@k of every scored query (the ``map@{k}``
    key), named by the solution's query ids, in its order."""
    result, ap = _evaluate(query, gallery, solution, k, block_size)
    return result, QueryAP(tuple(solution.query_ids), ap)


def _evaluate(
    query: Embeddings,
    gallery: Embeddings,
    solution: GLDv2Solution,
    k: int,
    block_size: int | None,
) -> tuple[dict[str, float | int], np.ndarray]:
    """The body of :func:`evaluate_gldv2`, plus the AP@k of every scored query."""
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if query.dim != gallery.dim:
        raise EmbeddingsError(
            f"query embeddings have dimension {query.dim} but gallery embeddings have dimension "
            f"{gallery.dim}; extract query and gallery with models of the same embedding dimension"
        )
    if len(gallery) == 0:
        raise EmbeddingsError("the gallery embeddings have no rows; extract the GLDv2 index images")
    q_emb = query.normalized_embeddings()[match_rows(query, solution.query_ids, "query")]
    g_emb = gallery.normalized_embeddings()
    n_gallery = g_emb.shape[0]
    keys, n_pos = _relevance_keys(solution, _gallery_stems(gallery))

    depth = min(k, n_gallery)
    rows = block_size or max(1, _BLOCK_ELEMENTS // depth)
    ap = np.zeros(len(solution), dtype=np.float64)
    for start, _, indices in iter_rankings(q_emb, g_emb, depth, block_size=rows):
        stop = start + indices.shape[0]
        rel = _block_relevance(keys, start, indices, n_gallery)
        ap[start:stop] = average_precision_at_k(rel, n_pos[start:stop], k)

    usage = np.array(solution.usage)
    name = f"map@{k}"
    result: dict[str, float | int] = {name: float(ap.mean()), "queries": len(solution)}
    for tag in USAGES:
        chosen = usage == tag
        count = int(chosen.sum())
        result[f"{name}_{tag.lower()}"] = float(ap[chosen].mean()) if count else float("nan")
        result[f"queries_{tag.lower()}"] = count
    result["gallery"] = n_gallery
    logger.info(
        "GLDv2 evaluation: %d queries against %d gallery images, %s %.4f",
        len(solution),
        n_gallery,
        name,
        result[name],
    )
    return result, ap
