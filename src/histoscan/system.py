"""Facts about the machine this process runs on."""

from __future__ import annotations

import os
from pathlib import Path


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and ``taskset`` narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - no affinity call (macOS, Windows)
        return max(1, os.cpu_count() or 1)


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The feature flags the kernel reports for the first CPU (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16_cpu(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16); elsewhere bf16 is emulated and slow.

    Reads the kernel's flags, and falls back to torch's own CPU capability string
    (``AVX512_BF16`` / ``AMX_BF16`` where torch reports it).
    """
    if cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS):
        return True
    import torch

    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    return "BF16" in capability or "AMX" in capability


def hardware_id(device: str = "cpu") -> str:
    """A short name of the hardware a speed measurement holds for.

    The CPU model, its cores and whether it has native bf16; or the CUDA card's name.
    """
    if device.startswith("cuda"):
        import torch

        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bf16 = "native bf16" if native_bf16_cpu() else "no native bf16"
    return f"cpu: {model or 'unknown'}, {available_cores()} cores, {bf16}"


def release_free_memory() -> bool:
    """Hand the C allocator's free heap back to the system (glibc's ``malloc_trim(0)``); False where there is none.

    Written by hand (a ctypes call) because no library exposes it. Long loops that allocate and free
    large tensors (Grad-CAM's forward and backward passes) otherwise leave RSS swinging by a few hundred
    MB as glibc keeps freed memory: measured by ``benchmarks/bench_explain.py``, not a leak.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return False
