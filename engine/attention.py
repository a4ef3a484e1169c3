"""Attention weights of scored pairs, recomputed in numpy from the gallery caches.

The pair graphs output scores only (an attention output per pair would multiply their memory
traffic for the rare caller who wants it), so the weights of a hit are recomputed here from the
cached graph outputs, with the same formulas as the graphs (export/graphs.py, spec eq. 1-2, 9):

    W2R word-to-region  a[k, j] = softmax_j( tanh( t_k . (R W^T)_j + b ) )    [words, D]
                        t_k = words (caption cache), R W^T = regions_attn (image cache)
    O2W object-to-word  b[j, k] = softmax_k( tanh( (O W')_j . s_k + b' ) )   [P, words]
                        O W' = objects_attn (image cache), s_k = states (caption cache)

Only the real words of a caption appear (the caches are ragged), so no padding is masked.
The scalar biases b and b' live only inside the pair graphs: they are read from the graph's
`attn_bias` initializer with a small protobuf walk (no `onnx` dependency). Computed in float32;
for an fp16 artifact the graphs compute in fp16, so weights differ from theirs by ~1e-3.

    from engine.attention import attention_of_pairs
    hits = attention_of_pairs(artifact, image_cache, caption_cache, pairs)   # one dict per pair
"""

from __future__ import annotations

import numpy as np

from engine.artifact import Artifact, _varint
from engine.cache import CaptionCache, ImageCache
from engine.errors import ArtifactError
from engine.text import tokenize

ATTENTION_BIAS = "attn_bias"  # the pair modules' buffer name (export/graphs.py W2RPair, O2WPair)
_TENSOR_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64}  # TensorProto.DataType FLOAT, FLOAT16, DOUBLE


def _fields(data: bytes, path) -> list[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of one protobuf message: bytes for length-delimited fields."""
    out, pos = [], 0
    while pos < len(data):
        key, pos = _varint(data, pos, path)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos, path)
        elif wire == 2:
            size, pos = _varint(data, pos, path)
            value, pos = data[pos:pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ArtifactError(f"{path}: unsupported protobuf wire type {wire}; expected an ONNX model")
        out.append((number, wire, value))
    return out


def read_initializer(path, name: str) -> np.ndarray:
    """The value of a float initializer of an ONNX file, by name (ModelProto.graph.initializer)."""
    data = open(path, "rb").read()
    for number, _, graph in _fields(data, path):
        if number != 7:  # ModelProto.graph
            continue
        for g_number, _, tensor in _fields(graph, path):
            if g_number != 5:  # GraphProto.initializer
                continue
            fields = _fields(tensor, path)
            if next((v for n, _, v in fields if n == 8), b"").decode() != name:  # TensorProto.name
                continue
            data_type = next((v for n, _, v in fields if n == 2), 0)
            if data_type not in _TENSOR_DTYPES:
                raise ArtifactError(f"{path}: initializer {name!r} has data type {data_type}; expected a float tensor")
            dtype = _TENSOR_DTYPES[data_type]
            raw = next((v for n, w, v in fields if n == 9), None)  # raw_data
            if raw is not None:
                return np.frombuffer(raw, dtype=dtype).astype(np.float32)
            floats = [v for n, w, v in fields if n == 4]  # float_data (packed)
            if data_type == 1 and floats:
                return np.frombuffer(b"".join(floats), dtype=np.float32).copy()
            raise ArtifactError(f"{path}: initializer {name!r} stores its value in a form not read here; expected raw_data")
    raise ArtifactError(f"{path}: no initializer {name!r}; expected the attention bias of the pair graph (export/graphs.py)")


def attention_biases(artifact: Artifact) -> dict[str, float]:
    """{"w2r": b, "o2w": b'} of the artifact's fp32 pair graphs (the branches it has)."""
    return {branch: float(read_initializer(artifact.graph_path(f"{branch}_pair", "fp32"), ATTENTION_BIAS).reshape(-1)[0])
            for branch in ("w2r", "o2w") if artifact.has_graph(f"{branch}_pair", "fp32")}


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def attention_of_pairs(artifact: Artifact, images: ImageCache, captions: CaptionCache, pairs: np.ndarray,
                       biases: dict[str, float] | None = None) -> list[dict]:
    """Per pair (image row, caption row): {"image", "caption", "words": tokens (or None if the cache
    has no text), "word_to_region": [words, D] (W2R), "object_to_word": [P, words] (O2W)} float32."""
    biases = attention_biases(artifact) if biases is None else biases
    max_words = artifact.dims["max_words"]
    out = []
    for image, caption in np.asarray(pairs, dtype=np.int64).reshape(-1, 2).tolist():
        words = slice(int(captions.offsets[caption]), int(captions.offsets[caption + 1]))
        tokens = tokenize(captions.texts[caption], max_words) if captions.texts[caption] else None
        hit = {"image": image, "caption": caption,
               "words": tokens if tokens is not None and len(tokens) == words.stop - words.start else None}
        if "w2r" in biases:
            keys = np.asarray(images.arrays["regions_attn"][image], np.float32)  # [D, E]
            t = np.asarray(captions.arrays["words"][words], np.float32)  # [len, E]
            hit["word_to_region"] = _softmax(np.tanh(t @ keys.T + np.float32(biases["w2r"])))  # [len, D]
        if "o2w" in biases:
            keys = np.asarray(images.arrays["objects_attn"][image], np.float32)  # [P, H2]
            s = np.asarray(captions.arrays["states"][words], np.float32)  # [len, H2]
            hit["object_to_word"] = _softmax(np.tanh(keys @ s.T + np.float32(biases["o2w"])))  # [P, len]
        out.append(hit)
    return out
