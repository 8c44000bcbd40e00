import os
import shutil
import subprocess

import numpy as np
import pytest

from slimfuse.measure import Report
from slimfuse.report import pareto_front, write_report

ROWS = [
    {"name": "fp32", "accuracy": 0.93, "bytes": 1_000_000, "latency_b1_p50_ms": 0.10, "lineage": "train"},
    {"name": "int8", "accuracy": 0.93, "bytes": 270_000, "latency_b1_p50_ms": 0.05, "lineage": "train -> int8"},
    {"name": "sparse", "accuracy": 0.92, "bytes": 90_000, "latency_b1_p50_ms": 0.11, "lineage": "train -> prune"},
    {"name": "worse", "accuracy": 0.90, "bytes": 300_000, "latency_b1_p50_ms": 0.20, "lineage": "x"},
]


def test_pareto_front_by_hand():
    assert pareto_front(ROWS, "bytes") == ["int8", "sparse"]
    assert pareto_front(ROWS, "latency_b1_p50_ms") == ["int8"]
    assert pareto_front([{"name": "a", "accuracy": None, "bytes": 1}], "bytes") == []


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (CI installs it)")
    return exe


def _headless(exe, tmp_path, *args):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)


def test_html_report_renders_in_headless_chromium_with_its_plots(tmp_path):
    exe = _chromium()
    paths = write_report(Report(ROWS), tmp_path / "r", title="test report", sections=[("Notes", "hello")])
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.md", "report.html", "report.json"}
    url = paths["html"].resolve().as_uri()
    dom = _headless(exe, tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<tr>") == len(ROWS) + 1
    assert dom.stdout.count("data:image/png;base64,") == 2
    assert "train -&gt; int8" in dom.stdout
    shot = tmp_path / "shot.png"
    run = _headless(exe, tmp_path, f"--screenshot={shot}", "--window-size=1400,1400", url)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    import matplotlib.image

    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).astype(int)
    # The Pareto points and line are drawn in matplotlib's tab:red (214, 39, 40); nothing else is red.
    red = (np.abs(pixels - np.array([214, 39, 40])).sum(-1) < 60).sum()
    assert red > 200, "no plot visible in the rendered page"
