"""Helpers shared by the benchmarks: fresh-process runs, peak memory, and the stored result file."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB: Linux's ``VmHWM``, the high-water
    mark of this address space. (``ru_maxrss`` carries over the peak of the process that forked
    it across ``exec``, so a child of a large parent would report the parent's size; it is the
    fallback elsewhere, in KiB on Linux.)"""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_fresh_process(target: Callable[..., None], *args: Any) -> Any:
    """Run ``target(*args, queue)`` in a spawned process and return what it puts on the queue.

    A fresh process gives each measurement its own peak RSS and a cold start of its own.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, out))
    proc.start()
    result = out.get()
    proc.join()
    return result


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU model and count, memory, torch and Python, and the
    load average when the run ended (1, 5 and 15 minutes: other work on a shared machine)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory_gib = None
    try:
        with open("/proc/meminfo") as fh:
            kib = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:"))
            memory_gib = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_gib": memory_gib, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def library_revision() -> dict[str, Any]:
    """The git commit of the bctool package that ran (wherever it was imported from), and whether
    its files differ from that commit (``clean``)."""
    import bctool

    folder = Path(bctool.__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=folder).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    revision = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", ".")
    return {"revision": revision, "clean": None if status is None else status == ""}


def save_result(out: str | Path | None, benchmark: str, result: dict[str, Any]) -> None:
    """Write ``result`` to ``out`` (JSON; nothing when None) with the command, the library's
    revision and the machine: the stored file a results page's table is made from."""
    if out is None:
        return
    record = {"benchmark": benchmark, "command": shlex.join([Path(sys.executable).name, *sys.argv]),
              **library_revision(), "machine": machine(), "result": result}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def emoji_subset(folder: Path, count: int) -> Any:
    """The first ``count`` images of the embedded emoji set's training list, written under
    ``folder`` (an ImageSet)."""
    from bctool.data.emoji import EmojiSplit, write_emoji_dataset
    from bctool.data.sources import load_image_set

    write_emoji_dataset(folder / "emoji", EmojiSplit(seed=0))
    lines = (folder / "emoji" / "new_train.txt").read_text().splitlines()[:count]
    (folder / "emoji" / "subset.txt").write_text("\n".join(lines) + "\n")  # paths relative to the set
    return load_image_set(folder / "emoji" / "subset.txt")
