"""SIGKILL a real ``slimfuse`` command once its checkpoint has recorded an epoch, then rerun it."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
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


def assert_killed_command_resumes(command: Callable[[Path], list[str]], folder: Path, epoch: int) -> None:
    """``command(out)`` run straight, and killed after ``epoch`` then rerun, writes the same weights;
    the rerun removes its checkpoint (``.OUT.checkpoint``, a plain training checkpoint)."""
    straight, resumed = folder / "straight", folder / "resumed"
    checkpoint = folder / ".resumed.checkpoint"
    subprocess.run(command(straight), check=True, capture_output=True)
    kill_after_epoch(command(resumed), checkpoint / "state.json", epoch)
    assert not resumed.exists()
    subprocess.run(command(resumed), check=True, capture_output=True)
    assert (resumed / "weights.safetensors").read_bytes() == (straight / "weights.safetensors").read_bytes()
    assert not checkpoint.exists()
