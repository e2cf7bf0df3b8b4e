"""Finding unreadable images before a run, and the report of the ones a run skipped."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset

from bctool.data.images import load_rgb
from bctool.data.sources import ImageSet
from bctool.errors import DataError
from bctool.utils.io import atomic_write_text
from bctool.utils.progress import NULL_PROGRESS, Progress


class _Decode(Dataset):
    """Position i -> the error message of decoding image ``rows[i]`` ("" when it decodes)."""

    def __init__(self, images: ImageSet, rows: Sequence[int]) -> None:
        self.images, self.rows = images, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> str:
        try:
            load_rgb(self.images.records[self.rows[i]].path)
            return ""
        except DataError as exc:
            return str(exc)


def find_unreadable(
    images: ImageSet, rows: Sequence[int] | None = None, workers: int = 2, progress: Progress = NULL_PROGRESS
) -> list[dict[str, Any]]:
    """Decode the images at ``rows`` (all by default) once, in ``workers`` processes; return the
    unreadable ones as ``{"row", "id", "path", "error"}``, in row order."""
    rows = range(len(images)) if rows is None else rows
    loader = DataLoader(_Decode(images, rows), batch_size=64, num_workers=workers, collate_fn=list)
    failed: list[dict[str, Any]] = []
    progress.start("check images", len(rows))
    try:
        position = 0
        for errors in loader:
            for error in errors:
                if error:
                    row = rows[position]
                    record = images.records[row]
                    failed.append({"row": row, "id": record.id, "path": str(record.path), "error": error})
                position += 1
            progress.advance(len(errors))
    finally:
        progress.stop()
    return failed


def without(images: ImageSet, failed: list[dict[str, Any]]) -> ImageSet:
    """``images`` less the rows in ``failed``; labels and label names are kept."""
    if not failed:
        return images
    bad = {f["row"] for f in failed}
    kept = tuple(r for i, r in enumerate(images.records) if i not in bad)
    if not kept:
        raise DataError(f"none of the {len(images)} images of {images.source!r} can be read (first: {failed[0]['error']})")
    return replace(images, records=kept)


def report_path(out: str | os.PathLike[str]) -> Path:
    """``OUT.failed.tsv``: the images a run skipped."""
    out = Path(out)
    return out.with_name(out.name + ".failed.tsv")


def write_report(out: str | os.PathLike[str], failed: list[dict[str, Any]]) -> Path | None:
    """Write the skipped images of the run writing ``out`` (``id``, ``path``, ``error`` per
    line) to ``OUT.failed.tsv``, or remove a stale report when none were skipped."""
    path = report_path(out)
    if not failed:
        path.unlink(missing_ok=True)
        return None
    clean = [{k: str(f[k]).replace("\t", " ").replace("\n", " ") for k in ("id", "path", "error")} for f in failed]
    lines = ["id\tpath\terror"] + [f"{f['id']}\t{f['path']}\t{f['error']}" for f in clean]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
