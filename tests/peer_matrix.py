"""The model matrix: every peer model (``peer_models.PEERS``) through every verb, at the library level.

A cell is one (model, verb) pair. :func:`run_cell` runs it and returns an :class:`Outcome`:

- ``works``: the verb ran and its result passed the cell's checks (accuracy within bounds of the
  baseline trained in the same run, bit-exact reload from safetensors + JSON, ONNX parity);
- ``refused``: the verb raised one ``SlimfuseError`` whose message names the reason;
- ``crash``: anything else (a raw ``IndexError``/``TypeError`` ... or a failed check): a bug.

``tests/test_peer_models.py`` runs every cell and checks it against ``docs/models.md``;
``benchmarks/models_matrix.py`` runs them all and writes ``docs/models.md``. Adding a model is one
entry in ``PEERS`` (or in :data:`EXTRA`, for models defined elsewhere, e.g. Hugging Face ones);
adding a verb is one function in :data:`VERBS`; a new kind of data is one entry in :data:`DATA` and
:data:`PAIRED`.
"""

from __future__ import annotations

import re
import tempfile
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peer_models import HF_PEERS, KERAS_PEERS, PEERS, Peer, TokenBag, digits_nhwc, digits_sequence, digits_tokens
from torch import nn

import slimfuse as sf
from slimfuse.errors import SlimfuseError

# bounds, in accuracy points below the baseline measured in the same run
MAX_DROP = {"prune-sparsity": 5.0, "prune-channels": 10.0, "int8-onnxruntime": 3.0, "int8-torch": 3.0,
            "export-onnx": 0.5, "ensemble": 2.0, "distill-teacher": 15.0, "distill-student": 15.0}
MIN_FIT_ACCURACY = 0.6  # a baseline below this (chance is 0.1) means the model did not learn: a failed cell
FINETUNE_EPOCHS = 2
DISTILL_EPOCHS = 8
DISTILL_LR = 3e-3


@dataclass
class Outcome:
    status: str  # "works" | "refused" | "crash"
    why: str = ""  # the refusal (error kind: first line) or the crash; for "works": what was checked

    @property
    def cell(self) -> str:
        """The cell as docs/models.md writes it."""
        return "works" if self.status == "works" else f"{'not supported' if self.status == 'refused' else 'CRASH'}: " \
                                                      f"{self.why}"


def why(e: BaseException) -> str:
    """One line naming the reason: the error's kind and its first line, without paths or addresses."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = re.sub(r"0x[0-9a-f]+", "0x…", text)
    text = re.sub(r"/tmp/\S+", "TMP", text)
    text = text.replace("|", "/")  # a Markdown table cell
    return f"{type(e).__name__}: {text}"[:300]


# --------------------------------------------------------------------------- the shared state of a run


@dataclass
class Context:
    """Data and trained baselines, each built once per run."""

    digits: sf.Splits
    _data: dict = field(default_factory=dict)
    _trained: dict = field(default_factory=dict)

    def data(self, peer: Peer) -> sf.Splits:
        if peer.data not in self._data:
            self._data[peer.data] = DATA[peer.data](self.digits)
        return self._data[peer.data]

    def fresh(self, peer: Peer, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return peer.build()

    def trained(self, peer: Peer) -> tuple[nn.Module, float | None, BaseException | None]:
        """(model, test accuracy, error): the model trained by ``fit``, else untrained with fit's refusal."""
        if peer.name not in self._trained:
            model = self.fresh(peer)
            try:
                model = sf.fit(model, self.data(peer), epochs=peer.epochs, lr=peer.lr, progress=False)
                result = (model, sf.evaluate(model, self.data(peer).test)["accuracy"], None)
            except SlimfuseError as e:
                result = (model, None, e)
            self._trained[peer.name] = result
        return self._trained[peer.name]

    def teacher(self, peer: Peer) -> tuple[nn.Module, float]:
        """A zoo-style teacher for the peer's data (an MLP on images, a token bag on ids), trained once."""
        key = ("teacher", peer.data)
        if key not in self._trained:
            data = self.data(peer)
            torch.manual_seed(0)
            model = sf.fit(PAIRED[peer.data](data, "teacher"), data, epochs=10, lr=3e-3, progress=False)
            self._trained[key] = (model, sf.evaluate(model, data.test)["accuracy"])
        return self._trained[key]

    def student(self, peer: Peer) -> nn.Module:
        torch.manual_seed(1)
        return PAIRED[peer.data](self.data(peer), "student")


# Per data kind of a Peer: how its Splits are made from ``digits``, and the small model paired with it as the
# teacher (distill-student) or student (distill-teacher). A new kind of data is one entry in each.
DATA: dict[str, Callable[[sf.Splits], sf.Splits]] = {"digits": lambda d: d, "tokens": digits_tokens,
                                                     "sequence": digits_sequence, "nhwc": digits_nhwc}
PAIRED: dict[str, Callable[[sf.Splits, str], nn.Module]] = {
    "digits": lambda data, role: sf.zoo.for_task("mlp", data.task, hidden=[64 if role == "teacher" else 32]),
    "tokens": lambda data, role: TokenBag(dim=8 if role == "teacher" else 4),
    "sequence": lambda data, role: TokenBag(dim=8 if role == "teacher" else 4),
    "nhwc": lambda data, role: sf.zoo.for_task("mlp", data.task, hidden=[64 if role == "teacher" else 32]),
}


# --------------------------------------------------------------------------- checks shared by the cells


def accuracy(model: nn.Module, data: sf.Splits) -> float:
    return sf.evaluate(model, data.test)["accuracy"]


def within(verb: str, got: float, baseline: float) -> str:
    drop = 100 * (baseline - got)
    assert drop <= MAX_DROP[verb], f"{verb}: accuracy {got:.4f} is {drop:.1f} points below the baseline {baseline:.4f}"
    return f"accuracy {got:.3f} vs {baseline:.3f}"


def _flat(out) -> list[torch.Tensor]:
    """Every tensor of a model's output: a tensor, a tuple/list, a dict or a ``ModelOutput`` (values)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for o in out.values() for t in _flat(o)]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def reloads(model: nn.Module, data: sf.Splits, peer: Peer | None = None) -> None:
    """save -> load (safetensors + JSON, no pickle) -> the same outputs bit for bit."""
    with tempfile.TemporaryDirectory() as tmp:
        path = sf.save(model, Path(tmp) / "a")
        assert sorted(p.name for p in Path(path).iterdir()) == ["card.json", "weights.safetensors"]
        back = sf.load(path, trust_factory=True)
    inputs = peer.inputs(data.test.x[:64]) if peer is not None else (data.test.x[:64],)
    with torch.no_grad():
        a, b = _flat(model.eval()(*inputs)), _flat(back.eval()(*inputs))
    assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b)), "the reloaded model's outputs differ"


def _needs_training(trained_error: BaseException | None) -> None:
    if trained_error is not None:  # the verb fine-tunes through fit, which refused the model
        raise trained_error


# --------------------------------------------------------------------------- the verbs


def fit_cell(ctx: Context, peer: Peer) -> str:
    _, acc, error = ctx.trained(peer)
    _needs_training(error)
    assert acc >= MIN_FIT_ACCURACY, f"fit: test accuracy {acc:.3f} < {MIN_FIT_ACCURACY}"
    return f"accuracy {acc:.3f}"


def prune_sparsity(ctx: Context, peer: Peer) -> str:
    model, acc, error = ctx.trained(peer)
    data = ctx.data(peer)
    pruned = sf.prune(model, sparsity=0.5, data=data, epochs=FINETUNE_EPOCHS, progress=False)
    layers = sf.lineage_of(pruned)[-1]["params"]["pruned_layers"]
    modules = dict(pruned.named_modules())
    zeros = sum(int((modules[n].weight == 0).sum()) for n in layers)
    total = sum(modules[n].weight.numel() for n in layers)
    assert abs(zeros / total - 0.5) < 0.01, f"sparsity {zeros / total:.3f}"
    reloads(pruned, data)
    _needs_training(error)
    return within("prune-sparsity", accuracy(pruned, data), acc)


def prune_channels(ctx: Context, peer: Peer) -> str:
    model, acc, error = ctx.trained(peer)
    data = ctx.data(peer)
    pruned = sf.prune(model, channels=0.25, data=data, epochs=FINETUNE_EPOCHS, progress=False)
    n0, n1 = (sum(p.numel() for p in m.parameters()) for m in (model, pruned))
    assert n1 < n0, f"no parameters removed ({n1} of {n0})"
    reloads(pruned, data)
    _needs_training(error)
    return f"params {n0} -> {n1}, " + within("prune-channels", accuracy(pruned, data), acc)


def _int8(backend: str):
    def cell(ctx: Context, peer: Peer) -> str:
        model, acc, error = ctx.trained(peer)
        data = ctx.data(peer)
        q = sf.quantize(model, "int8-static", data, backend=backend)
        reloads(q, data)
        _needs_training(error)
        return within(f"int8-{backend}", accuracy(q, data), acc)
    return cell


def export_onnx(ctx: Context, peer: Peer) -> str:
    model, acc, error = ctx.trained(peer)
    data = ctx.data(peer)
    with tempfile.TemporaryDirectory() as tmp:
        result = sf.export(model, "onnx", Path(tmp) / "m.onnx", sample=data.test)
        served = sf.runtime.load_onnx(result.path)
    assert result.parity["argmax_agreement"] == 1.0, result.parity
    _needs_training(error)
    return f"max |diff| {result.parity['max_abs_diff']:.1e}, " + within("export-onnx", accuracy(served, data), acc)


def save_load(ctx: Context, peer: Peer) -> str:
    model, _, _ = ctx.trained(peer)
    reloads(model, ctx.data(peer), peer)
    return "bit-exact"


def ensemble(ctx: Context, peer: Peer) -> str:
    """The trained model and a second member (a copy trained on for 2 epochs with another seed), averaged."""
    a, acc_a, error = ctx.trained(peer)
    data = ctx.data(peer)
    _needs_training(error)
    b = sf.fit(a, data, epochs=2, lr=peer.lr / 3, seed=1, progress=False)
    acc_b = accuracy(b, data)
    ens = sf.ensemble([a, b], "mean", data)
    reloads(ens, data)
    return within("ensemble", accuracy(ens, data), min(acc_a, acc_b))


def distill_teacher(ctx: Context, peer: Peer) -> str:
    teacher, acc, error = ctx.trained(peer)
    data = ctx.data(peer)
    _needs_training(error)  # an untrained teacher teaches nothing
    student = sf.distill(teacher, ctx.student(peer), data, epochs=DISTILL_EPOCHS, lr=DISTILL_LR, transfer="train",
                         progress=False)
    return within("distill-teacher", accuracy(student, data), acc)


def distill_student(ctx: Context, peer: Peer) -> str:
    """The peer, untrained, learns from a trained MLP as long as ``fit`` trains it: it must reach about the
    accuracy ``fit`` gives it on the labels alone (or the teacher's, if lower)."""
    teacher, t_acc = ctx.teacher(peer)
    _, acc, error = ctx.trained(peer)
    data = ctx.data(peer)
    student = sf.distill(teacher, ctx.fresh(peer), data, epochs=peer.epochs, lr=peer.lr, transfer="train",
                         progress=False)
    reloads(student, data, peer)
    _needs_training(error)
    return within("distill-student", accuracy(student, data), min(acc, t_acc))


def measure_cell(ctx: Context, peer: Peer) -> str:
    model, acc, error = ctx.trained(peer)
    data = ctx.data(peer)
    report = sf.measure({"m": model}, data.test, threads=1, seconds=0.05, batch=32)
    row = report.rows[0]
    assert row["params"] == sum(p.numel() for p in model.parameters()), row
    assert row["bytes"] > 0
    if error is None:
        assert abs(row["accuracy"] - acc) < 1e-9, (row["accuracy"], acc)
    return f"params {row['params']}, MACs {row['macs']}"


VERBS: dict[str, Callable[[Context, Peer], str]] = {
    "fit": fit_cell,
    "prune-sparsity": prune_sparsity,
    "prune-channels": prune_channels,
    "int8-onnxruntime": _int8("onnxruntime"),
    "int8-torch": _int8("torch"),
    "export-onnx": export_onnx,
    "save-load": save_load,
    "ensemble": ensemble,
    "distill-teacher": distill_teacher,
    "distill-student": distill_student,
    "measure": measure_cell,
}
SLOW_VERBS = ("ensemble", "distill-teacher", "distill-student")  # the ones that train most

EXTRA: list[Peer] = HF_PEERS + KERAS_PEERS  # models defined elsewhere (Hugging Face, Keras): one Peer each


def models() -> list[Peer]:
    return PEERS + EXTRA


def run_cell(ctx: Context, peer: Peer, verb: str) -> Outcome:
    try:
        detail = VERBS[verb](ctx, peer)
    except SlimfuseError as e:
        return Outcome("refused", why(e))
    except Exception as e:  # a raw traceback or a failed check: a bug to fix
        return Outcome("crash", why(e) + " @ " + traceback.extract_tb(e.__traceback__)[-1].name)
    return Outcome("works", detail)


# --------------------------------------------------------------------------- docs/models.md

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
SCRIPT = "benchmarks/models_matrix.py"
MARK = {"works": "works", "refused": "no", "crash": "CRASH"}


def render(results: dict[tuple[str, str], Outcome], machine: str, seconds: float) -> str:
    """docs/models.md: the model x verb table, each refusal's reason once (numbered), what each working cell
    measured. ``results``: (model name, verb) -> outcome, for every model of :func:`models` and verb."""
    reasons: list[str] = []  # "not supported: ..." / "CRASH: ...", numbered in order of appearance

    def cell(o: Outcome) -> str:
        if o.status == "works":
            return "works"
        text = o.cell
        if text not in reasons:
            reasons.append(text)
        return f"{MARK[o.status]} [{reasons.index(text) + 1}]"

    verbs = list(VERBS)
    rows = [f"| {p.name} | {p.pattern} | " + " | ".join(cell(results[p.name, v]) for v in verbs) + " |"
            for p in models()]
    n_works = sum(o.status == "works" for o in results.values())
    lines = [
        "# Models x verbs",
        "",
        f"Generated by `python {SCRIPT}` (never by hand); `tests/test_peer_models.py` recomputes every cell",
        "and fails when this file disagrees with what the code does now. Each model is a tiny peer model",
        "(`tests/peer_models.py`, a few thousand parameters) trained on the built-in `digits` data set (or",
        "its pixels as token ids); each verb runs at the library level (`tests/peer_matrix.py`).",
        "",
        f"Measured on: {machine}; {seconds:.0f} s for the whole matrix.",
        "",
        "A **works** cell is a test that passed: accuracy within the bound of the baseline trained in the same",
        "run (points: " + ", ".join(f"{v} {d:g}" for v, d in MAX_DROP.items()) + "), a bit-exact",
        "save -> load (safetensors + JSON, `trust_factory=True`) of the result, ONNX parity for the exports.",
        "A **no [n]** cell is one clear slimfuse error, its message quoted below.",
        "",
        f"{n_works} of {len(results)} cells work.",
        "",
        "| model | pattern | " + " | ".join(verbs) + " |",
        "|---|---|" + "---|" * len(verbs),
        *rows,
        "",
        "## Why not",
        "",
        *[f"{i}. {text}" for i, text in enumerate(reasons, 1)],
        "",
        "## What the working cells measured",
        "",
        "| model | verb | measured |",
        "|---|---|---|",
        *[f"| {p.name} | {v} | {results[p.name, v].why} |" for p in models() for v in verbs
          if results[p.name, v].status == "works"],
        "",
    ]
    return "\n".join(lines)


def parse(text: str) -> dict[tuple[str, str], str]:
    """(model, verb) -> the cell as :attr:`Outcome.cell` writes it ("works", "not supported: ...")."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| model | pattern |"))
    verbs = [c.strip() for c in lines[header].strip("|").split("|")][2:]
    reasons = {}
    for line in lines:
        m = re.match(r"^(\d+)\. (.*)$", line)
        if m:
            reasons[m.group(1)] = m.group(2)
    cells = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        name, _, *marks = [c.strip() for c in line.strip("|").split("|")]
        for verb, mark in zip(verbs, marks):
            m = re.match(r"^(no|CRASH) \[(\d+)\]$", mark)
            cells[name, verb] = reasons.get(m.group(2), mark) if m else mark
    return cells
