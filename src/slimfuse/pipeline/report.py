"""Write a measurement report as Markdown and JSON, each file atomically."""

from __future__ import annotations

from pathlib import Path

from ..measure import Report
from ..models.artifact import write_bytes_atomic


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_report(report: Report, folder: str | Path, *, title: str, sections: list[tuple[str, str]] = ()) -> dict:
    """Write ``report.md`` (title, table, extra ``(heading, markdown)`` sections) and ``report.json``."""
    folder = Path(folder)
    md = [f"# {title}", "", report.to_markdown()]
    for heading, body in sections:
        md += [f"## {heading}", "", body.rstrip(), ""]
    paths = {"md": folder / "report.md", "json": folder / "report.json"}
    write_text_atomic(paths["md"], "\n".join(md))
    write_text_atomic(paths["json"], report.to_json() + "\n")
    return paths
