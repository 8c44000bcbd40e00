"""Knowledge distillation on mnist5k, after Hinton et al. 2015 (one run, side by side).

Hinton et al.: a 784-1200-1200 teacher trained with dropout and jittered inputs made 67 test
errors on MNIST, a 784-800-800 student alone 146, the same student distilled at T=20 74: 91% of
the gap closed. Here, on mnist5k (3,500 training images, 1,000 test images):

- teachers: 784-1200-1200 MLPs with dropout 0.2, trained on inputs jittered by up to 2 pixels;
  an ensemble teacher is the mean of 3 such teachers' probabilities (an ``nn.Module``);
- "alone": the student (same architecture and initialization) trained with cross-entropy on the
  training split plus 3 fixed copies shifted by up to 2 pixels with Gaussian noise (std 0.05);
- "distilled": ``slimfuse.distill`` at T in 1, 2, 4, 8, 20 (alpha 0.9) on a transfer set of the
  same size: the training split, 2 such copies and as many unlabeled mixup blends (which only a
  teacher can label); same epochs, batch size and learning rate, so exactly the same number of steps.

Reported: test errors (averaged over ``SEEDS`` student seeds) and the share of the
student-teacher gap closed, ``(err_alone - err_distilled) / (err_alone - err_teacher)``.
Writes ``benchmarks/out/distill.{json,md}``. Run: ``.venv/bin/python benchmarks/distill.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

import slimfuse as sf
from slimfuse.compress.distill import shifted, transfer_set

OUT = Path(__file__).parent / "out"
TEACHER_EPOCHS = 12
STUDENT = {"epochs": 20, "batch_size": 128, "lr": 2e-3, "schedule": "cosine"}
SEEDS = (0, 1)
TEMPERATURES = (1, 2, 4, 8, 20)
WIDTHS = (0.05, 0.1, 0.25)  # of the teacher's hidden widths: 784-60-60, 784-120-120, 784-300-300
MAIN_WIDTH = 0.05  # gets the temperature sweep and the ensemble teacher; the others T = 4


class MeanProba(nn.Module):
    """An ensemble teacher: the mean of its members' probabilities, returned as log-probabilities."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        return torch.stack([m(x).softmax(-1) for m in self.members]).mean(0).log()


def errors(model, split) -> int:
    return int((sf.predict(model, split, output="label") != split.y).sum())


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    data = sf.datasets.load("mnist5k", seed=0)
    test = data.test

    def jitter(x, gen):
        return shifted(x, 2, gen)

    teachers = []
    for s in range(3):
        torch.manual_seed(100 + s)
        net = sf.zoo.mlp(784, [1200, 1200], 10, dropout=0.2)
        teachers.append(sf.fit(net, data, epochs=TEACHER_EPOCHS, seed=100 + s, transform=jitter, schedule="cosine"))
    teacher, ensemble = teachers[0], MeanProba(teachers)
    t_err, e_err = errors(teacher, test), errors(ensemble, test)
    t_params = params(teacher)
    teacher_s = time.perf_counter() - start
    labeled = transfer_set(data, "augment", copies=3, seed=0)

    def student(width, seed):
        torch.manual_seed(seed)
        return sf.zoo.student(teacher, width=width)

    def mean_errors(fn, width) -> float:
        return sum(errors(fn(student(width, s), s), test) for s in SEEDS) / len(SEEDS)

    def alone(net, seed):
        return sf.fit(net, data, train=labeled, seed=seed, op=None, **STUDENT)

    def distilled(source, temperature):
        return lambda net, seed: sf.distill(source, net, data, temperature=temperature, alpha=0.9,
                                            transfer="augment", copies=2, mixup=1.0, seed=seed, **STUDENT)

    rows = []

    def row(teacher_name, ref_err, width, temperature, err, err_alone):
        gap = err_alone - ref_err
        closed = (err_alone - err) / gap if gap > 0 else None
        rows.append({"teacher": teacher_name, "teacher_errors": ref_err, "width": width,
                     "student_hidden": sf.spec_of(student(width, 0))["args"]["hidden"],
                     "param_ratio": params(student(width, 0)) / t_params, "temperature": temperature,
                     "errors": err, "errors_alone": err_alone, "gap_closed": closed})

    for width in WIDTHS:
        err_alone = mean_errors(alone, width)
        temps = TEMPERATURES if width == MAIN_WIDTH else (4,)
        for t in temps:
            row("1200-1200", t_err, width, t, mean_errors(distilled(teacher, t), width), err_alone)
        if width == MAIN_WIDTH:
            for t in (4,):
                row("ensemble of 3", e_err, width, t, mean_errors(distilled(ensemble, t), width), err_alone)
    result = {
        "setup": {"data": "mnist5k", "train": len(data.train), "test": len(test), "teacher_params": t_params,
                  "teacher_epochs": TEACHER_EPOCHS, "student": STUDENT, "threads": torch.get_num_threads(),
                  "seeds": list(SEEDS), "alpha": 0.9, "teacher_errors": t_err, "ensemble_errors": e_err,
                  "member_errors": [errors(m, test) for m in teachers], "teacher_seconds": round(teacher_s, 1)},
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu, 1),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "distill.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "distill.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return result


def to_markdown(result: dict) -> str:
    s = result["setup"]
    lines = [
        f"Teacher 784-1200-1200 (dropout 0.2, 2-px jitter, {s['teacher_epochs']} epochs, {s['teacher_params']:,} "
        f"params): {s['teacher_errors']} test errors of {s['test']}; ensemble of 3 such teachers (members "
        f"{s['member_errors']}): {s['ensemble_errors']}. Students: {s['student']['epochs']} epochs of "
        f"{4 * s['train']:,} samples (alone: train + 3 jittered noisy copies; distilled: train + 2 copies + "
        f"{s['train']:,} unlabeled mixup blends), batch {s['student']['batch_size']}, Adam lr {s['student']['lr']}, "
        f"cosine; errors averaged over {len(s['seeds'])} student seeds; alpha {s['alpha']}. "
        f"{result['seconds']} s wall, {result['cpu_seconds']} s CPU, {s['threads']} threads.",
        "",
        "| teacher | student | params vs teacher | T | errors alone | errors distilled | gap closed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        closed = "no gap" if r["gap_closed"] is None else f"{r['gap_closed']:.0%}"
        if r["gap_closed"] is not None and r["gap_closed"] <= 0:
            closed += " (no gain)"
        hidden = "-".join(map(str, r["student_hidden"]))
        lines.append(f"| {r['teacher']} ({r['teacher_errors']}) | 784-{hidden} | {r['param_ratio']:.3f} | "
                     f"{r['temperature']} | {r['errors_alone']:.1f} | {r['errors']:.1f} | {closed} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
