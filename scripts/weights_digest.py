"""Digests of the weights of three seeded tiny training runs, to show that a refactoring left
training bit-identical: run it before and after, and compare the two JSON outputs.

    OMP_NUM_THREADS=1 python scripts/weights_digest.py > before.json

The runs, on 12 emoji classes at 32 px for 2 epochs on the CPU: the old model alone; the
recommended recipe against it (warm start, the default method); AdvBCT in the paper regime with a
cosine head. Each digest is the sha256 of every tensor's bytes in name order (metadata, which
holds the command line and versions, is left out).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file
from typer.testing import CliRunner

from bctool.cli import app
from bctool.data.emoji import EmojiSplit, write_emoji_dataset

TINY = ["--arch", "small", "--image-size", "32", "--embedding-dim", "16", "--epochs", "2", "--batch-size", "16",
        "--workers", "0", "--device", "cpu", "-q"]


def _run(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    if result.exit_code != 0:
        sys.exit(f"bctool {' '.join(args)} failed: {result.stderr}")


def digest(path: Path) -> str:
    """sha256 over the tensors' names and bytes, in name order."""
    tensors = load_file(str(path))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(-1).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_emoji_dataset(work / "emoji", EmojiSplit(seed=0, limit=12))
        data = work / "emoji"
        old, old_emb = work / "old.safetensors", work / "old_emb.safetensors"
        _run("train", str(data / "old_train.txt"), "--out", str(old), "--seed", "1", *TINY)
        _run("extract", str(data / "new_train.txt"), "--model", str(old), "--out", str(old_emb), "--workers", "0", "-q")
        recipe, advbct = work / "recipe.safetensors", work / "advbct.safetensors"
        _run("train", str(data / "new_train.txt"), "--old-embeddings", str(old_emb), "--out", str(recipe), *TINY)
        _run("train", str(data / "new_train.txt"), "--old-embeddings", str(old_emb), "--out", str(advbct),
             "--method", "advbct", "--regime", "paper", "--head", "cosine", "--init-from", "none", *TINY)
        print(json.dumps({name: digest(path) for name, path in
                          (("old", old), ("recipe", recipe), ("advbct-paper-cosine", advbct))}, indent=1))


if __name__ == "__main__":
    main()
