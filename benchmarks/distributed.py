"""Wall time of one training job in 1 vs 2 processes (torchrun, gloo) on this machine.

    .venv/bin/python benchmarks/distributed.py   # -> benchmarks/out/distributed.{json,md}

The job: LeNet-300-100 on mnist5k, 10 epochs, global batch 64, through the CLI. Each
configuration runs in a fresh process group, so start-up (imports, rendezvous) is included:
that is what a user waits for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"
JOB = ["train", "--data", "mnist5k", "--hidden", "300,100", "--epochs", "10", "--batch-size", "64"]


def timed(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CI": "1"}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = [
            ("1 process, 1 thread", [sys.executable, "-m", "slimfuse"], 1),
            ("1 process, 2 threads", [sys.executable, "-m", "slimfuse"], 2),
            ("2 processes x 1 thread (torchrun, gloo)",
             [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "slimfuse"], 1),
        ]
        for i, (name, prefix, threads) in enumerate(configs):
            seconds = min(timed(prefix + JOB + ["-o", f"{tmp}/m{i}-{r}"], threads) for r in range(2))
            rows.append({"config": name, "wall_s": round(seconds, 2)})
    base = rows[0]["wall_s"]
    for r in rows:
        r["speedup_vs_1x1"] = round(base / r["wall_s"], 2)
    OUT.mkdir(exist_ok=True)
    (OUT / "distributed.json").write_text(json.dumps(rows, indent=2))
    md = ["| configuration | wall time (s, best of 2) | speed-up vs 1 process x 1 thread |", "|---|---|---|"]
    md += [f"| {r['config']} | {r['wall_s']:.2f} | {r['speedup_vs_1x1']:.2f}x |" for r in rows]
    (OUT / "distributed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
