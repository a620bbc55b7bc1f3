"""Killing a training run hard (SIGKILL, as a lost machine would) at a chosen point."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def kill_once_written(process: subprocess.Popen, target: Path, timeout: float = 240) -> str:
    """SIGKILLs `process` and its dataloader workers as soon as `target` exists and returns its output; fails if it
    ended by itself first. Start it with `start_new_session=True`: the whole process group is killed, because a worker
    forked in the instant before its parent dies records the adoptive parent as its own, never sees the death, and
    keeps the output pipe open."""
    assert os.getpgid(process.pid) == process.pid, "start the run with start_new_session=True"
    deadline = time.monotonic() + timeout
    while not target.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    log = process.communicate(timeout=60)[0]
    assert process.returncode == -signal.SIGKILL, f"the run ended by itself before the kill:\n{log[-3000:]}"
    return log
