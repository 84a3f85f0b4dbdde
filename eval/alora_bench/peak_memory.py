"""A process's own peak resident memory (Linux VmHWM), to measure what the plugin's memory model predicts."""

from __future__ import annotations


def vm_hwm_kib(pid: int | str = "self") -> int | None:
    """A process's own peak RSS (Linux VmHWM), None where /proc has none (not Linux, or the process has exited).
    ru_maxrss would include the high-water mark of the process that forked it (a large driver that runs
    `alora fisher` as a child, for instance)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def reset_peak() -> bool:
    """Restart this process's VmHWM from its current RSS (Linux: write 5 to /proc/self/clear_refs); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
