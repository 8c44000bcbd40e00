"""Recipes: validation names file, step and field; reruns skip finished steps; changes rerun downstream."""

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import slimfuse as sf
from slimfuse.cli import app
from slimfuse.measure import counts
from slimfuse.pipeline.recipe import load_recipe, run_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

SMALL = {
    "data": "digits",
    "seed": 0,
    "steps": [
        {"name": "mlp", "step": "train", "hidden": [32], "epochs": 3},
        {"name": "pruned", "step": "prune", "input": "mlp", "sparsity": 0.5, "epochs": 1, "steps": 2},
        {"name": "int8", "step": "quantize", "input": "pruned", "scheme": "int8-dynamic", "backend": "torch"},
        {"name": "onnx", "step": "export", "input": "mlp"},
        {"name": "report", "step": "measure", "seconds": 0.05},
    ],
}


def write(tmp_path, recipe, name="r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe) if isinstance(recipe, dict) else recipe)
    return path


def with_step(i, **change):
    steps = [dict(s) for s in SMALL["steps"]]
    steps[i].update(change)
    for k, v in change.items():
        if v is None:
            del steps[i][k]
    return {**SMALL, "steps": steps}


BAD = [
    ("not yaml", "data: [digits\nsteps: 1", "line 2"),
    ("not a mapping", "- 1\n- 2", "a recipe is a mapping"),
    ("no steps", {"data": "digits"}, "field 'steps': missing required field"),
    ("empty steps", {"data": "digits", "steps": []}, "field 'steps'"),
    ("unknown top field", {**SMALL, "sead": 1}, "field 'sead': unknown field"),
    ("step not a mapping", {"data": "digits", "steps": ["train"]}, "step 1: expected a mapping"),
    ("missing kind", with_step(1, step=None), "step 2: missing field 'step'"),
    ("unknown kind", with_step(1, step="prun"), "step 2: unknown step 'prun'"),
    ("bad type", with_step(0, epochs="many"), "step 1 'mlp' (train): field 'epochs'"),
    ("negative epochs", with_step(0, epochs=-1),
     "step 1 'mlp' (train): field 'epochs': Input should be greater than or equal to 1"),
    ("sparsity 1.5", with_step(1, sparsity=1.5), "step 2 'pruned' (prune): field 'sparsity'"),
    ("unknown field", with_step(2, bits=4), "step 3 'int8' (quantize): field 'bits': unknown field"),
    ("unknown scheme", with_step(2, scheme="int3"), "step 3 'int8' (quantize): field 'scheme': unknown quantization"),
    ("missing input", with_step(1, input=None), "step 2 'pruned' (prune): field 'input': missing required field"),
    ("dangling input", with_step(1, input="teacher"), "step 2 'pruned' (prune): refers to 'teacher'"),
    ("forward reference", with_step(1, input="int8"), "refers to 'int8', which is not the name of an earlier step"),
    ("duplicate name", with_step(1, name="mlp"), "step 2 'mlp' (prune): field 'name': another step"),
    ("both sparsity and channels", with_step(1, channels=0.5), "exactly one of 'sparsity'"),
    ("bad name", with_step(0, name="../evil"), "step 1 '../evil' (train): field 'name'"),
    ("prune an export", with_step(2, input="onnx"), "step 3 'int8' (quantize): refers to 'onnx'"),
    ("bad data", {**SMALL, "data": "nope.csv"}, "data 'nope.csv': not a built-in"),
    ("embedding data", {**SMALL, "data": "sentences"}, "field 'data': recipes run classification data"),
]


@pytest.mark.parametrize("case,recipe,message", BAD, ids=[b[0] for b in BAD])
def test_bad_recipes_name_file_step_and_field_exit_2_and_write_nothing(tmp_path, case, recipe, message):
    path = write(tmp_path, recipe)
    result = CliRunner().invoke(app, ["run", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}") and message in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_a_rerun_skips_finished_steps_and_a_change_reruns_only_downstream(tmp_path):
    path = write(tmp_path, SMALL)
    out = tmp_path / "out"
    first = run_recipe(path, out=out, log=lambda _: None)
    assert [r["status"] for r in first.values()] == ["ran"] * 5
    report = json.loads((out / "report.json").read_text())
    assert {r["name"] for r in report["rows"]} == {"mlp", "pruned", "int8", "onnx"}
    assert report["rows"][3]["runtime"] == "onnxruntime"
    weights = (out / "mlp" / "weights.safetensors").read_bytes()
    half = counts(sf.load(out / "pruned"))["nonzeros"]

    again = run_recipe(path, out=out, log=lambda _: None)
    assert [r["status"] for r in again.values()] == ["cached"] * 5
    assert (out / "mlp" / "weights.safetensors").read_bytes() == weights

    changed = write(tmp_path, with_step(1, sparsity=0.6))
    third = run_recipe(changed, out=out, log=lambda _: None)
    assert {n: r["status"] for n, r in third.items()} == {
        "mlp": "cached", "pruned": "ran", "int8": "ran", "onnx": "cached", "report": "ran"}
    assert counts(sf.load(out / "pruned"))["nonzeros"] < half  # the new sparsity, not the cached 0.5


def test_an_interrupted_run_resumes_after_its_last_finished_step(tmp_path, monkeypatch):
    from slimfuse.pipeline import recipe as recipe_module

    path = write(tmp_path, SMALL)
    out = tmp_path / "out"
    reference = run_recipe(path, out=tmp_path / "ref", log=lambda _: None)

    def crash(self, step):
        raise KeyboardInterrupt  # the user pressed Ctrl-C during quantization

    monkeypatch.setattr(recipe_module.RecipeRun, "_quantize", crash)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(path, out=out, log=lambda _: None)
    assert not (out / "int8").exists() and not (out / ".steps" / "int8.json").exists()
    monkeypatch.undo()
    resumed = run_recipe(path, out=out, log=lambda _: None)
    assert {n: r["status"] for n, r in resumed.items()} == {
        "mlp": "cached", "pruned": "cached", "int8": "ran", "onnx": "ran", "report": "ran"}
    for name in ("mlp", "pruned", "int8"):
        reference_bytes = (tmp_path / "ref" / name / "weights.safetensors").read_bytes()
        assert (out / name / "weights.safetensors").read_bytes() == reference_bytes
    assert resumed["int8"]["key"] == reference["int8"]["key"]


def test_a_failing_step_names_itself(tmp_path):
    recipe = with_step(0, model="lenet5", hidden=None)
    with pytest.raises(sf.ConfigError, match=r"step mlp \(train\): .*lenet5"):
        run_recipe(write(tmp_path, recipe, "lenet.yaml"), out=tmp_path / "o2", log=lambda _: None)


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    assert load_recipe(recipe).steps


KILL_RECIPE = {
    "data": "digits",
    "seed": 0,
    "steps": [
        {"name": "t", "step": "train", "hidden": [48], "epochs": 6},
        {"name": "p", "step": "prune", "input": "t", "sparsity": 0.5, "epochs": 3},
        {"name": "d", "step": "distill", "teacher": "t", "student": "mlp:16", "epochs": 4},
        {"name": "q", "step": "quantize", "input": "t", "scheme": "int8-static", "backend": "torch"},
        {"name": "e", "step": "ensemble", "members": ["t", "p", "d"], "method": "weighted"},
        {"name": "x", "step": "export", "input": "d"},
    ],
}


def _step_hashes(out: Path) -> dict[str, str]:
    import hashlib

    files = {s["name"]: out / (f"{s['name']}.onnx" if s["step"] == "export" else f"{s['name']}/weights.safetensors")
             for s in KILL_RECIPE["steps"]}
    return {n: hashlib.sha256(f.read_bytes()).hexdigest() for n, f in files.items()}


@pytest.mark.slow
def test_a_recipe_killed_again_and_again_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    """SIGKILL `slimfuse run` mid-training (from epoch checkpoints) and between steps, rerun it each
    time: every step's weights (and the exported ONNX file) hash the same as an uninterrupted run's.
    A step whose input comes from the cache must draw the same random numbers as one whose input
    is still in memory (loading an artifact once consumed the global RNG and changed the student)."""
    import subprocess
    import sys
    import warnings

    from killing import kill_after_epoch

    recipe = write(tmp_path, KILL_RECIPE)

    def command(out):
        return [sys.executable, "-m", "slimfuse", "run", str(recipe), "-o", str(out)]

    subprocess.run(command(tmp_path / "straight"), check=True, capture_output=True)
    straight = _step_hashes(tmp_path / "straight")

    def killed(out):
        # mid-epoch kills inside three training steps, each followed by a rerun that resumes
        for step, epoch in (("t", 2), ("p", 1), ("d", 2)):
            kill_after_epoch(command(out), out / f".{step}.checkpoint" / "state.json", epoch)
        subprocess.run(command(out), check=True, capture_output=True)
        leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".steps"]
        assert leftovers == []
        return _step_hashes(out)

    first = killed(tmp_path / "killed")
    if first != straight:  # a lone odd process is not the resume (the kills land at the same steps): killing.py
        second = killed(tmp_path / "killed-again")
        if second != straight:
            assert second == first, (first, second, straight)
            subprocess.run(command(tmp_path / "straight-again"), check=True, capture_output=True)
            assert _step_hashes(tmp_path / "straight-again") == first, (first, straight)
        warnings.warn(f"one of three recipe runs hashed apart from the two that agree: {first} vs {straight}",
                      stacklevel=1)
