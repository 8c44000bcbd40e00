"""The model matrix: every peer model through every verb; writes docs/models.md (the only way it is made).

Runs ``tests/peer_matrix.py``'s cells (the same code ``tests/test_peer_models.py`` checks the file with)
for every model of ``peer_matrix.models()`` and every verb of ``peer_matrix.VERBS``, then renders the
table, each refusal's reason and what every working cell measured, with the machine it ran on.

Usage: python benchmarks/models_matrix.py [--out docs/models.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # the Keras peer models (tests/peer_models.py)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the peer models and their cells live with the tests

import peer_matrix as pm  # noqa: E402
import torch  # noqa: E402

import slimfuse as sf  # noqa: E402
from slimfuse.hardware import describe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=pm.DOC)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and steady on a shared machine
    ctx = pm.Context(sf.datasets.load("digits"))
    results, start = {}, time.perf_counter()
    for peer in pm.models():
        for verb in pm.VERBS:
            t = time.perf_counter()
            results[peer.name, verb] = outcome = pm.run_cell(ctx, peer, verb)
            print(f"{peer.name:16s} {verb:18s} {time.perf_counter() - t:5.1f}s {outcome.cell[:100]}", flush=True)
    seconds = time.perf_counter() - start
    args.out.write_text(pm.render(results, describe(), seconds))
    crashes = [k for k, o in results.items() if o.status == "crash"]
    print(f"wrote {args.out}: {sum(o.status == 'works' for o in results.values())} of {len(results)} cells work"
          + (f"; {len(crashes)} CRASH: {crashes}" if crashes else ""))


if __name__ == "__main__":
    main()
