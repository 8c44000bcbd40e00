"""The ``slimfuse`` command line: one thin verb per library call.

A user error (``SlimfuseError``) prints one line on stderr and exits with 2;
nothing is half-written because the library writes atomically.
"""

from __future__ import annotations

import errno
import functools
import json
from pathlib import Path
from typing import Annotated

import typer

from .errors import ConfigError, SlimfuseError

app = typer.Typer(
    help="slimfuse: make trained neural networks smaller, faster and better.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# OS failures a user (or their machine) causes: one line naming the path, exit 2
_USER_OS_ERRORS = frozenset({
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENAMETOOLONG,
    errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EXDEV,
})


def user_errors(fn):
    """Turn a SlimfuseError, or an OS error the user's files or disk caused, into one line on
    stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SlimfuseError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except OSError as e:
            if e.errno not in _USER_OS_ERRORS:
                raise
            where = e.filename if e.filename is not None else "(unknown path)"
            why = e.strerror or str(e)
            if e.errno == errno.EEXIST and Path(str(where)).is_file():  # mkdir under a file
                why = "is a file, not a folder (Not a directory)"
            typer.echo(f"error: {where}: {why}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{what} must be positive integers, got {text!r}")
    return values


Data = Annotated[str, typer.Option("--data", "-d", help="built-in data set (mnist5k, digits) or a .npz/.csv file")]
Out = Annotated[Path, typer.Option("--out", "-o", help="output artifact folder")]
Seed = Annotated[int, typer.Option(help="random seed (splits, init, shuffling)")]
Label = Annotated[str, typer.Option(help="label column of a .csv file")]


@app.command()
@user_errors
def train(
    data: Data,
    out: Out,
    model: Annotated[str, typer.Option(help="zoo architecture: mlp, lenet5 or cnn")] = "mlp",
    hidden: Annotated[str, typer.Option(help="mlp hidden widths, e.g. 300,100")] = "300,100",
    widths: Annotated[str | None, typer.Option(help="lenet5/cnn widths, e.g. 6,16,120,84")] = None,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: str = "adam",
    patience: Annotated[int | None, typer.Option(help="early-stopping patience in epochs")] = None,
    seed: Seed = 0,
    label: Label = "label",
    members: Annotated[int, typer.Option(help="train this many members and save them as one ensemble")] = 1,
    diversity: Annotated[str, typer.Option(help="members differ by: seed, bagging, snapshot, architectures")] = "seed",
    combine: Annotated[str, typer.Option(help="ensemble method for --members: mean, vote, weighted, stacking")] = "mean",
):
    """Train a zoo model (or, with --members, an ensemble) and save it as an artifact."""
    import torch

    from . import data as datasets
    from .checkpoint import beside
    from .models import save, zoo
    from .train import evaluate, fit

    splits = datasets.load(data, seed=seed, label=label)
    kwargs = {"hidden": _ints(hidden, "--hidden")} if model == "mlp" else {}
    if widths is not None and model != "mlp":
        kwargs["widths"] = _ints(widths, "--widths")
    torch.manual_seed(seed)
    if members != 1 or diversity != "seed":
        from .fuse.jobs import train_ensemble

        trained = train_ensemble(model, splits, kwargs, members, diversity, combine, epochs=epochs,
                                 batch_size=batch_size, lr=lr, optimizer=optimizer, patience=patience, seed=seed,
                                 checkpoint=beside(out))
    else:
        net = zoo.for_task(model, splits.task, **kwargs)
        # Checkpoints go to a hidden sibling of the output; rerunning the same command resumes.
        trained = fit(net, splits, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                      patience=patience, seed=seed, checkpoint=beside(out))
    metrics = {"val": evaluate(trained, splits.val), "test": evaluate(trained, splits.test)}
    save(trained, out, metrics=metrics)
    typer.echo(f"saved {out}: test accuracy {metrics['test']['accuracy']:.4f}")


@app.command("eval")
@user_errors
def eval_(
    artifact: Annotated[Path, typer.Argument(help="artifact folder")],
    data: Data,
    split: Annotated[str, typer.Option(help="train, val or test")] = "test",
    threads: int = 2,
    seed: Seed = 0,
    label: Label = "label",
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the report as JSON here")] = None,
    trust_factory: Annotated[bool, typer.Option(help="allow importing a user factory named in the card")] = False,
):
    """Measure an artifact: accuracy, bytes, parameters, MACs, latency."""
    from . import data as datasets
    from .measure import measure
    from .models import load

    if split not in ("train", "val", "test"):
        raise ConfigError(f"--split must be train, val or test, got {split!r}")
    if json_out is not None and json_out.is_dir():
        raise ConfigError(f"--json {json_out}: is a folder; give the path of the JSON file to write")
    model = load(artifact, trust_factory=trust_factory)
    splits = datasets.load(data, seed=seed, label=label)
    report = measure({artifact.name: model}, getattr(splits, split), threads=threads)
    if json_out is not None:
        from .pipeline.report import write_text_atomic

        write_text_atomic(json_out, report.to_json() + "\n")
    typer.echo(report.to_markdown())


@app.command()
@user_errors
def info(artifact: Annotated[Path, typer.Argument(help="artifact folder")]):
    """Show an artifact's card: spec, task, lineage, storage, metrics, bytes."""
    from .models import folder_bytes, lineage_str, read_card

    card = read_card(artifact)
    summary = {
        "spec": card["spec"],
        "task": card.get("task"),
        "lineage": lineage_str(card["lineage"]),
        "storage": card["storage"],
        "metrics": card["metrics"],
        "bytes_on_disk": folder_bytes(artifact),
        "versions": card.get("versions"),
    }
    typer.echo(json.dumps(summary, indent=2))


@app.command()
@user_errors
def demo(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default runs/demo[-SCENARIO])")] = None,
    scenario: Annotated[str, typer.Option(help="mnist (image classification), or another built-in scenario")] = "mnist",
    seed: Seed = 0,
):
    """Run the main job (default: mnist5k) and write report.md, report.html and report.json."""
    from .pipeline.scenarios import run_scenario

    report, out = run_scenario(scenario, out, seed=seed)
    typer.echo(report.to_markdown())
    typer.echo(f"wrote {out}/report.md, report.html and report.json")


@app.command()
@user_errors
def distill(
    teacher: Annotated[Path, typer.Option(help="teacher artifact folder (a model or an ensemble) or .onnx file")],
    student: Annotated[str, typer.Option(help="mlp:128, mlp:256,128, lenet5:3,8,60,42, cnn:8,16[:32] or width=0.25[,depth=1]")],
    data: Data,
    out: Out,
    temperature: float = 4.0,
    alpha: Annotated[float, typer.Option(help="weight of the soft (teacher) term; 1 - alpha weighs the labels")] = 0.9,
    epochs: int = 20,
    transfer: Annotated[str, typer.Option(help="train, augment, or a .npy file of unlabeled inputs")] = "train",
    copies: Annotated[int, typer.Option(help="augmented copies of the training set (--transfer augment)")] = 4,
    mixup: Annotated[float, typer.Option(help="unlabeled mixup blends, as a multiple of the training set")] = 0.0,
    hint: Annotated[list[str] | None, typer.Option(help="FitNets hint STUDENT_MODULE=TEACHER_MODULE (repeatable)")] = None,
    hint_weight: float = 1.0,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: Seed = 0,
    label: Label = "label",
    trust_factory: Annotated[bool, typer.Option(help="allow importing a user factory named in the card")] = False,
):
    """Distill a teacher into a smaller student and save the student as an artifact."""
    import numpy as np
    import torch

    from . import data as datasets
    from .checkpoint import beside
    from .compress.distill import build_student, distill as distill_, load_teacher
    from .models import save
    from .train import evaluate

    hints = {}
    for h in hint or []:
        s_path, sep, t_path = h.partition("=")
        if not sep or not s_path or not t_path:
            raise ConfigError(f"--hint must look like STUDENT_MODULE=TEACHER_MODULE, got {h!r}")
        hints[s_path] = t_path
    if transfer.endswith(".npy"):
        try:
            transfer_data = np.load(transfer, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--transfer {transfer}: cannot read unlabeled inputs ({e})") from None
    else:
        transfer_data = transfer
    splits = datasets.load(data, seed=seed, label=label)
    model = load_teacher(teacher, trust_factory=trust_factory)
    torch.manual_seed(seed)
    net = build_student(student, model, splits.task)
    trained = distill_(model, net, splits, temperature=temperature, alpha=alpha, epochs=epochs,
                       transfer=transfer_data, copies=copies, mixup=mixup, hints=hints, hint_weight=hint_weight,
                       batch_size=batch_size, lr=lr, seed=seed, checkpoint=beside(out))
    metrics = {"val": evaluate(trained, splits.val), "test": evaluate(trained, splits.test)}
    save(trained, out, metrics=metrics)
    typer.echo(f"saved {out}: test accuracy {metrics['test']['accuracy']:.4f} "
               f"(teacher {evaluate(model, splits.test)['accuracy']:.4f})")


@app.command()
@user_errors
def prune(
    artifact: Annotated[Path, typer.Argument(help="artifact folder of the model to prune")],
    out: Out,
    sparsity: Annotated[float | None, typer.Option(help="unstructured: fraction of weights set to zero")] = None,
    channels: Annotated[float | None, typer.Option(help="structured: fraction of channels/neurons removed")] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="data to fine-tune on (mnist5k, digits, .npz/.csv)")] = None,
    finetune_epochs: Annotated[int | None, typer.Option(help="total fine-tuning epochs (default 8 with --data)")] = None,
    scope: Annotated[str | None, typer.Option(help="global or layer")] = None,
    schedule: Annotated[str, typer.Option(help="unstructured: agp (gradual) or oneshot")] = "agp",
    steps: Annotated[int | None, typer.Option(help="pruning steps")] = None,
    importance: Annotated[str | None, typer.Option(help="structured: l1, l2 or taylor")] = None,
    round_to: Annotated[int | None, typer.Option(help="structured: keep widths multiples of this")] = None,
    exclude: Annotated[str | None, typer.Option(help="comma-separated module names never pruned (default: output layer)")] = None,
    lr: Annotated[float | None, typer.Option(help="fine-tuning learning rate (default 1e-3, structured 3e-3)")] = None,
    seed: Seed = 0,
    label: Label = "label",
    trust_factory: Annotated[bool, typer.Option(help="allow importing a user factory named in the card")] = False,
):
    """Prune an artifact (magnitude sparsity or whole channels) and save the result."""
    from . import data as datasets
    from .checkpoint import beside
    from .compress.prune import prune as prune_model
    from .measure import counts
    from .models import folder_bytes, load, save
    from .train import evaluate

    model = load(artifact, trust_factory=trust_factory)
    splits = datasets.load(data, seed=seed, label=label) if data is not None else None

    def report_step(info: dict) -> None:  # one line per pruning step, on stderr
        done = f"sparsity {info['sparsity']:.4f}" if "sparsity" in info else f"{info['params']:,} params"
        typer.echo(f"prune step {info['step']}/{info['steps']}: {done}", err=True)

    pruned = prune_model(
        model, sparsity, channels=channels, scope=scope, schedule=schedule, steps=steps, importance=importance,
        round_to=round_to, data=splits, finetune_epochs=finetune_epochs, lr=lr, seed=seed, on_step=report_step,
        checkpoint=beside(out),
        exclude=[e.strip() for e in exclude.split(",") if e.strip()] if exclude is not None else None,
    )
    metrics = {"val": evaluate(pruned, splits.val), "test": evaluate(pruned, splits.test)} if splits else {}
    save(pruned, out, metrics=metrics)
    n = counts(pruned)
    acc = f", test accuracy {metrics['test']['accuracy']:.4f}" if metrics else ""
    typer.echo(f"saved {out}: {n['nonzeros']:,} non-zero of {n['params']:,} params, "
               f"{folder_bytes(out):,} bytes on disk{acc}")


@app.command()
@user_errors
def quantize(
    source: Annotated[Path, typer.Argument(help="artifact folder or .onnx file")],
    scheme: Annotated[str, typer.Option(help="int8-dynamic, int8-static, qat, fp16, bf16, mixed or codebook:N")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output artifact folder, or a .onnx file (onnxruntime)")],
    data: Annotated[str | None, typer.Option("--data", "-d", help="calibration / fine-tuning / validation data "
                                             "(needed by int8-static, qat, mixed); also adds test metrics")] = None,
    backend: Annotated[str, typer.Option(help="auto (the measured default), torch or onnxruntime")] = "auto",
    calibrator: Annotated[str | None, typer.Option(help="int8-static/mixed: minmax, percentile or entropy")] = None,
    max_drop: Annotated[float | None, typer.Option(help="mixed: largest validation accuracy drop, e.g. 0.005")] = None,
    epochs: Annotated[int | None, typer.Option(help="qat / codebook: fine-tuning epochs")] = None,
    format: Annotated[str | None, typer.Option(help="onnxruntime int8-static format: qdq or qoperator")] = None,
    seed: Seed = 0,
    label: Label = "label",
    trust_factory: Annotated[bool, typer.Option(help="allow importing a user factory named in the card")] = False,
):
    """Quantize an artifact or an ONNX file (real int8 kernels, real bytes) and save the result."""
    from . import data as datasets
    from .checkpoint import beside
    from .compress.quantize import quantize_file

    splits = datasets.load(data, seed=seed, label=label) if data else None
    options = {k: v for k, v in {"calibrator": calibrator, "max_drop": max_drop, "epochs": epochs,
                                 "format": format}.items() if v is not None}
    typer.echo(quantize_file(source, scheme, out, splits, backend=backend, trust_factory=trust_factory,
                             checkpoint=beside(out), **options))


@app.command("export")
@user_errors
def export_(
    artifact: Annotated[Path, typer.Argument(help="artifact folder")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the .onnx file to write")],
    format: Annotated[str, typer.Option(help="export format (onnx)")] = "onnx",
    data: Annotated[str | None, typer.Option("--data", "-d", help="data whose validation split checks parity")] = None,
    seed: Seed = 0,
    label: Label = "label",
    trust_factory: Annotated[bool, typer.Option(help="allow importing a user factory named in the card")] = False,
):
    """Export an artifact to one ONNX file, checked for parity with torch."""
    from . import data as datasets
    from .export import export
    from .models import load

    sample = datasets.load(data, seed=seed, label=label).val if data else None
    result = export(load(artifact, trust_factory=trust_factory), format, out, sample=sample)
    parity = result.parity
    detail = (f"; parity on {parity['samples']} inputs: max abs diff {parity['max_abs_diff']:.2e}, "
              f"argmax agreement {parity['argmax_agreement']:.4f}") if parity else ""
    typer.echo(f"wrote {out} ({result.bytes:,} bytes){detail}")


@app.command()
@user_errors
def ensemble(
    artifacts: Annotated[list[Path], typer.Argument(help="member artifact folders")],
    data: Data,
    out: Out,
    method: Annotated[str, typer.Option(help="mean, mean-logits, vote, weighted or stacking")] = "mean",
    refine: Annotated[bool, typer.Option(help="weighted: refine Caruana weights by minimizing validation NLL")] = False,
    meta: Annotated[str, typer.Option(help="stacking meta-learner: linear or mlp")] = "linear",
    seed: Seed = 0,
    label: Label = "label",
    trust_factory: Annotated[bool, typer.Option(help="allow importing a user factory named in a card")] = False,
):
    """Combine trained artifacts into one ensemble artifact (weights learned on the validation split)."""
    from . import data as datasets
    from .fuse.jobs import ensemble_artifacts

    splits = datasets.load(data, seed=seed, label=label)
    typer.echo(ensemble_artifacts(artifacts, splits, out, method=method, refine=refine, meta=meta, seed=seed,
                                  trust_factory=trust_factory))


@app.command("run")
@user_errors
def run_(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML file (see recipes/)")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default: the recipe's "
                                             "'out', else runs/RECIPE)")] = None,
    force: Annotated[bool, typer.Option(help="rerun every step, even those whose cached output is current")] = False,
):
    """Run a recipe's steps; finished steps with unchanged inputs and parameters are skipped."""
    from .pipeline.recipe import run_recipe

    results = run_recipe(recipe, out=out, force=force, log=lambda line: typer.echo(line, err=True))
    ran = sum(r["status"] == "ran" for r in results.values())
    typer.echo(f"{len(results)} steps: {ran} ran, {len(results) - ran} cached")


@app.command()
@user_errors
def optimize(
    artifact: Annotated[Path, typer.Argument(help="artifact folder or .onnx file of the model to compress")],
    data: Data,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder: best/, report.*, search.json")],
    max_drop: Annotated[float, typer.Option(help="largest validation accuracy drop, in points (0.5 = half a point)")] = 0.5,
    objective: Annotated[str, typer.Option(help="latency (batch 1), throughput (batch 256) or bytes")] = "latency",
    budget: Annotated[float, typer.Option(help="time budget of the search, in seconds")] = 300.0,
    ensemble: Annotated[bool, typer.Option(help="also try an ensemble of compressed members")] = True,
    strict: Annotated[bool, typer.Option(help="exit with 1 when no candidate meets --max-drop")] = False,
    seed: Seed = 0,
    label: Label = "label",
    trust_factory: Annotated[bool, typer.Option(help="allow importing a user factory named in the card")] = False,
):
    """Search pruning x quantization x distillation x ensembles for the best model within --max-drop."""
    from . import data as datasets
    from .compress.distill import load_teacher
    from .search import optimize as search

    splits = datasets.load(data, seed=seed, label=label)
    model = load_teacher(artifact, trust_factory=trust_factory)
    result = search(model, splits, max_drop=max_drop, objective=objective, budget_s=budget, ensemble=ensemble,
                    seed=seed, log=lambda line: typer.echo(line, err=True))
    result.save(out)
    typer.echo(result.report.to_markdown(lineage=False))
    typer.echo("Pareto set: " + "; ".join(c.name for c in result.pareto))
    typer.echo(result.message)
    chosen = "best" if result.met else "closest"
    typer.echo(f"wrote {out}/report.md, report.html, search.json" + (f", {chosen}/" if (out / chosen).exists() else ""))
    if strict and not result.met:
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="slimfuse")


if __name__ == "__main__":
    main()
