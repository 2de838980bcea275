"""CPU-dependent quantization defaults: ``reduce_range`` only where the CPU lacks VNNI.

On x86, ONNX Runtime's u8 x s8 integer kernels (U8S8: uint8 activations, int8 weights) use
``vpmaddubsw`` on CPUs without VNNI: it adds two u8*s8 products into a *saturating* int16,
and 255 * 127 * 2 = 64770 does not fit, so large activations times large weights clip
silently. That is the U8S8 saturation trap. ``reduce_range`` quantizes weights to 7 bits
(-64..63), which keeps every pair sum inside int16. CPUs with VNNI (``vpdpbusd``: AVX512-VNNI
or AVX-VNNI) accumulate the products straight into int32 and never saturate, so the eighth bit
is kept there. Arm's dot-product instructions accumulate into int32 as well.

The functions take the ``/proc/cpuinfo`` text and the machine name as arguments, so that the
decision can be tested for any CPU; by default they read this machine's.
"""

from __future__ import annotations

import functools
import pathlib
import platform

__all__ = ["VNNI_FLAGS", "X86_MACHINES", "cpu_flags", "cpu_has_vnni", "needs_reduce_range"]

CPUINFO = pathlib.Path("/proc/cpuinfo")
# CPU flags (as /proc/cpuinfo spells them) of the instructions that accumulate u8*s8 products
# into int32 without an int16 intermediate.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})


@functools.cache
def _read_cpuinfo() -> str:
    try:
        return CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux, or no /proc: no flags known
        return ""


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags: the ``flags`` (x86) or ``Features`` (Arm) line of cpuinfo."""
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_vnni(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has an int8 dot-product instruction that accumulates into int32 (x86)."""
    return bool(cpu_flags(cpuinfo) & VNNI_FLAGS)


def needs_reduce_range(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """True on x86 CPUs without VNNI, where U8S8 kernels can saturate (see the module doc)."""
    machine = (platform.machine() if machine is None else machine).lower()
    return machine in X86_MACHINES and not cpu_has_vnni(cpuinfo)
