"""Training batches from a feature-store split: positive pairs, sampled negatives, float32 tensors.

    from training.data import PairBatches, read_images, read_captions
    batches = PairBatches(store.split("train"), "glove50", batch_size=128, seed=0, negative_images=True)
    for index in range(batches.num_batches):
        batch = batches.batch(epoch, index)    # Batch: regions, objects, words, lengths, negatives ...

An epoch visits every caption of the split once as the positive (image, caption) pair, in an
order shuffled by a generator seeded with (seed, epoch). Each batch draws one negative caption
per positive (never a caption of the same image, training.loss.sample_negative_captions; off
for in-batch losses) and, if asked, one negative image per positive, from a generator seeded with (seed, epoch, batch).
So batch (epoch, index) is a pure function of the seed: a resumed run needs only its position.

Arrays are float16 memory maps; only the rows of a batch are read (sorted, each once), turned
into float32 tensors and checked for NaN/inf, naming the array file and the store row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from engine.errors import StoreError
from engine.store import SplitFeatures, check_finite
from training.loss import sample_negative_captions, sample_negative_images


@dataclass
class Batch:
    image_ids: Tensor     # [B] split index of each positive pair's image
    caption_ids: Tensor   # [B] split index of each positive pair's caption
    regions: Tensor       # [B, D, M] images of the positive pairs
    objects: Tensor       # [B, P, Q]
    words: Tensor         # [B, L_b, E] positive captions, L_b = longest in the batch
    lengths: Tensor       # [B]
    negative_words: Tensor | None = None    # [B, L_n, E] one caption of another image per pair
    negative_lengths: Tensor | None = None  # [B]
    negative_regions: Tensor | None = None  # [B, D, M] one other image per pair (negative_images)
    negative_objects: Tensor | None = None  # [B, P, Q]

    def __len__(self) -> int:
        return int(self.caption_ids.shape[0])


def _read_rows(split: SplitFeatures, name: str, array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32 copy of array[rows] reading each distinct row once in file order; NaN/inf is a
    StoreError naming the file and the store row."""
    unique, inverse = np.unique(rows, return_inverse=True)
    block = np.asarray(array[unique], dtype=np.float32)  # [U, ...]
    if not np.isfinite(block).all():
        first = int(np.argwhere(~np.isfinite(block))[0][0])
        check_finite(block[first], f"{split.root / split.name / (name + '.npy')} row {int(unique[first])}")
    return block[inverse]


def read_images(split: SplitFeatures, rows: np.ndarray) -> tuple[Tensor, Tensor]:
    """(regions [N, D, M], objects [N, P, Q]) float32 of the split's images `rows`."""
    return (torch.from_numpy(_read_rows(split, "regions", split.regions, rows)),
            torch.from_numpy(_read_rows(split, "objects", split.objects, rows)))


def read_captions(split: SplitFeatures, word_set: str, rows: np.ndarray, lengths: np.ndarray | None = None) -> tuple[Tensor, Tensor]:
    """(words [N, L_b, E] float32 trimmed to the longest of them, lengths [N] int64) of captions `rows`."""
    lengths = np.asarray(split.lengths if lengths is None else lengths)[rows].astype(np.int64)
    words = _read_rows(split, f"words_{word_set}", split.words(word_set), rows)
    return torch.from_numpy(words[:, : int(lengths.max())]), torch.from_numpy(lengths)


class PairBatches:
    """Deterministic shuffled batches of positive pairs with sampled negatives (see module docstring)."""

    def __init__(self, split: SplitFeatures, word_set: str, batch_size: int, seed: int,
                 negative_captions: bool = True, negative_images: bool = False):
        self.split, self.word_set, self.batch_size, self.seed = split, word_set, batch_size, seed
        self.negative_captions, self.negative_images = negative_captions, negative_images
        self.caption_image = np.asarray(split.caption_image, dtype=np.int64)  # [N_cap], small: read once
        self.lengths = np.asarray(split.lengths, dtype=np.int64)
        self.num_images = split.num_images
        split.words(word_set)  # fail now, naming the file, if the word set is absent
        if len(self.caption_image) < 2 or np.unique(self.caption_image).size < 2:
            raise StoreError(f"{split.root / split.name}: expected captions of at least 2 images to train on, "
                             f"got {len(self.caption_image)} captions of {np.unique(self.caption_image).size} image(s)")

    @property
    def num_pairs(self) -> int:
        return len(self.caption_image)

    @property
    def num_batches(self) -> int:
        # a final batch of a single pair is dropped: BatchNorm cannot train on one row
        full, rest = divmod(self.num_pairs, self.batch_size)
        return full + (rest >= 2)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of caption indices."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs)

    def batch(self, epoch: int, index: int, order: np.ndarray | None = None) -> Batch:
        """Batch `index` of `epoch` (pass the epoch's `order` to avoid recomputing it)."""
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} of an epoch of {self.num_batches}")
        order = self.order(epoch) if order is None else order
        captions = order[index * self.batch_size:(index + 1) * self.batch_size]
        images = self.caption_image[captions]
        rng = np.random.default_rng([self.seed, epoch, index])
        regions, objects = read_images(self.split, images)
        words, lengths = read_captions(self.split, self.word_set, captions, self.lengths)
        batch = Batch(torch.from_numpy(images), torch.from_numpy(captions), regions, objects, words, lengths)
        if self.negative_captions:
            negatives = sample_negative_captions(self.caption_image, rng, anchors=captions)
            batch.negative_words, batch.negative_lengths = read_captions(self.split, self.word_set, negatives, self.lengths)
        if self.negative_images:
            other = sample_negative_images(self.caption_image, self.num_images, rng, anchors=captions)
            batch.negative_regions, batch.negative_objects = read_images(self.split, other)
        return batch


# ---------------------------------------------------------------------------------------------
# Image-grouped batches (TrainConfig.batch_images > 0)


@dataclass
class GroupedBatch:
    """B_img images with ALL their captions as positives. Pairs are listed, not aligned: pair n is
    (image pair_image[n], caption pair_text[n]) of this batch's images and captions. The first
    `positives` pairs are the positives; each negative kind follows as `positives` more pairs,
    row i of a kind being the negative of positive i (a sampled caption of another image, then,
    with negative images, another image OF THE BATCH with positive i's caption)."""

    image_ids: Tensor     # [B_img] split index of each image
    caption_ids: Tensor   # [N_pos] split index of each positive caption (grouped image by image)
    regions: Tensor       # [B_img, D, M]
    objects: Tensor       # [B_img, P, Q]
    words: Tensor         # [N_txt, L_b, E] the positive captions, then the sampled negative captions
    lengths: Tensor       # [N_txt]
    pair_image: Tensor    # [N_pair] row of regions/objects
    pair_text: Tensor     # [N_pair] row of words/lengths
    kinds: int            # 1 (positives) + number of negative kinds; N_pair = kinds * N_pos
    first_stage: Tensor | None = None  # [N_pair] the first stage's cosine of each pair (with a first stage)
    caption_kinds: int = 1  # how many of the negative kinds are captions (they come first; the rest are images)
    ignore: Tensor | None = None  # grid batches with a first stage: [B_img, N_pos] True where caption j, of another
                                  # image, is a near-duplicate of image i's (masked out of the grid loss)

    def __len__(self) -> int:
        return int(self.caption_ids.shape[0])

    @property
    def negative(self) -> Tensor:
        """[N_pair] bool: True at negative pairs (the uniform-attention rule applies to them)."""
        return torch.arange(self.kinds * len(self)) >= len(self)


class ImageBatches:
    """Deterministic shuffled batches of `batch_images` images, each with every caption of its
    image as a positive pair, so each image is encoded once (W2R's G = R W_ih_u^T) for all of its
    pairs. An epoch visits every image once (so every caption once as a positive), in an order
    seeded by (seed, epoch); negatives come from a generator seeded by (seed, epoch, batch), so
    batch (epoch, index) is a pure function of the seed, like PairBatches."""

    def __init__(self, split: SplitFeatures, word_set: str, batch_images: int, seed: int,
                 negative_captions: bool = True, negative_images: bool = False, mining=None, negatives_per_kind: int = 1,
                 grid: bool = False):
        self.split, self.word_set, self.batch_images, self.seed = split, word_set, batch_images, seed
        self.grid = grid  # no sampled negatives: the step scores every image x caption of the batch (loss=grid)
        self.negatives_per_kind = negatives_per_kind  # m negatives of each kind per positive (m kinds of each)
        self.negative_captions, self.negative_images = negative_captions, negative_images
        self.mining = mining  # training.mining.Mining: first-stage hard negatives and neighbour-grouped batches
        self.caption_image = np.asarray(split.caption_image, dtype=np.int64)  # [N_cap]
        self.lengths = np.asarray(split.lengths, dtype=np.int64)
        self.num_images = split.num_images
        split.words(word_set)  # fail now, naming the file, if the word set is absent
        if batch_images < 2 or self.num_images < 2:
            raise StoreError(f"{split.root / split.name}: expected batches of >= 2 images from >= 2 images, "
                             f"got batch_images={batch_images} and {self.num_images} image(s)")
        self._by_image = np.argsort(self.caption_image, kind="stable")  # caption indices grouped by image
        self._starts = np.searchsorted(self.caption_image[self._by_image], np.arange(self.num_images + 1))

    @property
    def num_pairs(self) -> int:
        return len(self.caption_image)

    @property
    def num_batches(self) -> int:
        # a final batch of a single image is dropped: it has no other image to draw negatives from
        full, rest = divmod(self.num_images, self.batch_images)
        return full + (rest >= 2)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of image indices (with mining: grouped by first-stage neighbours)."""
        permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_images)
        if self.mining is None or self.mining.fraction <= 0:
            return permutation
        return self.mining.group_order(permutation, rng=np.random.default_rng([self.seed, epoch, 1]))

    def batch_pairs(self, epoch: int, index: int, order: np.ndarray | None = None) -> int:
        """Positive pairs of batch `index` (for progress counts) without reading features."""
        images = self._images(epoch, index, order)
        return int((self._starts[images + 1] - self._starts[images]).sum())

    def _images(self, epoch: int, index: int, order: np.ndarray | None) -> np.ndarray:
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} of an epoch of {self.num_batches}")
        order = self.order(epoch) if order is None else order
        return order[index * self.batch_images:(index + 1) * self.batch_images]

    def batch(self, epoch: int, index: int, order: np.ndarray | None = None) -> GroupedBatch:
        """Batch `index` of `epoch` (pass the epoch's `order` to avoid recomputing it)."""
        images = self._images(epoch, index, order)
        groups = [self._by_image[self._starts[i]:self._starts[i + 1]] for i in images]
        captions = np.concatenate(groups)  # [N_pos]
        local = np.repeat(np.arange(len(images)), [len(g) for g in groups])  # [N_pos] row of each positive's image
        rng = np.random.default_rng([self.seed, epoch, index])
        texts, pair_image, pair_text = [captions], [local], [np.arange(len(captions))]
        m = self.negatives_per_kind
        if self.grid:
            pass  # the batch's other images and captions are the negatives (training.loss.grid_listwise)
        elif m > 1:
            self._negative_lists(images, captions, local, rng, texts, pair_image, pair_text)
        elif self.negative_captions:
            negatives = sample_negative_captions(self.caption_image, rng, anchors=captions)
            if self.mining is not None and self.mining.fraction > 0:  # a share from the first stage's top-k of the anchor
                mined, use = self.mining.pick_captions(images[local], rng)
                negatives = np.where(use, mined, negatives)
            texts.append(negatives)
            pair_image.append(local)
            pair_text.append(len(captions) + np.arange(len(captions)))
        if self.negative_images and m == 1 and not self.grid:
            picks = rng.integers(0, len(images) - 1, size=len(captions))
            picks = picks + (picks >= local)  # another image of the batch
            if self.mining is not None and self.mining.fraction > 0:  # a share: the batch image the first stage ranks highest
                hardest = self.mining.hardest_in_batch(captions, local, images)
                use = (rng.random(len(captions)) < self.mining.fraction) & (hardest >= 0)
                picks = np.where(use, hardest, picks)
            pair_image.append(picks)
            pair_text.append(np.arange(len(captions)))
        regions, objects = read_images(self.split, images)
        text_ids = np.concatenate(texts)  # [N_txt] split caption index of each text row
        words, lengths = read_captions(self.split, self.word_set, text_ids, self.lengths)
        kinds = len(pair_image)
        pair_image, pair_text = np.concatenate(pair_image), np.concatenate(pair_text)
        first = None
        if self.mining is not None:  # the first stage's cosine of each pair (residual training)
            first = torch.from_numpy(np.einsum("nk,nk->n", self.mining.image_vectors[images[pair_image]],
                                               self.mining.text_vectors[text_ids[pair_text]]).astype(np.float32))
        ignore = None
        if self.grid and self.mining is not None:
            ignore = torch.from_numpy(self.mining.near_duplicates(images, captions, local))
        return GroupedBatch(torch.from_numpy(images), torch.from_numpy(captions), regions, objects, words, lengths,
                            torch.from_numpy(pair_image), torch.from_numpy(pair_text), kinds=kinds,
                            first_stage=first, caption_kinds=0 if self.grid else m if self.negative_captions else 0,
                            ignore=ignore)

    def _negative_lists(self, images: np.ndarray, captions: np.ndarray, local: np.ndarray, rng: np.random.Generator,
                        texts: list, pair_image: list, pair_text: list) -> None:
        """negatives_per_kind = m > 1: m caption kinds, then (negative_images) m image kinds, appended in place.
        Captions: a positive's m negatives are other images' captions; mined ones (a share
        mined_fraction, distinct, from the first stage's list of the anchor image) fill their slots first, the
        rest are uniform. Images: m distinct other images of the batch; with mining, each of the first stage's m
        highest in-batch images is kept with probability mined_fraction, uniform other images fill the rest."""
        n, m = len(captions), self.negatives_per_kind
        if self.negative_captions:
            lists = np.stack([sample_negative_captions(self.caption_image, rng, anchors=captions) for _ in range(m)], 1)
            if self.mining is not None and self.mining.fraction > 0:
                mined = self.mining.pick_caption_lists(images[local], m, rng)  # [n, m], -1 where not used
                lists = np.where(mined >= 0, mined, lists)
            for j in range(m):
                texts.append(lists[:, j])
                pair_image.append(local)
                pair_text.append(n * (len(texts) - 1) + np.arange(n))  # text rows of this kind
        if self.negative_images:
            others = len(images) - 1
            if others < m:
                raise StoreError(f"{self.split.root / self.split.name}: negatives_per_kind={m} images need batches of "
                                 f"more than {m} images, got {len(images)}")
            keys = rng.random((n, len(images)))  # uniform order of the other images per positive
            if self.mining is not None and self.mining.fraction > 0:
                ranked = self.mining.ranked_in_batch(captions, local, images, m)  # [n, m] or -1
                use = (rng.random((n, m)) < self.mining.fraction) & (ranked >= 0)
                rows = np.repeat(np.arange(n)[:, None], m, axis=1)
                keys[rows[use], ranked[use]] = -1.0  # the kept mined images come first
            keys[np.arange(n), local] = np.inf  # never the own image
            picks = np.argsort(keys, axis=1, kind="stable")[:, :m]  # [n, m] distinct other images
            for j in range(m):
                pair_image.append(picks[:, j])
                pair_text.append(np.arange(n))


# ---------------------------------------------------------------------------------------------
# Input scales (ModelConfig.input_scaling)

SCALE_SAMPLE = 2000  # images (and 5x as many captions) read to estimate the scales: +-1% on Flickr8K, seconds


def input_scales(split: SplitFeatures, word_set: str, sample: int = SCALE_SAMPLE, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-channel scales 1 / RMS of the split's regions [M], objects [Q] (real boxes only: all-zero
    padding rows are skipped) and words [E] (real words only), from a fixed sample of the split.
    Multiplying a feature by its scale gives every channel unit second moment, so 1280-d ReLU6 image
    features no longer swamp 384-d word vectors in the LSTM gates and O2W's first layer. RMS, not
    standard deviation: a per-channel scale folds exactly into the first linear maps at export,
    a mean shift would not (it passes through tanh/softmax)."""
    rng = np.random.default_rng(seed)
    images = np.sort(rng.choice(split.num_images, size=min(sample, split.num_images), replace=False))
    regions = np.asarray(split.regions[images], dtype=np.float64)  # [S, D, M]
    objects = np.asarray(split.objects[images], dtype=np.float64).reshape(-1, split.objects.shape[2])  # [S*P, Q]
    objects = objects[np.abs(objects).sum(axis=1) > 0]
    n_cap = len(split.lengths)
    captions = np.sort(rng.choice(n_cap, size=min(5 * sample, n_cap), replace=False))
    words = np.asarray(split.words(word_set)[captions], dtype=np.float64)  # [S, L, E]
    real = np.arange(words.shape[1])[None, :] < np.asarray(split.lengths)[captions][:, None]  # [S, L]

    def scale(values: np.ndarray, what: str) -> np.ndarray:
        if values.size == 0:
            raise StoreError(f"{split.root / split.name}: no {what} to estimate input scales from")
        rms = np.sqrt(np.mean(values ** 2, axis=0))
        return (1.0 / np.maximum(rms, 1e-3 * max(rms.max(), 1e-12))).astype(np.float32)  # dead channels: bounded scale

    return {"regions": scale(regions.reshape(-1, regions.shape[2]), "regions"),
            "objects": scale(objects, "real objects"),
            "words": scale(words[real], "words")}
