"""Every verb's parameters, declared once: typed configs shared by the library, the CLI and recipes.

A field's name, type, default, constraint and help text live here and nowhere else: the CLI's
options (``slimfuse VERB --help``) and the recipe step schemas are generated from these classes,
and the library verbs validate their arguments through them, so a value refused in one place is
refused everywhere with the same words. ``tests/test_configs.py`` walks every config and checks
the library's defaults, the CLI and the recipe schema agree.

Units are part of a name or a type: ``max_drop`` is in points of the metric (0.5 = half a point
of accuracy) everywhere; ``budget_s`` and ``seconds`` are seconds.

This module imports nothing heavier than pydantic: ``slimfuse --help`` and every usage error are
answered without importing torch.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

# ``validate`` (every technique's validation gate) is the library's keyword, so it is the field's name too;
# pydantic warns that it shadows BaseModel's deprecated ``validate`` classmethod, which slimfuse never uses.
warnings.filterwarnings("ignore", message='Field name "validate" in ".*" shadows an attribute', category=UserWarning)

# ---------------------------------------------------------------------------------------------
# Field types: one constraint and one help text per idea, shared by every verb that has it.

PosInt = Annotated[int, Field(ge=1, le=10**9)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
Points = Annotated[float, Field(ge=0, le=100, description="in points of the metric: 0.5 = half a point of accuracy")]
Epochs = Annotated[int, Field(ge=1, le=100_000, description="training epochs")]
FineTuneEpochs = Annotated[int, Field(ge=0, le=100_000, description="fine-tuning epochs (0: none)")]
BatchSize = Annotated[int, Field(ge=1, le=2**20, description="samples per optimizer step")]
LearningRate = Annotated[float, Field(gt=0, lt=10, description="learning rate")]
Optimizer = Literal["adam", "sgd"]
Schedule = Literal["none", "cosine"]
Widths = Annotated[list[Annotated[int, Field(ge=1, le=1_000_000)]], Field(min_length=1, max_length=64)]
Names = Annotated[list[Annotated[str, Field(min_length=1, max_length=512)]], Field(max_length=10_000)]

DEVICES = re.compile(r"auto|cpu|cuda(:\d{1,3})?")  # slimfuse.devices.resolve turns one into a torch.device


def _device(name: str) -> str:
    if not DEVICES.fullmatch(name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


Device = Annotated[str, AfterValidator(_device),
                   Field(max_length=16, description="where it trains and runs: auto (CUDA when torch sees a GPU, each "
                                                    "torchrun rank its own, else the CPU), cpu, cuda or cuda:N; the "
                                                    "result comes back on the CPU")]

_STUDENT = re.compile(r"(mlp|lenet5|resnet):\d+(,\d+)*|cnn:\d+(,\d+)*(:\d+)?|width=[0-9.]+(,depth=\d+)?|depth=\d+")


def _student(text: str) -> str:
    if not _STUDENT.fullmatch(text.strip()):
        raise ValueError(f"student {text!r}: use mlp:W[,W...], lenet5:C1,C2,F1,F2, cnn:C1[,C2...][:H], "
                         "resnet:W[,W...] or width=FRACTION[,depth=N]")
    return text.strip()


def check_student(text: str) -> str:
    """A student spec (``mlp:128``, ``width=0.25``...) checked for its form; a bad one is a ConfigError."""
    try:
        return _student(text)
    except ValueError as e:
        raise ConfigError(str(e)) from None


StudentSpec = Annotated[str, Field(max_length=256, description="mlp:128, mlp:256,128, lenet5:3,8,60,42, "
                                                               "cnn:8,16[:32], resnet:8,16,32 or "
                                                               "width=0.25[,depth=1]"),
                        AfterValidator(_student)]

SCHEME_NAMES = ("int8-dynamic", "int8-static", "qat", "fp16", "bf16", "mixed", "codebook")
CODEBOOK_BITS = range(2, 9)
ENSEMBLE_METHODS = ("mean", "mean-logits", "vote", "weighted", "stacking")


class Config(BaseModel):
    """A verb's parameters: unknown fields are refused, values are checked, instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # strict: True is not 1, "0.5" not 0.5

    @classmethod
    def build(cls, **values):
        """Validate ``values`` into this config; a bad value is one :class:`ConfigError` naming the field."""
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise ConfigError(describe(e)) from None

    def given(self) -> dict:
        """The fields set explicitly (the rest take the config's defaults)."""
        return {k: getattr(self, k) for k in self.model_fields_set}

    @classmethod
    def of(cls, other: Config):
        """``other`` (e.g. a recipe step, which is this config plus its name and inputs) as a plain ``cls``,
        keeping which fields were set explicitly."""
        if type(other) is cls:
            return other
        return cls.model_validate({k: getattr(other, k) for k in other.model_fields_set if k in cls.model_fields})


def describe(error: ValidationError, option: Callable[[str], str] = lambda f: f"field '{f}'", skip: int = 0) -> str:
    """The first problem of a ValidationError as ``field 'F': message`` (``option`` renders the field name;
    ``skip`` leading parts of its location are left out)."""
    errors = error.errors()
    first = errors[0]
    field = ".".join(str(p) for p in first["loc"][skip:] if not isinstance(p, int))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] == "literal_error":
        msg = f"unknown value {first['input']!r}; choose {first['ctx']['expected']}"
    elif first["type"] == "missing":
        msg = "missing required field"
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    return f"{option(field)}: {msg}{more}" if field else f"{msg}{more}"


# ---------------------------------------------------------------------------------------------
# Shared groups


class DataRef(Config):
    """Where the data comes from and how it is split (the CLI's ``--data/--seed/--label``, a recipe's top level)."""

    data: Annotated[str, Field(min_length=1, max_length=4096,
                               description="built-in data set (mnist5k, digits) or a .npz/.csv file")]
    seed: Annotated[int, Field(ge=0, lt=2**63, description="random seed (splits, init, shuffling)")] = 0
    label: Annotated[str, Field(min_length=1, max_length=256, description="label column of a .csv file")] = "label"


class FineTune(Config):
    """How a model trains (``fit``): shared by every verb that trains from scratch."""

    epochs: Epochs = 20
    batch_size: BatchSize = 64
    lr: LearningRate = 1e-3
    optimizer: Annotated[Optimizer, Field(description="adam or sgd (momentum 0.9)")] = "adam"
    schedule: Annotated[Schedule, Field(description="learning-rate schedule: none or cosine")] = "none"
    patience: Annotated[int | None, Field(ge=1, le=100_000,
                                          description="early-stopping patience in epochs (default: none)")] = None
    device: Device = "cpu"

    def fit_options(self) -> dict:
        """Keyword arguments of :func:`slimfuse.fit`."""
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "optimizer": self.optimizer,
                "schedule": self.schedule, "patience": self.patience, "device": self.device}


# ---------------------------------------------------------------------------------------------
# One config per verb


class Train(FineTune):
    """``slimfuse train``: a zoo model (or, with ``members``, an ensemble of them)."""

    model: Annotated[str, Field(min_length=1, max_length=256,
                                description="zoo architecture: mlp, lenet5, cnn or resnet (several, comma-separated, "
                                            "with diversity=architectures)")] = "mlp"
    hidden: Annotated[Widths, Field(description="mlp hidden widths, e.g. 300,100")] = [300, 100]
    widths: Annotated[Widths | None, Field(description="lenet5/cnn/resnet widths, e.g. 6,16,120,84 "
                                                       "(default: the architecture's)")] = None
    members: Annotated[int, Field(ge=1, le=1000, description="train this many members and save them as one "
                                                             "ensemble")] = 1
    diversity: Annotated[Literal["seed", "bagging", "snapshot", "architectures"],
                         Field(description="members differ by: seed, bagging, snapshot or architectures")] = "seed"
    combine: Annotated[Literal[ENSEMBLE_METHODS] | None,  # type: ignore[valid-type]
                       Field(description="ensemble method for members > 1 (default mean)")] = None

    @model_validator(mode="after")
    def _ensemble_needs_members(self):
        if self.members == 1 and self.combine is not None:
            raise ValueError("'combine' sets how members are combined: give members > 1")
        if self.members == 1 and self.diversity != "seed":
            raise ValueError(f"diversity={self.diversity!r} varies ensemble members: give members > 1")
        return self

    @property
    def ensemble(self) -> bool:
        return self.members > 1


class Prune(Config):
    """``slimfuse prune``: magnitude sparsity (unstructured) or whole channels/neurons (structured)."""

    sparsity: Annotated[Fraction | None, Field(description="unstructured: fraction of weights set to zero")] = None
    channels: Annotated[Fraction | None, Field(description="structured: fraction of channels/neurons "
                                                           "removed")] = None
    scope: Annotated[Literal["global", "layer"] | None,
                     Field(description="global or layer (default: global for sparsity, layer for channels)")] = None
    schedule: Annotated[Literal["agp", "oneshot"], Field(description="unstructured: agp (gradual) or "
                                                                     "oneshot")] = "agp"
    steps: Annotated[int | None, Field(ge=1, le=10_000, description="pruning steps (default: 5 agp, 1 "
                                                                    "structured)")] = None
    importance: Annotated[Literal["l1", "l2", "taylor"] | None,
                          Field(description="structured: l1, l2 or taylor (default l1)")] = None
    round_to: Annotated[int | None, Field(ge=1, le=4096, description="structured: keep widths multiples of "
                                                                     "this")] = None
    embeddings: Annotated[bool, Field(description="structured, transformers models: also narrow the embedding "
                                                  "dimension (the residual stream: embeddings, LayerNorms, every "
                                                  "block's input and output, the pooler)")] = False
    exclude: Annotated[Names | None, Field(description="module names never pruned (default: the output "
                                                       "layer)")] = None
    epochs: Annotated[FineTuneEpochs | None, Field(description="total fine-tuning epochs (default 8 with data, "
                                                               "else 0)")] = None
    lr: Annotated[LearningRate | None, Field(description="fine-tuning learning rate (default 1e-3, "
                                                         "structured 3e-3)")] = None
    batch_size: BatchSize = 64
    device: Annotated[Device, Field(description="where fine-tuning runs: auto (CUDA when torch sees a GPU, else the "
                                                "CPU), cpu, cuda or cuda:N; pruning steps and the result stay on the "
                                                "CPU")] = "cpu"
    max_layer_sparsity: Annotated[float, Field(gt=0, lt=1, description="unstructured: most of a layer's weights "
                                                                        "set to zero (every layer keeps some)")] = 0.98
    validate: Annotated[bool, Field(description="check the result before returning it: it runs, is finite, has not "
                                                "collapsed, agrees with its input, reloads bit-exactly")] = True  # type: ignore[assignment]

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.sparsity is None) == (self.channels is None):
            raise ValueError("give exactly one of 'sparsity' (unstructured) or 'channels' (structured)")
        if self.sparsity is not None and (self.importance is not None or self.round_to is not None
                                          or self.embeddings):
            raise ValueError("'importance', 'round_to' and 'embeddings' apply to structured pruning (channels), "
                             "not sparsity")
        if self.channels is not None and self.schedule != "agp":
            raise ValueError("'schedule' applies to unstructured pruning (sparsity); structured pruning uses steps")
        return self


class Quantize(Config):
    """``slimfuse quantize``: one scheme, on the backend measured fastest for it or the one named.

    Fields a scheme does not use are refused by that scheme when given; left unset, each takes the
    default written here (``None``: the scheme's own, stated in the field's help)."""

    scheme: Annotated[str, Field(description="int8-dynamic, int8-static, qat, fp16, bf16, mixed or codebook:N")]
    backend: Annotated[Literal["auto", "torch", "onnxruntime"],
                       Field(description="auto (with data: every backend built and timed here, the fastest within "
                                         "auto_max_drop kept), torch or onnxruntime")] = "auto"
    auto_batch: Annotated[int, Field(ge=1, le=2**20, description="backend=auto: the deployment batch size "
                                                                 "timed")] = 256
    auto_max_drop: Annotated[Points, Field(description="backend=auto: largest validation accuracy drop, in points, "
                                                       "of the backend chosen")] = 1.0
    calibrator: Annotated[Literal["minmax", "percentile", "entropy"] | None,
                          Field(description="int8-static/mixed activation ranges (default: percentile on torch, "
                                            "minmax on onnxruntime, as measured)")] = None
    samples: Annotated[int, Field(ge=1, le=10**7, description="calibration samples (at most)")] = 512
    percentile: Annotated[float, Field(gt=50, le=100, description="percentile calibrator: the percentile of "
                                                                  "|activation| kept")] = 99.99
    per_channel: Annotated[bool, Field(description="onnxruntime: per-channel weight scales")] = True
    format: Annotated[Literal["qdq", "qoperator"], Field(description="onnxruntime int8-static graph format")] = "qdq"
    max_drop: Annotated[Points, Field(description="mixed: largest validation accuracy drop, in points "
                                                  "(0.5 = half a point)")] = 0.5
    high: Annotated[Literal["fp32", "fp16", "bf16"], Field(description="mixed: precision of the layers kept "
                                                                       "out of int8")] = "fp32"
    compute: Annotated[Literal["auto", "half", "fp32"],
                       Field(description="fp16/bf16: compute in half precision (auto: where this CPU has the "
                                         "unit, else storage-only)")] = "auto"
    epochs: Annotated[FineTuneEpochs | None, Field(description="qat / codebook fine-tuning epochs (default 3 qat, "
                                                               "2 codebook)")] = None
    lr: Annotated[LearningRate | None, Field(description="qat / codebook fine-tuning learning rate "
                                                         "(default 1e-4)")] = None
    batch_size: Annotated[BatchSize, Field(description="qat: samples per optimizer step")] = 64
    iters: Annotated[int, Field(ge=1, le=10_000, description="codebook: k-means iterations")] = 30
    device: Annotated[Device, Field(description="qat / codebook: where fine-tuning runs (auto: CUDA when torch sees "
                                                "a GPU, else the CPU; cpu; cuda[:N]); the quantized model runs on the "
                                                "CPU")] = "cpu"
    validate: Annotated[bool, Field(description="check the result before returning it: it runs, is finite, has not "
                                                "collapsed, agrees with its input, reloads bit-exactly")] = True  # type: ignore[assignment]
    exclude: Annotated[Names | None, Field(description="layers kept in float: module paths (torch) or ONNX node "
                                                       "names (onnxruntime)")] = None
    op_types: Annotated[Names | None, Field(description="onnxruntime int8-static: quantize only these ONNX op "
                                                        "types (default: all it can)")] = None
    exclude_extreme: Annotated[bool, Field(description="onnxruntime int8-static: keep nodes reading or writing "
                                                       "extreme values (attention masks) in float")] = True

    @field_validator("scheme")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        name, sep, arg = v.partition(":")
        if name not in SCHEME_NAMES:
            raise ValueError(f"unknown quantization scheme {v!r} (known: {', '.join(sorted(SCHEME_NAMES))})")
        if name == "codebook":
            if not (arg.isdigit() and int(arg) in CODEBOOK_BITS):
                raise ValueError(f"codebook takes its bits after a colon, 2..8 (codebook:4), got {v!r}")
        elif sep:
            raise ValueError(f"scheme {name!r} takes no parameter, got {v!r}")
        return v

    def options(self) -> dict:
        """The scheme options set explicitly (a scheme refuses the ones it does not use)."""
        return {k: v for k, v in self.given().items()
                if k not in ("scheme", "backend", "validate", "auto_batch", "auto_max_drop")}


class Distill(Config):
    """``slimfuse distill``: a student trained to imitate a teacher on a transfer set."""

    temperature: Annotated[float, Field(gt=0, lt=1e4, allow_inf_nan=False,
                                        description="softmax temperature of both models")] = 4.0
    alpha: Annotated[float, Field(ge=0, le=1, description="weight of the soft (teacher) term; 1 - alpha weighs "
                                                          "the labels")] = 0.9
    transfer: Annotated[str, Field(min_length=1, max_length=4096,
                                   description="augment (the training split plus shifted, noisy copies), train, "
                                               "or a .npy file of unlabeled inputs")] = "augment"
    copies: Annotated[int, Field(ge=1, le=1000, description="augmented copies of the training set "
                                                            "(transfer=augment)")] = 4
    shift: Annotated[int, Field(ge=0, le=64, description="augment: largest shift in pixels")] = 2
    noise: Annotated[float, Field(ge=0, le=10, description="augment: Gaussian noise std")] = 0.05
    mixup: Annotated[float, Field(ge=0, le=100, description="unlabeled mixup blends, as a multiple of the "
                                                            "training set")] = 0.0
    hints: Annotated[dict[str, str], Field(max_length=1000, description="FitNets hints "
                                                                       "STUDENT_MODULE=TEACHER_MODULE")] = {}
    hint_weight: Annotated[float, Field(ge=0, lt=1e6, description="weight of the hint terms")] = 1.0
    epochs: Epochs = 20
    batch_size: BatchSize = 64
    lr: LearningRate = 1e-3
    optimizer: Annotated[Optimizer, Field(description="adam or sgd (momentum 0.9)")] = "adam"
    schedule: Annotated[Schedule, Field(description="learning-rate schedule: none or cosine")] = "none"
    device: Device = "cpu"
    validate: Annotated[bool, Field(description="check the result before returning it: it runs, is finite, has not "
                                                "collapsed, agrees with its input, reloads bit-exactly")] = True  # type: ignore[assignment]

    @field_validator("transfer")
    @classmethod
    def _transfer(cls, v: str) -> str:
        if v not in ("train", "augment") and not v.endswith(".npy"):
            raise ValueError(f"transfer is train, augment or a .npy file of unlabeled inputs, got {v!r}")
        return v


class Ensemble(Config):
    """``slimfuse ensemble``: trained members combined into one model, weights learned on validation data."""

    method: Annotated[Literal[ENSEMBLE_METHODS],  # type: ignore[valid-type]
                      Field(description="mean, mean-logits, vote, weighted (selection on validation "
                                        "predictions) or stacking")] = "weighted"
    rounds: Annotated[int, Field(ge=1, le=10_000, description="weighted: selection rounds")] = 25
    metric: Annotated[Literal["nll", "error"], Field(description="weighted: what selection minimizes")] = "nll"
    refine: Annotated[bool, Field(description="weighted: refine the weights by minimizing validation NLL (pulled "
                                              "toward equal weights by prior)")] = True
    bags: Annotated[int, Field(ge=0, le=1000, description="weighted: selection on this many bootstrap resamples "
                                                          "of the validation rows, averaged (0: one plain run)")] = 20
    prior: Annotated[float, Field(ge=0, le=1e6, description="weighted: pseudo-samples pulling the refined weights "
                                                            "toward equal")] = 5.0
    temperature: Annotated[bool, Field(description="weighted: fit one temperature of the combined probabilities on "
                                                   "validation NLL")] = True
    fallback: Annotated[bool, Field(description="weighted: when a cross-validated check finds no confident gain "
                                                "over the best member, return the best member alone")] = True
    folds: Annotated[int, Field(ge=2, le=100, description="weighted: folds of that check")] = 5
    meta: Annotated[Literal["loglinear", "linear", "mlp"], Field(
        description="stacking meta-learner: loglinear (an exponent per member on its log-probabilities, a bias per "
                    "class), linear (logistic regression on all probabilities) or mlp")] = "loglinear"
    bag: Annotated[bool, Field(description="stacking with k-fold members: run the fold models (k x the members' "
                                           "cost) so the meta-learner reads the predictions it was trained on")] = False
    blend: Annotated[float, Field(gt=0, le=1, description="stacking without folds: fraction of the validation "
                                                          "split the meta-learner trains on")] = 1.0
    device: Annotated[Device, Field(description="where the members run for their validation predictions: auto "
                                                "(CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N; "
                                                "CPU-only members stay on the CPU")] = "cpu"
    validate: Annotated[bool, Field(description="check the result before returning it: it runs, is finite, has not "
                                                "collapsed, agrees with its input, reloads bit-exactly")] = True  # type: ignore[assignment]


class Merge(Config):
    """``slimfuse merge``: several models of one architecture fused in weight space into one of that architecture."""

    method: Annotated[Literal["rebasin", "uniform", "greedy", "task-arithmetic", "ties", "dare", "dare-ties", "slerp"],
                      Field(description="rebasin (align + average independently trained models), uniform/greedy "
                                        "soups, task-arithmetic, ties, dare, dare-ties (fine-tunes of a base), "
                                        "slerp (two models)")] = "rebasin"
    scale: Annotated[float | None, Field(gt=0, lt=1e3, description="task-vector coefficient (default: chosen on "
                                                                    "validation)")] = None
    density: Annotated[float, Field(gt=0, le=1, description="ties: fraction of each task vector kept")] = 0.2
    drop: Annotated[float, Field(ge=0, lt=1, description="dare: probability of dropping an entry")] = 0.5
    t: Annotated[float | None, Field(ge=0, le=1, description="slerp: weight of the second model (default: chosen "
                                                             "on validation)")] = None
    matching: Annotated[Literal["weights", "activations"] | None,
                        Field(description="rebasin: align by weights or by activations (needs data); default: "
                                          "with data, the one more accurate on validation")] = None
    repair: Annotated[bool | None, Field(description="rebasin: REPAIR renormalisation (default: with data, as "
                                                     "validation accuracy decides)")] = None
    fallback: Annotated[Literal["distill"] | None,
                        Field(description="distill: a merge worse than the best member is replaced by the ensemble "
                                          "distilled into one model")] = None
    distill_epochs: Annotated[Epochs, Field(description="fallback=distill: epochs")] = 10
    device: Annotated[Device, Field(description="fallback=distill: where the distillation runs (auto: CUDA when "
                                                "torch sees a GPU, else the CPU; cpu; cuda[:N])")] = "cpu"
    max_samples: Annotated[int, Field(ge=1, le=10**7, description="training samples for activation "
                                                                  "statistics")] = 2000
    validate: Annotated[bool, Field(description="check the result before returning it: it runs, is finite, has not "
                                                "collapsed, agrees with a member, reloads bit-exactly")] = True  # type: ignore[assignment]


class Export(Config):
    """``slimfuse export``: one ONNX file, checked for parity with torch."""

    format: Annotated[Literal["onnx"], Field(description="export format")] = "onnx"
    opset: Annotated[int, Field(ge=13, le=23, description="ONNX opset")] = 17
    atol: Annotated[float, Field(gt=0, le=1, description="parity: absolute tolerance on outputs")] = 1e-4
    rtol: Annotated[float, Field(ge=0, le=1, description="parity: tolerance relative to max |output|")] = 1e-4


class Measure(Config):
    """``slimfuse eval`` and a recipe's ``measure`` step: accuracy, bytes, parameters, MACs, latency."""

    split: Annotated[Literal["train", "val", "test"], Field(description="split measured")] = "test"
    threads: Annotated[int, Field(ge=1, le=1024, description="CPU threads of the timed runs")] = 2
    seconds: Annotated[float, Field(gt=0, le=3600, description="time spent timing each model, in seconds")] = 1.0
    device: Annotated[Device, Field(description="where the models run and are timed: cpu (where results ship), "
                                                "auto (CUDA when torch sees a GPU, else the CPU), cuda or cuda:N; "
                                                "CPU-only models (ONNX Runtime, int8) stay on the CPU")] = "cpu"


class Optimize(Config):
    """``slimfuse optimize``: search pruning x quantization x distillation x ensembles within ``max_drop``."""

    max_drop: Annotated[Points, Field(description="largest validation accuracy drop, in points (0.5 = half a "
                                                  "point)")] = 0.5
    objective: Annotated[Literal["latency", "throughput", "bytes"],
                         Field(description="latency (batch 1), throughput (large batch) or bytes")] = "latency"
    budget_s: Annotated[float, Field(gt=0, le=7 * 24 * 3600, description="time budget of the search's "
                                                                         "candidates, in seconds (measuring the "
                                                                         "input model comes first, uncounted)")] = 300.0
    ensemble: Annotated[bool, Field(description="also try an ensemble of compressed members")] = True
    device: Annotated[Device, Field(description="where the moves that train run (auto: CUDA when torch sees a GPU, "
                                                "else the CPU; cpu; cuda[:N]); candidates are measured on the "
                                                "CPU")] = "cpu"


VERBS: dict[str, type[Config]] = {
    "train": Train, "prune": Prune, "quantize": Quantize, "distill": Distill, "ensemble": Ensemble,
    "export": Export, "measure": Measure, "optimize": Optimize, "merge": Merge,
}
