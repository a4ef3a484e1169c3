"""The FLOP counter (benchmarks/flops.py) against a hand count and against torch's own FLOP counter."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.flops import (
    StageFlops, factored_pair_flops, ideal_seconds, matmul_flops, reference_pair_flops, total_flops,
)
from training.config import preset

LSTM_STAGES = ("w2r.input_projection", "w2r.recurrence", "o2w.bilstm")  # nn.LSTM: not seen by FlopCounterMode


def test_reference_matches_a_hand_count_at_the_demo_preset():
    # demo: D=9 M=16 E=12 H=8 P=4 Q=16 H2=6, w2r_mlp (8, 1), o2w_mlp (6, 1), max_words 8; caption of 6 words
    stages = reference_pair_flops(preset("demo"), length=6)
    assert stages["w2r.attention_logits"].matmul == 2 * 8 * 12 * 16 + 2 * 8 * 16 * 9 == 5376  # padded to 8 words
    assert stages["w2r.attend"].matmul == 2 * 8 * 9 * 16 == 2304
    assert stages["w2r.input_projection"].matmul == 2 * 8 * (16 + 12) * 32 == 14336
    assert stages["w2r.recurrence"].matmul == 2 * 8 * 8 * 32 == 4096
    assert stages["w2r.mlp"].matmul == 2 * 8 * 8 + 2 * 8 * 1 == 144  # Linear(H -> 8), BN, tanh, Linear(8 -> 1)
    assert stages["o2w.bilstm"].matmul == 2 * 6 * (2 * 12 * 24 + 2 * 6 * 24) == 10368  # real words only
    assert stages["o2w.attention_logits"].matmul == 2 * 4 * 16 * 6 + 2 * 4 * 6 * 6 == 1056
    assert stages["o2w.mlp"].matmul == 4 * (2 * (16 + 6) * 6 + 2 * 6 * 1) == 1104  # P x (Linear(Q + H2 -> 6), Linear(6 -> 1))


def test_factored_matches_a_hand_count_and_the_routes_differ_as_written():
    gates = factored_pair_flops(preset("demo"), 6, "gates")
    regions = factored_pair_flops(preset("demo"), 6, "regions")
    assert gates["w2r.attention_logits"].matmul == 2 * 6 * 9 * 12
    assert gates["w2r.attend"].matmul == 2 * 6 * 9 * 32 and gates["w2r.input_projection"].matmul == 0
    assert regions["w2r.attend"].matmul == 2 * 6 * 9 * 16 and regions["w2r.input_projection"].matmul == 2 * 6 * 16 * 32
    assert gates["w2r.recurrence"].matmul == regions["w2r.recurrence"].matmul == 2 * 6 * 8 * 32
    assert gates["o2w.mlp"].matmul == 4 * (2 * 6 * 6 + 2 * 6 * 1)  # first layer's states part (objects part cached), then 6 -> 1
    with pytest.raises(ValueError, match="values='both'"):
        factored_pair_flops(preset("demo"), 6, "both")


def test_paper_preset_totals_agree_with_architecture_md():
    # ARCHITECTURE.md: the paper as written ~766 MFLOP/pair, factored with G ~308 MFLOP/pair at L=30
    assert total_flops(reference_pair_flops(preset("paper"), 30)) / 1e6 == pytest.approx(766, rel=0.01)
    assert total_flops(factored_pair_flops(preset("paper"), 30, "gates")) / 1e6 == pytest.approx(308, rel=0.03)
    # the W2R recurrence dominates the factored step (~80% at H=1024)
    stages = factored_pair_flops(preset("paper"), 30, "gates")
    assert stages["w2r.recurrence"].total / total_flops(stages) == pytest.approx(0.8, abs=0.02)


def test_matmul_flops_equal_torch_flop_counter():
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.scorers import random_inputs, random_model
    from training.model import reference_scores

    model = random_model("demo")
    batch, length = 5, 6
    inputs = random_inputs(model.config, np.full(batch, length))
    t = torch.from_numpy
    with torch.no_grad():
        images = model.encode_images(inputs.regions, inputs.objects, gates=True)
        texts = model.encode_texts(inputs.words, inputs.lengths)
        with FlopCounterMode(display=False) as counter:
            model.score_grid_cached(images, texts)
        assert counter.get_total_flops() == batch * matmul_flops(factored_pair_flops(model.config, length, "gates"))
        with FlopCounterMode(display=False) as counter:
            reference_scores(model, t(inputs.regions).expand(batch, -1, -1), t(inputs.objects).expand(batch, -1, -1),
                             t(inputs.words), t(inputs.lengths))
    stages = reference_pair_flops(model.config, length)
    assert counter.get_total_flops() == batch * sum(s.matmul for n, s in stages.items() if n not in LSTM_STAGES)


def test_ideal_seconds_is_flops_over_peak_and_uses_each_stage_precision():
    stages = {"a": StageFlops(matmul=4e9, other=1e9), "b": StageFlops(matmul=2e9, weight=True)}
    peaks = {"fp32": 1e9, "int8": 4e9}
    assert ideal_seconds(stages, peaks, {}) == pytest.approx(7.0)
    assert ideal_seconds(stages, peaks, {"b": "int8"}) == pytest.approx(4 + 1 + 0.5)


def test_peak_fraction_from_the_saved_split_equals_ideal_seconds():
    from benchmarks.flops import flops_by_precision, peak_fraction

    stages = factored_pair_flops(preset("paper"), 12, "regions")
    precision_of = {"w2r.recurrence": "int8", "w2r.input_projection": "int8"}
    peaks = {"fp32": 50e9, "int8": 120e9}
    split = flops_by_precision(stages, precision_of)
    assert sum(split.values()) == pytest.approx(total_flops(stages))
    assert peak_fraction(split, peaks, 0.01) == pytest.approx(ideal_seconds(stages, peaks, precision_of) / 0.01)
