"""Evaluation time against raw faiss search time for a large gallery (one run each).

    python benchmarks/eval_scale.py                      # 1,000 queries x 1,000,000 x 256
    python benchmarks/eval_scale.py --quick              # a small run, seconds
    python benchmarks/eval_scale.py --gallery-size 200000 --index ivf

Writes a seeded, clustered gallery and query set as bctool embeddings files in a temporary
folder (the gallery in blocks, so generating it needs little memory), then times, each in a
fresh process so that its peak RSS is its own:

(a) raw faiss: ``IndexFlatIP`` add of the memory-mapped gallery + search k=100;
(b) ``evaluate_retrieval(query, load_embeddings(gallery, mmap=True), top_k=100)``, loading
    included.

Each is run twice, alternating, and the faster run of each is reported.

Peak RSS counts the pages of the memory-mapped gallery that were touched (page cache, which
the OS can drop), on top of the index itself.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

from _common import in_fresh_process, peak_rss_mib

import numpy as np

from bctool.embeddings import FORMAT, FORMAT_VERSION, Embeddings, save_embeddings

_BLOCK_ROWS = 100_000


def _centers(n_classes: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_classes, dim)).astype(np.float32)


def _rows(centers: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal((labels.size, centers.shape[1]), dtype=np.float32)
    return centers[labels] + 1.5 * noise


def write_gallery(path: Path, n: int, dim: int, n_classes: int, seed: int) -> None:
    """A safetensors embeddings file written block by block (same layout as save_embeddings)."""
    centers = _centers(n_classes, dim, seed)
    rng = np.random.default_rng(seed + 1)
    labels = rng.integers(0, n_classes, n).astype(np.int64)
    emb_bytes = 4 * n * dim
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ids": json.dumps([f"g/{i}" for i in range(n)]),
        "label_names": json.dumps([f"class{i}" for i in range(n_classes)]),
        "model": json.dumps({"arch": "synthetic"}),
        "normalized": "false",
        "root": "",
    }
    header = {
        "__metadata__": metadata,
        "embeddings": {"dtype": "F32", "shape": [n, dim], "data_offsets": [0, emb_bytes]},
        "labels": {"dtype": "I64", "shape": [n], "data_offsets": [emb_bytes, emb_bytes + 8 * n]},
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for start in range(0, n, _BLOCK_ROWS):
            fh.write(_rows(centers, labels[start : start + _BLOCK_ROWS], rng).astype("<f4").tobytes())
        fh.write(labels.astype("<i8").tobytes())


def write_queries(path: Path, n: int, dim: int, n_classes: int, seed: int) -> None:
    centers = _centers(n_classes, dim, seed)
    rng = np.random.default_rng(seed + 2)
    labels = rng.integers(0, n_classes, n).astype(np.int64)
    save_embeddings(
        Embeddings(
            embeddings=_rows(centers, labels, rng),
            labels=labels,
            ids=[f"q/{i}" for i in range(n)],
            label_names=[f"class{i}" for i in range(n_classes)],
            model={"arch": "synthetic"},
        ),
        path,
    )



def _raw_faiss(query_path: str, gallery_path: str, k: int, out: mp.Queue) -> None:
    import faiss

    from bctool.embeddings import load_embeddings

    query = load_embeddings(query_path).embeddings
    gallery = load_embeddings(gallery_path, mmap=True).embeddings
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(gallery.shape[1])
    for start in range(0, gallery.shape[0], _BLOCK_ROWS):
        index.add(np.ascontiguousarray(gallery[start : start + _BLOCK_ROWS]))
    index.search(query, k)
    out.put((time.perf_counter() - t0, peak_rss_mib(), None))


def _evaluate(query_path: str, gallery_path: str, k: int, index: str, out: mp.Queue) -> None:
    from bctool.embeddings import load_embeddings
    from bctool.evaluate.retrieval import evaluate_retrieval

    t0 = time.perf_counter()
    query = load_embeddings(query_path)
    gallery = load_embeddings(gallery_path, mmap=True)
    metrics = evaluate_retrieval(query, gallery, top_k=k, index=index)
    out.put((time.perf_counter() - t0, peak_rss_mib(), metrics))



def run(gallery_size: int, queries: int, dim: int, n_classes: int, index: str, k: int, seed: int) -> dict:
    """Write the files, time (a) and (b), return the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        g_path, q_path = Path(tmp) / "gallery.safetensors", Path(tmp) / "query.safetensors"
        t0 = time.perf_counter()
        write_gallery(g_path, gallery_size, dim, n_classes, seed)
        write_queries(q_path, queries, dim, n_classes, seed)
        print(f"wrote {gallery_size} x {dim} gallery in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        # Alternate (a, b, a, b) and keep each one's faster run, so neither pays alone for a
        # cold page cache or a disk still flushing the freshly written gallery.
        raw_runs, eval_runs = [], []
        for _ in range(2):
            raw_runs.append(in_fresh_process(_raw_faiss, str(q_path), str(g_path), k))
            eval_runs.append(in_fresh_process(_evaluate, str(q_path), str(g_path), k, index))
        raw_s, raw_rss, _ = min(raw_runs, key=lambda r: r[0])
        eval_s, eval_rss, metrics = min(eval_runs, key=lambda r: r[0])
        print(f"raw faiss runs {[round(r[0], 2) for r in raw_runs]} s, evaluate runs "
              f"{[round(r[0], 2) for r in eval_runs]} s", file=sys.stderr)
    return {
        "gallery": gallery_size,
        "queries": queries,
        "dim": dim,
        "index": index,
        "k": k,
        "raw_faiss_flat_s": round(raw_s, 2),
        "evaluate_s": round(eval_s, 2),
        "ratio": round(eval_s / raw_s, 3),
        "raw_faiss_peak_rss_mib": round(raw_rss),
        "evaluate_peak_rss_mib": round(eval_rss),
        "metrics": metrics,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery-size", type=int, default=1_000_000, help="gallery rows")
    parser.add_argument("--queries", type=int, default=1_000, help="query rows")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension")
    parser.add_argument("--classes", type=int, default=10_000, help="label classes")
    parser.add_argument("--index", default="flat", choices=("flat", "ivf", "hnsw"), help="index evaluated")
    parser.add_argument("--k", type=int, default=100, help="top k searched and scored")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--quick", action="store_true", help="small run: 20,000 x 64, 200 queries")
    args = parser.parse_args()
    if args.quick:
        args.gallery_size, args.queries, args.dim, args.classes = 20_000, 200, 64, 500
    result = run(args.gallery_size, args.queries, args.dim, args.classes, args.index, args.k, args.seed)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
