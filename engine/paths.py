"""Which scoring path is fastest on this machine: measured by `python -m benchmarks.run`, read by the Scorer.

    from engine.paths import recorded_choice, record_choice, machine_key
    record_choice(fingerprint, runner, "grid", "benchmarks.run 2026-11-30: grid 9.1 ms vs pair 14.0 ms per call")
    recorded_choice(fingerprint, runner)   # {"path": "grid", "reason": ..., ...} or None

A Scorer scores one-image blocks either with the grid graphs or with the pair graphs (engine/runtime.py,
Scorer.choose_path). Both are validated against the same torch model at export; which one runs faster
depends on the machine (CPU, cores, ONNX Runtime build) and the model's sizes. The benchmark times both
through the Scorer on the artifact and records the faster one here, keyed by the machine, the artifact's
fingerprint, the backend, precision and threads; a later `Scorer(path="auto")` with the same key uses it
and says so in `runner.reason`. Nothing is measured when a Scorer loads, so two runs on one machine
always take the same path (a resumed `engine.score` gives byte-identical output).

The record is a JSON file: $BSSAN_PATHS if set, else $XDG_CACHE_HOME/bssan-engine/paths.json (default
~/.cache/...). BSSAN_PATHS=off ignores records (and the benchmark writes none). An unreadable record is
ignored with one warning line on the "engine" logger: it is a cache, never an input.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
from pathlib import Path

from engine.files import write_json_atomic

PATHS_ENV = "BSSAN_PATHS"
log = logging.getLogger("engine")


def record_file() -> Path | None:
    """Where choices are recorded (None: BSSAN_PATHS=off)."""
    value = os.environ.get(PATHS_ENV)
    if value is not None:
        return None if value.strip().lower() in ("off", "0", "") else Path(value)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "bssan-engine" / "paths.json"


def cpu_model() -> str:
    """`model name` of /proc/cpuinfo (platform.processor() or the machine type elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(fingerprint: str, runner) -> str:
    """The key of a choice: machine (CPU model, cores, onnxruntime version), artifact, backend, precision, threads."""
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "none"
    # the scoring layout, not how it was asked for: on ONNX Runtime's CPU backend threads=None runs one one-thread
    # call per core, the same layout as threads=<cores> (engine.serve's default 2 on a 2-core machine)
    calls = getattr(runner, "concurrent_calls", 1)
    threads = calls if runner.threads is None and calls > 1 else runner.threads
    return (f"{cpu_model()} x{os.cpu_count()} | onnxruntime {ort_version} | artifact {fingerprint[:16]} | "
            f"{runner.backend.value} {runner.precision} threads={threads}")


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("%s: ignored (%s); the scoring path falls back to the default", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def recorded_choice(fingerprint: str, runner) -> dict | None:
    """The recorded choice {"path", "reason", "measured", "date"} for this machine and run, or None."""
    path = record_file()
    if path is None:
        return None
    entry = _read(path).get(machine_key(fingerprint, runner))
    if not isinstance(entry, dict) or entry.get("path") not in ("grid", "pair", "kernel"):
        return None
    return entry


def record_choice(fingerprint: str, runner, chosen: str, reason: str, measured: dict | None = None) -> Path | None:
    """Record `chosen` ("grid", "pair" or "kernel") for this machine and run (atomic rewrite of the file); its path, or None
    when off."""
    if chosen not in ("grid", "pair", "kernel"):
        raise ValueError(f"path {chosen!r}: expected grid, pair or kernel")
    path = record_file()
    if path is None:
        return None
    data = _read(path)
    data[machine_key(fingerprint, runner)] = {
        "path": chosen, "reason": reason, "measured": measured or {},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)
    return path
