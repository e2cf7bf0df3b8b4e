"""Adapters at scale: fit time of every kind on 100,000 pairs of 256-d rows, and the memory of a
streamed transform of a gallery next to the gallery's size.

    python benchmarks/adapt_fit.py            # 100k pairs, a 2M-row gallery (2 GB on disk)
    python benchmarks/adapt_fit.py --quick    # 10k pairs, a 200k-row gallery

The pairs are synthetic (a random curved map between two spaces, 1,000 classes); the target is
under a minute per fit on 2 CPU cores. The transform reads its gallery memory-mapped and writes
block by block, so its peak memory over the process before it should stay near one block
(65,536 rows) whatever the gallery's size: each measurement runs in a fresh process.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import (  # this folder is on sys.path when run
    in_fresh_process,
    peak_rss_mib,
    save_result,
)


def _pairs(n: int, dim: int, seed: int = 0):  # noqa: ANN202 - (Embeddings, Embeddings)
    from bctool.embeddings import Embeddings, normalize_rows

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    labels = rng.integers(0, 1000, n)
    x = normalize_rows(centres[labels] + 0.8 * rng.normal(size=(n, dim)).astype(np.float32))
    mix = rng.normal(size=(dim, dim)).astype(np.float32) / np.sqrt(dim)
    y = normalize_rows(np.tanh(2 * x @ mix) + 0.3 * x[:, ::-1])
    ids, names = [f"img{i}" for i in range(n)], [f"c{i}" for i in range(1000)]
    return (Embeddings(x, labels, ids, names, model={"sha256": "a" * 64}),
            Embeddings(y, labels, ids, names, model={"sha256": "b" * 64}))


def _fit(kind: str, n: int, dim: int, out) -> None:  # noqa: ANN001 - a multiprocessing queue
    from bctool.adapt import fit_adapter

    source, target = _pairs(n, dim)
    before = peak_rss_mib()
    started = time.perf_counter()
    adapter = fit_adapter(source, target, kind, holdout=0.05)
    out.put({"kind": kind, "seconds": time.perf_counter() - started, "held_out_cosine": adapter.fit["held_out_cosine"],
             "peak_mib": peak_rss_mib(), "over_mib": peak_rss_mib() - before})


def _transform(gallery: str, adapter: str, result: str, out) -> None:  # noqa: ANN001
    from bctool.adapt import load_adapter, transform_file

    mapping = load_adapter(adapter)
    before = peak_rss_mib()
    started = time.perf_counter()
    transform_file(gallery, mapping, result)
    out.put({"seconds": time.perf_counter() - started, "peak_mib": peak_rss_mib(), "over_mib": peak_rss_mib() - before})


def _write_gallery(path: Path, rows: int, dim: int) -> None:
    from bctool.embeddings import EmbeddingsSpec, write_embeddings

    rng = np.random.default_rng(1)
    spec = EmbeddingsSpec(labels=np.full(rows, -1), ids=[f"g{i}" for i in range(rows)], label_names=[], dim=dim,
                          model={"sha256": "a" * 64})
    with write_embeddings(path, spec) as writer:
        for start in range(0, rows, 65536):
            writer.write(start, rng.normal(size=(min(65536, rows - start), dim)).astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k pairs and a 200k-row gallery")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file, with the command, revision and machine")
    args = parser.parse_args()
    pairs, rows, dim = (10_000, 200_000, 256) if args.quick else (100_000, 2_000_000, 256)
    result: dict = {"pairs": pairs, "dim": dim, "held_out_share": 0.05, "fit": {}}
    print(f"fit on {pairs:,} pairs of {dim}-d rows (95% fitted, 5% held out), each kind in a fresh process")
    for kind in ("procrustes", "affine", "mlp"):
        r = in_fresh_process(_fit, kind, pairs, dim)
        result["fit"][kind] = {"seconds": round(r["seconds"], 2), "held_out_cosine": round(r["held_out_cosine"], 4),
                               "peak_rss_mib": round(r["peak_mib"])}
        print(f"  {kind:>10}: {r['seconds']:7.1f} s, held-out cosine {r['held_out_cosine']:.3f}, "
              f"peak RSS {r['peak_mib']:.0f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        from bctool.adapt import fit_adapter, save_adapter

        source, target = _pairs(5_000, dim)
        save_adapter(fit_adapter(source, target, "affine"), Path(tmp) / "a.safetensors")
        gallery = Path(tmp) / "gallery.safetensors"
        _write_gallery(gallery, rows, dim)
        size_mib = gallery.stat().st_size / 2**20
        r = in_fresh_process(_transform, str(gallery), str(Path(tmp) / "a.safetensors"), str(Path(tmp) / "t.safetensors"))
        print(f"transform of a {rows:,}-row gallery ({size_mib:.0f} MiB on disk): {r['seconds']:.1f} s, "
              f"{rows / r['seconds']:,.0f} rows/s; peak RSS {r['peak_mib']:.0f} MiB, {r['over_mib']:.0f} MiB over the "
              f"process before it (ratio to the gallery's size {r['over_mib'] / size_mib:.2f})")
    result["transform"] = {"kind": "affine", "rows": rows, "gallery_mib": round(size_mib), "seconds": round(r["seconds"], 2),
                           "rows_per_s": round(rows / r["seconds"]), "peak_rss_mib": round(r["peak_mib"]),
                           "over_mib": round(r["over_mib"]), "over_gallery_ratio": round(r["over_mib"] / size_mib, 3)}
    save_result(args.out, "adapt_fit", result)


if __name__ == "__main__":
    main()
