import json

import pytest

from slimfuse.models import folder_bytes
from slimfuse.pipeline import demo

EVIDENCE = ["The chain ensemble -> distill -> prune -> quantize", "Distillation",
            "Staged compression (prune -> quantize -> entropy)", "Large-sparse vs small-dense at equal non-zeros",
            "Ensemble selection vs best member", "Greedy vs uniform soup"]


@pytest.mark.slow
def test_demo_writes_its_report_with_the_chain_and_the_evidence_tables(tmp_path):
    out = tmp_path / "demo"
    report = demo.run(out, seconds=0.2)
    teacher = report.row(demo.TEACHER)
    assert teacher["accuracy"] >= 0.92
    assert (out / "report.html").stat().st_size > 10_000  # table + embedded plots
    md = (out / "report.md").read_text()
    assert "| teacher (LeNet-300-100) |" in md
    for heading in EVIDENCE:
        assert f"## {heading}\n" in md, heading
    assert md.count("- missed:") + md.count("- met:") + md.count("- tie:") >= 4  # the chain's four aims are judged
    # the ensemble table judges every claim from its paired interval: met, tie or missed
    evidence = md.split("## Ensemble selection vs best member")[1].split("##")[0]
    assert sum(evidence.count(w + ": ") for w in ("met", "tie", "missed")) >= 6
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == [r["name"] for r in report.rows]
    # the chain: each stage saved, reloaded and measured; the last one runs in ONNX Runtime
    chain = [r for r in report.rows if r["name"].startswith("chain ")]
    assert [r["name"][:7] for r in chain] == ["chain 1", "chain 2", "chain 3", "chain 4"]
    # bytes: the ONNX file it deploys as; the artifact folder adds its card and safetensors header
    assert chain[-1]["runtime"] == "onnxruntime" and 0 < folder_bytes(out / "chain-4-int8") - chain[-1]["bytes"] < 4096
    assert chain[-1]["params"] < chain[1]["params"] < teacher["params"]  # pruning really removed neurons
    assert chain[-1]["bytes"] < chain[2]["bytes"] / 3  # int8 storage, not fake quantization
    # staged compression: every stage is smaller than the one before
    staged = md.split("## Staged compression")[1].split("##")[0]
    rows = [line for line in staged.splitlines() if line.startswith("| ")][1:]  # past the header
    sizes = [int(line.split("|")[4].replace(",", "")) for line in rows]
    assert len(sizes) == 4 and sizes == sorted(sizes, reverse=True)
