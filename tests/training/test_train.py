"""python -m training.train: learning, bit-exact resume after a simulated kill, run-dir safety, batches, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from engine.errors import InputError, StoreError
from engine.metrics import retrieval_metrics
from engine.store import FeatureStore
from training.checkpoint import TRAIN_STATE, WEIGHTS, ModelKind, build_model, load_checkpoint, load_train_state
from training.config import Schedule, TrainConfig, paper_recipe, preset, replace_strict
from training.data import ImageBatches, PairBatches
from training.train import SimulatedKill, learning_rate, main, train

FAST = dict(progress=False, plot=False)


def _weights(path):
    return torch.load(path / WEIGHTS, weights_only=True)


def test_training_lowers_the_loss_and_beats_chance_on_dev(tmp_path, train_store):
    config = TrainConfig(epochs=5, batch_size=32, lr=5e-3)  # the demo model is tiny: a larger AdamW step
    metrics = train(train_store, tmp_path / "run", ModelKind.BSSAN, preset("demo"), config, **FAST)
    history = metrics["dev"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    chance = np.mean([retrieval_metrics(np.random.default_rng(s).normal(size=(30, 150)), 5)["rsum"] for s in range(50)])
    best = max(h["dev"]["rsum"] for h in history)
    assert best > chance + 60, (best, chance)  # chance ~103 on 30 images; 5 epochs reach ~230
    best_ckpt = load_checkpoint(tmp_path / "run" / "best")
    assert best_ckpt.metrics["best_dev"]["rsum"] == best
    assert history[best_ckpt.metrics["best_epoch"] - 1]["dev"]["rsum"] == best
    assert load_train_state(tmp_path / "run" / "best") is None and (tmp_path / "run" / "last" / TRAIN_STATE).is_file()


@pytest.mark.parametrize("batch_images", [0, 12])  # pair batches; image-grouped batches (5 per epoch too)
def test_resume_after_a_kill_is_bit_identical(tmp_path, train_store, batch_images):
    config = TrainConfig(epochs=2, batch_size=64, batch_images=batch_images, negative_images=True)  # 5 batches per epoch
    model_config = preset("demo")
    reference = train(train_store, tmp_path / "straight", ModelKind.BSSAN, model_config, config, **FAST)
    run = tmp_path / "interrupted"
    with pytest.raises(SimulatedKill):  # killed mid-epoch 1, two batches after the last save
        train(train_store, run, ModelKind.BSSAN, model_config, config, save_every=1e9, save_every_batches=2,
              stop_after_batches=4 - 1 + 2, **FAST)
    assert load_train_state(run / "last")["position"]["batch"] == 4
    with pytest.raises(SimulatedKill):  # resumed at batch 4, killed in epoch 2 (crossing the dev evaluation)
        train(train_store, run, ModelKind.BSSAN, model_config, config, save_every=1e9, save_every_batches=2,
              stop_after_batches=4, **FAST)
    resumed = train(train_store, run, ModelKind.BSSAN, model_config, config, save_every=1e9, save_every_batches=2, **FAST)
    assert [_strip(h) for h in resumed["dev"]] == [_strip(h) for h in reference["dev"]]  # losses and dev metrics, exactly
    assert load_checkpoint(run / "last").metrics["best_dev"] == reference["best_dev"]  # kept across the resumes
    for name in ("last", "best"):
        ours, theirs = _weights(run / name), _weights(tmp_path / "straight" / name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    state, expected = load_train_state(run / "last"), load_train_state(tmp_path / "straight" / "last")
    for key, value in expected["optimizer"]["state"].items():  # AdamW's moments and step counts, exactly
        assert value.keys() == state["optimizer"]["state"][key].keys()
        assert all(torch.equal(state["optimizer"]["state"][key][k], v) for k, v in value.items())
    assert state["grad_norms"] == expected["grad_norms"]


def _strip(record: dict) -> dict:
    """An epoch record without its wall-clock fields."""
    return {k: v for k, v in record.items() if k not in ("dev_seconds", "train_pairs_per_second", "epoch_seconds", "peak_rss_mb")}


def test_rerunning_a_finished_run_changes_nothing_and_more_epochs_continue(tmp_path, train_store):
    config = TrainConfig(epochs=1, batch_size=128)
    first = train(train_store, tmp_path / "run", ModelKind.BSSAN, preset("demo"), config, **FAST)
    weights = _weights(tmp_path / "run" / "last")
    again = train(train_store, tmp_path / "run", ModelKind.BSSAN, preset("demo"), config, **FAST)
    assert again["dev"] == first["dev"]
    assert all(torch.equal(weights[k], v) for k, v in _weights(tmp_path / "run" / "last").items())
    longer = train(train_store, tmp_path / "run", ModelKind.BSSAN, preset("demo"), replace_strict(config, epochs=2), **FAST)
    assert [h["epoch"] for h in longer["dev"]] == [1, 2]


def test_refuses_a_run_dir_of_a_different_config(tmp_path, train_store):
    config = TrainConfig(epochs=1, batch_size=128)
    train(train_store, tmp_path / "run", ModelKind.BSSAN, preset("demo"), config, **FAST)
    with pytest.raises(InputError, match=r"run.json: this run directory holds a run with a different config \(train.margin: 0.2 -> 0.5\)"):
        train(train_store, tmp_path / "run", ModelKind.BSSAN, preset("demo"), replace_strict(config, margin=0.5), **FAST)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="other: exists, is not empty and has no run.json"):
        train(train_store, tmp_path / "other", ModelKind.BSSAN, preset("demo"), config, **FAST)


def test_one_trainer_per_run_dir(tmp_path, train_store):
    import fcntl

    config = TrainConfig(epochs=1, batch_size=128)
    train(train_store, tmp_path / "run", ModelKind.BSSAN, preset("demo"), config, **FAST)
    with open(tmp_path / "run" / ".lock", "w") as held:  # as if another trainer were running
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(InputError, match="run: another training.train is running in this run directory"):
            train(train_store, tmp_path / "run", ModelKind.BSSAN, preset("demo"), config, **FAST)


def test_hardest_negatives_and_softmax_negatives_train(tmp_path, train_store):
    model_config = replace_strict(preset("demo"), negative_attention="softmax", variant="w2r")
    config = TrainConfig(epochs=1, batch_size=32, hardest_negatives=True, negative_images=True)
    metrics = train(train_store, tmp_path / "run", ModelKind.BSSAN, model_config, config, **FAST)
    assert np.isfinite(metrics["dev"][0]["loss"]) and metrics["dev"][0]["loss"] > 0


def test_learning_rate_step_decay():
    assert [learning_rate(TrainConfig(lr=0.1, lr_decay_every=2, lr_decay=0.5, schedule=Schedule.STEP, warmup_epochs=0), e) for e in range(5)] == [0.1, 0.1, 0.05, 0.05, 0.025]
    assert learning_rate(paper_recipe(), 9) == 0.01  # the paper's constant SGD lr


def test_learning_rate_warms_up_then_follows_a_cosine_to_the_floor():
    config = TrainConfig(lr=1e-3, epochs=4, warmup_epochs=0.5, min_lr_ratio=0.1)
    steps = 10  # batches per epoch: warm-up is 5 batches
    lrs = [learning_rate(config, e, b, steps) for e in range(4) for b in range(steps)]
    assert lrs[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # never rises after warm-up
    assert lrs[-1] == pytest.approx(1e-4, rel=0.02)
    with pytest.raises(InputError, match="a step decay goes with schedule=step"):
        TrainConfig(lr_decay_every=2)


def test_runs_log_gradient_norms_clipping_and_parameter_movement(tmp_path, train_store):
    config = TrainConfig(epochs=2, batch_size=32, lr=5e-3, grad_clip=0.05)  # a clip that acts on most steps
    metrics = train(train_store, tmp_path / "run", ModelKind.BSSAN, preset("demo"), config, **FAST)
    for record in metrics["dev"]:
        assert record["grad_norm_max"] >= record["grad_norm_median"] > 0
        assert 0.5 <= record["clipped_share"] <= 1.0
    movement = metrics["parameter_movement"]
    assert set(movement) == {name for name, _ in build_model(ModelKind.BSSAN, preset("demo").to_dict())[0].named_parameters()}
    # every tensor moved; the scalar bias of each MLP's last layer cancels in the hinge's differences
    assert all(m["absolute_change"] > 0 for m in movement.values() if m["numel"] > 1)
    assert movement["w2r.attn_weight"]["correlation"] < 0.9999  # the attention matrix trained: not its init
    assert json.loads((tmp_path / "run" / "movement.json").read_text()) == movement


def test_the_paper_recipe_is_reachable_from_the_command_line(tmp_path, train_store):
    out = tmp_path / "run"
    assert main(["--store", str(train_store), "--out", str(out), "--preset", "demo", "--recipe", "paper",
                 "--epochs", "1", "--no-progress"]) == 0
    train_config = json.loads((out / "run.json").read_text())["train"]
    assert (train_config["optimizer"], train_config["lr"], train_config["reduction"]) == ("sgd", 0.01, "sum")


# ---------------------------------------------------------------------------------------------
# Batches


def test_batches_cover_every_caption_with_negatives_of_other_images(train_store):
    split = FeatureStore(train_store).split("train")
    batches = PairBatches(split, "glove50", batch_size=64, seed=3, negative_images=True)
    caption_image = np.asarray(split.caption_image)
    seen = []
    for index in range(batches.num_batches):
        batch = batches.batch(0, index)
        seen += batch.caption_ids.tolist()
        assert batch.regions.dtype == torch.float32 and batch.words.shape[1] == int(batch.lengths.max())
        assert torch.equal(batch.regions, torch.from_numpy(np.asarray(split.regions[batch.image_ids.numpy()], dtype=np.float32)))
        assert (caption_image[batch.caption_ids.numpy()] == batch.image_ids.numpy()).all()
        assert batch.negative_words.shape[0] == len(batch) and batch.negative_regions.shape[0] == len(batch)
    assert sorted(seen) == list(range(split.num_captions))
    again = batches.batch(0, 2)
    assert torch.equal(again.negative_words, batches.batch(0, 2).negative_words)  # a pure function of (seed, epoch, batch)
    assert not torch.equal(batches.batch(1, 2).caption_ids, again.caption_ids)  # reshuffled every epoch


def test_image_batches_hold_every_caption_of_their_images_and_negatives_of_other_images(train_store):
    split = FeatureStore(train_store).split("train")
    batches = ImageBatches(split, "glove50", batch_images=12, seed=3, negative_images=True)
    caption_image = np.asarray(split.caption_image)
    seen = []
    for index in range(batches.num_batches):
        batch = batches.batch(1, index)
        n, images = len(batch), batch.image_ids.numpy()
        assert batch.kinds == 3 and batch.pair_image.shape == (3 * n,) and batch.negative.sum() == 2 * n
        assert batches.batch_pairs(1, index) == n
        assert sorted(batch.caption_ids.tolist()) == sorted(np.flatnonzero(np.isin(caption_image, images)).tolist())
        own = images[batch.pair_image[:n].numpy()]
        assert (own == caption_image[batch.caption_ids.numpy()]).all()  # positives: each caption with its image
        negative_captions = np.asarray(split.caption_image)[_caption_rows(batch, batches, 1, index)]
        assert (negative_captions != own).all()  # sampled captions of other images
        assert (images[batch.pair_image[2 * n:].numpy()] != own).all()  # other images of the batch
        assert (batch.pair_text[2 * n:] == batch.pair_text[:n]).all()
        seen += batch.caption_ids.tolist()
    assert sorted(seen) == list(range(batches.num_pairs))  # every caption once per epoch
    again = batches.batch(1, 2)
    assert torch.equal(again.words, batches.batch(1, 2).words) and torch.equal(again.pair_image, batches.batch(1, 2).pair_image)


def _caption_rows(batch, batches, epoch, index):
    """Split rows of a grouped batch's negative captions (re-drawn as the batch draws them)."""
    from training.loss import sample_negative_captions
    rng = np.random.default_rng([batches.seed, epoch, index])
    return sample_negative_captions(batches.caption_image, rng, anchors=batch.caption_ids.numpy())


def test_sampled_negative_captions_never_share_the_image(train_store):
    split = FeatureStore(train_store).split("train")
    batches = PairBatches(split, "glove50", batch_size=300, seed=0)
    caption_image = np.asarray(split.caption_image)
    words = np.asarray(split.words("glove50"), dtype=np.float32)
    batch = batches.batch(0, 0)
    for anchor, negative_words, length in zip(batch.caption_ids.numpy(), batch.negative_words.numpy(), batch.negative_lengths):
        matches = np.flatnonzero((words[:, : negative_words.shape[0]] == negative_words).all(axis=(1, 2)))
        assert len(matches) >= 1 and (caption_image[matches] != caption_image[anchor]).all()


def test_a_final_batch_of_one_pair_is_dropped(train_store):
    split = FeatureStore(train_store).split("train")
    assert PairBatches(split, "glove50", batch_size=299, seed=0).num_batches == 1   # 300 = 299 + 1
    assert PairBatches(split, "glove50", batch_size=298, seed=0).num_batches == 2   # 300 = 298 + 2


def test_nan_features_name_the_file_and_row(tmp_path, train_store):
    store = tmp_path / "store"
    shutil.copytree(train_store, store)
    objects = np.load(store / "train" / "objects.npy", mmap_mode="r+")
    objects[17, 2, 5] = np.nan
    objects.flush()
    batches = PairBatches(FeatureStore(store).split("train"), "glove50", batch_size=300, seed=0)
    with pytest.raises(StoreError, match=r"train/objects.npy row 17: non-finite value at index \[2, 5\]"):
        batches.batch(0, 0)


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_trains_resumes_and_reports(tmp_path, train_store, capsys):
    args = ["--store", str(train_store), "--out", str(tmp_path / "run"), "--preset", "demo", "--epochs", "1", "--threads", "1",
            "--set", "batch_size=64", "--set", "variant=o2w", "--set", "margin=0.1", "--no-progress", "--stop-after-batches", "2",
            "--save-every-batches", "1"]
    assert main(args) == 3
    assert "stopped after 2 batches" in capsys.readouterr().err
    assert main(args[:-4]) == 0
    out = capsys.readouterr()
    assert "resuming" in out.err and "best epoch 1: dev i2t R@1" in out.out
    ckpt = load_checkpoint(tmp_path / "run" / "best")
    assert ckpt.model_config.variant.value == "o2w" and ckpt.train_config.margin == 0.1 and ckpt.train_config.batch_size == 64
    assert ckpt.provenance["command"][1:3] == ["-m", "training.train"] and "--set" in ckpt.provenance["command"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["model"]["variant"] == "o2w"


def test_cli_errors_are_one_line(tmp_path, train_store, capsys):
    base = ["--store", str(train_store), "--out", str(tmp_path / "run"), "--preset", "demo", "--no-progress"]
    assert main(base + ["--set", "w2r_depth=2"]) == 2
    assert "--set: unknown key(s) ['w2r_depth']" in capsys.readouterr().err
    assert main(base + ["--set", "margin=big"]) == 2
    assert "TrainConfig.margin: expected a float, got str 'big'" in capsys.readouterr().err
    assert main(base + ["--set", "region_dim=99"]) == 2
    assert "ModelConfig.region_dim: set to 99, but the feature store" in capsys.readouterr().err
    assert main(base + ["--word-set", "minilm"]) == 2
    assert "--word-set 'minilm': the store's train split has ['glove50']" in capsys.readouterr().err
    assert main(base + ["--model-kind", "cnn"]) == 2  # argparse choices, as one error: line
    assert "invalid choice: 'cnn'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module", ["training.train", "training.evaluate"])
def test_command_lines_flush_denormals(module, monkeypatch, tmp_path):
    import importlib

    calls = []
    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: calls.append(on) or True)
    entry = importlib.import_module(module).main
    argv = (["--store", str(tmp_path / "absent"), "--out", str(tmp_path / "run")] if module == "training.train"
            else ["--scores", str(tmp_path / "absent.npy"), "--captions-per-image", "5"])
    assert entry(argv) == 2  # fails on the missing input, after setting the float mode
    assert calls == [True]
