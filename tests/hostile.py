"""Helpers for the hostile-input tests: crafted artifacts, and running a case in a fresh process
whose peak memory (``resource.getrusage``) is measured."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

import slimfuse as sf


def craft_artifact(path: Path, spec: dict, tensors: dict[str, torch.Tensor], *, storage=None, task=None) -> Path:
    """An artifact folder with any spec, tensors and storage meta, its checksum right."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "weights.safetensors"), metadata={"format": "slimfuse-artifact"})
    card = {"format": "slimfuse-artifact", "format_version": 1, "spec": spec, "task": task, "lineage": [],
            "metrics": {}, "storage": storage or {"codec": "dense", "meta": {}}, "versions": {},
            "weights_sha256": hashlib.sha256((path / "weights.safetensors").read_bytes()).hexdigest()}
    (path / "card.json").write_text(json.dumps(card))
    return path


def small_mlp_artifact(path: Path) -> Path:
    torch.manual_seed(0)
    return sf.save(sf.zoo.mlp(64, [8], 10), path)


def run_measured(code: str, env: dict | None = None, timeout: float = 120) -> tuple[str, float]:
    """Run ``code`` in a fresh Python (slimfuse importable); it should raise a SlimfuseError.
    Returns (the error line or 'NO ERROR', peak resident memory in MB of that process)."""
    script = textwrap.dedent("""
        import resource, sys
        import slimfuse as sf
        try:
        {body}
            print("RESULT NO ERROR")
        except sf.SlimfuseError as e:
            print("RESULT", type(e).__name__ + ":", str(e).replace(chr(10), " "))
        print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    """).format(body=textwrap.indent(textwrap.dedent(code), "    "))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("RESULT", "PEAK")))
    return lines["RESULT"], float(lines["PEAK"])
