"""The job layer: load -> apply(config) -> evaluate -> save, shared by the CLI and recipes.

Each job takes its inputs (a model, or the path of an artifact folder or ``.onnx`` file), the verb's
typed config (:mod:`slimfuse.configs`), the data (a :class:`~slimfuse.configs.DataRef` or ready
``Splits``) and the output path; it runs the technique, measures the result on the validation and
test splits, saves it atomically and returns a :class:`Done` whose ``message`` is the summary a
person reads. Techniques know nothing of this layer; the CLI and recipes know nothing below it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from . import configs
from .data import Splits
from .errors import ConfigError

Source = nn.Module | str | Path
STACKING_FOLDS = 5  # members trained for stacking get k-fold out-of-fold predictions


@dataclass
class Done:
    """What a job made: the output path, the model, its metrics and a summary for people."""

    out: Path | None
    message: str
    model: nn.Module | None = None
    metrics: dict = field(default_factory=dict)
    met: bool = True

    def summary(self) -> dict:
        """The record a recipe keeps: test accuracy and bytes on disk."""
        from .models import folder_bytes

        row = {}
        if "test" in self.metrics and "accuracy" in self.metrics["test"]:
            row["test_accuracy"] = self.metrics["test"]["accuracy"]
        if self.out is not None and self.out.exists():
            row["bytes"] = folder_bytes(self.out) if self.out.is_dir() else self.out.stat().st_size
        return row


def splits(data: configs.DataRef | Splits | None) -> Splits | None:
    """Ready ``Splits``: loaded from a DataRef (built-in name or file), passed through, or None."""
    if data is None or isinstance(data, Splits):
        return data
    from . import data as datasets

    return datasets.load(data.data, seed=data.seed, label=data.label)


def needed(data: configs.DataRef | Splits | None, what: str) -> Splits:
    """:func:`splits` for a job that cannot run without data."""
    ready = splits(data)
    if ready is None:
        raise ConfigError(f"{what} needs data (CLI: --data)")
    return ready


def _seed(data) -> int:
    return data.seed if isinstance(data, configs.DataRef) else 0


def model(source: Source, *, trust_factory: bool = False) -> nn.Module:
    """A model: passed through, or loaded from an artifact folder or an ``.onnx`` file (ONNX Runtime)."""
    if isinstance(source, nn.Module):
        return source
    from .models import load
    from .runtime import load_onnx

    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".onnx":
        return load_onnx(path)
    return load(path, trust_factory=trust_factory)


def _metrics(m: nn.Module, data: Splits | None) -> dict:
    from .train import evaluate

    return {"val": evaluate(m, data.val), "test": evaluate(m, data.test)} if data is not None else {}


def _keep(m: nn.Module, out: Path, data: Splits | None, extra: dict | None = None) -> dict:
    from .models import save

    metrics = {**_metrics(m, data), **(extra or {})}
    save(m, out, metrics=metrics)
    return metrics


def _acc(metrics: dict) -> str:
    return f", test accuracy {metrics['test']['accuracy']:.4f}" if metrics.get("test") else ""


def _checkpoint(out: Path, checkpoint: Path | None) -> Path:
    from .checkpoint import beside

    return checkpoint if checkpoint is not None else beside(out)


# ---------------------------------------------------------------------------------------------


def train(cfg: configs.Train, data: configs.DataRef | Splits, out: str | Path, *, seed: int | None = None,
          checkpoint: Path | None = None) -> Done:
    """Train a zoo model (``cfg.members > 1``: an ensemble of them) and save it at ``out``.

    Checkpoints go to ``checkpoint`` (default: a hidden sibling of ``out``): rerunning resumes."""
    import torch

    from .models import zoo
    from .train import fit

    cfg, out, seed = configs.Train.of(cfg), Path(out), _seed(data) if seed is None else seed
    ready = needed(data, "train")
    kwargs = _zoo_kwargs(cfg)
    torch.manual_seed(seed)
    if cfg.ensemble:
        trained = train_ensemble(cfg, ready, seed=seed, checkpoint=_checkpoint(out, checkpoint))
    else:
        net = zoo.for_task(cfg.model, ready.task, **kwargs)
        trained = fit(net, ready, seed=seed, checkpoint=_checkpoint(out, checkpoint), **cfg.fit_options())
    metrics = _keep(trained, out, ready)
    return Done(out, f"saved {out}: test accuracy {metrics['test']['accuracy']:.4f}", trained, metrics)


def _zoo_kwargs(cfg: configs.Train) -> dict:
    if "," in cfg.model:
        return {}
    if cfg.model == "mlp":
        return {"hidden": list(cfg.hidden)}
    return {"widths": list(cfg.widths)} if cfg.widths is not None else {}


def train_ensemble(cfg: configs.Train, data: Splits, *, seed: int = 0, checkpoint: Path | None = None):
    """``cfg.members`` zoo members (``cfg.model`` may list several architectures), combined by ``cfg.combine``."""
    from .fuse import ensemble as combine
    from .fuse.members import train_members
    from .models import zoo

    archs = [a.strip() for a in cfg.model.split(",") if a.strip()]
    if len(archs) > 1 and cfg.diversity != "architectures":
        raise ConfigError("several models given; use diversity 'architectures'")
    kwargs = _zoo_kwargs(cfg)
    builders = [(lambda a=a: zoo.for_task(a, data.task, **kwargs)) for a in archs]
    method = cfg.combine or "mean"
    if cfg.diversity == "architectures":
        builders = [builders[i % len(builders)] for i in range(cfg.members)]
    members = train_members(builders if cfg.diversity == "architectures" else builders[0], data, cfg.members,
                            cfg.diversity, folds=STACKING_FOLDS if method == "stacking" else None, seed=seed,
                            checkpoint=checkpoint, **cfg.fit_options())
    return combine(members, method, data, seed=seed)



def prune(source: Source, cfg: configs.Prune, data: configs.DataRef | Splits | None, out: str | Path, *,
          seed: int | None = None, trust_factory: bool = False, checkpoint: Path | None = None,
          on_step: Callable[[dict], None] | None = None) -> Done:
    """Prune ``source`` as ``cfg`` says (fine-tuning on ``data`` when given) and save it at ``out``."""
    from .compress.prune import prune as prune_model
    from .measure import counts
    from .models import folder_bytes

    cfg, out, seed = configs.Prune.of(cfg), Path(out), _seed(data) if seed is None else seed
    m, ready = model(source, trust_factory=trust_factory), splits(data)
    pruned = prune_model(m, data=ready, seed=seed, on_step=on_step, checkpoint=_checkpoint(out, checkpoint),
                         **cfg.given())
    metrics = _keep(pruned, out, ready)
    n = counts(pruned)
    return Done(out, f"saved {out}: {n['nonzeros']:,} non-zero of {n['params']:,} params, "
                     f"{folder_bytes(out):,} bytes on disk{_acc(metrics)}", pruned, metrics)


def quantize(source: Source, cfg: configs.Quantize, data: configs.DataRef | Splits | None, out: str | Path, *,
             trust_factory: bool = False, checkpoint: Path | None = None) -> Done:
    """Quantize ``source`` with ``cfg.scheme``; write an artifact folder, or an ``.onnx`` file (ONNX Runtime).

    ``data`` calibrates (training split), fine-tunes (qat, codebook) and validates (mixed); its test
    split is measured into the card. Schemes that fine-tune checkpoint every epoch and resume."""
    from .compress.quantize import backend_for, trains
    from .compress.quantize import quantize as quantize_model
    from .export import export as write_onnx
    from .models import folder_bytes
    from .runtime import OnnxPredictor

    cfg, out = configs.Quantize.of(cfg), Path(out)
    if out.suffix == ".onnx" and cfg.backend == "auto":  # an .onnx file can only hold an ONNX Runtime model
        cfg = cfg.model_copy(update={"backend": "onnxruntime"})
    m, ready = model(source, trust_factory=trust_factory), splits(data)
    chosen = backend_for(cfg.scheme, cfg.backend)
    if out.suffix == ".onnx" and chosen != "onnxruntime":
        raise ConfigError(f"{cfg.scheme} ({chosen}) gives a torch model: write an artifact folder, not {out.name}")
    options = cfg.options()
    if trains(cfg.scheme, cfg.backend):
        options["checkpoint"] = _checkpoint(out, checkpoint)
    q = quantize_model(m, cfg.scheme, calib=ready, backend=cfg.backend, validate=cfg.validate,
                       auto_batch=cfg.auto_batch, auto_max_drop=cfg.auto_max_drop, **options)
    if isinstance(q, OnnxPredictor) and out.suffix == ".onnx":
        metrics, nbytes = _metrics(q, ready), write_onnx(q, "onnx", out).bytes
    else:
        metrics = _keep(q, out, ready)
        nbytes = folder_bytes(out)
    return Done(out, f"wrote {out} ({cfg.scheme}, {nbytes:,} bytes{_acc(metrics)})", q, metrics)


def distill(teacher: Source, student: str | nn.Module, cfg: configs.Distill, data: configs.DataRef | Splits,
            out: str | Path, *, seed: int | None = None, trust_factory: bool = False,
            checkpoint: Path | None = None, progress: bool | None = None) -> Done:
    """Distill ``teacher`` into ``student`` (a module, or a spec such as ``mlp:128`` or ``width=0.25``)."""
    import numpy as np
    import torch

    from .compress.distill import distill as distill_model
    from .train import evaluate

    cfg, out, seed = configs.Distill.of(cfg), Path(out), _seed(data) if seed is None else seed
    ready = needed(data, "distill")
    t = model(teacher, trust_factory=trust_factory)
    torch.manual_seed(seed)
    net = student if isinstance(student, nn.Module) else build_student(student, t, ready.task)
    options = cfg.model_dump()
    if cfg.transfer.endswith(".npy"):
        try:
            options["transfer"] = np.load(cfg.transfer, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"transfer {cfg.transfer}: cannot read unlabeled inputs ({e})") from None
    trained = distill_model(t, net, ready, seed=seed, progress=progress, checkpoint=_checkpoint(out, checkpoint),
                            **options)
    metrics = _keep(trained, out, ready)
    return Done(out, f"saved {out}: test accuracy {metrics['test']['accuracy']:.4f} "
                     f"(teacher {evaluate(t, ready.test)['accuracy']:.4f})", trained, metrics)


def build_student(text: str, teacher: nn.Module | None, task) -> nn.Module:
    """A student from a short spec: ``mlp:128``, ``mlp:256,128``, ``lenet5:3,8,60,42``,
    ``cnn:8,16`` (``cnn:8,16:32`` sets the hidden width), ``resnet:8,16,32`` (stage widths, one
    block each) or ``width=0.25[,depth=1]`` (the
    teacher's architecture, narrower/shallower: :func:`slimfuse.zoo.student`)."""
    from .models import zoo

    text = text.strip()
    if text.startswith(("width=", "depth=")):
        kwargs: dict = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            if key not in ("width", "depth") or key in kwargs:
                raise ConfigError(f"student {text!r}: expected width=FRACTION[,depth=N]")
            try:
                kwargs[key] = float(value) if key == "width" else int(value)
            except ValueError:
                raise ConfigError(f"student {text!r}: {key} must be a number, got {value!r}") from None
        if teacher is None:
            raise ConfigError(f"student {text!r} is shaped after a teacher; give the teacher")
        return zoo.student(teacher, **kwargs)
    arch, _, rest = text.partition(":")
    parts = rest.split(":") if rest else []
    if arch not in ("mlp", "lenet5", "cnn", "resnet") or not parts or len(parts) > (2 if arch == "cnn" else 1):
        raise ConfigError(f"student {text!r}: use mlp:W[,W...], lenet5:C1,C2,F1,F2, cnn:C1[,C2...][:H], "
                          "resnet:W[,W...] or width=FRACTION[,depth=N]")

    def ints(value: str) -> list[int]:
        try:
            return [int(v) for v in value.split(",")]
        except ValueError:
            raise ConfigError(f"student {text!r}: widths must be integers, got {value!r}") from None

    if arch == "mlp":
        return zoo.for_task("mlp", task, hidden=ints(parts[0]))
    kwargs = {"widths": ints(parts[0])}
    if len(parts) == 2:
        kwargs["hidden"] = ints(parts[1])[0]
    return zoo.for_task(arch, task, **kwargs)


def ensemble(members: list[Source], cfg: configs.Ensemble, data: configs.DataRef | Splits, out: str | Path, *,
             seed: int | None = None, trust_factory: bool = False) -> Done:
    """Combine ``members`` with ``cfg.method`` (weights learned on the validation split); save at ``out``."""
    from .fuse import ensemble as combine
    from .train import evaluate

    cfg, out, seed = configs.Ensemble.of(cfg), Path(out), _seed(data) if seed is None else seed
    if len(members) < 2:
        raise ConfigError(f"an ensemble combines at least two members, got {len(members)}")
    ready = needed(data, "ensemble")
    loaded = [model(m, trust_factory=trust_factory) for m in members]
    names = [Path(m).name if not isinstance(m, nn.Module) else f"member {i}" for i, m in enumerate(members)]
    ens = combine(loaded, cfg.method, ready, seed=seed, **cfg.model_dump(exclude={"method"}))
    rows = {n: evaluate(m, ready.test) for n, m in zip(names, loaded)}
    metrics = _keep(ens, out, ready, {"members_test": rows})
    lines = [f"{n}: test accuracy {r['accuracy']:.4f}, NLL {r['nll']:.4f}" for n, r in rows.items()]
    if cfg.method == "weighted":
        w = getattr(ens, "selection").weights  # noqa: B009  (set by ensemble(), not an nn.Module attribute)
        lines.append("weights: " + ", ".join(f"{n}={v:.3f}" for n, v in zip(names, w)))
    t = metrics["test"]
    lines.append(f"saved {out} ({cfg.method} of {len(members)}): test accuracy {t['accuracy']:.4f}, NLL {t['nll']:.4f}")
    return Done(out, "\n".join(lines), ens, metrics)


def merge(members: list[Source], cfg: configs.Merge, data: configs.DataRef | Splits | None, out: str | Path, *,
          base: Source | None = None, seed: int | None = None, trust_factory: bool = False) -> Done:
    """Merge ``members`` in weight space (``cfg.method``), verified against the best member and their
    ensemble on ``data``; save the merged model (or, with ``fallback``, the distilled ensemble) at ``out``."""
    from .fuse.merge import merge as merge_models

    cfg, out, seed = configs.Merge.of(cfg), Path(out), _seed(data) if seed is None else seed
    ready = splits(data)
    models = [model(m, trust_factory=trust_factory) for m in members]
    base_model = model(base, trust_factory=trust_factory) if base is not None else None
    merged = merge_models(models, cfg.method, ready, base_model, seed=seed, **cfg.model_dump(exclude={"method"}))
    ver = getattr(merged, "verification", None)
    metrics = _keep(merged, out, ready, {"merge": ver} if ver else None)
    detail = (f": test accuracy {ver['merged']['accuracy']:.4f}, best member {ver['best_member']['accuracy']:.4f}, "
              f"ensemble {ver['ensemble']['accuracy']:.4f} ({ver['verdict']})") if ver else ""
    if ver and "fallback" in ver:
        detail += f"; saved the distilled ensemble instead: test accuracy {ver['fallback']['merged']['accuracy']:.4f}"
    return Done(out, f"saved {out}{detail}", merged, metrics)


def export(source: Source, cfg: configs.Export, out: str | Path, data: configs.DataRef | Splits | None = None, *,
           trust_factory: bool = False) -> Done:
    """Write ``source`` as one ``.onnx`` file, its parity with torch checked on ``data``'s validation split."""
    from .export import export as write

    cfg, out = configs.Export.of(cfg), Path(out)
    if out.suffix.lower() != ".onnx":
        raise ConfigError(f"{out}: an ONNX export is one file named *.onnx")
    ready = splits(data)
    result = write(model(source, trust_factory=trust_factory), cfg.format, out,
                   sample=ready.val if ready is not None else None, opset=cfg.opset, atol=cfg.atol, rtol=cfg.rtol)
    parity = result.parity
    detail = (f"; parity on {parity['samples']} inputs: max abs diff {parity['max_abs_diff']:.2e}, "
              f"argmax agreement {parity['argmax_agreement']:.4f}") if parity else ""
    return Done(out, f"wrote {out} ({result.bytes:,} bytes){detail}", metrics={"parity": parity})


def evaluate(source: Source, cfg: configs.Measure, data: configs.DataRef | Splits, *, json_out: Path | None = None,
             trust_factory: bool = False, name: str | None = None) -> Done:
    """Measure ``source`` on ``cfg.split``; the report as Markdown (and JSON at ``json_out``)."""
    from .measure import measure
    from .models.artifact import write_text_atomic

    cfg = configs.Measure.of(cfg)
    if json_out is not None and Path(json_out).is_dir():
        raise ConfigError(f"--json {json_out}: is a folder; give the path of the JSON file to write")
    m, ready = model(source, trust_factory=trust_factory), needed(data, "evaluate")
    name = name or (Path(source).name if not isinstance(source, nn.Module) else "model")
    report = measure({name: m}, getattr(ready, cfg.split), threads=cfg.threads, seconds=cfg.seconds,
                     device=cfg.device)
    if json_out is not None:
        write_text_atomic(Path(json_out), report.to_json() + "\n")
    return Done(None, report.to_markdown(), m, {cfg.split: report.rows[0]})


def info(path: str | Path | None, *, hardware: bool = False) -> Done:
    """An artifact's card in short (spec, task, lineage, storage, metrics, bytes on disk, versions, the hardware
    it was made on); ``hardware``: this machine's CPU features and kernels first."""
    from .models import folder_bytes, lineage_str, read_card

    parts = []
    if hardware:
        from .hardware import hardware as detect

        parts.append(json.dumps(detect(), indent=2))
    metrics: dict = {}
    if path is not None:
        card = read_card(path)
        metrics = card["metrics"]
        parts.append(json.dumps({
            "spec": card["spec"], "task": card.get("task"), "lineage": lineage_str(card["lineage"]),
            "storage": card["storage"], "metrics": metrics, "bytes_on_disk": folder_bytes(path),
            "versions": card.get("versions"), "hardware": card.get("hardware"),
        }, indent=2))
    return Done(Path(path) if path is not None else None, "\n".join(parts), metrics=metrics)


def optimize(source: Source, cfg: configs.Optimize, data: configs.DataRef | Splits, out: str | Path, *,
             seed: int | None = None, trust_factory: bool = False,
             log: Callable[[str], None] | None = None) -> Done:
    """Search compressed versions of ``source`` within ``cfg.max_drop`` points; write ``out/`` (best, report)."""
    from .search import optimize as search

    cfg, out, seed = configs.Optimize.of(cfg), Path(out), _seed(data) if seed is None else seed
    m, ready = model(source, trust_factory=trust_factory), needed(data, "optimize")
    result = search(m, ready, seed=seed, log=log, **cfg.model_dump())
    result.save(out)
    chosen = "best" if result.met else "closest"
    lines = [result.report.to_markdown(lineage=False), "Pareto set: " + "; ".join(c.name for c in result.pareto),
             result.message,
             f"wrote {out}/report.md, report.html, search.json" + (f", {chosen}/" if (out / chosen).exists() else "")]
    return Done(out, "\n".join(lines), (result.best or result.closest).model, met=result.met)
