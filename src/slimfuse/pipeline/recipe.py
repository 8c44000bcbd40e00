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
from pathlib import Path
from typing import Annotated, Callable, Literal, Union

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .. import __version__
from ..errors import ConfigError, SlimfuseError

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
PosInt = Annotated[int, Field(gt=0)]
PosFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Annotated[str, Field(pattern=_NAME)]

    def inputs(self) -> list[str]:
        """Names of the earlier steps this one reads."""
        return [self.input] if hasattr(self, "input") else []


class TrainStep(_Step):
    step: Literal["train"]
    model: str = "mlp"
    hidden: list[PosInt] | None = None
    widths: list[PosInt] | None = None
    epochs: PosInt = 20
    batch_size: Annotated[int, Field(gt=0, le=1_000_000)] = 64
    lr: PosFloat = 1e-3
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    schedule: Literal["constant", "cosine"] | None = None
    patience: PosInt | None = None
    members: PosInt = 1
    diversity: Literal["seed", "bagging", "snapshot", "architectures"] = "seed"
    combine: Literal["mean", "mean-logits", "vote", "weighted", "stacking"] = "mean"


class PruneStep(_Step):
    step: Literal["prune"]
    input: str
    sparsity: Fraction | None = None
    channels: Fraction | None = None
    schedule: Literal["agp", "oneshot"] = "agp"
    steps: PosInt | None = None
    scope: Literal["global", "layer"] | None = None
    importance: Literal["l1", "l2", "taylor"] | None = None
    finetune_epochs: Annotated[int, Field(ge=0)] | None = None
    lr: PosFloat | None = None


class QuantizeStep(_Step):
    step: Literal["quantize"]
    input: str
    scheme: str
    backend: Literal["auto", "torch", "onnxruntime"] = "auto"
    calibrator: Literal["minmax", "percentile", "entropy"] | None = None
    epochs: PosInt | None = None
    format: Literal["qdq", "qoperator"] | None = None
    max_drop: Annotated[float, Field(ge=0, lt=1)] | None = None

    @field_validator("scheme")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        from ..compress.quantize import SCHEMES

        known = sorted({s for s, _ in SCHEMES})
        if v.partition(":")[0] not in known:
            raise ValueError(f"unknown quantization scheme {v!r} (known: {', '.join(known)})")
        return v


class DistillStep(_Step):
    step: Literal["distill"]
    teacher: str
    student: str
    temperature: PosFloat = 4.0
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.9
    epochs: PosInt = 20
    transfer: Literal["train", "augment"] = "train"
    copies: PosInt = 4
    mixup: Annotated[float, Field(ge=0)] = 0.0
    batch_size: Annotated[int, Field(gt=0, le=1_000_000)] = 64
    lr: PosFloat = 1e-3
    schedule: Literal["constant", "cosine"] | None = None

    def inputs(self) -> list[str]:
        return [self.teacher]


class EnsembleStep(_Step):
    step: Literal["ensemble"]
    members: Annotated[list[str], Field(min_length=2)]
    method: Literal["mean", "mean-logits", "vote", "weighted", "stacking"] = "weighted"
    refine: bool = False
    meta: Literal["linear", "mlp"] = "linear"

    def inputs(self) -> list[str]:
        return list(self.members)


class ExportStep(_Step):
    step: Literal["export"]
    input: str
    format: Literal["onnx"] = "onnx"


class MeasureStep(_Step):
    step: Literal["measure"]
    models: list[str] | None = None  # default: every step before this one (exports run in ONNX Runtime)
    split: Literal["val", "test"] = "test"
    threads: PosInt = 2
    seconds: PosFloat = 1.0
    title: str | None = None

    def inputs(self) -> list[str]:
        return list(self.models or [])


Step = Annotated[
    Union[TrainStep, PruneStep, QuantizeStep, DistillStep, EnsembleStep, ExportStep, MeasureStep],
    Field(discriminator="step"),
]
STEP_KINDS = ("train", "prune", "quantize", "distill", "ensemble", "export", "measure")


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    data: str
    seed: int = 0
    label: str = "label"
    out: str | None = None
    steps: Annotated[list[Step], Field(min_length=1)]


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a short hand-written file
MAX_RECIPE_VALUES = 100_000  # values after expanding YAML aliases ("billion laughs" stop here)


def _bounded_yaml(path: Path):
    """``yaml.safe_load`` with limits: file size, nesting, and values counted with every alias
    expanded, so a small file of nested anchors cannot make the validation expand gigabytes."""
    from ..limits import json_shape_problem

    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes is too large for a recipe (limit {MAX_RECIPE_BYTES:,})")
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
    errors = error.errors()
    first = errors[0]
    loc = list(first["loc"])
    where = str(path)
    if loc and loc[0] == "steps" and len(loc) >= 2 and isinstance(loc[1], int):
        i = loc[1]
        step = raw["steps"][i]
        where += f": step {i + 1}" + (f" '{step['name']}'" if isinstance(step.get("name"), str) else "")
        where += f" ({step.get('step')})"
        loc = loc[3:]  # past "steps", the index and the discriminator tag
    field = ".".join(str(p) for p in loc)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] == "missing":
        msg = "missing required field"
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    return f"{where}: field '{field}': {msg}{more}" if field else f"{where}: {msg}{more}"


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
        if isinstance(step, PruneStep) and (step.sparsity is None) == (step.channels is None):
            raise ConfigError(f"{where}: give exactly one of 'sparsity' (unstructured) or 'channels' (structured)")
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
            from .report import write_text_atomic

            write_text_atomic(record, json.dumps(result, indent=2) + "\n")
            self.results[step.name] = {**result, "status": "ran"}
            self.log(f"step {step.name} ({step.step}): done in {result['seconds']:.1f} s")
        from .report import write_text_atomic

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
        (an ``export`` step's model is its ONNX file, run by ONNX Runtime)."""
        if name not in self.models:
            from ..models import load
            from ..runtime import load_onnx

            self.models[name] = load_onnx(self.out / f"{name}.onnx") if self.kinds[name] == "export" \
                else load(self.out / name)
        return self.models[name]

    def checkpoint(self, step) -> Path:
        """Where a training step checkpoints every epoch (``OUT/.NAME.checkpoint``): a rerun resumes it."""
        from ..checkpoint import beside

        return beside(self.out / step.name)

    def _keep(self, step, model) -> dict:
        from ..models import folder_bytes, save
        from ..train import evaluate

        metrics = {"val": evaluate(model, self.splits.val), "test": evaluate(model, self.splits.test)}
        save(model, self.out / step.name, metrics=metrics)
        self.models[step.name] = model
        return {"test_accuracy": metrics["test"]["accuracy"], "bytes": folder_bytes(self.out / step.name)}

    # one method per step kind -------------------------------------------------------------------

    def _train(self, step: TrainStep) -> dict:
        from ..models import zoo
        from ..train import fit

        kwargs = {}
        if step.hidden is not None:
            kwargs["hidden"] = step.hidden
        if step.widths is not None:
            kwargs["widths"] = step.widths
        fit_options = {"epochs": step.epochs, "batch_size": step.batch_size, "lr": step.lr,
                       "optimizer": step.optimizer, "patience": step.patience, "seed": self.recipe.seed}
        if step.schedule is not None:
            fit_options["schedule"] = step.schedule
        if step.members > 1 or step.diversity != "seed":
            from ..fuse.jobs import train_ensemble

            model = train_ensemble(step.model, self.splits, kwargs, step.members, step.diversity, step.combine,
                                   checkpoint=self.checkpoint(step), **fit_options)
        else:
            net = zoo.for_task(step.model, self.splits.task, **kwargs)
            model = fit(net, self.splits, checkpoint=self.checkpoint(step), **fit_options)
        return self._keep(step, model)

    def _prune(self, step: PruneStep) -> dict:
        from ..compress.prune import prune

        options = step.model_dump(exclude={"name", "step", "input", "sparsity"}, exclude_none=True)
        return self._keep(step, prune(self.model(step.input), step.sparsity, data=self.splits,
                                      seed=self.recipe.seed, checkpoint=self.checkpoint(step), **options))

    def _quantize(self, step: QuantizeStep) -> dict:
        from ..compress.quantize import checkpoint_option, quantize

        options = step.model_dump(exclude={"name", "step", "input", "scheme", "backend"}, exclude_none=True)
        options.update(checkpoint_option(step.scheme, step.backend, self.checkpoint(step)))
        return self._keep(step, quantize(self.model(step.input), step.scheme, calib=self.splits,
                                         backend=step.backend, **options))

    def _distill(self, step: DistillStep) -> dict:
        from ..compress.distill import build_student, distill

        teacher = self.model(step.teacher)
        student = build_student(step.student, teacher, self.splits.task)
        options = step.model_dump(exclude={"name", "step", "teacher", "student"}, exclude_none=True)
        return self._keep(step, distill(teacher, student, self.splits, seed=self.recipe.seed, progress=False,
                                        checkpoint=self.checkpoint(step), **options))

    def _ensemble(self, step: EnsembleStep) -> dict:
        from ..fuse import ensemble

        members = [self.model(n) for n in step.members]
        return self._keep(step, ensemble(members, step.method, self.splits, refine=step.refine, meta=step.meta,
                                         seed=self.recipe.seed))

    def _export(self, step: ExportStep) -> dict:
        from ..export import export

        result = export(self.model(step.input), step.format, self._output(step), sample=self.splits.val)
        return {"bytes": result.bytes, "parity": result.parity}

    def _measure(self, step: MeasureStep) -> dict:
        from ..measure import measure
        from .report import write_report

        names = self._inputs(step)
        if not names:
            raise ConfigError("no model step before this measure step")
        report = measure({n: self.model(n) for n in names}, getattr(self.splits, step.split),
                         threads=step.threads, seconds=step.seconds)
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
