"""Permutation alignment of independently trained models (Git Re-Basin) and REPAIR.

Hidden units of a network can be reordered without changing its function, provided every tensor
that reads or writes them is reordered alike. Which tensors move together is what Torch-Pruning's
dependency graph knows for pruning: a *group* couples the output channels of a layer with the
BatchNorm after it, the input channels of every layer that reads it, and — through residual
additions, concatenations, splits and flattens — the other layers sharing those channels. A group
here is such a set of (tensor, axis, index block per unit) entries, built from Torch-Pruning's
group of the layer with its index mapping, so the same code aligns MLPs, chains of convolutions,
residual and concatenating CNNs.

Every group is *proven* a symmetry before it is used: a random permutation of its units alone is
applied to a float64 copy of the model, which must compute the same outputs on the sample. A
group that fails (a channel shuffle, a head split Torch-Pruning does not follow, an addition of
the raw input, a layer type with no known layout) is left unpermuted and reported, never
applied. The output layer's units are never permuted.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..errors import ConfigError
from ..export import input_shape
from ..models.calling import forward, select
from ..models.shrunk import TP_ERRORS, output_layers, tp_failure

EPS = 1e-8
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.modules.batchnorm._BatchNorm,)


class Group:
    """One permutable hidden dimension of ``size`` units.

    ``entries``: (state key, axis, index) where ``index[u]`` lists the positions along ``axis``
    that hold unit ``u`` (one position for a layer's own outputs, several after a flatten);
    ``stats``: module name -> the output channels that carry the units, for the modules where
    REPAIR renormalises and activation matching correlates (the BatchNorms, else the layers
    writing the units); ``norms``: the keys of normalisation vectors and statistics among the entries
    (permuted, but not what weight matching compares).
    """

    def __init__(self, layer: str, size: int):
        self.layer, self.size = layer, size
        self.entries: list[tuple[str, int, torch.Tensor]] = []
        self.stats: dict[str, torch.Tensor] = {}
        self.norms: set[str] = set()

    def __repr__(self) -> str:
        return f"Group({self.layer!r}, {self.size} units, {len(self.entries)} tensors)"


def _axes(module: nn.Module, out: bool) -> list[tuple[str, int]] | None:
    """The (parameter or buffer, axis) pairs that hold a module's output (``out``) or input units;
    ``None``: a layout this module does not follow (grouped convolutions, attention, recurrent ...)."""
    if isinstance(module, nn.Linear) or (isinstance(module, CONVS) and module.groups == 1):
        return [("weight", 0), ("bias", 0)] if out else [("weight", 1)]
    if isinstance(module, CONVS) and module.groups == module.in_channels == module.out_channels:
        return [("weight", 0), ("bias", 0)]  # depthwise: unit u reads and writes channel u
    if isinstance(module, NORMS):
        return [("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)]
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return [("weight", 0), ("bias", 0)]
    if isinstance(module, nn.PReLU) and module.num_parameters > 1:
        return [("weight", 0)]
    if isinstance(module, nn.Embedding) and out:
        return [("weight", 1)]
    return None


def _owns_state(module) -> bool:
    return isinstance(module, nn.Module) and (any(True for _ in module.parameters(recurse=False))
                                              or any(True for _ in module.buffers(recurse=False)))


def _from_tp(tp_group, dg, names: dict[int, str], state: dict, size: int) -> tuple[Group | None, str]:
    """A :class:`Group` from one Torch-Pruning group, or ``(None, why)`` when a member is not followable."""
    root = names[id(tp_group[0].dep.target.module)]
    group = Group(root, size)
    seen: dict[tuple[str, int], torch.Tensor] = {}
    writers: dict[str, torch.Tensor] = {}
    for item in tp_group:
        module = item.dep.target.module
        if isinstance(module, nn.Parameter):
            return None, f"a bare nn.Parameter ({dg._param_to_name.get(module, '?')}) shares the units"
        if not _owns_state(module):
            continue  # additions, concatenations, activations, reshapes: no tensors of their own
        name = names.get(id(module), "?")
        axes = _axes(module, dg.is_out_channel_pruning_fn(item.dep.handler))
        if axes is None:
            return None, f"{name} ({type(module).__name__}) shares the units in a layout rebasin does not follow"
        idxs, roots = torch.as_tensor(item.idxs, dtype=torch.long), torch.as_tensor(item.root_idxs, dtype=torch.long)
        if len(idxs) % size or torch.bincount(roots, minlength=size).unique().numel() != 1:
            return None, f"{name} holds the units of {root} unevenly"
        # unit u -> its positions, in increasing order (the same layout in every member)
        order = torch.argsort(roots * (int(idxs.max()) + 1) + idxs)
        index = idxs[order].view(size, -1)
        for suffix, axis in axes:
            key = f"{name}.{suffix}"
            if key not in state:
                continue  # no bias, no running statistics
            if (key, axis) in seen:
                if not torch.equal(seen[key, axis], index):
                    return None, f"{key} is reached twice with different unit layouts"
                continue
            seen[key, axis] = index
            group.entries.append((key, axis, index))
            if isinstance(module, NORMS + (nn.LayerNorm,)):
                group.norms.add(key)
        if isinstance(module, NORMS):
            group.stats[name] = index[:, 0]
        elif isinstance(module, (nn.Linear,) + CONVS) and axes[0] == ("weight", 0):
            writers[name] = index[:, 0]
    if not group.stats:  # no BatchNorm: the layers that write the units
        group.stats = writers
    return group, ""


def _order(model: nn.Module, sample) -> dict[str, int]:
    """Module name -> position of its first call in a forward pass on ``sample``."""
    order: dict[str, int] = {}

    def seen(name: str) -> None:
        order.setdefault(name, len(order))

    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            forward(model, sample)
    finally:
        for h in hooks:
            h.remove()
    return order


def _double(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _preserves(model64: nn.Module, state64: dict, sample64, reference: torch.Tensor, groups: list[Group],
               perms: list[torch.Tensor]) -> bool:
    model64.load_state_dict(permute_state(state64, groups, perms))
    with torch.no_grad():
        got = forward(model64, sample64)
    return got.shape == reference.shape and bool(torch.allclose(got, reference, rtol=1e-7, atol=1e-9 * (
        1 + float(reference.abs().max()))))


def permutation_groups(model: nn.Module, sample) -> tuple[list[Group], list[str]]:
    """The hidden dimensions of ``model`` whose units can be permuted without changing its function.

    ``sample``: a batch the model accepts (it is traced by Torch-Pruning and every group is checked
    on it). Returns the groups, in the order their outputs are computed, and one line per group left
    out (why). Raises ``ConfigError`` when the model cannot be traced or nothing can be permuted.
    """
    import torch_pruning as tp

    work = copy.deepcopy(model).eval()
    names = {id(m): n for n, m in work.named_modules()}
    modules = dict(work.named_modules())
    ignored = [modules[n] for n in output_layers(work, sample)]
    try:
        with warnings.catch_warnings():  # its notes on bare parameters: such groups are reported below
            warnings.simplefilter("ignore")
            dg = tp.DependencyGraph().build_dependency(work, example_inputs=sample, output_transform=select)
            tp_groups = list(dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Linear,) + CONVS))
    except TP_ERRORS as e:
        raise tp_failure(e, work) from None
    state = work.state_dict()
    candidates, skipped = [], []
    for g in tp_groups:
        size = len(g[0].idxs)
        group, why = _from_tp(g, dg, names, state, size)
        if group is None:
            skipped.append(f"{names[id(g[0].dep.target.module)]}: {why}")
        elif size > 1:
            candidates.append(group)
    del dg
    # every group must be a symmetry on its own: a random reordering of its units leaves the outputs
    model64 = copy.deepcopy(work).double()
    state64 = {k: v.clone() for k, v in model64.state_dict().items()}
    sample64 = _double(sample) if isinstance(sample, torch.Tensor) else sample
    with torch.no_grad():
        reference = forward(model64, sample64)
    gen = torch.Generator().manual_seed(0)
    groups = []
    for g in candidates:
        perm = torch.randperm(g.size, generator=gen)
        if _preserves(model64, state64, sample64, reference, [g], [perm]):
            groups.append(g)
        else:
            skipped.append(f"{g.layer}: reordering its units changes the model's outputs (the graph mixes them in "
                           "a way Torch-Pruning's trace does not show)")
    if not groups:
        raise ConfigError("rebasin found no hidden units it can permute in this model"
                          + (f" ({'; '.join(skipped[:3])})" if skipped else "")
                          + "; merge it with a soup (method='uniform') if the members share an initialisation, or "
                            "ensemble them")
    position = _order(work, sample)
    for g in groups:
        g.stats = dict(sorted(g.stats.items(), key=lambda kv: position.get(kv[0], len(position))))
    groups.sort(key=lambda g: min(position.get(n, len(position)) for n in g.stats) if g.stats else len(position))
    return groups, skipped


# ----------------------------------------------------------------------------- permutations


def _by_key(groups: list[Group]) -> dict[str, list[tuple[int, int, torch.Tensor]]]:
    out: dict[str, list[tuple[int, int, torch.Tensor]]] = {}
    for gi, g in enumerate(groups):
        for key, axis, index in g.entries:
            out.setdefault(key, []).append((axis, gi, index))
    return out


def _permute(w: torch.Tensor, axis: int, perm: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``w`` with unit ``u``'s positions along ``axis`` taken from unit ``perm[u]``'s."""
    order = torch.arange(w.shape[axis])
    order[index.flatten()] = index[perm].flatten()
    return w.index_select(axis, order)


def permute_state(state: dict, groups: list[Group], perms: list[torch.Tensor]) -> dict:
    """A new state dict with every group's units reordered by its permutation (new unit u = old unit perm[u])."""
    out = dict(state)
    for key, entries in _by_key(groups).items():
        w = state[key]
        for axis, gi, index in entries:
            w = _permute(w, axis, perms[gi], index)
        out[key] = w
    return out


def _rows(w: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """One row per unit: everything ``w`` holds of it."""
    return w.double().index_select(axis, index.flatten()).movedim(axis, 0).reshape(len(index), -1)


def weight_matching(groups: list[Group], ref: dict, state: dict, *, seed: int = 0, max_iter: int = 100) -> list:
    """Permutations of ``state``'s hidden units that maximise the inner product with ``ref``'s weights
    (coordinate descent over the groups, each a linear assignment).

    Compared are the tensors of the layers (weights, biases, embeddings), not normalisation vectors
    and running statistics: those per-unit scalars have a scale unrelated to the weights' and
    dominated the assignment (two ResNet-8s on mnist5k: the aligned average 0.38 accurate with them,
    0.65 without)."""
    from scipy.optimize import linear_sum_assignment

    axes = _by_key(groups)
    perms = [torch.arange(g.size) for g in groups]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        changed = False
        for gi in torch.randperm(len(groups), generator=gen).tolist():
            g = groups[gi]
            cost = torch.zeros(g.size, g.size, dtype=torch.float64)
            for key, axis, index in g.entries:
                if key in g.norms:
                    continue
                w = state[key]
                for other_axis, other, other_index in axes[key]:
                    if other != gi:
                        w = _permute(w, other_axis, perms[other], other_index)
                cost += _rows(ref[key], axis, index) @ _rows(w, axis, index).T
            _, col = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(col, dtype=torch.long)
            idx = torch.arange(g.size)
            if cost[idx, new].sum() > cost[idx, perms[gi]].sum() + 1e-12 * cost.abs().sum():
                perms[gi], changed = new, True
        if not changed:
            break
    return perms


def _features(model: nn.Module, names: list[str], x: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """Outputs of the named modules on ``x`` as (rows, channels): feature maps give a row per position."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: store[n].append(
        (o.movedim(1, -1).reshape(-1, o.shape[1]) if o.dim() > 2 else o).double())) for n in set(names)]
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, len(x), batch_size):
                forward(model, x[s : s + batch_size])
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


def activation_matching(groups: list[Group], ref: nn.Module, model: nn.Module, x: torch.Tensor) -> list:
    """Permutations of ``model``'s hidden units that maximise the correlation of their outputs with ``ref``'s,
    summed over every module of the group that carries them."""
    from scipy.optimize import linear_sum_assignment

    names = sorted({n for g in groups for n in g.stats})
    fa, fb = _features(ref, names, x), _features(model, names, x)
    perms = []
    for g in groups:
        corr = torch.zeros(g.size, g.size, dtype=torch.float64)
        for n, channels in g.stats.items():
            a, b = fa[n][:, channels], fb[n][:, channels]
            za = (a - a.mean(0)) / (a.std(0) + EPS)
            zb = (b - b.mean(0)) / (b.std(0) + EPS)
            corr += za.T @ zb / len(za)
        _, col = linear_sum_assignment(corr.numpy(), maximize=True)
        perms.append(torch.as_tensor(col, dtype=torch.long))
    return perms


def trace_sample(model: nn.Module, x: torch.Tensor | None):
    """A small batch to trace ``model`` with: the first rows of ``x``, else noise of its input shape
    (from its task or zoo spec). Noise, not zeros: the symmetry check needs units to differ."""
    if x is not None:
        return x[:8]
    shape = input_shape(model)
    if shape is None:
        raise ConfigError("rebasin traces the model to find its permutable units: pass data= (or x=)")
    return torch.rand(8, *shape, generator=torch.Generator().manual_seed(0))


def align(model: nn.Module, ref: nn.Module, *, matching: str = "weights", x: torch.Tensor | None = None,
          seed: int = 0, groups: list[Group] | None = None) -> nn.Module:
    """A copy of ``model`` with its hidden units permuted to match ``ref`` (the same function as ``model``).

    ``x``: inputs for activation matching, and to trace the model (default: its task's input shape);
    ``groups``: :func:`permutation_groups` of the architecture, when already known.
    """
    if groups is None:
        groups, _ = permutation_groups(model, trace_sample(model, x))
    if matching == "weights":
        perms = weight_matching(groups, ref.state_dict(), model.state_dict(), seed=seed)
    else:
        if x is None:
            raise ConfigError("activation matching needs inputs: pass x=")
        perms = activation_matching(groups, ref, model, x)
    out = copy.deepcopy(model)
    out.load_state_dict(permute_state(model.state_dict(), groups, perms))
    return out.eval()


def _stats(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    feats = _features(model, names, x)
    return {n: (f.mean(0), f.std(0)) for n, f in feats.items()}


def apply_repair(merged: nn.Module, members: list[nn.Module], x: torch.Tensor, groups: list[Group]) -> nn.Module:
    """REPAIR in place: every hidden channel of ``merged`` gets the members' average mean and std.

    Module by module in the order they run (a correction changes what later modules see): the
    affine map of each BatchNorm of a group (or of each layer writing the units, without one) is
    rescaled and shifted. A module without bias is only rescaled.
    """
    names = list(dict.fromkeys(n for g in groups for n in g.stats))  # a module shared by groups: once
    targets = [_stats(m, names, x) for m in members]
    mods = dict(merged.named_modules())
    for name in names:
        mu = torch.stack([t[name][0] for t in targets]).mean(0)
        sd = torch.stack([t[name][1] for t in targets]).mean(0)
        got_mu, got_sd = _stats(merged, [name], x)[name]
        s = sd / (got_sd + EPS)
        mod = mods[name]
        with torch.no_grad():
            shape = (-1,) + (1,) * (mod.weight.dim() - 1)
            mod.weight.mul_(s.view(shape).to(mod.weight.dtype))
            if mod.bias is not None:
                mod.bias.copy_(((mod.bias.double() - got_mu) * s + mu).to(mod.bias.dtype))
    return merged


__all__ = ["Group", "activation_matching", "align", "apply_repair", "permutation_groups", "permute_state",
           "trace_sample", "weight_matching"]
