"""``python selfkill.py STATE EPOCH STEPS ARGS...``: run ``slimfuse ARGS`` and SIGKILL it from inside,
``STEPS`` optimizer steps after the checkpoint ``STATE`` (a ``state.json``) recorded ``EPOCH``.

A kill from outside, timed by polling the checkpoint, races the command: on a fast machine a short
step finishes before the poll sees its first epoch, on a loaded one the kill lands anywhere. From
inside, the kill lands at the same point of the run every time (mid-epoch, after a real checkpoint),
and the process still dies by SIGKILL with no cleanup, as it would on a crash.
"""

import os
import signal
import sys
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_post_hook

from slimfuse import checkpoint
from slimfuse.cli import main

state, epoch, steps, args = Path(sys.argv[1]).resolve(), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
left: list[int] = []  # optimizer steps to go once armed
real_save = checkpoint.Checkpoint.save


def save(self, **kwargs):
    real_save(self, **kwargs)
    if not left and kwargs["epoch"] >= epoch and (Path(self.folder) / checkpoint.META).resolve() == state:
        left.append(steps)
        if steps == 0:
            os.kill(os.getpid(), signal.SIGKILL)


def after_step(optimizer, a, kw):
    if left:
        left[0] -= 1
        if left[0] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)


checkpoint.Checkpoint.save = save
register_optimizer_step_post_hook(after_step)
sys.argv = ["slimfuse", *args]
main()
