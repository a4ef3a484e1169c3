"""The fused W2R kernel: the w2r_grid graph's recurrence in one compiled pass (w2r_grid.c), called through ctypes;
and beside it the O2W kernel (the o2w_grid graph, reading the captions' states in place).

    python -m engine.kernels build        # compile for this machine (-O3 -march=native) into the cache; prints the path
    python -m engine.kernels info         # where the library is (or why not), its SIMD width

    from engine.kernels import W2RKernel, load_library
    kernel = W2RKernel.from_artifact(artifact)   # weights read from the artifact's w2r_grid.fp32.onnx
    y = kernel(feeds)                            # Y [captions] of ONE image row, as w2r_grid gives it
    y = kernel.pairs(image_feeds, caption_feeds, pairs)  # Y of pooled pairs, as w2r_pair gives it
    o2w = O2WKernel.from_artifact(artifact)      # weights read from o2w_grid.fp32.onnx (named since session 9's export)
    y_prime = o2w(feeds)                         # Y' [captions] of ONE image row, as o2w_grid gives it

Why: ONNX Runtime runs the W2R recurrence as a Loop of ~15 nodes per word; the kernel does the same math per block
of captions with nothing written between steps: the attention logits, the softmax, ONE register-blocked GEMM
[a_t, h] x [G; W_hh^T] started from gates_words[:, t], and the LSTM cell, each caption block running its own longest
caption's steps, then the MLP on the last state. Pooled pairs (each caption row with its own image row) make every
word's attention and a_t G first, then run W_hh as one GEMM over the rows. Image and caption rows are read in place
(a caption cache's ragged word rows: CaptionCache.block(flat=FLAT_WORDS)). Same inputs and output as the w2r_grid
and w2r_pair graphs, whose initializers it reads (without onnx: engine.artifact.onnx_initializers), so they cannot
drift; tests/engine/test_kernels.py checks them against each other and against numpy.

The library is built per machine (the instructions it may use are this CPU's), never shipped: `build()` runs the
system C compiler ($CC, else cc) into $BSSAN_KERNELS_DIR or $XDG_CACHE_HOME/bssan-engine/kernels (default
~/.cache/...), named by the source, the flags and the CPU, and renamed into place when complete. CMakeLists.txt
builds it the same way (it calls `python -m engine.kernels build`). Nothing is compiled when a Scorer loads:
without a built library the kernel path is unavailable and the Scorer says why (engine/runtime.py). numpy and ctypes
only.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np

from engine.errors import ArtifactError, InputError

SOURCE = Path(__file__).with_name("w2r_grid.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=gnu11", "-fPIC", "-shared")
KERNELS_DIR_ENV = "BSSAN_KERNELS_DIR"
FLAT_WORDS = ("words", "gates_words")  # the caption arrays the W2R kernel reads in place (CaptionCache.block(flat=...))
FLAT_STATES = ("states",)  # and the O2W kernel's
MAX_DEPTH = 8  # MLP layers (w2r_grid.c MAX_DEPTH)
_ERRORS = {-1: "sizes the kernel does not support", -2: "out of memory", -3: "a caption's words outside the word rows given",
           -4: "an image row outside the image rows given"}


class KernelError(InputError):
    """The kernel library cannot be built or loaded, or does not fit the model."""


def kernels_dir() -> Path:
    value = os.environ.get(KERNELS_DIR_ENV)
    if value:
        return Path(value)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "bssan-engine" / "kernels"


def _cpu() -> str:
    from engine.paths import cpu_model

    return cpu_model()


def library_path() -> Path:
    """Where this machine's build of the current source lives (it may not exist yet)."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu().encode()).hexdigest()[:16]
    return kernels_dir() / f"libbssan_w2r-{key}.so"


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(shlex.split(name)[0]):
            return name
    return None


def build(force: bool = False) -> Path:
    """Compile w2r_grid.c for this machine (once; `force` rebuilds) and return the library's path."""
    out = library_path()
    if out.is_file() and not force:
        return out
    cc = compiler()
    if cc is None:
        raise KernelError(f"{SOURCE}: no C compiler found ($CC, cc, gcc, clang); install gcc to build the W2R kernel")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        partial = Path(tmp) / out.name
        cmd = [*shlex.split(cc), *FLAGS, "-o", str(partial), str(SOURCE), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:300]) \
                or "no compiler output"
            raise KernelError(f"{SOURCE}: {' '.join(cmd[:2])} failed (exit {done.returncode}): {first}")
        os.replace(partial, out)
    return out


_LIBRARIES: dict[Path, ctypes.CDLL] = {}
_LOCK = threading.Lock()


def load_library(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """The built library (default: library_path()); KernelError naming the fix when it is not built."""
    path = Path(path) if path is not None else library_path()
    with _LOCK:
        if path in _LIBRARIES:
            return _LIBRARIES[path]
        if not path.is_file():
            raise KernelError(f"{path}: the W2R kernel is not built for this machine; run `python -m engine.kernels build`")
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise KernelError(f"{path}: cannot load the W2R kernel ({exc}); rebuild it: python -m engine.kernels build --force") from None
        p = ctypes.c_void_p
        lib.bssan_w2r_grid.argtypes = ([ctypes.c_int] * 3 + [ctypes.c_int64, ctypes.c_int, ctypes.c_int] + [p] * 8
                                       + [ctypes.c_float, ctypes.c_int, ctypes.c_int, p, p, p, p, p, ctypes.c_int])
        lib.bssan_w2r_grid.restype = ctypes.c_int
        lib.bssan_o2w_grid.argtypes = ([ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int] + [p] * 6
                                       + [ctypes.c_float, ctypes.c_int, p, p, ctypes.c_int, p, p, p, p])
        lib.bssan_o2w_grid.restype = ctypes.c_int
        lib.bssan_w2r_simd_width.restype = ctypes.c_int
        lib.bssan_w2r_block_rows.restype = ctypes.c_int
        _LIBRARIES[path] = lib
        return lib


def _word_rows(kernel: str, arrays: dict[str, np.ndarray], offsets: np.ndarray | None):
    """([arrays as word rows [T, ...]], offsets [B]): padded blocks [B, L, ...] viewed as word rows (caption b's words
    at rows b * L), or ragged rows with their offsets as given (a CaptionCache's own arrays)."""
    if offsets is not None:
        return [_f32(array, name, 2) for name, array in arrays.items()], np.ascontiguousarray(offsets, np.int64)
    blocks = [_f32(array, name, 3) for name, array in arrays.items()]
    count, width = blocks[0].shape[:2]
    if any(block.shape[:2] != (count, width) for block in blocks):
        raise InputError(f"{kernel} kernel: {', '.join(f'{n} {list(b.shape)}' for n, b in zip(arrays, blocks))}: expected "
                         f"the same [captions, words]")
    return [block.reshape(count * width, -1) for block in blocks], np.arange(count, dtype=np.int64) * width


def _f32(array: np.ndarray, name: str, ndim: int, dtype=np.float32) -> np.ndarray:
    if array.ndim != ndim:
        raise InputError(f"kernel input {name!r}: expected {ndim} dims, got shape {list(array.shape)}")
    if array.dtype != dtype:
        raise InputError(f"kernel input {name!r}: expected {np.dtype(dtype).name}, got {array.dtype}")
    return np.ascontiguousarray(array)


def _image_inputs(kernel: str, arrays: dict[str, np.ndarray], image_rows: np.ndarray | None, half_ok: bool = False):
    """([arrays as float32 [I, ...]], image_rows): each array's first row only without image_rows (ONE image x every
    caption row), else every row, with image_rows (int64) checked against them (pooled pairs). half_ok: float16
    arrays pass as they are when all of them are float16 (the W2R kernel widens them itself)."""
    if half_ok and all(np.asarray(a).dtype == np.float16 for a in arrays.values()):
        out = [_f32(np.asarray(array).view(np.uint16), name, 3, np.uint16) for name, array in arrays.items()]
    else:
        out = [_f32(array, name, 3) for name, array in arrays.items()]
    if image_rows is None:
        return [array[:1] for array in out], None
    image_rows = np.ascontiguousarray(image_rows, np.int64)
    if len(image_rows) and (image_rows.min() < 0 or image_rows.max() >= len(out[0])):
        raise InputError(f"{kernel} kernel: {_ERRORS[-4]} (rows {int(image_rows.min())}..{int(image_rows.max())}, "
                         f"{len(out[0])} image rows)")
    return out, image_rows


def _mlp_layers(inits: dict[str, np.ndarray], weight: str, bias: str, first: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(W, b)] of the initializers named weight.format(k), bias.format(k) for k = first, first + 1, ... while present."""
    layers, k = [], first
    while weight.format(k) in inits:
        layers.append((inits[weight.format(k)], inits[bias.format(k)]))
        k += 1
    return layers


def _mlp_chain(layers: list[tuple[np.ndarray, np.ndarray]], width: int, what: str):
    """(widths int32 [depth + 1], weights concatenated, biases concatenated) of input-major layers (y = x W + b) that
    chain from `width` to 1; KernelError when they do not."""
    layers = [(np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32)) for w, b in layers]
    widths = [width] + [w.shape[1] for w, _ in layers]
    if any(w.shape != (widths[k], widths[k + 1]) or b.shape != (widths[k + 1],) for k, (w, b) in enumerate(layers)) \
            or widths[-1] != 1 or not 1 <= len(layers) <= MAX_DEPTH:
        raise KernelError(f"{what}: MLP layers {[list(w.shape) for w, _ in layers]} do not chain from {width} "
                          f"to 1 in at most {MAX_DEPTH} layers")
    return (np.asarray(widths, np.int32), np.concatenate([w.reshape(-1) for w, _ in layers]),
            np.concatenate([b.reshape(-1) for _, b in layers]))


class _BranchKernel:
    """What both kernels share: their weights come from the artifact's fp32 grid graph of their branch."""

    BRANCH = ""

    @classmethod
    def from_artifact(cls, artifact, library: ctypes.CDLL | None = None):
        """The kernel with the weights of `artifact`'s fp32 <branch>_grid graph (KernelError when it has none); the
        attention's bias and form as the artifact's manifest records them (export.pipeline.attention_record)."""
        graph = f"{cls.BRANCH}_grid"
        if not artifact.has_graph(graph, "fp32"):
            raise KernelError(f"{artifact.root}: no graphs/{graph}.fp32.onnx to read the {cls.BRANCH.upper()} weights from; "
                              f"re-export the artifact")
        model = artifact.info.model
        return cls.from_graph(artifact.graph_path(graph, "fp32"), float(model.attention_biases.get(cls.BRANCH, 0.0)),
                              model.attention_form == "tanh", library)


class W2RKernel(_BranchKernel):
    """Y of one image row x N caption rows (the w2r_grid graph's inputs and output) through the compiled kernel."""

    BRANCH = "w2r"

    def __init__(self, weight_hh_t: np.ndarray, mlp: list[tuple[np.ndarray, np.ndarray]], attn_bias: float, bounded: bool,
                 input_weight_u_t: np.ndarray | None = None, library: ctypes.CDLL | None = None):
        self.lib = library if library is not None else load_library()
        self.weight_hh_t = np.ascontiguousarray(weight_hh_t, np.float32)
        self.hidden = self.weight_hh_t.shape[0]
        self.depth = len(mlp)
        self._widths, self._mlp_weights, self._mlp_biases = _mlp_chain(mlp, self.hidden, f"W2R kernel (H={self.hidden})")
        self.attn_bias, self.bounded = float(attn_bias), bool(bounded)
        self.input_weight_u_t = None if input_weight_u_t is None else np.ascontiguousarray(input_weight_u_t, np.float32)
        if self.weight_hh_t.shape != (self.hidden, 4 * self.hidden):
            raise KernelError(f"W2R kernel: weight_hh_t shape {list(self.weight_hh_t.shape)}, expected [H, 4H]")

    @classmethod
    def from_graph(cls, path: str | os.PathLike, attn_bias: float, bounded: bool,
                   library: ctypes.CDLL | None = None) -> "W2RKernel":
        """The kernel with the weights of a w2r_grid.fp32.onnx file; the attention's bias and form as the artifact's
        manifest records them (export.pipeline.attention_record)."""
        from engine.artifact import onnx_initializers

        inits = onnx_initializers(path)
        mlp = _mlp_layers(inits, "mlp_weight{}", "mlp_bias{}", 0)
        if "weight_hh_t" not in inits or not mlp:
            raise ArtifactError(f"{path}: expected initializers weight_hh_t and mlp_weight0.. (the exporter's w2r_grid); re-export it")
        return cls(inits["weight_hh_t"], mlp, attn_bias=attn_bias, bounded=bounded,
                   input_weight_u_t=inits.get("input_weight_u_t"), library=library)

    def run(self, regions_attn: np.ndarray, regions_values: np.ndarray, words: np.ndarray, gates_words: np.ndarray,
            lengths: np.ndarray, offsets: np.ndarray | None = None, image_rows: np.ndarray | None = None,
            want_hidden: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(Y [N], h [N, H] after each caption's last real word, or None unless want_hidden).
        words / gates_words: a padded block [N, L, E] / [N, L, 4H] (offsets None), or word rows [T, E] / [T, 4H] with
        caption n's words at rows offsets[n] .. offsets[n] + lengths[n] (a CaptionCache's own arrays: no copy).
        image_rows None: ONE image (regions_* [1, ...]) x every caption row; else caption row n is scored with
        image row image_rows[n] of regions_* [I, ...] (pooled pairs: nothing gathered). regions_*: float32, or both
        float16 (a gallery storing them at half the memory: engine.serve --gallery-rows fp16), widened in the kernel."""
        (keys, values), image_rows = _image_inputs("W2R", {"regions_attn": regions_attn, "regions_values": regions_values},
                                                   image_rows, half_ok=self.input_weight_u_t is None)
        half = int(keys.dtype == np.uint16)
        if self.input_weight_u_t is not None:  # "regions" artifacts: G = R W_ih_u^T, for the images used only
            if image_rows is not None:
                used, image_rows = np.unique(image_rows, return_inverse=True)
                keys, values = np.ascontiguousarray(keys[used]), values[used]
            values = np.ascontiguousarray(values @ self.input_weight_u_t)
        lengths = np.ascontiguousarray(lengths, np.int64)
        (words, gates_words), offsets = _word_rows("W2R", {"words": words, "gates_words": gates_words}, offsets)
        n, (i, d, e) = len(lengths), keys.shape
        if values.shape != (i, d, 4 * self.hidden) or gates_words.shape != (len(words), 4 * self.hidden) or \
                words.shape[1] != e or offsets.shape != (n,) or lengths.ndim != 1 or \
                (image_rows is not None and image_rows.shape != (n,)):
            raise InputError(f"W2R kernel: shapes regions_attn {list(keys.shape)}, regions_values {list(values.shape)}, words "
                             f"{list(words.shape)}, gates_words {list(gates_words.shape)}, lengths {list(lengths.shape)}, "
                             f"offsets {list(offsets.shape)} do not fit H={self.hidden}")
        scores = np.empty(n, np.float32)
        h = np.empty((n, self.hidden), np.float32) if want_hidden else None
        if n:
            rc = self.lib.bssan_w2r_grid(d, e, self.hidden, len(words), n, i, None if image_rows is None else image_rows.ctypes.data,
                                         keys.ctypes.data, values.ctypes.data, words.ctypes.data,
                                         gates_words.ctypes.data, offsets.ctypes.data, lengths.ctypes.data,
                                         self.weight_hh_t.ctypes.data, self.attn_bias, int(self.bounded), self.depth,
                                         self._widths.ctypes.data, self._mlp_weights.ctypes.data, self._mlp_biases.ctypes.data,
                                         scores.ctypes.data, None if h is None else h.ctypes.data, half)
            if rc != 0:
                raise InputError(f"W2R kernel: {_ERRORS.get(rc, f'error {rc}')} (lengths {int(lengths.min())}..{int(lengths.max())}, "
                                 f"{len(words)} word rows)")
        return scores, h

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Y [N] float32 from the w2r_grid graph's feeds (padded words), or from a CaptionCache.block(..., flat=FLAT_WORDS)
        (its word rows as they are, plus "word_offsets")."""
        return self.run(feeds["regions_attn"], feeds["regions_values"], feeds["words"], feeds["gates_words"], feeds["lengths"],
                        feeds.get("word_offsets"))[0]

    def pairs(self, image_feeds: dict[str, np.ndarray], caption_feeds: dict[str, np.ndarray], pairs: np.ndarray) -> np.ndarray:
        """Y [N] of pairs [N, 2] = (image row, caption row): the w2r_pair graph's result, with the image cache rows and
        the caption rows read in place (caption_feeds from CaptionCache.block(rows, flat=FLAT_WORDS), pairs' caption
        column indexing those rows)."""
        pairs = np.asarray(pairs, np.int64)
        columns = pairs[:, 1]
        (words, gates), offsets = _word_rows("W2R", {"words": caption_feeds["words"], "gates_words": caption_feeds["gates_words"]},
                                             caption_feeds.get("word_offsets"))
        return self.run(image_feeds["regions_attn"], image_feeds["regions_values"], words, gates,
                        caption_feeds["lengths"][columns], offsets[columns], image_rows=pairs[:, 0])[0]


class O2WKernel(_BranchKernel):
    """Y' of one image row x N caption rows (the o2w_grid graph's inputs and output) through the compiled kernel
    (w2r_grid.c bssan_o2w_grid): the captions' Bi-LSTM states read in place from a caption cache's word rows, so the
    re-rank copies no padded states block (1.7 CPU-s of the Flickr8K test K=100 run, beside 3.7 CPU-s of o2w_grid).
    Those word rows are also projected through the MLP's first layer once (`projected`: S first_states_t, kept while
    the cache's array lives), so a pair's first layer is z_j = objects_mlp[j] + b_j (S first_states_t), a [P, len] x
    [len, h1] product instead of [P, len] x [len, H2] then [P, H2] x [H2, h1]: equal by linearity, to float rounding."""

    BRANCH = "o2w"

    def __init__(self, first_states_t: np.ndarray, mlp: list[tuple[np.ndarray, np.ndarray]], attn_bias: float, bounded: bool,
                 library: ctypes.CDLL | None = None):
        self.lib = library if library is not None else load_library()
        self.first_states_t = np.ascontiguousarray(first_states_t, np.float32)  # [H2, h1]
        if self.first_states_t.ndim != 2:
            raise KernelError(f"O2W kernel: first_states_t shape {list(self.first_states_t.shape)}, expected [H2, h1]")
        self.hidden, self.first = self.first_states_t.shape
        self.depth = len(mlp)
        self._widths, self._mlp_weights, self._mlp_biases = _mlp_chain(mlp, self.first, f"O2W kernel (h1={self.first})")
        self.attn_bias, self.bounded = float(attn_bias), bool(bounded)
        # the kernel reads the projected rows in place in whole panels of 2 vectors: h1 a multiple of them (the
        # reference's 128; else the two products per pair, as before)
        self.projects = self.first % (2 * self.lib.bssan_w2r_simd_width()) == 0
        self._projections: dict[int, tuple[weakref.ref, np.ndarray]] = {}  # id(states) -> (the array, its projection)
        self._projections_lock = threading.Lock()

    def projected(self, states: np.ndarray) -> np.ndarray:
        """states [T, H2] x first_states_t [H2, h1] -> [T, h1], made once per array object (a caption cache's own word
        rows, as CaptionCache.block(flat=FLAT_STATES) hands them to every call) and kept while that array lives: as
        many bytes again as the states at the reference sizes (h1 = H2), which the Scorer's memory plan does not count."""
        key = id(states)
        with self._projections_lock:
            hit = self._projections.get(key)
            if hit is not None and hit[0]() is states:
                return hit[1]
        out = np.ascontiguousarray(_f32(states, "states", 2) @ self.first_states_t, np.float32)  # [T, h1]
        with self._projections_lock:
            self._projections = {k: v for k, v in self._projections.items() if v[0]() is not None}  # the dead ones go
            self._projections[key] = (weakref.ref(states), out)
        return out

    @classmethod
    def from_graph(cls, path: str | os.PathLike, attn_bias: float, bounded: bool,
                   library: ctypes.CDLL | None = None) -> "O2WKernel":
        """The kernel with the weights of an o2w_grid.fp32.onnx file (its initializers pair.first_states_t and
        pair.mlp.weight_t1, pair.mlp.bias1, ...: export/graphs.py FoldedMLP)."""
        from engine.artifact import onnx_initializers

        inits = onnx_initializers(path)
        mlp = _mlp_layers(inits, "pair.mlp.weight_t{}", "pair.mlp.bias{}", 1)
        if "pair.first_states_t" not in inits or not mlp:
            raise KernelError(f"{path}: no initializers pair.first_states_t and pair.mlp.weight_t1.. (exported before the O2W "
                              f"kernel); re-export the artifact to score O2W with the kernel")
        return cls(inits["pair.first_states_t"], mlp, attn_bias=attn_bias, bounded=bounded, library=library)

    def run(self, objects_attn: np.ndarray, objects_mlp: np.ndarray, states: np.ndarray, lengths: np.ndarray,
            offsets: np.ndarray | None = None, image_rows: np.ndarray | None = None) -> np.ndarray:
        """Y' [N] of ONE image (objects_* [1, P, ...]) x every caption row, or with image_rows: caption row n with image
        row image_rows[n] of objects_* [I, P, ...] (pooled pairs, read in place). states: a padded block [N, L, H2]
        (offsets None), or word rows [T, H2] with caption n's words at offsets[n] .. offsets[n] + lengths[n] (no copy;
        then their projection through the first layer is made once per array and used: `projected`)."""
        (keys, start), image_rows = _image_inputs("O2W", {"objects_attn": objects_attn, "objects_mlp": objects_mlp}, image_rows)
        rows_given = states if offsets is not None and self.projects else None  # a cache's own rows: projection kept
        (states,), offsets = _word_rows("O2W", {"states": states}, offsets)
        lengths = np.ascontiguousarray(lengths, np.int64)
        n, (i, p, h2) = len(lengths), keys.shape
        if h2 != self.hidden or start.shape != (i, p, self.first) or states.shape[1] != h2 or offsets.shape != (n,) or \
                lengths.ndim != 1 or (image_rows is not None and image_rows.shape != (n,)):
            raise InputError(f"O2W kernel: shapes objects_attn {list(objects_attn.shape)}, objects_mlp {list(objects_mlp.shape)}, "
                             f"states {list(states.shape)}, lengths {list(lengths.shape)}, offsets {list(offsets.shape)} do not fit "
                             f"H2={self.hidden}, h1={self.first}")
        keys, start = np.ascontiguousarray(keys), np.ascontiguousarray(start)
        states_mlp = self.projected(rows_given) if rows_given is not None and n else None
        scores = np.empty(n, np.float32)
        if n:
            rc = self.lib.bssan_o2w_grid(p, h2, len(states), n, i, None if image_rows is None else image_rows.ctypes.data,
                                         keys.ctypes.data, start.ctypes.data, states.ctypes.data,
                                         offsets.ctypes.data, lengths.ctypes.data, self.attn_bias, int(self.bounded),
                                         self.first_states_t.ctypes.data, None if states_mlp is None else states_mlp.ctypes.data,
                                         self.depth, self._widths.ctypes.data,
                                         self._mlp_weights.ctypes.data, self._mlp_biases.ctypes.data, scores.ctypes.data)
            if rc != 0:
                raise InputError(f"O2W kernel: {_ERRORS.get(rc, f'error {rc}')} (lengths {int(lengths.min())}..{int(lengths.max())}, "
                                 f"{len(states)} word rows)")
        return scores

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Y' [N] float32 from the o2w_grid graph's feeds (padded states), or from a CaptionCache.block(..., flat=FLAT_STATES)
        (its word rows as they are, plus "word_offsets")."""
        return self.run(feeds["objects_attn"], feeds["objects_mlp"], feeds["states"], feeds["lengths"], feeds.get("word_offsets"))

    def pairs(self, image_feeds: dict[str, np.ndarray], caption_feeds: dict[str, np.ndarray], pairs: np.ndarray) -> np.ndarray:
        """Y' [N] of pairs [N, 2] = (image row, caption row): the o2w_pair graph's result, image cache rows and caption
        rows read in place (caption_feeds from CaptionCache.block(rows, flat=FLAT_STATES), or a padded block)."""
        pairs = np.asarray(pairs, np.int64)
        columns = pairs[:, 1]
        (states,), offsets = _word_rows("O2W", {"states": caption_feeds["states"]}, caption_feeds.get("word_offsets"))
        return self.run(image_feeds["objects_attn"], image_feeds["objects_mlp"], states, caption_feeds["lengths"][columns],
                        offsets[columns], image_rows=pairs[:, 0])
