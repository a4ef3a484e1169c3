"""The first stage (a trained dual encoder) as seen by BSSAN's trainer: hard negatives and dev scores.

    from training.mining import FirstStage
    first = FirstStage.load("runs/dual/best", store, run_dir)     # embeds the train split once (cached)
    mining = first.mining(train_config)                          # -> training.data.ImageBatches(mining=...)
    scores = first.scores(store.split("dev"))                    # [N_img, N_cap] cosines (dev protocol)

BSSAN re-ranks the first stage's top K at test time: near-duplicate scenes it never meets among random
negatives. Training negatives are therefore drawn, for a share `mined_fraction` of the picks, from the
first stage's top `mining_k` of the anchor (captions of other images for an image; other images for a
caption), with a false-negative guard: a mined caption whose first-stage text vector has cosine above
`mining_guard` with one of the anchor image's own captions is dropped (Flickr8K has many near-identical
captions: "a dog runs on the grass"), and so is a mined image whose image vector is that close to the
anchor's own image. Mining lists are a pure function of (checkpoint weights, store split, k, guard) and
cached in the run directory (`mined_<hash>.npz`), so a resumed run uses the same lists.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.errors import InputError
from engine.files import atomic_path

BLOCK = 512  # anchors per similarity block: 512 x 30,000 float32 = 61 MB
NEIGHBOUR_GROUP = 5  # with mining, an image batch is built of groups of this many first-stage neighbours, so the
                     # in-batch negative images (the other images of the batch) are near scenes, not random ones


@dataclass
class Mining:
    """Mined negative lists of one split; -1 pads rows with fewer than k survivors of the guard."""

    captions_of_image: np.ndarray  # [N_img, k] caption indices (other images' captions), hardest first
    images_of_caption: np.ndarray  # [N_cap, k] image indices (not the caption's own), hardest first
    fraction: float                # share of negative picks drawn from these lists
    image_vectors: np.ndarray      # [N_img, K] first-stage unit vectors (in-batch hardest image, groups)
    text_vectors: np.ndarray       # [N_cap, K]
    guard: float
    neighbours: np.ndarray         # [N_img, g] nearest other images by first-stage image vectors
    neighbour_share: float = 1.0   # share of batch seeds followed by their neighbours (TrainConfig.neighbour_share)

    def group_order(self, permutation: np.ndarray, group: int = NEIGHBOUR_GROUP,
                    rng: np.random.Generator | None = None) -> np.ndarray:
        """Every image once: walk `permutation`; each not-yet-placed image is followed by up to group-1
        of its not-yet-placed neighbours (with neighbour_share < 1, only a seed that draws below the share:
        `rng` decides, and is not drawn from at share 1, so those orders stay what they were)."""
        placed = np.zeros(len(permutation), dtype=bool)
        out = []
        for seed in permutation.tolist():
            if placed[seed]:
                continue
            followers = group - 1 if self.neighbour_share >= 1 or rng.random() < self.neighbour_share else 0
            members = [seed] + [n for n in self.neighbours[seed].tolist() if n >= 0 and not placed[n]][:followers]
            placed[members] = True
            out.extend(members)
        return np.asarray(out, dtype=np.int64)

    def hardest_in_batch(self, captions: np.ndarray, own: np.ndarray, images: np.ndarray) -> np.ndarray:
        """For each caption (own image row `own` [N] of `images`), the batch row of the other image that the
        first stage scores highest for it, skipping near-duplicates of the own image; -1 if none."""
        return self.ranked_in_batch(captions, own, images, 1)[:, 0]

    def ranked_in_batch(self, captions: np.ndarray, own: np.ndarray, images: np.ndarray, m: int) -> np.ndarray:
        """[N, m]: for each caption, the batch rows of the m other images the first stage scores highest for it
        (near-duplicates of the own image skipped), best first; -1 where fewer remain."""
        vectors = self.image_vectors[images]  # [B, K]
        sims = self.text_vectors[captions] @ vectors.T  # [N, B]
        near = (vectors @ vectors.T)[own] > self.guard  # [N, B]: includes the own image (cosine 1)
        sims[near] = -np.inf
        sims[np.arange(len(captions)), own] = -np.inf
        order = np.argsort(-sims, axis=1, kind="stable")[:, :m]  # [N, m]
        return np.where(np.isfinite(np.take_along_axis(sims, order, axis=1)), order, -1)

    def near_duplicates(self, images: np.ndarray, captions: np.ndarray, own: np.ndarray) -> np.ndarray:
        """[B, N] bool for a grid batch (`images` [B], their `captions` [N], `own` [N] the row of each caption's
        image): True where caption j belongs to another image yet is not a safe negative of image i, the guard of
        the mined lists applied in the batch: its first-stage text vector has cosine > guard with one of image
        i's own captions, or its image's vector has cosine > guard with image i's."""
        text = self.text_vectors[captions]  # [N, K]
        rows = np.arange(len(images))
        same = rows[:, None] == own[None, :]  # [B, N]
        caption_sims = text @ text.T  # [N, N]
        # for image i and caption j: the max over image i's own captions c of cos(c, j)
        near_text = np.stack([caption_sims[own == i].max(axis=0) if (own == i).any() else np.full(len(own), -np.inf)
                              for i in rows]) > self.guard  # [B, N]
        vectors = self.image_vectors[images]
        near_image = (vectors @ vectors.T)[:, own] > self.guard  # [B, N]
        return (near_text | near_image) & ~same

    def pick_caption_lists(self, images: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
        """[N, m]: for anchors of `images` [N], m DISTINCT mined captions drawn uniformly from each anchor's valid
        list (fewer when the list is shorter: -1 pads), each kept with probability `fraction` (else -1)."""
        rows = self.captions_of_image[images]  # [N, k], valid entries first
        keys = rng.random(rows.shape)
        keys[rows < 0] = np.inf  # invalid entries sort last
        picked = np.take_along_axis(rows, np.argsort(keys, axis=1)[:, :m], axis=1)  # [N, m]
        keep = rng.random(picked.shape) < self.fraction
        return np.where(keep & (picked >= 0), picked, -1)

    def pick_captions(self, images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """For anchors of `images` [N]: (mined caption [N] or -1, use_mined [N] bool), drawn with rng."""
        return self._pick(self.captions_of_image, images, rng)

    def _pick(self, table: np.ndarray, anchors: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        rows = table[anchors]  # [N, k]
        valid = rows >= 0
        counts = valid.sum(axis=1)
        choice = (rng.random(len(anchors)) * np.maximum(counts, 1)).astype(np.int64)  # uniform among the valid
        # valid entries come first in each row (lists are compacted), so index `choice` is a valid one
        picked = rows[np.arange(len(anchors)), np.minimum(choice, rows.shape[1] - 1)]
        use = (rng.random(len(anchors)) < self.fraction) & (counts > 0)
        return np.where(use, picked, -1), use


def _top(scores: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m highest finite scores, highest first (ties by index)."""
    finite = np.flatnonzero(np.isfinite(scores))
    if len(finite) > m:
        finite = finite[np.argpartition(-scores[finite], m - 1)[:m]]
    return finite[np.lexsort((finite, -scores[finite]))]


def _compact(rows: list[np.ndarray], k: int) -> np.ndarray:
    out = np.full((len(rows), k), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : min(k, len(row))] = row[:k]
    return out


def mine(image_vectors: np.ndarray, text_vectors: np.ndarray, caption_image: np.ndarray, k: int, guard: float
         ) -> tuple[np.ndarray, np.ndarray]:
    """(captions_of_image [N_img, k], images_of_caption [N_cap, k]) from unit vectors (module docstring)."""
    n_img, n_cap = len(image_vectors), len(text_vectors)
    by_image = [np.flatnonzero(caption_image == i) for i in range(n_img)]
    captions_of_image = []
    for start in range(0, n_img, BLOCK):
        sims = image_vectors[start:start + BLOCK] @ text_vectors.T  # [b, N_cap]
        for row, i in enumerate(range(start, min(start + BLOCK, n_img))):
            s = sims[row].copy()
            s[by_image[i]] = -np.inf
            top = _top(s, 4 * k)  # spare candidates for the guard to drop
            near = (text_vectors[top] @ text_vectors[by_image[i]].T).max(axis=1) > guard  # [4k]
            captions_of_image.append(top[~near])
    images_of_caption = []
    for start in range(0, n_cap, BLOCK):
        sims = text_vectors[start:start + BLOCK] @ image_vectors.T  # [b, N_img]
        for row, c in enumerate(range(start, min(start + BLOCK, n_cap))):
            own = caption_image[c]
            s = sims[row].copy()
            s[own] = -np.inf
            top = _top(s, 2 * k)
            near = image_vectors[top] @ image_vectors[own] > guard
            images_of_caption.append(top[~near])
    return _compact(captions_of_image, k), _compact(images_of_caption, k)


def image_neighbours(image_vectors: np.ndarray, k: int) -> np.ndarray:
    """[N_img, k] nearest other images by cosine of first-stage image vectors, nearest first."""
    out = []
    for start in range(0, len(image_vectors), BLOCK):
        sims = image_vectors[start:start + BLOCK] @ image_vectors.T  # [b, N_img]
        sims[np.arange(sims.shape[0]), np.arange(start, start + sims.shape[0])] = -np.inf
        out.append(_compact([_top(row, k) for row in sims], k))
    return np.concatenate(out).astype(np.int64)


class FirstStage:
    """A dual-encoder checkpoint with its train-split vectors (cached in the BSSAN run directory)."""

    def __init__(self, directory: Path, checkpoint, weights_sha256: str, image_vectors: np.ndarray,
                 text_vectors: np.ndarray, caption_image: np.ndarray, cache_dir: Path, inputs=None):
        self.directory, self.checkpoint, self.weights_sha256 = directory, checkpoint, weights_sha256
        self.image_vectors, self.text_vectors, self.caption_image = image_vectors, text_vectors, caption_image
        self.cache_dir = cache_dir
        self.inputs = inputs  # its own feature store (TrainConfig.first_stage_store), or None: the training store's splits
        self._dev_scores: dict[str, np.ndarray] = {}

    @classmethod
    def load(cls, directory: str | os.PathLike, store, run_dir: Path, inputs=None) -> "FirstStage":
        """The checkpoint and its train-split vectors; `inputs`: the first stage's own feature store (same images,
        captions and splits as `store`, another extractor), read instead of `store` for everything it scores."""
        from training.checkpoint import ModelKind, first_stage_sha256, load_checkpoint

        directory = Path(directory)
        checkpoint = load_checkpoint(directory)
        if checkpoint.kind is not ModelKind.DUAL_ENCODER:
            raise InputError(f"first_stage {directory}: expected a dual_encoder checkpoint, got {checkpoint.kind.value}")
        checkpoint.model.eval()
        split = store.split("train") if inputs is None else aligned_split(inputs, store.split("train"))
        word_set = checkpoint.train_config.word_set
        if word_set not in split.word_sets:
            raise InputError(f"first_stage {directory}: it reads words_{word_set}, the store's train split has {split.word_sets}")
        weights = first_stage_sha256(directory)
        cache = Path(run_dir) / f"first_stage_{weights[:12]}.npz"
        if cache.is_file():
            with np.load(cache) as data:
                images, texts = data["images"], data["texts"]
        else:
            images, texts = embed_split(checkpoint.model, split, word_set)
            with atomic_path(cache) as tmp, open(tmp, "wb") as handle:  # a handle: np.savez would append .npz
                np.savez(handle, images=images, texts=texts)
        return cls(directory, checkpoint, weights, images, texts, np.asarray(split.caption_image, dtype=np.int64),
                   Path(run_dir), inputs)

    def mining(self, config) -> Mining:
        key = hashlib.sha256(f"{self.weights_sha256}:{config.mining_k}:{config.mining_guard}".encode()).hexdigest()[:12]
        cache = self.cache_dir / f"mined_{key}.npz"
        if cache.is_file():
            with np.load(cache) as data:
                captions, images = data["captions_of_image"], data["images_of_caption"]
        else:
            captions, images = mine(self.image_vectors, self.text_vectors, self.caption_image, config.mining_k,
                                    config.mining_guard)
            with atomic_path(cache) as tmp, open(tmp, "wb") as handle:
                np.savez(handle, captions_of_image=captions, images_of_caption=images)
        return Mining(captions, images, config.mined_fraction, self.image_vectors, self.text_vectors, config.mining_guard,
                      image_neighbours(self.image_vectors, NEIGHBOUR_GROUP * 2), config.neighbour_share)

    def scores(self, split) -> np.ndarray:
        """The first stage's scores [N_img, N_cap] of a split, as the product ranks by them: cosines, minus the
        hubness offsets when the checkpoint carries a correction (cached per split name for the run)."""
        if split.name not in self._dev_scores:  # DualEncoder.score_matrix: the correction applied when attached
            from training.evaluate import score_split

            own = split if self.inputs is None else aligned_split(self.inputs, split)
            self._dev_scores[split.name] = score_split(self.checkpoint.model, own, self.checkpoint.train_config.word_set)
        return self._dev_scores[split.name]


def aligned_split(inputs, split):
    """inputs.split(split.name), checked to hold the same images and captions in the same order as `split` (another
    extractor's store of the same data); else a one-line InputError naming both stores."""
    own = inputs.split(split.name)
    same = own.num_images == split.num_images and np.array_equal(np.asarray(own.caption_image), np.asarray(split.caption_image)) \
        and np.array_equal(np.asarray(own.lengths), np.asarray(split.lengths))
    if not same:
        raise InputError(f"first_stage_store {inputs.root}: its {split.name} split ({own.num_images} images, "
                         f"{len(own.caption_image)} captions) is not the training store's ({split.num_images} images, "
                         f"{len(split.caption_image)} captions, same order and lengths expected)")
    return own


@torch.no_grad()
def embed_split(model, split, word_set: str, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (images [N_img, K], captions [N_cap, K]) float32 of a split by a dual encoder."""
    lengths = np.asarray(split.lengths)
    images = [model.embed_images(np.asarray(split.regions[i:i + block], dtype=np.float32),
                                 np.asarray(split.objects[i:i + block], dtype=np.float32)).numpy()
              for i in range(0, split.num_images, block)]
    words = split.words(word_set)
    texts = []
    for j in range(0, len(lengths), block):
        part = lengths[j:j + block]
        texts.append(model.embed_texts(np.asarray(words[j:j + block], dtype=np.float32)[:, : int(part.max())], part).numpy())
    return np.concatenate(images).astype(np.float32), np.concatenate(texts).astype(np.float32)
