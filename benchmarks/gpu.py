"""The GPU benchmark, one prepared script for a CUDA host: torch-CUDA fp32 / fp16 / bf16, eager and
CUDA graphs (TensorRT when importable), pairs/s at the flickr8k and paper presets, fraction of roofline,
and a 1K x 5K exhaustive pass at the shipped model's sizes.

    python -m benchmarks.gpu --json results/gpu.json [--budget-s 420]          # on the GPU host
    python -m benchmarks.gpu --device cpu --tiny --json /tmp/gpu-dry.json       # dry run anywhere (CI)

Model: the factored BSSAN (training.model) with random weights (speed does not depend on them).
The pair step is `StaticPairScorer`: one image x B captions of exactly L words, the W2R attention
over cached R W^T and G = R W_ih_u^T, the recurrence run a FIXED L steps (CUDA graphs need static
shapes and no host sync; training.model.lstm_recurrence reads max(lengths) on the host), then the
model's own MLP and O2W pair step. Before timing, its scores are checked against the model's
score_grid_cached on the same inputs (max |diff| in the JSON).

Measured, in this order, until --budget-s runs out (the JSON is rewritten after every point):
1. the GPU's GEMM peak per precision (fp32 without TF32, TF32, fp16, bf16) at a square shape and
   at the recurrence's shape, and the device memory bandwidth (a large copy);
2. for each dtype, lengths and batches: pairs/s eager and with a CUDA graph replay;
   GFLOP/s from benchmarks/flops.py and the fraction of roofline: achieved / min(peak of the dtype,
   arithmetic intensity x bandwidth), the intensity from the bytes a pair must move at least;
3. the paper-as-written model (reference_scores) eager fp32 at one point, as the GPU baseline;
4. TensorRT fp32/fp16 of the same step (ONNX export + TensorRT builder) when `tensorrt` imports.
Run on an NVIDIA H200 in session 5 (61 s): results/benchmarks/gpu/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from benchmarks.common import machine_info, write_json_atomic  # noqa: E402
from engine.features import progress_bar  # noqa: E402
from training.model import attend, attention_logits  # noqa: E402
from benchmarks.flops import factored_pair_flops, total_flops  # noqa: E402
from engine.cli import ArgumentParser, command, output_file, positive_float  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Each sweep: (preset, caption lengths, batches). flickr8k first: the sizes the shipped reference model has.
FULL = {"sweeps": (("flickr8k", (12, 30), (5000, 1000, 20000)), ("paper", (30, 12, 8, 20), (4096, 1024, 16384, 256))),
        "square": 8192, "copy_mb": 2048, "replays": 20, "exhaustive": ("flickr8k", 1000, 5000, 12)}
TINY = {"sweeps": (("demo", (8, 4), (4,)),), "square": 128, "copy_mb": 8, "replays": 3, "exhaustive": ("demo", 4, 8, 4)}
REPLAYS = 20  # timed calls per point (after 3 warm-up calls)
PARITY_MAX_BATCH = 1024  # points up to this batch check the static step against the model's score_grid_cached


class StaticPairScorer(nn.Module):
    """MS [B] of one image x B captions, every caption exactly `words` long (padding allowed: the
    output is read at each caption's last real word), with a fixed number of recurrence steps."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, regions_attn: Tensor, gates_regions: Tensor, words: Tensor, gates_words: Tensor, lengths: Tensor,
                objects_attn: Tensor, objects_mlp: Tensor, states: Tensor) -> Tensor:
        w2r, o2w = self.model.w2r, self.model.o2w
        b_txt, steps, _ = words.shape
        attn = attend(attention_logits(w2r, words @ regions_attn[0].t()), False, w2r.uniform_negatives)  # [B_txt, L, D]
        gates = (attn.reshape(b_txt * steps, -1) @ gates_regions[0]).reshape(b_txt, steps, -1) + gates_words  # [B_txt, L, 4H]
        weight_hh_t = w2r.lstm.weight_hh_l0.t()
        h = gates.new_zeros(b_txt, weight_hh_t.shape[0])
        c, out = torch.zeros_like(h), torch.zeros_like(h)
        last = (lengths - 1)[:, None]  # [B_txt, 1]
        for t in range(steps):  # static: `steps` is a shape, not a value read from the device
            i, f, g, o = (gates[:, t] + h @ weight_hh_t).chunk(4, dim=1)  # nn.LSTM's gate order
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            out = torch.where(last == t, h, out)
        y = w2r.mlp(out)
        index = torch.zeros(b_txt, dtype=torch.long, device=words.device)
        yp = o2w.score_pairs({"objects_attn": objects_attn, "objects_mlp": objects_mlp},
                             {"states": states, "lengths": lengths}, index, torch.arange(b_txt, device=words.device))
        return self.model.combine(y, yp)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call, device: torch.device, replays: int = REPLAYS) -> dict:
    """Median seconds per call of `call` (3 warm-up calls; CUDA events on a GPU)."""
    for _ in range(3):
        call()
    synchronize(device)
    times = []
    for _ in range(replays):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            call()
            times.append(time.perf_counter() - begin)
    return {"median_s": float(np.median(times)), "p90_s": float(np.percentile(times, 90))}


def gemm_peaks(device: torch.device, square: int, recurrence: tuple[int, int, int], dtypes: list[str]) -> dict:
    """FLOP/s of torch.matmul per precision at a square and at the recurrence shape; "tf32" on CUDA."""
    out = {}
    variants = [(name, DTYPES[name], False) for name in dtypes] + ([("tf32", torch.float32, True)] if device.type == "cuda" else [])
    for name, dtype, tf32 in variants:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        best = 0.0
        for m, k, n in ((square, square, square), recurrence):
            a = torch.randn(m, k, device=device).to(dtype)
            b = torch.randn(k, n, device=device).to(dtype)
            rate = 2.0 * m * k * n / timed(lambda: a @ b, device, replays=10)["median_s"]
            out[f"{name}@{m}x{k}x{n}"] = rate
            best = max(best, rate)
        out[name] = best
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2.0 * src.numel() * 4 / timed(lambda: dst.copy_(src), device, replays=10)["median_s"]


def min_bytes_per_pair(config, length: int, itemsize: int, batch: int) -> float:
    """What one pair must move at least: its caption's words and gates (read), the gate inputs a.G
    (write + read), h per step (read + write), and W_hh read once per step per call, shared by the batch."""
    four_h = 4 * config.w2r_hidden
    per_pair = length * (config.word_dim + four_h + 2 * four_h + 2 * config.w2r_hidden)
    weights = length * config.w2r_hidden * four_h / batch
    return float((per_pair + weights) * itemsize)


def make_inputs(model, length: int, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Caches of one random image and `batch` random captions of `length` words, from the model's encoders."""
    c = model.config
    gen = torch.Generator().manual_seed(seed)
    regions = torch.randn(1, c.region_count, c.region_dim, generator=gen)
    objects = torch.randn(1, c.object_count, c.object_dim, generator=gen)
    words = torch.randn(batch, length, c.word_dim, generator=gen)
    lengths = torch.full((batch,), length, dtype=torch.long)
    with torch.no_grad():
        image = model.encode_images(regions.to(device, dtype), objects.to(device, dtype), gates=True)
        text = model.encode_texts(words.to(device, dtype), lengths.to(device))
    return {"regions_attn": image["w2r"]["regions_attn"], "gates_regions": image["w2r"]["gates_regions"],
            "words": text["w2r"]["words"], "gates_words": text["w2r"]["gates_words"], "lengths": text["w2r"]["lengths"],
            "objects_attn": image["o2w"]["objects_attn"], "objects_mlp": image["o2w"]["objects_mlp"],
            "states": text["o2w"]["states"], "_image": image, "_text": text}


def cuda_graph(scorer: StaticPairScorer, feeds: dict) -> tuple[object, Tensor]:
    """Capture one call of `scorer` on static `feeds` (warm-up on a side stream first, as documented)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            scorer(**feeds)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = scorer(**feeds)
    return graph, out


def tensorrt_point(scorer: StaticPairScorer, feeds: dict, precision: str, device: torch.device, work: Path) -> dict:
    """TensorRT (10+ API: name-based I/O, execute_async_v3) on the ONNX export of the static step."""
    import tensorrt as trt

    path = work / f"static_pair_{precision}.onnx"
    names = list(feeds)
    with torch.no_grad():
        torch.onnx.export(scorer, tuple(feeds[n] for n in names), str(path), dynamo=False, opset_version=17,
                          input_names=names, output_names=["scores"])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(path.read_bytes()):
        raise RuntimeError(f"TensorRT cannot parse {path}: {parser.get_error(0)}")
    config = builder.create_builder_config()
    if precision == "fp16" and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT build failed for {path}")
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    out = torch.empty(feeds["words"].shape[0], dtype=torch.float32, device=device)
    for name in names:
        context.set_tensor_address(name, feeds[name].contiguous().data_ptr())
    context.set_tensor_address("scores", out.data_ptr())
    stream = torch.cuda.current_stream().cuda_stream
    timing = timed(lambda: context.execute_async_v3(stream), device)
    return {"tensorrt": trt.__version__, **timing}


def sweep_point(model, scorer: StaticPairScorer, config, length: int, batch: int, device: torch.device, dtype_name: str,
                replays: int, cuda_graphs: bool, peak: dict, bandwidth_bytes_per_s: float) -> dict:
    """One (dtype, L, B) point: parity against the model's score_grid_cached, eager and CUDA-graph pairs/s, roofline."""
    feeds = make_inputs(model, length, batch, device, DTYPES[dtype_name])
    image, text = feeds.pop("_image"), feeds.pop("_text")
    with torch.no_grad():
        diff = None
        if batch <= PARITY_MAX_BATCH:  # the model's score_grid needs ~5x the memory of the static step
            want = model.combine(*model.score_grid_cached(image, text))[0].float()
            diff = float((scorer(**feeds).float() - want).abs().max())
        eager = timed(lambda: scorer(**feeds), device, replays)
    point = {"dtype": dtype_name, "length": length, "batch": batch, "max_abs_diff_vs_model": diff,
             "eager_pairs_per_s": batch / eager["median_s"], "eager_median_s": eager["median_s"]}
    best = eager["median_s"]
    if cuda_graphs:
        graph, _ = cuda_graph(scorer, feeds)
        replay = timed(graph.replay, device, replays)
        point.update(graph_pairs_per_s=batch / replay["median_s"], graph_median_s=replay["median_s"], graph_p90_s=replay["p90_s"])
        best = min(best, replay["median_s"])
    flops = total_flops(factored_pair_flops(config, length, "gates"))
    achieved = flops * batch / best
    intensity = flops / min_bytes_per_pair(config, length, DTYPES[dtype_name].itemsize, batch)
    roof = min(peak[dtype_name], intensity * bandwidth_bytes_per_s)
    point.update(flops_per_pair=flops, gflops_per_s=achieved / 1e9, intensity_flop_per_byte=intensity,
                 roofline_flops_per_s=roof, fraction_of_roofline=achieved / roof, fraction_of_peak=achieved / peak[dtype_name])
    return point


def exhaustive_point(preset_name: str, images: int, captions: int, length: int, device: torch.device, dtype_name: str,
                     cuda_graphs: bool) -> dict:
    """Every pair of `images` x `captions` (Flickr8K test's 1K x 5K at full size): the captions encoded once, then one
    call per image of the static pair step over all captions (its image caches copied into the step's input buffers,
    then a CUDA-graph replay), the scores copied into the [images, captions] matrix. Measured from the first image
    copy to the last score on the device; the encoders are excluded (timed apart: `encode_s`)."""
    from training.config import preset
    from training.model import BSSAN

    config = preset(preset_name)
    torch.manual_seed(0)
    dtype = DTYPES[dtype_name]
    model = BSSAN(config).eval().to(device, dtype)
    scorer = StaticPairScorer(model).eval()
    gen = torch.Generator().manual_seed(1)
    regions = torch.randn(images, config.region_count, config.region_dim, generator=gen).to(device, dtype)
    objects = torch.randn(images, config.object_count, config.object_dim, generator=gen).to(device, dtype)
    feeds = make_inputs(model, length, captions, device, dtype)
    feeds.pop("_image")
    text = feeds.pop("_text")
    synchronize(device)
    begin = time.perf_counter()
    with torch.no_grad():
        cache = model.encode_images(regions, objects, gates=True)
    synchronize(device)
    encode_s = time.perf_counter() - begin
    per_image = {"regions_attn": cache["w2r"]["regions_attn"], "gates_regions": cache["w2r"]["gates_regions"],
                 "objects_attn": cache["o2w"]["objects_attn"], "objects_mlp": cache["o2w"]["objects_mlp"]}
    scores = torch.empty(images, captions, dtype=torch.float32, device=device)
    with torch.no_grad():
        if cuda_graphs:
            graph, out = cuda_graph(scorer, feeds)
            step = graph.replay
        else:
            out = None
            step = None
        synchronize(device)
        begin = time.perf_counter()
        for i in range(images):
            for name, stack in per_image.items():
                feeds[name].copy_(stack[i:i + 1])
            if step is not None:
                step()
                scores[i].copy_(out)
            else:
                scores[i].copy_(scorer(**feeds))
        synchronize(device)
        seconds = time.perf_counter() - begin
        first = model.combine(*model.score_grid_cached({b: {k: v[:1] for k, v in c.items()} for b, c in cache.items()},
                                                       text))[0] if captions <= PARITY_MAX_BATCH * 5 else None
    return {"preset": preset_name, "dtype": dtype_name, "images": images, "captions": captions, "length": length,
            "seconds": seconds, "pairs_per_s": images * captions / seconds, "encode_images_s": encode_s,
            "cuda_graph": cuda_graphs, "max_abs_diff_first_row_vs_model": None if first is None else float((scores[0] - first.float()).abs().max()),
            "note": "scoring only, random weights and features, every caption padded to `length` words"}


def run(args: argparse.Namespace) -> dict:
    from training.config import preset
    from training.model import BSSAN, reference_scores

    started = time.monotonic()
    plan = TINY if args.tiny else FULL
    device = torch.device(args.device)
    report = {"machine": machine_info(torch.get_num_threads()), "device": str(device),
              "presets": [sweep[0] for sweep in plan["sweeps"]], "weights": "random (seed 0)", "status": "running",
              "points": [], "budget_s": args.budget_s, "note": "dry run on CPU" if device.type == "cpu" else "GPU run"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        report["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}", "memory_gb": props.total_memory / 2**30,
                         "torch": torch.__version__, "cuda": torch.version.cuda}
    dtypes = [d for d in args.dtypes if device.type == "cuda" or d != "fp16"]  # CPU: no fp16 GEMMs worth timing
    out_of_time = lambda: time.monotonic() - started > args.budget_s  # noqa: E731
    widest = max((preset(sweep[0]) for sweep in plan["sweeps"]), key=lambda c: c.w2r_hidden)
    report["peak"] = gemm_peaks(device, plan["square"], (max(max(s[2]) for s in plan["sweeps"]), widest.w2r_hidden,
                                                         4 * widest.w2r_hidden), dtypes)
    report["bandwidth_bytes_per_s"] = bandwidth(device, plan["copy_mb"])
    write_json_atomic(args.json, report)
    planned = sum(len(dtypes) * len(lengths) * len(batches) for _, lengths, batches in plan["sweeps"])
    bar = progress_bar(total=planned, desc="gpu points", unit="point")
    for preset_name, lengths, batches in plan["sweeps"]:
        config = preset(preset_name)
        for dtype_name in dtypes:
            torch.manual_seed(0)
            model = BSSAN(config).eval().to(device, DTYPES[dtype_name])
            scorer = StaticPairScorer(model).eval()
            for length in lengths:
                for batch in batches:
                    bar.update(1)
                    if out_of_time():
                        report.setdefault("stopped", f"budget of {args.budget_s} s reached before {preset_name} "
                                                     f"{dtype_name} L={length} B={batch}")
                        continue
                    point = sweep_point(model, scorer, config, length, batch, device, dtype_name, plan["replays"],
                                        cuda_graphs=device.type == "cuda" and not args.no_cuda_graphs, peak=report["peak"],
                                        bandwidth_bytes_per_s=report["bandwidth_bytes_per_s"])
                    report["points"].append({"preset": preset_name, **point})
                    write_json_atomic(args.json, report)
            del model, scorer
        if preset_name == plan["exhaustive"][0] and not out_of_time():
            report["exhaustive"] = [exhaustive_point(*plan["exhaustive"], device, dtype_name,
                                                     cuda_graphs=device.type == "cuda" and not args.no_cuda_graphs)
                                    for dtype_name in dtypes]
            write_json_atomic(args.json, report)
    bar.close()
    config = preset(plan["sweeps"][-1][0])  # the paper-as-written baseline at the last sweep's sizes (the paper's)
    if not out_of_time():
        torch.manual_seed(0)
        model = BSSAN(config).eval().to(device)
        length, batch = config.max_words, min(plan["sweeps"][-1][2])
        gen = torch.Generator().manual_seed(0)
        regions = torch.randn(1, config.region_count, config.region_dim, generator=gen).to(device).expand(batch, -1, -1)
        objects = torch.randn(1, config.object_count, config.object_dim, generator=gen).to(device).expand(batch, -1, -1)
        words = torch.randn(batch, length, config.word_dim, generator=gen).to(device)
        lengths = torch.full((batch,), length, dtype=torch.long, device=device)
        with torch.no_grad():
            base = timed(lambda: reference_scores(model, regions, objects, words, lengths), device, replays=5)
        report["paper_as_written"] = {"preset": plan["sweeps"][-1][0], "dtype": "fp32", "length": length, "batch": batch, "pairs_per_s": batch / base["median_s"]}
    report["tensorrt"] = _tensorrt_section(args, config, device, out_of_time)
    report["status"] = "done" if "stopped" not in report else "stopped by budget"
    report["seconds"] = time.monotonic() - started
    write_json_atomic(args.json, report)
    return report


def _tensorrt_section(args, config, device, out_of_time) -> dict:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return {"skipped": "tensorrt is not importable on this host"}
    if device.type != "cuda" or out_of_time():
        return {"skipped": "needs --device cuda and budget left"}
    import tempfile

    from training.model import BSSAN

    results = {}
    torch.manual_seed(0)
    model = BSSAN(config).eval().to(device)
    feeds = make_inputs(model, config.max_words, 4096 if not args.tiny else 16, device, torch.float32)
    feeds.pop("_image"), feeds.pop("_text")
    with tempfile.TemporaryDirectory() as work:
        for precision in ("fp32", "fp16"):
            try:
                point = tensorrt_point(StaticPairScorer(model).eval(), feeds, precision, device, Path(work))
                point["pairs_per_s"] = feeds["words"].shape[0] / point["median_s"]
                results[precision] = point
            except Exception as exc:  # record and go on: a GPU-time budget is not spent twice
                results[precision] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    return results


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=output_file, required=True, help="report, rewritten after every point")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="demo preset, tiny sweep: the CPU dry run")
    parser.add_argument("--budget-s", type=positive_float, default=420.0, help="stop starting new points after this many seconds")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "fp16", "bf16"])
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--plot", type=output_file, help="PNG of pairs/s vs batch (default: the --json path with .png)")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        print("error: --budget-s must be positive", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: torch.cuda.is_available() is False; run on the GPU host or use --device cpu --tiny",
              file=sys.stderr)
        return 2
    report = run(args)
    for p in report["points"]:
        graph = f"{p['graph_pairs_per_s']:12.0f} (CUDA graph)" if "graph_pairs_per_s" in p else ""
        print(f"{p['dtype']:<5} L={p['length']:<3} B={p['batch']:<6} eager {p['eager_pairs_per_s']:12.0f} pairs/s {graph}  "
              f"{p['gflops_per_s']:9.1f} GFLOP/s  {100 * p['fraction_of_roofline']:5.1f}% of roofline  "
              f"|diff| {p['max_abs_diff_vs_model'] if p['max_abs_diff_vs_model'] is not None else 'not checked'}")
    for e in report.get("exhaustive", []):
        print(f"exhaustive {e['images']} x {e['captions']} ({e['preset']}, {e['dtype']}, L={e['length']}): {e['seconds']:.3f} s, "
              f"{e['pairs_per_s']:.0f} pairs/s; image encoder {e['encode_images_s']:.3f} s")
    from benchmarks.plots import plot_gpu

    plot = plot_gpu(report, args.plot or Path(args.json).with_suffix(".png"))
    print(f"{args.json}: {report['status']} in {report['seconds']:.0f} s; plot {plot}; TensorRT: {report['tensorrt']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
