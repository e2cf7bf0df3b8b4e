"""Atomic file output: write to a temporary file beside the target, then rename; one writer
per output at a time (:func:`output_lock`)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bctool.errors import BctoolError, ConfigError

if TYPE_CHECKING:
    import torch

try:
    import fcntl
except ImportError:  # not POSIX: outputs are not locked
    fcntl = None  # type: ignore[assignment]

# Output locks this process holds (path -> depth): taking one again is a no-op, so a command
# and the library function it calls may both lock the same output.
_HELD: dict[str, int] = {}


def lock_path(out: str | os.PathLike[str]) -> Path:
    """The lock file of an output: ``OUT.lock`` beside it."""
    return Path(f"{os.fspath(out)}.lock")


@contextlib.contextmanager
def output_lock(out: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``OUT.lock`` while ``out`` (and its partial and state files) is being written.

    A second process writing the same output is refused at once with a :class:`BctoolError`
    naming the lock and the holder's pid, so neither run's file is torn. The lock is an
    ``flock`` on the file: the kernel releases it when the holder exits or dies, so a killed run
    leaves no stale lock. The lock file is removed when the holder is done.
    """
    key = os.path.realpath(os.fspath(out))
    if fcntl is None or key in _HELD:
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    lock = lock_path(out)
    fd = _acquire(lock, out)
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def _acquire(lock: Path, out: str | os.PathLike[str]) -> int:
    """An open descriptor of ``lock`` holding its exclusive flock, with this pid written in."""
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            blocker = next((p for p in lock.parents if p.exists() and not p.is_dir()), None)
            reason = f"{str(blocker)!r} is a file, not a folder" if blocker else (exc.strerror or str(exc))
            raise BctoolError(f"cannot write {str(out)!r}: {reason}; choose a writable --out") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BctoolError(
                f"{str(out)!r} is being written by another process (pid {holder}, holding {str(lock)!r}); "
                "wait for it to finish, or choose another output path"
            ) from None
        with contextlib.suppress(OSError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:  # still the lock file, not one its holder removed
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        os.close(fd)


def _refuse_special(out: str | os.PathLike[str], flag: str) -> None:
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


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success.

    A run killed at any moment leaves either the old file or the new one, never a torn file.
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise BctoolError(
            f"cannot write {str(target)!r}: {exc.strerror or exc}; "
            "choose an output path in a writable folder"
        ) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes 0600 files (and writers may replace the file): give the output the
        # usual permissions, 0666 less the umask, as a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BctoolError(
            f"cannot write {str(target)!r}: {exc.strerror or exc}; "
            "check free disk space and permissions"
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    _refuse_special(out, "--out")
    folder = path.parent if str(path.parent) else Path(".")
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"--out {str(path)!r}: cannot write into {str(existing)!r}; choose a writable folder")


def check_not_an_input(
    out: str | os.PathLike[str], inputs: dict[str, str | os.PathLike[str] | list | tuple | None],
    flag: str = "--out",
) -> None:
    """Refuse, before any work, an ``out`` that is one of the command's inputs: the same path
    once links are resolved, or the same file (a hard link). ``inputs`` maps each option's name
    to its path, a list of paths, or None (not given)."""
    _refuse_special(out, flag)
    if os.fspath(out).endswith(os.sep) or Path(out).is_dir():
        raise ConfigError(f"{flag} {str(out)!r} is a folder; pass the name of a file (in it, for example)")
    target = Path(out)
    resolved = os.path.realpath(target)
    for option, given in inputs.items():
        paths = given if isinstance(given, (list, tuple)) else [given]
        for path in paths:
            if path is None:
                continue
            same = os.path.realpath(path) == resolved
            if not same and target.exists() and Path(path).exists():
                with contextlib.suppress(OSError):
                    same = os.path.samefile(path, target)
            if same:
                raise ConfigError(
                    f"{flag} {str(out)!r} is the {option} input {str(path)!r}: writing it would destroy that "
                    f"input; choose another {flag}"
                )


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
