"""A process's own peak resident memory, for the cost reports of `alora fisher` and the harness's drivers."""

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
