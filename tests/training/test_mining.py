"""training.mining: first-stage hard negatives (with the false-negative guard), neighbour-grouped batches,
and a BSSAN run that mines them and selects through the two-stage protocol with a tuned fusion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.errors import InputError
from engine.ranking import Fusion
from engine.store import FeatureStore
from training.baseline import dual_encoder_preset
from training.checkpoint import ModelKind
from training.config import TrainConfig, preset
from training.data import ImageBatches
from training.mining import FirstStage, Mining, image_neighbours, mine
from training.train import FUSION, train

from tests.training.conftest import random_dual_checkpoint


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_first_stage_reads_its_own_store_of_the_same_data(tmp_path, tiny_store, dual_checkpoint):
    """TrainConfig.first_stage_store: the dual encoder embeds and scores from its own store (another extractor of
    the same images and captions); a store of other data is refused with one line."""
    import shutil

    from training.mining import aligned_split

    store = FeatureStore(tiny_store)
    copy = tmp_path / "own-store"
    shutil.copytree(tiny_store, copy)
    own = FeatureStore(copy)
    plain = FirstStage.load(dual_checkpoint, store, tmp_path / "plain")
    routed = FirstStage.load(dual_checkpoint, store, tmp_path / "routed", inputs=own)
    assert routed.inputs is own and np.array_equal(routed.image_vectors, plain.image_vectors)
    dev = store.split("dev") if "dev" in store.manifest["splits"] else store.split("test")
    assert np.array_equal(routed.scores(dev), plain.scores(dev))
    test = store.split("test")  # asked for "test", the store answers with its train split: other images
    with pytest.raises(InputError, match="first_stage_store .*: its test split .* is not the training store's"):
        aligned_split(_Renamed(own, "train"), test)


class _Renamed:
    """A store that answers every split with its split NAME (data that does not line up with the one asked for)."""

    def __init__(self, store, name):
        self.store, self.name, self.root = store, name, store.root

    def split(self, _name):
        return self.store.split(self.name)


def test_mined_captions_are_the_hardest_of_other_images_minus_near_duplicates():
    rng = np.random.default_rng(0)
    images = _unit(rng.normal(size=(6, 8)).astype(np.float32))
    caption_image = np.repeat(np.arange(6), 2)
    texts = _unit(images[caption_image] + 0.3 * rng.normal(size=(12, 8)).astype(np.float32))
    texts[4] = texts[0]  # image 2's first caption duplicates image 0's first caption: a false negative for image 0
    captions, hardest_images = mine(images, texts, caption_image, k=3, guard=0.95)
    assert captions.shape == (6, 3) and hardest_images.shape == (12, 3)
    assert 4 not in captions[0]  # guarded
    for i in range(6):
        row = captions[i][captions[i] >= 0]
        assert not np.isin(row, np.flatnonzero(caption_image == i)).any()  # never an own caption
        sims = images[i] @ texts.T
        assert np.all(np.diff(sims[row]) <= 1e-6)  # hardest first
    for c in range(12):
        assert caption_image[c] not in hardest_images[c]


def test_groups_visit_every_image_once_with_their_neighbours():
    rng = np.random.default_rng(1)
    vectors = _unit(rng.normal(size=(20, 4)).astype(np.float32))
    neighbours = image_neighbours(vectors, 6)
    assert neighbours.shape == (20, 6) and not (neighbours == np.arange(20)[:, None]).any()
    mining = Mining(np.zeros((20, 1), np.int64), np.zeros((60, 1), np.int64), 0.5, vectors, np.zeros((60, 4), np.float32), 0.9, neighbours)
    order = mining.group_order(rng.permutation(20), group=5)
    assert sorted(order.tolist()) == list(range(20))
    first = order[0]
    assert set(order[1:5].tolist()) <= set(neighbours[first].tolist())


def test_a_neighbour_share_below_one_leaves_some_seeds_alone_and_share_one_draws_nothing():
    from dataclasses import replace

    rng = np.random.default_rng(2)
    vectors = _unit(rng.normal(size=(200, 4)).astype(np.float32))
    mining = Mining(np.zeros((200, 1), np.int64), np.zeros((600, 1), np.int64), 0.5, vectors, np.zeros((600, 4), np.float32),
                    0.9, image_neighbours(vectors, 6))
    permutation = rng.permutation(200)
    grouped = mining.group_order(permutation, group=5, rng=np.random.default_rng(0))
    assert np.array_equal(grouped, mining.group_order(permutation, group=5))  # share 1: the rng is not needed
    half = replace(mining, neighbour_share=0.5)
    mixed = half.group_order(permutation, group=5, rng=np.random.default_rng(0))
    assert sorted(mixed.tolist()) == list(range(200))
    assert not np.array_equal(mixed, grouped)
    alone = replace(mining, neighbour_share=0.0).group_order(permutation, group=5, rng=np.random.default_rng(0))
    assert np.array_equal(alone, permutation)  # share 0: the shuffled order itself


@pytest.fixture(scope="module")
def dual_checkpoint(tmp_path_factory, tiny_store):
    return random_dual_checkpoint(tmp_path_factory.mktemp("first") / "dual", tiny_store)


def test_image_batches_draw_mined_negatives(tmp_path, tiny_store, dual_checkpoint):
    store = FeatureStore(tiny_store)
    config = TrainConfig(first_stage=str(dual_checkpoint), mined_fraction=1.0, mining_k=5, mining_guard=0.99)
    first = FirstStage.load(dual_checkpoint, store, tmp_path)
    mining = first.mining(config)
    split = store.split("train")
    batches = ImageBatches(split, "glove50", 6, seed=0, negative_images=True, mining=mining)
    batch = batches.batch(0, 0)
    n = len(batch)
    images = batch.image_ids.numpy()
    local = batch.pair_image[:n].numpy()
    mined = mining.captions_of_image[images[local]]
    # every negative caption comes from the anchor image's mined list (fraction 1, lists not empty)
    text_rows = batch.pair_text[n:2 * n].numpy() - n  # the negative caption of positive p is text row n + text_rows[p]
    caption_ids = _caption_ids_of_batch(batches, 0, 0)
    assert all(caption_ids[n + r] in mined[p] for p, r in enumerate(text_rows) if (mined[p] >= 0).any())
    assert (FirstStage.load(dual_checkpoint, store, tmp_path).image_vectors == first.image_vectors).all()  # cached
    assert list(tmp_path.glob("first_stage_*.npz")) and list(tmp_path.glob("mined_*.npz"))


def _caption_ids_of_batch(batches, epoch, index):
    """The split caption index of each text row of a batch (recomputed like ImageBatches.batch)."""
    images = batches._images(epoch, index, batches.order(epoch))
    groups = [batches._by_image[batches._starts[i]:batches._starts[i + 1]] for i in images]
    captions = np.concatenate(groups)
    rng = np.random.default_rng([batches.seed, epoch, index])
    from training.loss import sample_negative_captions
    negatives = sample_negative_captions(batches.caption_image, rng, anchors=captions)
    local = np.repeat(np.arange(len(images)), [len(g) for g in groups])
    mined, use = batches.mining.pick_captions(images[local], rng)
    return np.concatenate([captions, np.where(use, mined, negatives)])


def test_a_mined_run_selects_through_the_two_stage_protocol_and_records_the_fusion(tmp_path, train_store):
    torch.manual_seed(0)
    dual = tmp_path / "dual"
    train(train_store, dual, ModelKind.DUAL_ENCODER, dual_encoder_preset("demo"),
          TrainConfig(epochs=2, batch_size=32, negative_images=True, lr=5e-3), progress=False, plot=False)
    config = TrainConfig(epochs=2, batch_images=6, negative_images=True, lr=5e-3, first_stage=str(dual / "best"),
                         mined_fraction=0.5, mining_k=5, dev_k=5)
    model_config = preset("demo")
    metrics = train(train_store, tmp_path / "bssan", ModelKind.BSSAN, model_config, config, progress=False, plot=False)
    for record in metrics["dev"]:
        fusion = record["fusion"]
        assert fusion["k"] == 5 and fusion["grid"][0]["bssan_weight"] == 0.0
        assert fusion["rsum"] >= fusion["first_stage_alone"]  # tuned on this split: never below the first stage
        assert record["dev"]["protocol"]["k"] == 5
    saved = json.loads((tmp_path / "bssan" / "best" / FUSION).read_text())
    Fusion.from_dict(saved)
    from engine.files import file_sha256
    assert saved["first_stage_sha256"] == file_sha256(dual / "best" / "weights.pt")  # binds it to this first stage


def test_residual_training_adds_the_first_stage_to_a_second_hinge(tmp_path, train_store):
    torch.manual_seed(0)
    dual = tmp_path / "dual"
    train(train_store, dual, ModelKind.DUAL_ENCODER, dual_encoder_preset("demo"),
          TrainConfig(epochs=1, batch_size=32, lr=5e-3), progress=False, plot=False)
    store = FeatureStore(train_store)
    config = TrainConfig(epochs=1, batch_images=6, negative_images=True, first_stage=str(dual / "best"), residual_weight=2.0)
    mining = FirstStage.load(dual / "best", store, tmp_path).mining(config)
    batches = ImageBatches(store.split("train"), "glove50", 6, seed=0, negative_images=True, mining=mining)
    batch = batches.batch(0, 0)
    assert batch.first_stage.shape == batch.pair_image.shape
    images = batch.image_ids.numpy()[batch.pair_image.numpy()]
    i = 3  # a positive pair: its text row is one of the batch's own captions
    caption = batch.caption_ids[batch.pair_text[i].item()].item()
    assert batch.first_stage[i].item() == pytest.approx(float(mining.image_vectors[images[i]] @ mining.text_vectors[caption]), abs=1e-5)
    from training.train import bssan_grouped_step
    from training.model import BSSAN
    model = BSSAN(preset("demo"))
    plain = bssan_grouped_step(model, batch, TrainConfig(batch_images=6, negative_images=True))
    residual = bssan_grouped_step(model, batch, config)
    assert residual.item() > plain.item()  # a second, non-negative hinge term
    with pytest.raises(Exception, match="residual_weight"):
        TrainConfig(residual_weight=1.0)


def test_negative_lists_hold_m_distinct_mined_captions_and_ranked_batch_images(tmp_path, tiny_store, dual_checkpoint):
    store = FeatureStore(tiny_store)
    config = TrainConfig(first_stage=str(dual_checkpoint), mined_fraction=1.0, mining_k=5, mining_guard=0.99)
    mining = FirstStage.load(dual_checkpoint, store, tmp_path).mining(config)
    split = store.split("train")
    m = 3
    batches = ImageBatches(split, "glove50", 6, seed=0, negative_images=True, mining=mining, negatives_per_kind=m)
    batch = batches.batch(0, 0)
    n, images = len(batch), batch.image_ids.numpy()
    assert batch.kinds == 1 + 2 * m and batch.caption_kinds == m and batch.pair_image.shape == ((1 + 2 * m) * n,)
    local = batch.pair_image[:n].numpy()
    own = images[local]
    caption_image = np.asarray(split.caption_image)
    words = np.asarray(split.words("glove50"))
    text_ids = [_row_of_words(words, batch.words[r].numpy(), int(batch.lengths[r])) for r in range(len(batch.words))]
    mined = mining.captions_of_image[own]  # [n, k]
    for p in range(n):
        negs = [text_ids[batch.pair_text[(1 + j) * n + p].item()] for j in range(m)]
        assert all(caption_image[c] != own[p] for c in negs)  # other images' captions
        valid = mined[p][mined[p] >= 0]
        assert len(set(negs) & set(valid.tolist())) == min(m, len(valid))  # fraction 1: the list fills the slots, distinct
        picked = images[[batch.pair_image[(1 + m + j) * n + p].item() for j in range(m)]]
        assert len(set(picked.tolist())) == m and own[p] not in picked  # m distinct other images of the batch
        ranked = mining.ranked_in_batch(batch.caption_ids.numpy()[p:p + 1], local[p:p + 1], images, m)[0]
        assert set(images[ranked[ranked >= 0]].tolist()) <= set(picked.tolist())  # the first stage's highest first
    assert torch.equal(batches.batch(0, 0).pair_image, batch.pair_image)  # a pure function of (seed, epoch, batch)


def _row_of_words(words, row, length):
    """The split caption index whose word vectors equal `row` (first `length` words)."""
    return int(np.flatnonzero((words[:, :length] == row[:length]).all(axis=(1, 2)))[0])


def test_listwise_training_runs_and_its_loss_is_a_cross_entropy(tmp_path, train_store):
    torch.manual_seed(0)
    dual = tmp_path / "dual"
    train(train_store, dual, ModelKind.DUAL_ENCODER, dual_encoder_preset("demo"),
          TrainConfig(epochs=1, batch_size=32, lr=5e-3), progress=False, plot=False)
    config = TrainConfig(epochs=2, batch_images=6, negative_images=True, lr=5e-3, first_stage=str(dual / "best"),
                         mined_fraction=0.5, mining_k=5, dev_k=5, negatives_per_kind=3, loss="listwise")
    metrics = train(train_store, tmp_path / "bssan", ModelKind.BSSAN, preset("demo"), config, progress=False, plot=False)
    losses = [record["loss"] for record in metrics["dev"]]
    assert losses[1] < losses[0] and all(np.isfinite(losses))
    # the step's loss is the cross-entropy: with flat logits (temperature -> inf) each of the two softmaxes per branch
    # (caption negatives, image negatives) of 1 + 3 entries costs log 4; branches weigh 1 and lambda; plus delta L_reg
    from dataclasses import replace as dc_replace
    from training.checkpoint import load_checkpoint
    from training.train import bssan_grouped_step
    store = FeatureStore(train_store)
    model = load_checkpoint(tmp_path / "bssan" / "last").model.train()
    mining = FirstStage.load(dual / "best", store, tmp_path / "bssan").mining(config)
    batch = ImageBatches(store.split("train"), "glove50", 6, seed=0, negative_images=True, mining=mining,
                         negatives_per_kind=3).batch(0, 0)
    flat = bssan_grouped_step(model, batch, dc_replace(config, list_temperature=1e12)).item()
    w_y, w_yp = model.config.branch_weights
    from training.loss import weight_penalty
    chance = (w_y + w_yp) * 2 * np.log(4) + model.config.effective_reg_weight * weight_penalty(model).item()
    assert flat == pytest.approx(chance, rel=1e-5)
    with pytest.raises(Exception, match="negatives_per_kind"):
        TrainConfig(negatives_per_kind=2)  # needs image-grouped batches


def test_listwise_loss_by_hand():
    from training.loss import listwise
    pos, negs = torch.tensor([1.0, 0.0]), [torch.tensor([0.0, 0.0]), torch.tensor([-1.0, 2.0])]
    expected = [-np.log(np.exp(10) / (np.exp(10) + 1 + np.exp(-10))), -np.log(1 / (1 + 1 + np.exp(20)))]
    assert listwise(pos, negs, 0.1).item() == pytest.approx(np.mean(expected), rel=1e-5)


def test_grid_listwise_by_hand():
    from training.loss import grid_listwise
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(3, 5))
    own = np.array([0, 0, 1, 2, 2])  # caption j belongs to image own[j]
    ignore = np.zeros((3, 5), bool)
    ignore[1, 0] = True  # caption 0 (image 0) is a near-duplicate for image 1: neither positive nor negative there
    t = 0.5
    expected = []
    for j in range(5):
        i = own[j]
        images = [r for r in range(3) if r == i or not ignore[r, j]]  # text -> image: every non-ignored image
        to_image = -np.log(np.exp(scores[i, j] / t) / sum(np.exp(scores[r, j] / t) for r in images))
        texts = [j] + [k for k in range(5) if own[k] != i and not ignore[i, k]]  # image -> text: other images' captions
        to_text = -np.log(np.exp(scores[i, j] / t) / sum(np.exp(scores[i, k] / t) for k in texts))
        expected.append(to_image + to_text)
    got = grid_listwise(torch.tensor(scores), torch.tensor(own), torch.tensor(ignore), t)
    assert got.item() == pytest.approx(np.mean(expected), rel=1e-9)
    unmasked = grid_listwise(torch.tensor(scores), torch.tensor(own), None, t)
    assert unmasked.item() != pytest.approx(got.item())  # the mask matters


def test_grid_batches_hold_positives_only_and_mask_near_duplicates(tiny_store, dual_checkpoint, tmp_path):
    split = FeatureStore(tiny_store).split("train")
    first = FirstStage.load(dual_checkpoint, FeatureStore(tiny_store), tmp_path)
    mining = first.mining(TrainConfig(first_stage=str(dual_checkpoint), mined_fraction=0.5, mining_k=5, mining_guard=0.0))
    batches = ImageBatches(split, "glove50", 4, seed=0, negative_images=True, mining=mining, grid=True)
    batch = batches.batch(0, 0)
    n = len(batch)
    assert batch.kinds == 1 and batch.caption_kinds == 0 and batch.words.shape[0] == n  # no sampled negatives
    local = batch.pair_image.numpy()
    images, captions = batch.image_ids.numpy(), batch.caption_ids.numpy()
    ignore = batch.ignore.numpy()
    assert ignore.shape == (len(images), n) and not ignore[local, np.arange(n)].any()  # a positive is never ignored
    text, vectors = mining.text_vectors, mining.image_vectors
    for i in range(len(images)):
        for j in range(n):
            if local[j] == i:
                continue
            near = (text[captions[local == i]] @ text[captions[j]]).max() > 0.0 or vectors[images[i]] @ vectors[images[local[j]]] > 0.0
            assert ignore[i, j] == near
    with pytest.raises(Exception, match="loss=grid"):
        TrainConfig(loss="grid")  # needs image-grouped batches


def test_grid_training_runs_and_reports_exhaustive_dev(tmp_path, train_store):
    torch.manual_seed(0)
    dual = tmp_path / "dual"
    train(train_store, dual, ModelKind.DUAL_ENCODER, dual_encoder_preset("demo"),
          TrainConfig(epochs=1, batch_size=32, lr=5e-3), progress=False, plot=False)
    config = TrainConfig(epochs=2, batch_images=6, lr=5e-3, first_stage=str(dual / "best"), mined_fraction=0.5,
                         mining_k=5, dev_k=5, loss="grid", dev_exhaustive_images=8)
    metrics = train(train_store, tmp_path / "bssan", ModelKind.BSSAN, preset("demo"), config, progress=False, plot=False)
    losses = [record["loss"] for record in metrics["dev"]]
    assert losses[1] < losses[0] and all(np.isfinite(losses))
    exhaustive = metrics["dev"][-1]["fusion"]["exhaustive"]
    assert exhaustive["images"] == 8 and 0 <= exhaustive["rsum"] <= 600
    assert exhaustive["protocol"] == {"k": None, "fusion": {"first_stage_weight": 0.0, "bssan_weight": 1.0}}  # BSSAN alone
    # fine-tuning from that run: it starts from its weights (and input scales); a different model config is refused
    from training.checkpoint import load_checkpoint
    from training.train import INITIAL_WEIGHTS
    train(train_store, tmp_path / "tuned", ModelKind.BSSAN, preset("demo"),
          TrainConfig(epochs=1, batch_images=6, lr=5e-3, first_stage=str(dual / "best"), mined_fraction=0.5,
                      mining_k=5, dev_k=5, init_from=str(tmp_path / "bssan" / "last")), progress=False, plot=False)
    start = torch.load(tmp_path / "tuned" / INITIAL_WEIGHTS, weights_only=True)
    source = load_checkpoint(tmp_path / "bssan" / "last").model.state_dict()
    assert start.keys() == source.keys() and all(torch.equal(start[k], source[k]) for k in source)
    with pytest.raises(Exception, match="init_from"):
        train(train_store, tmp_path / "other", ModelKind.BSSAN, preset("demo").__class__(**{**preset("demo").__dict__, "w2r_hidden": 4}),
              TrainConfig(epochs=1, batch_images=6, init_from=str(tmp_path / "bssan" / "last")), progress=False, plot=False)


def test_input_dropout_changes_training_inputs_only(tiny_store):
    from training.train import dropped_inputs
    split = FeatureStore(tiny_store).split("train")
    batch = ImageBatches(split, "glove50", 4, seed=0, grid=True).batch(0, 0)
    assert dropped_inputs(batch, TrainConfig(batch_images=4)) is batch  # p = 0: the batch itself
    torch.manual_seed(0)
    dropped = dropped_inputs(batch, TrainConfig(batch_images=4, input_dropout=0.5))
    for name in ("regions", "objects", "words"):
        before, after = getattr(batch, name), getattr(dropped, name)
        zeroed = (after == 0) & (before != 0)
        assert 0.3 < zeroed.float().sum() / (before != 0).sum() < 0.7  # about half of the features dropped
        kept = after != 0
        assert torch.allclose(after[kept], 2 * before[kept])  # the rest scaled by 1 / (1 - p)
        assert torch.equal(getattr(batch, name), before)  # the batch itself untouched
    assert torch.equal(dropped.lengths, batch.lengths) and torch.equal(dropped.pair_image, batch.pair_image)
    with pytest.raises(InputError, match="input_dropout"):
        TrainConfig(input_dropout=0.2)  # pair batches: not supported
    with pytest.raises(InputError, match="input_dropout"):
        TrainConfig(batch_images=4, input_dropout=1.0)


def test_state_dropout_acts_in_training_only(tiny_store, tmp_path):
    """state_dropout drops each branch's matching state (W2R's h before its MLP, O2W's v_j) in training mode only: an
    eval-mode model scores as without it, and the trainer sets it on both branches."""
    from training.model import BSSAN

    split = FeatureStore(tiny_store).split("train")
    batch = ImageBatches(split, "glove50", 4, seed=0, grid=True).batch(0, 0)
    config = preset("demo").__class__(**{**preset("demo").__dict__, "region_dim": batch.regions.shape[-1],
                                         "object_dim": batch.objects.shape[-1], "word_dim": batch.words.shape[-1],
                                         "region_count": batch.regions.shape[1], "object_count": batch.objects.shape[1]})
    torch.manual_seed(0)
    model = BSSAN(config)
    def forward_grid():
        images, texts = model.encode_images(batch.regions, batch.objects), model.encode_texts(batch.words, batch.lengths)
        return model.score_grid_cached(images, texts)

    model.eval()
    plain = forward_grid()
    for branch in (model.w2r, model.o2w):
        branch.state_dropout = 0.5
    again = forward_grid()
    assert all(torch.equal(a, b) for a, b in zip(plain, again))  # eval: no dropout
    model.train()
    torch.manual_seed(1)
    dropped = forward_grid()
    for branch in (model.w2r, model.o2w):
        branch.state_dropout = 0.0
    torch.manual_seed(1)
    kept = forward_grid()
    assert not torch.equal(dropped[0], kept[0]) and not torch.equal(dropped[1], kept[1])  # both branches dropped
    with pytest.raises(InputError, match="state_dropout"):
        TrainConfig(state_dropout=1.0)
    assert TrainConfig(state_dropout=0.3).to_dict()["state_dropout"] == 0.3


def test_lstm_forget_bias_initialisation():
    """lstm_forget_bias sets the forget slice of every LSTM's b_ih (both directions of O2W's Bi-LSTM), zeroes b_hh's,
    and leaves the other gates' biases as nn.LSTM drew them."""
    from training.model import BSSAN
    from training.train import set_forget_bias

    torch.manual_seed(0)
    model = BSSAN(preset("demo"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_forget_bias(model, 1.0)
    lstms = [m for m in model.modules() if isinstance(m, torch.nn.LSTM)]
    assert len(lstms) == 2
    for lstm in lstms:
        h = lstm.hidden_size
        for name, bias in lstm.named_parameters():
            if name.startswith("bias_"):
                assert torch.all(bias[h:2 * h] == (1.0 if name.startswith("bias_ih") else 0.0)), name
    after = model.state_dict()
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed and all("bias_" in k for k in changed)
    assert TrainConfig(lstm_forget_bias=1.0).to_dict()["lstm_forget_bias"] == 1.0
