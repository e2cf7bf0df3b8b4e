"""Extraction: embed every image of a dataset with a checkpoint, in batches.

:func:`extract` returns the embeddings in memory (for training and small sets).
:func:`extract_to_file` is the command's path for any size: rows stream into the output file as
batches arrive (memory holds a few batches, never the whole set), ``--shard I/N`` embeds one
contiguous part of the list, images that cannot be read are skipped and listed in a report
(or stop the run with ``strict``), and an interrupted run resumes from its last saved row.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bctool.checkpoint import Checkpoint, model_device
from bctool.data.check import write_report
from bctool.data.dataset import load_record
from bctool.data.sources import ImageSet
from bctool.data.transforms import EvalTransform, Preprocess, StoredView, StoredViewTransform
from bctool.embeddings import (
    Embeddings,
    UNADAPTED_SUFFIX,
    EmbeddingsSpec,
    EmbeddingsWriter,
    load_embeddings,
    write_embeddings,
)
from bctool.errors import BctoolError, ConfigError, DataError, EmbeddingsError
from bctool.utils.interrupt import Interrupted, StopSignals
from bctool.utils.io import atomic_write_text, check_output_path, output_lock
from bctool.utils.progress import NULL_PROGRESS, Progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` (0-based): a contiguous run of rows of the image list."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` with 0 <= I < N."""
        try:
            index, count = (int(x) for x in text.split("/"))
        except ValueError:
            raise ConfigError(f"--shard {text!r} is not I/N (for example 0/4: the first of 4 parts)") from None
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"--shard {text!r}: I must lie in 0..N-1 and N be at least 1 (for example 0/{max(count, 1)})")
        return cls(index, count)

    def rows(self, total: int) -> range:
        """The rows of a ``total``-row list this part covers (parts differ by at most one row)."""
        return range(total * self.index // self.count, total * (self.index + 1) // self.count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class _Rows(Dataset):
    """Rows ``start ..`` of an ImageSet as ``(image, row, error)``; with ``strict`` off, an
    unreadable image gives a blank image and its error message instead of stopping the run.
    A :class:`StoredViewTransform` gives each image its seeded view (it is told the image's id)."""

    def __init__(self, images: ImageSet, rows: range, transform: EvalTransform | StoredViewTransform,
                 strict: bool) -> None:
        self.images, self.rows, self.transform, self.strict = images, rows, transform, strict
        self.image_size = (transform.base if isinstance(transform, StoredViewTransform) else transform).pre.image_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        row = self.rows[i]
        try:
            record = self.images.records[row]
            image = load_record(record, self.transform.source_side, self.transform.background)
            if isinstance(self.transform, StoredViewTransform):
                return self.transform(image, self.images.ids[row]), row, ""
            return self.transform(image), row, ""
        except DataError as exc:
            if self.strict:
                raise
            return torch.zeros(3, self.image_size, self.image_size), row, str(exc)


def _embed_batches(
    images: ImageSet, checkpoint: Checkpoint, rows: range, batch_size: int, workers: int, strict: bool,
    view: StoredView | None = None,
) -> Iterator[tuple[int, np.ndarray, list[tuple[int, str]]]]:
    """Yield ``(first_row, embeddings, failures)`` per batch, in row order; ``failures`` lists
    ``(row, error)`` of the batch's unreadable images (their embedding rows are meaningless).
    With ``view``, each image is embedded in that seeded view instead of clean."""
    model = checkpoint.model.eval()
    device = model_device(model)
    pre = checkpoint.preprocess
    loader = DataLoader(
        _Rows(images, rows, view.transform(pre) if view else EvalTransform(pre), strict),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    with torch.inference_mode():
        for batch, batch_rows, errors in loader:
            emb = model.embed(batch.to(device, non_blocking=True)).float().cpu().numpy()
            failures = [(int(r), e) for r, e in zip(batch_rows.tolist(), errors) if e]
            yield int(batch_rows[0]), emb, failures


def extract(
    images: ImageSet,
    checkpoint: Checkpoint,
    batch_size: int = 256,
    workers: int = 2,
    progress: Progress = NULL_PROGRESS,
    view: StoredView | None = None,
) -> Embeddings:
    """Embed ``images`` with the checkpoint's model (already on its device, in eval mode), in
    memory; an unreadable image stops it (training needs every row). With ``view``, the
    images' seeded view (recorded in the rows' ``model`` as ``view``)."""
    out = np.empty((len(images), checkpoint.config.embedding_dim), dtype=np.float32)
    progress.start("extract", len(images))
    try:
        for start, emb, _ in _embed_batches(images, checkpoint, range(len(images)), batch_size, workers, True, view):
            out[start : start + len(emb)] = emb
            progress.advance(len(emb))
    finally:
        progress.stop()
    return Embeddings(
        embeddings=out,
        labels=np.asarray(images.labels, dtype=np.int64),
        ids=images.ids,
        label_names=list(images.label_names),
        model=_identity(checkpoint, view),
        normalized=False,
        root=os.path.abspath(images.root),
    )


def pixel_embeddings(images: ImageSet, preprocess: Preprocess, batch_size: int = 256) -> Embeddings:
    """The baseline every model must beat: each image's normalised pixels (resized and cropped
    as ``preprocess`` says), flattened, as its embedding."""
    size = preprocess.image_size
    out = np.empty((len(images), 3 * size * size), dtype=np.float32)
    loader = DataLoader(_Rows(images, range(len(images)), EvalTransform(preprocess), True), batch_size=batch_size)
    for batch, rows, _ in loader:
        out[int(rows[0]) : int(rows[0]) + len(batch)] = batch.flatten(1).numpy()
    return Embeddings(embeddings=out, labels=np.asarray(images.labels, dtype=np.int64), ids=images.ids,
                      label_names=list(images.label_names), model={"arch": "pixels", "image_size": size},
                      root=os.path.abspath(images.root))


@dataclass
class ExtractResult:
    """What :func:`extract_to_file` wrote."""

    out: str
    rows: int  # rows in the output file
    dim: int
    labelled: int
    model: dict[str, Any]
    shard: str | None = None
    resumed_from_row: int = 0
    seconds: float = 0.0
    failed: list[dict[str, str]] = field(default_factory=list)
    report: str | None = None
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        embedded = self.rows + len(self.failed) - self.resumed_from_row
        return {
            "out": self.out,
            "images": self.rows,
            "embedding_dim": self.dim,
            "dtype": self.dtype,
            "labelled": self.labelled,
            "failed": len(self.failed),
            "report": self.report,
            "shard": self.shard,
            "resumed_from_row": self.resumed_from_row,
            "seconds": round(self.seconds, 2),
            "images_per_second": round(embedded / max(self.seconds, 1e-9), 1),
            # The class list travels in the file; on stdout its size is enough.
            "model": {k: (len(v) if k == "trained_classes" else v) for k, v in self.model.items()},
        }


def partial_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``OUT.partial`` (rows so far, final layout) and ``OUT.partial.json`` (how far they go).

    Unreadable images are listed in :func:`~bctool.data.check.report_path` (``OUT.failed.tsv``).
    """
    out = Path(out)
    return out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json")


def side_files(out: str | os.PathLike[str]) -> dict[str, Path]:
    """Every file an extraction into ``out`` writes beside it, by what it holds."""
    from bctool.data.check import report_path

    partial, progress = partial_paths(out)
    return {"partial rows": partial, "partial progress": progress, "report of skipped images": report_path(out)}


def unadapted_path(out: str | os.PathLike[str]) -> Path:
    """``OUT.unadapted.safetensors``: where ``extract --adapter`` keeps the model's own rows."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".safetensors") + UNADAPTED_SUFFIX)


def _fingerprint(head: bytes, images: ImageSet, rows: range) -> str:
    """What a resumed run must share with the interrupted one: the file header (ids, labels,
    model, shard) and the crop boxes."""
    digest = hashlib.sha256(head)
    for row in rows:
        digest.update(repr(images.records[row].crop).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ExtractOptions:
    """How :func:`extract_to_file` embeds the images and stores their rows."""

    batch_size: int = 256
    workers: int = 2
    shard: Shard | None = None  # one contiguous part of the list; None: all of it
    strict: bool = False  # an unreadable image stops the run (default: skipped and reported)
    resume: bool = False  # continue an interrupted run from its last saved row
    save_every: float = 30.0  # seconds between saves of the rows so far
    view: StoredView | None = None  # embed this seeded augmented view of every image
    dtype: str = "float32"  # how the rows are stored: float32 or float16


def extract_to_file(
    images: ImageSet,
    checkpoint: Checkpoint,
    out: str | os.PathLike[str],
    *,
    options: ExtractOptions = ExtractOptions(),
    progress: Progress = NULL_PROGRESS,
) -> ExtractResult:
    """Embed ``images`` (or one ``options.shard`` of them) into the embeddings file ``out``.

    Rows stream into ``OUT.partial``; every ``save_every`` seconds, on an error, and when SIGINT
    or SIGTERM stops the run after a batch (:class:`~bctool.utils.interrupt.Interrupted`), the rows so
    far are synced and their count saved to ``OUT.partial.json``, so ``resume`` continues from
    there. Unreadable images are skipped and listed in ``OUT.failed.tsv``
    (``strict`` stops instead). When all rows are in, the file is renamed to ``out`` (or, when
    images were skipped, its good rows are copied there), so ``out`` is never half written.
    With ``view``, every image is embedded in that seeded augmented view (recorded in the file's
    ``model`` as ``view``): old embeddings of the very views a new model will be trained on.
    ``dtype`` is how the rows are stored: float32, or float16 (half the disk and memory).
    """
    started = time.perf_counter()
    out = Path(out)
    check_output_path(out, "emb.safetensors")
    with output_lock(out):  # one writer per output: OUT.partial is shared by every run on OUT
        return _extract_locked(images, checkpoint, out, started, options, progress)


def _extract_locked(images: ImageSet, checkpoint: Checkpoint, out: Path, started: float, options: ExtractOptions,
                    progress: Progress) -> ExtractResult:
    """:func:`extract_to_file` once its output is checked and locked."""
    shard, resume = options.shard, options.resume
    rows = shard.rows(len(images)) if shard else range(len(images))
    if not len(images):
        raise DataError(f"{images.source!r}: no images to embed")
    if not len(rows):  # more parts than images: this part is empty, and still one member of the set
        logger.info("shard %s of %d images holds no image; its part file has no rows and completes the set",
                    shard, len(images))
    spec = _file_spec(images, checkpoint, rows, shard, options)
    partial, state = partial_paths(out)
    done, failed = (_resume_state(partial, state, out) if resume else (0, []))
    with _open_partial(partial, resume) as fh:
        try:
            writer = _writer(fh, partial, spec, resume)
        except OSError as exc:  # the header, or the file at its full size, could not be written
            with contextlib.suppress(OSError):  # its buffered bytes cannot be written either
                fh.close()
            if not resume:  # nothing in it to resume: leave no partial file behind
                partial.unlink(missing_ok=True)
            raise BctoolError(f"cannot write {str(partial)!r}: {_why(exc)}, then run the command again") from exc
        progress_file = _Progress(fh, state, _fingerprint(writer.head, images, rows), done, failed)
        if resume and _read_state(state).get("fingerprint") != progress_file.fingerprint:
            raise ConfigError(
                f"--resume: {str(partial)!r} was started with other crop boxes; start again without --resume"
            )
        with _writing(partial):
            progress_file.save()
        progress.start(f"extract{f' shard {shard}' if shard else ''}", len(rows))
        progress.advance(done)
        try:
            _stream_rows(_Job(images, checkpoint, rows, options), writer, progress_file, partial, progress)
        finally:
            progress.stop()
        with _writing(partial):
            fh.flush()
            os.fsync(fh.fileno())
    result = _finish(partial, state, out, spec, failed)
    result.shard = str(shard) if shard else None
    result.resumed_from_row = done
    result.seconds = time.perf_counter() - started
    return result


def _identity(checkpoint: Checkpoint, view: StoredView | None) -> dict[str, Any]:
    """The rows' ``model``: the checkpoint's identity, and the seeded view they are of, if any."""
    identity = checkpoint.identity()
    return {**identity, "view": view.to_dict()} if view else identity


def _file_spec(images: ImageSet, checkpoint: Checkpoint, rows: range, shard: Shard | None,
               options: ExtractOptions) -> EmbeddingsSpec:
    """The output file's spec: the rows' labels and ids, the model, which shard it is, the dtype."""
    ids = images.ids
    shard_meta = None
    if shard is not None:
        shard_meta = {
            "index": shard.index, "count": shard.count, "start": rows.start, "stop": rows.stop,
            "total": len(images), "list": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        }
    labels = np.asarray(images.labels, dtype=np.int64)
    return EmbeddingsSpec(
        labels=labels[rows.start : rows.stop], ids=ids[rows.start : rows.stop],
        label_names=list(images.label_names), dim=checkpoint.config.embedding_dim,
        model=_identity(checkpoint, options.view), root=os.path.abspath(images.root), shard=shard_meta,
        dtype=options.dtype,
    )


def _open_partial(partial: Path, resume: bool):  # noqa: ANN202 - a binary file object
    """``OUT.partial``, opened to continue (``resume``) or new."""
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        return open(partial, "r+b" if resume else "w+b")  # noqa: SIM115 - the caller closes it
    except OSError as exc:
        raise ConfigError(f"cannot write {str(partial)!r}: {exc.strerror or exc}; choose a writable --out") from exc


def _writer(fh: Any, partial: Path, spec: EmbeddingsSpec, resume: bool) -> EmbeddingsWriter:
    """The writer of the partial file: its header written anew, or checked on ``resume``."""
    if not resume:
        return EmbeddingsWriter.create(fh, spec)
    try:
        return EmbeddingsWriter.reopen(fh, spec)
    except EmbeddingsError as exc:
        raise ConfigError(f"--resume: {str(partial)!r}: {exc}; start again without --resume") from exc


@dataclass
class _Progress:
    """How far the partial file goes: rows done and images skipped, saved to ``OUT.partial.json``
    after the rows themselves are synced."""

    fh: Any
    path: Path
    fingerprint: str
    done: int
    failed: list[dict[str, Any]]

    def save(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        atomic_write_text(self.path, json.dumps({"fingerprint": self.fingerprint, "rows_done": self.done,
                                                 "failed": self.failed}))


@dataclass(frozen=True)
class _Job:
    """What to embed: the rows of ``images`` with ``checkpoint``, and how (``options``)."""

    images: ImageSet
    checkpoint: Checkpoint
    rows: range
    options: ExtractOptions


def _stream_rows(job: _Job, writer: EmbeddingsWriter, state: _Progress, partial: Path, progress: Progress) -> None:
    """Embed the rows after ``state.done`` into ``writer``, saving ``state`` every
    ``options.save_every`` seconds, on an error and on a stop signal."""
    images, rows, options = job.images, job.rows, job.options
    ids = images.ids
    last_save = time.monotonic()
    try:
        with StopSignals() as stop:
            batches = _embed_batches(images, job.checkpoint, rows[state.done:], options.batch_size, options.workers,
                                     options.strict, options.view)
            for start, emb, failures in batches:
                with _writing(partial):
                    writer.write(start - rows.start, emb)
                state.failed.extend({"row": r - rows.start, "id": ids[r], "path": str(images.records[r].path),
                                     "error": e} for r, e in failures)
                state.done = start - rows.start + len(emb)
                progress.advance(len(emb))
                if stop.signal_number:
                    raise Interrupted(
                        f"{stop.name}: stopped after {state.done} of {len(rows)} images; they are saved in "
                        f"{str(partial)!r}: continue with the same command and --resume", stop.signal_number)
                if time.monotonic() - last_save >= options.save_every:
                    with _writing(partial):
                        state.save()
                    last_save = time.monotonic()
    except BaseException:
        # A resumed run continues after the last finished batch; if even that cannot be
        # written (a full disk), the last saved progress still describes the file.
        with contextlib.suppress(OSError, BctoolError):
            state.save()
        raise


@contextlib.contextmanager
def _writing(partial: Path) -> Iterator[None]:
    """Turn a failed write (a full disk, a lost mount) into an error that says how to go on."""
    try:
        yield
    except OSError as exc:
        raise BctoolError(f"cannot write {str(partial)!r}: {_why(exc)}, then continue with --resume") from exc


def _why(exc: OSError) -> str:
    """What stopped a write, and what frees the way."""
    if exc.errno == errno.EFBIG:
        return "the file-size limit is reached (File too large); raise it (ulimit -f) or write to another file system"
    return f"{exc.strerror or exc}; free disk space (or fix the folder's permissions)"


def _read_state(state: Path) -> dict[str, Any]:
    try:
        data = json.loads(state.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("rows_done"), int):
            raise ValueError("not a progress record")
        return data
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume: {str(state)!r} is unreadable ({exc}); start again without --resume") from exc


def _resume_state(partial: Path, state: Path, out: Path) -> tuple[int, list[dict[str, Any]]]:
    """Rows done and images skipped by the interrupted run that left ``partial``."""
    if not (partial.is_file() and state.is_file()):
        raise ConfigError(
            f"--resume: no interrupted extraction to {str(out)!r} (no {partial.name} beside it); "
            "start without --resume"
        )
    data = _read_state(state)
    return int(data["rows_done"]), list(data.get("failed", []))


def _finish(
    partial: Path, state: Path, out: Path, spec: EmbeddingsSpec, failed: list[dict[str, Any]],
) -> ExtractResult:
    """Move the complete ``partial`` to ``out`` (copying only good rows when some failed), and
    write or clear the report of skipped images."""
    report = write_report(out, failed)
    if report is not None:
        logger.info("%d images could not be read and were skipped; see %s", len(failed), report)
    keep = np.ones(len(spec.ids), dtype=bool)
    keep[[f["row"] for f in failed]] = False
    if failed and not keep.any():
        partial.unlink(missing_ok=True)
        state.unlink(missing_ok=True)
        raise DataError(f"none of the {len(keep)} images could be read (first: {failed[0]['error']}); see {str(report)!r}")
    labels = spec.labels[keep]
    if failed:
        source = load_embeddings(partial, mmap=True)
        kept_rows = np.flatnonzero(keep)
        kept = replace(spec, labels=labels, ids=[spec.ids[i] for i in kept_rows.tolist()])
        with write_embeddings(out, kept) as writer:
            for pos in range(0, len(kept_rows), 65536):
                block = kept_rows[pos : pos + 65536]
                writer.write(pos, source.embeddings[block])
        del source
        partial.unlink()
    else:
        os.replace(partial, out)
    state.unlink(missing_ok=True)
    return ExtractResult(
        out=str(out), rows=int(keep.sum()), dim=spec.dim, labelled=int((labels >= 0).sum()),
        model=spec.model, failed=[{k: str(v) for k, v in f.items()} for f in failed],
        report=str(report) if report else None, dtype=spec.dtype,
    )
