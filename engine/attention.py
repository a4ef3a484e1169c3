"""Attention weights of scored pairs, recomputed in numpy from the gallery caches.

The pair graphs output scores only (an attention output per pair would multiply their memory
traffic for the rare caller who wants it), so the weights of a hit are recomputed here from the
cached graph outputs, with the same formulas as the graphs (export/graphs.py, spec eq. 1-2, 9):

    W2R word-to-region  a[k, j] = softmax_j( tanh( t_k . (R W^T)_j + b ) )    [words, D]   (tanh: attention_form "tanh")
                        t_k = words (caption cache), R W^T = regions_attn (image cache)
    O2W object-to-word  b[j, k] = softmax_k( tanh( (O W')_j . s_k + b' ) )   [P, words]
                        O W' = objects_attn (image cache), s_k = states (caption cache)

Only the real words of a caption appear (the caches are ragged), so no padding is masked.
The scalar biases b and b' are the pair graphs' `attn_bias`; the exporter writes them into the
manifest (model.attention_biases, engine/manifest.py), so nothing here opens an ONNX file. Computed in float32;
for an fp16 artifact the graphs compute in fp16, so weights differ from theirs by ~1e-3.

    from engine.attention import attention_of_pairs
    hits = attention_of_pairs(artifact, image_cache, caption_cache, pairs)   # one dict per pair
"""

from __future__ import annotations

import numpy as np

from engine.artifact import Artifact
from engine.cache import CaptionCache, ImageCache
from engine.text import tokenize


def attention_biases(artifact: Artifact) -> dict[str, float]:
    """{"w2r": b, "o2w": b'} of the artifact's pair graphs (the branches it has), from its manifest."""
    return dict(artifact.attention_biases)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def attention_of_pairs(artifact: Artifact, images: ImageCache, captions: CaptionCache, pairs: np.ndarray,
                       biases: dict[str, float] | None = None) -> list[dict]:
    """Per pair (image row, caption row): {"image", "caption", "words": tokens (or None if the cache
    has no text), "word_to_region": [words, D] (W2R), "object_to_word": [P, words] (O2W)} float32."""
    biases = attention_biases(artifact) if biases is None else biases
    bound = np.tanh if artifact.info.model.attention_form == "tanh" else (lambda x: x)  # scaled: tau already folded in
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
            hit["word_to_region"] = _softmax(bound(t @ keys.T + np.float32(biases["w2r"])))  # [len, D]
        if "o2w" in biases:
            keys = np.asarray(images.arrays["objects_attn"][image], np.float32)  # [P, H2]
            s = np.asarray(captions.arrays["states"][words], np.float32)  # [len, H2]
            hit["object_to_word"] = _softmax(bound(keys @ s.T + np.float32(biases["o2w"])))  # [P, len]
        out.append(hit)
    return out
