import shutil
import subprocess

import numpy as np
import pytest

from slimfuse.measure import Report
from slimfuse.report import pareto_figure, pareto_front, write_report

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


# A crowded report like the demo's: clusters of models at one size and accuracy, long names,
# points at both ends of the axes (the labels of such points used to overlap or leave the plot).
CROWD = [
    {"name": f"model {i}: " + "a long descriptive name " * 3, "accuracy": a, "bytes": b,
     "latency_b1_p50_ms": 0.02 + 0.01 * (i % 4), "lineage": "train"}
    for i, (a, b) in enumerate([(0.938, 1_067_916), (0.938, 1_067_729), (0.937, 278_107), (0.937, 274_845),
                                (0.940, 135_796), (0.932, 109_638), (0.940, 504_944), (0.931, 33_373),
                                (0.913, 110_238), (0.947, 1_067_915), (0.947, 2_136_055), (0.953, 5_339_845),
                                (0.934, 1_068_272), (0.947, 2_136_055), (0.948, 408_331), (0.949, 81_083)])
]


def _labels(fig):
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    return ax, [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts if t.get_gid() == "marker-label"]


@pytest.mark.parametrize("key", ["bytes", "latency_b1_p50_ms"])
def test_every_point_gets_its_number_legibly_without_overlap_inside_the_axes(key):
    import matplotlib.pyplot as plt

    fig = pareto_figure(CROWD, key, key)
    try:
        ax, labels = _labels(fig)
        assert sorted(int(text) for text, _ in labels) == list(range(1, len(CROWD) + 1))
        frame = ax.get_window_extent()
        for i, (text, box) in enumerate(labels):
            assert box.height >= 12, f"label {text} is {box.height:.0f} px high: too small to read"
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, \
                f"label {text} leaves the axes"
            for other, obox in labels[:i]:
                assert not box.overlaps(obox), f"labels {other} and {text} overlap"
        assert fig.get_size_inches()[0] * fig.dpi >= 800
    finally:
        plt.close(fig)


def test_html_report_names_every_model_and_the_front_in_full(tmp_path):
    paths = write_report(Report(CROWD), tmp_path, title="crowd")
    page = paths["html"].read_text()
    for r in CROWD:  # full names in the plots' keys, not cut at some width
        assert page.count(r["name"].strip()) >= 3  # the results table and both keys
    front = [CROWD[i]["name"] for i in (7, 15, 11)]  # cheapest first: 33 kB, 81 kB, 5.3 MB
    assert "Pareto front (red, cheapest first): " + " → ".join(front) in page


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:  # .ci/run installs it and fails when it cannot, so CI always renders the page
        pytest.skip("chromium is not installed, so the page cannot be rendered (apt-get install chromium)")
    return exe


def _headless(exe, tmp_path, *args):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([exe, *flags, *args], check=False, capture_output=True, text=True, timeout=120)


def test_html_report_renders_in_headless_chromium_with_its_plots(tmp_path):
    exe = _chromium()
    paths = write_report(Report(ROWS), tmp_path / "r", title="test report", sections=[("Notes", "hello")])
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.md", "report.html", "report.json"}
    url = paths["html"].resolve().as_uri()
    dom = _headless(exe, tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    results = dom.stdout.split('<table id="results">')[1].split("</table>")[0]
    assert results.count("<tr>") == len(ROWS) + 1
    assert dom.stdout.count("data:image/png;base64,") == 2
    assert dom.stdout.count("<table class=\"key\">") == 2
    assert "train -&gt; int8" in dom.stdout


def test_screenshot_shows_the_plot_at_a_readable_size(tmp_path):
    exe = _chromium()
    paths = write_report(Report(CROWD), tmp_path / "r", title="crowd")
    shot = tmp_path / "shot.png"
    run = _headless(exe, tmp_path, f"--screenshot={shot}", "--window-size=1400,2000", paths["html"].resolve().as_uri())
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    import matplotlib.image

    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).astype(int)
    # The Pareto points and line are drawn in matplotlib's tab:red (214, 39, 40); nothing else on the
    # page is that red. The front runs from the smallest model to the largest, so its red spans most
    # of the bytes plot's width: a plot shrunk to a thumbnail would span a fraction of it.
    red = np.abs(pixels - np.array([214, 39, 40])).sum(-1) < 60
    assert red.sum() > 200, "no plot visible in the rendered page"
    cols = np.flatnonzero(red.any(0))
    assert cols.max() - cols.min() >= 450, f"the plot is shown only {cols.max() - cols.min()} px wide"
