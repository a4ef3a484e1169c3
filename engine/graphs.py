"""The ONE declaration of every BSSAN ONNX graph: input and output names, dtypes, named axes.

The exporter (export/onnx_export.py), the validator (export/validate.py), the TensorRT builder
(export/tensorrt.py) and the engine runtime all read `GRAPHS`; nothing else spells a tensor name.
numpy only: `import engine.graphs` needs neither torch nor onnxruntime.

Axes are either DYNAMIC (named ONNX dims: images, captions, words, pairs) or static sizes named
after the model: their values for one artifact are `manifest["dims"]` (see engine/artifact.py).
Float tensors marked FLOAT are float32 in the fp32 and int8 variants and float16 in the fp16
variant; `scores` are float32 and indices/lengths int64 in every variant.

Graphs (D=region_count, M=region_dim, E=word_dim, P=object_count, Q=object_dim, H=w2r_hidden,
H2=o2w_hidden):

    w2r_image   regions [images, D, M]
                -> regions_attn  [images, D, E]   R W^T (the attention's bilinear form, image side)
                   regions_values [images, D, V]  what the attention averages: V = w2r_gates = 4H and
                                                  the values are G = R W_ih_u^T when 4H <= M
                                                  (manifest "w2r_values": "gates"); else V = M and the
                                                  values are R itself ("regions"), projected by
                                                  W_ih_u after the attention inside w2r_pair
    w2r_text    words [captions, words, E] -> gates_words [captions, words, 4H]  T W_ih_t^T + b_ih + b_hh
    w2r_pair    regions_attn, regions_values (image-cache rows), words, gates_words, lengths
                (caption-cache rows), pairs [pairs, 2] -> scores [pairs]  Y (eq. 1-6)
    o2w_image   objects [images, P, Q]
                -> objects_attn [images, P, H2]   O W'
                   objects_mlp  [images, P, h1]   O W1_o^T + b1 (first MLP layer's object part, BN folded)
    o2w_text    words [captions, words, E], lengths [captions] -> states [captions, words, H2]
                (Bi-LSTM over the real words, directions averaged; zero past each length)
    o2w_pair    objects_attn, objects_mlp (image-cache rows), states, lengths (caption-cache rows),
                pairs [pairs, 2] -> scores [pairs]  Y' (eq. 9-14)
    w2r_grid    regions_attn, regions_values [1, ...] (ONE image row), words, gates_words, lengths
                -> scores [captions]  Y of that image with every caption row (optional, fp32)
    o2w_grid    objects_attn, objects_mlp [1, ...], states, lengths -> scores [captions]  Y' (optional, fp32)
    shortlist_image  regions [images, D, M], objects [images, P, Q] -> image_vectors [images, K]
    shortlist_text   words [captions, words, E], lengths [captions] -> text_vectors [captions, K]
                     (the dual-encoder baseline; unit vectors, score = dot product)

How a pair graph is called: the caller encodes images and captions once (the *_image and
*_text graphs) and keeps the outputs as caches. One pair call takes some image-cache rows
(any B_img rows), some caption-cache rows (any B_txt rows) and `pairs` [N, 2] int64:
pairs[n] = (row in the image-cache inputs, row in the caption-cache inputs). Rows are
gathered inside the graph, so one graph serves an exhaustive block (every row x every row),
an image-to-text re-rank (1 image row x k caption rows) and a text-to-image re-rank
(k image rows x 1 caption row). An index outside its rows is an error of the caller
(ONNX Runtime raises on it; TensorRT's Gather does not check: validate before calling).
Nothing in a pair graph depends only on the image or only on the caption.

Lengths and buckets: the caption-cache inputs' `words` axis may be any size >= the longest
caption among the rows passed; the W2R recurrence runs max(lengths of the pairs) steps. Sort
captions by length and pass each bucket sliced to its own longest caption, so short captions
do not pay for padding. Every caption length must be in [1, words].

Memory of gathers (ARCHITECTURE.md): with ONE image row (a grid block of 1 image x many
captions, or an image-to-text re-rank) every pair shares that image's regions_values and the
attention-weighted sum is one GEMM [N*L, D] x [D, V]: nothing per pair is gathered. With
several image rows each pair gathers its image's regions_values, 4 * D * V bytes (fp32):
200 kB at the flickr8k preset (D=49, V=4H=1024), 400 kB at the paper preset (D=196, V=M=512:
the paper preset gathers R rather than G, whose 3.2 MB per pair would need 13 GB for 4,096
pairs). So score exhaustive grids one image row per call; use several image rows for a
text-to-image re-rank (1 caption x k images). `pair_bytes(dims, n_pairs, words)` bounds a call.

Grid graphs (w2r_grid, o2w_grid) compute the pair graphs' one-image case (pairs = (0, r) for
every caption row r) without a pair index: no Gather of cache rows, no If, and W2R's attention
runs inside the recurrence step (one GEMM [attn_t, h] x [G; W_hh] per word), so no [pairs, words,
4H] intermediate is made. They are validated against the same torch modules as the pair graphs
(export/validate.py) and are used by the runtime for grid blocks when present at the run's precision.

Attention is the test-time rule (softmax) in every graph; the training-only uniform rule
for negatives is not exported. The final score MS = w2r_weight * Y + o2w_weight * Y' is
combined by the caller with manifest["model"]["score_weights"] (eq. 19); a single-branch
model has only its branch's graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.errors import InputError

# Dynamic axes (named ONNX dims). Every other dim name is a static size read from manifest["dims"].
IMAGES, CAPTIONS, WORDS, PAIRS = "images", "captions", "words", "pairs"
DYNAMIC_AXES = (IMAGES, CAPTIONS, WORDS, PAIRS)

FLOAT = "float"  # float32, or float16 in the fp16 variant
PRECISIONS = ("fp32", "fp16", "int8")
FLOAT_DTYPE = {"fp32": "float32", "fp16": "float16", "int8": "float32"}  # int8: dynamic quantization keeps fp32 I/O

# Static size names (keys of manifest["dims"]).
STATIC_DIMS = ("region_count", "region_dim", "object_count", "object_dim", "word_dim", "max_words",
               "w2r_gates", "w2r_values", "o2w_hidden", "o2w_first", "shortlist_dim")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[str | int, ...]  # a DYNAMIC_AXES name, a STATIC_DIMS name or a literal int
    dtype: str = FLOAT  # FLOAT, "float32" or "int64"

    def numpy_dtype(self, precision: str) -> np.dtype:
        return np.dtype(FLOAT_DTYPE[precision] if self.dtype == FLOAT else self.dtype)

    def shape(self, dims: dict[str, int]) -> tuple[str | int, ...]:
        """Static names replaced by their sizes; dynamic axes stay names."""
        return tuple(d if isinstance(d, int) or d in DYNAMIC_AXES else int(dims[d]) for d in self.dims)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    branch: str  # "w2r", "o2w" or "shortlist"
    stage: str  # "image", "text" or "pair"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def check_declared_io(self, inputs, outputs, dims: dict[str, int], precision: str, where: str) -> None:
        """A loaded graph's own I/O (onnxruntime NodeArgs: .name, .shape, .type) against this declaration and
        the manifest's dims: names, element types, ranks and static sizes. ArtifactError naming the tensor
        otherwise (a graph swapped for another, or a manifest dim edited), at load, not at the first call."""
        from engine.errors import ArtifactError

        ort_type = {np.dtype(np.float32): "tensor(float)", np.dtype(np.float16): "tensor(float16)", np.dtype(np.int64): "tensor(int64)"}
        for kind, declared, got in (("inputs", self.inputs, inputs), ("outputs", self.outputs, outputs)):
            names = [arg.name for arg in got]
            if sorted(names) != sorted(t.name for t in declared) and not (kind == "outputs" and {t.name for t in declared} <= set(names)):
                raise ArtifactError(f"{where}: {kind} {names}; expected {[t.name for t in declared]} (graph {self.name!r} of "
                                    f"engine/graphs.py): the file is not this artifact's {self.name} graph; re-export it")
            by_name = {arg.name: arg for arg in got}
            for spec in declared:
                arg = by_name[spec.name]
                want_type = ort_type[spec.numpy_dtype(precision)]
                want = spec.shape(dims)
                shape = list(arg.shape or [])
                if arg.type != want_type or len(shape) != len(want) or any(
                        isinstance(w, int) and isinstance(g, int) and g != w for w, g in zip(want, shape)):
                    raise ArtifactError(f"{where}: {spec.name} is {arg.type} {shape}; expected {want_type} {list(want)} "
                                        f"(engine/graphs.py with the manifest's dims): the graph and manifest.json disagree; re-export it")

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor: {axis: name}} for every dynamic axis: torch.onnx.export's `dynamic_axes`."""
        return {t.name: {i: d for i, d in enumerate(t.dims) if d in DYNAMIC_AXES}
                for t in (*self.inputs, *self.outputs)}

    def check_inputs(self, feeds: dict[str, np.ndarray], dims: dict[str, int], precision: str = "fp32") -> None:
        """Raise InputError naming the first tensor whose name, dtype, rank, static size or
        shared dynamic axis does not match this declaration."""
        missing = [n for n in self.input_names if n not in feeds]
        extra = sorted(set(feeds) - set(self.input_names))
        if missing or extra:
            raise InputError(f"{self.name}: expected inputs {self.input_names}, missing {missing}, unexpected {extra}")
        seen: dict[str, tuple[str, int]] = {}
        for spec in self.inputs:
            array = feeds[spec.name]
            want = spec.numpy_dtype(precision)
            if array.dtype != want:
                raise InputError(f"{self.name}.{spec.name}: expected dtype {want}, got {array.dtype}")
            shape = spec.shape(dims)
            shown = "[" + ", ".join(map(str, shape)) + "]"
            if array.ndim != len(shape):
                raise InputError(f"{self.name}.{spec.name}: expected shape {shown}, got {list(array.shape)}")
            for axis, (want_dim, got) in enumerate(zip(shape, array.shape)):
                if isinstance(want_dim, int) and got != want_dim:
                    raise InputError(f"{self.name}.{spec.name}: expected shape {shown}, got {list(array.shape)}")
                if isinstance(want_dim, str):
                    if want_dim in seen and seen[want_dim][1] != got:
                        other = seen[want_dim][0]
                        raise InputError(f"{self.name}.{spec.name}: axis {axis} ({want_dim}) is {got}, "
                                         f"but {other} has {seen[want_dim][1]}; expected the same")
                    seen.setdefault(want_dim, (spec.name, got))


def _t(name: str, *dims: str | int, dtype: str = FLOAT) -> TensorSpec:
    return TensorSpec(name, tuple(dims), dtype)


_PAIRS = _t("pairs", PAIRS, 2, dtype="int64")  # (image row, caption row)
_LENGTHS = _t("lengths", CAPTIONS, dtype="int64")
_SCORES = _t("scores", PAIRS, dtype="float32")
_WORDS = _t("words", CAPTIONS, WORDS, "word_dim")
_REGIONS = _t("regions", IMAGES, "region_count", "region_dim")
_OBJECTS = _t("objects", IMAGES, "object_count", "object_dim")

GRAPHS: dict[str, GraphSpec] = {g.name: g for g in (
    GraphSpec("w2r_image", "w2r", "image", (_REGIONS,),
              (_t("regions_attn", IMAGES, "region_count", "word_dim"),
               _t("regions_values", IMAGES, "region_count", "w2r_values"))),
    GraphSpec("w2r_text", "w2r", "text", (_WORDS,),
              (_t("gates_words", CAPTIONS, WORDS, "w2r_gates"),)),
    GraphSpec("w2r_pair", "w2r", "pair",
              (_t("regions_attn", IMAGES, "region_count", "word_dim"),
               _t("regions_values", IMAGES, "region_count", "w2r_values"),
               _WORDS, _t("gates_words", CAPTIONS, WORDS, "w2r_gates"), _LENGTHS, _PAIRS),
              (_SCORES,)),
    GraphSpec("o2w_image", "o2w", "image", (_OBJECTS,),
              (_t("objects_attn", IMAGES, "object_count", "o2w_hidden"),
               _t("objects_mlp", IMAGES, "object_count", "o2w_first"))),
    GraphSpec("o2w_text", "o2w", "text", (_WORDS, _LENGTHS),
              (_t("states", CAPTIONS, WORDS, "o2w_hidden"),)),
    GraphSpec("o2w_pair", "o2w", "pair",
              (_t("objects_attn", IMAGES, "object_count", "o2w_hidden"),
               _t("objects_mlp", IMAGES, "object_count", "o2w_first"),
               _t("states", CAPTIONS, WORDS, "o2w_hidden"), _LENGTHS, _PAIRS),
              (_SCORES,)),
    # One image x many captions (a grid block): the pair graphs' one-image case with nothing gathered
    # (optional: an artifact without them scores grids through the pair graphs; fp32 only).
    GraphSpec("w2r_grid", "w2r", "grid",
              (_t("regions_attn", 1, "region_count", "word_dim"), _t("regions_values", 1, "region_count", "w2r_values"),
               _WORDS, _t("gates_words", CAPTIONS, WORDS, "w2r_gates"), _LENGTHS),
              (_t("scores", CAPTIONS, dtype="float32"),)),
    GraphSpec("o2w_grid", "o2w", "grid",
              (_t("objects_attn", 1, "object_count", "o2w_hidden"), _t("objects_mlp", 1, "object_count", "o2w_first"),
               _t("states", CAPTIONS, WORDS, "o2w_hidden"), _LENGTHS),
              (_t("scores", CAPTIONS, dtype="float32"),)),
    GraphSpec("shortlist_image", "shortlist", "image", (_REGIONS, _OBJECTS),
              (_t("image_vectors", IMAGES, "shortlist_dim", dtype="float32"),)),
    GraphSpec("shortlist_text", "shortlist", "text", (_WORDS, _LENGTHS),
              (_t("text_vectors", CAPTIONS, "shortlist_dim", dtype="float32"),)),
)}

BSSAN_GRAPHS = tuple(n for n, g in GRAPHS.items() if g.branch != "shortlist")
GRID_GRAPHS = tuple(n for n, g in GRAPHS.items() if g.stage == "grid")
GRID_PRECISIONS = ("fp32",)  # the exporter writes grid graphs at these precisions only
SHORTLIST_GRAPHS = tuple(n for n, g in GRAPHS.items() if g.branch == "shortlist")


def graph_file(name: str, precision: str) -> str:
    """Path of a graph inside an artifact directory, relative to it."""
    if name not in GRAPHS or precision not in PRECISIONS:
        raise InputError(f"graph {name!r} / precision {precision!r}: expected one of {list(GRAPHS)} / {list(PRECISIONS)}")
    return f"graphs/{name}.{precision}.onnx"


def pair_bytes(dims: dict[str, int], n_pairs: int, words: int, precision: str = "fp32") -> int:
    """Largest per-call intermediate of w2r_pair (the gathered regions_values plus the gate inputs),
    in bytes: the bound a caller uses to size its pair blocks."""
    item = np.dtype(FLOAT_DTYPE[precision]).itemsize
    per_pair = dims["region_count"] * dims["w2r_values"] + 2 * words * dims["w2r_gates"]
    return int(n_pairs) * per_pair * item
