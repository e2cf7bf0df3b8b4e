"""JPEG decoding at reduced scale (``Image.draft``) against a full decode, on real photographs.

    python benchmarks/jpeg_decode.py             # every distinct JPEG of 1,000 px or more, 224 px, ResNet-50
    python benchmarks/jpeg_decode.py --quick     # 6 photos, ResNet-18, fewer repeats
    python benchmarks/jpeg_decode.py --photos DIR

Photos: by default the JPEGs under /usr/share/wallpapers (Debian's plasma-workspace-wallpapers:
``apt install plasma-workspace-wallpapers``; photographs and renderings of 1,080 to 5,120 px),
each distinct file once (by sha256), shorter side 1,000 px or more. Measured side by side:

(a) decode + transform, images/s: ``load_rgb`` + ``EvalTransform`` at 224 px, full decode
    (``min_side=None``) against the reduced-scale decode bctool now does (``min_side=224``);
    also the training transform's decode (``TrainTransform.source_side``, 438 px at 224), runs
    interleaved, the faster of the rounds reported;
(b) what the reduced decode changes: the mean and largest absolute difference of the
    preprocessed tensors (normalised units), and the cosine distance between the embeddings of
    a seeded ResNet-50 (BatchNorm statistics from one pass over the photos) on both inputs; for
    scale, the same for each photo re-saved as a JPEG of quality 90 (decoded in full);
(c) ``bctool extract``'s path (``extract_to_file`` with its default 2 workers) against the bare
    ``model.embed`` forward on the same preprocessed batches in memory, ResNet-50 at 224 px on
    the CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import save_result  # this folder is on sys.path when run
from PIL import Image

from bctool.checkpoint import load_checkpoint, save_checkpoint
from bctool.data import load_image_set, load_rgb
from bctool.data.transforms import EvalTransform, Preprocess, TrainTransform
from bctool.extract import ExtractOptions, extract_to_file
from bctool.models import ModelConfig, create_model

DEFAULT_PHOTOS = Path("/usr/share/wallpapers")


def find_photos(folder: Path, min_side: int = 1000) -> list[Path]:
    """Distinct JPEGs (by content) under ``folder`` whose shorter side is at least ``min_side``."""
    seen: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in (".jpg", ".jpeg") or not path.is_file():
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            continue
        with Image.open(path) as img:
            if min(img.size) >= min_side:
                seen[digest] = path
    return list(seen.values())


def rate(photos: list[Path], transform, min_side: int | None, repeats: int) -> float:  # noqa: ANN001
    """Images/s of decode + transform over ``photos``, ``repeats`` passes."""
    start = time.perf_counter()
    for _ in range(repeats):
        for path in photos:
            transform(load_rgb(path, min_side))
    return repeats * len(photos) / (time.perf_counter() - start)


def differences(photos: list[Path], size: int, arch: str) -> dict[str, float]:
    """How much the reduced decode changes the model's input and a seeded model's embedding."""
    transform = EvalTransform(Preprocess(image_size=size))
    full = torch.stack([transform(load_rgb(p)) for p in photos])
    draft = torch.stack([transform(load_rgb(p, size)) for p in photos])
    # For scale: what re-saving each photo as a JPEG of quality 90 does (full decode both times).
    resaved = []
    for p in photos:
        buffer = io.BytesIO()
        load_rgb(p).save(buffer, "JPEG", quality=90)
        resaved.append(transform(Image.open(buffer).convert("RGB")))
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch=arch, embedding_dim=256))
    with torch.no_grad():
        model.train()(full)  # BatchNorm statistics of real images, not the initial 0/1
        model.eval()
        a, b, c = model.embed(full), model.embed(draft), model.embed(torch.stack(resaved))
    out = {}
    for name, other, emb in (("draft", draft, b), ("resaved_q90", torch.stack(resaved), c)):
        cosine = torch.nn.functional.cosine_similarity(a, emb)
        diff = (full - other).abs()
        out[name] = {"tensor_mean_abs": round(float(diff.mean()), 5), "tensor_max_abs": round(float(diff.max()), 4),
                     "embedding_cosine_distance_mean": float((1 - cosine).mean()),
                     "embedding_cosine_distance_max": float((1 - cosine).max())}
    return out


def extraction(photos: list[Path], size: int, arch: str, repeats: int) -> dict[str, float]:
    """``extract_to_file`` (default workers) against the bare forward on the same batches."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        listing = work / "photos.txt"
        lines = []
        for r in range(repeats):  # each pass under other names: ids must be unique
            for i, photo in enumerate(photos):
                link = work / f"{r}-{i}.jpg"
                link.symlink_to(photo)
                lines.append(f"{link} 0\n")
        listing.write_text("".join(lines))
        torch.manual_seed(0)
        model = create_model(ModelConfig(arch=arch, embedding_dim=256)).eval()
        save_checkpoint(work / "m.safetensors", model, Preprocess(image_size=size), ["photo"])
        checkpoint = load_checkpoint(work / "m.safetensors")
        images = load_image_set(listing, require_labels=False)
        transform = EvalTransform(checkpoint.preprocess)
        batch = torch.stack([transform(load_rgb(p, size)) for p in photos])
        batches = [batch] * repeats
        out = {}
        for round_ in range(2):  # alternate, keep the faster of each
            start = time.perf_counter()
            with torch.inference_mode():
                for b in batches:
                    checkpoint.model.embed(b)
            bare = len(images) / (time.perf_counter() - start)
            start = time.perf_counter()
            extract_to_file(images, checkpoint, work / f"e{round_}.safetensors",
                            options=ExtractOptions(batch_size=len(photos)))
            path = len(images) / (time.perf_counter() - start)
            out["bare"] = max(out.get("bare", 0.0), bare)
            out["extract"] = max(out.get("extract", 0.0), path)
        out["ratio"] = out["extract"] / out["bare"]
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder searched for JPEGs")
    parser.add_argument("--size", type=int, default=224, help="model input side in pixels")
    parser.add_argument("--arch", default="resnet50", help="backbone of the difference and extraction runs")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the photos per measurement")
    parser.add_argument("--quick", action="store_true", help="6 photos, resnet18, 1 repeat")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file, with the command, revision and machine")
    args = parser.parse_args()
    photos = find_photos(args.photos)
    if not photos:
        sys.exit(f"no JPEG of 1,000 px or more under {args.photos}: apt install plasma-workspace-wallpapers, or pass --photos")
    if args.quick:
        photos, args.arch, args.repeats = photos[:6], "resnet18", 1
    sides = [min(Image.open(p).size) for p in photos]
    pre = Preprocess(image_size=args.size)
    evaluation, training = EvalTransform(pre), TrainTransform(pre)
    rates: dict[str, float] = {}
    for _ in range(2):  # interleaved rounds; the faster of each
        for name, transform, side in (("eval_full", evaluation, None), ("eval_draft", evaluation, evaluation.source_side),
                                      ("train_full", training, None), ("train_draft", training, training.source_side)):
            rates[name] = max(rates.get(name, 0.0), rate(photos, transform, side, args.repeats))
    result = {
        "photos": len(photos), "shorter_side_px": [min(sides), max(sides)], "size": args.size,
        "images_per_second": {k: round(v, 1) for k, v in rates.items()},
        "speedup_eval": round(rates["eval_draft"] / rates["eval_full"], 2),
        "speedup_train": round(rates["train_draft"] / rates["train_full"], 2),
        "train_source_side": training.source_side,
        "difference": differences(photos, args.size, args.arch),
        "extraction": {k: round(v, 2) for k, v in extraction(photos, args.size, args.arch, args.repeats).items()},
        "arch": args.arch, "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=1))
    save_result(args.out, "jpeg_decode", result)


if __name__ == "__main__":
    main()
