"""One schema per verb: every config field has the same name, default and constraint in the library,
the CLI (``--help`` and the values it refuses) and the recipe step schema."""

import inspect
import math
import typing

import pytest
import torch
from click.testing import CliRunner

import slimfuse as sf
from slimfuse import configs
from slimfuse.cli import app, constraint_text, flag
from slimfuse.compress import quantize as _registers_schemes  # noqa: F401
from slimfuse.compress.schemes import SCHEMES
from slimfuse.pipeline import recipe

# verb -> the library functions whose keyword parameters are that config's fields
LIBRARY = {
    "train": [sf.fit],
    "prune": [sf.prune],
    "quantize": [sf.quantize, *sorted(set(SCHEMES.values()), key=lambda f: f.__module__ + f.__qualname__)],
    "distill": [sf.distill],
    "ensemble": [sf.ensemble],
    "export": [sf.export],
    "measure": [sf.measure],
    "optimize": [sf.optimize],
    "merge": [sf.merge],
}
# fields a verb's config has that are not parameters of its library function, and why
NOT_IN_LIBRARY = {
    "train": {"model", "hidden", "widths", "members", "diversity", "combine"},  # what to build: zoo + members
    "quantize": {"scheme", "backend"},  # quantize()'s own arguments, not a scheme's options
    "measure": {"split"},  # measure() takes the split itself
}
STEP = {cls.model_fields["step"].annotation.__args__[0]: cls for cls in recipe.STEPS}
CLI = {"measure": "eval"}  # the verb's CLI command when it is named otherwise


def _fields():
    for verb, cls in configs.VERBS.items():
        for name, info in cls.model_fields.items():
            yield verb, cls, name, info


FIELDS = list(_fields())
IDS = [f"{v}.{n}" for v, _, n, _ in FIELDS]


def _same(library, config) -> bool:
    if library is None:  # "not given": fit's schedule=None is the config's "none", distill's hints=None is {}
        return config in ("none", {}, [])
    return list(library) == list(config) if isinstance(library, (list, tuple)) else library == config


def _signature_params(fn):
    return inspect.signature(inspect.unwrap(fn)).parameters


@pytest.mark.parametrize("verb, cls, name, info", FIELDS, ids=IDS)
def test_library_default_is_the_config_default(verb, cls, name, info):
    if name in NOT_IN_LIBRARY.get(verb, ()):
        return
    functions = LIBRARY[verb]
    having = [fn for fn in functions if name in _signature_params(fn)]
    if verb == "distill" and name in ("optimizer", "schedule"):
        having = [sf.fit]  # distill passes them on to fit
    assert having, f"{verb}: no library function takes {name!r}"
    for fn in having:
        param = _signature_params(fn)[name]
        if param.default is inspect.Parameter.empty and param.kind is param.POSITIONAL_OR_KEYWORD:
            continue  # a positional argument every call gives (export's format)
        default = param.default
        if info.default is None:  # None: the function's own default, stated in the field's help
            assert "default" in (info.description or "") or default in (None, inspect.Parameter.empty), (fn, name)
        else:
            assert _same(default, info.default), f"{fn.__qualname__}({name}={default!r}) vs config {info.default!r}"


def _command(verb: str):
    return app.commands[CLI.get(verb, verb)]


@pytest.mark.parametrize("verb, cls, name, info", FIELDS, ids=IDS)
def test_cli_option_has_the_field_name_choices_default_and_bound(verb, cls, name, info):
    options = {p.name: p for p in _command(verb).params}
    assert name in options, f"slimfuse {CLI.get(verb, verb)} has no {flag(name)}"
    opt = options[name]
    assert flag(name) in opt.opts
    base = typing.get_args(info.annotation)[0] if typing.get_origin(info.annotation) is typing.Union \
        else info.annotation
    if typing.get_origin(base) is typing.Literal:
        assert list(opt.type.choices) == [str(v) for v in typing.get_args(base)]
    schema = cls.model_json_schema()["properties"][name]
    if (bound := constraint_text(schema)):
        assert bound in opt.help
    if not info.is_required() and info.default not in (None, [], {}):
        shown = ",".join(map(str, info.default)) if isinstance(info.default, list) else str(info.default)
        assert f"default: {shown}" in opt.help


@pytest.mark.parametrize("verb", list(configs.VERBS))
def test_recipe_step_schema_is_the_config_schema(verb):
    cls, step = configs.VERBS[verb], STEP[verb]
    for name in cls.model_fields:
        assert step.model_fields[name].default == cls.model_fields[name].default
    props, step_props = cls.model_json_schema()["properties"], step.model_json_schema()["properties"]
    for name, schema in props.items():
        assert step_props[name] == schema, name


def _violations(schema: dict):
    """Values just outside a numeric field's bounds."""
    if "anyOf" in schema:
        schema = next(s for s in schema["anyOf"] if s.get("type") != "null")
    if schema.get("type") not in ("integer", "number"):
        return []
    out = []
    step = 1 if schema["type"] == "integer" else 1e-9
    if "minimum" in schema:
        out.append(schema["minimum"] - step)
    if "exclusiveMinimum" in schema:
        out.append(schema["exclusiveMinimum"])
    if "maximum" in schema:
        out.append(schema["maximum"] + step if schema["type"] == "integer" else schema["maximum"] * 2 + 1)
    if "exclusiveMaximum" in schema:
        out.append(schema["exclusiveMaximum"])
    if schema["type"] == "number":
        out.append(math.inf)
    return out


BOUNDED = [(v, c, n, bad) for v, c, n, _ in FIELDS for bad in _violations(c.model_json_schema()["properties"][n])]


@pytest.mark.parametrize("verb, cls, name, bad", BOUNDED, ids=[f"{v}.{n}={b}" for v, _, n, b in BOUNDED])
def test_a_value_out_of_bounds_is_refused_by_config_cli_and_recipe(tmp_path, verb, cls, name, bad):
    required = {"scheme": "int8-dynamic"} if verb == "quantize" else {}
    kind = {"prune": {"sparsity": 0.5}}.get(verb, {}) if name not in ("sparsity", "channels") else {}
    with pytest.raises(sf.ConfigError, match=f"'{name}'"):
        cls.build(**required, **kind, **{name: bad})
    # the CLI names the option, before touching any file
    args = [CLI.get(verb, verb)]
    args += {"train": ["-d", "digits", "-o", tmp_path / "o"], "prune": [tmp_path / "a", "-o", tmp_path / "o"],
             "quantize": [tmp_path / "a", "--scheme", "int8-dynamic", "-o", tmp_path / "o"],
             "distill": ["--teacher", tmp_path / "a", "--student", "mlp:8", "-d", "digits", "-o", tmp_path / "o"],
             "ensemble": [tmp_path / "a", tmp_path / "b", "-d", "digits", "-o", tmp_path / "o"],
             "export": [tmp_path / "a", "-o", tmp_path / "o.onnx"], "measure": [tmp_path / "a", "-d", "digits"],
             "optimize": [tmp_path / "a", "-d", "digits", "-o", tmp_path / "o"],
             "merge": [tmp_path / "a", tmp_path / "b", "-o", tmp_path / "o"]}[verb]
    if verb == "prune" and name not in ("sparsity", "channels"):
        args += ["--sparsity", "0.5"]
    result = CliRunner().invoke(app, [str(a) for a in args] + [flag(name), str(bad)])
    assert result.exit_code == 2 and flag(name) in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_every_scheme_registered_is_a_config_scheme():
    assert {name for name, _ in SCHEMES} == set(configs.SCHEME_NAMES)


def test_scheme_options_are_config_fields():
    """A scheme implementation's options are config fields (or run-time arguments the job passes)."""
    runtime = {"model", "arg", "calib", "checkpoint", "progress", "seed", "sample", "data", "unknown"}
    fields = set(configs.Quantize.model_fields)
    for (scheme, backend), fn in SCHEMES.items():
        extra = set(_signature_params(fn)) - fields - runtime
        assert not extra, f"{scheme} ({backend}) takes {sorted(extra)}, which configs.Quantize does not declare"


def test_library_refuses_what_the_config_refuses(digits_mlp, digits):
    """The library verbs validate through the same configs: same words as the CLI and recipes."""
    with pytest.raises(sf.ConfigError, match="'sparsity'"):
        sf.prune(digits_mlp, sparsity=1.5)
    with pytest.raises(sf.ConfigError, match="'samples'"):
        sf.quantize(digits_mlp, "int8-static", calib=digits, samples=0)
    with pytest.raises(sf.ConfigError, match="'temperature'"):
        sf.distill(digits_mlp, sf.zoo.mlp(64, [8], 10), digits, temperature=math.inf)
    with pytest.raises(sf.ConfigError, match="'rounds'"):
        sf.ensemble([digits_mlp, digits_mlp], "weighted", digits, rounds=0)
    with pytest.raises(sf.ConfigError, match="'max_drop'"):
        sf.optimize(digits_mlp, digits, max_drop=-1)
    with pytest.raises(sf.ConfigError, match="'threads'"):
        sf.measure(digits_mlp, digits.test, threads=0)
    with pytest.raises(sf.ConfigError, match="'epochs'"):
        sf.fit(digits_mlp, digits, epochs=0)
    with pytest.raises(sf.ConfigError, match="'optimizer'"):
        sf.fit(digits_mlp, digits, optimizer="adamw")


def test_max_drop_is_in_points_everywhere():
    for cls in (configs.Quantize, configs.Optimize):
        assert "points" in cls.model_fields["max_drop"].description
    assert inspect.signature(sf.nlp.mixed).parameters["max_drop"].default == 0.5 if _has_nlp() else True


def _has_nlp() -> bool:
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    return True


BAD_RECIPES = {
    "adamw": ({"name": "t2", "step": "train", "hidden": [8], "epochs": 1, "optimizer": "adamw"}, "'optimizer'"),
    "constant schedule": ({"name": "t2", "step": "train", "hidden": [8], "epochs": 1, "schedule": "constant"},
                          "'schedule'"),
    "old name finetune_epochs": ({"name": "p", "step": "prune", "input": "t", "sparsity": 0.5,
                                  "finetune_epochs": 1}, "'finetune_epochs': unknown field"),
    "codebook:abc": ({"name": "q", "step": "quantize", "input": "t", "scheme": "codebook:abc"}, "codebook"),
    "temperature inf": ({"name": "d", "step": "distill", "teacher": "t", "student": "mlp:8",
                         "temperature": math.inf}, "'temperature'"),
    "bad student": ({"name": "d", "step": "distill", "teacher": "t", "student": "mlp:abc"}, "student"),
    "combine without members": ({"name": "t2", "step": "train", "hidden": [8], "combine": "vote"}, "members > 1"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_later_step_is_refused_before_the_first_step_runs(tmp_path, case):
    import yaml

    step, message = BAD_RECIPES[case]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": "digits", "steps": [
        {"name": "t", "step": "train", "hidden": [8], "epochs": 1}, step]}))
    with pytest.raises(sf.ConfigError, match=message):
        recipe.run_recipe(path, out=tmp_path / "out", log=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_cli_and_recipe_run_the_same_job(tmp_path):
    """A train step and `slimfuse train` with the same fields write bit-identical weights."""
    import yaml

    cli = CliRunner().invoke(app, ["train", "-d", "digits", "--hidden", "16", "--epochs", "2", "--schedule",
                                   "cosine", "-o", str(tmp_path / "cli")])
    assert cli.exit_code == 0, cli.output
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": "digits", "steps": [
        {"name": "t", "step": "train", "hidden": [16], "epochs": 2, "schedule": "cosine"}]}))
    recipe.run_recipe(path, out=tmp_path / "run", log=lambda line: None)
    assert (tmp_path / "cli" / "weights.safetensors").read_bytes() == \
        (tmp_path / "run" / "t" / "weights.safetensors").read_bytes()
    assert torch.equal(sf.predict(sf.load(tmp_path / "cli"), torch.zeros(2, 1, 8, 8)),
                       sf.predict(sf.load(tmp_path / "run" / "t"), torch.zeros(2, 1, 8, 8)))


def test_a_config_object_is_the_same_call_as_its_keywords(digits_mlp, digits):
    """The string and keyword forms are shorthands for the configs: both give bit-identical models."""
    x = digits.test.x[:32]
    a = sf.quantize(digits_mlp, configs.Quantize(scheme="int8-dynamic", backend="torch"))
    b = sf.quantize(digits_mlp, "int8-dynamic", backend="torch")
    assert torch.equal(sf.predict(a, x), sf.predict(b, x))
    a = sf.prune(digits_mlp, configs.Prune(sparsity=0.5, schedule="oneshot", epochs=0))
    b = sf.prune(digits_mlp, sparsity=0.5, schedule="oneshot", epochs=0)
    assert torch.equal(sf.predict(a, x), sf.predict(b, x))
    members = [digits_mlp, sf.prune(digits_mlp, sparsity=0.7, schedule="oneshot", epochs=0)]
    a = sf.ensemble(members, configs.Ensemble(method="mean"), digits)
    assert torch.equal(sf.predict(a, x), sf.predict(sf.ensemble(members, "mean", digits), x))
    student = sf.zoo.mlp(64, [8], 10)
    a = sf.distill(digits_mlp, student, digits, config=configs.Distill(epochs=1, temperature=2.0), progress=False)
    b = sf.distill(digits_mlp, student, digits, epochs=1, temperature=2.0, progress=False)
    assert torch.equal(sf.predict(a, x), sf.predict(b, x))
