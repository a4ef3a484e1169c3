"""Tests of training/loss.py: hinge terms and the total loss checked by hand, hardest in-batch
negatives, and the negative samplers (never the anchor's own image).

    python -m pytest tests/training/test_loss.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import InputError
from training.config import Reduction, preset, replace_strict
from training.loss import (bssan_loss, hardest_in_batch, hinge, sample_negative_captions, sample_negative_images,
                           weight_penalty)
from training.model import BSSAN


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_hinge_by_hand():
    positive, negative = t([1.0, 0.5, 0.0]), t([0.5, 0.9, -0.1])
    # margin 0.2: max(0, 0.2-1+0.5)=0, max(0, 0.2-0.5+0.9)=0.6, max(0, 0.2-0+(-0.1))=0.1
    assert float(hinge(positive, negative, 0.2)) == pytest.approx(0.7)
    assert float(hinge(positive, negative, 0.2, Reduction.MEAN)) == pytest.approx(0.7 / 3)
    with pytest.raises(InputError, match=r"hinge: positive and negative scores must have one shape, got \[3\] and \[2\]"):
        hinge(positive, negative[:2], 0.2)


def _matrices_by_name(model):
    """The weight matrices of a full demo model, listed by hand (independent of the ndim rule)."""
    w2r, o2w = model.w2r, model.o2w
    return [w2r.attn_weight, w2r.lstm.weight_ih_l0, w2r.lstm.weight_hh_l0, w2r.mlp.first.weight, w2r.mlp.rest[2].weight,
            o2w.attn_weight, o2w.bilstm.weight_ih_l0, o2w.bilstm.weight_hh_l0, o2w.bilstm.weight_ih_l0_reverse,
            o2w.bilstm.weight_hh_l0_reverse, o2w.mlp.first.weight, o2w.mlp.rest[2].weight]


def test_weight_penalty_counts_weight_matrices_only():
    model = BSSAN(preset("demo")).double()
    expected = sum(w.detach().pow(2).sum().item() for w in _matrices_by_name(model))
    assert weight_penalty(model).detach().item() == pytest.approx(expected)
    with torch.no_grad():
        model.w2r.lstm.bias_ih_l0.add_(5.0)  # biases and BatchNorm are not penalised
        model.o2w.mlp.rest[0].weight.add_(5.0)
        model.w2r.attn_bias.add_(5.0)
    assert weight_penalty(model).detach().item() == pytest.approx(expected)


@pytest.mark.parametrize("variant, weights", [("full", (1.0, 0.6, 0.01)), ("no_reg", (1.0, 0.6, 0.0)),
                                              ("w2r", (1.0, 0.0, 0.01)), ("o2w", (0.0, 1.0, 0.01))])
def test_total_loss_by_hand(variant, weights):
    model = BSSAN(replace_strict(preset("demo"), variant=variant)).double()
    positive = (t([1.0, 0.5]), t([0.2, 0.3]))
    negative_captions = (t([0.5, 0.9]), t([0.4, -0.5]))
    negative_images = (t([1.5, 0.0]), t([0.0, 0.0]))
    terms = bssan_loss(model, positive, [negative_captions, negative_images], margin=0.2)
    # L1: captions 0 + 0.6, images 0.7 + 0 = 1.3;  L2: captions 0.4 + 0, images 0 + 0 = 0.4
    l1, l2 = 1.3, 0.4
    reg = weight_penalty(model).detach().item()
    w_y, w_yp, delta = weights
    assert terms.as_floats() == pytest.approx({"loss": w_y * l1 + w_yp * l2 + delta * reg, "l1": l1, "l2": l2, "reg": reg})
    with pytest.raises(InputError, match="at least one kind of negative"):
        bssan_loss(model, positive, [], margin=0.2)


def test_loss_gradient_only_from_violating_pairs():
    model = BSSAN(replace_strict(preset("demo"), variant="no_reg")).double()
    y = t([1.0, 0.5]).requires_grad_()
    neg = t([0.5, 0.9]).requires_grad_()
    bssan_loss(model, (y, t([0.0, 0.0])), [(neg, t([0.0, 0.0]))], margin=0.2).total.backward()
    assert y.grad.tolist() == [0.0, -1.0] and neg.grad.tolist() == [0.0, 1.0]


def test_hardest_in_batch_by_hand():
    y = t([[0.9, 0.8, 0.1],
           [0.7, 0.5, 0.6],
           [0.2, 0.3, 0.4]])
    y_prime = -y
    same = torch.tensor([[True, True, False],   # captions 0 and 1 belong to image 0 (rows 0 and 1 are its copies)
                         [True, True, False],
                         [False, False, True]])
    positive, negatives = hardest_in_batch((y, y_prime), same, negative_images=True)
    assert positive[0].tolist() == [0.9, 0.5, 0.4]
    (cap_y, cap_yp), (img_y, img_yp) = negatives
    assert cap_y.tolist() == [0.1, 0.6, 0.3]          # hardest caption of another image, per image row
    assert cap_yp.tolist() == [-0.1, -0.6, -0.2]      # Y' picks its own hardest
    assert img_y.tolist() == [0.2, 0.3, 0.6]          # hardest other image, per caption column
    lonely = hardest_in_batch((y, y_prime), torch.ones(3, 3, dtype=torch.bool))[1][0][0]
    assert float(hinge(positive[0], lonely, 0.2)) == 0.0  # no negative in the batch: no loss


def test_few_sgd_steps_lower_the_loss():
    torch.manual_seed(0)
    model = BSSAN(preset("demo")).train()
    g = torch.Generator().manual_seed(0)
    regions, objects = torch.randn(16, 9, 16, generator=g), torch.randn(16, 4, 16, generator=g)
    words, lengths = torch.randn(16, 8, 12, generator=g), torch.randint(1, 9, (16,), generator=g)
    neg = torch.as_tensor(sample_negative_captions(np.arange(16), np.random.default_rng(0)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(30):
        positive = model(regions, objects, words, lengths)
        negative = model(regions, objects, words[neg], lengths[neg], negative=True)
        loss = bssan_loss(model, positive, [negative], margin=0.2).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------------------------------
# Samplers


def test_negative_captions_never_same_image_and_cover_the_others():
    caption_image = np.array([0] * 7 + [1] * 2 + [2] * 5 + [3])  # uneven captions per image
    rng = np.random.default_rng(0)
    for _ in range(200):
        picks = sample_negative_captions(caption_image, rng)
        assert picks.shape == caption_image.shape
        assert (caption_image[picks] != caption_image).all()
    anchors = np.array([14, 14, 0])
    draws = np.concatenate([sample_negative_captions(caption_image, rng, anchors) for _ in range(300)])
    assert (caption_image[draws] != caption_image[np.tile(anchors, 300)]).all()
    assert set(draws[::3].tolist()) == set(range(14))  # uniform over every caption of the other images


def test_negative_images_never_own_image():
    caption_image = np.repeat(np.arange(4), 5)
    rng = np.random.default_rng(1)
    picks = np.stack([sample_negative_images(caption_image, 4, rng) for _ in range(200)])  # [200, 20]
    assert (picks != caption_image).all() and picks.min() == 0 and picks.max() == 3
    counts = np.bincount(picks[:, 0], minlength=4)  # caption 0 (image 0): images 1..3, about 1/3 each
    assert counts[0] == 0 and counts[1:].min() > 40


def test_samplers_need_two_images():
    with pytest.raises(InputError, match=r"caption_image: expected captions of at least 2 images .* got 1"):
        sample_negative_captions(np.zeros(5, dtype=np.int32), np.random.default_rng(0))
    with pytest.raises(InputError, match=r"num_images: expected at least 2 images .* got 1"):
        sample_negative_images(np.zeros(5, dtype=np.int32), 1, np.random.default_rng(0))
