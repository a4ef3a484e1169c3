"""Rank agreement measures of benchmarks/precision.py: Kendall tau (blocked numpy) and top-k overlap."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import benchmarks.precision as precision
from benchmarks.precision import kendall_tau, rank_agreement


def brute_tau(a, b) -> float:
    pairs = list(itertools.combinations(range(len(a)), 2))
    return sum(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i, j in pairs) / len(pairs)


def test_kendall_tau_known_values():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert kendall_tau(a, a * 10) == 1.0
    assert kendall_tau(a, -a) == -1.0
    assert kendall_tau(a, np.array([1.0, 3.0, 2.0, 4.0])) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant
    assert kendall_tau(a[:1], a[:1]) == 1.0


def test_kendall_tau_blocks_equal_brute_force(monkeypatch):
    monkeypatch.setattr(precision, "TAU_BLOCK", 7)  # several blocks for 40 items
    rng = np.random.default_rng(0)
    a = rng.standard_normal(40)
    b = a + rng.standard_normal(40) * 0.5
    b[3] = b[5]  # a tie counts 0
    assert kendall_tau(a, b) == pytest.approx(brute_tau(a, b))


def test_rank_agreement_overlap_and_diff():
    reference = np.array([[5.0, 4, 3, 2, 1], [1.0, 2, 3, 4, 5]])
    other = np.array([[5.0, 4, 3, 2, 1], [1.0, 2, 3, 5.5, 4]])
    result = rank_agreement(reference, other, k=2)
    assert result["topk_overlap"] == 1.0  # row 2: top-2 {3, 4} either way
    assert result["max_abs_diff"] == pytest.approx(1.5)
    assert result["kendall_tau_min"] == pytest.approx(0.8)  # one swapped pair of 10
    other[0] = other[0][::-1]
    assert rank_agreement(reference, other, k=2)["topk_overlap"] == 0.5
