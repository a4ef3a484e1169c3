"""engine.ranking: the one protocol (first stage, top-K re-rank, fusion) against brute-force definitions."""

import numpy as np
import pytest

from engine.errors import InputError
from engine.metrics import retrieval_metrics
from engine.ranking import (BSSAN_ALONE, FIRST_STAGE_ALONE, Fusion, candidate_pairs, first_stage_recall,
                            top_k_per_query, tune_fusion, two_stage_metrics, two_stage_ranks)


def _data(seed=0, n_img=12, cpi=3):
    rng = np.random.default_rng(seed)
    first = rng.normal(size=(n_img, n_img * cpi)).astype(np.float32)
    bssan = rng.normal(size=(n_img, n_img * cpi)).astype(np.float32)
    return first, bssan, cpi


def _rescorer(bssan, calls=None):
    def rescore(i, t):
        if calls is not None:
            calls.append(len(i))
        return bssan[i, t]
    return rescore


def _brute_rank(first, fused, k, cpi, direction):
    """Rank by explicit lists: candidates sorted by fused, then the rest by first."""
    n_img, n_cap = first.shape
    ranks = []
    queries = range(n_img) if direction == "i2t" else range(n_cap)
    for q in queries:
        f = first[q] if direction == "i2t" else first[:, q]
        s = fused[q] if direction == "i2t" else fused[:, q]
        order = sorted(range(len(f)), key=lambda j: (-f[j], j))
        cands, rest = order[:k], order[k:]
        final = sorted(cands, key=lambda j: -s[j]) + rest
        if direction == "i2t":
            truth = [j for j in range(q * cpi, (q + 1) * cpi)]
            ranks.append(1 + min(final.index(j) for j in truth))
        else:
            ranks.append(1 + final.index(q // cpi))
    return np.array(ranks)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_two_stage_ranks_match_explicit_lists(k):
    first, bssan, cpi = _data()
    fusion = Fusion(1.0, 0.5)
    fused = first + 0.5 * bssan
    ranks = two_stage_ranks(first, _rescorer(bssan), k, cpi, fusion)
    for direction in ("i2t", "t2i"):
        np.testing.assert_array_equal(ranks[direction], _brute_rank(first, fused, k, cpi, direction))


def test_exhaustive_bssan_alone_equals_plain_metrics_and_scores_every_pair_once():
    first, bssan, cpi = _data(1)
    calls = []
    metrics = two_stage_metrics(first, _rescorer(bssan, calls), None, cpi, BSSAN_ALONE)
    plain = retrieval_metrics(bssan, captions_per_image=cpi)
    assert metrics["rsum"] == pytest.approx(plain["rsum"])
    assert calls == [bssan.size]
    assert metrics["protocol"]["k"] is None
    # no first stage at all works too when exhaustive and unfused
    assert two_stage_metrics(None, _rescorer(bssan), None, cpi, BSSAN_ALONE, shape=bssan.shape)["rsum"] == pytest.approx(plain["rsum"])


def test_first_stage_alone_equals_its_plain_metrics_for_any_k():
    first, _, cpi = _data(2)
    plain = retrieval_metrics(first, captions_per_image=cpi)
    for k in (1, 5, None):
        assert two_stage_metrics(first, None, k, cpi, FIRST_STAGE_ALONE)["rsum"] == pytest.approx(plain["rsum"])


def test_candidates_are_the_union_of_both_directions_top_k():
    first, _, _ = _data(3)
    i, t = candidate_pairs(first, 2)
    mask = np.zeros(first.shape, bool)
    mask[i, t] = True
    for row in range(first.shape[0]):
        assert set(np.argsort(-first[row], kind="stable")[:2]) <= set(np.flatnonzero(mask[row]))
    for col in range(first.shape[1]):
        assert set(np.argsort(-first[:, col], kind="stable")[:2]) <= set(np.flatnonzero(mask[:, col]))
    assert mask.sum() == len(i)


def test_top_k_breaks_ties_by_index():
    first = np.zeros((2, 6), np.float32)
    first[0, 4] = 1.0
    np.testing.assert_array_equal(top_k_per_query(first, 3, "i2t"), [[4, 0, 1], [0, 1, 2]])


def test_recall_of_the_first_stage():
    first = np.eye(2, 4, dtype=np.float32)  # image 0 -> caption 0 (own), image 1 -> caption 1 (image 0's)
    assert first_stage_recall(first, 1, 2)["i2t"] == 50.0


def test_tuned_fusion_is_never_worse_than_the_first_stage_on_the_tuning_split():
    first, bssan, cpi = _data(4)
    i, t = candidate_pairs(first, 5)
    best, rows = tune_fusion(first, (i, t, bssan[i, t]), 5, cpi, (0.1, 1.0, 10.0))
    alone = two_stage_metrics(first, None, 5, cpi, FIRST_STAGE_ALONE)["rsum"]
    assert max(r["rsum"] for r in rows) >= alone
    assert [r["bssan_weight"] for r in rows] == [0.0, 0.1, 1.0, 10.0]
    assert isinstance(best, Fusion)


@pytest.mark.parametrize("bad, match", [
    ({"first_stage_weight": -1, "bssan_weight": 1}, "first_stage_weight: expected a finite number >= 0, got -1"),
    ({"first_stage_weight": 0, "bssan_weight": 0}, "both 0"),
    ({"first_stage_weight": "x", "bssan_weight": 1}, "got 'x'"),
    ({"bssan_weight": 1}, "missing"),
])
def test_fusion_records_are_checked(bad, match):
    with pytest.raises(InputError, match=match):
        Fusion.from_dict(bad)


def test_a_fused_k_ranking_needs_a_first_stage():
    _, bssan, cpi = _data(5)
    with pytest.raises(InputError, match="expected a first-stage score matrix"):
        two_stage_metrics(None, _rescorer(bssan), 3, cpi, BSSAN_ALONE, shape=bssan.shape)
