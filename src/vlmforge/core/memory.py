"""Handing freed memory back to the operating system.

glibc keeps memory a process has freed (small and mid-sized allocations live in its heap arenas) and
reuses it, but does not return it: after an export stage or the validation's PyTorch model is freed, the
process stays resident at its high-water mark, and what comes next (ONNX Runtime sessions, the next
stage) stacks on top. `give_back()` collects Python garbage and asks glibc (`malloc_trim(0)`) to release
every free page. Measured at Qwen2.5-VL-3B widths it matters only once nothing references the weights any
more (exporters/onnx_export._forget_trace drops the exporter's references): alone it took a 2-layer build's
peak from 5.51 to 5.44 GiB. Elsewhere (musl, macOS) it only collects garbage.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

_trim = None
_seen_peak_kib = 0  # the highest RSS or VmHWM reported since the last reset_peak(): see peak_kib


def give_back() -> None:
    """gc.collect(), then glibc's malloc_trim(0) where there is one."""
    global _trim
    gc.collect()
    if _trim is None:
        _trim = False
        if sys.platform.startswith("linux"):
            try:
                _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
                _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError):
                _trim = False
    if _trim:
        _trim(0)


def status_kib(*keys: str) -> tuple[int, ...] | None:
    """Fields of Linux /proc/self/status in KiB (e.g. "VmRSS", "VmHWM"); None where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return tuple(int(fields[k].split()[0]) for k in keys)
    except (OSError, KeyError, ValueError):
        return None


def peak_kib() -> tuple[int, int] | None:
    """(RSS now, peak) in KiB; None where there is no /proc. The peak never goes down between two calls: Linux's
    VmHWM is max(recorded high-water mark, RSS now), and the mark is recorded only when pages are unmapped, so
    RSS that leaves another way (reclaimed file pages of a mapped checkpoint) can make a later VmHWM read lower
    than an earlier one (seen in CI: 0.65 GiB, then 0.64)."""
    global _seen_peak_kib
    kib = status_kib("VmRSS", "VmHWM")
    if kib is None:
        return None
    _seen_peak_kib = max(_seen_peak_kib, *kib)
    return kib[0], _seen_peak_kib


def reset_peak() -> None:
    """Start a new high-water mark (Linux: writing 5 to clear_refs resets VmHWM), so a matrix cell's peak is its
    own even in a reused worker."""
    global _seen_peak_kib
    _seen_peak_kib = 0
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB since the last reset_peak() (getrusage's, which no reset touches, where
    there is no /proc)."""
    kib = peak_kib()
    if kib is not None:
        return round(kib[1] / 1024, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_note() -> str:
    """"RSS 3.41 GiB, peak 5.67 GiB": this process's resident memory now and its high-water mark, for the
    build log's phase lines; "" where there is no /proc."""
    kib = peak_kib()
    if kib is None:
        return ""
    now, peak = (k / (1 << 20) for k in kib)
    return f"RSS {now:.2f} GiB, peak {peak:.2f} GiB"
