"""Kill a real ``slimfuse`` process once its checkpoint has recorded a given epoch."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path


def kill_after_epoch(command: list[str], state: Path, epoch: int, timeout: float = 300) -> None:
    """Run ``command``; SIGKILL it as soon as the checkpoint ``state`` (a state.json) records ``epoch``."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def saved_epoch():
        try:
            return json.loads(state.read_text())["epoch"]
        except (OSError, ValueError):  # not written yet, or being replaced right now
            return 0

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and saved_epoch() < epoch:
        time.sleep(0.05)
    assert proc.poll() is None, "the command finished before it could be killed; the test proved nothing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
