"""How fast the command line answers, side by side with importing torch (one run, interleaved).

Each command runs as a fresh process ``REPEATS`` times, the commands interleaved round by round so
that a busy moment hits all of them alike; the table gives the median and the spread (min-max).
Targets (issue "First hour of a new user"): ``slimfuse --help`` and a flag typo each under 1 s on a
quiet machine, and ``import slimfuse`` then touching the library (``slimfuse.fit``) at most torch's
own import plus 20%.

Writes ``benchmarks/out/startup.{json,md}``. Run: ``.venv/bin/python benchmarks/startup.py``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"
REPEATS = 7
PY = sys.executable
COMMANDS = {
    "python -c pass": [PY, "-c", "pass"],
    "import torch": [PY, "-c", "import torch"],
    "slimfuse --help": [PY, "-m", "slimfuse", "--help"],
    "slimfuse train --epoch 3 (typo)": [PY, "-m", "slimfuse", "train", "--data", "digits", "--epoch", "3", "-o", "x"],
    "slimfuse prune --help": [PY, "-m", "slimfuse", "prune", "--help"],
    "import slimfuse": [PY, "-c", "import slimfuse"],
    "import slimfuse; slimfuse.fit": [PY, "-c", "import slimfuse; slimfuse.fit"],
    "import slimfuse; slimfuse.prune, .quantize, .ensemble": [
        PY, "-c", "import slimfuse as sf; sf.prune, sf.quantize, sf.ensemble"],
}


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    for cmd in COMMANDS.values():  # warm the file cache once
        subprocess.run(cmd, capture_output=True, env=env)
    for _ in range(REPEATS):
        for name, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, env=env)
            times[name].append(time.perf_counter() - t0)
    torch_s = statistics.median(times["import torch"])
    rows = [{"command": n, "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
             "vs_import_torch": statistics.median(t) / torch_s} for n, t in times.items()]
    result = {"hardware": {"cpu": cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
              "repeats": REPEATS, "load_average": os.getloadavg(), "rows": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / "startup.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"Hardware: {result['hardware']['cpu']}, {result['hardware']['cores']} cores, Python "
          f"{result['hardware']['python']}; load average at the end {os.getloadavg()[0]:.1f}; {REPEATS} runs each, "
          "interleaved.", "", "| command | median s | min-max s | / import torch |", "|---|---|---|---|"]
    for r in rows:
        md.append(f"| `{r['command']}` | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | "
                  f"{r['vs_import_torch']:.2f} |")
    (OUT / "startup.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
