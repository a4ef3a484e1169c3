"""Where a pair call's time goes: ONNX Runtime's per-node profile of an artifact's pair and grid graphs.

    python -m benchmarks.profile --artifact build/artifacts/reference --captions 256 --length 11 \
        --json results/benchmarks/issue14/profile.json

One image row x `captions` captions of `length` words (lengths length-2..length, sorted: a bucket),
the call the engine makes for a grid block, on ONE intra-op thread (what each of the engine's
concurrent calls uses), through every pair-stage graph the artifact has at fp32: w2r_pair and
o2w_pair called with pairs (0, r) (the pre-issue-14 path: gathers and the If of the one-image case),
w2r_grid and o2w_grid (no pair index). ONNX Runtime's profiler times every node; a Loop's time
includes its body's nodes, which are listed too (per call: summed over the steps). Inputs are
random (timing does not depend on the values). The process CPU time per call is measured apart
from the profiled calls (the profiler's wall clock includes time the shared cores gave to others).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_info, write_json_atomic
from engine.cli import ArgumentParser, command, output_file, positive_int

GRAPH_NAMES = ("w2r_pair", "w2r_grid", "o2w_pair", "o2w_grid")


def feeds_for(name: str, dims: dict, captions: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of one image row x `captions` captions (lengths length-2..length, sorted) for graph `name`."""
    from engine.graphs import GRAPHS

    rng = np.random.default_rng(seed)
    spec = GRAPHS[name]
    feeds = {}
    for tensor in spec.inputs:
        if tensor.name == "pairs":
            feeds["pairs"] = np.stack([np.zeros(captions, np.int64), np.arange(captions, dtype=np.int64)], axis=1)
        elif tensor.name == "lengths":
            feeds["lengths"] = np.sort(rng.integers(max(1, length - 2), length + 1, captions)).astype(np.int64)
        else:
            shape = [1 if d == "images" else captions if d == "captions" else length if d == "words" else
                     d if isinstance(d, int) else dims[d] for d in tensor.dims]
            feeds[tensor.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def profile_graph(path: Path, feeds: dict, calls: int, work: Path) -> dict:
    """{"wall_ms_per_call", "cpu_ms_per_call", "by_op": {op: {ms_per_call, nodes_per_call}}, "nodes": [...]} on 1 thread."""
    import onnxruntime as ort

    from engine.backends.onnxruntime import open_session

    plain = open_session(path, threads=1)
    for _ in range(3):
        plain.run(None, feeds)
    start = time.process_time()
    for _ in range(calls):
        plain.run(None, feeds)
    cpu = (time.process_time() - start) / calls
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(work / path.stem)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(calls):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    by_node: dict[str, list] = collections.defaultdict(lambda: [0.0, 0, ""])
    total = 0.0
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            entry = by_node[event["name"][: -len("_kernel_time")]]
            entry[0] += event["dur"]
            entry[1] += 1
            entry[2] = event["args"].get("op_name", "")
        elif event.get("cat") == "Session" and event["name"] == "model_run":
            total += event["dur"]
    by_op: dict[str, dict] = {}
    for node, (us, count, op) in by_node.items():
        row = by_op.setdefault(op, {"ms_per_call": 0.0, "nodes_per_call": 0})
        row["ms_per_call"] += us / calls / 1e3
        row["nodes_per_call"] += count // calls
    nodes = sorted(({"node": node, "op": op, "ms_per_call": us / calls / 1e3, "runs_per_call": count // calls}
                    for node, (us, count, op) in by_node.items()), key=lambda r: -r["ms_per_call"])
    return {"wall_ms_per_call": total / calls / 1e3, "cpu_ms_per_call": cpu * 1e3,
            "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1]["ms_per_call"])), "nodes": nodes[:25]}


def profile_artifact(artifact_dir: Path, captions: int, length: int, calls: int) -> dict:
    from engine.artifact import load_artifact

    artifact = load_artifact(artifact_dir)
    out = {"artifact": str(artifact_dir), "captions": captions, "length": length, "calls": calls, "threads": 1, "graphs": {}}
    with tempfile.TemporaryDirectory(prefix="bssan-profile-") as work:
        for name in GRAPH_NAMES:
            if artifact.has_graph(name, "fp32"):
                feeds = feeds_for(name, artifact.dims, captions, length)
                out["graphs"][name] = profile_graph(artifact.graph_path(name, "fp32"), feeds, calls, Path(work))
    return out


def print_profile(report: dict) -> None:
    print(f"{report['artifact']}: 1 image x {report['captions']} captions of <= {report['length']} words, 1 thread, "
          f"{report['calls']} calls each")
    for name, graph in report["graphs"].items():
        print(f"\n{name}: {graph['wall_ms_per_call']:.2f} ms per call (profiler wall), {graph['cpu_ms_per_call']:.2f} ms CPU "
              f"-> {report['captions'] / graph['cpu_ms_per_call'] * 1e3:.0f} pairs per CPU-second")
        for op, row in list(graph["by_op"].items())[:12]:
            print(f"  {op:<22} {row['ms_per_call']:8.3f} ms  {row['nodes_per_call']:4d} node runs per call")


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, default=Path("build/artifacts/reference"))
    parser.add_argument("--captions", type=positive_int, default=256, help="captions per call (one image row)")
    parser.add_argument("--length", type=positive_int, default=11, help="longest caption of the bucket (words)")
    parser.add_argument("--calls", type=positive_int, default=20)
    parser.add_argument("--json", type=output_file, default=None)
    args = parser.parse_args(argv)
    if not (args.artifact / "manifest.json").is_file():
        print(f"error: {args.artifact}: no manifest.json; expected an artifact directory (python -m export ...)", file=sys.stderr)
        return 2
    report = {"machine": machine_info(1), **profile_artifact(args.artifact, args.captions, args.length, args.calls),
              "load_average_at_end": list(os.getloadavg())}
    print_profile(report)
    if args.json is not None:
        write_json_atomic(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
