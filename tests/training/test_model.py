"""Tests of training/config.py and training/model.py: factored scoring equals the paper as written,
padding never matters, the uniform-negative rule, variants, presets, strict configs.

    python -m pytest tests/training/test_model.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.errors import InputError
from engine.store import FeatureStore
from training.config import (ModelConfig, NegativeAttention, TrainConfig, Variant, input_sizes_of_split, preset,
                             replace_strict, with_input_sizes)
from training.model import BSSAN, lstm_recurrence, reference_scores

LENGTHS = [1, 3, 8, 5, 2, 8, 4]  # varied, with length-1 and full-length captions


def make_model(dtype=torch.float64, seed=0, **overrides) -> BSSAN:
    torch.manual_seed(seed)
    model = BSSAN(replace_strict(preset("demo"), **overrides)).to(dtype).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics and biases, so eval-mode BN is really exercised
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        for param in model.parameters():
            if param.dim() == 0:
                param.uniform_(-0.3, 0.3)
    return model


def make_inputs(model: BSSAN, lengths=LENGTHS, n_img=None, seed=1, dtype=torch.float64):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    n_img = n_img or len(lengths)
    regions = torch.randn(n_img, cfg.region_count, cfg.region_dim, generator=g, dtype=dtype)
    objects = torch.randn(n_img, cfg.object_count, cfg.object_dim, generator=g, dtype=dtype)
    lengths = torch.tensor(lengths)
    words = torch.randn(len(lengths), cfg.max_words, cfg.word_dim, generator=g, dtype=dtype)
    words[torch.arange(cfg.max_words)[None, :] >= lengths[:, None]] = 0.0
    return regions, objects, words, lengths


def grid_reference(model, regions, objects, words, lengths):
    """MS [N_img, N_cap] from the un-factored reference, pair by pair."""
    ii, tt = np.meshgrid(np.arange(len(regions)), np.arange(len(words)), indexing="ij")
    ii, tt = torch.as_tensor(ii.ravel()), torch.as_tensor(tt.ravel())
    y, yp = reference_scores(model, regions[ii], objects[ii], words[tt], lengths[tt])
    return model.combine(y, yp).reshape(len(regions), len(words))


# ---------------------------------------------------------------------------------------------
# Parity with the paper as written


@pytest.mark.parametrize("hidden", [8, 3], ids=["pair-gathers-R", "pair-gathers-G"])
@pytest.mark.parametrize("variant", list(Variant))
def test_factored_equals_reference_float64(hidden, variant):
    model = make_model(w2r_hidden=hidden, variant=variant.value)
    if model.w2r is not None:
        assert model.w2r.pair_gathers_gates == (hidden == 3)
    regions, objects, words, lengths = make_inputs(model, n_img=5)
    with torch.no_grad():
        expected = grid_reference(model, regions, objects, words, lengths)  # [5, 7]
        grid = model.score_matrix(regions, objects, words, lengths, image_block=2, caption_block=3)
        ii, tt = torch.meshgrid(torch.arange(5), torch.arange(7), indexing="ij")
        pairs = model.score_pairs(regions, objects, words, lengths, ii.ravel(), tt.ravel(), pair_block=8)
        aligned = model.combine(*model(regions, objects, words[:5], lengths[:5]))
    torch.testing.assert_close(grid, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(pairs.reshape(5, 7), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(aligned, expected.diagonal()[:5], rtol=0, atol=1e-10)


def test_factored_equals_reference_float32():
    # fp32: eps 1.2e-7; scores are O(1) sums of a few hundred products after <= 8 recurrent
    # steps, so reordered accumulation stays well inside 1e-5 absolute.
    model = make_model(dtype=torch.float32)
    regions, objects, words, lengths = make_inputs(model, dtype=torch.float32)
    with torch.no_grad():
        got = model.combine(*model(regions, objects, words, lengths))
        expected = model.combine(*reference_scores(model, regions, objects, words, lengths))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_explicit_recurrence_equals_nn_lstm():
    torch.manual_seed(3)
    lstm = torch.nn.LSTM(5, 4, batch_first=True).double()
    x = torch.randn(6, 7, 5, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 3, 7, 2, 5])
    gates = x @ lstm.weight_ih_l0.t() + lstm.bias_ih_l0 + lstm.bias_hh_l0
    out, _ = lstm(x)
    torch.testing.assert_close(lstm_recurrence(gates, lengths, lstm.weight_hh_l0), out[torch.arange(6), lengths - 1])
    real = (torch.arange(7)[None, :] < lengths[:, None]).to(out.dtype)[..., None]  # [6, 7, 1]
    torch.testing.assert_close(lstm_recurrence(gates, lengths, lstm.weight_hh_l0, mean=True),
                               (out * real).sum(1) / lengths[:, None].to(out.dtype))  # mean over the real steps
    torch.testing.assert_close(lstm_recurrence(gates, lengths, lstm.weight_hh_l0, every_step=True),
                               out * real)  # every real step's state, zeros after the last


def _readout_and_last(readout: str, **changes):
    """(model with W2R's `readout`, the same weights with the paper's last-state readout, inputs): 3 captions of
    max_words, 2 and 1 words, demo sizes."""
    from dataclasses import replace

    from training.config import preset

    config = replace(preset("demo"), w2r_readout=readout, **changes)
    torch.manual_seed(0)
    model = BSSAN(config).eval()
    last = BSSAN(replace(config, w2r_readout="last")).eval()
    last.load_state_dict(model.state_dict())
    d = config
    regions, objects = torch.randn(3, d.region_count, d.region_dim), torch.randn(3, d.object_count, d.object_dim)
    words, lengths = torch.randn(3, d.max_words, d.word_dim), torch.tensor([d.max_words, 2, 1])
    return model, last, (regions, objects, words, lengths)


def test_w2r_per_word_readout_is_the_mean_of_each_words_score():
    """w2r_readout='per_word' (beyond the paper): W2R's MLP scores each real word's LSTM state and Y is their mean;
    padding words never count, a one-word caption scores as with the paper's last state, export refuses it."""
    from engine.errors import InputError
    from export.graphs import build_graph_modules

    model, last, (regions, objects, words, lengths) = _readout_and_last("per_word", variant="w2r")
    with torch.no_grad():
        y_word, y_last = model(regions, objects, words, lengths)[0], last(regions, objects, words, lengths)[0]
        # the second caption's two words, scored by the paper's readout on its one- and two-word prefixes
        prefixes = [last(regions[1:2], objects[1:2], words[1:2], torch.tensor([k]))[0] for k in (1, 2)]
        padded = words.clone()
        padded[1, 2:] = 1e3  # what lies after a caption's last real word changes nothing
        y_padded = model(regions, objects, padded, lengths)[0]
    assert torch.equal(y_word[2], y_last[2]) and not torch.allclose(y_word[:2], y_last[:2])
    torch.testing.assert_close(y_word[1], (prefixes[0][0] + prefixes[1][0]) / 2)
    torch.testing.assert_close(y_padded, y_word)
    with pytest.raises(InputError, match="w2r_readout 'per_word'"):
        build_graph_modules(model, torch.float32)


def test_w2r_mean_readout_trains_in_torch_and_export_refuses_it():
    """w2r_readout='mean' (beyond the paper): W2R's MLP reads the mean of the LSTM states; the graphs implement only
    the paper's last state, so export says so instead of writing graphs of another model."""
    from dataclasses import replace

    from engine.errors import InputError
    from export.graphs import build_graph_modules

    model, last, inputs = _readout_and_last("mean")
    y_mean, y_last = model(*inputs)[0], last(*inputs)[0]
    assert torch.equal(y_mean[2], y_last[2]) and not torch.allclose(y_mean[:2], y_last[:2])  # one word: the same state
    with pytest.raises(InputError, match="w2r_readout 'mean'"):
        build_graph_modules(model, torch.float32)
    with pytest.raises(InputError, match="w2r_readout"):
        replace(model.config, w2r_readout="max")


def test_w2r_grid_plus_objects_attends_over_both_and_export_refuses_it():
    """w2r_regions='grid+objects' (beyond the paper): W2R attends over the D grid cells and the P boxes, so its
    attention rows have D + P weights and a box's features change Y; export refuses it (the graphs take the grid)."""
    from dataclasses import replace

    from engine.errors import InputError
    from export.graphs import build_graph_modules
    from training.config import preset

    d = replace(preset("demo"), variant="w2r", w2r_regions="grid+objects")
    torch.manual_seed(0)
    model = BSSAN(d).eval()
    regions, objects = torch.randn(3, d.region_count, d.region_dim), torch.randn(3, d.object_count, d.object_dim)
    words, lengths = torch.randn(3, d.max_words, d.word_dim), torch.tensor([d.max_words, 2, 1])
    index = torch.arange(3)
    attention = model.attention_weights(regions, objects, words, lengths, index, index)["word_to_region"]
    assert attention.shape[-1] == d.region_count + d.object_count
    y = model(regions, objects, words, lengths)[0]
    moved = objects.clone()
    moved[1, 0] += 1.0
    y_moved = model(regions, moved, words, lengths)[0]
    assert torch.equal(y[[0, 2]], y_moved[[0, 2]]) and not torch.allclose(y[1], y_moved[1])
    grid = model.score_matrix(regions, objects, words, lengths, hub=False)
    pairs = model.score_pairs(regions, objects, words, lengths, index.repeat_interleave(3), index.repeat(3))
    torch.testing.assert_close(grid.reshape(-1), pairs, rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="w2r_regions 'grid\\+objects'"):
        build_graph_modules(model, torch.float32)
    with pytest.raises(InputError, match="only 'grid' folds"):
        BSSAN(replace(d, input_scaling=True)).folded()
    with pytest.raises(InputError, match="region_dim == object_dim"):
        replace(d, object_dim=d.region_dim + 1)


def test_gradients_equal_reference():
    model = make_model(variant="w2r")  # one branch keeps the reference's BN batches identical
    regions, objects, words, lengths = make_inputs(model)
    grads = []
    for score in (lambda: model(regions, objects, words, lengths)[0],
                  lambda: reference_scores(model, regions, objects, words, lengths)[0]):
        model.zero_grad()
        score().square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Padding and lengths


def test_padding_never_changes_scores():
    model = make_model()
    regions, objects, words, lengths = make_inputs(model)
    garbage = words.clone()
    pad = torch.arange(words.shape[1])[None, :] >= lengths[:, None]
    garbage[pad] = 100.0 * torch.randn(int(pad.sum()), words.shape[2], dtype=words.dtype)
    with torch.no_grad():
        for negative in (False, True):
            torch.testing.assert_close(model(regions, objects, garbage, lengths, negative),
                                       model(regions, objects, words, lengths, negative), rtol=0, atol=1e-12)
        torch.testing.assert_close(model.score_matrix(regions, objects, garbage, lengths),
                                   model.score_matrix(regions, objects, words, lengths), rtol=0, atol=1e-12)


def test_caption_alone_equals_caption_in_batch_of_longer_ones():
    model = make_model()
    regions, objects, words, lengths = make_inputs(model)
    short = 1  # length 3; the batch holds captions up to 8 words
    with torch.no_grad():
        alone = model.score_matrix(regions, objects, words[short:short + 1, :3], lengths[short:short + 1])
        batch = model.score_matrix(regions, objects, words, lengths)
    torch.testing.assert_close(alone[:, 0], batch[:, short], rtol=0, atol=1e-12)


def test_all_length_one_captions():
    model = make_model()
    regions, objects, words, lengths = make_inputs(model, lengths=[1, 1, 1])
    with torch.no_grad():
        got = model.score_matrix(regions, objects, words, lengths)
    torch.testing.assert_close(got, grid_reference(model, regions, objects, words, lengths), rtol=0, atol=1e-10)


def test_bad_inputs_raise_one_line():
    model = make_model()
    regions, objects, words, lengths = make_inputs(model)
    with pytest.raises(InputError, match=r"lengths: expected caption lengths in \[1, 8\], got \[0, 8\]"):
        model(regions, objects, words, torch.tensor([0, 3, 8, 5, 2, 8, 4]))
    with pytest.raises(InputError, match=r"regions: expected shape \[N, 9, 16\], got \[7, 9, 15\]"):
        model(regions[..., :15], objects, words, lengths)
    with pytest.raises(InputError, match=r"words: expected shape \[N, L <= 8, 12\]"):
        model(regions, objects, words[..., :5], lengths)


# ---------------------------------------------------------------------------------------------
# The uniform rule for negatives


def test_uniform_rule_touches_negatives_only():
    model = make_model()
    regions, objects, words, lengths = make_inputs(model)
    with torch.no_grad():
        positive = model(regions, objects, words, lengths, negative=False)
        negative = model(regions, objects, words, lengths, negative=True)
        mixed_flag = torch.tensor([True, False, True, False, False, True, False])
        mixed = model(regions, objects, words, lengths, negative=mixed_flag)
        reference = reference_scores(model, regions, objects, words, lengths, negative=True)
        for branch in (0, 1):
            # uniform really differs, except O2W on a 1-word caption (a softmax over one word is uniform)
            differs = (positive[branch] - negative[branch]).abs() > 1e-8
            assert differs.tolist() == ([True] * 7 if branch == 0 else (lengths > 1).tolist())
            torch.testing.assert_close(mixed[branch], torch.where(mixed_flag, negative[branch], positive[branch]))
            torch.testing.assert_close(negative[branch], reference[branch], rtol=0, atol=1e-10)
        # uniform attention ignores the bilinear attention weights entirely
        model.w2r.attn_weight.mul_(3.0)
        model.o2w.attn_weight.mul_(3.0)
        again = model(regions, objects, words, lengths, negative=True)
        torch.testing.assert_close(again, negative)
        assert (model(regions, objects, words, lengths)[0] - positive[0]).abs().max() > 1e-6


def test_softmax_rule_ignores_negative_flag():
    model = make_model(negative_attention="softmax")
    regions, objects, words, lengths = make_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(model(regions, objects, words, lengths, negative=True),
                                   model(regions, objects, words, lengths, negative=False))


def test_forward_pairs_scores_positives_and_negatives_in_one_pass():
    model = make_model(w2r_hidden=3)  # G path allowed (4H <= M): 14 pairs x 8 words > 7 images x 9 regions
    regions, objects, words, lengths = make_inputs(model)
    neg = torch.tensor([3, 0, 1, 6, 2, 4, 5])
    index = torch.arange(7)
    flags = torch.tensor([False] * 7 + [True] * 7)
    with torch.no_grad():
        y, yp = model.forward_pairs(regions, objects, torch.cat([words, words[neg]]), torch.cat([lengths, lengths[neg]]),
                                    torch.cat([index, index]), torch.arange(14), flags)
        pos = model(regions, objects, words, lengths)
        negs = model(regions, objects, words[neg], lengths[neg], negative=True)
    torch.testing.assert_close(y, torch.cat([pos[0], negs[0]]), rtol=0, atol=1e-10)
    torch.testing.assert_close(yp, torch.cat([pos[1], negs[1]]), rtol=0, atol=1e-10)


def test_forward_grid_marks_off_diagonal_as_negative():
    model = make_model()
    regions, objects, words, lengths = make_inputs(model)
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 5])  # captions 0 and 1 share image 0
    with torch.no_grad():
        y, yp = model.forward_grid(regions[ids], objects[ids], words, lengths, image_ids=ids)
        pos = model(regions[ids], objects[ids], words, lengths)
        neg = model(regions[ids[1:]], objects[ids[1:]], words[:-1], lengths[:-1], negative=True)
    torch.testing.assert_close(y.diagonal(), pos[0])
    torch.testing.assert_close(yp.diagonal(), pos[1])
    torch.testing.assert_close(y.diagonal(-1)[1:], neg[0][1:])  # pair (image of caption i+1, caption i)
    torch.testing.assert_close(y[1, 0], pos[0][0])  # same image -> positive attention


# ---------------------------------------------------------------------------------------------
# Variants, attention maps, presets


def test_variants_build_and_combine():
    regions, objects, words, lengths = make_inputs(make_model())
    for variant, (has_w2r, has_o2w) in {"full": (True, True), "no_reg": (True, True),
                                        "w2r": (True, False), "o2w": (False, True)}.items():
        model = make_model(variant=variant)
        assert (model.w2r is not None, model.o2w is not None) == (has_w2r, has_o2w)
        with torch.no_grad():
            y, yp = model(regions, objects, words, lengths)
        assert bool(y.abs().sum() > 0) == has_w2r and bool(yp.abs().sum() > 0) == has_o2w
        expected = {"w2r": y, "o2w": yp}.get(variant, y + 0.6 * yp)
        torch.testing.assert_close(model.combine(y, yp), expected)
    assert make_model(variant="no_reg").config.effective_reg_weight == 0.0
    assert make_model(variant="full").config.effective_reg_weight == 0.01


def test_attention_weights_shapes_and_masking():
    model = make_model()
    regions, objects, words, lengths = make_inputs(model)
    maps = model.attention_weights(regions, objects, words, lengths, [0, 3, 3], [1, 2, 0])
    assert maps["word_to_region"].shape == (3, 8, 9) and maps["object_to_word"].shape == (3, 4, 8)
    real = torch.arange(8)[None, :] < lengths[[1, 2, 0]][:, None]  # [3, L]
    torch.testing.assert_close(maps["word_to_region"].sum(-1), real.double())
    torch.testing.assert_close(maps["object_to_word"].sum(-1), torch.ones(3, 4, dtype=torch.float64))
    assert (maps["object_to_word"][~real[:, None, :].expand(3, 4, 8)] == 0).all()


def test_numpy_float16_inputs_are_read_in_blocks():
    model = make_model(dtype=torch.float32)
    regions, objects, words, lengths = make_inputs(model, dtype=torch.float32)
    as16 = [x.numpy().astype(np.float16) for x in (regions, objects, words)]
    with torch.no_grad():
        got = model.score_matrix(*as16, lengths.numpy().astype(np.int32), image_block=3, caption_block=2)
        expected = model.score_matrix(*(torch.from_numpy(x.astype(np.float32)) for x in as16), lengths)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def _lstm_params(inp, hidden, directions=1):
    return directions * (4 * hidden * (inp + hidden) + 8 * hidden)


def _mlp_params(inp, widths):
    total, prev = 0, inp
    for i, width in enumerate(widths):
        total += prev * width + width + (2 * prev if i else 0)  # Linear (+ BatchNorm before it)
        prev = width
    return total


@pytest.mark.parametrize("name", ["paper", "flickr8k", "demo"])
def test_preset_parameter_counts(name):
    cfg = preset(name)
    with torch.device("meta"):  # no memory, no compute: the paper preset is ~30 M parameters
        model = BSSAN(cfg)
    w2r = cfg.word_dim * cfg.region_dim + 1 + _lstm_params(cfg.region_dim + cfg.word_dim, cfg.w2r_hidden) \
        + _mlp_params(cfg.w2r_hidden, cfg.w2r_mlp)
    o2w = _lstm_params(cfg.word_dim, cfg.o2w_hidden, 2) + cfg.object_dim * cfg.o2w_hidden + 1 \
        + _mlp_params(cfg.object_dim + cfg.o2w_hidden, cfg.o2w_mlp)
    assert sum(p.numel() for p in model.parameters()) == w2r + o2w
    if name == "paper":
        assert (cfg.region_count, cfg.region_dim, cfg.object_count, cfg.object_dim, cfg.word_dim) == (196, 512, 10, 4096, 300)
        assert model.o2w.mlp.first.in_features == 4608 and model.w2r.lstm.hidden_size == 1024


def test_flickr8k_preset_forward_shapes():
    model = BSSAN(preset("flickr8k")).eval()
    regions, objects, words, lengths = make_inputs(model, lengths=[3, 12], dtype=torch.float32)
    with torch.no_grad():
        assert model.score_matrix(regions, objects, words, lengths).shape == (2, 2)


# ---------------------------------------------------------------------------------------------
# Configs: strict, JSON-ready


def test_config_round_trip_through_json():
    cfg = replace_strict(preset("flickr8k"), variant="o2w", negative_attention=NegativeAttention.SOFTMAX)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["variant"] == "o2w" and data["w2r_mlp"] == [128, 64, 1]
    assert ModelConfig.from_dict(data) == cfg
    train = TrainConfig(hardest_negatives=True)
    assert TrainConfig.from_dict(json.loads(json.dumps(train.to_dict()))) == train


def test_config_strictness():
    with pytest.raises(InputError, match=r"ModelConfig: unknown key\(s\) \['hidden'\]"):
        ModelConfig.from_dict({"hidden": 3})
    with pytest.raises(InputError, match=r"ModelConfig.w2r_hidden: expected an int, got str 'big'"):
        replace_strict(preset("demo"), w2r_hidden="big")
    with pytest.raises(InputError, match=r"ModelConfig.max_words: expected an int, got bool True"):
        replace_strict(preset("demo"), max_words=True)
    with pytest.raises(InputError, match=r"ModelConfig.variant: expected one of \['full', 'w2r', 'o2w', 'no_reg'\], got 'both'"):
        ModelConfig.from_dict({"variant": "both"})
    with pytest.raises(InputError, match=r"ModelConfig.o2w_mlp: expected positive layer widths ending in 1, got \[8, 2\]"):
        replace_strict(preset("demo"), o2w_mlp=[8, 2])
    with pytest.raises(InputError, match=r"TrainConfig.negative_images: expected a bool, got str 'yes'"):
        TrainConfig.from_dict({"negative_images": "yes"})
    with pytest.raises(InputError, match=r"model preset 'huge': expected one of"):
        preset("huge")
    assert replace_strict(TrainConfig(), margin=1).margin == 1.0  # ints are fine where floats are expected


def test_input_sizes_from_store(tmp_path):
    from tests.conftest import build_store

    store = FeatureStore(build_store(tmp_path / "store", regions=5, region_dim=7, word_dim=6))
    sizes = input_sizes_of_split(store.split("train"), "glove50")
    assert sizes == {"region_count": 5, "region_dim": 7, "object_count": 4, "object_dim": 16, "word_dim": 6, "max_words": 8}
    cfg = with_input_sizes(preset("paper"), sizes)  # preset sizes are only defaults
    assert (cfg.region_count, cfg.region_dim, cfg.word_dim, cfg.w2r_hidden) == (5, 7, 6, 1024)
    user = replace_strict(preset("paper"), region_dim=512)
    with pytest.raises(InputError, match=r"ModelConfig.region_dim: set to 512, but the feature store has 7"):
        with_input_sizes(user, sizes, explicit={"region_dim"})


@pytest.mark.parametrize("attention", ["tanh", "scaled"])
def test_folded_model_scores_like_the_model_with_scales_and_temperature(attention):
    from training.model import reference_scores
    torch.manual_seed(0)
    config = replace_strict(preset("demo"), input_scaling=True, attention=attention)
    model = BSSAN(config).eval()
    rng = np.random.default_rng(1)
    scales = {"regions": rng.uniform(0.2, 5, config.region_dim), "objects": rng.uniform(0.2, 5, config.object_dim),
              "words": rng.uniform(0.2, 5, config.word_dim)}
    model.set_input_scales(scales)
    if attention == "scaled":
        with torch.no_grad():
            model.w2r.attn_log_temperature.fill_(0.9)
            model.o2w.attn_log_temperature.fill_(0.5)
    regions, objects = torch.randn(4, config.region_count, config.region_dim), torch.randn(4, config.object_count, config.object_dim)
    words, lengths = torch.randn(4, config.max_words, config.word_dim), torch.tensor([3, 8, 1, 5])
    folded = model.folded()
    assert torch.equal(folded.region_scale, torch.ones(config.region_dim))
    ours = model.score_matrix(regions, objects, words, lengths)
    assert torch.allclose(folded.score_matrix(regions, objects, words, lengths), ours, atol=1e-5)
    # the paper-as-written reference applies the same scales
    y, yp = reference_scores(model, regions, objects, words[:, :8], lengths)
    assert torch.allclose(model.combine(y, yp), ours.diagonal(), atol=1e-5)
    with pytest.raises(InputError, match="input scales words: expected shape"):
        model.set_input_scales({**scales, "words": np.ones(3)})
