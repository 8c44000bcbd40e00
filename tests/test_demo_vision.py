"""``slimfuse demo --scenario vision`` at a reduced size: the report and the chain's accuracies."""

import json
import re

import pytest

from slimfuse.pipeline import vision
from slimfuse.pipeline.scenarios import SCENARIOS

SECTIONS = ["Setup", "The chain ensemble -> distill -> prune -> quantize", "Each technique vs the teacher",
            "int8 backend chosen by measurement", "ONNX export", "Channel pruning of a residual network",
            "Ensemble vs its best member", "Distillation vs the student trained alone"]


@pytest.mark.slow
def test_vision_scenario_runs_the_chain_on_a_resnet_and_judges_it_against_the_teacher(tmp_path):
    assert SCENARIOS["vision"][0] == "slimfuse.pipeline.vision:run"
    out = tmp_path / "vision"
    report = vision.run(out, budget=vision.SMALL)
    md = (out / "report.md").read_text()
    for heading in SECTIONS:
        assert f"## {heading}\n" in md, heading
    assert "Measured on: " in md and "Wall time per step" in md
    rows = {r["name"]: r for r in report.rows}
    assert [r["name"] for r in json.loads((out / "report.json").read_text())["rows"]] == list(rows)
    teacher = rows[vision.TEACHER]
    assert teacher["accuracy"] >= 0.8  # ResNet-8 (8-16-32), 3 epochs on mnist5k
    by_start = {name.split(":")[0].split(" (")[0]: r for name, r in rows.items()}
    onnx, int8 = by_start["teacher ONNX fp32"], by_start["teacher int8-static"]
    pruned = rows["teacher, 50% of channels pruned"]
    chain = [r for name, r in rows.items() if name.startswith("chain ")]
    assert [r["name"][:7] for r in chain] == ["chain 1", "chain 2", "chain 3", "chain 4"]
    # each technique within bounds of the teacher trained and measured in this same run
    assert abs(onnx["accuracy"] - teacher["accuracy"]) <= 0.002 and onnx["runtime"] == "onnxruntime"
    assert int8["accuracy"] >= teacher["accuracy"] - 0.02
    assert pruned["accuracy"] >= teacher["accuracy"] - 0.2 and pruned["params"] < 0.35 * teacher["params"]
    assert chain[0]["accuracy"] >= teacher["accuracy"] - 0.01  # the ensemble holds the teacher as a member
    assert chain[1]["accuracy"] >= min(0.5, teacher["accuracy"] - 0.3)  # distilled for 3 epochs only
    assert chain[2]["accuracy"] >= chain[1]["accuracy"] - 0.1
    assert chain[3]["accuracy"] >= chain[2]["accuracy"] - 0.03  # int8 of the pruned student
    # the chain shrinks: fewer parameters at each stage, one ONNX Runtime file at the end
    assert chain[3]["params"] <= chain[2]["params"] < chain[1]["params"] < teacher["params"]
    assert chain[3]["runtime"] == "onnxruntime" and (out / "chain-4-int8.onnx").is_file()
    assert chain[3]["bytes"] < teacher["bytes"] / 2
    # every judgement comes from a paired interval
    techniques = md.split("## Each technique vs the teacher")[1].split("\n## ")[0]
    assert sum(techniques.count(f"| {w}: ") for w in ("better", "tie", "worse")) == 3
    assert "(picked)" in md.split("## int8 backend chosen by measurement")[1].split("\n## ")[0]
    parity = re.search(r"at most ([0-9.e+-]+), argmax agreement ([0-9]+\.[0-9]+)", md)
    assert float(parity.group(1)) < 1e-3 and float(parity.group(2)) >= 0.99
