"""A killed writer's output can be taken at once, even while processes it forked (data loader
workers) live on. Real processes throughout."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from bctool.utils.io import lock_path, output_lock

# Takes the lock, forks a long-lived worker as a torch DataLoader does (the fork start method),
# prints the worker's pid and waits to be killed.
HOLDER = """
import multiprocessing, sys, time
from bctool.utils.io import output_lock

with output_lock(sys.argv[1]):
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(20,), daemon=True)
    worker.start()
    print(worker.pid, flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_killed_writer_whose_forked_worker_lives_on_leaves_the_output_free(tmp_path: Path) -> None:
    out = tmp_path / "r.safetensors"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    worker = 0
    try:
        assert holder.stdout is not None
        worker = int(holder.stdout.readline())
        assert lock_path(out).read_text().strip() == str(holder.pid)  # the holder, not its worker
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        assert _alive(worker)  # the worker still has the lock file open...
        with output_lock(out):  # ...yet the output is free at once, as for `train --resume`
            assert lock_path(out).read_text().strip() == str(os.getpid())
        assert _alive(worker)  # (it was taken while the worker lived)
        assert not lock_path(out).exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
        if worker:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
