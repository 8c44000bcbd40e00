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


def pareto_plot(rows: list[dict], x: str, xlabel: str, *, log: bool = True, y: str = "accuracy") -> bytes:
    """A PNG of ``y`` against ``x`` with the Pareto front drawn through its points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
    front = set(pareto_front(pts, x, y))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for r in pts:
        on = r["name"] in front
        ax.scatter(r[x], r[y], s=40, color="tab:red" if on else "tab:gray", zorder=3)
        label = r["name"] if len(r["name"]) <= 28 else r["name"][:27] + "…"
        note = ax.annotate(label, (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        note.set_in_layout(False)  # long names must not squeeze the axes
    line = sorted((r for r in pts if r["name"] in front), key=lambda r: r[x])
    ax.plot([r[x] for r in line], [r[y] for r in line], color="tab:red", lw=1, label="Pareto front")
    if log and pts and min(r[x] for r in pts) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def to_html(report: Report, *, title: str, sections: list[tuple[str, str]] = ()) -> str:
    """A self-contained page: the table (with lineage), the Pareto plots, extra sections."""
    cols = [c for c in report.columns() if c[0] != "lineage"]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in cols) + "<th>lineage</th>"
    body = []
    for r in report.rows:
        cells = "".join(f"<td>{html.escape(report.cell(r, key, fmt))}</td>" for key, _, fmt in cols)
        body.append(f"<tr>{cells}<td class='lineage'>{html.escape(r.get('lineage', ''))}</td></tr>")
    plots = []
    metric = html.escape(report.metric)
    for key, label, log in PLOTS:
        if sum(r.get(key) is not None for r in report.rows) >= 1:
            png = base64.b64encode(pareto_plot(report.rows, key, label, log=log, y=report.metric)).decode()
            plots.append(f"<figure><img alt='{metric} vs {html.escape(label)}' src='data:image/png;base64,{png}'>"
                         f"<figcaption>{metric} vs {html.escape(label)}</figcaption></figure>")
    extra = "".join(f"<h2>{html.escape(h)}</h2><pre>{html.escape(text)}</pre>" for h, text in sections)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:first-child, th:first-child, th:last-child, td.lineage {{ text-align: left; }}
td.lineage {{ font-family: monospace; font-size: 11px; }}
figure {{ display: inline-block; margin: 1em; }}
pre {{ background: #f6f6f6; padding: 1em; white-space: pre-wrap; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<table id="results"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>
<h2>Pareto plots</h2>
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
