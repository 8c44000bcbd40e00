"""The resource budget: how much memory one file may make slimfuse allocate.

Everything read from a user's file (a card's shapes, a compressed tensor, an ``.npz``
header, a CSV label, a recipe) is checked against this budget *before* the memory is
allocated, so a crafted 2 KB file cannot make slimfuse allocate gigabytes.

One setting: the environment variable ``SLIMFUSE_MAX_BYTES`` (an integer, optionally with
a ``K``/``M``/``G`` suffix, powers of 1024). Unset, the budget is half of the physical
memory free when it is asked for.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

from .errors import ConfigError, SlimfuseError

ENV = "SLIMFUSE_MAX_BYTES"
FREE_FRACTION = 0.5
_SUFFIX = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def available_memory() -> int:
    """Bytes of physical memory not in use right now."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def max_bytes() -> int:
    """The budget in bytes: ``SLIMFUSE_MAX_BYTES`` or half of the free physical memory."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return int(available_memory() * FREE_FRACTION)
    scale = _SUFFIX.get(text[-1].upper(), 1)
    digits = text[:-1] if scale != 1 else text
    try:
        value = int(digits) * scale
    except ValueError:
        raise ConfigError(f"{ENV} must be a byte count such as 4000000000 or 4G, got {text!r}") from None
    if value < 1:
        raise ConfigError(f"{ENV} must be positive, got {text!r}")
    return value


_CAP: contextvars.ContextVar[int | None] = contextvars.ContextVar("slimfuse_bytes_cap", default=None)


@contextlib.contextmanager
def cap(n: int):
    """Within this block the budget is at most ``n`` bytes (e.g. what a card's model can need)."""
    token = _CAP.set(n if _CAP.get() is None else min(n, _CAP.get()))
    try:
        yield
    finally:
        _CAP.reset(token)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**26 else f"{int(n):,} bytes"


def budget() -> int:
    """The bytes a step may hold in memory now: :func:`max_bytes`, lowered by any :func:`cap` in force."""
    return max_bytes() if _CAP.get() is None else min(max_bytes(), _CAP.get())


def check_bytes(need: float, what: str, error: type[SlimfuseError]) -> None:
    """Raise ``error`` when ``need`` bytes exceed the budget; ``what`` names the thing that needs them."""
    budget_now = budget()
    if need > budget_now:
        raise error(
            f"{what} needs {gib(need)} of memory, over the limit of {gib(budget_now)} "
            f"(set {ENV} to allow more)"
        )


def json_shape_problem(value, *, max_depth: int, max_nodes: int) -> str | None:
    """Why a parsed JSON/YAML value is too deep or too large, or None. Iterative, so a deep value
    cannot overflow the stack; counts every visit, so shared YAML aliases cannot multiply the work."""
    stack = [(value, 1)]
    nodes = 0
    while stack:
        v, d = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            return f"more than {max_nodes:,} values"
        if isinstance(v, (dict, list, tuple)):
            if d > max_depth:
                return f"nested more than {max_depth} levels deep"
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
        elif isinstance(v, str) and len(v) > max_nodes:
            return f"a string of {len(v):,} characters"
    return None
