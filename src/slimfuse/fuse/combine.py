"""The :class:`Ensemble` module: members plus a combiner, one ``nn.Module``.

Its output is the log of the combined class probabilities, so an ensemble is
measured, saved, exported, quantized and distilled like any model. Combiners:

- ``mean``: average of member probabilities (``weights`` makes it a weighted mean);
- ``mean-logits``: softmax of the average member logits;
- ``vote``: majority vote; probabilities are ``(votes + mean probability) / (K + 1)``, so the
  argmax is the majority (ties broken by mean probability) and the NLL stays finite;
- ``stacking``: a meta-learner (a :class:`LogLinearPool`, a ``Linear`` or a small MLP, stored as
  tensors) on the concatenated member probabilities.

Members of one architecture made of Linear / ReLU / Flatten / Dropout layers (the zoo's MLPs) are
*fused* at inference: one wider network whose first layer is one matmul over the members' weights
side by side and whose later layers are one batched matmul each over the stacked weights (block
diagonal in effect), in torch and in the exported ONNX graph (:class:`FusedMLP`). Other members of
one architecture can run as one ``vmap`` call (``torch.func.stack_module_state``) when asked; the
rest, and anything that trains, run one by one. A batched path is checked against the loop the
first time it is built for a set of weights, and abandoned if the two disagree.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from itertools import chain
from operator import attrgetter

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..errors import ArtifactError, ConfigError
from ..models import zoo
from ..models.calling import forward, select, selector, set_output
from ..models.spec import attach, spec_of

METHODS = ("mean", "mean-logits", "vote", "weighted", "stacking")
_VERSION = attrgetter("_version")
_COMBINED = object()  # _members' second value when the fused graph returned the combined output itself
# torch's module-wide forward hooks (``register_module_forward_hook`` / ``..._pre_hook``), dicts kept in place
_GLOBAL_HOOKS = [torch.nn.modules.module._global_forward_hooks, torch.nn.modules.module._global_forward_pre_hooks]


def _on_onnx_runtime(member: nn.Module) -> bool:
    """An ONNX Runtime predictor (``slimfuse_runtime``, read without importing onnx)."""
    return getattr(member, "slimfuse_runtime", None) == "onnxruntime"


class Ensemble(nn.Module):
    """``members`` combined by ``method``; ``forward`` returns log-probabilities (B, C)."""

    def __init__(self, members, method: str = "mean", *, classes: int, weights=None, meta: nn.Module | None = None,
                 temperature: float = 1.0, bag: int = 1):
        super().__init__()
        if method not in METHODS:
            raise ConfigError(f"unknown ensemble method {method!r}; choose one of: {', '.join(METHODS)}")
        if len(members) == 0:
            raise ConfigError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.method = method
        self.classes = int(classes)
        k = len(self.members)
        w = torch.full((k,), 1.0 / k) if weights is None else torch.as_tensor(weights, dtype=torch.float32).clone()
        if w.shape != (k,) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"weights must be {k} non-negative numbers with a positive sum, got {w.tolist()}")
        self.register_buffer("weights", w / w.sum())
        if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
            raise ConfigError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)  # mean / weighted: softmax(log p / temperature)
        if method == "stacking" and meta is None:
            raise ConfigError("method 'stacking' needs a meta-learner")
        if isinstance(bag, bool) or not isinstance(bag, int) or bag < 1 or k % bag or (
                bag > 1 and method != "stacking"):
            raise ConfigError(f"bag must be a positive integer dividing the {k} members (stacking only), got {bag!r}")
        self.meta = meta
        # stacking over k-fold members: the members are ``bag`` sets of fold models, set f the K models
        # trained without fold f; the meta-learner reads each member's probabilities averaged over the sets
        self.bag = bag
        # None (auto): vmap for same-architecture members on an accelerator; on CPU the plain loop,
        # which measured faster there (BENCHMARKS.md). True / False force vmap / the loop.
        self.vectorize: bool | None = None
        # fuse same-architecture MLP members into one wider network when gradients are off (default)
        self.fuse: bool = True
        self._fused = None  # (_state(), FusedMLP / ONNX Runtime graph / None, log weights, graph's combiner)
        self._stacked = None  # (_state(), (batched fn, params, buffers) or None when only the loop is valid)
        self._tree = None  # the module-tree dicts _watched reads
        self.last_path = None  # "fused", "vmap" or "loop": how the last forward ran the members

    def slimfuse_counts(self) -> dict[str, int]:
        """Parameters of every member (ONNX Runtime members included) and of the meta-learner."""
        from ..measure import counts

        parts = [counts(m) for m in self.members] + ([counts(self.meta)] if self.meta is not None else [])
        return {k: sum(p[k] for p in parts) for k in ("params", "nonzeros")}

    # ---- members -------------------------------------------------------------------------------
    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's logits, stacked: (K, B, C). ``x``: a tensor, or a tuple/dict of tensors (members
        called by ``models/calling.py``; only the member loop runs them)."""
        return self._members(x, combined=False)[0]

    def _members(self, x, combined: bool = True):
        """(member logits (K, B, C), the log weights (K, 1, 1) cached with a fused or vmapped path or None);
        with ``combined``, ONNX Runtime members' one graph may return the combined output (``_COMBINED``)."""
        if not isinstance(x, torch.Tensor):
            self._ran("loop")
            return self._loop(x), None
        if self._use_fused():
            fused = self._fused_net(x)
            if isinstance(fused, FusedMLP):
                self._ran("fused")
                return fused.forward(x), self._fused[2]  # no hooks on this private module: skip __call__
            if fused is not None and combined:
                self._ran("fused")
                return fused.forward(x), _COMBINED
        if self._use_vmap():
            stacked = self._stacked_state(x)
            if stacked is not None:
                self._ran("vmap")
                return self._vmap(stacked, x), self._stacked[2]
        self._ran("loop")
        return self._loop(x), None

    def _ran(self, path: str) -> None:
        if self.last_path != path:  # nn.Module.__setattr__ costs microseconds per call
            self.last_path = path

    def _loop(self, x):
        quiet = nullcontext()
        if sum(map(_on_onnx_runtime, self.members)) > 1:
            from ..runtime import spinning, spinning_chosen  # members in turn: no threads left spinning

            quiet = nullcontext() if spinning_chosen() else spinning(False)
        with quiet:
            return torch.stack([forward(m, x) for m in self.members])

    @staticmethod
    def _vmap(stacked, x):
        batched, params, buffers = stacked
        return batched(params, buffers, x)

    def _use_vmap(self) -> bool:
        wanted = self.vectorize
        if wanted is None:
            wanted = any(p.device.type != "cpu" for p in self.parameters())
        return (
            wanted
            and len(self.members) > 1
            and not self.training
            and not torch.is_grad_enabled()
            and not torch.jit.is_tracing()
            and not torch.jit.is_scripting()
            and not torch.onnx.is_in_onnx_export()
            and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None  # FLOP counters and tracers see the plain loop
        )

    def _use_fused(self) -> bool:
        return (
            self.fuse
            and self.vectorize is None
            and len(self.members) > 1
            and not self.training
            and (not torch.is_grad_enabled() or torch.onnx.is_in_onnx_export())
            and _get_current_dispatch_mode() is None  # FLOP counters see the members' own work
        ) or self._use_graph()

    def _use_graph(self) -> bool:
        """ONNX Runtime members only: their one graph runs in training mode and with gradients on as
        well (the members run inference either way)."""
        return (
            self.fuse
            and self.vectorize is None
            and len(self.members) > 1
            and all(map(_on_onnx_runtime, self.members))
            and not torch.jit.is_tracing()
            and _get_current_dispatch_mode() is None
        )

    def _fused_net(self, x):
        if (self._fused is not None and self._unchanged(self._fused[0])
                and (self._fused[3] is None or self._fused[3] == (self.method, self.temperature))):
            return self._fused[1]
        sig = self._state()
        net = None
        tracing = torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
        if self._copyable(sig) and FusedMLP.supports(list(self.members)):  # hooks fire only in the loop
            net = FusedMLP(list(self.members))
            # trust the fused network only once it reproduces the loop on real inputs
            if not tracing and not torch.allclose(net(x), self._loop(x), rtol=1e-4, atol=1e-5):
                net = None
        elif self._copyable(sig) and not tracing and (graph := self.slimfuse_onnx()) is not None:
            from ..runtime import OnnxPredictor

            proto, options = graph
            try:
                net = OnnxPredictor.from_bytes(proto.SerializeToString(), threads=self.members[0].threads,
                                               where="the members' one graph", **options)
                if not torch.allclose(net(x), self.combine(self._loop(x)), rtol=1e-4, atol=1e-5):
                    net = None
            except ArtifactError:  # ONNX Runtime refused the joined graph: the members run one by one
                net = None
        # the one graph has the combiner built in: a change of method or temperature rebuilds it
        baked = (self.method, self.temperature) if net is not None and not isinstance(net, FusedMLP) else None
        self._fused = (sig, net, self._log_weights(), baked)
        return net

    def slimfuse_onnx(self):
        """ONNX Runtime members (``mean``, ``weighted``, ``mean-logits``) as one ONNX graph with the
        combiner (:func:`slimfuse.runtime.ensemble_graph`), which ``export`` writes, and the predictor
        options it needs (``input_layout``); else ``None``."""
        if not all(map(_on_onnx_runtime, self.members)):
            return None  # (before importing onnx)
        from ..runtime import OnnxPredictor, ensemble_graph

        if not all(isinstance(m, OnnxPredictor) for m in self.members):
            return None
        proto = ensemble_graph(list(self.members), self.method, self.weights.log().tolist(), self.temperature)
        return None if proto is None else (proto, {"input_layout": self.members[0].input_layout})

    # A fused or vmapped path is a copy of the members' weights, so before every call it checks that
    # the members are as when it was built: every ``_modules`` / ``_parameters`` / ``_buffers`` dict
    # from the ensemble down (anything attached anywhere in the tree changes one of them), then the
    # version counter and storage of every tensor (in-place updates and ``.data`` swaps). A forward
    # hook on any member module, or a global one (``register_module_forward_hook``), makes the
    # members run one by one, where the hooks fire. C-level maps over views made once: this runs on
    # every call, where a batch-1 forward takes tens of microseconds.
    def _watched(self) -> tuple[tuple[int, ...], bool]:
        """(ids of everything in the watched dicts, whether any forward hook is set)."""
        if self._tree is None:
            subs = list(self.members.modules())
            self._tree = ([d.values() for s in (self, *subs) for d in (s._modules, s._parameters, s._buffers)],
                          [d for s in subs for d in (s._forward_hooks, s._forward_pre_hooks)] + _GLOBAL_HOOKS)
        return tuple(map(id, chain.from_iterable(self._tree[0]))), any(map(len, self._tree[1]))

    def _state(self):
        """What :meth:`_unchanged` compares against; holds the watched objects, so none of their ids can
        be handed on to a replacement."""
        self._tree = None  # re-read the module tree
        key = self._watched()
        values = list(chain.from_iterable(self._tree[0]))
        tensors = [v for v in values if isinstance(v, torch.Tensor) and not v.is_inference()]
        # a tensor made under inference_mode has no version counter: its in-place changes cannot be seen
        opaque = len(tensors) < sum(isinstance(v, torch.Tensor) for v in values)
        return (key, tuple(map(_VERSION, tensors)), tuple(map(torch.Tensor.data_ptr, tensors)), tensors, values,
                opaque)

    @staticmethod
    def _copyable(state) -> bool:
        """Whether a fused or vmapped copy may be built on this state: no hooks, every tensor watchable."""
        return not state[0][1] and not state[5]

    def _unchanged(self, state) -> bool:
        key, versions, pointers, tensors = state[:4]
        return (self._watched() == key  # the same objects, so ``tensors`` are the members' tensors
                and tuple(map(_VERSION, tensors)) == versions
                and tuple(map(torch.Tensor.data_ptr, tensors)) == pointers)

    def _log_weights(self) -> torch.Tensor:
        """log(weights) as (K, 1, 1), kept beside a fused or vmapped path (``weights`` is watched with it)."""
        with torch.inference_mode(False), torch.no_grad():
            return self.weights.log().view(-1, 1, 1)

    def _stacked_state(self, x):
        if self._stacked is not None and self._unchanged(self._stacked[0]):
            return self._stacked[1]
        sig = self._state()
        stacked = None
        if self._copyable(sig) and same_architecture(list(self.members)):
            with torch.inference_mode(False), torch.no_grad():
                params, buffers = stack_module_state(list(self.members))
                params = {k: v.detach() for k, v in params.items()}
                base = copy.deepcopy(self.members[0]).to("meta")

                def one(p, b, inp):
                    return select(functional_call(base, (p, b), (inp,), tie_weights=False))

                candidate = (vmap(one, in_dims=(0, 0, None)), params, buffers)
            # trust the batched path only once it reproduces the loop on real inputs
            try:
                if torch.allclose(self._vmap(candidate, x), self._loop(x), rtol=1e-4, atol=1e-5):
                    stacked = candidate
            except Exception:  # an op without a batching rule, a member that inspects its tensors ...
                stacked = None
        self._stacked = (sig, stacked, self._log_weights())
        return stacked

    # ---- combiner ------------------------------------------------------------------------------
    def forward(self, x=None, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:  # several or keyword inputs: passed on to every member as they came
            x = kwargs if x is None and not args else (x, *args) if not kwargs else None
            if x is None:
                raise ConfigError("an ensemble passes on either positional or keyword inputs, not both")
        out, log_weights = self._members(x)
        return out if log_weights is _COMBINED else self.combine(out, log_weights)

    def combine(self, logits: torch.Tensor, log_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Combine member logits (K, B, C) into log-probabilities (B, C) (``log_weights``: log(weights)
        as (K, 1, 1), when already at hand).

        In torch, ``mean``, ``weighted`` and ``mean-logits`` on 16 rows or more work class-major,
        (K, C, B): torch's CPU softmax over a last dimension of a few classes runs one short row at a
        time (log_softmax of (5, 256, 10): 107 us over the classes last, 6 us class-major, on this
        project's 2-core Xeon); on fewer rows each kernel call costs more than its work, and the
        transposes are left out. The logsumexp over the members is spelled out (``torch.logsumexp`` is
        several kernels: 7.7-8.3 us for (5, 1, 10), the six spelled out 6.4 us). An ONNX export (a trace) keeps
        the classes last: ONNX Runtime's LogSoftmax and ReduceLogSumExp ran that graph faster (batch 1:
        13.5 vs 17.1 us for five 64-32-10 members)."""
        graph = torch.jit.is_tracing() or torch.compiler.is_compiling()  # 0.2 us; is_in_onnx_export: 1 us
        if self.method in ("mean", "weighted", "mean-logits") and not graph:
            rows = logits.shape[1] < 16  # classes last, (K, B, C); else class-major (K, C, B)
            z = logits if rows else logits.transpose(1, 2).contiguous()
            if self.method == "mean-logits":
                out = F.log_softmax(z.mean(0), dim=1 if rows else 0)
            else:
                logw = self.weights.log().view(-1, 1, 1) if log_weights is None else log_weights
                logp = F.log_softmax(z, dim=2 if rows else 1)
                if torch.is_grad_enabled():  # log of the weighted mean probability
                    logp = logp + logw
                    top = logp.detach().amax(0)  # the shift cancels in the gradient
                    out = (logp - top).exp().sum(0).log() + top
                else:  # in place: a batch-1 call is mostly per-kernel overhead
                    top = logp.add_(logw).amax(0)
                    out = logp.sub_(top).exp_().sum(0).log_().add_(top)
                if self.temperature != 1.0:
                    out = F.log_softmax(out / self.temperature, dim=1 if rows else 0)
            return out if rows else out.t().contiguous()
        logp = F.log_softmax(logits, dim=-1)
        if self.method == "mean-logits":
            return F.log_softmax(logits.mean(0), dim=-1)
        if self.method in ("mean", "weighted"):
            out = torch.logsumexp(logp + self.weights.log()[:, None, None], dim=0)
            return out if self.temperature == 1.0 else F.log_softmax(out / self.temperature, dim=-1)
        if self.method == "vote":
            votes = F.one_hot(logits.argmax(-1), self.classes).to(logp.dtype).sum(0)
            k = logits.shape[0]
            return torch.log((votes + logp.exp().mean(0)) / (k + 1))
        return F.log_softmax(self.meta(stack_features(logits, self.bag)), dim=-1)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, classes={self.classes}, weights={[round(w, 4) for w in self.weights.tolist()]}"

    def __getstate__(self):  # deepcopy / pickle: drop the cache of stacked weights
        state = dict(self.__dict__)
        state["_stacked"] = state["_tree"] = state["_fused"] = None
        return state

    def __setstate__(self, state):
        state.setdefault("fuse", True)
        state.setdefault("temperature", 1.0)
        state.setdefault("bag", 1)
        state.setdefault("_fused", None)
        self.__dict__.update(state)

    def _apply(self, fn, *args, **kwargs):  # .to(), .double(), ...: rebuild the stacked weights
        self._stacked = self._tree = self._fused = None
        return super()._apply(fn, *args, **kwargs)


class FusedMLP(nn.Module):
    """K members of one MLP architecture as one network: (B, ...) -> member logits (K, B, C).

    The first Linear is one matmul with the members' weights side by side (F, K*H), every later
    Linear one batched matmul over the stacked weights (K, H_in, H_out), so each layer is one
    kernel call whatever K is. Inference only: the weights are detached copies (Dropout is the
    identity, as in eval mode)."""

    ALLOWED = (nn.Linear, nn.ReLU, nn.Flatten, nn.Dropout, nn.Identity)

    @classmethod
    def supports(cls, members: list[nn.Module]) -> bool:
        if not same_architecture(members):
            return False
        first = members[0]
        if not isinstance(first, nn.Sequential) or not all(type(c) in cls.ALLOWED for c in first):
            return False
        kinds = [type(c) for c in first]
        linears = [i for i, t in enumerate(kinds) if t is nn.Linear]
        # flattening only before the first Linear (later the activations are (K, B, H))
        return bool(linears) and all(t is not nn.Flatten for t in kinds[linears[0]:])

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.k = len(members)
        self.ops: list[tuple[str, str, str]] = []  # (op, weight buffer, bias buffer)
        self.flatten = None
        n = 0
        with torch.no_grad():
            for j, child in enumerate(members[0]):
                if isinstance(child, nn.Flatten):
                    self.flatten = (child.start_dim, child.end_dim)
                elif isinstance(child, nn.ReLU):
                    self.ops.append(("relu", "", ""))
                elif isinstance(child, nn.Linear):
                    ws = [m[j].weight.detach() for m in members]
                    bs = [m[j].bias.detach() if m[j].bias is not None else torch.zeros(m[j].out_features)
                          for m in members]
                    if n == 0:  # (F, K*H): one plain matmul on the shared input
                        self.register_buffer(f"w{n}", torch.cat([w.t() for w in ws], 1).contiguous())
                        self.register_buffer(f"b{n}", torch.cat(bs).contiguous())
                    else:  # (K, H_in, H_out) and (K, 1, H_out): one batched matmul
                        self.register_buffer(f"w{n}", torch.stack([w.t() for w in ws]).contiguous())
                        self.register_buffer(f"b{n}", torch.stack(bs)[:, None, :].contiguous())
                    self.ops.append(("first" if n == 0 else "bmm", f"w{n}", f"b{n}"))
                    n += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten is not None:
            x = torch.flatten(x, *self.flatten)
        h, buffers = x, self._buffers  # a dict lookup per tensor: Module.__getattr__ costs a microsecond
        for op, w, b in self.ops:
            if op == "relu":
                h = torch.relu(h)
            elif op == "first":
                h = torch.addmm(buffers[b], h, buffers[w]) if h.dim() == 2 else h @ buffers[w] + buffers[b]
                h = h.reshape(h.shape[0], self.k, -1).transpose(0, 1)  # (K, B, H)
            else:
                h = torch.baddbmm(buffers[b], h, buffers[w])
        return h


def stack_features(logits: torch.Tensor, bag: int = 1) -> torch.Tensor:
    """Stacking meta-features: member probabilities side by side, (K, B, C) -> (B, K*C); with
    ``bag`` sets of K fold models, (bag*K, B, C) -> (B, K*C), each member's probabilities averaged
    over the sets.

    Probabilities rather than log-probabilities: bounded, and less sensitive to the confidence
    gap between fold models (meta-training) and the members refitted on all rows (inference);
    :class:`LogLinearPool` takes the log of them itself, floored.
    """
    n, b, c = logits.shape
    p = F.softmax(logits.transpose(1, 2).contiguous(), dim=1)  # class-major (see Ensemble.combine)
    if bag > 1:
        p = p.view(bag, n // bag, c, b).mean(0)
    return p.permute(2, 0, 1).reshape(b, (n // bag) * c)


def same_architecture(members: list[nn.Module]) -> bool:
    """True when ``functional_call`` on member 0 with member i's tensors computes member i.

    Same module tree, hyper-parameters (repr), tensor names, shapes and dtypes; and every
    state entry is a parameter or buffer (no packed or opaque state that vmap cannot swap).
    """
    if len(members) < 2:
        return False
    first = members[0]

    def layout(m):
        return [(k, tuple(v.shape), v.dtype) for k, v in (*m.named_parameters(), *m.named_buffers())]

    want = layout(first)
    names = {k for k, _ in (*first.named_parameters(), *first.named_buffers())}
    if set(first.state_dict()) - names or any(m._forward_hooks or m._forward_pre_hooks for m in first.modules()):
        return False
    return all(type(m) is type(first) and repr(m) == repr(first) and layout(m) == want for m in members[1:])


class LogLinearPool(nn.Module):
    """Stacking meta-learner: ``log_softmax(sum_k a_k log p_k + b)`` over K members' probabilities, one
    learned exponent per member and a bias per class (K + C numbers; a product of experts, where the
    logistic regression on all K x C probabilities learns K x C x C). Probabilities are floored at
    ``FLOOR`` so one member's confident zero cannot veto a class."""

    FLOOR = 1e-7

    def __init__(self, members: int, classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.full((members,), 1.0 / members))
        self.bias = nn.Parameter(torch.zeros(classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, K*C) probabilities -> (B, C) logits
        logp = features.clamp_min(self.FLOOR).log().view(features.shape[0], self.weight.shape[0], -1)
        return (logp * self.weight[:, None]).sum(1) + self.bias


def meta_module(kind: str, features: int, classes: int, hidden: list[int] | None = None) -> nn.Module:
    """The stacking meta-learner's architecture: ``loglinear`` (:class:`LogLinearPool`), ``linear``
    (logistic regression on the probabilities) or ``mlp`` (one hidden ReLU layer per width)."""
    if kind == "loglinear":
        if features % classes:
            raise ArtifactError(f"a loglinear meta-learner needs members x classes features, got {features} "
                                f"for {classes} classes")
        return LogLinearPool(features // classes, classes)
    if kind == "linear":
        return nn.Linear(features, classes)
    if kind == "mlp":
        layers, width = [], features
        for h in hidden or [32]:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        return nn.Sequential(*layers, nn.Linear(width, classes))
    raise ConfigError(f"unknown meta-learner {kind!r}; choose loglinear, linear (logistic regression) or mlp")


@zoo.register("ensemble")
def build_ensemble(members: list, method: str, classes: int, meta: dict | None = None,
                   temperature: float = 1.0, bag: int = 1, outputs: list | None = None) -> Ensemble:
    """Rebuild an ensemble from its spec: member specs, combiner, meta-learner architecture, and the
    members' output selectors (``outputs``: a key, an index or null per member)."""
    if not isinstance(members, list) or not members:
        raise ArtifactError("ensemble spec: 'members' must be a non-empty list of member specs")
    if outputs is not None and (not isinstance(outputs, list) or len(outputs) != len(members) or not all(
            o is None or (isinstance(o, (str, int)) and not isinstance(o, bool)) for o in outputs)):
        raise ArtifactError("ensemble spec: 'outputs' must list a key, an index or null for every member")
    built = [zoo.build(s) for s in members]
    for m, o in zip(built, outputs or [], strict=False):
        if o is not None:
            set_output(m, o)
    try:
        meta_net = meta_module(meta["kind"], meta["features"], classes, meta.get("hidden")) if meta else None
    except (KeyError, TypeError, ConfigError) as e:
        raise ArtifactError(f"ensemble spec: bad meta-learner description {meta!r} ({e})") from None
    try:
        return make(built, method, classes=classes, meta=meta_net, meta_spec=meta, temperature=temperature, bag=bag)
    except ConfigError as e:
        raise ArtifactError(f"ensemble spec: {e}") from None


def make(members, method, *, classes, weights=None, meta=None, meta_spec=None, temperature: float = 1.0,
         bag: int = 1) -> Ensemble:
    """An :class:`Ensemble` with its spec attached (needs every member to have a spec)."""
    ens = Ensemble(members, method, classes=classes, weights=weights, meta=meta, temperature=temperature, bag=bag)
    specs = [spec_of(m) for m in members]
    if any(s is None for s in specs):
        raise ConfigError(
            "every member needs a slimfuse spec so the ensemble can be saved and reloaded; "
            "build members with slimfuse.zoo or slimfuse.zoo.user_model"
        )
    args = {"members": specs, "method": method, "classes": int(classes), "meta": meta_spec}
    if ens.temperature != 1.0:  # absent from older cards: they reload with 1.0
        args["temperature"] = ens.temperature
    if bag > 1:
        args["bag"] = bag
    outputs = [selector(m) for m in members]
    if any(o is not None for o in outputs):  # members read through set_output keep their choice on reload
        if not all(o is None or isinstance(o, (str, int)) for o in outputs):
            raise ConfigError("a member reads its output through a callable (set_output), which an ensemble's "
                              "spec cannot record; select it by key or index")
        args["outputs"] = outputs
    return attach(ens, {"arch": "ensemble", "args": args})
