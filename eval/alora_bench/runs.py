"""Running the product from the drivers: `axolotl train` and `alora` commands as logged child processes, with
their wall time and own peak memory, and reading back what they logged. Shared by the main job and the
reproduction driver."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

# every child: no telemetry, hubs offline (all data and models are local), no tokenizer thread pools
ENV = {"AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def log(msg: str, who: str) -> None:
    print(f"[{who} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def child_env() -> dict:
    """This environment, the venv's bin first on PATH (`axolotl train` execs `accelerate` from it), plus ENV."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **ENV}


def run_logged(cmd: list[str], log_path: Path, cwd: Path, echo: str, who: str = "reproduce") -> dict:
    """Run `cmd`, teeing its output to `log_path`; returns wall time and the child's own peak memory."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"{' '.join(cmd[2:] if cmd[1] == '-m' else cmd)}  (log: {log_path})", who)
    start = time.time()
    with log_path.open("w") as f:
        proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
        peak = PeakMemory(proc.pid)
        for line in proc.stdout:
            f.write(line)
            if line.startswith("{'loss'") or "ALoRA" in line or "Error" in line or line.startswith("cost:"):
                print(f"  {echo}: {line.rstrip()[:200]}", flush=True)
        code = proc.wait()
        peak.stop()
    if code != 0:
        raise SystemExit(f"{echo} failed (exit {code}); see {log_path}")
    return {"wall_s": round(time.time() - start, 1), "peak_rss_mib": peak.mib}


def axolotl_train(cfg: dict, cfg_path: Path, log_path: Path, cwd: Path, echo: str, who: str = "reproduce") -> dict:
    """Write `cfg` to `cfg_path` and run `axolotl train` on it (see run_logged)."""
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run_logged([sys.executable, "-m", "axolotl.cli.train", str(cfg_path)], log_path, cwd, echo, who)


class PeakMemory:
    """The child's peak resident memory, polled from /proc/<pid>/status (VmHWM).

    Not getrusage: Linux carries the parent's high-water mark into a forked child's ru_maxrss, and a driver
    which runs lm-eval in-process is larger than most of its children.
    """

    def __init__(self, pid: int, interval: float = 0.2):
        self.kib, self._done = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(pid, interval), daemon=True)
        self._thread.start()

    def _poll(self, pid: int, interval: float) -> None:
        from .peak_memory import vm_hwm_kib

        while not self._done.is_set():
            kib = vm_hwm_kib(pid)
            if kib is None:  # exited (or a zombie without an mm)
                return
            self.kib = max(self.kib, kib)
            self._done.wait(interval)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    @property
    def mib(self) -> int | None:
        return round(self.kib / 1024) if self.kib else None


def last_train_log(path: Path) -> dict | None:
    """The last `{'loss': ...}` line axolotl printed (with alora_reg_loss / alora_reg_ratio for penalised runs)."""
    if not path.is_file():
        return None
    entries = [ast.literal_eval(line.strip()) for line in path.read_text().splitlines() if line.startswith("{'loss'")]
    return {k: float(v) for k, v in entries[-1].items()} if entries else None
