"""slimfuse.optimize: the best within the constraint, the closest when none meets it, a Pareto set always."""

import json

import pytest
import torch
from click.testing import CliRunner

import slimfuse as sf
from slimfuse.cli import app
from slimfuse.compress.prune import prune
from slimfuse.compress.quantize import quantize
from slimfuse.export import to_onnx
from slimfuse.search import Move


def moves(splits):
    return [
        Move("prune channels 0.25", lambda m, seed: prune(m, channels=0.25, data=splits, epochs=2, seed=seed)),
        Move("prune 0.99 oneshot", lambda m, seed: prune(m, 0.99, schedule="oneshot")),  # wrecks accuracy
        Move("int8-dynamic (torch)", lambda m: quantize(m, "int8-dynamic", backend="torch"), finishing=True),
        Move("onnx fp32", lambda m: to_onnx(m, sample=splits.val), finishing=True),
    ]


@pytest.fixture(scope="module")
def searched(digits, digits_mlp):
    return sf.optimize(digits_mlp, digits, max_drop=2.0, objective="bytes", moves=moves(digits), seconds=0.05)


def test_the_best_meets_the_constraint_on_validation_and_wins_the_objective(searched, digits_mlp, digits, tmp_path):
    r = searched
    base = sf.evaluate(digits_mlp, digits.val)["accuracy"]
    assert r.met and r.best is not None and r.best is not r.baseline
    assert r.best.row["val_accuracy"] >= base - 0.02 - 1e-9
    meeting = [c for c in r.candidates if c.model is not None and c.meets and c is not r.baseline]
    assert r.best.row["bytes"] == min(c.row["bytes"] for c in meeting) < r.baseline.row["bytes"]
    assert "prune 0.99 oneshot" not in [c.name for c in meeting]
    # structural candidates that met the constraint were finished: prune > int8
    assert any(c.name == "prune channels 0.25 > int8-dynamic (torch)" for c in r.candidates)
    # level 3: three compressed members from three seeds, averaged
    ens = [c for c in r.candidates if c.name.startswith("ensemble of 3 x (prune channels 0.25 > ")]
    assert len(ens) == 1 and ens[0].model is not None and len(ens[0].model.members) == 3
    # ... and the same three merged in weight space: one network, a third of the ensemble's tensors (the
    # artifacts also hold a card of a few KB each, the machine's description included)
    merged = [c for c in r.candidates if c.name.startswith("merge of 3 x (prune channels 0.25) > ")]
    assert len(merged) == 1 and merged[0].model is not None, [c.error for c in merged]
    assert not hasattr(merged[0].model, "members")

    def tensor_bytes(model):
        return sum(t.numel() * t.element_size() for t in model.state_dict().values())

    assert 3 * tensor_bytes(merged[0].model) <= tensor_bytes(ens[0].model) + 64
    assert merged[0].row["bytes"] < ens[0].row["bytes"] - 2 * tensor_bytes(merged[0].model) * 0.9
    # the Pareto set: nothing in it is beaten on both bytes and validation accuracy
    done = [c for c in r.candidates if c.model is not None]
    for p in r.pareto:
        assert not any(o.row["bytes"] < p.row["bytes"] and o.row["val_accuracy"] > p.row["val_accuracy"] for o in done)
    assert r.baseline in r.pareto or any(c.row["val_accuracy"] >= r.baseline.row["val_accuracy"] for c in r.pareto)

    out = r.save(tmp_path / "opt")
    best = sf.load(out / "best")
    assert torch.equal(sf.predict(best, digits.test), sf.predict(r.best.model, digits.test))
    summary = json.loads((out / "search.json").read_text())
    assert summary["met"] and summary["best"] == r.best.name and summary["pareto"]
    assert "<img" in (out / "report.html").read_text()


def test_an_impossible_constraint_returns_the_closest_and_the_pareto_set(digits, digits_mlp, tmp_path):
    harsh = [Move("prune 0.98 oneshot", lambda m, seed: prune(m, 0.98, schedule="oneshot")),
             Move("prune 0.95 oneshot", lambda m, seed: prune(m, 0.95, schedule="oneshot"))]
    r = sf.optimize(digits_mlp, digits, max_drop=0.0, objective="bytes", moves=harsh, seconds=0.05, ensemble=False)
    assert not r.met and r.best is None
    assert r.closest.name == min((c for c in r.candidates if c is not r.baseline), key=lambda c: c.drop).name
    assert r.message.startswith("NO candidate kept validation accuracy within 0 pt") and r.closest.name in r.message
    assert r.pareto and r.baseline in r.pareto
    out = r.save(tmp_path / "o")
    assert (out / "closest").is_dir() and not (out / "best").exists()
    assert json.loads((out / "search.json").read_text())["met"] is False


def test_the_time_budget_is_respected_and_what_was_skipped_is_listed(digits, digits_mlp):
    r = sf.optimize(digits_mlp, digits, budget_s=1e-6, moves=moves(digits), seconds=0.05)
    assert [c.name for c in r.candidates if c.model is not None] == ["input model"]
    assert r.skipped and "prune channels 0.25" in r.skipped
    assert not r.met and r.closest is r.baseline


def test_the_choice_is_checked_on_the_test_split_with_a_paired_interval(searched, digits):
    r = searched
    h = r.held_out
    assert h["candidate"] == r.best.name and h["samples"] == len(digits.test)
    assert h["diff_points"] == pytest.approx(100 * (r.best.row["accuracy"] - r.baseline.row["accuracy"]), abs=1e-3)
    assert h["lo_points"] <= h["diff_points"] <= h["hi_points"]
    assert h["verdict"] == ("met" if h["lo_points"] >= -2.0 else "missed" if h["hi_points"] < -2.0 else "tie")
    assert f"max_drop there: {h['verdict']}" in r.message


def test_a_choice_that_does_not_hold_on_the_test_split_is_warned(digits):
    torch.manual_seed(0)
    model = sf.fit(sf.zoo.for_task("mlp", digits.task, hidden=[64]), digits, epochs=40, progress=False)

    def memorize_val(m, seed):  # small, and as accurate as the input on the validation split it learned by heart
        torch.manual_seed(seed)
        return sf.fit(sf.zoo.mlp(64, [6], 10), digits, train=digits.val, epochs=400, progress=False, seed=seed)

    with pytest.warns(UserWarning, match="on the test split it is .* below the input model .* did not hold"):
        r = sf.optimize(model, digits, max_drop=1.0, objective="bytes", moves=[Move("memorize val", memorize_val)],
                        seconds=0.02, ensemble=False)
    assert r.met and r.best.name == "memorize val"
    assert r.held_out["verdict"] == "missed" and r.held_out["hi_points"] < -1.0
    assert "max_drop there: missed" in r.message


@pytest.mark.parametrize("kwargs,message", [
    ({"objective": "speed"}, "field 'objective': unknown value 'speed'"),
    ({"max_drop": -1}, "max_drop"),
    ({"budget_s": 0}, "budget_s"),
])
def test_bad_arguments(digits, digits_mlp, kwargs, message):
    with pytest.raises(sf.ConfigError, match=message):
        sf.optimize(digits_mlp, digits, **kwargs)


@pytest.mark.slow
def test_optimize_cli_searches_the_default_space(tmp_path, digits, digits_mlp):
    sf.save(digits_mlp, tmp_path / "m")
    result = CliRunner().invoke(app, ["optimize", str(tmp_path / "m"), "--data", "digits", "-o", str(tmp_path / "o"),
                                      "--max-drop", "1", "--objective", "latency", "--budget-s", "60",
                                      "--no-ensemble", "--strict"])
    assert result.exit_code in (0, 1), result.output
    summary = json.loads((tmp_path / "o" / "search.json").read_text())
    names = [c["name"] for c in summary["candidates"]]
    assert "input model" in names and any(n.startswith("prune channels") for n in names)
    assert any("int8-static (onnxruntime)" in n for n in names)  # measured in its deployment runtime
    assert ("Pareto set:" in result.output) and (result.exit_code == 0) == summary["met"]
    bad = CliRunner().invoke(app, ["optimize", str(tmp_path / "m"), "--data", "digits", "-o", str(tmp_path / "x"),
                                   "--objective", "speed"])
    assert bad.exit_code == 2 and "--objective" in bad.output and not (tmp_path / "x").exists()
