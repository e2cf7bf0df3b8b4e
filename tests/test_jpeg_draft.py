"""Reduced-scale JPEG decoding (Image.draft) on a real photograph: smaller decode, same output
within a bounded difference, crop boxes kept in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bctool.data.dataset import load_record
from bctool.data.images import draft_size, load_rgb
from bctool.data.sources import ImageRecord
from bctool.data.transforms import EvalTransform, Preprocess, TrainTransform
from bctool.models import ModelConfig, create_model

PHOTO = Path(__file__).parent / "data" / "hubble_deep_field.jpg"  # 1000 x 872, NASA, public domain


def test_draft_asks_for_the_shorter_side() -> None:
    assert draft_size((1000, 872), 224) == (257, 224)
    assert draft_size((872, 1000), 224) == (224, 257)


def test_a_large_jpeg_decodes_smaller_but_never_below_the_side_asked_for() -> None:
    full = load_rgb(PHOTO)
    assert full.size == (1000, 872) and "draft_scale" not in full.info
    half = load_rgb(PHOTO, 224)  # 1/2 gives 500 x 436; 1/4 would give 218 < 224
    assert half.size == (500, 436) and half.info["draft_scale"] == 0.5
    eighth = load_rgb(PHOTO, 100)  # the decoder's smallest scale, still above 100
    assert eighth.size == (125, 109) and eighth.info["draft_scale"] == 0.125
    assert load_rgb(PHOTO, 500).size == (1000, 872)  # less than twice the side: a full decode


def test_the_model_input_and_embedding_barely_change() -> None:
    """At 224 px the preprocessed tensor moves by under 0.05 on average (normalised units) and a
    seeded model's embedding by a cosine distance under 0.01 (benchmarks/jpeg_decode.py
    measures it on 21 photos)."""
    transform = EvalTransform(Preprocess(image_size=224))
    full, draft = transform(load_rgb(PHOTO)), transform(load_rgb(PHOTO, transform.source_side))
    assert full.shape == draft.shape == (3, 224, 224)
    assert (full - draft).abs().mean() < 0.05
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="small", embedding_dim=32))
    with torch.no_grad():
        model.train()(torch.stack([full, draft] * 2))
        a, b = model.eval().embed(torch.stack([full, draft]))
    assert 1 - torch.nn.functional.cosine_similarity(a, b, dim=0) < 0.01


def test_crop_boxes_stay_on_the_same_pixels() -> None:
    box = (100.0, 80.0, 900.0, 800.0)  # 800 x 720 in full-size pixels
    record = ImageRecord(path=PHOTO, id="hubble", label=0, crop=box)
    full = load_record(record)
    assert full.size == (800, 720)
    reduced = load_record(record, 224)  # the box keeps 224 px: decoded at 1/2, box scaled
    assert reduced.size == (400, 360)
    small = full.resize(reduced.size)
    diff = np.asarray(small, dtype=np.float32) - np.asarray(reduced, dtype=np.float32)
    assert np.abs(diff).mean() < 8  # the same content (8-bit levels), not shifted
    assert load_record(record, 500).size == (800, 720)  # the box needs the full scale


def test_training_asks_for_enough_pixels_for_its_smallest_crop() -> None:
    train = TrainTransform(Preprocess(image_size=224))
    assert train.source_side == 438  # sqrt(0.35 * 3/4) of the shorter side is the smallest crop side
    assert min(load_rgb(PHOTO, train.source_side).size) >= 438
