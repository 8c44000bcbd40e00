"""Shrunk models: the ``pruned`` architecture and students of any prunable model.

A structurally pruned model (Torch-Pruning removed neurons or channels) is rebuilt from
its spec alone: zoo models get their new widths in their own args; anything else becomes
``{"arch": "pruned", "args": {"base", "shapes", "attrs"}}``, the base spec plus the new
shape of every tensor and the width attributes of their modules, so the artifact reloads
without unpickling. :func:`student_of` uses the same machinery at initialisation: a
narrower, untrained copy of any model Torch-Pruning can shrink.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ArtifactError, ConfigError
from .calling import call, forward, select
from .conv1d import Conv1DPruner
from .hf import after_pruning, conv1d_attention, conv1d_mlps, is_hf, pruning_setup, unknown_attention
from .spec import attach, spec_of, task_of
from .zoo import build, factory_spec, register

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Module attributes that describe a layer's width; recorded for the ``pruned`` architecture.
WIDTH_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "num_features", "groups",
               "normalized_shape", "num_embeddings", "embedding_dim",
               "embed_dim", "kdim", "vdim", "num_heads", "head_dim")  # the last: nn.MultiheadAttention
# what Torch-Pruning raises on graphs it misreads (split outputs, parameters used through a view, ...)
TP_ERRORS = (IndexError, KeyError, AttributeError, TypeError, ValueError, RuntimeError, AssertionError)


def output_layers(model: nn.Module, sample: torch.Tensor | None) -> list[str]:
    """The last prunable layer to run in a forward pass (registration order without a sample)."""
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
    if not names:
        return []
    order: list[str] = []
    if sample is not None:
        hooks = [m.register_forward_hook(lambda mod, i, o: order.append(names[id(mod)]))
                 for m in model.modules() if id(m) in names]
        try:
            with torch.no_grad():
                call(model.eval(), sample)  # inputs of any form (models/calling.py)
        finally:
            for h in hooks:
                h.remove()
    return [order[-1] if order else list(names.values())[-1]]


def check_still_runs(model: nn.Module, sample: torch.Tensor, expected: torch.Size) -> None:
    """Torch-Pruning can misread some graphs (e.g. a concatenation fed straight into flatten -> linear, a
    ``torch.split`` into branches): the shrunk model must still run, and the error names the layer that fails."""
    names = {id(m): n for n, m in model.named_modules() if n}
    running: list[str] = []

    def enter(mod, inputs) -> None:
        running.append(names[id(mod)])

    def leave(mod, inputs, output) -> None:
        running.pop()

    hooks = [h for m in model.modules() if id(m) in names
             for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    where = ""
    try:
        with torch.no_grad():
            shape = forward(model.eval(), sample).shape
    except RuntimeError as e:
        shape = str(e).splitlines()[0]
        where = f" at layer {running[-1]!r}" if running else ""
    finally:
        for h in hooks:
            h.remove()
    if shape != expected:
        raise ConfigError(f"structured pruning could not keep this model's layers consistent{where} ({shape}); "
                          "name that layer or the ones feeding it in exclude=")


def tp_failure(e: BaseException, model: nn.Module, pruner=None) -> ConfigError:
    """Torch-Pruning raised ``e``: one ConfigError. While pruning (``pruner`` given) it names the layers of
    the first group whose importance it cannot compute; otherwise (or when every group computes) where
    its trace failed, as :func:`_untraceable` finds it."""
    layers = tp_failing_layers(pruner, model) if pruner is not None else []
    if not layers:
        return ConfigError(_untraceable(model, e, when="tracing" if pruner is None else "pruning"))
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return ConfigError(f"Torch-Pruning cannot prune this model on the layers {', '.join(layers)} "
                       f"({type(e).__name__}: {first}); exclude= one of them, or use sparsity= "
                       "(unstructured) instead")


def _untraceable(model: nn.Module, error: Exception, when: str = "tracing") -> str:
    """A one-line reason Torch-Pruning failed on ``model``: the operation it failed at, the nearest named
    layer feeding it, and the layers holding weights of types it has no pruner for."""
    node, tb = None, error.__traceback__
    while tb is not None:  # the innermost graph node Torch-Pruning was working on
        found = tb.tb_frame.f_locals.get("node")
        if found is not None and hasattr(found, "inputs"):
            node = found
        tb = tb.tb_next
    names = {id(m): n for n, m in model.named_modules()}
    where = ""
    if node is not None:
        layer, queue, seen = None, [node], set()
        while queue and layer is None:  # breadth-first towards the inputs: the first named layer
            n = queue.pop(0)
            if id(n) in seen:
                continue
            seen.add(id(n))
            if isinstance(getattr(n, "module", None), nn.Module) and id(n.module) in names and names[id(n.module)]:
                layer = f"{names[id(n.module)]} ({type(n.module).__name__})"
            queue.extend(getattr(n, "inputs", []))
        op = str(getattr(node, "name", node)).split("(")[0]
        where = f" at {op}" + (f", fed by {layer}" if layer else "")
    unknown = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
               if any(True for _ in m.parameters(recurse=False)) and not isinstance(m, PRUNABLE + (
                   nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.Embedding, nn.GroupNorm,
                   nn.MultiheadAttention, nn.PReLU, nn.LSTM, nn.ConvTranspose2d, nn.InstanceNorm2d))]
    why = f"; layers of types it has no pruner for: {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}" \
        if unknown else ""
    msg = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (f"structured pruning cannot trace this model: Torch-Pruning failed while {when}{where} "
            f"({type(error).__name__}: {msg}){why}; exclude= the layers around it, or prune with sparsity=")


def tp_failing_layers(pruner, model: nn.Module) -> list[str]:
    """The layers of the first pruning group whose importance Torch-Pruning cannot compute (best effort)."""
    modules = {id(m): n for n, m in model.named_modules() if n}
    params = {id(p): n for n, p in model.named_parameters()}
    layers: list[str] = []
    try:
        for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                              root_module_types=pruner.root_module_types):
            try:
                pruner.estimate_importance(group)
            except Exception:  # this group is the one Torch-Pruning misreads
                for item in group.items:
                    target = item.dep.target.module
                    name = modules.get(id(target)) or params.get(id(target))
                    if name and name not in layers:
                        layers.append(name)
                break
    except Exception:  # the diagnosis is best effort; the original error is the message
        pass
    return layers


def student_of(teacher: nn.Module, width: float, *, example_inputs: torch.Tensor | None = None) -> nn.Module:
    """A narrower, untrained copy of any model Torch-Pruning can shrink.

    A copy of ``teacher`` is re-initialised (every submodule's ``reset_parameters``) and then
    loses ``1 - width`` of the neurons/channels of each prunable layer but the output layer,
    through Torch-Pruning's dependency graph (residual additions, concatenations stay
    consistent). ``example_inputs``: a batch the model accepts, to trace it (default: zeros
    shaped like the teacher's task input). The result's spec is the teacher's with the new
    widths (zoo models) or a ``pruned`` spec, so it saves and reloads like the teacher.
    """
    import torch_pruning as tp

    if example_inputs is None:
        task = task_of(teacher)
        if not (task and task.get("input_shape")):
            raise ConfigError("zoo.student of this module traces it with an example input: pass example_inputs= "
                              "(a small batch the model accepts)")
        example_inputs = torch.zeros(2, *task["input_shape"])
    work = copy.deepcopy(teacher).eval()
    with torch.no_grad():
        for m in work.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
        try:
            expected = forward(work, example_inputs).shape
        except (RuntimeError, TypeError, ValueError) as e:
            raise ConfigError(f"zoo.student: the model does not run on example_inputs: {e}") from None
    if width < 1:
        modules = dict(work.named_modules())
        ignored = [modules[n] for n in output_layers(work, example_inputs)]
        extra = {}
        if is_hf(work):  # whole attention heads; embeddings, LayerNorms and the pooler keep hidden_size
            odd = unknown_attention(work)
            if odd:
                raise ConfigError(f"zoo.student: cannot narrow {odd[0]}: its attention heads are laid out in a "
                                  "way slimfuse does not prune as units")
            if conv1d_attention(work) or conv1d_mlps(work):  # GPT-2's Conv1D blocks: narrowed without tracing
                Conv1DPruner(work, ratio=1 - width, steps=1, importance="l1", scope="layer", round_to=None,
                             skip={id(m) for m in ignored}).step()
                check_still_runs(work, example_inputs, expected)
                return _attached(teacher, work)
            setup = pruning_setup(work)
            ignored += setup["ignored"]
            if setup["num_heads"]:
                extra = {"num_heads": setup["num_heads"], "prune_num_heads": True, "prune_head_dims": False,
                         "head_pruning_ratio": 1 - width}
        pruner = tp.pruner.BasePruner(work, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                      pruning_ratio=1 - width, ignored_layers=ignored,
                                      output_transform=select, **extra)
        groups = pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types)
        if not any(True for _ in groups):
            raise ConfigError("zoo.student: this model has no neurons or channels to remove outside its output layer")
        try:
            pruner.step()
        except TP_ERRORS as e:
            raise tp_failure(e, work, pruner) from None
        if extra:
            after_pruning(work, pruner.num_heads)
        del pruner
        work.zero_grad(set_to_none=True)
        check_still_runs(work, example_inputs, expected)
    return _attached(teacher, work)


def _attached(teacher: nn.Module, work: nn.Module) -> nn.Module:
    """``work`` (a narrowed copy of ``teacher``) with the spec that rebuilds it, where one can be recorded."""
    base = spec_of(teacher)
    if base is None:
        try:  # a user's own module: its class and constructor arguments, if they can be recorded
            base = factory_spec(teacher)
        except ArtifactError:
            base = None  # the student still works; saving it explains what is missing
    spec = shrunk_spec(teacher, work, spec=base)
    if spec is not None:
        attach(work, spec, task=task_of(teacher))
    return work


def _zoo_widths(arch: str, m: dict[str, nn.Module]) -> dict | None:
    """The zoo args that describe the widths of ``m`` (named modules), for the zoo's own layouts."""
    if arch == "mlp":
        return {"hidden": [m[f"fc{i}"].out_features for i in range(1, 1 + sum(1 for n in m if n.startswith("fc")))]}
    if arch == "lenet5":
        return {"widths": [m["conv1"].out_channels, m["conv2"].out_channels, m["fc1"].out_features,
                           m["fc2"].out_features]}
    if arch == "cnn":
        convs = [m[f"conv{i}"].out_channels for i in range(1, 1 + sum(1 for n in m if n.startswith("conv")))]
        return {"widths": convs, "hidden": m["fc"].out_features}
    if arch == "resnet":
        blocks = [b for n, b in m.items() if n.startswith("stage") and "." not in n]
        stages = [n.partition("_")[0] for n in m if n.startswith("stage") and "." not in n]
        last = dict(zip(stages, blocks))  # each stage's last block carries its stream width
        return {"widths": [b.body.conv2.out_channels for b in last.values()],
                "inner": [b.body.conv1.out_channels for b in blocks]}
    return None


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def shrunk_spec(source: nn.Module, pruned: nn.Module, *, spec: dict | None = None) -> dict | None:
    """A spec that rebuilds ``pruned`` (``source`` with shrunk layers) without unpickling.

    Zoo models get their new widths in their own args; anything else becomes a ``pruned``
    architecture: the base spec plus the new shape of every tensor and width attribute that changed.
    ``spec``: the source's spec when it carries none (a user's module, :func:`zoo.factory_spec`).
    """
    spec = spec or spec_of(source)
    if spec is None:
        return None
    if spec.get("arch") == "hf":  # a transformers model records its own structure (heads, widths)
        from .hf import spec_for

        return spec_for(pruned)
    new_shapes = _shapes(pruned)
    try:
        widths = _zoo_widths(spec.get("arch"), dict(pruned.named_modules()))
    except (KeyError, AttributeError):
        widths = None
    if widths is not None:
        candidate = {"arch": spec["arch"], "args": {**spec["args"], **widths}}
        try:
            if _shapes(build(candidate)) == new_shapes:
                return candidate
        except (ArtifactError, ConfigError):
            pass
    base, shapes, attrs = spec, {}, {}
    if spec.get("arch") == "pruned":
        base, shapes, attrs = spec["args"]["base"], dict(spec["args"]["shapes"]), dict(spec["args"]["attrs"])
    old_shapes = _shapes(source)
    for name, shape in new_shapes.items():
        if old_shapes.get(name) != shape:
            shapes[name] = shape
            owner = name.rpartition(".")[0]
            module = pruned.get_submodule(owner)
            attrs[owner] = {a: list(v) if isinstance(v, tuple) else v
                            for a in WIDTH_ATTRS if isinstance(v := getattr(module, a, None), (int, tuple))}
    return {"arch": "pruned", "args": {"base": base, "shapes": shapes, "attrs": attrs}}


@register("pruned")
def pruned_arch(base: dict, shapes: dict, attrs: dict) -> nn.Module:
    """``base`` rebuilt with the tensors in ``shapes`` resized and the width ``attrs`` of their modules set."""
    model = build(base)
    for name, shape in shapes.items():
        owner, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            raise ArtifactError(f"pruned spec names {name!r}, which the base model does not have") from None
        old = getattr(module, leaf, None)
        if not isinstance(old, torch.Tensor):
            raise ArtifactError(f"pruned spec names {name!r}, which is not a tensor of the base model")
        new = torch.empty([int(s) for s in shape], dtype=old.dtype)
        if isinstance(old, nn.Parameter):
            setattr(module, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            module._buffers[leaf] = new
    for owner, values in attrs.items():
        module = model.get_submodule(owner)
        for attr, value in values.items():
            if attr not in WIDTH_ATTRS:
                raise ArtifactError(f"pruned spec sets {owner}.{attr}, which is not a width attribute")
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    return attach(model, {"arch": "pruned", "args": {"base": base, "shapes": shapes, "attrs": attrs}})
