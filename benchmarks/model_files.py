"""Extraction rate of each kind of model bctool runs, side by side in one run: a bctool checkpoint
(``bctool import`` of a state dict with its projection), the same network as an ONNX file
(onnxruntime) and as a TorchScript file, each through ``bctool.extract.extract`` (decoding,
resizing and batching included) and as the bare forward pass on ready tensors.

    python benchmarks/model_files.py                          # 2 threads, 256 emoji images, 64 and 128 px
    python benchmarks/model_files.py --out docs/benchmarks/model-files.json
    python benchmarks/model_files.py --quick                  # seconds: 32 images, 64 px

The network is ``examples/foreign``'s plain-torch ResNet-18 with a 64-d projection (random
weights, BatchNorm statistics of the images): what matters for speed is the graph, not the
weights. Each rate is the best of ``--repeats`` passes over the same images. The embeddings of
the three kinds are compared too (the largest difference relative to the largest value).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _common import emoji_subset, save_result  # this folder is on sys.path when run

from bctool.checkpoint import load_model
from bctool.data.sources import ImageSet
from bctool.data.transforms import EvalTransform
from bctool.data.dataset import load_record
from bctool.extract import extract
from bctool.models.external import write_model_file_with_metadata
from bctool.models.imported import Projection, import_pretrained

FOREIGN = Path(__file__).parents[1] / "examples" / "foreign" / "foreign_model.py"
KINDS = ("checkpoint", "onnx", "torchscript")


def _foreign():  # noqa: ANN202 - the example module
    spec = importlib.util.spec_from_file_location("foreign_model", FOREIGN)
    module = importlib.util.module_from_spec(spec)
    sys.modules["foreign_model"] = module
    spec.loader.exec_module(module)
    return module


def model_files(folder: Path, images: ImageSet, size: int) -> dict[str, Path]:
    """The same network as a checkpoint, an ONNX file and a TorchScript file, at ``size`` px."""
    fm = _foreign()
    pre = fm.Preprocessing(size=size)
    net = fm.make_net(fm.inputs([r.path for r in images.records[:64]], pre))
    fm.save_state_dict(net, folder / "weights.pth")
    steps = {"image_size": size, "resize": "torchvision", "crop_fraction": pre.crop, "interpolation": "bicubic",
             "mean": pre.mean, "std": pre.std}
    files = {"checkpoint": folder / f"model-{size}.safetensors"}
    import_pretrained("resnet18", str(folder / "weights.pth"), files["checkpoint"],
                      projection=Projection("fc", "fc_norm"), **steps)
    record = {"preprocess": {**steps, "mean": list(pre.mean), "std": list(pre.std), "crop": "center",
                             "background": [255, 255, 255]}, "export": {"normalize_included": False}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm.export_onnx(net, folder / "bare.onnx", size)
        fm.export_torchscript(net, folder / "bare.pt", size)
    for kind, bare, suffix in (("onnx", "bare.onnx", ".onnx"), ("torchscript", "bare.pt", ".pt")):
        files[kind] = folder / f"model-{size}{suffix}"
        write_model_file_with_metadata(folder / bare, files[kind], record)
    return files


def rates(files: dict[str, Path], images: ImageSet, repeats: int) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """images/s of each kind through ``extract`` and as the bare forward pass; the largest
    relative difference between the kinds' embeddings."""
    out: dict[str, dict[str, float]] = {}
    rows = {}
    for kind in KINDS:
        checkpoint = load_model(files[kind])
        transform = EvalTransform(checkpoint.preprocess)
        batch = torch.stack([transform(load_record(r, transform.source_side, transform.background))
                             for r in images.records])
        timed = []
        for _ in range(repeats):
            start = time.perf_counter()
            rows[kind] = extract(images, checkpoint, workers=2).embeddings
            timed.append(time.perf_counter() - start)
        forward = []
        with torch.inference_mode():
            for _ in range(repeats):
                start = time.perf_counter()
                for i in range(0, len(batch), 256):
                    checkpoint.model.embed(batch[i: i + 256])
                forward.append(time.perf_counter() - start)
        out[kind] = {"extract": len(images) / min(timed), "forward": len(images) / min(forward)}
    scale = float(np.abs(rows["checkpoint"]).max())
    return out, {k: float(np.abs(rows[k] - rows["checkpoint"]).max()) / scale for k in KINDS if k != "checkpoint"}


def table(result: dict) -> str:
    """The figures as markdown (what the benchmarks page includes)."""
    lines = [f"Model kinds, {result['images']} emoji images, {result['threads']} threads, best of "
             f"{result['repeats']}: images/s (relative to the checkpoint)", "",
             "| image side | kind | extract | bare forward pass | largest difference from the checkpoint |",
             "| --- | --- | --- | --- | --- |"]
    for size, by_kind in result["sizes"].items():
        base = by_kind["rates"]["checkpoint"]
        for kind in KINDS:
            r = by_kind["rates"][kind]
            if kind == "checkpoint":
                lines.append(f"| {size} | {kind} | {r['extract']:.1f} | {r['forward']:.1f} | - |")
                continue
            lines.append(f"| {size} | {kind} | {r['extract']:.1f} ({r['extract'] / base['extract']:.2f}x) | "
                         f"{r['forward']:.1f} ({r['forward'] / base['forward']:.2f}x) | "
                         f"{by_kind['differences'][kind]:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a run of seconds: 32 images, 64 px, one pass")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the figures here (JSON), and their table beside it (.md)")
    parser.add_argument("--table-from", type=Path, default=None, help="no measuring: the table of a stored --out file")
    args = parser.parse_args()
    if args.table_from:
        args.table_from.with_suffix(".md").write_text(table(json.loads(args.table_from.read_text())["result"]))
        return
    if args.quick:
        args.images, args.sizes, args.repeats = 32, [64], 1
    torch.set_num_threads(args.threads)
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = emoji_subset(folder, args.images)
        for size in args.sizes:
            by_kind, differences = rates(model_files(folder, images, size), images, args.repeats)
            sizes[size] = {"rates": by_kind, "differences": differences}
            for kind, r in by_kind.items():
                print(f"{size} px {kind}: extract {r['extract']:.1f} images/s, forward {r['forward']:.1f} images/s",
                      flush=True)
            print(f"{size} px: largest difference from the checkpoint's embeddings {differences}", flush=True)
    result = {"images": len(images), "threads": args.threads, "repeats": args.repeats, "sizes": sizes}
    if args.out:
        save_result(args.out, "model_files", result)
        args.out.with_suffix(".md").write_text(table(result))


if __name__ == "__main__":
    main()
