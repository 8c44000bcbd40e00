"""The model zoo: small architectures whose every width is a spec argument.

Every width is an argument so that a structurally pruned model, whose layers
have shrunk, is rebuilt from its spec alone. Other packages (compression,
ensembles) register their own architectures with :func:`register`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import ArtifactError, ConfigError, SlimfuseError
from ..limits import check_bytes
from .spec import attach, spec_of

MAX_PARAMS = 10**9  # no zoo model, and no model read from a card, may have more parameters

ARCHS: dict[str, Callable[..., nn.Module]] = {}
# Architectures registered by modules of higher layers, imported by name when a spec needs one: a plugin
# table, not an import (the layer rule holds; tests/test_layers.py checks it names every registration).
PROVIDERS = {
    "onnx": "slimfuse.runtime", "pruned": "slimfuse.models.shrunk", "quantized": "slimfuse.compress.quant_torch",
    "ensemble": "slimfuse.fuse.combine", "minilm": "slimfuse.nlp.minilm", "mf": "slimfuse.recsys.models",
    "two-tower": "slimfuse.recsys.models", "qtables": "slimfuse.recsys.compress",
    "rec-ensemble": "slimfuse.recsys.ensemble", "half": "slimfuse.compress.quant_torch",
    "sparse-kernels": "slimfuse.compress.sparse_kernel", "hf": "slimfuse.models.hf", "keras": "slimfuse.models.keras",
}
# Trust given to the outermost build() holds for the specs an architecture builds inside it
# (e.g. a pruned or ensembled user model whose args hold the base spec).
_TRUST_FACTORY = contextvars.ContextVar("slimfuse_trust_factory", default=False)
# Set while a spec is built on the meta device to size it: a builder's own exceptions then stay
# what they are, so one that cannot run on meta tensors is told apart from a bad card.
_PROBING = contextvars.ContextVar("slimfuse_probing", default=False)


@contextlib.contextmanager
def probing():
    token = _PROBING.set(True)
    try:
        yield
    finally:
        _PROBING.reset(token)


def register(name: str):
    """Decorator: make ``fn(**args) -> nn.Module`` buildable from ``{"arch": name, "args": args}``."""

    def deco(fn):
        ARCHS[name] = fn
        return fn

    return deco


def known(arch: str) -> bool:
    """Whether ``arch`` can be built (importing the module that registers it, if a provider names it)."""
    if arch not in ARCHS and arch in PROVIDERS:
        importlib.import_module(PROVIDERS[arch])
    return arch in ARCHS


def _check_widths(name: str, widths: Sequence[int]) -> list[int]:
    out = []
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ConfigError(f"{name}: widths must be positive integers, got {list(widths)}")
        out.append(int(w))
    return out


def check_params(name: str, count: int) -> None:
    """Refuse, before anything is allocated, a model of ``count`` float32 parameters that is
    implausibly large or would not fit the memory budget (``SLIMFUSE_MAX_BYTES``)."""
    if count > MAX_PARAMS:
        raise ConfigError(f"{name}: {count:,} parameters is over the limit of {MAX_PARAMS:,}")
    check_bytes(4 * count, f"{name} with {count:,} parameters", ConfigError)


@register("mlp")
def mlp(in_features: int, hidden: Sequence[int], classes: int, dropout: float = 0.0) -> nn.Module:
    """Fully connected net; ``mlp(784, [300, 100], 10)`` is LeNet-300-100. Flattens its input."""
    in_features, classes = _check_widths("mlp", [in_features, classes])
    hidden = _check_widths("mlp", list(hidden))
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"mlp: dropout must be in [0, 1), got {dropout}")
    dims = [in_features, *hidden, classes]
    check_params("mlp", sum((a + 1) * b for a, b in zip(dims, dims[1:])))
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = in_features
    for i, h in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(width, h)
        layers[f"relu{i}"] = nn.ReLU()
        if dropout:
            layers[f"drop{i}"] = nn.Dropout(dropout)
        width = h
    layers["out"] = nn.Linear(width, classes)
    args = {"in_features": in_features, "hidden": hidden, "classes": classes, "dropout": dropout}
    return attach(nn.Sequential(layers), {"arch": "mlp", "args": args})


@register("lenet5")
def lenet5(
    classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    widths: Sequence[int] = (6, 16, 120, 84),
) -> nn.Module:
    """LeNet-5 (two 5x5 conv + pool stages, three linear layers) for square images >= 12 px."""
    widths = _check_widths("lenet5", list(widths))
    if len(widths) != 4:
        raise ConfigError(f"lenet5: widths must be 4 integers (conv1, conv2, fc1, fc2), got {widths}")
    c1, c2, f1, f2 = widths
    side = (image_size // 2 - 4) // 2  # conv1 keeps size (padding 2), pool, conv2 (-4), pool
    if side < 1:
        raise ConfigError(f"lenet5 needs images of at least 12x12 pixels, got {image_size}x{image_size}")
    (classes, in_channels) = _check_widths("lenet5", [classes, in_channels])
    check_params("lenet5", (in_channels * 25 + 1) * c1 + (c1 * 25 + 1) * c2 + (c2 * side * side + 1) * f1
                 + (f1 + 1) * f2 + (f2 + 1) * classes)
    layers = OrderedDict(
        conv1=nn.Conv2d(in_channels, c1, 5, padding=2),
        relu1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(c1, c2, 5),
        relu2=nn.ReLU(),
        pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
        fc1=nn.Linear(c2 * side * side, f1),
        relu3=nn.ReLU(),
        fc2=nn.Linear(f1, f2),
        relu4=nn.ReLU(),
        out=nn.Linear(f2, classes),
    )
    args = {"classes": classes, "in_channels": in_channels, "image_size": image_size, "widths": [c1, c2, f1, f2]}
    return attach(nn.Sequential(layers), {"arch": "lenet5", "args": args})


@register("cnn")
def cnn(
    classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    widths: Sequence[int] = (16, 32),
    hidden: int = 64,
) -> nn.Module:
    """Small CNN: per width a 3x3 conv, BatchNorm, ReLU and 2x2 max-pool; then two linear layers."""
    widths = _check_widths("cnn", list(widths))
    (hidden,) = _check_widths("cnn", [hidden])
    (classes, in_channels, image_size) = _check_widths("cnn", [classes, in_channels, image_size])
    chans = [in_channels, *widths]
    out_side = image_size // 2 ** len(widths)
    check_params("cnn", sum(9 * a * b + 2 * b for a, b in zip(chans, chans[1:]))
                 + (chans[-1] * out_side * out_side + 1) * hidden + (hidden + 1) * classes)
    side = image_size
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    cin = in_channels
    for i, w in enumerate(widths, start=1):
        layers[f"conv{i}"] = nn.Conv2d(cin, w, 3, padding=1, bias=False)
        layers[f"bn{i}"] = nn.BatchNorm2d(w)
        layers[f"relu{i}"] = nn.ReLU()
        layers[f"pool{i}"] = nn.MaxPool2d(2)
        side //= 2
        cin = w
    if side < 1:
        raise ConfigError(f"cnn: {len(widths)} pooling stages need images of at least {2 ** len(widths)} px")
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(cin * side * side, hidden)
    layers["relu_fc"] = nn.ReLU()
    layers["out"] = nn.Linear(hidden, classes)
    args = {"classes": classes, "in_channels": in_channels, "image_size": image_size, "widths": widths,
            "hidden": hidden}
    return attach(nn.Sequential(layers), {"arch": "cnn", "args": args})


class Residual(nn.Module):
    """A basic ResNet block: ``relu(body(x) + shortcut(x))``.

    ``body`` is conv3x3-BN-ReLU-conv3x3-BN (an ``nn.Sequential``, so int8 quantization folds each
    BatchNorm into its conv and passes uint8 between them); ``shortcut`` is the identity, or a
    strided 1x1 conv + BN where the block changes the resolution or the width.
    """

    def __init__(self, in_channels: int, inner: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(in_channels, inner, 3, stride=stride, padding=1, bias=False),
            bn1=nn.BatchNorm2d(inner),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(inner, out_channels, 3, padding=1, bias=False),
            bn2=nn.BatchNorm2d(out_channels),
        ))
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                bn=nn.BatchNorm2d(out_channels),
            ))
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def _residual_params(cin: int, inner: int, cout: int, projection: bool) -> int:
    return 9 * cin * inner + 2 * inner + 9 * inner * cout + 2 * cout + (cin * cout + 2 * cout) * projection


@register("resnet")
def resnet(
    classes: int = 10,
    in_channels: int = 1,
    widths: Sequence[int] = (16, 32, 64),
    blocks: Sequence[int] | None = None,
    inner: Sequence[int] | None = None,
) -> nn.Module:
    """A small ResNet (He et al. 2016, basic blocks) for images of any size: a 3x3 conv stem,
    one stage per width (``blocks[i]`` residual blocks each, default 1; every stage after the
    first halves the resolution), global average pooling and a linear output layer.
    ``resnet(widths=[16, 32, 64])`` is ResNet-8; ``blocks=[3, 3, 3]`` ResNet-20.

    ``widths`` are the residual streams (the stem feeds the first); ``inner`` the width inside
    each block (one per block, in order; default: its stage's width). Channel pruning shrinks
    both, and the pruned model's spec is this architecture with the new widths.
    """
    widths = _check_widths("resnet", list(widths))
    blocks = _check_widths("resnet", list(blocks) if blocks is not None else [1] * len(widths))
    if len(blocks) != len(widths):
        raise ConfigError(f"resnet: blocks gives {len(blocks)} stages but widths {len(widths)}; one count per width")
    n_blocks = sum(blocks)
    if n_blocks > 1000:
        raise ConfigError(f"resnet: {n_blocks} residual blocks is over the limit of 1,000")
    stage_of = [s for s, b in enumerate(blocks) for _ in range(b)]
    inner = _check_widths("resnet", list(inner)) if inner is not None else [widths[s] for s in stage_of]
    if len(inner) != n_blocks:
        raise ConfigError(f"resnet: inner gives {len(inner)} widths for {n_blocks} blocks; one per block")
    (classes, in_channels) = _check_widths("resnet", [classes, in_channels])
    plan, cin = [], widths[0]
    for k, s in enumerate(stage_of):
        first = k == 0 or stage_of[k - 1] != s
        stride = 2 if first and s > 0 else 1
        plan.append((f"stage{s + 1}_{k - stage_of.index(s) + 1}", cin, inner[k], widths[s], stride))
        cin = widths[s]
    check_params("resnet", 9 * in_channels * widths[0] + 2 * widths[0] + (widths[-1] + 1) * classes
                 + sum(_residual_params(a, i, b, st != 1 or a != b) for _, a, i, b, st in plan))
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
        bn1=nn.BatchNorm2d(widths[0]),
        relu1=nn.ReLU(),
    )
    for name, a, i, b, stride in plan:
        layers[name] = Residual(a, i, b, stride)
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["out"] = nn.Linear(widths[-1], classes)
    args = {"classes": classes, "in_channels": in_channels, "widths": widths, "blocks": blocks, "inner": inner}
    return attach(nn.Sequential(layers), {"arch": "resnet", "args": args})


def for_task(arch: str, task, **kwargs) -> nn.Module:
    """Build zoo model ``arch`` sized for ``task`` (input shape and class count)."""
    shape = tuple(task.input_shape)
    if arch == "mlp":
        kwargs.setdefault("hidden", [300, 100])
        return mlp(math.prod(shape), classes=task.num_classes, **kwargs)
    if arch in ("lenet5", "cnn"):
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ConfigError(f"{arch} needs square images (channels, side, side); data has shape {shape}")
        return ARCHS[arch](classes=task.num_classes, in_channels=shape[0], image_size=shape[1], **kwargs)
    if arch == "resnet":
        if len(shape) != 3:
            raise ConfigError(f"resnet needs images (channels, height, width); data has shape {shape}")
        return resnet(classes=task.num_classes, in_channels=shape[0], **kwargs)
    raise ConfigError(f"unknown model {arch!r}; choose one of: mlp, lenet5, cnn, resnet")


def student(teacher: nn.Module | dict, width: float = 0.25, depth: int | None = None, *,
            example_inputs: torch.Tensor | None = None) -> nn.Module:
    """A narrower/shallower, untrained model shaped after ``teacher`` (a module, or a zoo spec).

    Every hidden width is scaled by ``width`` (rounded, at least 1); ``depth`` keeps the first
    ``depth`` hidden layers of an ``mlp``, conv stages of a ``cnn`` or stages of a ``resnet``
    (``lenet5`` has a fixed depth).
    Dropout is not carried over. Inputs and classes are the teacher's.

    Any other module is copied, re-initialised and narrowed at initialisation by structured
    pruning (Torch-Pruning: ``1 - width`` of each prunable layer's neurons/channels removed, the
    output layer kept; ``depth`` does not apply). ``example_inputs`` traces it (default: zeros
    shaped like the teacher's task input).
    """
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 1:
        raise ConfigError(f"student width must be a fraction in (0, 1], got {width!r}")
    spec = teacher if isinstance(teacher, dict) else spec_of(teacher)
    arch = (spec or {}).get("arch")
    if arch not in ("mlp", "lenet5", "cnn", "resnet"):
        if isinstance(teacher, dict):
            raise ConfigError(f"zoo.student builds students of mlp, lenet5, cnn and resnet specs, not {arch!r}; "
                              "pass the module itself to narrow any other model")
        if depth is not None:
            raise ConfigError("depth= applies to zoo mlp, cnn and resnet teachers; other models are only narrowed "
                              "(width=)")
        from .shrunk import student_of

        return student_of(teacher, float(width), example_inputs=example_inputs)
    args = dict(spec["args"])
    if arch == "resnet":
        return _resnet_student(args, width, depth)
    key = {"mlp": "hidden", "lenet5": "widths", "cnn": "widths"}[arch]
    layers = list(args[key])
    if depth is not None:
        if arch == "lenet5":
            raise ConfigError("lenet5 has a fixed depth; give a width only, or use an mlp/cnn student")
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= len(layers):
            raise ConfigError(f"student depth must be an integer in 1..{len(layers)} for this {arch}, got {depth!r}")
        layers = layers[:depth]
    args[key] = [max(1, round(w * width)) for w in layers]
    if arch == "cnn":
        args["hidden"] = max(1, round(args["hidden"] * width))
    if arch == "mlp":
        args["dropout"] = 0.0
    return ARCHS[arch](**args)


def _resnet_student(args: dict, width: float, depth: int | None) -> nn.Module:
    """A resnet student: every stage and inner width scaled, the first ``depth`` stages kept."""
    widths = list(args["widths"])
    blocks = list(args.get("blocks") or [1] * len(widths))
    inner = list(args.get("inner") or [widths[s] for s, b in enumerate(blocks) for _ in range(b)])
    if depth is not None:
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= len(widths):
            raise ConfigError(f"student depth must be an integer in 1..{len(widths)} for this resnet, got {depth!r}")
        inner, widths, blocks = inner[:sum(blocks[:depth])], widths[:depth], blocks[:depth]

    def scaled(ws):
        return [max(1, round(w * width)) for w in ws]

    return resnet(classes=args["classes"], in_channels=args["in_channels"], widths=scaled(widths), blocks=blocks,
                  inner=scaled(inner))


def build(spec: dict, *, trust_factory: bool = False) -> nn.Module:
    """Rebuild an (untrained) module from its spec.

    A user factory (``"factory": "package.module:function"``) is imported only when
    ``trust_factory=True``: importing runs that package's code. Specs built inside an
    architecture's builder (``build(base_spec)``) inherit the outer call's trust.
    """
    token = _TRUST_FACTORY.set(trust_factory or _TRUST_FACTORY.get())
    try:
        return _build(spec, trust_factory=_TRUST_FACTORY.get())
    finally:
        _TRUST_FACTORY.reset(token)


def _build(spec: dict, *, trust_factory: bool) -> nn.Module:
    if not isinstance(spec, dict):
        raise ArtifactError(f"spec must be an object, got {type(spec).__name__}")
    args = spec.get("args", {})
    if not isinstance(args, dict):
        raise ArtifactError(f"spec 'args' must be an object, got {type(args).__name__}")
    if "factory" in spec:
        ref = spec["factory"]
        if not trust_factory:
            raise ArtifactError(
                f"the spec names the user factory {ref!r}; importing it runs its code, so pass "
                "trust_factory=True (CLI: --trust-factory) if you trust this artifact"
            )
        model = _import_factory(ref)(**args)
        if not isinstance(model, nn.Module):
            raise ArtifactError(f"factory {ref!r} returned {type(model).__name__}, not an nn.Module")
        if spec_of(model) is None:
            attach(model, spec)
        return model
    arch = spec.get("arch")
    if not isinstance(arch, str) or not known(arch):
        raise ArtifactError(f"unknown architecture {arch!r} (known: {', '.join(sorted({*ARCHS, *PROVIDERS}))})")
    try:
        model = ARCHS[arch](**args)
    except SlimfuseError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError, OverflowError) as e:
        # a spec read from a card is data: missing keys, wrong types or names of modules that do
        # not exist are the card's fault, not a bug
        if _PROBING.get():
            raise
        raise ArtifactError(f"cannot build {arch!r} from its spec: {type(e).__name__}: {e}") from None
    if spec_of(model) is None:  # every rebuilt module carries its spec, so it can be a member of an ensemble
        attach(model, spec)
    return model


def rebuildable(cls):
    """Class decorator: instances record their class and constructor arguments, so they save.

    ``@slimfuse.zoo.rebuildable`` above ``class MyNet(nn.Module)`` (defined in an importable
    module) makes ``slimfuse.save(MyNet(...), path)`` write ``{"factory": "pkg.mod:MyNet",
    "args": {...}}``, and ``slimfuse.load(path, trust_factory=True)`` rebuild it. Arguments must
    be JSON values (numbers, strings, lists, dicts); otherwise ``save`` says which one is not.
    """
    init = cls.__init__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self) is not cls or spec_of(self) is not None:  # a subclass records its own arguments
            return
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        params = signature.parameters
        if any(params[k].kind is inspect.Parameter.VAR_POSITIONAL and v for k, v in bound.arguments.items()):
            object.__setattr__(self, "_slimfuse_unsaveable", "it was built with positional *args")
            return
        recorded = {}
        for k, v in list(bound.arguments.items())[1:]:
            if params[k].kind is inspect.Parameter.VAR_KEYWORD:
                recorded.update(v)
            elif params[k].kind is not inspect.Parameter.VAR_POSITIONAL:
                recorded[k] = v
        try:
            json.dumps(recorded)
        except (TypeError, ValueError):
            bad = next(k for k, v in recorded.items() if not _jsonable(v))
            object.__setattr__(self, "_slimfuse_unsaveable", f"its argument {bad!r} is not a JSON value")
            return
        attach(self, {"factory": class_ref(cls), "args": recorded})

    cls.__init__ = __init__
    return cls


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def class_ref(cls: type) -> str:
    """``"package.module:Class"`` for a class a loader can import, else ArtifactError saying why."""
    mod, name = cls.__module__, cls.__qualname__
    if mod == "__main__":
        raise ArtifactError(f"class {name} is defined in the script being run (__main__), so a loader could not "
                            "import it; move it into a module (e.g. mymodels.py) and import it from there")
    if "." in name:
        raise ArtifactError(f"class {mod}.{name} is not defined at the top level of its module, so a loader could "
                            "not import it; define it at module level")
    try:
        found = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError):
        found = None
    if found is not cls:
        raise ArtifactError(f"class {name} cannot be imported as {mod}:{name}")
    return f"{mod}:{name}"


def factory_spec(model: nn.Module) -> dict:
    """The spec of a module without one: its importable class and the constructor arguments it was built with.

    Arguments recorded by :func:`rebuildable` are used as they are. Otherwise each parameter of
    the class's ``__init__`` is read from the same-named attribute of ``model`` (a JSON value;
    parameters without such an attribute keep their defaults), and the class is built once with
    them: the spec is returned only if that rebuild has exactly ``model``'s tensor names, shapes
    and dtypes. Anything else raises ArtifactError naming the problem and the one-line fix.
    """
    cls = type(model)
    fix = ("decorate the class with @slimfuse.zoo.rebuildable, or build the model with "
           "slimfuse.zoo.user_model('pkg.mod:factory', ...)")
    why = getattr(model, "_slimfuse_unsaveable", None)
    if why:
        raise ArtifactError(f"cannot record how to rebuild this {cls.__name__}: {why}")
    ref = class_ref(cls)
    args = {}
    for name, p in list(inspect.signature(cls.__init__).parameters.items())[1:]:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            raise ArtifactError(f"cannot record how {cls.__name__} was built: its __init__ takes *{name}; {fix}")
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        value = getattr(model, name, inspect.Parameter.empty)
        if not isinstance(value, (nn.Module, torch.Tensor)) and value is not inspect.Parameter.empty \
                and _jsonable(value):
            args[name] = json.loads(json.dumps(value))
        elif p.default is inspect.Parameter.empty:
            raise ArtifactError(f"cannot tell which {name!r} this {cls.__name__} was built with (no attribute "
                                f"self.{name} holding it); {fix}")
    try:
        rebuilt = cls(**args)
    except Exception as e:
        raise ArtifactError(f"cannot rebuild {ref} from its attributes ({type(e).__name__}: {e}); {fix}") from None

    def layout(m):
        return {k: (tuple(v.shape), v.dtype) for k, v in m.state_dict().items()}

    if layout(rebuilt) != layout(model):
        raise ArtifactError(f"{ref}(**{args}) does not rebuild this model's tensors (it was built with other "
                            f"arguments, or changed after construction); {fix}")
    return {"factory": ref, "args": args}


def user_model(ref: str, **kwargs) -> nn.Module:
    """Build a model with the user factory ``"package.module:function"`` and record it in its spec."""
    model = _import_factory(ref)(**kwargs)
    return attach(model, {"factory": ref, "args": kwargs})


def _import_factory(ref: str):
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise ArtifactError(f"factory must look like 'package.module:function', got {ref!r}")
    mod, fn = ref.split(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ArtifactError(f"cannot import factory {ref!r}: {e}") from None
