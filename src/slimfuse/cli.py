"""The ``slimfuse`` command line: one thin verb per library call.

A user error (``SlimfuseError``) prints one line on stderr and exits with 2;
nothing is half-written because the library writes atomically.
"""

from __future__ import annotations

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


def user_errors(fn):
    """Turn a SlimfuseError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SlimfuseError as e:
            typer.echo(f"error: {e}", err=True)
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
                                 batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed)
    else:
        net = zoo.for_task(model, splits.task, **kwargs)
        trained = fit(net, splits, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                      patience=patience, seed=seed)
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
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("runs/demo"),
    seed: Seed = 0,
):
    """Run the main job on mnist5k and write report.md / report.json."""
    from .pipeline.demo import run

    report = run(out, seed=seed)
    typer.echo(report.to_markdown())
    typer.echo(f"wrote {out / 'report.md'} and {out / 'report.json'}")


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


def main() -> None:
    app(prog_name="slimfuse")


if __name__ == "__main__":
    main()
