"""Helpers shared by the benchmarks: fresh-process runs and peak memory."""

from __future__ import annotations

import multiprocessing as mp
import resource
from collections.abc import Callable
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
