"""The validation gate every technique passes its result through before returning it.

``check(result, step, reference=..., data=...)`` runs the result on a small sample (at most
``SAMPLES`` inputs: the given data's validation split, a calibration/export sample, or, with
no data, a seeded synthetic sample of the task's input shape) and refuses to hand back a
model that

- crashes on the sample (the error names the innermost module that was running);
- gives outputs of the wrong shape, or NaN / infinite values (the first module producing them
  is named; for an ONNX model, the quantization scales that are not finite);
- *collapses*: predicts one class for the whole sample where the input model predicted
  several, or agrees with the input model on fewer than ``min(AGREEMENT_FLOOR, CHANCE_MULTIPLE /
  classes)`` of the predicted classes (``QUANTIZE_FLOOR`` for int8 quantization), or has a
  mean cosine with the input model's outputs below ``COSINE_FLOOR`` (embeddings and other
  outputs; ``QUANTIZE_COSINE_FLOOR`` for int8);
- does not save -> load -> rerun bit-exactly (in a temporary folder).

Each failure is a :class:`ValidationError` naming the step, the layer where known and the fix
to try. ``validate=False`` in a technique skips the gate; either way the outcome is recorded
in the last lineage step (``"validation"``), so the artifact's card says what was checked.

The floors are deliberately loose: they tell a broken model from a worse one. Accuracy
budgets belong to the caller (``optimize``'s ``max_drop``, a report).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import Split, Splits
from .data.feed import cat, feed, is_tensor_input, n_samples, take
from .distributed import is_main
from .errors import SlimfuseError
from .models.calling import call, forward, selector
from .models.spec import ATTR, spec_of, task_of

SAMPLES = 256  # inputs the gate runs (a few hundred at most keeps it cheap)
AGREEMENT_FLOOR = 0.5  # classification: share of sample predictions equal to the input model's, at most ...
CHANCE_MULTIPLE = 2.0  # ... this multiple of chance (1 / classes): 0.2 for 10 classes, 0.5 for 2 to 4
QUANTIZE_FLOOR = 0.8  # int8 quantization is near-lossless: its floor is higher ...
QUANTIZE_COSINE_FLOOR = 0.9  # ... also for embeddings (raw MiniLM export: 0.83 by default, 0.94 op_types=MatMul)
COSINE_FLOOR = 0.5  # other outputs: mean cosine between the result's and the input model's outputs
COLLAPSE_MIN_SAMPLES = 16  # collapse is judged only on a sample at least this large


class ValidationError(SlimfuseError, ValueError):
    """A technique's result is broken (crash, NaN, collapse, no bit-exact reload); nothing is returned."""


def sample_inputs(data=None, model: nn.Module | None = None, *, n: int = SAMPLES, seed: int = 0):
    """Up to ``n`` inputs: from ``data`` (Splits: validation split, else training), a Split or a tensor,
    or the first ``n`` samples of data of any other form :func:`slimfuse.data.feed.feed` reads (a
    DataLoader, ...: read no further); else ``n`` seeded uniform inputs shaped like the model's
    classification task; else ``None``. Inputs may be a tensor, a tuple or a dict of tensors."""
    x = None
    if isinstance(data, Splits):
        data = data.val if len(data.val) else data.train
    if isinstance(data, Split):
        x = data.x
    elif isinstance(data, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(data))
    elif isinstance(data, torch.Tensor):
        x = data
    elif data is not None:
        x = feed(data, labels=None, where="the validation sample").head(n).x
    if x is not None and not is_tensor_input(x):
        return take(x, slice(0, n))
    if x is not None:
        x = x[:n]
        return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x
    task = task_of(model) if model is not None else None
    if task and task.get("input_shape") and task.get("kind", "classification") == "classification":
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(min(n, 64), *task["input_shape"], generator=gen)
    return None


def check(result: nn.Module, step: str, *, reference: nn.Module | Sequence[nn.Module] | None = None, data=None,
          validate: bool = True, fix: str = "", reload: bool = True, floor: float | None = None,
          cosine_floor: float = COSINE_FLOOR) -> nn.Module:
    """Validate ``result`` of ``step`` (see the module docstring); returns ``result`` with the outcome recorded.

    ``reference``: the input model (or the members/ingredients, for fusion: the result must agree
    with at least one). ``fix``: what the user should try, appended to any error. ``floor``: the
    least prediction agreement with the reference (classification; default ``min(AGREEMENT_FLOOR,
    CHANCE_MULTIPLE / classes)``). On a synthetic sample (no
    data given) only a collapse to one class counts: random inputs are no test of agreement.
    ``cosine_floor``: the least mean cosine with the reference's outputs (embeddings, other outputs).
    """
    if not validate:
        return _record(result, {"ran": False, "reason": "validate=False"})
    x = sample_inputs(data, result)
    if x is None:
        refs = [reference] if isinstance(reference, nn.Module) else list(reference or [])
        for r in refs:
            x = sample_inputs(None, r)
            if x is not None:
                break
    if x is None:
        return _record(result, {"ran": False, "reason": "no data and no input shape to sample"})
    hint = f"; try {fix}" if fix else ""
    out = _run(result, x, step, hint)
    if not isinstance(out, torch.Tensor) or out.ndim < 1 or out.shape[0] != n_samples(x):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValidationError(f"{step}: the result gives output {shape} for {n_samples(x)} inputs{hint}")
    bad_scales = _extreme_scales(result)
    if bad_scales:
        raise ValidationError(f"{step}: the result's quantization scales are not usable (non-finite or above "
                              f"{MAX_SCALE:g}: {', '.join(bad_scales[:5])}): an activation range spans extreme values "
                              f"such as an attention mask{hint}")
    if out.is_floating_point() and not torch.isfinite(out).all():
        where = _nonfinite_layer(result, x)
        raise ValidationError(f"{step}: the result outputs NaN or infinite values{where}{hint}")
    outcome: dict = {"ran": True, "samples": n_samples(x), "output_shape": list(out.shape[1:]),
                     "synthetic": data is None}
    refs = [reference] if isinstance(reference, nn.Module) else list(reference or [])
    if refs:
        outcome.update(_compare(out, refs, x, step, hint, classification=_is_classification(result, out, data),
                                floor=floor, cosine_floor=cosine_floor, real=data is not None))
    if reload:
        outcome["reload"] = _reload(result, x, out, step, hint)
    return _record(result, outcome)


def _is_classification(model: nn.Module, out: torch.Tensor, data=None) -> bool:
    """Logits to compare by argmax: the data's task kind decides, else the model's (classification by default)."""
    kind = data.task.kind if isinstance(data, Splits) else (task_of(model) or {}).get("kind", "classification")
    return out.ndim == 2 and out.shape[1] > 1 and kind == "classification"


@torch.no_grad()
def _outputs(model: nn.Module, x) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return cat([forward(model, take(x, slice(i, i + 128))) for i in range(0, n_samples(x), 128)])
    finally:
        model.train(was)


def _run(model: nn.Module, x: torch.Tensor, step: str, hint: str) -> torch.Tensor:
    try:
        return _outputs(model, x)
    except SlimfuseError:
        raise
    except Exception as e:
        layer = _crashing_layer(model, take(x, slice(0, 2)))
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValidationError(f"{step}: the result crashes on its first call{layer} "
                              f"({type(e).__name__}: {msg}){hint}") from e


def _run_hooked(model: nn.Module, x: torch.Tensor, handles: list) -> None:
    """One diagnostic forward pass with ``handles``' hooks in place (its error is ignored), then unhook."""
    try:
        with torch.no_grad(), contextlib.suppress(Exception):  # the hooks saw what they needed
            call(model.eval(), x)
    finally:
        for h in handles:
            h.remove()


def _crashing_layer(model: nn.Module, x: torch.Tensor) -> str:
    """`` in layer 'net.conv1' (QConv2d)``: the innermost module running when the forward pass failed."""
    stack: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}
    deepest: list[str] = []

    def pre(mod, args):
        stack.append(names.get(id(mod), "?"))
        deepest[:] = list(stack)

    def post(mod, args, out):
        if stack:
            stack.pop()

    _run_hooked(model, x, [m.register_forward_pre_hook(pre) for m in model.modules()]
                + [m.register_forward_hook(post) for m in model.modules()])
    if not deepest:
        return ""
    if deepest[-1] == "":
        return f" in the forward of {type(model).__name__} itself"
    path = deepest[-1]
    return f" in layer {path!r} ({type(model.get_submodule(path)).__name__})"


MAX_SCALE = 1e6  # a quantization scale above this maps an activation range beyond any real one onto 8 bits


def _extreme_scales(model: nn.Module) -> list[str]:
    """Names of the ONNX quantization scales (``*scale*`` initializers) that are non-finite or extreme."""
    proto = getattr(model, "proto", None)
    if proto is None or not hasattr(proto, "graph"):
        return []
    from onnx import numpy_helper

    bad = []
    for t in proto.graph.initializer:
        if "scale" in t.name.lower() and t.data_type in (1, 10, 11):  # float, float16, double
            a = numpy_helper.to_array(t).astype(np.float64)
            if a.size and not (np.isfinite(a).all() and (np.abs(a) <= MAX_SCALE).all()):
                bad.append(t.name)
    return bad


def _nonfinite_layer(model: nn.Module, x: torch.Tensor) -> str:
    """Where the first non-finite value appears: a torch module, or the ONNX nodes whose scales are not finite."""
    if getattr(model, "proto", None) is not None:  # an ONNX model: no modules to hook
        return ""
    found: list[str] = []

    def hook(mod, args, out, name=""):
        if not found and isinstance(out, torch.Tensor) and out.is_floating_point() and not torch.isfinite(out).all():
            found.append(name)

    _run_hooked(model, x, [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n))
                           for n, m in model.named_modules() if n])
    return f", first in layer {found[0]!r} ({type(model.get_submodule(found[0])).__name__})" if found else ""


def _compare(out: torch.Tensor, refs: list[nn.Module], x: torch.Tensor, step: str, hint: str, *,
             classification: bool, floor: float | None, cosine_floor: float, real: bool) -> dict:
    ref_outs = []
    for r in refs:
        with contextlib.suppress(Exception):  # a reference that cannot run this sample is no yardstick
            ref_outs.append(_outputs(r, x))
    ref_outs = [o for o in ref_outs if isinstance(o, torch.Tensor) and o.shape == out.shape]
    if not ref_outs:
        return {}
    if classification:
        pred = out.argmax(1)
        ref_preds = [o.argmax(1) for o in ref_outs]
        agreement = max(float((pred == p).float().mean()) for p in ref_preds)
        counts = [int(p.unique().numel()) for p in ref_preds]
        classes, ref_classes = int(pred.unique().numel()), max(counts)
        # one class for every sample is a collapse only where every input model tells the samples apart: an
        # ensemble whose members mostly answer one class on these inputs may answer it too
        if n_samples(x) >= COLLAPSE_MIN_SAMPLES and classes == 1 and min(counts) > 1:
            raise ValidationError(
                f"{step}: the result collapsed: it predicts class {int(pred[0])} for all {n_samples(x)} sample inputs, "
                f"where the input model predicted {ref_classes} classes (agreement {agreement:.3f}){hint}")
        if floor is None:
            floor = min(AGREEMENT_FLOOR, CHANCE_MULTIPLE / out.shape[1])
        floor = round(float(floor), 4) if real else None
        if floor is not None and agreement < floor:
            raise ValidationError(
                f"{step}: the result agrees with the input model on only {agreement:.3f} of {n_samples(x)} sample "
                f"predictions (floor {floor}){hint}")
        return {"agreement": round(agreement, 4), "classes": classes, "floor": floor}
    a = out.reshape(len(out), -1).double()
    cos = max(float(torch.nn.functional.cosine_similarity(a, o.reshape(len(o), -1).double(), dim=1).mean())
              for o in ref_outs)
    if real and not cos >= cosine_floor:
        raise ValidationError(f"{step}: the result's outputs have mean cosine {cos:.3f} with the input model's "
                              f"on {n_samples(x)} sample inputs (floor {cosine_floor}){hint}")
    return {"cosine": round(cos, 4), "floor": cosine_floor if real else None}


def _reload(result: nn.Module, x: torch.Tensor, out: torch.Tensor, step: str, hint: str) -> str:
    from .models.artifact import load, save

    if spec_of(result) is None:
        return "skipped: the model has no slimfuse spec (it cannot be saved)"
    if not isinstance(selector(result), (str, int, type(None))):
        return "skipped: its output is selected by a callable, which an artifact cannot record"
    if not is_main():
        return "skipped: checked on rank 0"
    with tempfile.TemporaryDirectory(prefix="slimfuse-validate-") as tmp:
        path = Path(tmp) / "artifact"
        try:
            save(result, path)
            again = load(path, trust_factory=True)  # the factory is already imported by whoever built the model
            out2 = _outputs(again, x)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValidationError(f"{step}: the result cannot be saved and reloaded ({msg}){hint}") from e
    if out2.shape != out.shape or not torch.equal(out2, out):
        diff = float((out2.float() - out.float()).abs().max()) if out2.shape == out.shape else float("nan")
        raise ValidationError(f"{step}: the reloaded result does not reproduce its outputs bit-exactly "
                              f"(max difference {diff:.3g}){hint}")
    return "bit-exact"


def _record(result: nn.Module, outcome: dict) -> nn.Module:
    meta = getattr(result, ATTR, None)
    if meta and meta.get("lineage"):
        meta["lineage"][-1]["validation"] = outcome
    return result


def validation_of(model: nn.Module) -> dict | None:
    """The validation recorded in the last lineage step of ``model`` (None when none ran)."""
    meta = getattr(model, ATTR, None) or {}
    return (meta.get("lineage") or [{}])[-1].get("validation")

