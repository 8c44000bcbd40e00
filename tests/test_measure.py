import json

import pytest
import torch

import slimfuse as sf
from slimfuse.measure import latency, macs
from slimfuse.models import folder_bytes


def test_report_rows_hold_every_measurement(digits_mlp, digits, tmp_path):
    report = sf.measure({"mlp": digits_mlp}, digits.test, seconds=0.2)
    row = report.row("mlp")
    expected = {"accuracy", "nll", "params", "nonzeros", "macs", "bytes", "latency_b1_p50_ms",
                "latency_b1_p95_ms", "throughput_b256", "runtime", "lineage", "threads"}
    assert expected <= row.keys()
    assert row["accuracy"] == pytest.approx(sf.evaluate(digits_mlp, digits.test)["accuracy"])
    assert row["params"] == 64 * 64 + 64 + 64 * 10 + 10 == row["nonzeros"]
    assert row["macs"] == 64 * 64 + 64 * 10  # hand count: one multiply-add per weight
    assert row["bytes"] == folder_bytes(sf.save(digits_mlp, tmp_path / "a"))
    assert 0 < row["latency_b1_p50_ms"] <= row["latency_b1_p95_ms"]
    assert row["runtime"] == "torch" and row["lineage"].startswith("train(")
    md = report.to_markdown()
    assert "| mlp | torch |" in md and "bytes on disk" in md
    assert json.loads(report.to_json())["rows"][0]["name"] == "mlp"


def test_nonzeros_count_real_zeros(digits_mlp, digits):
    import copy

    sparse = copy.deepcopy(digits_mlp)
    with torch.no_grad():
        sparse.fc1.weight[:, :32] = 0
    row = sf.measure(sparse, digits.test, seconds=0.1).rows[0]
    assert row["params"] - row["nonzeros"] == 64 * 32


def test_conv_macs_match_a_hand_count():
    model = sf.zoo.cnn(classes=10, in_channels=1, image_size=8, widths=[4], hidden=8)
    conv = 8 * 8 * 4 * 9  # output pixels x output channels x 3x3x1 kernel
    fc = 4 * 4 * 4 * 8 + 8 * 10
    assert macs(model, torch.zeros(1, 1, 8, 8)) == conv + fc


def test_latency_uses_the_thread_count_and_restores_it(digits_mlp, digits):
    before = torch.get_num_threads()
    out = latency(digits_mlp, digits.test.x, threads=1, seconds=0.1)
    assert torch.get_num_threads() == before
    assert out["throughput_b256"] > 0
    with pytest.raises(sf.ConfigError):
        latency(digits_mlp, digits.test.x, threads=0)


def test_measure_needs_models(digits):
    with pytest.raises(sf.ConfigError):
        sf.measure({}, digits.test)


def test_a_custom_score_replaces_accuracy_and_drives_the_report(digits_mlp, digits, tmp_path):
    """Tasks other than classification (embeddings, rankings) bring their own score and metric."""
    from slimfuse.measure import register_column
    from slimfuse.report import write_report

    def agreement(model, split):  # fraction of samples where the model agrees with the reference labels
        return {"agreement": (sf.predict(model, split, output="label") == split.y).float().mean().item()}

    register_column("agreement", "agreement")
    report = sf.measure({"mlp": digits_mlp}, digits.test, seconds=0.1, score=agreement, metric="agreement",
                        batch=32)
    row = report.row("mlp")
    assert "accuracy" not in row and row["agreement"] == pytest.approx(sf.evaluate(digits_mlp, digits.test)["accuracy"])
    assert row["throughput_b32"] > 0 and "throughput_b256" not in row
    assert "| agreement |" in report.to_markdown() and "b32 samples/s" in report.to_markdown()
    write_report(report, tmp_path, title="t")
    assert "agreement vs artifact bytes" in (tmp_path / "report.html").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["metric"] == "agreement"
    with pytest.raises(sf.ConfigError, match="no metric 'ndcg'"):
        sf.measure({"mlp": digits_mlp}, digits.test, seconds=0.1, score=agreement, metric="ndcg")
