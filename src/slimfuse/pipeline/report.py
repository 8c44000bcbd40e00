"""Write a measurement report as Markdown and JSON, each file atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..measure import Report


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
