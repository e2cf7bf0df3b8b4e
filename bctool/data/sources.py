"""Where images come from: a list file (``PATH LABEL`` per line) or an ImageFolder tree.

Every image gets an ``id``: its path relative to the dataset root, POSIX style, without the
extension. Labels are strings; they are mapped to integers by sorted name and the names travel
with every artifact, so two files can be compared by label name.
"""

from __future__ import annotations

import logging

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bctool.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRecord:
    """One image: where it is, its id, and its label index (-1 when unknown)."""

    path: Path
    id: str
    label: int
    crop: tuple[float, float, float, float] | None = None  # (x1, y1, x2, y2) box to cut out first


@dataclass(frozen=True)
class ImageSet:
    """An ordered set of images with string labels mapped to integers."""

    root: Path
    records: tuple[ImageRecord, ...]
    label_names: tuple[str, ...]
    source: str  # the list file or folder it was read from

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        """Label index of every record."""
        return [r.label for r in self.records]

    @property
    def ids(self) -> list[str]:
        """Id of every record."""
        return [r.id for r in self.records]

    def has_labels(self) -> bool:
        """True when every record has a known label."""
        return all(r.label >= 0 for r in self.records)

    def class_counts(self) -> list[int]:
        """Number of images per label index."""
        counts = [0] * len(self.label_names)
        for r in self.records:
            if r.label >= 0:
                counts[r.label] += 1
        return counts


def image_id(path: Path, root: Path) -> str:
    """The id of ``path``: relative to ``root`` when inside it, POSIX style, no extension.

    Lexical (no symlink resolution), so an id does not depend on where links point or on how
    the list file's path was typed.
    """
    absolute, base = os.path.abspath(path), os.path.abspath(root)
    if os.path.commonpath([absolute, base]) == base:
        rel = PurePosixPath(Path(os.path.relpath(absolute, base)).as_posix())
    else:
        rel = PurePosixPath(Path(absolute).as_posix())
    return str(rel.with_suffix("")) if rel.suffix else str(rel)


def _parse_line(line: str, lineno: int, source: Path) -> tuple[str, str | None] | None:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    # A tab separates path and label when present, so paths may contain spaces.
    fields = text.split("\t") if "\t" in text else text.split()
    fields = [f.strip() for f in fields if f.strip()]
    if len(fields) == 1:
        return fields[0], None
    if len(fields) == 2:
        return fields[0], fields[1]
    raise DataError(
        f"{source}:{lineno}: expected `PATH LABEL` (2 fields), got {len(fields)} fields in "
        f"{text!r}; separate path and label by a tab if the path contains spaces"
    )


def _warn_if_a_file(line: str, lineno: int, source: Path) -> None:
    """A comment line (``#...``) whose first field is a file beside the list: say it is skipped."""
    fields = line.strip().split("\t") if "\t" in line else line.split()
    if fields and fields[0].startswith("#") and (source.parent / fields[0]).is_file():
        logger.warning("%s:%d: %r is skipped as a comment (it starts with #), though a file of that name is there; "
                       "to list it, write ./%s", source, lineno, fields[0], fields[0])


def read_list_file(path: Path, require_labels: bool = True) -> ImageSet:
    """Read a list file: one ``PATH [LABEL]`` per line, PATH relative to the file's folder."""
    try:
        # Only "\n" ends a line (str.splitlines would also break at \x0c, \x85, \u2028 ...),
        # and a byte-order mark from Windows editors is not part of the first path.
        lines = [line.removesuffix("\r") for line in path.read_text(encoding="utf-8-sig").split("\n")]
    except UnicodeDecodeError as exc:
        raw = path.read_bytes()
        if raw[:4] in (b"\x89PNG", b"GIF8") or raw[:3] == b"\xff\xd8\xff" or raw[:4] == b"RIFF":
            raise DataError(f"{str(path)!r} is an image, not a list file; pass a list file (`PATH LABEL` lines) "
                            "or the folder that holds the images") from exc
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"list file {str(path)!r} is not UTF-8 text (byte {raw[exc.start]:#04x} on line {line}); save it as "
            "UTF-8, e.g. iconv -f latin1 -t utf-8 OLD > NEW"
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot read list file {str(path)!r}: {exc.strerror}") from exc
    root = path.parent
    entries: list[tuple[Path, str | None]] = []
    for lineno, line in enumerate(lines, start=1):
        parsed = _parse_line(line, lineno, path)
        if parsed is None:
            _warn_if_a_file(line, lineno, path)
            continue
        rel, label = parsed
        if require_labels and label is None:
            hint = next((f" (separated by {sep!r}? use a tab or spaces)" for sep in (",", ";", "|") if sep in rel), "")
            raise DataError(
                f"{path}:{lineno}: {rel!r} has no label{hint}; training needs `PATH LABEL` on every line"
            )
        image_path = Path(rel) if os.path.isabs(rel) else root / rel
        entries.append((image_path, label))
    return _make_set(entries, root, str(path))


def read_image_folder(root: Path, labels_used: bool = True) -> ImageSet:
    """Read an ImageFolder tree: one subfolder per class holding that class's images (a single
    subfolder is warned of when the caller uses the labels: every image gets one label)."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(
            f"folder {str(root)!r} has no class subfolders; use ROOT/CLASS/IMAGE.jpg or a list file"
        )
    entries: list[tuple[Path, str | None]] = []
    for name in classes:
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            for fname in sorted(filenames):
                if Path(fname).suffix.lower() in IMAGE_EXTENSIONS:
                    entries.append((Path(dirpath) / fname, name))
    if len(classes) == 1 and labels_used:
        logger.warning(
            "folder %r has one subfolder, %r: each of its %d images is labelled %r (a folder's "
            "subfolders are its classes); for other labels pass a list file (`PATH LABEL` lines) "
            "or the folder that holds one subfolder per class",
            str(root), classes[0], len(entries), classes[0],
        )
    return _make_set(entries, root, str(root))


def _make_set(entries: list[tuple[Path, str | None]], root: Path, source: str) -> ImageSet:
    if not entries:
        raise DataError(f"{source!r} lists no images; add `PATH LABEL` lines or image files")
    names = sorted({label for _, label in entries if label is not None})
    index = {name: i for i, name in enumerate(names)}
    records = []
    seen: dict[str, Path] = {}
    for path, label in entries:
        rid = image_id(path, root)
        if rid in seen:
            raise DataError(
                f"{source!r}: id {rid!r} appears twice ({seen[rid]} and {path}); ids are paths "
                "without extension and must be unique: rename or drop one of the files"
            )
        seen[rid] = path
        records.append(ImageRecord(path=path, id=rid, label=index[label] if label is not None else -1))
    return ImageSet(root=root, records=tuple(records), label_names=tuple(names), source=source)


def find_named_image(root: Path, name: str) -> Path:
    """The file of a benchmark image ``name`` under ``root`` (``root/jpg/NAME.jpg`` as the
    revisited Oxford/Paris archives unpack, or ``root/NAME.jpg``)."""
    for candidate in (root / "jpg" / f"{name}.jpg", root / f"{name}.jpg", root / name):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"image {name!r} is not under {str(root)!r} (looked for jpg/{name}.jpg and {name}.jpg); "
        "pass the folder the benchmark's jpg/ folder was unpacked into"
    )


def image_set_from_names(
    root: str | os.PathLike[str],
    names: list[str] | tuple[str, ...],
    boxes: list[tuple[float, float, float, float]] | None = None,
    source: str = "",
) -> ImageSet:
    """Unlabelled images named by a benchmark's ground truth, in its order, optionally cropped."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"dataset root {str(base)!r} is not a folder; pass the folder holding jpg/")
    records = []
    for i, name in enumerate(names):
        path = find_named_image(base, name)
        crop = tuple(float(v) for v in boxes[i]) if boxes is not None else None
        records.append(ImageRecord(path=path, id=image_id(path, base), label=-1, crop=crop))  # type: ignore[arg-type]
    return ImageSet(root=base, records=tuple(records), label_names=(), source=source or str(base))


def load_image_set(path: str | os.PathLike[str], require_labels: bool = True, labels_used: bool = True) -> ImageSet:
    """Open DATA: a list file or an ImageFolder tree (``labels_used`` False: the caller reads the
    images alone, so a folder's labels are not warned about)."""
    p = Path(path)
    if p.is_dir():
        return read_image_folder(p, labels_used)
    if p.is_file():
        return read_list_file(p, require_labels=require_labels)
    raise DataError(f"data {str(p)!r} {_what_is_there(p)}; pass a list file (`PATH LABEL` lines) or a folder "
                    "with one subfolder per class")


def _what_is_there(p: Path) -> str:
    """Why ``p`` is neither a file nor a folder, in words: missing, a symbolic-link loop or a
    dangling link, a FIFO, a device, a socket."""
    import errno
    import stat

    try:
        mode = p.stat().st_mode
    except OSError as exc:
        if p.is_symlink() and exc.errno in (errno.ELOOP, errno.ENOENT):
            return "is a symbolic link that loops or points nowhere"
        return "does not exist" if exc.errno == errno.ENOENT else f"cannot be read ({exc.strerror})"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (a named pipe), not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    return "is a socket, not a file"
