"""engine.metrics against a brute-force per-query reference, and its error messages."""

import numpy as np
import pytest

from engine.errors import InputError
from engine.metrics import format_metrics, retrieval_metrics


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
