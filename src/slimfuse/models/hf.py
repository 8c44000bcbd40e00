"""Hugging Face ``transformers`` models as artifacts: the ``hf`` architecture.

Any ``transformers.PreTrainedModel`` (``BertForSequenceClassification``, ``GPT2LMHeadModel``,
``ResNetForImageClassification`` ...) saves with ``slimfuse.save`` as
``{"arch": "hf", "args": {"cls", "config", "attn", ...}}``: its class name, its config as JSON
(``config.to_json_string``), the attention implementation it runs (so the reload computes the same
way) and, for a model whose layers were changed (structured pruning), the shapes of the tensors and
the structural attributes (heads per attention layer, widths) that differ from a model freshly built
from that config. Reloading needs no network, no pickle and no ``trust_factory``: only classes of the
``transformers`` package itself are rebuilt (anything else is refused), the config is checked and
bounded, and the model is first built on the meta device (nothing allocated) with every registered
module and tensor counted, so a card cannot make slimfuse build more than it may.

The spec of a ``transformers`` model that carries none is computed from the model on demand
(:func:`spec_for`, used by :func:`slimfuse.models.spec.spec_of`), so such a model saves, reloads,
joins an ensemble and serves as a teacher with no glue code.

A ``ModelOutput`` is read through the one calling convention, :mod:`slimfuse.models.calling`.

``transformers`` is imported only when a ``transformers`` model is met.
"""

from __future__ import annotations

import contextlib
import json
import keyword
import re
import threading
from collections import OrderedDict

import torch
from torch import nn

from ..errors import ArtifactError, ConfigError
from ..limits import json_shape_problem
from .zoo import MAX_PARAMS, check_params, register

ARCH = "hf"
MAX_MODULES = 20_000  # submodules a rebuilt model may register (bert-large has about 400)
MAX_LAYERS = 1024  # layers, blocks or stages a config may ask for (the largest published models have < 200)
LAYER_KEYS = re.compile(r"(^|_)(n_layers?|layers|depths?|blocks|stages)$")
MAX_CONFIG_DEPTH = 16
MAX_CONFIG_VALUES = 100_000
MAX_DIM = 2**31 - 1
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
ATTENTION = ("eager", "sdpa")  # implementations that run on any machine
REFUSED_KEYS = {"quantization_config": "quantized transformers models (bitsandbytes, GPTQ ...) are not supported; "
                "save the float model and quantize it with slimfuse"}
# module attributes that describe a layer's structure: recorded where a model differs from its config
STRUCT_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "num_features", "groups",
                "normalized_shape", "num_embeddings", "embedding_dim", "num_attention_heads", "attention_head_size",
                "all_head_size", "num_heads", "head_dim", "embed_dim", "split_size", "nf", "nx", "kdim", "vdim")


# --------------------------------------------------------------------------- recognising and describing


def is_hf(model) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` of a class of the ``transformers`` package."""
    if not type(model).__module__.startswith("transformers."):
        return False  # transformers is not even imported for other modules
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _structure(model: nn.Module) -> tuple[dict[str, list[int]], dict[str, dict]]:
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    attrs = {}
    for name, m in model.named_modules():
        values = {}
        for a in STRUCT_ATTRS:
            v = m.__dict__.get(a)
            if isinstance(v, bool):
                continue
            if isinstance(v, int) or (isinstance(v, tuple) and all(isinstance(i, int) for i in v)):
                values[a] = list(v) if isinstance(v, tuple) else v
        if values:
            attrs[name] = values
    return shapes, attrs


_FRESH: OrderedDict[str, tuple] = OrderedDict()  # spec args -> the structure a fresh build has
_FRESH_LOCK = threading.Lock()


def _fresh_structure(args: dict) -> tuple[dict, dict]:
    key = json.dumps(args, sort_keys=True)
    with _FRESH_LOCK:
        if key in _FRESH:
            _FRESH.move_to_end(key)
            return _FRESH[key]
    with torch.device("meta"):
        found = _structure(_construct(**args))
    with _FRESH_LOCK:
        _FRESH[key] = found
        while len(_FRESH) > 16:
            _FRESH.popitem(last=False)
    return found


def spec_for(model: nn.Module) -> dict:
    """The ``hf`` spec that rebuilds ``model`` (a ``transformers`` model), read from the model itself:
    class, config, attention implementation, dtype, and any structure that differs from its config."""
    if not is_hf(model):
        raise ArtifactError(f"{type(model).__name__} is not a model of the transformers package")
    cfg = model.config
    args = {"cls": type(model).__name__, "config": json.loads(cfg.to_json_string(use_diff=False))}
    attn = getattr(cfg, "_attn_implementation", None)
    if isinstance(attn, str) and attn != "eager":
        args["attn"] = attn
    dtypes = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
    if len(dtypes) > 1:
        mixed = ", ".join(sorted(map(str, dtypes)))
        raise ArtifactError(f"{type(model).__name__} mixes floating-point dtypes ({mixed}); "
                            "cast it to one dtype before saving")
    if dtypes and dtypes != {torch.float32}:
        name = str(next(iter(dtypes))).removeprefix("torch.")
        if name not in DTYPES:
            raise ArtifactError(f"{type(model).__name__} is in {name}; slimfuse saves float32, "
                                f"{', '.join(DTYPES)} transformers models")
        args["dtype"] = name
    shapes, attrs = _structure(model)
    fresh_shapes, fresh_attrs = _fresh_structure(args)
    if set(shapes) != set(fresh_shapes):
        odd = sorted(set(shapes) ^ set(fresh_shapes))
        raise ArtifactError(f"{type(model).__name__} has tensors a model built from its config does not have (or "
                            f"lacks some): {', '.join(odd[:5])}; slimfuse can only record changes of shape")
    changed_shapes = {k: v for k, v in shapes.items() if fresh_shapes[k] != v}
    changed_attrs = {}
    for name, values in attrs.items():
        diff = {a: v for a, v in values.items() if fresh_attrs.get(name, {}).get(a) != v}
        if diff:
            changed_attrs[name] = diff
    if changed_shapes:
        args["shapes"] = changed_shapes
    if changed_attrs:
        args["attrs"] = changed_attrs
    return {"arch": ARCH, "args": args}


# --------------------------------------------------------------------------- rebuilding


def model_class(name) -> type:
    """The ``transformers`` class called ``name``: a ``PreTrainedModel`` defined in that package, else ArtifactError."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
        raise ArtifactError(f"hf spec: 'cls' must be the name of a transformers model class, got {name!r}")
    try:
        import transformers
        from transformers import PreTrainedModel
    except ImportError:
        raise ArtifactError("this artifact is a transformers model: pip install transformers") from None
    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError) as e:  # a lazy module whose optional backend is missing
        raise ArtifactError(f"hf spec: transformers {transformers.__version__} has no model class {name!r} "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)
            and cls.__module__.startswith("transformers.")):
        raise ArtifactError(f"hf spec: {name!r} is not a PreTrainedModel class of the transformers package; only "
                            "those are rebuilt from a card")
    return cls


def _bad_int(value, path="config"):
    """The path of the first integer in ``value`` outside +-MAX_DIM, or None."""
    stack = [(value, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, dict):
            stack.extend((c, f"{p}.{k}") for k, c in v.items())
        elif isinstance(v, list):
            stack.extend((c, f"{p}[{i}]") for i, c in enumerate(v))
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_DIM:
            return p
    return None


def _config(cls: type, config, attn):
    if not isinstance(config, dict):
        raise ArtifactError(f"hf spec: 'config' must be an object, got {type(config).__name__}")
    problem = json_shape_problem(config, max_depth=MAX_CONFIG_DEPTH, max_nodes=MAX_CONFIG_VALUES)
    if problem:
        raise ArtifactError(f"hf spec: implausible config ({problem})")
    for key, why in REFUSED_KEYS.items():
        if config.get(key) is not None:
            raise ArtifactError(f"hf spec: config has {key!r}: {why}")
    bad = _bad_int(config)
    if bad:
        raise ArtifactError(f"hf spec: {bad} is an implausibly large integer")
    for key, value in config.items():  # layer counts: refused at once, before a builder loops over them
        if LAYER_KEYS.search(key):
            n = sum(value) if isinstance(value, list) and all(isinstance(v, int) for v in value) else value
            if isinstance(n, int) and not isinstance(n, bool) and n > MAX_LAYERS:
                raise ArtifactError(f"hf spec: config.{key} asks for {n:,} layers, more than {MAX_LAYERS:,}")
    config_class = cls.config_class
    expected = getattr(config_class, "model_type", None)
    if expected and config.get("model_type") != expected:
        raise ArtifactError(f"hf spec: {cls.__name__} takes a {expected!r} config, the card's is "
                            f"{config.get('model_type')!r}")
    if attn is not None and attn not in ATTENTION:
        raise ArtifactError(f"hf spec: attention implementation {attn!r} is not one of {', '.join(ATTENTION)}")
    try:
        cfg = config_class.from_dict(dict(config))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ArtifactError(f"hf spec: the {cls.__name__} config is invalid ({type(e).__name__}: {e})") from None
    cfg._attn_implementation = attn or "eager"
    return cfg


@contextlib.contextmanager
def _counted(name: str):
    """Count every submodule and tensor registered while a model is built; refuse past the limits."""
    counts = {"modules": 0, "elements": 0}

    def on_module(module, key, sub):
        counts["modules"] += 1
        if counts["modules"] > MAX_MODULES:
            raise ArtifactError(f"hf spec: {name} would register more than {MAX_MODULES:,} submodules")

    def on_tensor(module, key, t):
        if t is not None:
            counts["elements"] += t.numel()
            if counts["elements"] > MAX_PARAMS:
                raise ArtifactError(f"hf spec: {name} would hold more than {MAX_PARAMS:,} parameters")

    hooks = torch.nn.modules.module
    handles = [hooks.register_module_module_registration_hook(on_module),
               hooks.register_module_parameter_registration_hook(on_tensor),
               hooks.register_module_buffer_registration_hook(on_tensor)]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def _dims(name: str, shape) -> list[int]:
    if not isinstance(shape, list) or len(shape) > 8 or any(
            isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_DIM for s in shape):
        raise ArtifactError(f"hf spec: the shape of {name!r} must be a list of at most 8 sizes, got {shape!r}")
    return shape


def _construct(cls: str, config: dict, attn: str | None = None, dtype: str | None = None,
               shapes: dict | None = None, attrs: dict | None = None) -> nn.Module:
    klass = model_class(cls)
    cfg = _config(klass, config, attn)
    if dtype is not None and dtype not in DTYPES:
        raise ArtifactError(f"hf spec: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    with _counted(cls) as counts:
        try:
            model = klass(cfg)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError) as e:
            raise ArtifactError(f"hf spec: cannot build {cls} from its config ({type(e).__name__}: {e})") from None
    shapes, attrs = shapes or {}, attrs or {}
    if not isinstance(shapes, dict) or not isinstance(attrs, dict):
        raise ArtifactError("hf spec: 'shapes' and 'attrs' must be objects")
    state = model.state_dict()
    resized = {}
    for name, shape in shapes.items():
        if name not in state:
            raise ArtifactError(f"hf spec names the tensor {name!r}, which {cls} does not have")
        resized[name] = _dims(name, shape)
    total = counts["elements"] + sum(_numel(s) - state[k].numel() for k, s in resized.items())
    check_params(f"hf spec: {cls}", total)  # before anything of the new shapes is allocated
    for name, shape in resized.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        old = getattr(module, leaf)
        new = torch.empty(shape, dtype=old.dtype)
        if isinstance(old, nn.Parameter):
            setattr(module, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            module._buffers[leaf] = new
    for owner, values in attrs.items():
        try:
            module = model.get_submodule(owner) if isinstance(owner, str) else None
        except AttributeError:
            module = None
        if module is None or not isinstance(values, dict):
            raise ArtifactError(f"hf spec sets attributes of {owner!r}, which {cls} does not have")
        for attr, value in values.items():
            if attr not in STRUCT_ATTRS:
                raise ArtifactError(f"hf spec sets {owner}.{attr}, which is not a structural attribute")
            ok = (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_DIM) or (
                isinstance(value, list) and len(value) <= 8 and all(
                    isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_DIM for v in value))
            if not ok:
                raise ArtifactError(f"hf spec sets {owner}.{attr} to {value!r}, not a size")
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    if dtype is not None:
        model.to(DTYPES[dtype])
    return model.eval()


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _on_meta() -> bool:
    return torch.empty(0).device.type == "meta"


@register(ARCH)
def hf_arch(cls: str, config: dict, attn: str | None = None, dtype: str | None = None,
            shapes: dict | None = None, attrs: dict | None = None) -> nn.Module:
    """A ``transformers`` model rebuilt from its class name and config (and recorded structure), untrained."""
    args = {"cls": cls, "config": config, "attn": attn, "dtype": dtype, "shapes": shapes, "attrs": attrs}
    if not _on_meta():  # first on the meta device: its size is known before anything is allocated
        with torch.device("meta"):
            planned = _construct(**args)
        check_params(f"hf spec: {cls}", sum(t.numel() for t in (*planned.parameters(), *planned.buffers())))
        del planned
    return _construct(**args)


# --------------------------------------------------------------------------- structured pruning


def attention_heads(model: nn.Module) -> dict[str, nn.Module]:
    """BERT-family self-attention modules (``query``/``key``/``value`` Linears, ``num_attention_heads``,
    ``attention_head_size``) by name: their heads are pruned as units."""
    found = {}
    for name, m in model.named_modules():
        if (all(isinstance(getattr(m, p, None), nn.Linear) for p in ("query", "key", "value"))
                and isinstance(getattr(m, "num_attention_heads", None), int)
                and isinstance(getattr(m, "attention_head_size", None), int)):
            found[name] = m
    return found


def is_conv1d(m) -> bool:
    """``transformers``' ``Conv1D`` (GPT-2's linear layer, weight stored ``(in, out)``)."""
    return (type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), nn.Parameter)
            and m.weight.ndim == 2 and isinstance(getattr(m, "bias", None), nn.Parameter)
            and (m.__dict__.get("nx"), m.__dict__.get("nf")) == tuple(m.weight.shape))


def conv1d_attention(model: nn.Module) -> dict[str, nn.Module]:
    """GPT-2-family self-attention (a fused ``c_attn`` Conv1D of query, key, value blocks of ``split_size``
    features each, ``c_proj``, ``num_heads`` x ``head_dim``) by name: their heads are pruned as units."""
    found = {}
    for name, m in model.named_modules():
        c_attn, c_proj = getattr(m, "c_attn", None), getattr(m, "c_proj", None)
        heads, size, split = (m.__dict__.get(a) for a in ("num_heads", "head_dim", "split_size"))
        if (is_conv1d(c_attn) and is_conv1d(c_proj) and all(isinstance(v, int) for v in (heads, size, split))
                and not getattr(m, "is_cross_attention", False) and not hasattr(m, "q_attn")
                and heads * size == split and c_attn.nf == 3 * split and c_proj.nx == split):
            found[name] = m
    return found


def conv1d_mlps(model: nn.Module) -> dict[str, nn.Module]:
    """GPT-2-family MLPs (``c_fc`` Conv1D into the hidden width, ``c_proj`` Conv1D back) by name."""
    return {name: m for name, m in model.named_modules()
            if is_conv1d(getattr(m, "c_fc", None)) and is_conv1d(getattr(m, "c_proj", None))
            and m.c_fc.nf == m.c_proj.nx and not hasattr(m, "c_attn")}


HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")


def unknown_attention(model: nn.Module) -> list[str]:
    """Modules that split their features into heads in a layout slimfuse does not prune as units."""
    known = {id(m) for m in [*attention_heads(model).values(), *conv1d_attention(model).values()]}
    out = []
    for name, m in model.named_modules():
        if id(m) in known or isinstance(m, nn.MultiheadAttention) or not name:
            continue
        if any(isinstance(m.__dict__.get(a), int) for a in HEAD_ATTRS) and any(
                isinstance(c, nn.Linear) or type(c).__name__ == "Conv1D" for c in m.children()):
            out.append(f"{name} ({type(m).__name__})")
    return out


def pruning_setup(model: nn.Module, *, embeddings: bool = False) -> dict:
    """Torch-Pruning arguments that prune a ``transformers`` model's attention heads as units and keep its
    residual stream (embeddings, LayerNorms) whole, or with ``embeddings`` let it narrow too:
    ``num_heads``, ``ignored`` modules."""
    heads = attention_heads(model)
    num_heads = {}
    for m in heads.values():
        for p in (m.query, m.key, m.value):
            num_heads[p] = m.num_attention_heads
    # the residual stream and the pooler keep the config's hidden_size: embeddings, LayerNorms and the
    # pooler's output are what other heads built on this model (and its config) expect
    ignored = [] if embeddings else [m for n, m in model.named_modules()
                                     if isinstance(m, (nn.LayerNorm, nn.Embedding)) or n.rpartition(".")[2] == "pooler"]
    return {"num_heads": num_heads, "ignored": ignored}


def after_pruning(model: nn.Module, num_heads: dict) -> None:
    """Give every pruned self-attention module its new head count (whole heads went: the head size stays)."""
    for m in attention_heads(model).values():
        heads = int(num_heads.get(m.query, m.num_attention_heads))
        if heads * m.attention_head_size != m.query.out_features:
            raise ConfigError(f"pruning left {type(m).__name__} with {m.query.out_features} query features, "
                              f"not {heads} heads of {m.attention_head_size}")
        m.num_attention_heads = heads
        m.all_head_size = m.query.out_features
