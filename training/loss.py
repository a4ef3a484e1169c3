"""The BSSAN training loss (eq. 7, 17, 18) and the negative samplers.

    from training.loss import bssan_loss, sample_negative_captions
    neg = sample_negative_captions(caption_image, rng, anchors=batch_captions)   # never the same image
    pos = model(R[img], O[img], T[cap], len[cap])                                 # (Y, Y') [N]
    negc = model(R[img], O[img], T[neg], len[neg], negative=True)
    terms = bssan_loss(model, pos, [negc], margin=0.2)
    terms.total.backward(); print(terms.as_floats())

L = w_Y * L1 + w_Y' * L2 + delta * L_reg, with (w_Y, w_Y') = config.branch_weights ((1, lambda) for
the full model) and delta = config.effective_reg_weight (0 for no_reg).
L1 (eq. 7) = sum_i max(0, margin - Y(V_i, T_i) + Y(V_i, T_i^-)); L2 (eq. 17) the same with Y'.
Each extra kind of negative (a sampled image for each caption, or the hardest in the batch) adds
its own hinge sum against the same positives.

L_reg (eq. 18, "the squared L2 norm of the weights") is taken over WEIGHT MATRICES only:
every parameter with 2+ dimensions (Linear weights, LSTM W_ih/W_hh, the bilinear W and W').
Biases, the scalar attention biases and BatchNorm's scale/shift are excluded: they add no
capacity to overfit with, and pulling BatchNorm's scale to 0 would shrink the activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from engine.errors import InputError
from training.config import Reduction

Scores = tuple[Tensor, Tensor]  # (Y, Y') of a set of pairs, [N] each


@dataclass
class LossTerms:
    total: Tensor
    w2r: Tensor  # L1, summed over every kind of negative
    o2w: Tensor  # L2
    reg: Tensor  # L_reg (before delta)

    def as_floats(self) -> dict[str, float]:
        return {"loss": self.total.detach().item(), "l1": self.w2r.detach().item(),
                "l2": self.o2w.detach().item(), "reg": self.reg.detach().item()}


def hinge(positive: Tensor, negative: Tensor, margin: float, reduction: Reduction = Reduction.SUM) -> Tensor:
    """sum (or mean) over pairs of max(0, margin - positive + negative); positive, negative [N]."""
    if positive.shape != negative.shape:
        raise InputError(f"hinge: positive and negative scores must have one shape, got {list(positive.shape)} and {list(negative.shape)}")
    terms = torch.relu(margin - positive + negative)
    return terms.sum() if reduction is Reduction.SUM else terms.mean()


def weight_penalty(model: nn.Module) -> Tensor:
    """L_reg: sum of squared entries of every weight matrix (parameters with 2+ dims)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    return sum((p.pow(2).sum() for p in matrices), torch.zeros((), dtype=matrices[0].dtype, device=matrices[0].device))


def bssan_loss(model: nn.Module, positive: Scores, negatives: Sequence[Scores], margin: float,
               reduction: Reduction = Reduction.SUM) -> LossTerms:
    """L = w_Y L1 + w_Y' L2 + delta L_reg for a BSSAN `model` (it gives config and weights).

    positive: (Y, Y') [N] of the matched pairs; negatives: one (Y, Y') [N] per kind of negative,
    row i being the negative of positive i (a sampled caption of another image, an image of
    another caption, or a hardest in-batch pick).
    """
    if not negatives:
        raise InputError("bssan_loss: expected at least one kind of negative scores, got none")
    y, y_prime = positive
    l1 = sum(hinge(y, neg_y, margin, reduction) for neg_y, _ in negatives)
    l2 = sum(hinge(y_prime, neg_yp, margin, reduction) for _, neg_yp in negatives)
    reg = weight_penalty(model)
    w_y, w_yp = model.config.branch_weights
    total = w_y * l1 + w_yp * l2 + model.config.effective_reg_weight * reg
    return LossTerms(total=total, w2r=l1, o2w=l2, reg=reg)


def listwise(positive: Tensor, negatives: Sequence[Tensor], temperature: float,
             reduction: Reduction = Reduction.MEAN) -> Tensor:
    """Softmax cross-entropy of each positive against its negatives: -log softmax([pos, neg_1..neg_m] / T)[0],
    summed or averaged over the positives; positive [N], each negative [N]."""
    logits = torch.stack([positive, *negatives], dim=1) / temperature  # [N, 1 + m]
    terms = -torch.log_softmax(logits, dim=1)[:, 0]
    return terms.sum() if reduction is Reduction.SUM else terms.mean()


def bssan_listwise_loss(model: nn.Module, positive: Scores, caption_negatives: Sequence[Scores],
                        image_negatives: Sequence[Scores], temperature: float,
                        reduction: Reduction = Reduction.MEAN) -> LossTerms:
    """L = w_Y (CE_captions(Y) + CE_images(Y)) + w_Y' (the same on Y') + delta L_reg: each branch's positive
    against its caption negatives in one softmax, and against its image negatives in another (an empty kind
    adds nothing). The negatives are the first stage's candidates (training.data.ImageBatches with
    negatives_per_kind > 1), so BSSAN learns to order the lists it will re-rank."""
    if not caption_negatives and not image_negatives:
        raise InputError("bssan_listwise_loss: expected at least one kind of negative scores, got none")
    losses = []
    for branch in (0, 1):
        terms = [listwise(positive[branch], [neg[branch] for neg in kind], temperature, reduction)
                 for kind in (caption_negatives, image_negatives) if kind]
        losses.append(sum(terms))
    reg = weight_penalty(model)
    w_y, w_yp = model.config.branch_weights
    total = w_y * losses[0] + w_yp * losses[1] + model.config.effective_reg_weight * reg
    return LossTerms(total=total, w2r=losses[0], o2w=losses[1], reg=reg)


def grid_listwise(scores: Tensor, own: Tensor, ignore: Tensor | None, temperature: float,
                  reduction: Reduction = Reduction.MEAN) -> Tensor:
    """InfoNCE over a batch grid, both directions: scores [B_img, N_cap] of every image x caption, own [N_cap] the
    row of each caption's image, ignore [B_img, N_cap] bool (or None) pairs that are neither positive nor negative
    (near-duplicates). Per caption j of image i = own[j]:
        text -> image: -log softmax over the batch's images of column j, at row i;
        image -> text: -log softmax over [caption j; every caption of another image] of row i, at caption j
    (the other captions of image i are positives too, so they are left out of j's softmax). Terms summed over the
    two directions, then summed or averaged over the captions."""
    logits = scores / temperature
    columns = torch.arange(scores.shape[1], device=scores.device)
    positive = logits[own, columns]  # [N_cap]
    negative = torch.arange(scores.shape[0], device=scores.device)[:, None] != own[None, :]  # [B_img, N_cap]
    if ignore is not None:
        negative = negative & ~ignore
    masked = logits.masked_fill(~negative, float("-inf"))
    to_image = torch.logaddexp(positive, torch.logsumexp(masked, dim=0)) - positive  # [N_cap]
    to_text = torch.logaddexp(positive, torch.logsumexp(masked, dim=1)[own]) - positive  # [N_cap]
    terms = to_image + to_text
    return terms.sum() if reduction is Reduction.SUM else terms.mean()


def bssan_grid_loss(model: nn.Module, grid: Scores, own: Tensor, ignore: Tensor | None, temperature: float,
                    reduction: Reduction = Reduction.MEAN) -> LossTerms:
    """L = w_Y grid_listwise(Y) + w_Y' grid_listwise(Y') + delta L_reg on a batch grid (Y, Y') [B_img, N_cap]."""
    losses = [grid_listwise(g, own, ignore, temperature, reduction) for g in grid]
    reg = weight_penalty(model)
    w_y, w_yp = model.config.branch_weights
    total = w_y * losses[0] + w_yp * losses[1] + model.config.effective_reg_weight * reg
    return LossTerms(total=total, w2r=losses[0], o2w=losses[1], reg=reg)


def hardest_in_batch(grid: Scores, same_image: Tensor, negative_images: bool = False) -> tuple[Scores, list[Scores]]:
    """Positives and hardest negatives from a batch grid (BSSAN.forward_grid).

    grid: (Y, Y') [B, B], row = image of pair i, column = caption of pair j, diagonal = positives.
    same_image [B, B] bool: True where image i and caption j match (these are never negatives).
    Returns (positive (Y, Y') [B], [hardest caption per image] (+ [hardest image per caption] if
    negative_images)). Each branch takes its own hardest negative (max of Y for L1, of Y' for L2).
    A row with no negative at all gets -inf, whose hinge term is 0.
    """
    positive = tuple(g.diagonal() for g in grid)
    masked = [g.masked_fill(same_image, float("-inf")) for g in grid]  # [B, B] each
    negatives = [(masked[0].max(dim=1).values, masked[1].max(dim=1).values)]  # hardest caption per image
    if negative_images:
        negatives.append((masked[0].max(dim=0).values, masked[1].max(dim=0).values))  # hardest image per caption
    return positive, negatives


# ---------------------------------------------------------------------------------------------
# Negative sampling (numpy: the trainer samples indices, the model sees only the batches)


def _anchors_of(caption_image: np.ndarray, anchors: np.ndarray | None) -> np.ndarray:
    return np.arange(len(caption_image)) if anchors is None else np.asarray(anchors, dtype=np.int64)


def sample_negative_captions(caption_image: np.ndarray, rng: np.random.Generator,
                             anchors: np.ndarray | None = None) -> np.ndarray:
    """For each anchor caption (default: every caption), a caption index whose image differs from
    the anchor's, uniform over all such captions. caption_image [N_cap] -> [N_anchor] int64."""
    caption_image = np.asarray(caption_image)
    anchors = _anchors_of(caption_image, anchors)
    if np.unique(caption_image).size < 2:
        raise InputError(f"caption_image: expected captions of at least 2 images to sample negatives from, got {np.unique(caption_image).size}")
    picks = rng.integers(0, len(caption_image), size=len(anchors))
    clash = caption_image[picks] == caption_image[anchors]
    while clash.any():  # rejection keeps the draw uniform over the other images' captions
        picks[clash] = rng.integers(0, len(caption_image), size=int(clash.sum()))
        clash = caption_image[picks] == caption_image[anchors]
    return picks


def sample_negative_images(caption_image: np.ndarray, num_images: int, rng: np.random.Generator,
                           anchors: np.ndarray | None = None) -> np.ndarray:
    """For each anchor caption, an image index other than the caption's own, uniform over the
    other num_images - 1 images. -> [N_anchor] int64."""
    caption_image = np.asarray(caption_image)
    anchors = _anchors_of(caption_image, anchors)
    if num_images < 2:
        raise InputError(f"num_images: expected at least 2 images to sample negatives from, got {num_images}")
    own = caption_image[anchors].astype(np.int64)
    picks = rng.integers(0, num_images - 1, size=len(anchors))
    return picks + (picks >= own)  # skip the caption's own image
