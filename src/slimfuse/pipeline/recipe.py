"""Recipes: a YAML list of steps that ``slimfuse run recipe.yaml`` executes, with step caching.

A recipe names its data once and lists steps; each step's output is named by the step and
is the input of later ones::

    data: mnist5k
    seed: 0
    steps:
      - {name: teacher, step: train, hidden: [300, 100], epochs: 20}
      - {name: pruned, step: prune, input: teacher, sparsity: 0.9}
      - {name: int8, step: quantize, input: pruned, scheme: int8-static}
      - {name: report, step: measure}

Every model step writes an artifact folder ``OUT/NAME`` (``export`` writes ``OUT/NAME.onnx``,
``measure`` writes ``OUT/NAME.{md,html,json}``) and a record ``OUT/.steps/NAME.json`` holding
the step's cache key: a hash of the step's parameters, the data (a file's SHA-256), the seed,
the keys of its inputs and the slimfuse version. A rerun skips every step whose output exists
with the same key, so an interrupted or repeated run resumes where it stopped; changing a
step's parameters reruns it and everything downstream of it. A step that trains (train, prune,
distill, qat/codebook quantization, ensemble members) also resumes inside itself from its per-epoch
checkpoint ``OUT/.NAME.checkpoint``.

Validation errors name the file, the step and the field.
"""

from __future__ import annotations

import hashlib
import json
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal, Union

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import __version__, configs
from ..errors import ConfigError, SlimfuseError

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
StepName = Annotated[str, Field(pattern=_NAME)]

# A step is its verb's config (slimfuse.configs: the same fields, defaults and bounds as the library and
# the CLI) plus its name, its kind and the names of the earlier steps it reads.


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: StepName

    def inputs(self) -> list[str]:
        """Names of the earlier steps this one reads."""
        return [self.input] if hasattr(self, "input") else []


class TrainStep(_Step, configs.Train):
    step: Literal["train"]


class PruneStep(_Step, configs.Prune):
    step: Literal["prune"]
    input: StepName


class QuantizeStep(_Step, configs.Quantize):
    step: Literal["quantize"]
    input: StepName


class DistillStep(_Step, configs.Distill):
    step: Literal["distill"]
    teacher: StepName
    student: configs.StudentSpec

    def inputs(self) -> list[str]:
        return [self.teacher]


class EnsembleStep(_Step, configs.Ensemble):
    step: Literal["ensemble"]
    members: Annotated[list[StepName], Field(min_length=2, max_length=1000)]

    def inputs(self) -> list[str]:
        return list(self.members)


class MergeStep(_Step, configs.Merge):
    step: Literal["merge"]
    members: Annotated[list[StepName], Field(min_length=2, max_length=1000)]
    base: StepName | None = None

    def inputs(self) -> list[str]:
        return [*self.members, *([self.base] if self.base else [])]


class ExportStep(_Step, configs.Export):
    step: Literal["export"]
    input: StepName


class OptimizeStep(_Step, configs.Optimize):
    step: Literal["optimize"]
    input: StepName


class MeasureStep(_Step, configs.Measure):
    step: Literal["measure"]
    models: list[StepName] | None = None  # default: every step before this one (exports run in ONNX Runtime)
    title: Annotated[str, Field(max_length=500)] | None = None

    def inputs(self) -> list[str]:
        return list(self.models or [])


STEPS = (TrainStep, PruneStep, QuantizeStep, DistillStep, EnsembleStep, MergeStep, ExportStep, OptimizeStep,
         MeasureStep)
Step = Annotated[Union[STEPS], Field(discriminator="step")]  # type: ignore[valid-type]  # noqa: UP007
STEP_KINDS = tuple(typing.get_args(cls.model_fields["step"].annotation)[0] for cls in STEPS)


class Recipe(configs.DataRef):
    out: Annotated[str, Field(max_length=4096)] | None = None
    steps: Annotated[list[Step], Field(min_length=1, max_length=1000)]


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a short hand-written file
MAX_RECIPE_VALUES = 100_000  # values after expanding YAML aliases ("billion laughs" stop here)


def _bounded_yaml(path: Path):
    """``yaml.safe_load`` with limits: file size, nesting, and values counted with every alias
    expanded, so a small file of nested anchors cannot make the validation expand gigabytes."""
    from ..limits import json_shape_problem

    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes is too large for a recipe "
                          f"(limit {MAX_RECIPE_BYTES:,})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply for a recipe") from None
    problem = json_shape_problem(raw, max_depth=32, max_nodes=MAX_RECIPE_VALUES)
    if problem:
        raise ConfigError(f"{path}: implausible recipe ({problem} once YAML aliases are expanded)")
    return raw


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; every problem is one ConfigError naming file, step and field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such recipe file")
    try:
        raw = _bounded_yaml(path)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping with 'data' and 'steps', got {type(raw).__name__}")
    steps = raw.get("steps")
    if isinstance(steps, list):
        for i, s in enumerate(steps, 1):
            if not isinstance(s, dict):
                raise ConfigError(f"{path}: step {i}: expected a mapping of fields, got {s!r}")
            if "step" not in s:
                raise ConfigError(f"{path}: step {i}: missing field 'step' (one of {', '.join(STEP_KINDS)})")
            if s["step"] not in STEP_KINDS:
                raise ConfigError(f"{path}: step {i}: unknown step {s['step']!r} (one of {', '.join(STEP_KINDS)})")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(path, raw, e)) from None
    _check_references(path, recipe)
    return recipe


def _describe(path: Path, raw: dict, error: ValidationError) -> str:
    loc = error.errors()[0]["loc"]
    where, skip = str(path), 0
    if loc and loc[0] == "steps" and len(loc) >= 2 and isinstance(loc[1], int):
        step = raw["steps"][loc[1]]
        where += f": step {loc[1] + 1}" + (f" '{step['name']}'" if isinstance(step.get("name"), str) else "")
        where += f" ({step.get('step')})"
        skip = 3  # past "steps", the index and the discriminator tag
    return f"{where}: {configs.describe(error, skip=skip)}"


def _check_references(path: Path, recipe: Recipe) -> None:
    seen: dict[str, str] = {}
    for i, step in enumerate(recipe.steps, 1):
        where = f"{path}: step {i} '{step.name}' ({step.step})"
        if step.name in seen:
            raise ConfigError(f"{where}: field 'name': another step is already named {step.name!r}")
        for ref in step.inputs():
            if ref not in seen:
                raise ConfigError(f"{where}: refers to {ref!r}, which is not the name of an earlier step")
            if seen[ref] == "measure" or (seen[ref] == "export" and not isinstance(step, MeasureStep)):
                raise ConfigError(f"{where}: refers to {ref!r}, a {seen[ref]} step, whose output is not a model "
                                  f"this step can take")
        seen[step.name] = step.step


# ---------------------------------------------------------------------------------------------
# Running


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _data_identity(data: str, base: Path) -> tuple[str, str]:
    """(what to load, what the cache key sees): a built-in name, or a file and its SHA-256."""
    from ..data.readers import builtin_names

    if data in builtin_names():
        return data, data
    file = Path(data) if Path(data).is_absolute() else base / data
    if not file.is_file():
        raise ConfigError(f"data {data!r}: not a built-in ({', '.join(builtin_names())}) and no such file "
                          f"(relative paths are read from the recipe's folder, {base})")
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return str(file), h.hexdigest()


class RecipeRun:
    """Executes a validated :class:`Recipe` into ``out``; see the module docstring."""

    def __init__(self, recipe: Recipe, path: Path, out: Path, *, log: Callable[[str], None] = print,
                 force: bool = False):
        from .. import data as datasets

        self.recipe, self.out, self.log, self.force = recipe, out, log, force
        try:
            source, self.data_id = _data_identity(recipe.data, path.parent)
            self.splits = datasets.load(source, seed=recipe.seed, label=recipe.label)
        except SlimfuseError as e:
            raise type(e)(f"{path}: field 'data': {e}") from None
        if self.splits.task.kind != "classification":
            raise ConfigError(f"{path}: field 'data': recipes run classification data; {recipe.data!r} is "
                              f"{self.splits.task.kind} data (use its demo scenario or slimfuse.optimize)")
        self.keys: dict[str, str] = {}
        self.models: dict = {}
        self.kinds: dict[str, str] = {}
        self.results: dict[str, dict] = {}

    def run(self) -> dict[str, dict]:
        for step in self.recipe.steps:
            params = step.model_dump(exclude={"name"})
            key = _hash({"params": params, "data": self.data_id, "seed": self.recipe.seed,
                         "label": self.recipe.label, "inputs": [self.keys[n] for n in self._inputs(step)],
                         "slimfuse": __version__})
            self.keys[step.name], self.kinds[step.name] = key, step.step
            record = self.out / ".steps" / f"{step.name}.json"
            if not self.force and self._finished(step, record, key):
                self.log(f"step {step.name} ({step.step}): cached, skipped")
                self.results[step.name] = {**json.loads(record.read_text()), "status": "cached"}
                continue
            self.log(f"step {step.name} ({step.step}): running")
            t0 = time.perf_counter()
            torch.manual_seed(self.recipe.seed)
            try:
                summary = getattr(self, f"_{step.step}")(step)
            except SlimfuseError as e:
                raise type(e)(f"step {step.name} ({step.step}): {e}") from None
            result = {"step": step.step, "key": key, "output": str(self._output(step)),
                      "seconds": round(time.perf_counter() - t0, 2), **summary}
            from ..models.artifact import write_text_atomic

            write_text_atomic(record, json.dumps(result, indent=2) + "\n")
            self.results[step.name] = {**result, "status": "ran"}
            self.log(f"step {step.name} ({step.step}): done in {result['seconds']:.1f} s")
        from ..models.artifact import write_text_atomic

        write_text_atomic(self.out / "run.json", json.dumps(self.results, indent=2) + "\n")
        return self.results

    def _inputs(self, step) -> list[str]:
        if isinstance(step, MeasureStep) and not step.models:  # every step so far that made a model
            return [n for n, k in self.kinds.items() if k != "measure" and n != step.name]
        return step.inputs()

    def _output(self, step) -> Path:
        if step.step == "export":
            return self.out / f"{step.name}.onnx"
        if step.step == "measure":
            return self.out / f"{step.name}.json"
        return self.out / step.name

    def _finished(self, step, record: Path, key: str) -> bool:
        if not (record.is_file() and self._output(step).exists()):
            return False
        try:
            return json.loads(record.read_text()).get("key") == key
        except (OSError, ValueError):
            return False

    def model(self, name: str):
        """The model a step made: in memory when this run made it, else loaded from its artifact
        (an ``export`` step's model is its ONNX file, run by ONNX Runtime; an ``optimize`` step's is the
        model it chose)."""
        if name not in self.models:
            from ..models import load
            from ..runtime import load_onnx

            if self.kinds[name] == "export":
                self.models[name] = load_onnx(self.out / f"{name}.onnx")
            elif self.kinds[name] == "optimize":
                self.models[name] = load(self.chosen(name))
            else:
                self.models[name] = load(self.out / name)
        return self.models[name]

    def checkpoint(self, step) -> Path:
        """Where a training step checkpoints every epoch (``OUT/.NAME.checkpoint``): a rerun resumes it."""
        from ..checkpoint import beside

        return beside(self.out / step.name)

    def _done(self, step, done) -> dict:
        self.models[step.name] = done.model
        return done.summary()

    # one method per step kind: the job the CLI verb runs, on this run's models and data --------------

    def _train(self, step: TrainStep) -> dict:
        from .. import jobs

        return self._done(step, jobs.train(step, self.splits, self.out / step.name, seed=self.recipe.seed,
                                           checkpoint=self.checkpoint(step)))

    def _prune(self, step: PruneStep) -> dict:
        from .. import jobs

        return self._done(step, jobs.prune(self.model(step.input), step, self.splits, self.out / step.name,
                                           seed=self.recipe.seed, checkpoint=self.checkpoint(step)))

    def _quantize(self, step: QuantizeStep) -> dict:
        from .. import jobs

        return self._done(step, jobs.quantize(self.model(step.input), step, self.splits, self.out / step.name,
                                              checkpoint=self.checkpoint(step)))

    def _distill(self, step: DistillStep) -> dict:
        from .. import jobs

        return self._done(step, jobs.distill(self.model(step.teacher), step.student, step, self.splits,
                                             self.out / step.name, seed=self.recipe.seed, progress=False,
                                             checkpoint=self.checkpoint(step)))

    def _ensemble(self, step: EnsembleStep) -> dict:
        from .. import jobs

        return self._done(step, jobs.ensemble([self.model(n) for n in step.members], step, self.splits,
                                              self.out / step.name, seed=self.recipe.seed))

    def _merge(self, step: MergeStep) -> dict:
        from .. import jobs

        base = self.model(step.base) if step.base else None
        return self._done(step, jobs.merge([self.model(n) for n in step.members], step, self.splits,
                                           self.out / step.name, base=base, seed=self.recipe.seed))

    def _optimize(self, step: OptimizeStep) -> dict:
        from .. import jobs

        done = jobs.optimize(self.model(step.input), step, self.splits, self.out / step.name, seed=self.recipe.seed,
                             log=self.log)
        self.models[step.name] = done.model
        return {"met": done.met, "chosen": str(self.chosen(step.name).relative_to(self.out))}

    def chosen(self, name: str) -> Path:
        """An optimize step's model: ``OUT/NAME/best``, or ``closest`` when no candidate met ``max_drop``."""
        best = self.out / name / "best"
        return best if best.exists() else self.out / name / "closest"

    def _export(self, step: ExportStep) -> dict:
        from .. import jobs

        done = jobs.export(self.model(step.input), step, self._output(step), self.splits)
        return {"bytes": self._output(step).stat().st_size, "parity": done.metrics["parity"]}

    def _measure(self, step: MeasureStep) -> dict:
        from ..measure import measure
        from ..report import write_report

        names = self._inputs(step)
        if not names:
            raise ConfigError("no model step before this measure step")
        report = measure({n: self.model(n) for n in names}, getattr(self.splits, step.split),
                         threads=step.threads, seconds=step.seconds, device=step.device)
        title = step.title or f"slimfuse run: {self.recipe.data} ({step.split} split)"
        paths = write_report(report, self.out, title=title, stem=step.name)
        self.log(report.to_markdown())
        return {"report": {k: str(p) for k, p in paths.items()}}


def run_recipe(path: str | Path, *, out: str | Path | None = None, force: bool = False,
               log: Callable[[str], None] = print) -> dict[str, dict]:
    """Validate and run the recipe at ``path``; returns ``{step name: record}`` (``status``: ran or cached).

    ``out`` defaults to the recipe's ``out`` field, else ``runs/<recipe file stem>``;
    ``force`` reruns every step even when its cached output is current.
    """
    path = Path(path)
    recipe = load_recipe(path)
    folder = Path(out) if out is not None else Path(recipe.out) if recipe.out else Path("runs") / path.stem
    return RecipeRun(recipe, path, folder, log=log, force=force).run()
