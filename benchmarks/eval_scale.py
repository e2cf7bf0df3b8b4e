"""Evaluation of a large gallery against a bare faiss search of the same data, at several sizes.

    python benchmarks/eval_scale.py                          # 1M and 10M rows, 256-d, float16
    python benchmarks/eval_scale.py --quick                  # a small run, seconds
    python benchmarks/eval_scale.py --sizes 1000000 --dtype float32 --ivf-max 1000000

For each size it writes a seeded, clustered gallery (and 1,000 labelled queries) with bctool's
own streaming writer (the one ``extract`` uses; format version 2, ``--dtype`` rows), then times,
each in a fresh process so that its peak RSS is its own:

(a) bare faiss, flat: the memory-mapped rows read block by block, converted to float32,
    ``faiss.normalize_L2``, searched with an ``IndexFlatIP`` per block (k=100) and merged with a
    ``faiss.ResultHeap``: the least code that searches a gallery larger than memory;
(b) ``evaluate_retrieval(query, load_embeddings(gallery, mmap=True), search=SearchOptions(top_k=100))``, loading,
    id matching, labels and metrics included (the gallery streamed in blocks);
(c) at sizes up to ``--ivf-max``: bare faiss IVF (``IndexIVFFlat``, the same lists, training
    sample and nprobe as bctool's) against ``evaluate_retrieval(..., search=SearchOptions(index="ivf"))``.

Each is run twice, alternating, and the faster run is kept. Peak RSS (``ru_maxrss``) counts
the pages of the memory-mapped gallery still resident; bctool releases each block's pages after
use, the bare search does not (the OS may drop them: they are page cache).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import in_fresh_process, peak_rss_mib, save_result

from bctool.embeddings import (
    Embeddings,
    EmbeddingsSpec,
    save_embeddings,
    write_embeddings,
)

_BLOCK_ROWS = 200_000
_K = 100


def _centers(n_classes: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_classes, dim)).astype(np.float32)


def _rows(centers: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal((labels.size, centers.shape[1]), dtype=np.float32)
    return centers[labels] + 1.5 * noise


def write_gallery(path: Path, n: int, dim: int, n_classes: int, seed: int, dtype: str) -> None:
    """An embeddings file streamed block by block by bctool's writer (ids g/0 .. g/N-1)."""
    centers = _centers(n_classes, dim, seed)
    rng = np.random.default_rng(seed + 1)
    labels = rng.integers(0, n_classes, n).astype(np.int64)
    spec = EmbeddingsSpec(labels=labels, ids=[f"g/{i}" for i in range(n)],
                          label_names=[f"class{i}" for i in range(n_classes)], dim=dim,
                          model={"arch": "synthetic"}, dtype=dtype)
    with write_embeddings(path, spec) as writer:
        for start in range(0, n, _BLOCK_ROWS):
            writer.write(start, _rows(centers, labels[start : start + _BLOCK_ROWS], rng))


def write_queries(path: Path, n: int, dim: int, n_classes: int, seed: int) -> None:
    centers = _centers(n_classes, dim, seed)
    rng = np.random.default_rng(seed + 2)
    labels = rng.integers(0, n_classes, n).astype(np.int64)
    save_embeddings(Embeddings(_rows(centers, labels, rng), labels, [f"q/{i}" for i in range(n)],
                               [f"class{i}" for i in range(n_classes)], {"arch": "synthetic"}), path)


def _bare_flat(query_path: str, gallery_path: str, out) -> None:  # noqa: ANN001
    import faiss

    from bctool.embeddings import load_embeddings

    t0 = time.perf_counter()
    query = np.ascontiguousarray(load_embeddings(query_path).embeddings, dtype=np.float32)
    faiss.normalize_L2(query)
    gallery = load_embeddings(gallery_path, mmap=True).embeddings
    heap = faiss.ResultHeap(query.shape[0], _K, keep_max=True)
    from bctool.evaluate.search import _STREAM_BLOCK_BYTES

    rows = _STREAM_BLOCK_BYTES // (4 * gallery.shape[1])  # the block bctool's streamed search uses
    for start in range(0, gallery.shape[0], rows):
        block = np.ascontiguousarray(gallery[start : start + rows], dtype=np.float32)
        faiss.normalize_L2(block)
        index = faiss.IndexFlatIP(block.shape[1])
        index.add(block)
        scores, indices = index.search(query, _K)
        heap.add_result(scores, indices + start)
    heap.finalize()
    out.put((time.perf_counter() - t0, peak_rss_mib(), None))


def _bare_ivf(query_path: str, gallery_path: str, out) -> None:  # noqa: ANN001
    import faiss

    from bctool.embeddings import load_embeddings, normalize_rows
    from bctool.evaluate.search import _IVF_TRAIN_PER_LIST, _ivf_nlist

    t0 = time.perf_counter()
    query = normalize_rows(load_embeddings(query_path).embeddings)
    gallery = load_embeddings(gallery_path, mmap=True).embeddings
    n, dim = gallery.shape
    nlist = _ivf_nlist(n)
    sample = np.sort(np.random.default_rng(0).choice(n, size=min(n, nlist * _IVF_TRAIN_PER_LIST), replace=False))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(normalize_rows(gallery[sample]))
    for start in range(0, n, _BLOCK_ROWS):
        index.add(normalize_rows(gallery[start : start + _BLOCK_ROWS]))
    index.nprobe = 32
    index.search(query, _K)
    out.put((time.perf_counter() - t0, peak_rss_mib(), None))


def _evaluate(query_path: str, gallery_path: str, index: str, out) -> None:  # noqa: ANN001
    from bctool.embeddings import load_embeddings
    from bctool.evaluate.retrieval import evaluate_retrieval
    from bctool.evaluate.search import SearchOptions

    t0 = time.perf_counter()
    query = load_embeddings(query_path)
    gallery = load_embeddings(gallery_path, mmap=True)
    metrics = evaluate_retrieval(query, gallery, search=SearchOptions(top_k=_K, index=index))
    out.put((time.perf_counter() - t0, peak_rss_mib(), metrics))


def _best_of_two(first: tuple, second: tuple) -> tuple[list, list]:
    """Run ``first`` and ``second`` (target, *args) alternately twice; all runs of each."""
    runs_a, runs_b = [], []
    for _ in range(2):
        runs_a.append(in_fresh_process(*first))
        runs_b.append(in_fresh_process(*second))
    return runs_a, runs_b


def run(size: int, queries: int, dim: int, n_classes: int, dtype: str, ivf: bool, seed: int, folder: Path) -> dict:
    g_path, q_path = folder / f"gallery{size}.safetensors", folder / "query.safetensors"
    t0 = time.perf_counter()
    write_gallery(g_path, size, dim, n_classes, seed, dtype)
    write_queries(q_path, queries, dim, n_classes, seed)
    written = time.perf_counter() - t0
    print(f"wrote {size:,} x {dim} {dtype} ({g_path.stat().st_size / 2**30:.2f} GiB) in {written:.1f} s", file=sys.stderr)
    bare, ours = _best_of_two((_bare_flat, str(q_path), str(g_path)), (_evaluate, str(q_path), str(g_path), "flat"))
    (bare_s, bare_rss, _), (eval_s, eval_rss, metrics) = min(bare), min(ours, key=lambda r: r[0])
    print(f"flat: bare {[round(r[0], 2) for r in bare]} s, evaluate {[round(r[0], 2) for r in ours]} s", file=sys.stderr)
    result = {
        "gallery": size, "queries": queries, "dim": dim, "dtype": dtype, "k": _K,
        "file_gib": round(g_path.stat().st_size / 2**30, 3), "write_s": round(written, 1),
        "flat": {"bare_faiss_s": round(bare_s, 2), "evaluate_s": round(eval_s, 2), "ratio": round(eval_s / bare_s, 3),
                 "bare_faiss_peak_rss_mib": round(bare_rss), "evaluate_peak_rss_mib": round(eval_rss),
                 "map": round(metrics["map"], 4)},
    }
    if ivf:
        bare, ours = _best_of_two((_bare_ivf, str(q_path), str(g_path)), (_evaluate, str(q_path), str(g_path), "ivf"))
        (bare_s, bare_rss, _), (eval_s, eval_rss, metrics) = min(bare), min(ours, key=lambda r: r[0])
        result["ivf"] = {"bare_faiss_s": round(bare_s, 2), "evaluate_s": round(eval_s, 2),
                         "ratio": round(eval_s / bare_s, 3), "bare_faiss_peak_rss_mib": round(bare_rss),
                         "evaluate_peak_rss_mib": round(eval_rss), "map": round(metrics["map"], 4)}
    g_path.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000], help="gallery rows")
    parser.add_argument("--queries", type=int, default=1_000, help="query rows")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension")
    parser.add_argument("--classes", type=int, default=10_000, help="label classes")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="gallery storage")
    parser.add_argument("--ivf-max", type=int, default=1_000_000, help="also time IVF at sizes up to this")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--folder", type=Path, default=None, help="where the files go (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="small run: 20,000 and 60,000 x 64, 200 queries")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file, with the command, revision and machine")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.queries, args.dim, args.classes, args.ivf_max = [20_000, 60_000], 200, 64, 500, 60_000
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        results = [run(size, args.queries, args.dim, args.classes, args.dtype, size <= args.ivf_max, args.seed, Path(tmp))
                   for size in args.sizes]
    growth = {}
    if len(results) > 1:
        a, b = results[0], results[-1]
        scale = b["gallery"] / a["gallery"]
        growth = {"rows_x": scale,
                  "bare_faiss_time_x": round(b["flat"]["bare_faiss_s"] / a["flat"]["bare_faiss_s"], 2),
                  "evaluate_time_x": round(b["flat"]["evaluate_s"] / a["flat"]["evaluate_s"], 2),
                  "evaluate_peak_rss_x": round(b["flat"]["evaluate_peak_rss_mib"] / a["flat"]["evaluate_peak_rss_mib"], 2),
                  "log10_rows": round(math.log10(b["gallery"]), 2)}
    print(json.dumps({"runs": results, "growth": growth}, indent=2))
    save_result(args.out, "eval_scale", {"runs": results, "growth": growth})


if __name__ == "__main__":
    main()
