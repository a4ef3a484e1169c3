"""The pair scorers the benchmarks compare, on one image x many captions, behind one small interface.

    from benchmarks.scorers import random_model, random_inputs, export_graphs, make_scorers
    model = random_model("paper")                              # random weights, eval mode, seed 0
    inputs = random_inputs(model.config, captions=256, lengths=np.full(256, 30))
    graphs = export_graphs(model, work_dir, precisions=("fp32", "int8-recurrence"))
    for scorer in make_scorers(model, graphs, names):          # "paper-eager", "factored-eager", "ort-fp32", ...
        scorer.prepare(inputs)                                 # caches: once per image / caption (timed apart)
        scores = scorer.score(rows)                            # MS [len(rows)] of (image 0, caption r) for r in rows

Scorers (every one computes MS = Y + lambda Y' of the same model on the same inputs):
- paper-eager: training.model.reference_scores, the paper as written, un-factored, every caption
  padded to max_words (30), nn.LSTM over [u_k; t_k]; the image is repeated per pair (a view).
- factored-eager: the model's factored path in torch (encode_images with G = R W_ih_u^T cached,
  encode_texts, score_grid_cached); the caption rows are sliced to their longest caption.
- torch-bf16: factored-eager under torch.autocast("cpu", bfloat16).
- ort-<precision>: the exported ONNX graphs (export/graphs.py, export/onnx_export.py) on ONNX
  Runtime CPU: image and text graphs once, then the grid graphs w2r_grid + o2w_grid (one image row, nothing
  gathered; fp32 only), else w2r_pair + o2w_pair with pairs [(0, r)]. ort-fp32-pair: the fp32 pair graphs
  even where grid graphs exist (the engine's path before issue 14).
- kernel: the engine's third path: ort-fp32's image and text graphs, then each one-image block's W2R score
  from the fused C kernel (engine.kernels.W2RKernel, built for this machine when the scorer is made, weights read
  from the exported w2r_grid graph) and O2W from the o2w_grid graph. Where the kernel cannot run (no C compiler,
  a failed build, a model it does not serve: engine.kernels.KernelError) making it raises ScorerUnavailable with
  the reason, and the benchmarks list it as skipped.
- engine: engine.runtime.Scorer on an artifact of the same model (export.pipeline, fp32), as a user gets
  it: its own scoring path choice, threads=None (every CPU: concurrent one-thread calls), caption blocks
  built by the caches. `score_pass` scores several image rows x every caption (score_grid).
  Precisions: fp32; fp16 (fp16 graphs, recurrence kept fp32: ORT CPU inserts casts, no fp16
  arithmetic); int8-recurrence / int8-projection (quantize_dynamic QInt8 of h W_hh^T, and also of
  u W_ih_u^T where the graph has it; export/precision.py).

Only the pair step is timed by the benchmarks; `prepare` reports its own seconds per image and
per caption, so the caller can amortise them over a gallery (the 1K x 5K protocol).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.graphs import GRAPHS

ORT_PRECISIONS = ("fp32", "fp16", "int8-recurrence", "int8-projection")
SCORER_NAMES = ("paper-eager", "factored-eager", "torch-bf16", *(f"ort-{p}" for p in ORT_PRECISIONS), "ort-fp32-pair", "kernel",
                "engine")


class ScorerUnavailable(Exception):
    """A scorer that cannot run on this machine or for this model; the message says why (the benchmarks skip it)."""


@dataclass
class Inputs:
    regions: np.ndarray  # [1, D, M] float32
    objects: np.ndarray  # [1, P, Q]
    words: np.ndarray  # [B_txt, L, E], zero past each length
    lengths: np.ndarray  # [B_txt] int64


def random_model(preset_name: str, seed: int = 0):
    import torch

    from training.config import preset
    from training.model import BSSAN

    torch.manual_seed(seed)
    return BSSAN(preset(preset_name)).eval()


def random_inputs(config, lengths: np.ndarray, seed: int = 0) -> Inputs:
    """One random image and len(lengths) random captions of those lengths (N(0, 1) features)."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    words = rng.standard_normal((len(lengths), int(lengths.max()), config.word_dim)).astype(np.float32)
    words[np.arange(words.shape[1])[None, :] >= lengths[:, None]] = 0.0  # [B_txt, L]: zero past the length
    return Inputs(regions=rng.standard_normal((1, config.region_count, config.region_dim)).astype(np.float32),
                  objects=rng.standard_normal((1, config.object_count, config.object_dim)).astype(np.float32),
                  words=words, lengths=lengths)


def export_graphs(model, work: Path, precisions: tuple[str, ...] = ("fp32",)) -> dict[str, dict[str, Path]]:
    """{precision: {graph: path}} of the model's graphs; int8 precisions hold only the pair graphs they change."""
    import torch

    from export.graphs import build_graph_modules, graph_dims
    from export.onnx_export import export_graph
    from export.precision import quantize_pair_graph

    dims = graph_dims(model)
    out: dict[str, dict[str, Path]] = {}
    for precision in ("fp32", *[p for p in precisions if p != "fp32"]):
        if precision in ("fp32", "fp16"):
            dtype = torch.float16 if precision == "fp16" else torch.float32
            modules = build_graph_modules(model, dtype, recurrence_fp32=True)
            out[precision] = {name: export_graph(module, name, dims, work / f"{name}.{precision}.onnx", precision)
                              for name, module in modules.items()}
        elif precision.startswith("int8-"):
            scope = precision.split("-", 1)[1]
            out[precision] = {}
            for name in ("w2r_pair", "o2w_pair"):
                if name in out["fp32"] and quantize_pair_graph(out["fp32"][name], work / f"{name}.{precision}.onnx", scope):
                    out[precision][name] = work / f"{name}.{precision}.onnx"
        else:
            raise ValueError(f"precision {precision!r}: expected one of {ORT_PRECISIONS}")
    return out


class Scorer:
    name = ""
    precision_of: dict[str, str] = {}  # stage -> precision of its GEMMs (benchmarks.flops.ideal_seconds)
    route = "reference"  # "reference" (un-factored), "gates" or "regions": which FLOP formula applies

    def prepare(self, inputs: Inputs) -> dict:
        """Encode the image and every caption; {"image_s": s per image, "caption_s": s per caption}."""
        self.inputs = inputs
        return {"image_s": 0.0, "caption_s": 0.0}

    def score(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def score_pass(self, blocks: list[np.ndarray], images: int, out: np.ndarray) -> None:
        """`images` image rows (copies of the one image) x every caption, block by block: out [images, captions]."""
        for i in range(images):
            for rows in blocks:
                out[i, rows] = self.score(rows)


class PaperEager(Scorer):
    name = "paper-eager"

    def __init__(self, model):
        self.model = model

    def score(self, rows: np.ndarray) -> np.ndarray:
        import torch

        from training.model import reference_scores

        n = len(rows)
        t = torch.from_numpy
        with torch.no_grad():
            regions = t(self.inputs.regions).expand(n, -1, -1)  # [N, D, M]: one image, repeated per pair (a view)
            objects = t(self.inputs.objects).expand(n, -1, -1)  # [N, P, Q]
            y, yp = reference_scores(self.model, regions, objects, t(self.inputs.words[rows]), t(self.inputs.lengths[rows]))
            return self.model.combine(y, yp).numpy()


class FactoredEager(Scorer):
    name = "factored-eager"
    route = "gates"

    def __init__(self, model, bf16: bool = False):
        self.model, self.bf16 = model, bf16
        if bf16:
            self.name = "torch-bf16"
            self.precision_of = {"w2r.attention_logits": "bf16", "w2r.attend": "bf16", "w2r.recurrence": "bf16",
                                 "w2r.mlp": "bf16", "o2w.attention_logits": "bf16", "o2w.attend": "bf16", "o2w.mlp": "bf16"}

    def _autocast(self):
        import contextlib

        import torch

        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def prepare(self, inputs: Inputs) -> dict:
        import torch

        self.inputs = inputs
        with torch.no_grad(), self._autocast():
            start = time.perf_counter()
            self.image_cache = self.model.encode_images(inputs.regions, inputs.objects, gates=True)
            image_s = time.perf_counter() - start
            start = time.perf_counter()
            self.text_cache = self.model.encode_texts(inputs.words, inputs.lengths)
            caption_s = (time.perf_counter() - start) / len(inputs.lengths)
        return {"image_s": image_s, "caption_s": caption_s}

    def score(self, rows: np.ndarray) -> np.ndarray:
        import torch

        index = torch.as_tensor(rows)
        words = int(self.inputs.lengths[rows].max())
        sub = {branch: {k: (v[index][:, :words] if v.dim() == 3 else v[index]) for k, v in cache.items()}
               for branch, cache in self.text_cache.items()}  # caption rows, sliced to their longest caption
        with torch.no_grad(), self._autocast():
            return self.model.combine(*self.model.score_grid_cached(self.image_cache, sub))[0].float().numpy()


class OrtScorer(Scorer):
    def __init__(self, model, graphs: dict[str, dict[str, Path]], precision: str, threads: int, grid: bool = True):
        from export.validate import open_session

        self.name = f"ort-{precision}" + ("" if grid or precision != "fp32" else "-pair")
        self.precision = precision
        self.weights = model.config.branch_weights
        self.route = "gates" if model.w2r is not None and model.w2r.pair_gathers_gates else "regions"
        float_graphs = graphs["fp16" if precision == "fp16" else "fp32"]
        chosen = {**float_graphs, **graphs.get(precision, {})}
        self.dtype = np.float16 if precision == "fp16" else np.float32
        if not grid or precision != "fp32":  # grid graphs are fp32 only (engine.graphs.GRID_PRECISIONS)
            chosen = {name: path for name, path in chosen.items() if GRAPHS[name].stage != "grid"}
        self.sessions = {name: open_session(path, threads) for name, path in chosen.items()}
        self.grid = all(f"{b}_grid" in self.sessions for b in ("w2r", "o2w") if f"{b}_pair" in self.sessions)
        if precision.startswith("int8-") and "w2r_pair" in graphs.get(precision, {}):
            self.precision_of = {"w2r.recurrence": "int8"}
            if precision == "int8-projection" and self.route == "regions":
                self.precision_of["w2r.input_projection"] = "int8"

    def prepare(self, inputs: Inputs) -> dict:
        self.inputs = inputs
        self.cache: dict[str, np.ndarray] = {}
        image_s = caption_s = 0.0
        for branch, image_feed in (("w2r", {"regions": inputs.regions}), ("o2w", {"objects": inputs.objects})):
            if f"{branch}_pair" not in self.sessions:
                continue
            start = time.perf_counter()
            outputs = self.sessions[f"{branch}_image"].run(None, {k: v.astype(self.dtype) for k, v in image_feed.items()})
            image_s += time.perf_counter() - start
            self.cache.update(zip(GRAPHS[f"{branch}_image"].output_names, outputs))
            spec = GRAPHS[f"{branch}_text"]
            feeds = {k: v for k, v in {"words": inputs.words.astype(self.dtype), "lengths": inputs.lengths}.items()
                     if k in spec.input_names}
            start = time.perf_counter()
            self.cache.update(zip(spec.output_names, self.sessions[f"{branch}_text"].run(None, feeds)))
            caption_s += (time.perf_counter() - start) / len(inputs.lengths)
        self.cache["words"] = inputs.words.astype(self.dtype)
        self.cache["lengths"] = inputs.lengths
        return {"image_s": image_s, "caption_s": caption_s}

    def score(self, rows: np.ndarray) -> np.ndarray:
        words = int(self.inputs.lengths[rows].max())
        available = {name: (value[rows][:, :words] if name in ("words", "gates_words", "states") else
                            value[rows] if name == "lengths" else value) for name, value in self.cache.items()}
        available["pairs"] = np.stack([np.zeros(len(rows), np.int64), np.arange(len(rows), dtype=np.int64)], axis=1)  # [N, 2]
        total = np.zeros(len(rows), np.float32)
        for branch, weight in zip(("w2r", "o2w"), self.weights):
            name = f"{branch}_grid" if self.grid else f"{branch}_pair"
            if name in self.sessions and weight:
                feeds = {n: available[n] for n in GRAPHS[name].input_names}
                total += weight * self.run_graph(name, feeds)
        return total

    def run_graph(self, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The scores [N] of one branch's graph on `feeds`."""
        return self.sessions[name].run(None, feeds)[0]


class KernelScorer(OrtScorer):
    """The engine's kernel path on one thread: ort-fp32's image/text graphs and o2w_grid, W2R through the fused
    kernel (engine.kernels), the branches weighted as ort-fp32 weights them."""

    def __init__(self, model, graphs: dict[str, dict[str, Path]], threads: int):
        from engine.kernels import KernelError, O2WKernel, W2RKernel, build, load_library
        from export.pipeline import attention_record

        if model.w2r is None:
            raise ScorerUnavailable("the model has no w2r branch: nothing for the W2R kernel to score")
        if "w2r_grid" not in graphs.get("fp32", {}):
            raise ScorerUnavailable("no fp32 w2r_grid graph was exported (the kernel reads its weights from it)")
        try:
            library = load_library(build())  # compiled once per machine and source (engine.kernels.kernels_dir())
            biases, form = attention_record(model)  # as the exporter records them in a manifest
            self.kernel = W2RKernel.from_graph(graphs["fp32"]["w2r_grid"], biases["w2r"], form == "tanh", library=library)
        except (KernelError, OSError) as exc:  # no C compiler, a failed build, a cache it cannot write
            raise ScorerUnavailable(str(exc)) from None
        self.o2w_kernel = None  # as the engine: O2W through its kernel when the graph names its weights, else o2w_grid
        if model.o2w is not None and "o2w_grid" in graphs.get("fp32", {}):
            try:
                self.o2w_kernel = O2WKernel.from_graph(graphs["fp32"]["o2w_grid"], biases["o2w"], form == "tanh", library=library)
            except KernelError:
                pass
        super().__init__(model, graphs, "fp32", threads, grid=True)
        self.name = "kernel"
        if not self.grid:
            raise ScorerUnavailable("the o2w_grid graph is missing: the kernel path scores O2W with it")

    def score(self, rows: np.ndarray) -> np.ndarray:
        """As the engine's kernel path calls it: W2R (and O2W, with its kernel) reads the caption rows in place (the
        padded cache viewed as word rows, caption r's words at r * L: engine.kernels' word_offsets); o2w_grid, where
        the graph predates the O2W kernel, gets a copied block."""
        total = np.zeros(len(rows), np.float32)
        cache, lengths = self.cache, self.inputs.lengths[rows]
        for branch, weight in zip(("w2r", "o2w"), self.weights):
            if not weight or f"{branch}_grid" not in self.sessions:
                continue
            if branch == "w2r":
                width = cache["words"].shape[1]
                feeds = {"regions_attn": cache["regions_attn"], "regions_values": cache["regions_values"],
                         "words": cache["words"].reshape(-1, cache["words"].shape[2]),
                         "gates_words": cache["gates_words"].reshape(-1, cache["gates_words"].shape[2]),
                         "lengths": lengths, "word_offsets": np.asarray(rows, np.int64) * width}
                total += weight * self.kernel(feeds)
            elif self.o2w_kernel is not None:  # the states read in place, like W2R's words
                width = cache["states"].shape[1]
                feeds = {"objects_attn": cache["objects_attn"], "objects_mlp": cache["objects_mlp"],
                         "states": cache["states"].reshape(-1, cache["states"].shape[2]), "lengths": lengths,
                         "word_offsets": np.asarray(rows, np.int64) * width}
                total += weight * self.o2w_kernel(feeds)
            else:
                words = int(lengths.max())
                feeds = {"objects_attn": cache["objects_attn"], "objects_mlp": cache["objects_mlp"],
                         "states": cache["states"][rows][:, :words], "lengths": lengths}
                total += weight * self.run_graph("o2w_grid", feeds)
        return total


class EngineScorer(Scorer):
    """engine.runtime.Scorer as a user loads it (threads=None, path auto) on an fp32 artifact of the model."""

    name = "engine"

    def __init__(self, model, work: Path, threads: int | None = None):
        from engine.runtime import Scorer as EngineRuntime
        from export.pipeline import ExportOptions, export_artifact
        from training.checkpoint import save_checkpoint
        from training.config import TrainConfig

        self.route = "gates" if model.w2r is not None and model.w2r.pair_gathers_gates else "regions"
        artifact = work / "engine-artifact"
        if not (artifact / "manifest.json").is_file():
            save_checkpoint(work / "engine-checkpoint", model, TrainConfig(), metrics={"weights": "random"})
            export_artifact(ExportOptions(model_dir=work / "engine-checkpoint", out=artifact, precisions=("fp32",),
                                          tensorrt="off", assets_dir=None, progress=False))
        # The engine's fastest validated path: the fused kernel where it is built here (python -m benchmarks.run's
        # end-to-end check records it for real artifacts when it measures faster; this random one has no record),
        # else what a user gets (auto).
        from engine.errors import InputError
        from engine.kernels import build

        try:
            build()
            self.engine = EngineRuntime.load(artifact, backend="onnxruntime-cpu", threads=threads, path="kernel")
        except InputError:  # no compiler, a failed build (KernelError), a model the kernel path cannot take
            self.engine = EngineRuntime.load(artifact, backend="onnxruntime-cpu", threads=threads)
        self.reason = self.engine.runner.reason

    def prepare(self, inputs: Inputs) -> dict:
        self.inputs = inputs
        start = time.perf_counter()
        self.image_cache = self.engine.encode_image_features(inputs.regions, inputs.objects)
        image_s = time.perf_counter() - start
        start = time.perf_counter()
        self.caption_cache = self.engine.encode_word_features(inputs.words, inputs.lengths)
        return {"image_s": image_s, "caption_s": (time.perf_counter() - start) / len(inputs.lengths)}

    def score(self, rows: np.ndarray) -> np.ndarray:
        self.engine.pairs_per_call = max(len(rows), 1)
        return self.engine.score_grid(self.image_cache, self.caption_cache, caption_rows=rows, fuse=False)[0]

    def score_pass(self, blocks: list[np.ndarray], images: int, out: np.ndarray) -> None:
        self.engine.pairs_per_call = max(len(blocks[0]), 1)
        gallery = self.image_cache.rows(np.zeros(images, np.int64))  # the one image, `images` times
        from engine.cache import ImageCache

        cache = ImageCache([f"copy{i}" for i in range(images)], gallery, self.image_cache.fingerprint, self.image_cache.precision)
        out[:] = self.engine.score_grid(cache, self.caption_cache, fuse=False)

    def close(self) -> None:
        self.engine.close()


def make_scorer(name: str, model, graphs: dict[str, dict[str, Path]] | None = None, threads: int = 2,
                work: Path | None = None, engine_threads: int | None = None) -> Scorer:
    if name == "paper-eager":
        return PaperEager(model)
    if name in ("factored-eager", "torch-bf16"):
        return FactoredEager(model, bf16=name == "torch-bf16")
    if name == "engine":
        if work is None:
            raise ValueError("scorer engine: needs a work directory (its artifact is exported there)")
        return EngineScorer(model, work, engine_threads)
    if name == "ort-fp32-pair":
        return OrtScorer(model, graphs or {}, "fp32", threads, grid=False)
    if name == "kernel":
        return KernelScorer(model, graphs or {}, threads)
    if name.startswith("ort-") and name[4:] in ORT_PRECISIONS:
        if graphs is None or name[4:] not in graphs:
            raise ValueError(f"scorer {name}: its graphs were not exported (have {sorted(graphs or {})})")
        return OrtScorer(model, graphs, name[4:], threads)
    raise ValueError(f"scorer {name!r}: expected one of {SCORER_NAMES}")
