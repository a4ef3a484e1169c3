"""Dual-encoder baseline: packed-equivalent text encoder, dot-product scores, the VSE loss by hand, training, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from engine.errors import InputError
from engine.metrics import retrieval_metrics
from training.baseline import DualEncoder, dual_encoder_loss, dual_encoder_preset, reverse_within_length
from training.checkpoint import ModelKind
from training.config import Reduction, TrainConfig
from training.train import train


@pytest.fixture
def model() -> DualEncoder:
    torch.manual_seed(0)
    return DualEncoder(dual_encoder_preset("demo")).eval()


def _pooled(**changes) -> DualEncoder:
    torch.manual_seed(0)
    config = dual_encoder_preset("demo")
    for key, value in {"image_pool": "max", "text_pool": "max", "word_residual": True, **changes}.items():
        setattr(config, key, value)
    return DualEncoder(config).eval()


@pytest.fixture(params=["last", "max"])
def any_model(request) -> DualEncoder:
    """The default encoders and the max-pooled ones (image_pool=max, text_pool=max, word_residual)."""
    if request.param == "last":
        torch.manual_seed(0)
        return DualEncoder(dual_encoder_preset("demo")).eval()
    return _pooled()


def _captions(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([8, 3, 1, 5, 2, 8])
    words = torch.randn(6, 8, 12, generator=g) * (torch.arange(8)[None, :, None] < lengths[:, None, None])
    return words, lengths


def test_text_encoder_equals_a_packed_bidirectional_gru(model):
    words, lengths = _captions()
    reference = torch.nn.GRU(12, 8, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(reference, name).copy_(getattr(model.forward_gru, name))
            getattr(reference, name + "_reverse").copy_(getattr(model.backward_gru, name))
        _, final = reference(pack_padded_sequence(words, lengths, batch_first=True, enforce_sorted=False))  # [2, B, H]
        expected = torch.nn.functional.normalize(model.text_proj(torch.cat([final[0], final[1]], dim=1)), dim=1)
        torch.testing.assert_close(model.encode_texts(words, lengths), expected, rtol=0, atol=1e-6)


def test_padding_never_changes_a_caption_vector(any_model):
    model = any_model
    words, lengths = _captions()
    noisy = words.clone()
    noisy[1, 3:] = 7.0  # junk past caption 1's length
    with torch.no_grad():
        assert torch.equal(model.encode_texts(noisy, lengths)[1], model.encode_texts(words, lengths)[1])
        longer = torch.nn.functional.pad(words, (0, 0, 0, 4))  # more padding columns
        torch.testing.assert_close(model.encode_texts(longer, lengths), model.encode_texts(words, lengths), rtol=0, atol=1e-6)


def test_reverse_within_length():
    words = torch.arange(4.0)[None, :, None].repeat(2, 1, 1)  # [2, 4, 1]
    out = reverse_within_length(words, torch.tensor([3, 1]))[..., 0]
    assert out.tolist() == [[2, 1, 0, 3], [0, 1, 2, 3]]


def test_scores_are_dot_products_of_unit_vectors(model):
    g = torch.Generator().manual_seed(2)
    regions, objects = torch.randn(4, 9, 16, generator=g), torch.randn(4, 4, 16, generator=g)
    words, lengths = _captions()
    with torch.no_grad():
        images, texts = model.encode_images(regions, objects), model.encode_texts(words, lengths)
        torch.testing.assert_close(images.norm(dim=1), torch.ones(4))
        torch.testing.assert_close(texts.norm(dim=1), torch.ones(6))
        torch.testing.assert_close(model(regions, objects, words, lengths), images @ texts.t())
    blocked = model.score_matrix(regions.numpy(), objects.numpy(), words.numpy(), lengths.numpy(), image_block=3, caption_block=4)
    torch.testing.assert_close(blocked, images @ texts.t(), rtol=0, atol=1e-6)


def test_wrong_shapes_are_input_errors(model):
    words, lengths = _captions()
    with pytest.raises(InputError, match=r"regions: expected shape \[N, 9, 16\], got \[2, 9, 15\]"):
        model.embed_images(torch.zeros(2, 9, 15), torch.zeros(2, 4, 16))
    with pytest.raises(InputError, match=r"lengths: expected caption lengths in \[1, 8\], got \[0, 8\]"):
        model.embed_texts(words, torch.tensor([8, 3, 0, 5, 2, 8]))


def test_loss_by_hand():
    grid = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.4, 0.35], [0.8, 0.0, 0.7]])
    same_image = torch.eye(3, dtype=torch.bool)
    same_image[0, 2] = same_image[2, 0] = True  # pairs 0 and 2 share an image: never negatives of each other
    m = 0.2
    # caption negatives per image (rows): row 0: 0.5 -> max(0, .2-.9+.5)=0; row 1: .2-.4+.2=0, .2-.4+.35=.15; row 2: .2-.7+0=0
    assert dual_encoder_loss(grid, same_image, m).item() == pytest.approx(0.15)
    # image negatives per caption (columns): col 0: .2-.9+.2=0; col 1: .2-.4+.5=.3 (.0 -> 0); col 2: .2-.7+.35=0
    assert dual_encoder_loss(grid, same_image, m, negative_images=True).item() == pytest.approx(0.45)
    grid2 = grid.clone()
    grid2[1, 0] = 0.55  # row 1 now has two violations: .35 and .15; hardest takes .35, sum .5
    assert dual_encoder_loss(grid2, same_image, m).item() == pytest.approx(0.5)
    assert dual_encoder_loss(grid2, same_image, m, hardest=True).item() == pytest.approx(0.35)
    # MEAN: the mean hinge over every (anchor, negative) pair: 4 negative cells of the 3x3 grid
    assert dual_encoder_loss(grid2, same_image, m, reduction=Reduction.MEAN).item() == pytest.approx(0.5 / 4)


def test_max_pooling_by_hand():
    model = _pooled()
    words, lengths = _captions()
    g = torch.Generator().manual_seed(3)
    regions, objects = torch.randn(2, 9, 16, generator=g), torch.randn(2, 4, 16, generator=g)
    with torch.no_grad():
        image = torch.cat([model.region_embed(regions), model.object_embed(objects)], dim=1).max(dim=1).values
        torch.testing.assert_close(model.encode_images(regions, objects), torch.nn.functional.normalize(image, dim=1))
        n = int(lengths[3])  # caption 3 alone, unpadded: forward GRU over it, backward GRU over it reversed
        one = words[3:4, :n]
        forward = model.forward_gru(one)[0][0]  # [n, H]
        backward = model.backward_gru(one.flip(1))[0][0].flip(0)  # [n, H], back in word order
        per_word = model.text_proj(torch.cat([forward, backward], dim=1)) + model.word_proj(one[0])
        expected = torch.nn.functional.normalize(per_word.max(dim=0).values, dim=0)
        torch.testing.assert_close(model.encode_texts(words, lengths)[3], expected, rtol=0, atol=1e-6)


def test_pooling_options_are_checked():
    config = dual_encoder_preset("demo")
    config.image_pool = "gpo"
    with pytest.raises(InputError, match="image_pool"):
        config.__post_init__()
    config = dual_encoder_preset("demo")
    config.word_residual = True
    with pytest.raises(InputError, match="word_residual"):
        config.__post_init__()


def test_trains_above_chance_with_training_train(tmp_path, train_store):
    torch.set_num_threads(1)
    config = TrainConfig(epochs=4, batch_size=32, negative_images=True, lr=5e-3)  # tiny model: a larger AdamW step
    metrics = train(train_store, tmp_path / "run", ModelKind.DUAL_ENCODER, dual_encoder_preset("demo"), config,
                    progress=False, plot=False)
    losses = [h["loss"] for h in metrics["dev"]]
    assert losses[-1] < losses[0] / 2
    chance = np.mean([retrieval_metrics(np.random.default_rng(s).normal(size=(30, 150)), 5)["rsum"] for s in range(50)])
    assert max(h["dev"]["rsum"] for h in metrics["dev"]) > chance + 100  # chance ~103 on 30 images


def test_encoders_export_to_onnx_with_dynamic_batch_and_length(tmp_path, any_model):
    model = any_model
    pytest.importorskip("onnx", reason="export needs onnx (the export extra)")
    ort = pytest.importorskip("onnxruntime")

    class Texts(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, words, lengths):
            return self.m.encode_texts(words, lengths)

    words, lengths = _captions()
    torch.onnx.export(Texts(model), (words, lengths), tmp_path / "text.onnx", dynamo=False, opset_version=17,
                      input_names=["words", "lengths"], output_names=["vectors"],
                      dynamic_axes={"words": {0: "B_txt", 1: "L"}, "lengths": {0: "B_txt"}, "vectors": {0: "B_txt"}})
    session = ort.InferenceSession(str(tmp_path / "text.onnx"), providers=["CPUExecutionProvider"])
    other_words, other_lengths = words[:3, :5], torch.tensor([5, 2, 1])  # new batch size and length
    got = session.run(None, {"words": other_words.numpy(), "lengths": other_lengths.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model.encode_texts(other_words, other_lengths).numpy(), atol=1e-5)
