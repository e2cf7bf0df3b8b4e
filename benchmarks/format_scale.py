"""A gallery larger than format version 1 could hold, through every command that reads one.

    python benchmarks/format_scale.py                  # 3,000,000 rows, 64-d, float16
    python benchmarks/format_scale.py --rows 200000    # a quick run

Writes, with bctool's streaming writer (the one ``extract`` uses), an old-model gallery and a
new-model gallery of the same images (the new space a rotation of the old one plus noise, with
ids of 32 characters: version 1's JSON ids would need more than safetensors' 100 MB header),
and 1,000 labelled new-model queries. Then runs each command as a user would, in its own
process, and reports its wall time and peak RSS (``wait4``):

``evaluate`` (top-k 100, the gallery streamed), ``adapt`` (Procrustes, old -> new, every pair),
``transform`` (the old gallery mapped), ``backfill plan`` (the norm policy) and
``evaluate --backfill`` in that plan's order, and ``convert`` to ``.npy`` and back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import save_result  # this folder is on sys.path when run

from bctool.embeddings import EmbeddingsSpec, write_embeddings

_BLOCK = 250_000


def _id(i: int) -> str:
    return f"gallery/part{i % 97:02d}/img_{i:019d}"  # 32 characters


def write_set(folder: Path, rows: int, dim: int, classes: int, seed: int) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, dim)).astype(np.float32)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    rotation = rotation.astype(np.float32)
    labels = rng.integers(0, classes, rows).astype(np.int64)
    ids = [_id(i) for i in range(rows)]
    names = [f"class{c}" for c in range(classes)]
    paths = {"old": folder / "old.safetensors", "new": folder / "new.safetensors", "query": folder / "query.safetensors"}
    specs = {name: EmbeddingsSpec(labels=labels, ids=ids, label_names=names, dim=dim, model={"sha256": sha * 64},
                                  dtype="float16") for name, sha in (("old", "0"), ("new", "1"))}
    with write_embeddings(paths["old"], specs["old"]) as old, write_embeddings(paths["new"], specs["new"]) as new:
        for start in range(0, rows, _BLOCK):
            block = centers[labels[start : start + _BLOCK]] + 1.5 * rng.standard_normal((len(labels[start : start + _BLOCK]), dim), dtype=np.float32)
            old.write(start, block)
            new.write(start, block @ rotation + 0.3 * rng.standard_normal(block.shape, dtype=np.float32))
    q_labels = rng.integers(0, classes, 1000).astype(np.int64)
    q = (centers[q_labels] + 1.5 * rng.standard_normal((1000, dim), dtype=np.float32)) @ rotation
    query = EmbeddingsSpec(labels=q_labels, ids=[f"q/{i}" for i in range(1000)], label_names=names, dim=dim,
                           model={"sha256": "1" * 64})
    with write_embeddings(paths["query"], query) as writer:
        writer.write(0, q)
    v1_header = len(json.dumps(ids))
    print(f"a version-1 header would hold {v1_header / 1e6:.1f} MB of ids (limit 100 MB)", file=sys.stderr)
    return paths


# Runs bctool's CLI, then prints its own peak RSS (VmHWM, of this process only) on stderr.
_MEASURED = """
import sys
from bctool.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("PEAK_RSS_KIB", peak, file=sys.stderr)
sys.exit(code)
"""


def timed(args: list[str]) -> dict:
    """Run ``bctool ARGS -q`` in a child process: its wall time, peak RSS and JSON output."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURED, *args, "-q"], capture_output=True, text=True,
                          env={**os.environ})
    if proc.returncode:
        raise SystemExit(f"bctool {' '.join(args)} failed with exit code {proc.returncode}: {proc.stderr[-2000:]}")
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KIB"))
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mib": round(peak / 1024),
            "output": json.loads(proc.stdout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3_000_000, help="gallery rows")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension")
    parser.add_argument("--classes", type=int, default=30_000, help="label classes")
    parser.add_argument("--folder", type=Path, default=None, help="where the files go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file, with the command, revision and machine")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        p = write_set(folder, args.rows, args.dim, args.classes, 0)
        report: dict = {"rows": args.rows, "dim": args.dim, "write_s": round(time.perf_counter() - t0, 1),
                        "gallery_mib": round(p["old"].stat().st_size / 2**20)}
        steps = {
            "evaluate": ["evaluate", "--query", str(p["query"]), "--gallery", str(p["new"]), "--top-k", "100"],
            "adapt": ["adapt", str(p["old"]), str(p["new"]), "--out", str(folder / "a.safetensors"), "--kind", "procrustes"],
            "transform": ["transform", str(p["old"]), "--adapter", str(folder / "a.safetensors"),
                          "--out", str(folder / "t.safetensors")],
            "evaluate_transformed": ["evaluate", "--query", str(p["query"]), "--gallery", str(folder / "t.safetensors"),
                                     "--top-k", "100"],
            "backfill_plan": ["backfill", "plan", str(p["old"]), "--out", str(folder / "plan.txt")],
            "evaluate_backfill": ["evaluate", "--backfill", "0,0.5,1", "--query", str(p["query"]), "--old-gallery",
                                  str(folder / "t.safetensors"), "--new-gallery", str(p["new"]), "--order",
                                  str(folder / "plan.txt"), "--top-k", "100"],
            "convert_to_npy": ["convert", str(p["new"]), "--out", str(folder / "new.npy")],
            "convert_from_npy": ["convert", str(folder / "new.npy"), "--out", str(folder / "back.safetensors")],
        }
        for name, command in steps.items():
            result = timed(command)
            print(f"{name}: {result['seconds']} s, peak RSS {result['peak_rss_mib']} MiB", file=sys.stderr)
            output = result.pop("output")
            for key in ("map", "rows", "ids", "holdout"):
                if key in output:
                    result[key] = output[key]
            if name == "evaluate_backfill":
                result["curve"] = [round(x["map"], 4) for x in output.get("curve", output.get("points", []))]
            report[name] = result
        from bctool.embeddings import load_embeddings

        a, b = load_embeddings(p["new"], mmap=True), load_embeddings(folder / "back.safetensors", mmap=True)
        report["npy_round_trip_exact"] = bool(np.array_equal(a.embeddings, b.embeddings) and a.ids == b.ids
                                              and a.label_strings() == b.label_strings())
    print(json.dumps(report, indent=2))
    save_result(args.out, "format_scale", report)


if __name__ == "__main__":
    main()
