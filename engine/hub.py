"""BSSAN's image hub correction: a bank of train captions, and how far each image sits above it.

Scored over every pair, a BSSAN model has "hub" images: photos that score high against almost any caption
(Flickr8K's test split and the demo's rocket photo both have them), so they crowd the top of many
text-to-image rankings. As CSLS does for a joint space (Conneau et al. 2018; the first stage's own correction
is training/hubness.py), the model's score is corrected by how high the image scores against everything:

    MS'(i, c) = MS(i, c) - beta * r(i) - gamma * s(c)
    r(i)      = mean of the k highest MS(i, b) over a fixed bank of train captions b
    s(c)      = mean of the text_k highest MS(b', c) over a fixed bank of train images b' (optional: gamma > 0)

r(i) is a property of the image alone, computed once when the image is encoded (the engine: an extra
"hub_offset" array of the image cache, = beta * r(i); training.model.BSSAN.hub_offsets), so scoring a pair
costs nothing more; it reorders text-to-image rankings (an image-to-text ranking, one image, is unchanged).
s(c) likewise for a caption (a "hub_offset" array of the caption cache, = gamma * s(c)), reordering
image-to-text rankings. k, beta, text_k and gamma are chosen on dev by BSSAN alone over every pair
(training.evaluate --tune-hub), 0 included.

File (HUB_BANK beside a BSSAN checkpoint, copied into an exported artifact): an .npz of
    words    [W, E] float16   the bank captions' word features, caption after caption (ragged)
    lengths  [N] int64        words per caption (sum = W)
    k, beta                   the correction
    regions, objects          [N_b, D, M], [N_b, P, Q] float16: the bank images' features (optional, with text_k, gamma)
    record                    JSON: the weights and branch weights it was chosen for, the dev figures
This module needs only numpy: the engine reads it, training writes it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import ArtifactError

HUB_BANK = "hub_bank.npz"
HUB_OFFSET = "hub_offset"  # the image cache array [N] float32: beta * r(i) of each image (engine.runtime.Scorer)


def top_k_mean(scores: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Mean of the k highest values along `axis` (float32): r(i) with axis 1 of [N_img, N_bank], s(c) with axis 0."""
    scores = np.asarray(scores, np.float32)
    n = scores.shape[axis]
    top = np.take(np.partition(scores, n - k, axis=axis), np.arange(n - k, n), axis=axis)
    return top.mean(axis=axis, dtype=np.float64).astype(np.float32)


@dataclass(frozen=True)
class HubBank:
    words: np.ndarray    # [W, E] float16: the bank captions' words, ragged (caption i owns lengths[:i].sum() + range(lengths[i]))
    lengths: np.ndarray  # [N] int64
    k: int
    beta: float
    record: dict = field(default_factory=dict)
    # The caption side (optional): a bank of train images, and s(c) = mean of the text_k highest MS(b, c) over them;
    # MS'(i, c) = MS(i, c) - beta r(i) - gamma s(c). It reorders image-to-text rankings only.
    regions: np.ndarray | None = None  # [N_b, D, M] float16
    objects: np.ndarray | None = None  # [N_b, P, Q] float16
    text_k: int = 0
    gamma: float = 0.0

    def __post_init__(self) -> None:
        if self.words.ndim != 2 or self.lengths.ndim != 1 or int(self.lengths.sum()) != len(self.words):
            raise ArtifactError(f"hub bank: expected words [W, E] and lengths [N] with sum(lengths) = W, got words "
                                f"{self.words.shape} and lengths {self.lengths.shape} (sum {int(self.lengths.sum())})")
        if len(self.lengths) == 0 or self.lengths.min() < 1 or not 1 <= self.k <= len(self.lengths):
            raise ArtifactError(f"hub bank: expected >= 1 caption of >= 1 word and 1 <= k <= {len(self.lengths)}, "
                                f"got {len(self.lengths)} captions, k={self.k}")
        if not np.isfinite(self.beta) or self.beta < 0:
            raise ArtifactError(f"hub bank: expected a finite beta >= 0, got {self.beta}")
        if self.has_images:
            if self.regions.ndim != 3 or self.objects.ndim != 3 or len(self.regions) != len(self.objects):
                raise ArtifactError(f"hub bank: expected regions [N_b, D, M] and objects [N_b, P, Q] of the same N_b, got "
                                    f"{self.regions.shape} and {self.objects.shape}")
            if not 1 <= self.text_k <= len(self.regions) or not np.isfinite(self.gamma) or self.gamma <= 0:
                raise ArtifactError(f"hub bank: expected 1 <= text_k <= {len(self.regions)} and a finite gamma > 0 with "
                                    f"bank images, got text_k={self.text_k}, gamma={self.gamma}")

    @property
    def has_images(self) -> bool:
        """True when the bank corrects captions too (bank images, gamma > 0)."""
        return self.regions is not None

    def __len__(self) -> int:
        return len(self.lengths)

    def padded(self, max_words: int | None = None) -> np.ndarray:
        """words [N, L, E] float32, zero past each caption's length (L = the longest, or max_words)."""
        width = int(self.lengths.max()) if max_words is None else max_words
        out = np.zeros((len(self.lengths), width, self.words.shape[1]), np.float32)
        real = np.arange(width)[None, :] < self.lengths[:, None]
        out[real] = self.words.astype(np.float32)
        return out

    def offsets(self, bank_scores: np.ndarray) -> np.ndarray:
        """beta * r(i) [N_img] from MS [N_img, N_bank] of each image with every bank caption."""
        bank_scores = np.asarray(bank_scores, np.float32)
        if bank_scores.ndim != 2 or bank_scores.shape[1] != len(self):
            raise ArtifactError(f"hub bank: expected scores [N_img, {len(self)}], got {bank_scores.shape}")
        return (self.beta * top_k_mean(bank_scores, self.k, axis=1)).astype(np.float32)

    def text_offsets(self, bank_scores: np.ndarray) -> np.ndarray:
        """gamma * s(c) [N_cap] from MS [N_b, N_cap] of every bank image with each caption (zeros without bank images)."""
        bank_scores = np.asarray(bank_scores, np.float32)
        if not self.has_images:
            return np.zeros(bank_scores.shape[1] if bank_scores.ndim == 2 else 0, np.float32)
        n = len(self.regions)
        if bank_scores.ndim != 2 or bank_scores.shape[0] != n:
            raise ArtifactError(f"hub bank: expected scores [{n}, N_cap], got {bank_scores.shape}")
        return (self.gamma * top_k_mean(bank_scores, self.text_k, axis=0)).astype(np.float32)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the .npz atomically (a temporary file, then one rename)."""
        from engine.files import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                images = {} if not self.has_images else dict(
                    regions=self.regions.astype(np.float16), objects=self.objects.astype(np.float16),
                    text_k=np.int64(self.text_k), gamma=np.float64(self.gamma))
                np.savez_compressed(handle, words=self.words.astype(np.float16), lengths=self.lengths.astype(np.int64),
                         k=np.int64(self.k), beta=np.float64(self.beta), record=np.array(json.dumps(self.record)), **images)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HubBank":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = {"words", "lengths", "k", "beta"} - set(data.files)
                if missing:
                    raise ArtifactError(f"{path}: missing {sorted(missing)}; expected a hub bank (engine/hub.py)")
                record = json.loads(str(data["record"])) if "record" in data.files else {}
                images = {}
                if "regions" in data.files:
                    images = dict(regions=np.asarray(data["regions"], np.float16), objects=np.asarray(data["objects"], np.float16),
                                  text_k=int(data["text_k"]), gamma=float(data["gamma"]))
                return cls(np.asarray(data["words"], np.float16), np.asarray(data["lengths"], np.int64), int(data["k"]),
                           float(data["beta"]), record, **images)
        except ArtifactError as exc:
            raise ArtifactError(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}") from None
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path}: not a readable hub bank ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                f"expected an .npz written by training.evaluate --tune-hub") from None

    @classmethod
    def from_padded(cls, words: np.ndarray, lengths: np.ndarray, k: int, beta: float, record: dict | None = None,
                    **images) -> "HubBank":
        """From words [N, L, E] (anything past each length ignored) and lengths [N] (and, for the caption side,
        regions, objects, text_k, gamma)."""
        lengths = np.asarray(lengths, np.int64)
        real = np.arange(words.shape[1])[None, :] < lengths[:, None]
        if images.get("regions") is not None:
            images = {**images, "regions": np.asarray(images["regions"], np.float16), "objects": np.asarray(images["objects"], np.float16)}
        return cls(np.asarray(words)[real].astype(np.float16), lengths, int(k), float(beta), dict(record or {}), **images)
