"""The machine's matmul peak, measured: fp32 (torch, numpy, ONNX Runtime MLAS), bf16 (torch), int8 (ONNX Runtime).

    python -m benchmarks.peak [--threads 2] [--rows 256] [--hidden 256 1024] [--json OUT.json]
    from benchmarks.peak import measure_peaks
    peaks = measure_peaks(hidden_sizes=(256, 1024), rows=256, threads=2)
    peaks["peak"]["fp32"]        # FLOP/s: the best fp32 GEMM measured here

Shapes: the W2R recurrence's GEMM h W_hh^T, [rows, H] x [H, 4H], for each H asked (rows = pairs
per call), and one square 1024^3 GEMM for reference. Kernels:
- fp32: torch.matmul, numpy.matmul (its BLAS, its own thread count), ONNX Runtime MatMul (MLAS:
  what the ORT fp32 pair graphs run on).
- bf16: torch.matmul on bfloat16 tensors (on CPUs without bf16 instructions this is emulated and
  slow; it is measured anyway because the bf16 variant runs on it).
- int8: ONNX Runtime MatMulInteger (uint8 x int8 -> int32, the raw integer kernel) and
  DynamicQuantizeMatMul (fp32 activations quantized per call x int8 weights -> fp32: what
  quantize_dynamic puts into the int8 pair graphs). Their "FLOPs" are integer multiply-adds x 2.

`peak[precision]` is the best rate measured for that precision over every kernel and shape:
the denominator of each benchmark's "fraction of peak".
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_THREADS, machine_info, time_calls, write_json_atomic
from engine.cli import ArgumentParser, command, output_file, positive_int

SQUARE = 1024
MIN_SECONDS = 0.3  # per kernel and shape: long enough for a stable median on a shared machine
MAX_SECONDS = 3.0  # per kernel and shape: a slow (emulated) kernel stops after 3 calls past this
PROBE_SHAPE = (256, 256, 1024)  # bf16 is probed here first: on CPUs without bf16 instructions it is emulated
NATIVE_BF16_RATIO = 0.5  # where /proc/cpuinfo is silent: bf16 at >= half the fp32 rate counts as native
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 and aarch64 /proc/cpuinfo names


def _rate(flops: float, timing: dict) -> float:
    return flops / timing["median_s"]


def _ort_matmul_session(op: str, rows: int, inner: int, cols: int, threads: int):
    """A one-node ONNX model: MatMul (fp32), MatMulInteger (u8 x s8) or DynamicQuantizeMatMul (fp32 x s8)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if op == "MatMul":
        inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [rows, inner])]
        weights = [numpy_helper.from_array(rng.standard_normal((inner, cols)).astype(np.float32), "b")]
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, cols])
        feed = {"a": rng.standard_normal((rows, inner)).astype(np.float32)}
        opsets = [helper.make_opsetid("", 17)]
    elif op == "MatMulInteger":
        inputs = [helper.make_tensor_value_info("a", TensorProto.UINT8, [rows, inner])]
        weights = [numpy_helper.from_array(rng.integers(-127, 128, (inner, cols), dtype=np.int8), "b")]
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
        out = helper.make_tensor_value_info("y", TensorProto.INT32, [rows, cols])
        feed = {"a": rng.integers(0, 256, (rows, inner), dtype=np.uint8)}
        opsets = [helper.make_opsetid("", 17)]
    elif op == "DynamicQuantizeMatMul":
        inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [rows, inner])]
        weights = [numpy_helper.from_array(rng.integers(-127, 128, (inner, cols), dtype=np.int8), "b"),
                   numpy_helper.from_array(np.array([0.01], dtype=np.float32), "b_scale"),
                   numpy_helper.from_array(np.array([0], dtype=np.int8), "b_zero")]
        node = helper.make_node("DynamicQuantizeMatMul", ["a", "b", "b_scale", "b_zero"], ["y"], domain="com.microsoft")
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, cols])
        feed = {"a": rng.standard_normal((rows, inner)).astype(np.float32)}
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    else:
        raise ValueError(f"op {op!r}: expected MatMul, MatMulInteger or DynamicQuantizeMatMul")
    graph = helper.make_graph([node], f"peak_{op}", inputs, [out], initializer=weights)
    model = helper.make_model(graph, opset_imports=opsets)
    from engine.backends.onnxruntime import open_session

    return open_session(model.SerializeToString(), threads=threads), feed


def _torch_rate(rows: int, inner: int, cols: int, dtype_name: str) -> dict:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=gen).to(dtype)
    b = torch.randn(inner, cols, generator=gen).to(dtype)
    with torch.no_grad():
        timing = time_calls(lambda: torch.matmul(a, b), repeats=5, warmup=1, min_seconds=MIN_SECONDS,
                            max_seconds=MAX_SECONDS)
    return {"flops_per_s": _rate(2.0 * rows * inner * cols, timing), "median_s": timing["median_s"]}


def _numpy_rate(rows: int, inner: int, cols: int) -> dict:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, inner)).astype(np.float32)
    b = rng.standard_normal((inner, cols)).astype(np.float32)
    timing = time_calls(lambda: a @ b, repeats=5, warmup=1, min_seconds=MIN_SECONDS, max_seconds=MAX_SECONDS)
    return {"flops_per_s": _rate(2.0 * rows * inner * cols, timing), "median_s": timing["median_s"]}


def _ort_rate(op: str, rows: int, inner: int, cols: int, threads: int) -> dict:
    session, feed = _ort_matmul_session(op, rows, inner, cols, threads)
    timing = time_calls(lambda: session.run(None, feed), repeats=5, warmup=1, min_seconds=MIN_SECONDS,
                        max_seconds=MAX_SECONDS)
    return {"flops_per_s": _rate(2.0 * rows * inner * cols, timing), "median_s": timing["median_s"]}


KERNELS = (  # (name, precision, how)
    ("torch.matmul fp32", "fp32", lambda r, k, n, t: _torch_rate(r, k, n, "fp32")),
    ("numpy.matmul fp32", "fp32", lambda r, k, n, t: _numpy_rate(r, k, n)),
    ("onnxruntime MatMul fp32", "fp32", lambda r, k, n, t: _ort_rate("MatMul", r, k, n, t)),
    ("torch.matmul bf16", "bf16", lambda r, k, n, t: _torch_rate(r, k, n, "bf16")),
    ("onnxruntime MatMulInteger u8s8", "int8", lambda r, k, n, t: _ort_rate("MatMulInteger", r, k, n, t)),
    ("onnxruntime DynamicQuantizeMatMul s8", "int8", lambda r, k, n, t: _ort_rate("DynamicQuantizeMatMul", r, k, n, t)),
)


def probe_bf16() -> dict:
    """torch bf16 vs fp32 matmul at PROBE_SHAPE: {"native": bool, "ratio": bf16 rate / fp32 rate, ...}."""
    fp32, bf16 = _torch_rate(*PROBE_SHAPE, "fp32"), _torch_rate(*PROBE_SHAPE, "bf16")
    ratio = bf16["flops_per_s"] / fp32["flops_per_s"]
    flags = _bf16_flags()
    native = bool(flags) if flags is not None else ratio >= NATIVE_BF16_RATIO
    return {"shape": list(PROBE_SHAPE), "fp32_flops_per_s": fp32["flops_per_s"], "bf16_flops_per_s": bf16["flops_per_s"],
            "ratio": ratio, "cpu_bf16_flags": flags, "native": native}


def _bf16_flags() -> list[str] | None:
    """bf16 instruction flags of /proc/cpuinfo (empty: none), or None where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[1].split())
            return [f for f in NATIVE_BF16_FLAGS if f in have]
    return None


def choose_threads(candidates: tuple[int, ...]) -> dict:
    """The thread count (of `candidates`) under which torch and ONNX Runtime GEMMs at the recurrence
    shape of the flickr8k preset run fastest right now (geometric mean of the two rates). On a shared
    machine 2 threads can lose to 1 badly: OpenMP/ORT threads spin-wait for a core someone else holds."""
    from benchmarks.common import set_threads

    shape = (256, 256, 1024)
    rates = {}
    for threads in candidates:
        set_threads(threads)
        torch_rate = _torch_rate(*shape, "fp32")["flops_per_s"]
        ort_rate = _ort_rate("MatMul", *shape, threads)["flops_per_s"]
        rates[threads] = float(np.sqrt(torch_rate * ort_rate))
    best = max(rates, key=rates.get)
    return {"threads": best, "geomean_flops_per_s": rates, "shape": list(shape)}


PEAK_ROWS = 256  # rows of the recurrence GEMM in every peak measurement (fixed: the peak is measured the same way each run)


def _ort_concurrent_rate(rows: int, inner: int, cols: int, workers: int) -> dict:
    """`workers` one-thread ONNX Runtime MatMul sessions run at once (the engine's concurrent pair calls): aggregate FLOP/s."""
    from concurrent.futures import ThreadPoolExecutor

    sessions = [_ort_matmul_session("MatMul", rows, inner, cols, 1) for _ in range(workers)]
    calls = 8  # per worker and timed call: long enough that thread hand-off is noise

    def work(k: int) -> None:
        session, feed = sessions[k]
        for _ in range(calls):
            session.run(None, feed)

    with ThreadPoolExecutor(workers) as pool:
        timing = time_calls(lambda: list(pool.map(work, range(workers))), repeats=5, warmup=1, min_seconds=MIN_SECONDS,
                            max_seconds=MAX_SECONDS)
    return {"flops_per_s": _rate(2.0 * rows * inner * cols * calls * workers, timing), "median_s": timing["median_s"]}


def measure_peaks(hidden_sizes: tuple[int, ...] = (256, 1024), rows: int = PEAK_ROWS, threads: int = DEFAULT_THREADS,
                  square: bool = False, progress: bool = True) -> dict:
    """The machine's matmul peak per precision, measured the same way each time: every kernel at the recurrence
    shapes [rows, H, 4H] (and 1024^3 with `square`) with ONE thread, then ONNX Runtime MatMul fp32 with `threads`
    intra-op threads and as `threads` concurrent one-thread sessions (how the engine runs pair calls).
    {"shapes", "kernels": [{kernel, precision, threads, shape, flops_per_s, median_s}], "peak": {precision: FLOP/s
    on every thread}, "peak_1thread": {precision: FLOP/s on one thread}, "peak_kernel", "bf16_probe"}.
    Without native bf16 the bf16 kernel is measured at the probe shape only (emulated: seconds per GEMM)."""
    from tqdm import tqdm

    from benchmarks.common import set_threads

    shapes = [(rows, h, 4 * h) for h in hidden_sizes] + ([(SQUARE, SQUARE, SQUARE)] if square else [])
    set_threads(1)
    probe = probe_bf16()
    rows_out, peak, one, where = [], {}, {}, {}

    def keep(row: dict) -> None:
        rows_out.append(row)
        precision, rate = row["precision"], row["flops_per_s"]
        if rate > peak.get(precision, 0.0):
            peak[precision], where[precision] = rate, f"{row['kernel']} at {row['shape']}, {row['threads']} thread(s)"
        if row["threads"] == 1 and rate > one.get(precision, 0.0):
            one[precision] = rate

    if not probe["native"]:
        keep({"kernel": "torch.matmul bf16", "precision": "bf16", "threads": 1, "shape": probe["shape"],
              "flops_per_s": probe["bf16_flops_per_s"], "note": "emulated: no native bf16 matmul on this CPU"})
    multi = threads > 1
    bar = tqdm(total=len(shapes) * (len(KERNELS) + 2 * multi), desc="matmul peak", unit="kernel", disable=not progress)
    for shape in shapes:
        for name, precision, how in KERNELS:
            if precision == "bf16" and not probe["native"]:
                bar.update(1)
                continue
            own = os.cpu_count() if name.startswith("numpy") else 1  # numpy's BLAS runs its own threads (all cores)
            keep({"kernel": name, "precision": precision, "threads": own, "shape": list(shape), **how(*shape, 1)})
            bar.update(1)
        if multi:
            keep({"kernel": "onnxruntime MatMul fp32", "precision": "fp32", "threads": threads, "shape": list(shape),
                  **_ort_rate("MatMul", *shape, threads)})
            keep({"kernel": f"onnxruntime MatMul fp32, {threads} concurrent 1-thread sessions", "precision": "fp32",
                  "threads": threads, "shape": list(shape), **_ort_concurrent_rate(*shape, threads)})
            bar.update(2)
    bar.close()
    set_threads(threads)
    return {"threads": threads, "shapes": [list(s) for s in shapes], "kernels": rows_out, "peak": peak, "peak_1thread": one,
            "peak_kernel": where, "bf16_probe": probe}


def format_peaks(report: dict) -> str:
    lines = [f"matmul peak ({report['threads']} threads):"]
    for row in report["kernels"]:
        lines.append(f"  {row['kernel']:<58} x{row.get('threads', 1)} {str(row['shape']):<18} {row['flops_per_s'] / 1e9:8.1f} G(FL)OP/s")
    for precision, value in report["peak"].items():
        lines.append(f"  peak {precision}: {value / 1e9:.1f} G(FL)OP/s ({report['peak_kernel'][precision]}); "
                     f"one thread {report.get('peak_1thread', {}).get(precision, 0.0) / 1e9:.1f}")
    return "\n".join(lines)


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.peak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS)
    parser.add_argument("--rows", type=positive_int, default=PEAK_ROWS, help="rows of the recurrence GEMM (pairs per call)")
    parser.add_argument("--hidden", type=positive_int, nargs="+", default=[256, 1024], help="W2R hidden sizes H")
    parser.add_argument("--json", type=output_file, default=None, help="write the report here")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.rows < 1 or min(args.hidden) < 1:
        print("error: --threads, --rows and --hidden must be positive", file=sys.stderr)
        return 2
    report = measure_peaks(tuple(args.hidden), args.rows, args.threads, square=True)
    print(format_peaks(report))
    if args.json is not None:
        write_json_atomic(args.json, {"machine": machine_info(args.threads), "peak": report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
