"""training.hubness: the first stage's hubness correction (by hand), fitting and tuning it, loading it with a
checkpoint, binding fusion records to it, and its export into the shortlist graphs (ONNX == torch, engine ranks)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from engine.store import FeatureStore
from training.baseline import DualEncoder, dual_encoder_preset
from training.checkpoint import HUBNESS, copy_checkpoint, first_stage_sha256, load_checkpoint, save_checkpoint
from training.config import TrainConfig, replace_strict
from training.evaluate import score_split
from training.hubness import HubnessCorrection, fit_hubness, main

from tests.training.conftest import random_dual_checkpoint


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_augmented_vectors_give_the_corrected_score_by_hand():
    rng = np.random.default_rng(0)
    bank_images, bank_texts = _unit(rng.normal(size=(7, 4))), _unit(rng.normal(size=(9, 4)))
    images, texts = _unit(rng.normal(size=(3, 4))), _unit(rng.normal(size=(5, 4)))
    correction = HubnessCorrection(bank_images, bank_texts, neighbours=3, beta_image=0.5, beta_text=0.25)
    r_img = np.sort(images @ bank_texts.T, axis=1)[:, -3:].mean(axis=1)  # mean of the 3 nearest bank captions
    r_txt = np.sort(texts @ bank_images.T, axis=1)[:, -3:].mean(axis=1)
    want = images @ texts.T - 0.5 * r_img[:, None] - 0.25 * r_txt[None, :]
    got = correction.images(torch.tensor(images, dtype=torch.float32)) @ correction.texts(torch.tensor(texts, dtype=torch.float32)).T
    assert got.shape == (3, 5) and np.allclose(got.numpy(), want, atol=1e-6)
    assert correction.images(torch.tensor(images, dtype=torch.float32)).shape == (3, 6)
    with pytest.raises(Exception, match="neighbours"):
        HubnessCorrection(bank_images, bank_texts, neighbours=8, beta_image=0.5, beta_text=0.5)  # > 7 bank images
    with pytest.raises(Exception, match="beta_image"):
        HubnessCorrection(bank_images, bank_texts, neighbours=2, beta_image=-1.0, beta_text=0.5)


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory, train_store):
    return random_dual_checkpoint(tmp_path_factory.mktemp("hub") / "dual", train_store)


def test_fit_tunes_on_dev_writes_the_file_and_the_checkpoint_applies_it(tmp_path, train_store, first_stage):
    ckpt = tmp_path / "dual"
    shutil.copytree(first_stage, ckpt)
    plain_sha = first_stage_sha256(ckpt)
    dev = FeatureStore(train_store).split("dev")
    plain = score_split(load_checkpoint(ckpt).model, dev, "glove50")
    record = fit_hubness(ckpt, train_store, bank_images=20, bank_texts=60, neighbours=4)
    assert (ckpt / HUBNESS).is_file() and record["dev_rsum"] >= record["dev_rsum_uncorrected"]  # beta 0 is a choice
    assert {(row["beta_image"], row["beta_text"]) for row in record["grid"]} >= {(0.0, 0.0), (1.0, 1.0)}
    model = load_checkpoint(ckpt).model
    assert model.hubness is not None and model.hubness.record()["neighbours"] == 4
    assert "hubness.bank_images" not in model.state_dict()  # not in weights.pt
    corrected = score_split(model, dev, "glove50")
    with torch.no_grad():
        images = model.embed_images(np.asarray(dev.regions), np.asarray(dev.objects))
        texts = model.embed_texts(np.asarray(dev.words("glove50")), np.asarray(dev.lengths))
        r_img, r_txt = model.hubness.offsets(images, texts)
    want = plain - model.hubness.beta_image * r_img.numpy()[:, None] - model.hubness.beta_text * r_txt.numpy()[None, :]
    assert np.allclose(corrected, want, atol=1e-5)
    assert first_stage_sha256(ckpt) != plain_sha  # a fusion tuned without the correction no longer binds
    copied = copy_checkpoint(ckpt, tmp_path / "copy", fp16=True)
    assert (copied / HUBNESS).read_bytes() == (ckpt / HUBNESS).read_bytes()
    with pytest.raises(Exception, match="exists"):
        fit_hubness(ckpt, train_store, bank_images=20, bank_texts=60, neighbours=4)


def test_cli_reports_and_refuses_bad_input(tmp_path, train_store, first_stage, capsys):
    ckpt = tmp_path / "dual"
    shutil.copytree(first_stage, ckpt)
    assert main(["--checkpoint", str(ckpt), "--store", str(train_store), "--bank-images", "10", "--bank-texts", "30",
                 "--neighbours", "3"]) == 0
    assert "dev rsum of the first stage" in capsys.readouterr().out
    assert main(["--checkpoint", str(ckpt), "--store", str(train_store), "--bank-images", "100000", "--force"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at most" in err[0]
    (ckpt / HUBNESS).write_bytes(b"not an npz")
    with pytest.raises(Exception, match="hubness"):
        load_checkpoint(ckpt)


def test_export_folds_the_correction_into_the_shortlist_graphs(tmp_path, tiny_store):
    pytest.importorskip("onnx", reason="export needs onnx (the export extra)")
    from engine.runtime import Scorer
    from engine.artifact import load_artifact
    from export.pipeline import ExportOptions, export_artifact
    from training.config import preset
    from training.model import BSSAN

    torch.manual_seed(0)
    store = FeatureStore(tiny_store)
    model = BSSAN(replace_strict(preset("demo"), max_words=30)).eval()
    shortlist = DualEncoder(replace_strict(dual_encoder_preset("demo"), max_words=30)).eval()
    save_checkpoint(tmp_path / "bssan", model, TrainConfig(), store=store)
    save_checkpoint(tmp_path / "shortlist", shortlist, TrainConfig(), store=store)
    rng = np.random.default_rng(1)
    k = shortlist.config.embed_dim
    HubnessCorrection(_unit(rng.normal(size=(12, k))), _unit(rng.normal(size=(20, k))), 3, 0.5, 0.75).save(tmp_path / "shortlist" / HUBNESS)
    export_artifact(ExportOptions(model_dir=tmp_path / "bssan", out=tmp_path / "artifact", precisions=("fp32",),
                                  shortlist_dir=tmp_path / "shortlist", tensorrt="off", assets_dir=None, progress=False))
    artifact = load_artifact(tmp_path / "artifact")
    assert artifact.manifest["dims"]["shortlist_dim"] == k + 2
    assert max(v for key, v in artifact.manifest["parity_max_abs_diff"]["fp32"].items() if key.startswith("shortlist")) < 1e-4
    split = store.split("test")
    corrected = load_checkpoint(tmp_path / "shortlist").model
    want = score_split(corrected, split, "glove50")
    with Scorer.load(tmp_path / "artifact", backend="onnxruntime-cpu", threads=1, fusion=False) as scorer:
        images, captions = scorer.encode_images(split), scorer.encode_captions(split)
        assert images.arrays["image_vectors"].shape[1] == k + 2
        got = scorer.first_stage(images, captions, np.arange(split.num_images), np.arange(len(split.lengths)))
        assert np.allclose(got, want, atol=1e-4)
        ranked = scorer.top_k(images, captions, k=3, direction="t2i", shortlist_k=5)
        assert ranked.candidates.shape == (len(split.lengths), 5)
        assert (ranked.candidates[:, 0] == np.argmax(want.T, axis=1)).mean() > 0.9  # the corrected first stage's order


def test_a_bssan_run_tunes_its_fusion_on_the_corrected_first_stage(tmp_path, train_store, first_stage):
    """FirstStage.scores (the trainer's dev fusion and selection) ranks as the product does: with the correction."""
    from training.mining import FirstStage

    ckpt = tmp_path / "dual"
    shutil.copytree(first_stage, ckpt)
    store = FeatureStore(train_store)
    dev = store.split("dev")
    plain = FirstStage.load(ckpt, store, tmp_path / "run-plain").scores(dev)
    rng = np.random.default_rng(1)
    HubnessCorrection(_unit(rng.normal(size=(12, 8))), _unit(rng.normal(size=(30, 8))), neighbours=3, beta_image=0.5,
                      beta_text=0.75).save(ckpt / HUBNESS)  # embed_dim 8: random_dual_checkpoint's
    model = load_checkpoint(ckpt).model
    corrected = FirstStage.load(ckpt, store, tmp_path / "run").scores(dev)
    assert np.allclose(corrected, score_split(model, dev, "glove50"), atol=1e-5)
    assert not np.allclose(corrected, plain, atol=1e-3)
