"""The ``slimfuse`` command line: one thin verb per job, its options generated from the verb's config.

Every option of a verb comes from a field of its typed config (:mod:`slimfuse.configs`): the same
name (``batch_size`` is ``--batch-size``), default, constraint and help text as the library and the
recipe step. A command parses its arguments and makes one call into :mod:`slimfuse.jobs`; nothing
heavier than pydantic is imported before that call, so ``--help`` and usage errors answer at once.

A user error (a usage error, a bad value, a ``SlimfuseError``, an OS failure) prints one line on
stderr and exits with 2; nothing is half-written because the library writes atomically. ``-o``
replaces an existing artifact at that path (never a folder that is not an artifact).
"""

from __future__ import annotations

import errno
import functools
import sys
import types
import typing
from pathlib import Path

import click
from pydantic import ValidationError

from . import configs
from .errors import ConfigError, SlimfuseError

# ---------------------------------------------------------------------------------------------
# Options from config fields


class _Comma(click.ParamType):
    """A comma-separated list: ``300,100`` -> [300, 100]."""

    def __init__(self, item: type):
        self.item, self.name = item, f"{item.__name__}[,{item.__name__}...]"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        parts = [v.strip() for v in str(value).split(",") if v.strip()]
        try:
            return [self.item(v) for v in parts]
        except ValueError:
            self.fail(f"expected comma-separated {self.item.__name__}s, got {value!r}", param, ctx)


class _Pairs(click.ParamType):
    """``KEY=VALUE``, repeatable; gathered into a mapping."""

    name = "KEY=VALUE"

    def convert(self, value, param, ctx):
        key, sep, val = str(value).partition("=")
        if not sep or not key or not val:
            self.fail(f"expected KEY=VALUE, got {value!r}", param, ctx)
        return key, val


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _unwrap(annotation):
    """(base type, optional): strips ``Annotated`` and ``| None``."""
    optional = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(annotation))
            annotation = args[0]
        else:
            return annotation, optional


def _click_type(annotation):
    base, _ = _unwrap(annotation)
    origin = typing.get_origin(base)
    if origin is typing.Literal:
        return click.Choice([str(v) for v in typing.get_args(base)]), False
    if origin is list:
        item, _ = _unwrap(typing.get_args(base)[0])
        return _Comma(item), False
    if origin is dict:
        return _Pairs(), True
    if base is bool:
        return None, False
    return {int: click.INT, float: click.FLOAT, str: click.STRING}[base], False


def constraint_text(schema: dict) -> str:
    """The constraint of a JSON-schema property in words (``>= 1``, ``0 < x < 1``)."""
    if "anyOf" in schema:
        schema = next(s for s in schema["anyOf"] if s.get("type") != "null")
    if schema.get("type") == "array":
        schema = schema.get("items", {})
    low = (">= ", schema["minimum"]) if "minimum" in schema else ("> ", schema.get("exclusiveMinimum"))
    high = ("<= ", schema["maximum"]) if "maximum" in schema else ("< ", schema.get("exclusiveMaximum"))
    parts = [f"{op}{v:g}" for op, v in (low, high) if v is not None]
    return ", ".join(parts)


def _help(cls: type[configs.Config], name: str) -> str:
    info = cls.model_fields[name]
    schema = cls.model_json_schema()["properties"][name]
    text = info.description or ""
    bits = []
    if (c := constraint_text(schema)):
        bits.append(c)
    if not info.is_required() and info.default is not None:
        default = info.default
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        if not (isinstance(default, (list, dict)) and not default):
            bits.append(f"default: {shown}")
    return text + (f" [{'; '.join(bits)}]" if bits else "")


def config_options(cls: type[configs.Config], *, skip=(), short: dict | None = None) -> list[click.Option]:
    """One click option per field of ``cls``. No click default: a field left out keeps the config's."""
    options = []
    for name, info in cls.model_fields.items():
        if name in skip:
            continue
        names = [flag(name), *((short or {}).get(name, ()))]
        kind, multiple = _click_type(info.annotation)
        if kind is None:  # bool: --x/--no-x
            options.append(click.Option([f"{flag(name)}/--no-{name.replace('_', '-')}"], default=None,
                                        help=_help(cls, name)))
        else:
            options.append(click.Option(names, type=kind, multiple=multiple, default=None,
                                        required=info.is_required(), help=_help(cls, name)))
    return options


def build(cls: type[configs.Config], values: dict, extra: dict | None = None):
    """Validate the options of ``cls`` given on the command line into a config (errors name the option)."""
    given = {}
    for name in cls.model_fields:
        v = values.get(name)
        if v is None or (isinstance(v, tuple) and not v):
            continue
        given[name] = dict(v) if isinstance(v, tuple) else v
    try:
        return cls.model_validate({**given, **(extra or {})})
    except ValidationError as e:
        raise ConfigError(configs.describe(e, option=flag)) from None


# ---------------------------------------------------------------------------------------------
# The group: every error is one line, exit 2


class Slimfuse(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            cmd = e.ctx.command_path if e.ctx else "slimfuse"
            click.echo(f"error: {cmd}: {' '.join(e.format_message().split())} (see '{cmd} --help')", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = Slimfuse(name="slimfuse", help="slimfuse: make trained neural networks smaller, faster and better.",
               no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})


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
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:
            if e.errno not in _USER_OS_ERRORS:
                raise
            where = e.filename if e.filename is not None else "(unknown path)"
            why = e.strerror or str(e)
            if e.errno == errno.EEXIST and Path(str(where)).is_file():  # mkdir under a file
                why = "is a file, not a folder (Not a directory)"
            click.echo(f"error: {where}: {why}", err=True)
            sys.exit(2)

    return wrapper


def verb(name: str, *params: click.Parameter, config: type[configs.Config] | None = None, skip=(), short=None):
    """Register ``fn`` as the command ``name`` with ``params`` plus one option per field of ``config``."""

    def deco(fn):
        options = config_options(config, skip=skip, short=short) if config else []
        cmd = click.Command(name, callback=user_errors(fn), params=[*params, *options],
                            help=(fn.__doc__ or "").strip(), short_help=(fn.__doc__ or "").strip().split("\n")[0])
        app.add_command(cmd)
        return fn

    return deco


def _data(required: bool = True, help: str | None = None) -> list[click.Option]:
    cls = configs.DataRef
    return [click.Option(["--data", "-d"], required=required, help=help or cls.model_fields["data"].description),
            click.Option(["--seed"], type=click.INT, default=None, help=_help(cls, "seed")),
            click.Option(["--label"], default=None, help=_help(cls, "label"))]


def _data_ref(kw: dict):
    """The DataRef of the command line, or None without --data."""
    if kw.get("data") is None:
        return None
    return build(configs.DataRef, {k: kw.pop(k, None) for k in ("data", "seed", "label")})


def _out(help: str = "output artifact folder (replaced if it is an artifact)") -> click.Option:
    return click.Option(["--out", "-o"], type=click.Path(path_type=Path), required=True, help=help)


_trust = click.Option(["--trust-factory"], is_flag=True, default=False,
                      help="allow importing a user factory named in a card")


def _artifact(name: str = "artifact", help: str = "artifact folder") -> click.Argument:
    return click.Argument([name], type=click.Path(path_type=Path))


# ---------------------------------------------------------------------------------------------
# Verbs: argument parsing plus one call


@verb("train", *_data(), _out(), config=configs.Train)
def train(**kw):
    """Train a zoo model (or, with --members, an ensemble) and save it as an artifact."""
    cfg, data = build(configs.Train, kw), _data_ref(kw)
    from . import jobs

    click.echo(jobs.train(cfg, data, kw["out"]).message)


@verb("eval", _artifact(), *_data(), _trust,
      click.Option(["--json", "json_out"], type=click.Path(path_type=Path), help="also write the report as JSON here"),
      config=configs.Measure)
def eval_(**kw):
    """Measure an artifact: accuracy, bytes, parameters, MACs, latency."""
    cfg, data = build(configs.Measure, kw), _data_ref(kw)
    from . import jobs

    click.echo(jobs.evaluate(kw["artifact"], cfg, data, json_out=kw["json_out"],
                             trust_factory=kw["trust_factory"]).message)


@verb("info", click.Argument(["artifact"], required=False, type=click.Path(path_type=Path)),
      click.Option(["--hardware"], is_flag=True, default=False, help="show this machine's CPU features and kernels"))
def info(artifact, hardware):
    """Show an artifact's card: spec, task, lineage, storage, metrics, bytes (or --hardware: this machine)."""
    if artifact is None and not hardware:
        raise ConfigError("info needs an artifact folder (or --hardware)")
    from . import jobs

    click.echo(jobs.info(artifact, hardware=hardware).message)


@verb("demo", click.Option(["--out", "-o"], type=click.Path(path_type=Path),
                           help="output folder (default runs/demo[-SCENARIO])"),
      click.Option(["--scenario"], default="mnist", show_default=True,
                   help="mnist (image classification), vision (a ResNet through the whole chain), nlp "
                        "(sentence embeddings) or recsys (recommenders)"),
      click.Option(["--seed"], type=click.INT, default=0, show_default=True, help="random seed"))
def demo(out, scenario, seed):
    """Run the main job (default: mnist5k) and write report.md, report.html and report.json."""
    from .pipeline.scenarios import run_scenario

    report, out = run_scenario(scenario, out, seed=seed)
    click.echo(report.to_markdown())
    click.echo(f"wrote {out}/report.md, report.html and report.json")


@verb("distill",
      click.Option(["--teacher"], type=click.Path(path_type=Path), required=True,
                   help="teacher artifact folder (a model or an ensemble) or .onnx file"),
      click.Option(["--student"], required=True,
                   help="mlp:128, mlp:256,128, lenet5:3,8,60,42, cnn:8,16[:32], resnet:8,16,32 "
                        "or width=0.25[,depth=1]"),
      *_data(), _out(), _trust, config=configs.Distill)
def distill(**kw):
    """Distill a teacher into a smaller student and save the student as an artifact."""
    student, cfg, data = configs.check_student(kw["student"]), build(configs.Distill, kw), _data_ref(kw)
    from . import jobs

    click.echo(jobs.distill(kw["teacher"], student, cfg, data, kw["out"], trust_factory=kw["trust_factory"]).message)


@verb("prune", _artifact(), _out(), *_data(required=False, help="data to fine-tune on (mnist5k, digits, .npz/.csv)"),
      _trust, config=configs.Prune)
def prune(**kw):
    """Prune an artifact (magnitude sparsity or whole channels) and save the result."""
    cfg, data = build(configs.Prune, kw), _data_ref(kw)
    from . import jobs

    def report_step(info: dict) -> None:  # one line per pruning step, on stderr
        done = f"sparsity {info['sparsity']:.4f}" if "sparsity" in info else f"{info['params']:,} params"
        click.echo(f"prune step {info['step']}/{info['steps']}: {done}", err=True)

    click.echo(jobs.prune(kw["artifact"], cfg, data, kw["out"], on_step=report_step,
                          trust_factory=kw["trust_factory"]).message)


@verb("quantize", click.Argument(["source"], type=click.Path(path_type=Path)),
      _out("output artifact folder, or a .onnx file (onnxruntime)"),
      *_data(required=False, help="calibration / fine-tuning / validation data (needed by int8-static, qat, "
                                  "mixed); also adds test metrics"), _trust, config=configs.Quantize)
def quantize(**kw):
    """Quantize an artifact or an ONNX file (real int8 kernels, real bytes) and save the result."""
    cfg, data = build(configs.Quantize, kw), _data_ref(kw)
    from . import jobs

    click.echo(jobs.quantize(kw["source"], cfg, data, kw["out"],
                             trust_factory=kw["trust_factory"]).message)


@verb("export", _artifact(), _out("the .onnx file to write"),
      *_data(required=False, help="data whose validation split checks parity"), _trust, config=configs.Export)
def export_(**kw):
    """Export an artifact to one ONNX file, checked for parity with torch."""
    cfg, data = build(configs.Export, kw), _data_ref(kw)
    from . import jobs

    click.echo(jobs.export(kw["artifact"], cfg, kw["out"], data,
                           trust_factory=kw["trust_factory"]).message)


@verb("ensemble", click.Argument(["artifacts"], nargs=-1, required=True, type=click.Path(path_type=Path)),
      *_data(), _out(), _trust, config=configs.Ensemble)
def ensemble(**kw):
    """Combine trained artifacts into one ensemble artifact (weights learned on the validation split)."""
    cfg, data = build(configs.Ensemble, kw), _data_ref(kw)
    from . import jobs

    click.echo(jobs.ensemble(list(kw["artifacts"]), cfg, data, kw["out"],
                             trust_factory=kw["trust_factory"]).message)


@verb("merge", click.Argument(["artifacts"], nargs=-1, required=True, type=click.Path(path_type=Path)),
      _out(), click.Option(["--base"], type=click.Path(path_type=Path),
                           help="artifact the members were fine-tuned from (task-vector methods)"),
      *_data(required=False, help="data to choose coefficients, align, repair and verify on"), _trust,
      config=configs.Merge)
def merge(**kw):
    """Merge trained artifacts into one model of their architecture, checked against the best member and the
    ensemble."""
    cfg, data = build(configs.Merge, kw), _data_ref(kw)
    from . import jobs

    click.echo(jobs.merge(list(kw["artifacts"]), cfg, data, kw["out"], base=kw["base"],
                          trust_factory=kw["trust_factory"]).message)


@verb("run", click.Argument(["recipe"], type=click.Path(path_type=Path)),
      click.Option(["--out", "-o"], type=click.Path(path_type=Path),
                   help="output folder (default: the recipe's 'out', else runs/RECIPE)"),
      click.Option(["--force"], is_flag=True, default=False,
                   help="rerun every step, even those whose cached output is current"))
def run_(recipe, out, force):
    """Run a recipe's steps; finished steps with unchanged inputs and parameters are skipped."""
    from .pipeline.recipe import run_recipe

    results = run_recipe(recipe, out=out, force=force, log=lambda line: click.echo(line, err=True))
    ran = sum(r["status"] == "ran" for r in results.values())
    click.echo(f"{len(results)} steps: {ran} ran, {len(results) - ran} cached")


@verb("optimize", _artifact(help="artifact folder or .onnx file of the model to compress"), *_data(),
      _out("output folder: best/, report.*, search.json"), _trust,
      click.Option(["--strict"], is_flag=True, default=False, help="exit with 1 when no candidate meets --max-drop"),
      config=configs.Optimize)
def optimize(**kw):
    """Search pruning x quantization x distillation x ensembles for the best model within --max-drop."""
    cfg, data = build(configs.Optimize, kw), _data_ref(kw)
    from . import jobs

    done = jobs.optimize(kw["artifact"], cfg, data, kw["out"],
                         trust_factory=kw["trust_factory"], log=lambda line: click.echo(line, err=True))
    click.echo(done.message)
    if kw["strict"] and not done.met:
        sys.exit(1)


def main() -> None:
    app(prog_name="slimfuse")


if __name__ == "__main__":
    main()
