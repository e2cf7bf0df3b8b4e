"""Relevance judgments and rankings in the TREC layouts that trec_eval, ir-measures and
pytrec_eval read.

- qrels: ``QUERY_ID ITERATION DOC_ID RELEVANCE`` per line (whitespace-separated; the iteration
  column is ignored, 0 by convention; relevance an integer, graded: 0 not relevant, 1 and more
  relevant, negative values allowed and never relevant);
- run: ``QUERY_ID Q0 DOC_ID RANK SCORE TAG`` per line.

Ids are embedding ids (image paths relative to the dataset root, without extension); a judgment
may also name an image by its file stem (``all_souls_1`` for ``jpg/all_souls_1``), as the
benchmarks' own ground truths do.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bctool.errors import DataError
from bctool.utils.io import atomic_path

if TYPE_CHECKING:
    from bctool.embeddings import Embeddings

_LAYOUT = "QUERY_ID ITERATION DOC_ID RELEVANCE (e.g. `q1 0 doc7 2`)"


@dataclass(frozen=True)
class Qrels:
    """Graded judgments: ``judgments[query_id][doc_id]`` is the relevance (an int)."""

    judgments: dict[str, dict[str, int]]
    source: str = ""

    def __len__(self) -> int:
        return len(self.judgments)

    def pairs(self) -> int:
        """How many (query, document) judgments there are."""
        return sum(len(docs) for docs in self.judgments.values())


def read_qrels(path: str | os.PathLike[str]) -> Qrels:
    """Read a TREC qrels file; a malformed line, or a pair judged twice with two values, is a
    :class:`DataError` naming the line and the layout."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the qrels file {str(p)!r}: {exc}; give a text file of {_LAYOUT}") from exc
    judgments: dict[str, dict[str, int]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) != 4:
            raise DataError(f"{str(p)!r} line {number}: {len(parts)} fields in {line.strip()!r}; "
                            f"a qrels line is {_LAYOUT}")
        query, _, doc, value = parts
        try:
            relevance = int(value)
        except ValueError:
            raise DataError(f"{str(p)!r} line {number}: relevance {value!r} is not an integer; a qrels line is "
                            f"{_LAYOUT}") from None
        known = judgments.setdefault(query, {}).get(doc)
        if known is not None and known != relevance:
            raise DataError(f"{str(p)!r} line {number}: query {query!r} judges {doc!r} twice ({known} and "
                            f"{relevance}); keep one judgment per pair")
        judgments[query][doc] = relevance
    if not judgments:
        raise DataError(f"{str(p)!r} holds no judgment; a qrels file has lines of {_LAYOUT}")
    return Qrels(judgments, str(p))


def write_qrels(path: str | os.PathLike[str], qrels: Qrels) -> None:
    """Write ``qrels`` in the TREC layout, atomically, queries and documents in sorted order."""
    lines = [f"{q} 0 {d} {r}\n" for q in sorted(qrels.judgments) for d, r in sorted(qrels.judgments[q].items())]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(lines), encoding="utf-8")


def qrels_from_labels(query_ids: Sequence[str], query_labels: np.ndarray, gallery_ids: Sequence[str],
                      gallery_labels: np.ndarray) -> Qrels:
    """Binary judgments from class labels: every gallery image with a query's label is relevant
    (1) to it, the same relevance the labelled protocol uses (unlabelled rows, -1, judge nothing)."""
    by_label: dict[int, list[str]] = {}
    for doc, label in zip(gallery_ids, np.asarray(gallery_labels).tolist()):
        if label >= 0:
            by_label.setdefault(label, []).append(doc)
    judgments = {}
    for query, label in zip(query_ids, np.asarray(query_labels).tolist()):
        docs = [d for d in by_label.get(label, []) if d != query]  # an image is not its own result
        if label >= 0 and docs:
            judgments[query] = dict.fromkeys(docs, 1)
    return Qrels(judgments)


def run_lines(query_ids: Sequence[str], ranked: Iterable[tuple[Sequence[str], Sequence[float]]],
              tag: str = "bctool") -> Iterable[str]:
    """Lines of a TREC run file: for each query its ranked documents with their scores."""
    for query, (docs, scores) in zip(query_ids, ranked):
        for rank, (doc, score) in enumerate(zip(docs, scores), 1):
            yield f"{query} Q0 {doc} {rank} {float(score):.6f} {tag}\n"


def write_run(path: str | os.PathLike[str], query: Embeddings, gallery: Embeddings, depth: int,
              tag: str = "bctool") -> int:
    """Search ``gallery`` for every query (exact, cosine) and write the first ``depth`` results of
    each as a TREC run file, in trec_eval's order (score descending, ties by document id
    descending), atomically; return the lines written."""
    from bctool.evaluate.protocols.qrels.metric import trec_order
    from bctool.evaluate.search import stream_rankings

    ids = np.array(list(gallery.ids), dtype=object)
    doc_rank = np.empty(len(ids), dtype=np.int64)
    doc_rank[np.argsort(ids, kind="stable")] = np.arange(len(ids))
    scores, ranked = stream_rankings(query.normalized_embeddings(), gallery.embeddings, min(depth, len(gallery)),
                                     normalize=True)
    written = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for q, (s, r) in zip(query.ids, zip(scores, ranked)):
            order = trec_order(s, doc_rank[r])
            for line in run_lines([q], [(ids[r[order]], s[order])], tag):
                out.write(line)
                written += 1
    return written
