import json

import pytest

from slimfuse.pipeline import demo


@pytest.mark.slow
def test_demo_writes_its_report_and_meets_the_accuracy_bar(tmp_path):
    report = demo.run(tmp_path / "demo", seconds=0.2)
    teacher = report.rows[0]
    assert teacher["accuracy"] >= 0.92
    assert (tmp_path / "demo" / "report.html").stat().st_size > 10_000  # table + embedded plots
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "| teacher (LeNet-300-100) |" in md
    rows = json.loads((tmp_path / "demo" / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == [r["name"] for r in report.rows]
