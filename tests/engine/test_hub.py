"""engine/hub.py: the image hub correction's bank file and offsets (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import ArtifactError
from engine.hub import HubBank


def _bank(k=2, beta=0.5) -> HubBank:
    words = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    return HubBank.from_padded(words, np.array([3, 1]), k, beta, {"note": "x"})


def test_offsets_are_beta_times_the_mean_of_the_k_highest_bank_scores():
    bank = _bank(k=2, beta=0.5)
    scores = np.array([[1.0, 5.0], [-2.0, 0.0]], np.float32)
    np.testing.assert_allclose(bank.offsets(scores), [0.5 * 3.0, 0.5 * -1.0])
    one = HubBank(bank.words, bank.lengths, 1, 2.0)
    np.testing.assert_allclose(one.offsets(scores), [10.0, 0.0])
    with pytest.raises(ArtifactError, match=r"expected scores \[N_img, 2\]"):
        bank.offsets(np.zeros((2, 3)))


def test_caption_side_offsets_and_round_trip(tmp_path):
    base = _bank()
    regions, objects = np.ones((3, 2, 4), np.float16), np.zeros((3, 1, 4), np.float16)
    bank = HubBank(base.words, base.lengths, 2, 0.5, regions=regions, objects=objects, text_k=2, gamma=0.25)
    scores = np.array([[1.0, 0.0], [3.0, -1.0], [2.0, -4.0]], np.float32)  # [3 bank images, 2 captions]
    np.testing.assert_allclose(bank.text_offsets(scores), [0.25 * 2.5, 0.25 * -0.5])
    assert not base.has_images and np.array_equal(base.text_offsets(scores), [0.0, 0.0])
    loaded = HubBank.load(bank.save(tmp_path / "b.npz"))
    assert loaded.has_images and (loaded.text_k, loaded.gamma) == (2, 0.25) and np.array_equal(loaded.regions, regions)
    with pytest.raises(ArtifactError, match="gamma > 0"):
        HubBank(base.words, base.lengths, 2, 0.5, regions=regions, objects=objects, text_k=2, gamma=0.0)


def test_bank_round_trips_ragged_words_and_refuses_bad_files(tmp_path):
    bank = _bank()
    padded = bank.padded()
    assert padded.shape == (2, 3, 4) and not padded[1, 1:].any() and padded[1, 0].tolist() == [12, 13, 14, 15]
    loaded = HubBank.load(bank.save(tmp_path / "b.npz"))
    assert (loaded.k, loaded.beta, loaded.record) == (2, 0.5, {"note": "x"})
    assert np.array_equal(loaded.padded(), padded) and np.array_equal(loaded.lengths, [3, 1])
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(ArtifactError, match=r"bad\.npz: not a readable hub bank"):
        HubBank.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "partial.npz", words=np.zeros((3, 4)), lengths=np.array([3]))
    with pytest.raises(ArtifactError, match=r"partial\.npz: missing \['beta', 'k'\]"):
        HubBank.load(tmp_path / "partial.npz")
    with pytest.raises(ArtifactError, match="1 <= k <= 2"):
        HubBank(bank.words, bank.lengths, 3, 0.5)
    with pytest.raises(ArtifactError, match="beta >= 0"):
        HubBank(bank.words, bank.lengths, 1, -1.0)
