"""Where a verb trains and runs: ``device="cpu"`` (every verb's default, the tested path) ``| "auto" | "cuda" |
"cuda:N"``.

``resolve`` turns the name every verb takes into a ``torch.device``: ``auto`` is CUDA when this torch
build sees a GPU (under torchrun each rank's own, ``cuda:LOCAL_RANK``), else the CPU; a CUDA device
that is not there is one :class:`ConfigError` saying why (a CPU-only build, no GPU visible, an index
past the count). Techniques move the model and each batch to the device while they work and give
their result back on the CPU, so what they return saves, quantizes and exports as any CPU model, and
artifacts always hold CPU tensors. Models that only run on the CPU (ONNX Runtime, torch int8 kernels)
stay there: ``movable`` says which.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from .configs import DEVICES
from .errors import ConfigError

CPU = torch.device("cpu")


def resolve(device: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` a verb's ``device=`` names (``None`` is ``auto``)."""
    if isinstance(device, torch.device):
        device = str(device)
    if device is None:
        device = "auto"
    if not isinstance(device, str) or not DEVICES.fullmatch(device):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return CPU
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA support (a CPU build)" if torch.version.cuda is None
               else "no GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)")
        raise ConfigError(f"device={device!r}: {why}; use device='cpu' or 'auto'")
    count = torch.cuda.device_count()
    if device in ("auto", "cuda"):
        index = local_rank() % count
    else:
        index = int(device.partition(":")[2])
        if index >= count:
            raise ConfigError(f"device={device!r}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def cpu_only(device, what: str) -> None:
    """Refuse a GPU ``device`` for ``what``, which trains on the CPU only (``auto`` means the CPU there)."""
    if device != "auto" and resolve(device) != CPU:
        raise ConfigError(f"{what} trains on the CPU only; pass device='cpu' (got device={str(device)!r})")


def local_rank() -> int:
    """This process's rank on its node under torchrun (``LOCAL_RANK``), else 0."""
    try:
        return int(os.environ.get("LOCAL_RANK", 0))
    except ValueError:
        raise ConfigError("LOCAL_RANK must be an integer (it is set by torchrun)") from None


def of(model) -> torch.device:
    """The device ``model``'s first parameter or buffer lives on (the CPU for a module without any)."""
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return CPU


def where(inputs) -> torch.device:
    """The device of a batch's inputs (its first tensor; the CPU when it holds none)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.device
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else ()
    for v in values:
        if isinstance(v, (torch.Tensor, tuple, list, dict)):
            return where(v)
    return CPU


def movable(model) -> bool:
    """Whether ``model`` may run off the CPU: plain torch modules may; ONNX Runtime predictors and torch
    int8 modules (whose kernels are CPU-only) may not."""
    if not isinstance(model, nn.Module) or getattr(model, "slimfuse_runtime", "torch") != "torch":
        return False
    return not any(getattr(m, "slimfuse_cpu_only", False)
                   or type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized"))
                   for m in model.modules())


def to(inputs, device: torch.device):
    """A tensor, a tuple/list or a dict of tensors (a batch's inputs) on ``device``; other values as they are."""
    if isinstance(inputs, torch.Tensor):
        if inputs.device == device:
            return inputs
        return inputs.to(device, non_blocking=device.type == "cuda")  # to the host: blocking, so it is there
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to(v, device) for v in inputs)
    if isinstance(inputs, dict):
        return {k: to(v, device) for k, v in inputs.items()}
    return inputs


@contextlib.contextmanager
def placed(model, device: torch.device):
    """Run ``model`` on ``device`` inside the block and put it back where it was after (even on error).

    Models that cannot move (:func:`movable`) stay on the CPU; the block gets the device they run on."""
    if not isinstance(model, nn.Module) or (device == CPU and of(model) == CPU) or not movable(model):
        yield of(model)
        return
    home = of(model)
    model.to(device)
    try:
        yield device
    finally:
        model.to(home)
