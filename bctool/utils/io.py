"""Atomic file output: write to a temporary file beside the target, then rename (several files
as one unit: :func:`atomic_paths`; a symbolic link is written through, not replaced); one
writer per output at a time (:func:`output_lock`)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bctool.errors import BctoolError, ConfigError

if TYPE_CHECKING:
    import torch

try:
    import fcntl
except ImportError:  # not POSIX: outputs are not locked
    fcntl = None  # type: ignore[assignment]

# Output locks this process holds (lock file -> [depth, pid that took it]): taking one again is
# a no-op, so a command and the library function it calls may both lock the same output. A
# record lock belongs to the process: a second descriptor of the lock file opened and closed in
# it would drop the lock, which this bookkeeping never does.
_HELD: dict[str, list[int]] = {}


def lock_path(out: str | os.PathLike[str]) -> Path:
    """The lock file of an output: ``OUT.lock`` beside it."""
    return Path(f"{os.fspath(out)}.lock")


@contextlib.contextmanager
def output_lock(out: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``OUT.lock`` while ``out`` (and its partial and state files) is being written.

    A second process writing the same output is refused at once with a :class:`BctoolError`
    naming the lock and the holder's pid, so neither run's file is torn. The lock is a POSIX
    record lock (``lockf``) on the file: it belongs to the holding process alone (not to the
    data loader workers it forks), and the kernel releases it the moment that process exits or
    dies, so a killed run leaves no stale lock and can be resumed at once. The lock file is
    removed when the holder is done.
    """
    lock = lock_path(out)
    key = os.path.realpath(lock)
    held = _HELD.get(key)
    if fcntl is None or (held is not None and held[1] == os.getpid()):
        entry = _HELD.setdefault(key, [0, os.getpid()])
        entry[0] += 1
        try:
            yield
        finally:
            entry[0] -= 1
            if not entry[0] and _HELD.get(key) is entry:
                del _HELD[key]
        return
    fd = _acquire(lock, out)
    entry = _HELD[key] = [1, os.getpid()]
    try:
        yield
    finally:
        if entry[1] == os.getpid():  # a forked child leaving the block leaves the lock to its parent
            if _HELD.get(key) is entry:
                del _HELD[key]
            with contextlib.suppress(OSError):
                lock.unlink()
            os.close(fd)


def _acquire(lock: Path, out: str | os.PathLike[str]) -> int:
    """An open descriptor of ``lock`` holding its exclusive record lock, with this pid written in."""
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            blocker = next((p for p in lock.parents if p.exists() and not p.is_dir()), None)
            reason = f"{str(blocker)!r} is a file, not a folder" if blocker else (exc.strerror or str(exc))
            raise BctoolError(f"cannot write {str(out)!r}: {reason}; choose a writable --out") from exc
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            # This process holds no lock on the file (that would have succeeded), so closing
            # this descriptor drops nothing of its own.
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BctoolError(
                f"{str(out)!r} is being written by another process (pid {holder}, holding {str(lock)!r}); "
                "wait for it to finish, or choose another output path"
            ) from None
        with contextlib.suppress(OSError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:  # still the lock file, not one its holder removed
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        os.close(fd)


def refuse_special(out: str | os.PathLike[str], flag: str) -> None:
    """A device, FIFO or socket as an output would be replaced by a regular file (outputs are
    written beside it and renamed onto it): refuse it."""
    with contextlib.suppress(OSError):
        mode = os.stat(out).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            kind = ("a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a socket")
            raise ConfigError(
                f"{flag} {str(out)!r} is {kind}, not a file: bctool writes its outputs to a new file and renames it "
                f"into place, which would replace {str(out)!r}; pass a regular file path"
            )


def _written_through(target: Path) -> Path:
    """The file ``target`` names: itself, or where it points when it is a symbolic link (so a
    link to an output keeps pointing at the new content). A link that loops is refused."""
    if not target.is_symlink():
        return target
    try:
        return Path(os.path.realpath(target, strict=True))
    except FileNotFoundError:  # a link to a file not written yet: create that file
        return Path(os.path.realpath(target))
    except OSError as exc:
        raise BctoolError(
            f"cannot write {str(target)!r}: it is a symbolic link that loops ({exc.strerror or exc}); "
            "remove the link or choose another output path"
        ) from exc


def _temporary(final: Path, target: Path) -> Path:
    """A new empty file beside ``final`` (``target`` is the name the user gave, for messages)."""
    folder = final.parent if str(final.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise BctoolError(
            f"cannot write {str(target)!r}: {exc.strerror or exc}; "
            "choose an output path in a writable folder"
        ) from exc
    os.close(fd)
    return Path(name)


def _write_fix(exc: OSError) -> str:
    """What to check after a failed write."""
    if exc.errno == errno.EFBIG:
        return "check free disk space and the file-size limit (`ulimit -f`, or the file system's largest file)"
    return "check free disk space and permissions"


@contextlib.contextmanager
def atomic_paths(targets: Sequence[str | os.PathLike[str]]) -> Iterator[list[Path]]:
    """Write several files as one unit: yield one temporary path per target, each in its
    target's folder (a symbolic link's: in the folder of the file it points to, which is
    replaced and the link kept); once the block ends, fsync them all, then rename each onto its
    target, in the order given (put the main file last, its companion files first).

    An error in the block, or while completing the files (full disk, file-size limit, Ctrl-C),
    removes every temporary and leaves every earlier file whole. Only a crash between the
    renames themselves, after every file is complete on disk, can leave some targets new and
    others old. An :class:`OSError` becomes a :class:`BctoolError` naming the target.
    """
    given = [Path(t) for t in targets]
    finals = [_written_through(t) for t in given]
    temps: list[Path] = []
    pending: list[Path] = []  # temporaries not yet renamed into place

    def named(exc: OSError) -> Path:
        """The target whose temporary the error names; the main (last) one otherwise."""
        failed = os.fspath(exc.filename) if exc.filename is not None else None
        return next((t for t, tmp in zip(given, temps) if os.fspath(tmp) == failed), given[-1])

    try:
        for target, final in zip(given, finals):
            temps.append(_temporary(final, target))
            pending.append(temps[-1])
        yield list(temps)
        # mkstemp makes 0600 files (and writers may replace the file): give each output the
        # usual permissions, 0666 less the umask, as a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        for tmp in temps:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~umask)
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
            pending.remove(tmp)
    except OSError as exc:
        for tmp in pending:
            tmp.unlink(missing_ok=True)
        target = named(exc)
        kept = [repr(str(t)) for t, tmp in zip(given, temps) if t != target and tmp in pending]
        unit = f" (nor {', '.join(kept)} written with it)" if kept else ""
        raise BctoolError(f"cannot write {str(target)!r}{unit}: {exc.strerror or exc}; {_write_fix(exc)}") from exc
    except BaseException:
        for tmp in pending:
            tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success
    (:func:`atomic_paths` with one file; a symbolic link is written through).

    A run killed at any moment leaves either the old file or the new one, never a torn file.
    """
    with atomic_paths([target]) as (tmp,):
        yield tmp


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


_DTYPES = {
    "float64": ("F64", 8), "float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2),
    "int64": ("I64", 8), "int32": ("I32", 4), "int16": ("I16", 2), "int8": ("I8", 1),
    "uint8": ("U8", 1), "bool": ("BOOL", 1),
}

# safetensors refuses to read a header longer than this (its MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000


def safetensors_header(metadata: dict[str, str], tensors: list[tuple[str, str, list[int], int]]) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file holding ``tensors``
    (``(name, dtype code, shape, byte count)``, in data order) and ``metadata`` (in order),
    padded with spaces to 8 bytes as safetensors pads it."""
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for name, code, shape, nbytes in tensors:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_BYTES:
        raise BctoolError(
            f"the file's header would take {len(raw):,} bytes, over safetensors' limit of "
            f"{MAX_HEADER_BYTES:,} (class names and other metadata are stored there); use shorter or fewer names"
        )
    return len(raw).to_bytes(8, "little") + raw


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset of its data, its length checked
    against the limit and the file size before it is read; ``ValueError`` says what is wrong."""
    file_size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{file_size} bytes, shorter than the 8-byte header length")
        header_len = int.from_bytes(prefix, "little")
        if header_len > MAX_HEADER_BYTES:
            raise ValueError(f"header of {header_len} bytes, over the {MAX_HEADER_BYTES} limit")
        if 8 + header_len > file_size:
            raise ValueError(f"header of {header_len} bytes runs past the end of the file")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt JSON header: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, 8 + header_len


def save_safetensors(target: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write torch ``tensors`` and ``metadata`` as a safetensors file, atomically and byte for
    byte reproducibly: the header lists the metadata in the given order and the tensors as
    safetensors' own writer lays them out (larger element sizes first, then by name, so every
    tensor is aligned), but without its per-process random order of metadata keys."""
    import torch

    entries = []
    for name, tensor in tensors.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise BctoolError(f"cannot store tensor {name!r} of dtype {dtype} in a safetensors file")
        entries.append((name, tensor, *_DTYPES[dtype]))
    entries.sort(key=lambda e: (-e[3], e[0]))
    head = safetensors_header(metadata, [(name, code, list(t.shape), t.numel() * size) for name, t, code, size in entries])
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        fh.write(head)
        for _, tensor, _, _ in entries:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            fh.write(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


def check_output_path(out: str | os.PathLike[str], example: str = "model.safetensors") -> None:
    """Fail before the work, not after, when ``out`` cannot be written: a folder (``example``
    names a file to suggest inside it) or a path under a folder this process cannot write to."""
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"--out {str(path)!r} is a folder; pass a file name such as {str(path / example)!r}")
    refuse_special(out, "--out")
    folder = path.parent if str(path.parent) else Path(".")
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"--out {str(path)!r}: cannot write into {str(existing)!r}; choose a writable folder")


def unused_path(wanted: str | os.PathLike[str]) -> Path:
    """``wanted``, or ``NAME-2.EXT``, ``NAME-3.EXT``... beside it if it exists: a name to put in a
    suggested command, which must never overwrite a file the user has."""
    path = Path(wanted)
    if not path.exists():
        return path
    n = 2
    while (candidate := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists():
        n += 1
    return candidate


def check_format_version(path: str | os.PathLike[str], meta: dict[str, str], what: str, known: str,
                         error: type[Exception]) -> None:
    """Refuse a file whose ``format_version`` is newer than ``known`` (what this bctool writes
    and reads), naming both versions; a file without one (written before versions, or by another
    tool) is read as it is."""
    found = meta.get("format_version")
    if found is None:
        return
    try:
        newer = int(found) > int(known)
    except ValueError:
        raise error(f"{str(path)!r} has a {what} format_version {found!r} that is not a number; "
                    "re-create the file with bctool") from None
    if newer:
        raise error(f"{str(path)!r} is {what} format version {found}; this bctool reads versions up to {known}: "
                    "upgrade bctool (pip install -U bctool) to read it")
