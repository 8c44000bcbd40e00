"""``slimfuse demo --scenario vision``: a residual CNN on mnist5k through the whole chain.

The model users bring for images is a ResNet, not an MLP: this scenario trains the zoo's
``resnet`` (ResNet-8: a 3x3 stem, three stages of one basic block, BatchNorm, global average
pooling) and runs every step through the same jobs the CLI verbs and recipe steps run
(:mod:`slimfuse.jobs`): train, export to ONNX (parity checked), channel pruning with
fine-tuning (Torch-Pruning keeps the residual additions consistent), int8-static with the
backend chosen by measurement on this machine, an ensemble of independently trained members,
distillation of that ensemble into a narrower ResNet, pruning it and quantizing it into one
ONNX Runtime file. Every model is saved and reloaded from disk before it is measured, except
the in-memory comparison row (the student trained alone). The report judges each technique
against the teacher with paired 95% intervals over the test images, like the mnist demo.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import configs, jobs
from .. import data as datasets
from ..measure import Report, measure
from ..models import load
from ..models.spec import lineage_of, spec_of
from ..report import write_report
from ..runtime import load_onnx
from ..train import evaluate
from . import demo_chain as chain

TEACHER = "teacher ResNet-8"
FINAL = "chain 4: int8-static (ONNX Runtime)"


@dataclass(frozen=True)
class Budget:
    """How much the scenario trains: ``FULL`` (the demo, a few minutes on 2 cores) or ``SMALL`` (tests)."""

    widths: tuple[int, ...] = (16, 32, 64)  # the teacher's (and members') stage widths
    student: tuple[int, ...] = (8, 16, 32)  # the distilled student's
    epochs: int = 8  # teacher and members
    members: int = 2  # trained beside the teacher for the ensemble
    prune_epochs: int = 3
    distill_epochs: int = 8
    copies: int = 2  # jittered copies of the training split in the transfer set
    lr: float = 3e-3
    seconds: float = 1.0  # latency timing per row


FULL = Budget()
SMALL = Budget(widths=(8, 16, 32), student=(4, 8, 16), epochs=3, members=1, prune_epochs=1, distill_epochs=3,
               copies=1, seconds=0.1)


def run(out: str | Path = "runs/demo-vision", *, seed: int = 0, progress: bool | None = None,
        budget: Budget = FULL) -> Report:
    """Run the scenario into ``out``; write ``report.md``, ``report.html`` and ``report.json``; return the Report."""
    out = Path(out)
    splits = datasets.load("mnist5k", seed=seed)
    train_cfg = configs.Train(model="resnet", widths=list(budget.widths), epochs=budget.epochs, lr=budget.lr,
                              schedule="cosine")
    done, took = {}, {}

    def timed(key: str, job, *args, **kwargs) -> jobs.Done:
        start = time.perf_counter()
        done[key] = job(*args, **kwargs)
        took[key] = took.get(key, 0.0) + time.perf_counter() - start
        return done[key]

    timed("train", jobs.train, train_cfg, splits, out / "teacher", seed=seed)
    timed("export", jobs.export, out / "teacher", configs.Export(), out / "teacher.onnx", splits)
    timed("prune", jobs.prune, out / "teacher", configs.Prune(channels=0.5, epochs=budget.prune_epochs), splits,
          out / "teacher-channels-50", seed=seed)
    timed("quantize", jobs.quantize, out / "teacher", configs.Quantize(scheme="int8-static", backend="auto"),
          splits, out / "teacher-int8")
    members = [out / "teacher"]
    for i in range(1, budget.members + 1):
        timed("members", jobs.train, train_cfg, splits, out / f"member-{i}", seed=seed + i)
        members.append(out / f"member-{i}")
    timed("ensemble", jobs.ensemble, members, configs.Ensemble(method="weighted"), splits, out / "chain-1-ensemble",
          seed=seed)
    student = "resnet:" + ",".join(map(str, budget.student))
    distill_cfg = configs.Distill(epochs=budget.distill_epochs, copies=budget.copies, lr=budget.lr,
                                  schedule="cosine")
    timed("distill", jobs.distill, out / "chain-1-ensemble", student, distill_cfg, splits, out / "chain-2-distilled",
          seed=seed, progress=progress)
    start = time.perf_counter()
    alone = _student_alone(student, distill_cfg, splits, seed=seed, progress=progress)
    took["student alone"] = time.perf_counter() - start
    timed("chain prune", jobs.prune, out / "chain-2-distilled",
          configs.Prune(channels=0.25, epochs=budget.prune_epochs), splits, out / "chain-3-pruned", seed=seed)
    timed("chain int8", jobs.quantize, out / "chain-3-pruned", configs.Quantize(scheme="int8-static"), splits,
          out / "chain-4-int8.onnx")

    sw = "-".join(map(str, budget.student))
    int8_backend = lineage_of(done["quantize"].model)[-1]["params"].get("backend", "?")
    models = {
        TEACHER: load(out / "teacher"),
        "teacher ONNX fp32 (export)": load_onnx(out / "teacher.onnx"),
        "teacher, 50% of channels pruned": load(out / "teacher-channels-50"),
        f"teacher int8-static (auto: {int8_backend})": load(out / "teacher-int8"),
        f"chain 1: ensemble of {len(members)} ResNet-8 (weighted)": load(out / "chain-1-ensemble"),
        f"student ResNet-8 ({sw}) alone": alone,
        f"chain 2: distilled into ResNet-8 ({sw})": load(out / "chain-2-distilled"),
        "chain 3: 25% of its channels pruned": load(out / "chain-3-pruned"),
        FINAL: load_onnx(out / "chain-4-int8.onnx"),
    }
    start = time.perf_counter()
    report = measure(models, splits.test, seconds=budget.seconds)
    took["measure"] = time.perf_counter() - start
    names = list(models)
    sections = [
        chain.chain_verdict(report, TEACHER, FINAL),
        techniques_section(report, TEACHER, names[1:4]),
        chosen_section(done["quantize"].model),
        export_section(done["export"]),
        pruning_section(report, models, [(names[0], names[2]), (names[6], names[7])]),
        ensemble_section(members, models[names[4]], splits, seed=seed),
        distill_section(report, names[6], names[5], names[4]),
    ]
    n = len(splits.train)
    setup = (f"mnist5k ({n:,} training, {len(splits.val):,} validation, {len(splits.test):,} test images, "
             f"1x28x28). Teacher: the zoo's `resnet` with stage widths {list(budget.widths)} (ResNet-8: a 3x3 "
             f"stem, one basic block per stage, BatchNorm, global average pooling; "
             f"{report.row(TEACHER)['params']:,} parameters), {budget.epochs} epochs of Adam (lr {budget.lr:g}, "
             f"cosine). Every step is the job its CLI verb runs (`slimfuse train / export / prune / quantize / "
             f"ensemble / distill`), and every row but the student trained alone was saved and reloaded from "
             f"disk. Latency with 2 threads; runtime per row (torch eager or ONNX Runtime). Budget: "
             f"{asdict(budget)}.\n\nWall time per step (seconds, on the machine above): "
             + ", ".join(f"{k} {v:.1f}" for k, v in took.items()) + f"; {sum(took.values()):.0f} in all.")
    write_report(report, out, title="slimfuse demo: a ResNet on mnist5k", sections=[("Setup", setup), *sections])
    return report


def _student_alone(student: str, cfg: configs.Distill, splits, *, seed: int, progress: bool | None):
    """The student trained with labels only, on a transfer set of the same size, for the same steps."""
    from ..compress.distill import transfer_set
    from ..train import fit

    torch.manual_seed(seed)
    net = jobs.build_student(student, None, splits.task)
    train = transfer_set(splits, "augment", copies=cfg.copies, shift=cfg.shift, noise=cfg.noise, seed=seed)
    return fit(net, splits, train=train, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
               schedule=cfg.schedule, seed=seed, progress=progress)


def _iv(interval, scale: float = 100, digits: int = 1) -> str:
    return (f"{scale * interval.diff:+.{digits}f} [{scale * interval.lo:+.{digits}f}, "
            f"{scale * interval.hi:+.{digits}f}]")


def techniques_section(report: Report, teacher: str, names: list[str]) -> tuple[str, str]:
    """Each single technique applied to the teacher, judged against it on the same test images."""
    t = report.row(teacher)
    rows = []
    for name in names:
        r, c = report.row(name), report.compare(name, teacher)
        rows.append([name, r["runtime"], f"{r['accuracy']:.4f}", f"{c.verdict}: {_iv(c.interval)}",
                     f"{t['bytes'] / r['bytes']:.1f}x", f"{t['latency_b1_p50_ms'] / r['latency_b1_p50_ms']:.2f}x",
                     f"{r['throughput_b256'] / t['throughput_b256']:.2f}x"])
    body = (chain._table(["model", "runtime", "test accuracy", "accuracy vs teacher (pt, 95% paired interval)",
                          "smaller on disk", "batch-1 speed-up", "batch-256 throughput"], rows) +
            f"\n\nThe teacher: test accuracy {t['accuracy']:.4f}, {t['bytes']:,} bytes, batch-1 p50 "
            f"{t['latency_b1_p50_ms']:.3f} ms, {t['throughput_b256']:,.0f} images/s at batch 256. \"tie\": the "
            f"paired interval over the {len(report.samples[teacher]['correct']):,} test images contains 0 (a "
            f"difference of a few images is noise); \"better\"/\"worse\" only when it lies wholly on one side.")
    return "Each technique vs the teacher", body


def chosen_section(q) -> tuple[str, str]:
    """What ``backend="auto"`` measured for int8-static on this machine, and what it kept."""
    params = lineage_of(q)[-1]["params"]
    chosen = params.get("chosen_by")
    if not chosen:
        return "int8 backend chosen by measurement", f"backend {params.get('backend')!r} (no measurement recorded)."
    rows = []
    for name, c in chosen["candidates"].items():
        thr = "n/a" if c.get("throughput") is None else f"{c['throughput']:,.0f}"
        drop = "—" if c.get("drop") is None else f"{100 * c['drop']:+.2f}"
        rows.append([name + (" (picked)" if name == chosen["picked"] else ""), thr, str(c.get("threads") or "—"),
                     drop, c.get("error") or ""])
    body = (chain._table(["candidate", f"images/s at batch {chosen['batch']}", "best thread count",
                          "validation accuracy drop (pt)", "error"], rows) +
            f"\n\n`quantize(teacher, \"int8-static\", backend=\"auto\")` built every backend and graph format and "
            f"timed each over thread counts on this machine; it kept '{chosen['picked']}' "
            f"({'within' if chosen['within_bound'] else 'outside'} the 1-point validation bound). "
            f"\"input\" is the fp32 teacher timed alongside, never picked.")
    return "int8 backend chosen by measurement", body


def export_section(done: jobs.Done) -> tuple[str, str]:
    p = done.metrics.get("parity") or {}
    if not p:
        return "ONNX export", f"{done.message}."
    return "ONNX export", (f"The teacher as one ONNX file ({done.out.stat().st_size:,} bytes): on {p['samples']} "
                           f"validation images its logits differ from torch's by at most {p['max_abs_diff']:.2e}, "
                           f"argmax agreement {p['argmax_agreement']:.4f}. The residual additions, BatchNorm and "
                           f"global average pooling export as they are.")


def pruning_section(report: Report, models: dict, pairs: list[tuple[str, str]]) -> tuple[str, str]:
    """Widths before and after channel pruning (residual streams and each block's inner width)."""
    rows = []
    for before, after in pairs:
        for name in (before, after):
            args, r = spec_of(models[name])["args"], report.row(name)
            rows.append([name, str(args["widths"]), str(args["inner"]), f"{r['params']:,}", f"{r['macs']:,}"
                         if r.get("macs") else "n/a", f"{r['accuracy']:.4f}"])
    body = (chain._table(["model", "stage widths", "inner widths (per block)", "params", "MACs",
                          "test accuracy"], rows) +
            "\n\nTorch-Pruning's dependency graph couples every layer that reads or writes a residual stream "
            "(the stem, each block's second conv and BatchNorm, the 1x1 projections, the output layer's inputs), "
            "so a stream loses the same channels everywhere and the additions stay consistent; each block's "
            "inner width is pruned on its own. The pruned model's spec is the `resnet` architecture with the new "
            "widths, so it reloads without the `pruned` fallback.")
    return "Channel pruning of a residual network", body


def ensemble_section(members: list[Path], ens, splits, *, seed: int) -> tuple[str, str]:
    """The weighted ensemble vs its best member (chosen on the validation split), paired on the test split."""
    loaded = {p.name: load(p) for p in members}
    scores = {n: (evaluate(m, splits.val), evaluate(m, splits.test)) for n, m in loaded.items()}
    best = max(scores, key=lambda n: scores[n][0]["accuracy"])
    acc, nll = (chain.vs(ens, loaded[best], splits.test, k, seed=seed) for k in ("accuracy", "nll"))
    ev, et = evaluate(ens, splits.val), evaluate(ens, splits.test)
    rows = [[n, f"{v['accuracy']:.4f}", f"{t['accuracy']:.4f}", f"{t['nll']:.4f}", "—", "—"]
            for n, (v, t) in scores.items()]
    rows.append(["ensemble (weighted)", f"{ev['accuracy']:.4f}", f"{et['accuracy']:.4f}", f"{et['nll']:.4f}",
                 f"{acc[0]}: {_iv(acc[1])}", f"{nll[0]}: {_iv(nll[1], scale=1, digits=4)}"])
    step = lineage_of(ens)[-1]["params"]
    weights = ", ".join(f"{w:.2f}" for w in step["weights"])
    fallback = (" The cross-validated check found no confident gain over the best member, so the ensemble is that "
                "member alone (fallback)." if step.get("fallback") else "")
    body = (chain._table(["model", "val accuracy", "test accuracy", "test NLL", "accuracy vs best member (pt)",
                          "NLL vs best member (lower is better)"], rows) +
            f"\n\nMembers: the teacher and {len(members) - 1} more ResNet-8 trained from other seeds; Caruana "
            f"weights {weights} (chosen on the validation split), best member by validation accuracy: {best}. "
            f"\"met\" only when the paired 95% interval lies wholly on the side of a gain, \"tie\" when it "
            f"contains 0.{fallback}")
    return "Ensemble vs its best member", body


def distill_section(report: Report, distilled: str, alone: str, teacher: str) -> tuple[str, str]:
    """Distillation from the ensemble vs the same student trained alone for the same steps."""
    c = report.compare(distilled, alone)
    a = {n: report.row(n)["accuracy"] for n in (teacher, alone, distilled)}
    gap = a[teacher] - a[alone]
    closed = (f"{(a[distilled] - a[alone]) / gap:.0%} of the student-teacher gap closed" if gap > 0
              else "the student alone already matches its teacher: no gap to close")
    body = (f"Teacher: '{teacher}' (test accuracy {a[teacher]:.4f}); student alone {a[alone]:.4f}, distilled "
            f"{a[distilled]:.4f} ({closed}). Distilled beats alone: {chain.stats.CLAIM[c.verdict]} (paired "
            f"accuracy difference {_iv(c.interval)} pt). Both trained on the training split plus the same "
            f"jittered copies, for the same steps; the distilled one learns the ensemble's soft targets "
            f"(T=4, alpha=0.9).")
    return "Distillation vs the student trained alone", body
