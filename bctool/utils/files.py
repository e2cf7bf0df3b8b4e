"""Which files a command reads and writes, declared before any work, and the one check that
refuses an output that would destroy an input.

Every command that writes builds a :class:`FilePlan`: each file (or folder) it reads, under the
option that names it, and each file it writes, the side files too (``OUT.state.safetensors``,
``OUT.unadapted.safetensors``, ``STEM.ids.txt``, ``OUT.partial``, ``OUT.lock``...).
:meth:`FilePlan.check` then refuses, before anything is read or written:

* a write that is a read: the same path once links are resolved, or the same file (inode);
  a shard set (a folder or ``.txt`` manifest of ``extract --shard`` parts) counts as its parts;
* a write into a shard-set folder that is read (every ``*.safetensors`` in it is a part, so a
  new file there would join the set);
* a write that is a device, FIFO or socket, or a folder;
* two writes that are one file (``--out`` equal to another output's side file).

The plan is logged (``--verbose``) and kept for :func:`watch_plans`, so a test can compare what a
command declares with what it opens.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bctool.errors import ConfigError, EmbeddingsError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Given = PathLike | Sequence[PathLike] | None

# Lists that see every plan declared while they are watched (see watch_plans).
_WATCHERS: list[list[FilePlan]] = []


@dataclass(frozen=True)
class Use:
    """One file or folder a command uses, and the option (or argument) that names it."""

    role: str
    path: Path
    folder: bool = False  # a folder: everything under it is covered (a dataset's root, a log folder)


@dataclass
class FilePlan:
    """The files one command reads and writes (see the module docstring)."""

    command: str
    reads: list[Use] = field(default_factory=list)
    writes: list[Use] = field(default_factory=list)
    shard_folders: list[Use] = field(default_factory=list)  # read shard-set folders: nothing may be written in them

    def read(self, role: str, given: Given) -> FilePlan:
        """Files (or folders) read as they are: checkpoints, adapters, list files, ground truth."""
        for path in _paths(given):
            self.reads.append(Use(role, path, folder=path.is_dir()))
        return self

    def read_data(self, role: str, given: PathLike | None) -> FilePlan:
        """A dataset: a list file (its images lie under its folder) or an image folder."""
        if given is not None:
            path = Path(given)
            self.reads.append(Use(role, path, folder=path.is_dir()))
            if path.is_file():
                self.reads.append(Use(f"{role}'s images", path.parent, folder=True))
        return self

    def read_embeddings(self, role: str, given: Given) -> FilePlan:
        """Embeddings files; a shard set (folder or ``.txt`` manifest) counts as its parts."""
        from bctool.embeddings import shard_set_parts

        for path in _paths(given):
            try:
                parts = shard_set_parts(path)
            except EmbeddingsError:  # a broken set: the command itself says what is wrong with it
                parts = None
            if parts is None:
                self.reads.append(Use(role, path))
                continue
            if path.is_dir():
                self.shard_folders.append(Use(role, path, folder=True))
            else:
                self.reads.append(Use(role, path))  # the manifest
            self.reads.extend(Use(f"{role} (a part of the shard set {str(path)!r})", part) for part in parts)
        return self

    def write(self, role: str, given: PathLike | None, *, locked: bool = False) -> FilePlan:
        """A file written (renamed into place, appended to, or removed when done); ``locked``: its
        ``OUT.lock`` is taken while it is written."""
        if given is not None:
            self.writes.append(Use(role, Path(given)))
            if locked:
                from bctool.utils.io import lock_path

                self.writes.append(Use(f"{role}'s lock", lock_path(given)))
        return self

    def write_folder(self, role: str, given: PathLike | None) -> FilePlan:
        """A folder written into (a dataset's images and lists, a demo's work folder)."""
        if given is not None:
            self.writes.append(Use(role, Path(given), folder=True))
        return self

    # -- checking ---------------------------------------------------------------------------
    def check(self) -> FilePlan:
        """Refuse any overlap (see the module docstring), before any work; log the plan."""
        files = [w for w in self.writes if not w.folder]
        for index, out in enumerate(files):
            _refuse_special(out)
            for other in files[:index]:
                if _same(out.path, other.path):
                    raise ConfigError(f"{other.role} and {out.role} are one file, {str(out.path)!r}; choose another "
                                      f"{_fix_option(out, other)}")
            for used in self.reads:
                if not used.folder and _same(out.path, used.path):
                    raise ConfigError(
                        f"{_what(out)} {str(out.path)!r} is the {used.role} input {str(used.path)!r}: writing it would "
                        f"destroy that input; choose another {_fix_option(out)}"
                    )
            for shards in self.shard_folders:
                if _inside(out.path, shards.path):
                    raise ConfigError(
                        f"{_what(out)} {str(out.path)!r} is inside the shard-set folder {str(shards.path)!r} read as "
                        f"{shards.role}: every .safetensors file there is a part of that set, so writing it would "
                        f"change or destroy the set; choose another {_fix_option(out)} outside that folder"
                    )
        logger.debug("%s reads %s; writes %s", self.command, [str(u.path) for u in self.reads],
                     [str(u.path) for u in self.writes])
        for plans in _WATCHERS:
            plans.append(self)
        return self

    # -- what a test compares with the files a command opens ----------------------------------
    def covers_read(self, path: PathLike) -> bool:
        """``path`` is a declared read (or under a declared folder), or a declared write read back."""
        return self._covers(path, [*self.reads, *self.shard_folders, *self.writes])

    def covers_write(self, path: PathLike) -> bool:
        """``path`` is a declared write, under a declared folder, or a temporary file beside one
        (``.NAME.*.tmp``, renamed onto NAME when complete; an exporter may add a suffix)."""
        path = Path(path)
        if self._covers(path, self.writes):
            return True
        name = path.name
        return name.startswith(".") and ".tmp" in name and any(
            not w.folder and _same(w.path.parent, path.parent) and name.startswith(f".{w.path.name}.")
            for w in self.writes
        )

    @staticmethod
    def _covers(path: PathLike, uses: Iterable[Use]) -> bool:
        return any(_inside(path, u.path) if u.folder else _same(path, u.path) for u in uses)


def _paths(given: Given) -> list[Path]:
    if given is None:
        return []
    if isinstance(given, (str, os.PathLike)):
        return [Path(given)]
    return [Path(p) for p in given if p is not None]


def _same(a: PathLike, b: PathLike) -> bool:
    """One file: the same path once links are resolved, or the same inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def _inside(path: PathLike, folder: PathLike) -> bool:
    """``path`` lies in ``folder`` (at any depth), links resolved."""
    real, top = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return real == top or top in real.parents


def _what(use: Use) -> str:
    return use.role if use.role.startswith("-") or use.role.isupper() else f"the {use.role}"


def _fix_option(*uses: Use) -> str:
    """The option a user changes to fix an overlap: the --out behind a side file."""
    roles = [u.role.split("'")[0] for u in uses]
    return next((r for r in roles if r.startswith("-")), roles[0])


def _refuse_special(out: Use) -> None:
    """A folder cannot be an output; nor a device, FIFO or socket (see :func:`~bctool.utils.io.refuse_special`)."""
    from bctool.utils.io import refuse_special

    if Path(out.path).is_dir():
        raise ConfigError(f"{_what(out)} {str(out.path)!r} is a folder; pass the name of a file (in it, for example)")
    refuse_special(out.path, _what(out))


@contextlib.contextmanager
def watch_plans() -> Iterator[list[FilePlan]]:
    """Collect every plan checked while inside (tests compare them with the files opened)."""
    plans: list[FilePlan] = []
    _WATCHERS.append(plans)
    try:
        yield plans
    finally:
        _WATCHERS.remove(plans)
