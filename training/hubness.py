"""Hubness correction of the first stage (CSLS-style), fitted on the train split, tuned on dev.

    python -m training.hubness --checkpoint models/reference-shortlist --store STORE [--bank-images 2000]
        [--bank-texts 6000] [--neighbours 32] [--force]

In a dual encoder's joint space some items are "hubs": near to many queries, so they crowd the top of
many rankings. CSLS (Conneau et al. 2018, "Word translation without parallel data") and query-bank
normalisation (Bogolin et al. 2022) correct a score by how close the item is to everything:

    s'(image i, caption c) = cos(i, c) - beta_image * r(i) - beta_text * r(c)
    r(i) = mean of the `neighbours` highest cosines of image i with a fixed bank of train captions
    r(c) = the same for caption c against a bank of train images

For one query the query's own term is a constant, so each direction is corrected by the item's term
only (text-to-image by r(image), image-to-text by r(caption)), and one matrix serves both directions.
The correction folds into the vectors: image [v, -beta_image r(i), 1] . caption [t, 1, -beta_text r(c)]
= s', so a gallery is still ranked by one inner product (FAISS, the engine's matrix products) and the
exported shortlist graphs output the augmented vectors (K + 2 values). The bank is a seeded random
sample of the train split's vectors, never the split under test; beta_image / beta_text are chosen on
dev by the first stage's rsum alone (engine.ranking), 0 included, so on dev the correction never hurts.

Stored as CHECKPOINT/hubness.npz (float16 banks + the two betas and neighbours) beside a dual-encoder
checkpoint; training.checkpoint.load_checkpoint attaches it to the model (DualEncoder.hubness), and
score_matrix, training.evaluate and export's shortlist graphs apply it. Measured on Flickr8K test
(results/flickr8k): see README.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from engine.cli import ArgumentParser, command, positive_int
from engine.errors import ArtifactError, InputError
from engine.files import atomic_path
from training.checkpoint import HUBNESS

BETA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


class HubnessCorrection(nn.Module):
    """The correction as a module (torch, exportable: MatMul, TopK, ReduceMean, Concat)."""

    def __init__(self, bank_images: np.ndarray | Tensor, bank_texts: np.ndarray | Tensor, neighbours: int,
                 beta_image: float, beta_text: float):
        super().__init__()
        bank_images, bank_texts = torch.as_tensor(np.asarray(bank_images, np.float32)), torch.as_tensor(np.asarray(bank_texts, np.float32))
        if bank_images.dim() != 2 or bank_texts.dim() != 2 or bank_images.shape[1] != bank_texts.shape[1]:
            raise InputError(f"hubness banks: expected [B_img, K] and [B_txt, K] with one K, got {list(bank_images.shape)} "
                             f"and {list(bank_texts.shape)}")
        if not 1 <= neighbours <= min(len(bank_images), len(bank_texts)):
            raise InputError(f"hubness neighbours: expected 1..{min(len(bank_images), len(bank_texts))} (the bank sizes), got {neighbours}")
        for name, beta in (("beta_image", beta_image), ("beta_text", beta_text)):
            if not np.isfinite(beta) or beta < 0:
                raise InputError(f"hubness {name}: expected a finite number >= 0, got {beta!r}")
        self.register_buffer("bank_images", bank_images)
        self.register_buffer("bank_texts", bank_texts)
        self.neighbours, self.beta_image, self.beta_text = int(neighbours), float(beta_image), float(beta_text)

    @property
    def dim(self) -> int:
        return int(self.bank_images.shape[1])

    def _offset(self, vectors: Tensor, bank: Tensor) -> Tensor:
        sims = vectors @ bank.to(vectors.dtype).t()  # [N, B]
        return torch.topk(sims, self.neighbours, dim=1).values.mean(dim=1, keepdim=True)  # [N, 1]

    def offsets(self, image_vectors: Tensor | None = None, text_vectors: Tensor | None = None) -> tuple:
        """(r(images) [N_img], r(captions) [N_cap]) of raw first-stage vectors (None where not given)."""
        return (None if image_vectors is None else self._offset(image_vectors, self.bank_texts)[:, 0],
                None if text_vectors is None else self._offset(text_vectors, self.bank_images)[:, 0])

    def images(self, vectors: Tensor) -> Tensor:
        """[N, K] unit image vectors -> [N, K + 2]: [v, -beta_image r(v), 1]."""
        ones = torch.ones_like(vectors[:, :1])
        return torch.cat([vectors, -self.beta_image * self._offset(vectors, self.bank_texts), ones], dim=1)

    def texts(self, vectors: Tensor) -> Tensor:
        """[N, K] unit caption vectors -> [N, K + 2]: [t, 1, -beta_text r(t)]."""
        ones = torch.ones_like(vectors[:, :1])
        return torch.cat([vectors, ones, -self.beta_text * self._offset(vectors, self.bank_images)], dim=1)

    def record(self) -> dict:
        return {"bank_images": int(self.bank_images.shape[0]), "bank_texts": int(self.bank_texts.shape[0]),
                "neighbours": self.neighbours, "beta_image": self.beta_image, "beta_text": self.beta_text}

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, bank_images=self.bank_images.numpy().astype(np.float16),
                     bank_texts=self.bank_texts.numpy().astype(np.float16), neighbours=np.int64(self.neighbours),
                     beta_image=np.float64(self.beta_image), beta_text=np.float64(self.beta_text))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HubnessCorrection":
        path = Path(path)
        try:
            with np.load(path) as data:
                missing = sorted({"bank_images", "bank_texts", "neighbours", "beta_image", "beta_text"} - set(data.files))
                if missing:
                    raise ArtifactError(f"{path}: missing {missing}; expected a hubness file written by training.hubness")
                return cls(data["bank_images"].astype(np.float32), data["bank_texts"].astype(np.float32),
                           int(data["neighbours"]), float(data["beta_image"]), float(data["beta_text"]))
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path}: unreadable hubness file ({exc}); expected an .npz written by training.hubness") from exc
        except InputError as exc:
            raise ArtifactError(f"{path}: {exc}") from exc


def corrected_scores(image_vectors: np.ndarray, text_vectors: np.ndarray, offsets: tuple[np.ndarray, np.ndarray],
                     beta_image: float, beta_text: float) -> np.ndarray:
    """cos - beta_image r(image) - beta_text r(caption): [N_img, N_cap] float32."""
    return (image_vectors @ text_vectors.T - beta_image * offsets[0][:, None] - beta_text * offsets[1][None, :]).astype(np.float32)


@torch.no_grad()
def fit_hubness(checkpoint: str | os.PathLike, store: str | os.PathLike, bank_images: int = 2000, bank_texts: int = 6000,
                neighbours: int = 32, seed: int = 0, force: bool = False) -> dict:
    """Sample the banks from the train split, choose the betas on dev, write CHECKPOINT/hubness.npz; returns
    the record (betas, grid of dev rsums, first stage alone with and without the correction)."""
    from engine.ranking import FIRST_STAGE_ALONE, two_stage_metrics
    from engine.store import FeatureStore
    from training.checkpoint import ModelKind, load_checkpoint
    from training.evaluate import captions_per_image_of
    from training.mining import embed_split

    path = Path(checkpoint) / HUBNESS
    if path.exists() and not force:
        raise InputError(f"{path}: exists; expected a new file (pass --force to replace it)")
    ckpt = load_checkpoint(checkpoint)
    if ckpt.kind is not ModelKind.DUAL_ENCODER:
        raise InputError(f"--checkpoint {checkpoint}: expected a dual_encoder checkpoint (the first stage), got {ckpt.kind.value}")
    model, word_set = ckpt.model, ckpt.train_config.word_set
    features = FeatureStore(store)
    train_images, train_texts = embed_split(model, features.split("train"), word_set)
    rng = np.random.default_rng(seed)
    if bank_images > len(train_images) or bank_texts > len(train_texts):
        raise InputError(f"hubness banks: expected at most {len(train_images)} images and {len(train_texts)} captions "
                         f"(the train split), got {bank_images} and {bank_texts}")
    banks = (train_images[np.sort(rng.choice(len(train_images), bank_images, replace=False))],
             train_texts[np.sort(rng.choice(len(train_texts), bank_texts, replace=False))])
    dev = features.split("dev")
    per = captions_per_image_of(dev)
    images, texts = embed_split(model, dev, word_set)
    probe = HubnessCorrection(*banks, neighbours, 0.0, 0.0)
    offsets = tuple(o.numpy() for o in probe.offsets(torch.from_numpy(images), torch.from_numpy(texts)))
    grid = []
    for beta_image, beta_text in itertools.product(BETA_GRID, BETA_GRID):
        scores = corrected_scores(images, texts, offsets, beta_image, beta_text)
        metrics = two_stage_metrics(scores, None, None, per, FIRST_STAGE_ALONE)
        grid.append({"beta_image": beta_image, "beta_text": beta_text, "rsum": metrics["rsum"]})
    best = max(grid, key=lambda row: (row["rsum"], -row["beta_image"] - row["beta_text"]))
    correction = HubnessCorrection(*banks, neighbours, best["beta_image"], best["beta_text"])
    correction.save(path)
    return {**correction.record(), "seed": seed, "tuned_on": f"dev ({len(images)} images)", "dev_rsum": best["rsum"],
            "dev_rsum_uncorrected": grid[0]["rsum"], "grid": grid, "file": str(path)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m training.hubness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the first stage: a dual_encoder checkpoint directory")
    parser.add_argument("--store", required=True, help="feature store with train and dev splits")
    parser.add_argument("--bank-images", type=positive_int, default=2000, help="train images in the bank (default 2000)")
    parser.add_argument("--bank-texts", type=positive_int, default=6000, help="train captions in the bank (default 6000)")
    parser.add_argument("--neighbours", type=positive_int, default=32, help="bank neighbours averaged per item (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing hubness.npz")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    return parser.parse_args(argv)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = fit_hubness(args.checkpoint, args.store, args.bank_images, args.bank_texts, args.neighbours, args.seed, args.force)
    print(f"{record['file']}: beta_image {record['beta_image']} beta_text {record['beta_text']} "
          f"(banks {record['bank_images']} images / {record['bank_texts']} captions, {record['neighbours']} neighbours); "
          f"dev rsum of the first stage {record['dev_rsum_uncorrected']:.1f} -> {record['dev_rsum']:.1f}", file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
