"""Killing a training process hard (SIGKILL, as an out-of-memory killer or a lost machine would) at a chosen point."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def kill_once_written(process: subprocess.Popen, target: Path, timeout: float = 240) -> str:
    """SIGKILLs `process` as soon as `target` exists and returns its output; fails if it ended by itself first."""
    deadline = time.monotonic() + timeout
    while not target.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    log = process.communicate(timeout=60)[0]
    assert process.returncode == -signal.SIGKILL, f"the run ended by itself before the kill:\n{log[-3000:]}"
    return log
