"""What this machine computes with: ISA features, cores, the torch and ONNX Runtime kernels that will run.

``hardware()`` is detected at run time, never assumed: the machines slimfuse runs on differ (one had
AMX, another none, and half-precision matmuls there were 13-50x slower than fp32). Every report and
card records ``summary()`` so that a figure is never read without its hardware.

Fields of ``hardware()`` (a plain JSON-able dict):

- ``cpu``: model name from ``/proc/cpuinfo`` (or ``platform.processor()``), ``machine`` (e.g. x86_64);
- ``cores``: logical CPUs this process may run on; ``torch_threads``: torch's current intra-op threads;
- ``flags``: the ISA features slimfuse cares about that the kernel reports (``/proc/cpuinfo`` flags,
  subset of :data:`FEATURES`), ``features``: a readable name per flag (``AMX-BF16``, ``AVX-512 VNNI``);
- ``compute``: what slimfuse will compute with: ``{"bf16": bool, "fp16": bool, "int8": "amx"|"vnni"|...}``;
- ``torch``: ``version``, ``cpu_capability`` (``torch.backends.cpu.get_cpu_capability()``), ``mkldnn``
  (oneDNN available), ``quantized_engines`` (fbgemm/x86/onednn/qnnpack);
- ``onnxruntime``: ``version`` and ``providers`` (None when ONNX Runtime is not installed).
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

# /proc/cpuinfo flag -> readable name, in order of the report
FEATURES = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX-512",
    "avx512bw": "AVX-512BW",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "avx512_fp16": "AVX512-FP16",
    "amx_tile": "AMX",
    "amx_int8": "AMX-INT8",
    "amx_bf16": "AMX-BF16",
    "amx_fp16": "AMX-FP16",
    "asimd": "NEON",
    "sve": "SVE",
}
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """Every flag of the first processor in ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); empty elsewhere."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _cpu_name(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware"):
            return value.strip()
    return platform.processor() or platform.machine()


def _onnxruntime() -> dict | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return {"version": ort.__version__, "providers": list(ort.get_available_providers())}


@functools.lru_cache(maxsize=1)
def _static() -> dict:
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        text = ""
    flags = cpu_flags(text)
    have = [f for f in FEATURES if f in flags]
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    int8 = ("amx" if "amx_int8" in flags else "vnni" if {"avx512_vnni", "avx_vnni"} & flags
            else "avx512" if "avx512bw" in flags else "avx2" if "avx2" in flags else "generic")
    return {
        "cpu": _cpu_name(text),
        "machine": platform.machine(),
        "cores": cores,
        "flags": have,
        "features": [FEATURES[f] for f in have],
        "compute": {
            # half precision is computed in half only where a matrix unit or native ISA does it (see module doc)
            "bf16": bool({"amx_bf16", "avx512_bf16"} & flags),
            "fp16": bool({"amx_fp16", "avx512_fp16"} & flags),
            "int8": int8,
        },
        "torch": {
            "version": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn": bool(torch.backends.mkldnn.is_available()),
            "quantized_engines": [e for e in torch.backends.quantized.supported_engines if e != "none"],
        },
        "onnxruntime": _onnxruntime(),
    }


def hardware() -> dict:
    """This machine's CPU features, cores and the kernels torch and ONNX Runtime offer (see module doc)."""
    info = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
            for k, v in _static().items()}
    info["torch_threads"] = torch.get_num_threads()
    return info


def computes(dtype: str) -> bool:
    """True when this CPU computes ``dtype`` (``"bf16"`` or ``"fp16"``) natively (AMX or AVX-512)."""
    return bool(_static()["compute"].get(dtype, False))


def summary() -> dict:
    """The short form written into every report and card: CPU, cores, features, torch and ORT versions."""
    info = _static()
    ort = info["onnxruntime"]
    return {
        "cpu": info["cpu"],
        "cores": info["cores"],
        "features": list(info["features"]),
        "torch": info["torch"]["version"],
        "cpu_capability": info["torch"]["cpu_capability"],
        "onnxruntime": None if ort is None else ort["version"],
    }


def describe(info: dict | None = None) -> str:
    """One line: ``Intel Xeon ... , 2 cores, AVX-512, AMX-BF16, ...; torch 2.13.0 (AVX512); onnxruntime 1.32``."""
    s = info or summary()
    ort = f"; onnxruntime {s['onnxruntime']}" if s.get("onnxruntime") else ""
    feats = ", ".join(s.get("features") or []) or "no vector extensions detected"
    return f"{s['cpu']}, {s['cores']} cores, {feats}; torch {s['torch']} ({s['cpu_capability']}){ort}"
