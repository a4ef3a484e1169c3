"""What every benchmark shares: the machine record, a timer with medians and p90, thread pinning, JSON out.

    from benchmarks.common import machine_info, time_calls, set_threads, write_json_atomic
    set_threads(2)                                   # torch intra-op threads; ORT sessions take `threads` too
    timing = time_calls(lambda: session.run(None, feeds), repeats=5, warmup=1)
    timing["median_s"], timing["p90_s"]              # per call
    write_json_atomic(Path("out.json"), {"machine": machine_info(), ...})

Benchmarks are scripts, not timed tests: fixed seeds, a warm-up call, the clock read after the
call returns (CPU: synchronous; the GPU script synchronizes itself), medians over repeats.
The machine record says what else was running (load average) because the CPUs are shared.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np

from engine import files
from engine.paths import cpu_model
from engine.files import package_versions

REPO_ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("numpy", "torch", "onnx", "onnxruntime", "matplotlib", "bssan-engine")
CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")
DEFAULT_THREADS = 2  # this workplace's core count; 2 intra-op threads measured best (ARCHITECTURE.md)



def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FLAGS_OF_INTEREST if f in have]
    except OSError:
        pass
    return []


def git_commit() -> dict:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def library_versions() -> dict:
    return {"python": platform.python_version(), **package_versions(LIBRARIES)}


def machine_info(threads: int = DEFAULT_THREADS) -> dict:
    """CPU model, cores, ISA flags that matter for GEMMs, library versions, git commit, date, load."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "threads_used": threads,
        "platform": platform.platform(),
        "versions": library_versions(),
        "git": git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def set_threads(threads: int) -> None:
    """Pin torch (if imported by the caller) to `threads` intra-op threads."""
    import torch

    torch.set_num_threads(threads)


def summarize(times: list[float], cpu: list[float] | None = None) -> dict:
    """Per-call statistics of wall times (and the process's CPU time per call, every thread of it):
    {"median_s", "p90_s", "min_s", "max_s", "p25_s", "cpu_median_s", "calls", "times_s"}."""
    array = np.asarray(times)
    out = {"median_s": float(np.median(array)), "p90_s": float(np.percentile(array, 90)), "min_s": float(array.min()),
           "max_s": float(array.max()), "p25_s": float(np.percentile(array, 25)), "calls": len(times),
           "times_s": [round(t, 6) for t in times]}
    if cpu:
        out["cpu_median_s"] = float(np.median(cpu))
    return out


def time_calls(call: Callable[[], object], repeats: int, warmup: int = 1, min_seconds: float = 0.0,
               max_seconds: float = float("inf"), min_calls: int = 3) -> dict:
    """Run `call` warmup times untimed, then `repeats` timed times (more while the total is under
    `min_seconds`), stopping early once `min_calls` calls took `max_seconds` together (slow
    variants); summarize() of the per-call times."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    cpu: list[float] = []
    while len(times) < repeats or sum(times) < min_seconds:
        if len(times) >= min_calls and sum(times) >= max_seconds:
            break
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return summarize(times, cpu)


def time_round_robin(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, max_seconds: float = float("inf"),
                     min_calls: int = 3, min_seconds: float = 0.0) -> dict[str, dict]:
    """time_calls for several competitors at once, one call of each in turn per round, so that a
    change of load on a shared machine hits all of them alike. At least `repeats` rounds, more while
    any competitor has timed less than `min_seconds`; a competitor stops early once it has `min_calls`
    calls taking `max_seconds` together. {name: summarize() dict}, plus "load" per round under "_rounds"."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    loads = []
    rounds = 0
    while rounds < repeats or any(sum(v) < min_seconds and not (len(v) >= min_calls and sum(v) >= max_seconds)
                                  for v in times.values()):
        rounds += 1
        for name, call in calls.items():
            if len(times[name]) >= min_calls and sum(times[name]) >= max_seconds:
                continue
            start, start_cpu = time.perf_counter(), time.process_time()
            call()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
        if rounds >= 10 * max(repeats, 1) + 100:  # a competitor that never reaches min_seconds (bounded anyway)
            break
    out: dict = {name: summarize(values, cpu[name]) for name, values in times.items()}
    out["_rounds"] = {"rounds": rounds, "load_1min": loads}
    return out


def load_note() -> str:
    """One line on the machine's load right now (other engineers share the cores)."""
    if not hasattr(os, "getloadavg"):
        return "load average unavailable"
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def write_json_atomic(path: Path, payload: dict) -> None:
    """A report as JSON, keys in the order written (engine.files.write_json_atomic: temp file + rename)."""
    files.write_json_atomic(path, payload, sort_keys=False)
