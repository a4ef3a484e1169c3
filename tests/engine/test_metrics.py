"""engine.metrics against a brute-force per-query reference, and its error messages."""

import numpy as np
import pytest

from engine.errors import InputError
from engine.metrics import (format_metrics, image_to_text_ranks, paired_bootstrap, retrieval_metrics,
                            text_to_image_ranks)


def brute_force(scores: np.ndarray, cpi: int) -> dict:
    n_img, n_cap = scores.shape
    i2t, t2i = [], []
    for i in range(n_img):
        order = sorted(range(n_cap), key=lambda c: (-scores[i, c], c // cpi == i))  # ties: own caption last
        i2t.append(1 + min(order.index(c) for c in range(i * cpi, (i + 1) * cpi)))
    for c in range(n_cap):
        order = sorted(range(n_img), key=lambda i: (-scores[i, c], i == c // cpi))
        t2i.append(1 + order.index(c // cpi))

    def summary(r):
        r = np.array(r)
        return {"r1": 100 * np.mean(r <= 1), "r5": 100 * np.mean(r <= 5), "r10": 100 * np.mean(r <= 10),
                "medr": np.floor(np.median(r)), "meanr": r.mean()}

    a, b = summary(i2t), summary(t2i)
    return {"i2t": a, "t2i": b, "rsum": sum(a[k] + b[k] for k in ("r1", "r5", "r10"))}


@pytest.mark.parametrize("cpi", [1, 3, 5])
def test_matches_brute_force_with_ties(cpi):
    rng = np.random.default_rng(cpi)
    scores = rng.integers(0, 4, size=(23, 23 * cpi)).astype(np.float32)  # many ties on purpose
    got, want = retrieval_metrics(scores, cpi), brute_force(scores, cpi)
    for side in ("i2t", "t2i"):
        for key in want[side]:
            assert got[side][key] == pytest.approx(want[side][key]), (side, key)
    assert got["rsum"] == pytest.approx(want["rsum"])


def test_perfect_and_constant_scorers():
    n, cpi = 20, 5
    perfect = np.repeat(np.eye(n), cpi, axis=1)
    m = retrieval_metrics(perfect, cpi)
    assert m["rsum"] == pytest.approx(600.0) and m["i2t"]["medr"] == 1 and m["t2i"]["meanr"] == 1
    constant = retrieval_metrics(np.zeros((n, n * cpi)), cpi)
    assert constant["i2t"]["r10"] == 0 and constant["t2i"]["r1"] == 0  # ties never credit the query


def test_folds_average_recalls_then_sum():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 250))
    five = retrieval_metrics(scores, 5, folds=5)
    per_fold = [retrieval_metrics(scores[f * 10:(f + 1) * 10, f * 50:(f + 1) * 50], 5) for f in range(5)]
    assert five["i2t"]["r1"] == pytest.approx(np.mean([m["i2t"]["r1"] for m in per_fold]))
    assert five["rsum"] == pytest.approx(sum(five[s][f"r{k}"] for s in ("i2t", "t2i") for k in (1, 5, 10)))
    assert "rsum" in format_metrics(five)


def test_bad_inputs_name_the_problem():
    with pytest.raises(InputError, match=r"expected 4 x 20 \(5 captions per image\), got 4 x 19"):
        retrieval_metrics(np.zeros((4, 19)), 5)
    with pytest.raises(InputError, match="captions_per_image: expected a positive integer, got 0"):
        retrieval_metrics(np.zeros((4, 4)), 0)
    with pytest.raises(InputError, match="folds: expected a positive divisor of the 4 images, got 3"):
        retrieval_metrics(np.zeros((4, 20)), 5, folds=3)
    bad = np.zeros((2, 10))
    bad[1, 3] = np.nan
    with pytest.raises(InputError, match=r"non-finite value at index \[1, 3\]"):
        retrieval_metrics(bad, 5)


def ranks_of(scores: np.ndarray, cpi: int) -> dict:
    return {"i2t": image_to_text_ranks(scores, cpi), "t2i": text_to_image_ranks(scores, cpi)}


def test_paired_bootstrap_difference_is_the_rsum_difference_and_its_interval_holds_it():
    rng = np.random.default_rng(3)
    truth = np.kron(np.eye(40), np.ones((1, 5)))  # [40, 200]: image i owns captions 5i..5i+4
    strong, weak = truth + rng.normal(0, 0.6, truth.shape), truth + rng.normal(0, 1.2, truth.shape)
    a, b = ranks_of(strong, 5), ranks_of(weak, 5)
    out = paired_bootstrap(a, b, 5, samples=500, seed=1)
    expected = retrieval_metrics(strong, 5)["rsum"] - retrieval_metrics(weak, 5)["rsum"]
    assert out["difference"] == pytest.approx(expected) and expected > 50
    assert out["low"] < out["difference"] < out["high"] and out["low"] > 0 and out["share_a_better"] == 1.0
    assert paired_bootstrap(a, b, 5, samples=500, seed=1) == out  # the seed fixes the resamples
    swapped = paired_bootstrap(b, a, 5, samples=500, seed=1)
    assert swapped["difference"] == pytest.approx(-expected) and swapped["high"] == pytest.approx(-out["low"])


def test_paired_bootstrap_of_a_model_against_itself_is_zero_and_a_tie_straddles_zero():
    rng = np.random.default_rng(4)
    truth = np.kron(np.eye(60), np.ones((1, 5)))
    a = ranks_of(truth + rng.normal(0, 1.0, truth.shape), 5)
    same = paired_bootstrap(a, a, 5, samples=200)
    assert (same["difference"], same["low"], same["high"], same["share_a_better"]) == (0.0, 0.0, 0.0, 0.0)
    b = ranks_of(truth + rng.normal(0, 1.0, truth.shape), 5)  # another draw of the same model: a tie
    tie = paired_bootstrap(a, b, 5, samples=500)
    assert tie["low"] < 0 < tie["high"] and 0.02 < tie["share_a_better"] < 0.98


def test_paired_bootstrap_names_mismatched_ranks():
    a = {"i2t": np.ones(4), "t2i": np.ones(20)}
    with pytest.raises(InputError, match=r"ranks b: expected 4 x 5 t2i ranks"):
        paired_bootstrap(a, {"i2t": np.ones(4), "t2i": np.ones(19)}, 5)
    with pytest.raises(InputError, match="the same images"):
        paired_bootstrap(a, {"i2t": np.ones(3), "t2i": np.ones(15)}, 5)
