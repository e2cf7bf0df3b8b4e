"""A retrieval protocol: the share of queries whose first result has their label.

Selected by ``bctool evaluate --truth recall_truth=FILE``: FILE lists the query ids to score, one a
line (a protocol names the ground-truth file that selects it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bctool.embeddings import Embeddings
from bctool.evaluate.metrics import QueryAP
from bctool.evaluate.protocols import ProtocolOptions, register_protocol
from bctool.evaluate.search import rank_gallery


@register_protocol("recall-at-1", title="recall at rank 1 of listed queries", headline="recall@1",
                   columns=("recall@1", "queries"), option="recall_truth")
def build(options: ProtocolOptions):  # noqa: ANN201 - (evaluate, per_query)
    wanted = set(Path(options.given()["recall_truth"]).read_text().split())

    def per_query(query: Embeddings, gallery: Embeddings) -> tuple[dict, QueryAP]:
        rows = np.array([i for i, name in enumerate(query.ids) if name in wanted], dtype=np.int64)
        _, top = rank_gallery(np.asarray(query.embeddings[rows]), gallery.embeddings, k=1, normalize=True)
        # Labels are positions in each file's own label_names: compare the names.
        query_names = [query.label_names[label] for label in query.labels[rows]]
        found = [gallery.label_names[gallery.labels[row]] for row in top[:, 0]]
        hits = np.array([a == b for a, b in zip(query_names, found)], dtype=np.float64)
        ids = tuple(query.ids[i] for i in rows)
        return {"recall@1": float(hits.mean()) if len(hits) else 0.0, "queries": len(rows)}, QueryAP(ids, hits)

    return (lambda query, gallery: per_query(query, gallery)[0]), per_query
