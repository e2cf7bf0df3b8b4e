"""Google Landmarks v2 (GLDv2) files: its CSV files and its image layout.

Files (https://github.com/cvdfoundation/google-landmark):

- ``retrieval_solution_v2.1.csv``: ``id,images,Usage``; ``images`` lists the relevant index
  image ids separated by spaces (``None`` for ignored queries); ``Usage`` is ``Public``,
  ``Private`` or ``Ignored``;
- ``train.csv``: ``id,url,landmark_id`` (also ``id,landmark_id``), or the clean variant
  ``train_clean.csv``: ``landmark_id,images`` with space-separated image ids;
- ``index.csv`` / ``test.csv``: ``id`` or ``id,url``.

Image ``0123456789abcdef`` is stored as ``0/1/2/0123456789abcdef.jpg``; ``bctool dataset gldv2``
writes a list file of the images a CSV names (:func:`write_gldv2_list`). The retrieval metric
(mAP@100) is :mod:`bctool.evaluate.protocols.gldv2.metric`.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bctool.errors import DataError
from bctool.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

USAGES = ("Public", "Private")
IGNORED = "Ignored"
_SOLUTION_HEADER = ("id", "images", "Usage")
_GLDV2_FIX = "download it again from https://github.com/cvdfoundation/google-landmark"
_HEX_ID = re.compile(r"[0-9a-fA-F]{3,}")
_WHITESPACE = re.compile(r"\s")


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


def is_train_csv(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a labelled train CSV: its header line names ``landmark_id``.

    Only the header line is read (train.csv is hundreds of MB); a missing or unreadable file
    is not a train CSV, so reading it as an index/test CSV reports the problem.
    """
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, encoding="utf-8", errors="replace") as fh:
        return "landmark_id" in fh.readline()


def read_image_csv(path: str | os.PathLike[str]) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """Image ids of any GLDv2 image CSV and their landmark ids, or None for an index/test CSV.

    A train CSV (:func:`is_train_csv`) is read by :func:`read_train_csv`, anything else by
    :func:`read_index_or_test_csv`.
    """
    if is_train_csv(path):
        return read_train_csv(path)
    return read_index_or_test_csv(path), None


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


def write_gldv2_list(
    csv_path: str | os.PathLike[str], root: str | os.PathLike[str], out_path: str | os.PathLike[str]
) -> dict[str, str | int | bool]:
    """Write the bctool list file of the images a GLDv2 CSV names (:func:`read_image_csv`),
    stored under ``root``; return ``{"out", "images" (lines written), "labelled"}``."""
    ids, labels = read_image_csv(csv_path)
    count = write_list_file(root, ids, labels, out_path)
    return {"out": str(out_path), "images": count, "labelled": labels is not None}
