"""Outputs written as a unit: a failed `bctool convert` to .npy or .faiss leaves the previous
file and its ids and labels files whole; non-finite rows are refused before anything is
written; a symbolic link as an output is written through."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bctool.cli import app
from bctool.convert import convert
from bctool.embeddings import Embeddings, load_embeddings, save_embeddings
from bctool.errors import BctoolError
from bctool.utils.io import atomic_paths, atomic_write_text

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SIZE_LIMIT = 16384  # bytes: the ids and labels files fit, 200 rows of 64 floats do not


def _emb(prefix: str, n: int = 200, dim: int = 64, seed: int = 0) -> Embeddings:
    rng = np.random.default_rng(seed)
    return Embeddings(rng.normal(size=(n, dim)).astype(np.float32), rng.integers(-1, 3, size=n),
                      [f"{prefix}/{i:04d}" for i in range(n)], ["a", "b", "c"])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _limited() -> None:
    """In the child: writing past SIZE_LIMIT bytes fails with EFBIG (instead of killing it)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (SIZE_LIMIT, SIZE_LIMIT))


@pytest.mark.parametrize("suffix", [".npy", ".faiss"])
def test_a_convert_failing_under_a_file_size_limit_leaves_the_previous_files_whole(suffix: str, tmp_path: Path) -> None:
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    save_embeddings(_emb("old", seed=1), src_dir / "old.safetensors")
    save_embeddings(_emb("new", seed=2), src_dir / "new.safetensors")
    out = out_dir / f"C{suffix}"
    convert(src_dir / "old.safetensors", out)
    before = _files(out_dir)
    assert sorted(before) == sorted([out.name, "C.ids.txt", "C.labels.txt"])
    result = subprocess.run([sys.executable, "-m", "bctool", "convert", str(src_dir / "new.safetensors"), "--out",
                             str(out)], capture_output=True, text=True, env=ENV, timeout=120, preexec_fn=_limited)
    assert result.returncode == 1, result.stderr
    assert _files(out_dir) == before  # the old rows, ids and labels, byte for byte; no temporary, no lock
    message = " ".join(result.stderr.split())
    assert message.startswith("Error: cannot write") and repr(str(out)) in message, message
    assert "free disk space and the file-size limit" in message and ".tmp" not in message
    back = load_embeddings(src_dir / "old.safetensors")
    convert(out, tmp_path / "back.safetensors")  # still a consistent set: old rows with old ids
    assert list(load_embeddings(tmp_path / "back.safetensors").ids) == list(back.ids)


def test_a_faiss_error_names_the_output_not_a_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss

    save_embeddings(_emb("old"), tmp_path / "old.safetensors")
    save_embeddings(_emb("new", seed=3), tmp_path / "new.safetensors")
    out = tmp_path / "out" / "C.faiss"
    convert(tmp_path / "old.safetensors", out)
    before = _files(out.parent)

    def failing(index: object, dest: object) -> None:
        raise RuntimeError(f"Error in faiss::write_index: write error in {out.parent}/.C.faiss.x1y2.tmp: 0 != 1 "
                           "(No space left on device)")

    monkeypatch.setattr(faiss, "write_index", failing)
    with pytest.raises(BctoolError) as caught:
        convert(tmp_path / "new.safetensors", out)
    message = str(caught.value)
    assert f"cannot write the faiss index {str(out)!r}" in message and "check free disk space" in message
    assert ".tmp" not in message
    assert _files(out.parent) == before


@pytest.mark.parametrize(("src_suffix", "out_suffix"), [(".npy", ".safetensors"), (".safetensors", ".npy"),
                                                        (".safetensors", ".faiss")])
def test_convert_refuses_non_finite_rows_and_writes_nothing(src_suffix: str, out_suffix: str, tmp_path: Path) -> None:
    emb = _emb("img", n=10, dim=4)
    emb.embeddings[7, 2] = np.nan
    emb.embeddings[9, 0] = np.inf
    src = tmp_path / f"e{src_suffix}"
    if src_suffix == ".npy":
        np.save(src, emb.embeddings)
        (tmp_path / "e.ids.txt").write_text("".join(f"{i}\n" for i in emb.ids))
    else:
        save_embeddings(emb, src)
    before = _files(tmp_path)
    out = tmp_path / f"o{out_suffix}"
    result = CliRunner().invoke(app, ["convert", str(src), "--out", str(out)])
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    assert f"Error: {str(src)!r}: row 7 (id 'img/0007') holds NaN or inf values; nothing was written" in message
    assert "re-extract the embeddings (`bctool extract`)" in message
    assert _files(tmp_path) == before  # no output, no ids or labels file, no temporary


def test_an_output_that_is_a_symbolic_link_is_written_through(tmp_path: Path) -> None:
    real = tmp_path / "store"
    real.mkdir()
    (real / "C.npy").write_bytes(b"old")
    link = tmp_path / "C.npy"
    link.symlink_to(real / "C.npy")
    emb = _emb("img", n=20, dim=8)
    save_embeddings(emb, tmp_path / "e.safetensors")
    convert(tmp_path / "e.safetensors", link)
    assert link.is_symlink() and os.readlink(link) == str(real / "C.npy")
    np.testing.assert_array_equal(np.load(link), emb.embeddings)
    assert (tmp_path / "C.ids.txt").read_text().splitlines() == list(emb.ids)  # named after the link, as read
    assert sorted(p.name for p in real.iterdir()) == ["C.npy"]  # no temporary left beside the target

    note = tmp_path / "note.txt"
    note.symlink_to("later.txt")  # a link to a file not there yet: the file is created
    atomic_write_text(note, "new\n")
    assert note.is_symlink() and (tmp_path / "later.txt").read_text() == "new\n"

    loop = tmp_path / "loop.txt"
    loop.symlink_to("loop.txt")
    with pytest.raises(BctoolError, match="cannot write '.*loop.txt': it is a symbolic link that loops"):
        atomic_write_text(loop, "x")
    assert loop.is_symlink()


def test_an_interrupted_unit_removes_every_temporary_and_keeps_the_old_files(tmp_path: Path) -> None:
    targets = [tmp_path / "a.ids.txt", tmp_path / "sub" / "a.npy"]
    targets[0].write_text("old ids\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_paths(targets) as temps:
            assert [t.parent for t in temps] == [t.parent for t in targets]
            for tmp in temps:
                tmp.write_text("new\n")
            raise KeyboardInterrupt
    assert targets[0].read_text() == "old ids\n" and not targets[1].exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.ids.txt"]
    with atomic_paths(targets) as temps:
        for tmp in temps:
            tmp.write_text("new\n")
    assert [t.read_text() for t in targets] == ["new\n", "new\n"]
    assert oct(targets[1].stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
