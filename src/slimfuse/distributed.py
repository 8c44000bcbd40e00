"""Data-parallel runs on PyTorch's own engine: torchrun + DistributedDataParallel.

Nothing to configure: under ``torchrun --nproc_per_node N`` (or multi-node with
``--nnodes``/``--rdzv-endpoint``) the environment says how many processes there
are; ``setup()`` joins the process group (gloo on CPU, NCCL on GPU) with a
timeout on collectives, so a dead peer fails the run instead of hanging it.
Only rank 0 writes files: the atomic writers ask :func:`is_main`.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .devices import local_rank
from .errors import ConfigError

TIMEOUT_ENV = "SLIMFUSE_DIST_TIMEOUT"  # seconds a collective may wait for a peer (default 300)


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise ConfigError("RANK and WORLD_SIZE must be integers (they are set by torchrun)") from None


def is_main() -> bool:
    return world()[0] == 0


def setup() -> bool:
    """Join the process group when launched by torchrun; True when training is data-parallel."""
    _, size = world()
    if size <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":  # each rank drives its own GPU (NCCL needs the current device set first)
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "300")))
        dist.init_process_group(backend=backend, timeout=timeout)
        atexit.register(_teardown)
    return True


def _teardown() -> None:
    """Leave the process group before the interpreter exits. A gloo group left to the C++ destructors
    at exit can abort the process ("terminate called without an active exception", SIGABRT: seen on
    rank 0 of a two-process run here) after its work is done, failing a run that succeeded."""
    if dist.is_available() and dist.is_initialized():
        try:  # every rank's work done (a dead peer: at most 10 s), then the group goes while Python is alive
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=10))
            else:
                dist.barrier()
        except Exception:  # a peer already gone: tear down what is left
            pass
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def all_reduce_mean(value: float) -> float:
    """Mean of a Python number over all ranks (the value itself outside torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_wire())
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_json(obj, src: int):
    """Send a JSON-able value from rank ``src`` to every rank (bytes, never a pickle)."""
    import json

    wire = _wire()
    payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(wire)
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=wire)
    dist.broadcast(size, src=src)
    buf = payload if dist.get_rank() == src else torch.empty(int(size.item()), dtype=torch.uint8, device=wire)
    dist.broadcast(buf, src=src)
    return json.loads(bytes(buf.cpu().tolist()).decode())


def broadcast_tensor(t: torch.Tensor, src: int) -> None:
    """Overwrite ``t`` on every rank with rank ``src``'s values (through this rank's GPU under NCCL)."""
    wire = _wire()
    if t.device == wire:
        dist.broadcast(t, src=src)
        return
    buf = t.to(wire)
    dist.broadcast(buf, src=src)
    t.copy_(buf)


def _wire() -> torch.device:
    """Where collectives' tensors live: this rank's GPU under NCCL (it moves CUDA tensors only), else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
