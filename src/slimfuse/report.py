"""Reports: Markdown, JSON and a self-contained HTML page with Pareto plots.

Every file is written atomically. The HTML page embeds its plots as base64
PNG, so it can be mailed or attached to a ticket as one file.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from .measure import Report
from .models.artifact import write_text_atomic

PLOTS = (
    ("bytes", "artifact bytes on disk", True),
    ("latency_b1_p50_ms", "batch-1 latency p50 (ms)", True),
)


def pareto_front(rows: list[dict], x: str, y: str = "accuracy") -> list[str]:
    """Names of the rows no other row beats on both ``x`` (lower is better) and ``y`` (higher)."""
    pts = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
    front = []
    for r in pts:
        dominated = any(
            o[x] <= r[x] and o[y] >= r[y] and (o[x] < r[x] or o[y] > r[y]) for o in pts if o is not r
        )
        if not dominated:
            front.append(r["name"])
    return front


def _front_order(rows: list[dict], x: str, y: str) -> list[int]:
    """Indices of the Pareto-front rows, cheapest (lowest ``x``) first."""
    front = set(pareto_front(rows, x, y))
    on = [i for i, r in enumerate(rows) if r["name"] in front and r.get(x) is not None and r.get(y) is not None]
    return sorted(on, key=lambda i: (rows[i][x], -rows[i][y]))


def _place_labels(ax, fig, points: list[tuple[float, float, str]], fontsize: float) -> None:
    """Write each point's short label next to it where it overlaps no other label or marker.

    Candidates are tried at growing distances in eight directions, in display coordinates;
    a label that had to move away from its point gets a thin leader line. Labels stay
    inside the axes, so nothing is clipped at the edges.
    """
    fig.canvas.draw()  # fixes the transforms
    to_px = ax.transData.transform
    box = ax.get_window_extent()
    px_per_pt = fig.dpi / 72
    renderer = fig.canvas.get_renderer()
    marker_r = 5.5 * px_per_pt
    centres = [tuple(to_px((px, py))) for px, py, _ in points]
    taken = [(cx - marker_r, cy - marker_r, cx + marker_r, cy + marker_r) for cx, cy in centres]

    def free(b):
        inside = b[0] >= box.x0 + 2 and b[2] <= box.x1 - 2 and b[1] >= box.y0 + 2 and b[3] <= box.y1 - 2
        return inside and not any(b[0] < t[2] and b[2] > t[0] and b[1] < t[3] and b[3] > t[1] for t in taken)

    directions = [(1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, 1), (-1, -1), (1, -1)]
    for (cx, cy), (_, _, text) in zip(centres, points):
        probe = ax.text(0, 0, text, fontsize=fontsize, fontweight="bold")
        ext = probe.get_window_extent(renderer)
        probe.remove()
        w, h = ext.width + 2, ext.height + 1
        best = None
        for radius in (7, 12, 18, 26, 36, 48, 62, 80):
            for dx, dy in directions:
                r = radius * px_per_pt
                # the label's near edge sits ``r`` away from the point in the chosen direction
                lx = cx + dx * r - (w if dx < 0 else 0 if dx > 0 else w / 2)
                ly = cy + dy * r - (h if dy < 0 else 0 if dy > 0 else h / 2)
                b = (lx, ly, lx + w, ly + h)
                if free(b):
                    best = (b, radius)
                    break
            if best:
                break
        if best is None:  # crowded beyond hope: keep it inside the axes, over whatever is there
            lx = min(max(cx + marker_r, box.x0 + 2), box.x1 - w - 2)
            ly = min(max(cy + marker_r, box.y0 + 2), box.y1 - h - 2)
            best = ((lx, ly, lx + w, ly + h), 99)
        b, radius = best
        taken.append(b)
        inv = ax.transData.inverted()
        tx, ty = inv.transform(((b[0] + b[2]) / 2, (b[1] + b[3]) / 2))
        note = ax.annotate(text, (tx, ty), ha="center", va="center", fontsize=fontsize, fontweight="bold",
                           color="#222", zorder=5, gid="marker-label")
        note.set_in_layout(False)
        if radius > 12:
            ax.annotate("", (inv.transform((cx, cy))), xytext=(tx, ty), zorder=2,
                        arrowprops={"arrowstyle": "-", "color": "#999", "lw": 0.6, "shrinkA": 5, "shrinkB": 4})


def pareto_plot(rows: list[dict], x: str, xlabel: str, *, log: bool = True, y: str = "accuracy",
                numbers: list[int] | None = None) -> bytes:
    """A PNG of ``y`` against ``x``: numbered markers, the Pareto front drawn and named in red.

    ``numbers`` gives each row's marker number (default 1, 2, ... in row order), so a
    table beside the plot can carry the full names; the plot itself holds only numbers,
    which never overlap one another nor leave the axes.
    """
    import matplotlib.pyplot as plt

    fig = pareto_figure(rows, x, xlabel, log=log, y=y, numbers=numbers)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def pareto_figure(rows: list[dict], x: str, xlabel: str, *, log: bool = True, y: str = "accuracy",
                  numbers: list[int] | None = None):
    """The matplotlib figure behind :func:`pareto_plot` (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = list(numbers) if numbers is not None else list(range(1, len(rows) + 1))
    keep = [i for i, r in enumerate(rows) if r.get(x) is not None and r.get(y) is not None]
    pts = [rows[i] for i in keep]
    front = _front_order(pts, x, y)
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=115)
    use_log = log and pts and min(r[x] for r in pts) > 0
    if use_log:
        ax.set_xscale("log")
    on = set(front)
    xs, ys = [r[x] for r in pts], [r[y] for r in pts]
    ax.scatter([v for i, v in enumerate(xs) if i not in on], [v for i, v in enumerate(ys) if i not in on],
               s=42, color="tab:gray", zorder=3, label="other models")
    if front:
        ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:red", lw=1.2, zorder=2)
        ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=48, color="tab:red", zorder=4,
                   label="Pareto front (nothing is both smaller and better)" if x == "bytes"
                   else "Pareto front (nothing is both faster and better)" if "latency" in x
                   else "Pareto front")
    if pts:  # room around the extreme points for their numbers
        ax.margins(x=0.08, y=0.12)
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(y, fontsize=11)
    ax.tick_params(labelsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(0, -0.13), ncol=2, fontsize=9, frameon=False)
    fig.tight_layout()
    if pts:
        _place_labels(ax, fig, [(xs[i], ys[i], str(numbers[keep[i]])) for i in range(len(pts))], fontsize=9)
    return fig


def _legend_table(rows: list[dict], x: str, xlabel: str, y: str, report: Report) -> str:
    """The plot's key: every plotted row's number and full name, its Pareto-front rank, x and y."""
    keep = [i for i, r in enumerate(rows) if r.get(x) is not None and r.get(y) is not None]
    front = {keep[j]: k for k, j in enumerate(_front_order([rows[i] for i in keep], x, y), 1)}
    fmt = {key: f for key, _, f in report.columns()}
    body = []
    for i in keep:
        r = rows[i]
        rank = f"front {front[i]}" if i in front else ""
        cls = " class='front'" if i in front else ""
        body.append(f"<tr{cls}><td>{i + 1}</td><td>{html.escape(r['name'])}</td><td>{rank}</td>"
                    f"<td>{html.escape(report.cell(r, x, fmt.get(x, '{:,.3g}')))}</td>"
                    f"<td>{html.escape(report.cell(r, y, fmt.get(y, '{:.4f}')))}</td></tr>")
    return (f"<table class='key'><thead><tr><th>#</th><th>model</th><th>Pareto</th>"
            f"<th>{html.escape(xlabel)}</th><th>{html.escape(y)}</th></tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def to_html(report: Report, *, title: str, sections: list[tuple[str, str]] = ()) -> str:
    """A self-contained page: the table (with lineage), the Pareto plots with their keys, extra sections."""
    cols = [c for c in report.columns() if c[0] != "lineage"]
    head = "<th>#</th>" + "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in cols) + "<th>lineage</th>"
    body = []
    for n, r in enumerate(report.rows, 1):
        cells = "".join(f"<td>{html.escape(report.cell(r, key, fmt))}</td>" for key, _, fmt in cols)
        body.append(f"<tr><td>{n}</td>{cells}<td class='lineage'>{html.escape(r.get('lineage', ''))}</td></tr>")
    plots = []
    metric = html.escape(report.metric)
    for key, label, log in PLOTS:
        if sum(r.get(key) is not None for r in report.rows) >= 1:
            png = base64.b64encode(pareto_plot(report.rows, key, label, log=log, y=report.metric)).decode()
            names = [report.rows[i]["name"] for i in _front_order(report.rows, key, report.metric)]
            front = " → ".join(html.escape(n) for n in names)
            plots.append(f"<figure class='plot'><figcaption>{metric} vs {html.escape(label)}: "
                         f"Pareto front (red, cheapest first): {front}</figcaption><div class='pair'>"
                         f"<img alt='{metric} vs {html.escape(label)}' src='data:image/png;base64,{png}'>"
                         f"{_legend_table(report.rows, key, label, report.metric, report)}</div></figure>")
    extra = "".join(f"<h2>{html.escape(h)}</h2><pre>{html.escape(text)}</pre>" for h, text in sections)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:nth-child(2), th:nth-child(2), th:last-child, td.lineage {{ text-align: left; }}
td.lineage {{ font-family: monospace; font-size: 11px; }}
figure.plot {{ margin: 1em 0 2em 0; }}
figcaption {{ font-weight: 600; margin-bottom: 0.5em; }}
.pair {{ display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }}
.pair img {{ max-width: 100%; height: auto; }}
table.key {{ font-size: 12px; }}
table.key td:nth-child(3) {{ text-align: left; color: #b22; }}
table.key tr.front td {{ font-weight: 600; }}
pre {{ background: #f6f6f6; padding: 1em; white-space: pre-wrap; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<table id="results"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>
<h2>Pareto plots</h2>
<p>Each marker's number is the row's number in the table above; red markers joined by the red line are
the Pareto front: no other model is both cheaper and better.</p>
{''.join(plots)}
{extra}
</body></html>
"""


def write_report(report: Report, folder: str | Path, *, title: str, sections: list[tuple[str, str]] = (),
                 stem: str = "report") -> dict:
    """Write ``STEM.md``, ``STEM.html`` and ``STEM.json`` (default ``report.*``) into ``folder``."""
    folder = Path(folder)
    md = [f"# {title}", "", report.to_markdown()]
    for heading, text in sections:
        md += [f"## {heading}", "", text.rstrip(), ""]
    paths = {ext: folder / f"{stem}.{ext}" for ext in ("md", "html", "json")}
    write_text_atomic(paths["md"], "\n".join(md))
    write_text_atomic(paths["html"], to_html(report, title=title, sections=sections))
    write_text_atomic(paths["json"], report.to_json() + "\n")
    return paths
