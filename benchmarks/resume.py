"""What per-epoch checkpoints cost, and what resuming saves (mnist5k, side by side in one run).

For each long step (train, AGP pruning fine-tune, distillation, QAT, three ensemble members):

- overhead: wall time with ``checkpoint=`` over wall time without (each timed ``REPEATS`` times,
  alternating, best kept), and the added milliseconds per epoch checkpoint; target <= 1.10;
- resume: the step crashed right after the checkpoint of half its epochs, then rerun; the rerun's
  wall time over an uninterrupted run's (target <= 0.60: only the missing half is retrained), and
  whether its weights are bit-identical to the uninterrupted run's (must be).

Writes ``benchmarks/out/resume.{json,md}``. Run: ``.venv/bin/python benchmarks/resume.py``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import slimfuse as sf
from slimfuse.checkpoint import Checkpoint

OUT = Path(__file__).parent / "out"
REPEATS = 2
EPOCHS = 4


class Crash(Exception):
    pass


def same(a, b) -> bool:
    a, b = (m if isinstance(m, list) else [m] for m in (a, b))
    return all(torch.equal(x.state_dict()[k], y.state_dict()[k]) for x, y in zip(a, b) for k in x.state_dict())


def crash_after(n: int):
    """Make the n-th epoch checkpoint from now the last one before a crash; returns the undo."""
    real, count = Checkpoint.save, [0]

    def save(self, **kw):
        real(self, **kw)
        count[0] += 1
        if count[0] == n:
            raise Crash

    Checkpoint.save = save
    return lambda: setattr(Checkpoint, "save", real)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> dict:
    data = sf.datasets.load("mnist5k")
    torch.manual_seed(0)
    dense = sf.fit(sf.zoo.for_task("mlp", data.task, hidden=[300, 100]), data, epochs=4)
    torch.manual_seed(1)
    student = sf.zoo.for_task("mlp", data.task, hidden=[64])
    member = sf.zoo.for_task("mlp", data.task, hidden=[128])
    steps = {  # name -> (call with checkpoint=ck or None, epochs trained in all)
        "train (fit)": (lambda ck: sf.fit(dense, data, epochs=EPOCHS, progress=False, checkpoint=ck), EPOCHS),
        "prune sparsity=0.9 (AGP)": (lambda ck: sf.prune(dense, 0.9, data=data, epochs=EPOCHS,
                                                         progress=False, checkpoint=ck), EPOCHS),
        "distill (T=4)": (lambda ck: sf.distill(dense, student, data, epochs=EPOCHS, progress=False,
                                                checkpoint=ck), EPOCHS),
        "quantize qat": (lambda ck: sf.quantize(dense, "qat", calib=data, epochs=EPOCHS, checkpoint=ck), EPOCHS),
        "3 members (seed)": (lambda ck: list(sf.train_members(member, data, 3, epochs=EPOCHS // 2,
                                                              checkpoint=ck)), 3 * (EPOCHS // 2)),
    }
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="slimfuse-resume-bench-"))
    try:
        for name, (run, epochs) in steps.items():
            plain, checked = [], []
            for _ in range(REPEATS):
                t, reference = timed(lambda run=run: run(None))
                plain.append(t)
                checked.append(timed(lambda run=run: run(tmp / "ck"))[0])
            undo = crash_after(epochs // 2)
            try:
                run(tmp / "ck")
            except Crash:
                pass
            finally:
                undo()
            rerun, resumed = timed(lambda run=run: run(tmp / "ck"))
            rows.append({"step": name, "epochs": epochs, "seconds": min(plain), "seconds_checkpointed": min(checked),
                         "overhead": min(checked) / min(plain),
                         "ms_per_checkpoint": 1000 * (min(checked) - min(plain)) / epochs,
                         "resumed_after": epochs // 2,
                         "rerun_seconds": rerun, "rerun_ratio": rerun / min(plain),
                         "bit_identical": same(reference, resumed)})
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"data": "mnist5k", "repeats": REPEATS, "rows": rows,
              "targets": {"overhead": 1.10, "rerun_ratio": 0.60}}
    OUT.mkdir(exist_ok=True)
    (OUT / "resume.json").write_text(json.dumps(result, indent=2))
    lines = ["| step | epochs | s | s, checkpointed | overhead | ms per epoch checkpoint "
             "| rerun after a crash at half, s | rerun / full | bit-identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['epochs']} | {r['seconds']:.2f} | {r['seconds_checkpointed']:.2f} | "
                     f"{r['overhead']:.2f}x | {r['ms_per_checkpoint']:.0f} | {r['rerun_seconds']:.2f} | "
                     f"{r['rerun_ratio']:.2f} | "
                     f"{'yes' if r['bit_identical'] else 'NO'} |")
    (OUT / "resume.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
