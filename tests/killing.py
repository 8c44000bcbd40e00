"""SIGKILL a real ``slimfuse`` command mid-epoch, after a checkpoint, then rerun it."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

SELFKILL = Path(__file__).with_name("selfkill.py")


def kill_after_epoch(command: list[str], state: Path, epoch: int, steps: int = 2, timeout: float = 300) -> None:
    """Run ``command`` (``[python, "-m", "slimfuse", ...]``) and SIGKILL it ``steps`` optimizer steps
    after its checkpoint ``state`` (a state.json) records ``epoch`` (see selfkill.py)."""
    python, m, package, *args = command
    assert (m, package) == ("-m", "slimfuse"), command
    proc = subprocess.run([python, str(SELFKILL), str(state), str(epoch), str(steps), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, (
        f"the command was not killed (exit {proc.returncode}); the test proved nothing:\n{proc.stderr[-2000:]}")


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
