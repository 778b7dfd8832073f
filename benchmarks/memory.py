"""Peak resident memory of this process, shared by the benchmarks (Linux `/proc`; `ru_maxrss` elsewhere)."""

from __future__ import annotations


def rss_kb(field: str = "VmRSS") -> int:
    """A memory field of `/proc/self/status`, in KiB (`VmRSS`: current resident set; `VmHWM`: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak() -> bool:
    """Resets the kernel's peak-RSS counter (`VmHWM`). Returns False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_kb(reset_ok: bool) -> int:
    """Peak resident memory in KiB: since `reset_peak()` if it succeeded, else since the process started."""
    if reset_ok:
        return rss_kb("VmHWM")
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
