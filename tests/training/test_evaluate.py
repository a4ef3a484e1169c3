"""python -m training.evaluate: on saved score matrices and on checkpoints (both kinds), outputs and errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from engine.errors import InputError, StoreError
from engine.metrics import retrieval_metrics
from engine.store import FeatureStore
from training.baseline import DualEncoder, dual_encoder_preset
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import TrainConfig, preset, replace_strict
from engine.ranking import BSSAN_ALONE, FIRST_STAGE_ALONE, candidate_pairs, two_stage_metrics
from training.evaluate import evaluate_checkpoint, evaluate_two_stage, main, score_split
from training.model import BSSAN


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_store):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ckpts")
    store = FeatureStore(tiny_store)
    save_checkpoint(root / "bssan", BSSAN(preset("demo")).eval(), TrainConfig(), store=store)
    save_checkpoint(root / "dual", DualEncoder(dual_encoder_preset("demo")).eval(), TrainConfig(), store=store)
    return root


def test_scores_file_equals_engine_metrics(tmp_path, capsys):
    scores = np.random.default_rng(0).normal(size=(10, 30)).astype(np.float32)
    scores[np.arange(10), np.arange(0, 30, 3)] += 2.0  # a signal, so the metrics are not all chance
    np.save(tmp_path / "s.npy", scores)
    for folds in (1, 5):
        out = tmp_path / f"m{folds}.json"
        assert main(["--scores", str(tmp_path / "s.npy"), "--captions-per-image", "3", "--folds", str(folds), "--json", str(out)]) == 0
        assert json.loads(out.read_text()) == retrieval_metrics(scores, captions_per_image=3, folds=folds)
    assert "rsum" in capsys.readouterr().out


def test_existing_output_needs_force(tmp_path, capsys):
    np.save(tmp_path / "s.npy", np.kron(np.eye(4), np.ones((1, 2))))  # image i scores its own 2 captions 1, others 0
    out = tmp_path / "m.json"
    out.write_text("a result someone quotes\n")
    assert main(["--scores", str(tmp_path / "s.npy"), "--captions-per-image", "2", "--json", str(out)]) == 2
    assert "m.json: exists; expected a new file (pass --force to replace it)" in capsys.readouterr().err
    assert out.read_text() == "a result someone quotes\n"
    assert main(["--scores", str(tmp_path / "s.npy"), "--captions-per-image", "2", "--json", str(out), "--force"]) == 0
    assert json.loads(out.read_text())["i2t"]["r1"] == 100.0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_scores_input_is_one_line(tmp_path, capsys):
    np.save(tmp_path / "s.npy", np.zeros((4, 7)))
    assert main(["--scores", str(tmp_path / "s.npy"), "--captions-per-image", "2"]) == 2
    assert "expected 4 x 8 (2 captions per image), got 4 x 7" in capsys.readouterr().err
    (tmp_path / "t.npy").write_bytes(b"not numpy")
    assert main(["--scores", str(tmp_path / "t.npy"), "--captions-per-image", "2"]) == 2
    assert "t.npy: not a readable .npy array" in capsys.readouterr().err
    assert main(["--scores", str(tmp_path / "s.npy")]) == 2  # --captions-per-image is required with --scores
    assert "--scores needs --captions-per-image" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["bssan", "dual"])
def test_checkpoint_on_a_split_exhaustive_and_blocked(tmp_path, tiny_store, checkpoints, kind, capsys):
    out, scores_path = tmp_path / "m.json", tmp_path / "s.npy"
    assert main(["--checkpoint", str(checkpoints / kind), "--store", str(tiny_store), "--split", "test", "--json", str(out),
                 "--save-scores", str(scores_path), "--batch-images", "3", "--batch-captions", "7", "--no-progress"]) == 0
    scores = np.load(scores_path)
    assert scores.shape == (10, 50)
    split = FeatureStore(tiny_store).split("test")
    from training.checkpoint import load_checkpoint
    model = load_checkpoint(checkpoints / kind).model
    np.testing.assert_allclose(scores, score_split(model, split, "glove50"), rtol=0, atol=1e-5)
    metrics = json.loads(out.read_text())
    assert {k: metrics[k] for k in ("i2t", "t2i", "rsum")} == retrieval_metrics(scores, captions_per_image=5)
    assert metrics["split"] == "test" and metrics["captions_per_image"] == 5 and metrics["images"] == 10
    # whose scores ranked: BSSAN alone for a BSSAN checkpoint, the first stage for a dual encoder
    assert metrics["protocol"] == {"k": None, "fusion": (BSSAN_ALONE if kind == "bssan" else FIRST_STAGE_ALONE).to_dict()}
    assert f"rsum {metrics['rsum']:.1f}" in capsys.readouterr().out


def test_checkpoint_refuses_ungrouped_captions(tmp_path, tiny_store, checkpoints, capsys):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    path = store / "test" / "caption_image.npy"
    caption_image = np.load(path)
    np.save(path, caption_image[np.random.default_rng(0).permutation(len(caption_image))])
    assert main(["--checkpoint", str(checkpoints / "bssan"), "--store", str(store), "--split", "test", "--no-progress"]) == 2
    assert "caption_image.npy: captions are not grouped image by image" in capsys.readouterr().err
    with pytest.raises(StoreError, match="not grouped image by image"):
        score_split(BSSAN(preset("demo")).eval(), FeatureStore(store).split("test"), "glove50")


def test_checkpoint_errors_are_one_line(tmp_path, tiny_store, checkpoints, capsys):
    assert main(["--checkpoint", str(tmp_path / "none"), "--store", str(tiny_store), "--no-progress"]) == 2
    assert "none: no such checkpoint directory" in capsys.readouterr().err
    assert main(["--checkpoint", str(checkpoints / "bssan"), "--store", str(tiny_store), "--split", "val", "--no-progress"]) == 2
    assert "no split 'val'" in capsys.readouterr().err
    assert main(["--checkpoint", str(checkpoints / "bssan")]) == 2  # --store is required with --checkpoint
    assert "--checkpoint needs --store" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gated_checkpoint(tmp_path_factory, tiny_store):
    """A BSSAN whose W2R caches G (4H <= M), the path score_pairs takes at the flickr8k preset."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("gated") / "bssan"
    model = BSSAN(replace_strict(preset("demo"), w2r_hidden=4, w2r_mlp=[4, 1])).eval()
    assert model.w2r.pair_gathers_gates
    save_checkpoint(path, model, TrainConfig(), store=FeatureStore(tiny_store))
    return path


def test_two_stage_over_every_pair_equals_exhaustive_scoring(tiny_store, checkpoints, gated_checkpoint):
    for checkpoint in (gated_checkpoint, checkpoints / "bssan"):
        exhaustive, _ = evaluate_checkpoint(checkpoint, tiny_store, "test", progress=False)
        metrics = evaluate_two_stage(checkpoint, checkpoints / "dual", tiny_store, k=None, split="test", progress=False)
        for side in ("i2t", "t2i"):
            assert metrics[side] == pytest.approx(exhaustive[side], abs=1e-6)
        assert metrics["protocol"] == {"k": None, "fusion": BSSAN_ALONE.to_dict()}


def test_two_stage_cli_reranks_the_top_k_with_the_recorded_fusion(tmp_path, tiny_store, checkpoints, gated_checkpoint):
    out = tmp_path / "m.json"
    assert main(["--checkpoint", str(gated_checkpoint), "--store", str(tiny_store), "--split", "test", "--shortlist",
                 str(checkpoints / "dual"), "--shortlist-k", "2", "--json", str(out), "--no-progress"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["protocol"]["k"] == 2 and metrics["protocol"]["fusion"] == BSSAN_ALONE.to_dict()
    split = FeatureStore(tiny_store).split("test")
    first = score_split(load_checkpoint(checkpoints / "dual").model, split, "glove50")
    image_index, _ = candidate_pairs(first, 2)
    assert metrics["rescored_pairs"] == len(image_index) < first.size
    per = split.captions_per_image()
    own = np.arange(first.shape[1]) // per
    t2i = np.mean([own[j] in np.argsort(-first[:, j], kind="stable")[:2] for j in range(first.shape[1])]) * 100
    assert metrics["protocol"]["first_stage_recall"]["t2i"] == pytest.approx(t2i)
    # a fusion record tuned with this first stage is used; --no-fusion measures BSSAN alone
    from engine.files import file_sha256
    record = {"first_stage_weight": 1.0, "bssan_weight": 0.0001, "first_stage_sha256": file_sha256(checkpoints / "dual" / "weights.pt")}
    (gated_checkpoint / "fusion.json").write_text(json.dumps(record))
    try:
        fused = evaluate_two_stage(gated_checkpoint, checkpoints / "dual", tiny_store, k=2, split="test", progress=False)
        alone = evaluate_two_stage(gated_checkpoint, checkpoints / "dual", tiny_store, k=2, split="test", fusion=BSSAN_ALONE,
                                   progress=False)
    finally:
        (gated_checkpoint / "fusion.json").unlink()
    assert fused["protocol"]["fusion"] == {"first_stage_weight": 1.0, "bssan_weight": 0.0001}
    first_alone = two_stage_metrics(first, None, None, per, FIRST_STAGE_ALONE)
    assert fused["rsum"] == pytest.approx(first_alone["rsum"])  # a tiny BSSAN weight only breaks the first stage's ties
    assert alone["protocol"]["fusion"] == BSSAN_ALONE.to_dict()


def test_shortlist_must_be_a_dual_encoder(tmp_path, tiny_store, checkpoints, capsys):
    code = main(["--checkpoint", str(checkpoints / "bssan"), "--store", str(tiny_store), "--shortlist",
                 str(checkpoints / "bssan"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    with pytest.raises(InputError, match=r"--shortlist .*: expected a dual_encoder checkpoint, got bssan"):
        evaluate_two_stage(checkpoints / "bssan", checkpoints / "bssan", tiny_store, k=5, progress=False)


def test_tune_fusion_writes_a_record_the_two_stage_evaluation_then_uses(tmp_path, tiny_store, checkpoints, gated_checkpoint, capsys):
    import shutil
    bssan = tmp_path / "bssan"
    shutil.copytree(gated_checkpoint, bssan)
    args = ["--checkpoint", str(bssan), "--store", str(tiny_store), "--split", "dev", "--shortlist", str(checkpoints / "dual"),
            "--shortlist-k", "3", "--tune-fusion", "--no-progress"]
    assert main(args) == 0
    record = json.loads((bssan / "fusion.json").read_text())
    assert record["k"] == 3 and record["rsum"] >= record["first_stage_alone"] and record["first_stage_sha256"]
    assert main(args) == 2 and "pass --force" in capsys.readouterr().err  # a tuned record is not replaced silently
    metrics = evaluate_two_stage(bssan, checkpoints / "dual", tiny_store, k=3, split="dev", progress=False)
    assert metrics["protocol"]["fusion"] == {k: record[k] for k in ("first_stage_weight", "bssan_weight")}
    assert metrics["rsum"] == pytest.approx(record["rsum"])


def test_tune_score_weights_chooses_eq19_weights_that_loading_scoring_and_export_records_apply(tmp_path, tiny_store, checkpoints, capsys):
    import shutil

    from export.torch_runner import checkpoint_record
    from training.checkpoint import SCORE_WEIGHTS, load_checkpoint
    from training.evaluate import SCORE_WEIGHT_RATIOS, branch_scores

    bssan = tmp_path / "bssan"
    shutil.copytree(checkpoints / "bssan", bssan)
    (bssan / "fusion.json").write_text("{}")  # a fusion tuned for the old MS: removed by the new record
    args = ["--checkpoint", str(bssan), "--store", str(tiny_store), "--split", "dev", "--tune-score-weights", "8", "--no-progress"]
    assert main(args) == 0
    record = json.loads((bssan / SCORE_WEIGHTS).read_text())
    assert not (bssan / "fusion.json").exists() and "rerun --tune-fusion" in capsys.readouterr().err
    # the record is the best of the candidates, by BSSAN alone over every pair of the first 8 dev images
    split = FeatureStore(tiny_store).split("dev")
    model = load_checkpoint(checkpoints / "bssan").model
    y, yp = branch_scores(model, split, "glove50", 8)
    best = max(retrieval_metrics(a * y + b * yp, captions_per_image=5)["rsum"]
               for a, b in [(0.0, 1.0) if r is None else (1.0, r) for r in SCORE_WEIGHT_RATIOS])
    assert record["rsum"] == pytest.approx(best) and record["images"] == 8
    # loading applies it: MS = w2r Y + o2w Y', and the artifact's checkpoint record carries it
    tuned = load_checkpoint(bssan).model
    assert tuned.scoring_weights == (record["w2r"], record["o2w"])
    assert model.scoring_weights == model.config.branch_weights  # no record: the config's (1, lambda)
    exhaustive = score_split(tuned, split, "glove50", images=8)
    np.testing.assert_allclose(exhaustive, record["w2r"] * y + record["o2w"] * yp, rtol=0, atol=1e-5)
    assert checkpoint_record(bssan)["score_weights"] == [record["w2r"], record["o2w"]]
    assert main(args) == 2 and "pass --force" in capsys.readouterr().err  # not replaced silently
    # a record chosen for other weights is refused, naming the file
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in torch.load(bssan / "weights.pt").items()}, bssan / "weights.pt")
    with pytest.raises(Exception, match=r"score_weights.json: chosen for weights"):
        load_checkpoint(bssan)


@pytest.mark.parametrize("variant, ok", [("no_reg", True), ("w2r", False)])
def test_tune_score_weights_needs_both_branches(tmp_path, tiny_store, variant, ok):
    from training.evaluate import tune_score_weights

    save_checkpoint(tmp_path / "c", BSSAN(replace_strict(preset("demo"), variant=variant)).eval(), TrainConfig(),
                    store=FeatureStore(tiny_store))
    if ok:
        assert tune_score_weights(tmp_path / "c", tiny_store, "dev", 4, force=False)["score_weights"]["images"] == 4
    else:
        with pytest.raises(InputError, match="expected a BSSAN checkpoint with both branches"):
            tune_score_weights(tmp_path / "c", tiny_store, "dev", 4, force=False)


def test_tune_hub_chooses_a_correction_that_loading_scoring_and_rescoring_apply(tmp_path, tiny_store, checkpoints, capsys,
                                                                                 monkeypatch):
    import shutil

    import training.evaluate as evaluate
    from engine.hub import HubBank
    from training.checkpoint import HUB_BANK, load_checkpoint
    from training.evaluate import own_scores_metrics, rescore_pairs

    bssan = tmp_path / "bssan"
    shutil.copytree(checkpoints / "bssan", bssan)
    (bssan / "fusion.json").write_text("{}")  # a fusion tuned for the old MS: removed
    monkeypatch.setattr(evaluate, "HUB_BETAS", (0.5,))  # a random model: make sure a correction is written
    monkeypatch.setattr(evaluate, "HUB_KS", (2, 4))
    monkeypatch.setattr(evaluate, "HUB_GAMMAS", (0.3,))  # and a caption side
    monkeypatch.setattr(evaluate, "HUB_TEXT_KS", (2,))
    args = ["--checkpoint", str(bssan), "--store", str(tiny_store), "--split", "dev", "--tune-hub", "8", "--hub-bank", "12",
            "--hub-bank-images", "3", "--no-progress"]
    assert main(args) == 0
    bank = HubBank.load(bssan / HUB_BANK)
    record = bank.record
    assert not (bssan / "fusion.json").exists() and "rerun --tune-fusion" in capsys.readouterr().err
    assert (bank.k, bank.beta, len(bank)) == (record["k"], 0.5, 12) and record["images"] == 8
    # the record is the best candidate, recomputed by hand: r(i) = mean of the k highest MS over the bank
    split, train = FeatureStore(tiny_store).split("dev"), FeatureStore(tiny_store).split("train")
    model = load_checkpoint(checkpoints / "bssan").model
    rows = np.asarray(record["bank"]["rows"])
    bank_ms = model.score_matrix(split.regions[:8], split.objects[:8], train.words("glove50")[rows],
                                 np.asarray(train.lengths)[rows]).numpy()
    plain = score_split(model, split, "glove50", images=8)
    by_hand = {k: np.sort(bank_ms, axis=1)[:, -k:].mean(axis=1) for k in (2, 4)}
    t2i = lambda m: m["t2i"]["r1"] + m["t2i"]["r5"] + m["t2i"]["r10"]  # noqa: E731  (r(i) reorders text-to-image only)
    assert max(t2i(own_scores_metrics(plain - 0.5 * r[:, None], 5, bssan=True)) for r in by_hand.values()) == pytest.approx(
        t2i(own_scores_metrics(plain - 0.5 * by_hand[bank.k][:, None], 5, bssan=True)))
    assert record["rsum_without"] == pytest.approx(own_scores_metrics(plain, 5, bssan=True)["rsum"])
    # the caption side: s(c) = mean of the text_k highest MS over the bank images
    assert bank.has_images and (bank.text_k, bank.gamma, len(bank.regions)) == (2, 0.3, 3)
    text_ms = model.score_matrix(bank.regions.astype(np.float32), bank.objects.astype(np.float32), split.words("glove50")[:40],
                                 np.asarray(split.lengths[:40])).numpy()
    text_offsets = 0.3 * np.sort(text_ms, axis=0)[-2:].mean(axis=0)
    offsets = 0.5 * by_hand[bank.k]
    assert record["rsum"] == pytest.approx(own_scores_metrics(plain - offsets[:, None] - text_offsets[None, :], 5, bssan=True)["rsum"])
    # loading applies it everywhere MS is computed: the matrix, listed pairs, and the K-protocol's re-scoring
    tuned = load_checkpoint(bssan).model
    np.testing.assert_allclose(tuned.hub_offsets(split.regions[:8], split.objects[:8]).numpy(), offsets, rtol=1e-5, atol=1e-5)
    corrected = score_split(tuned, split, "glove50", images=8)
    np.testing.assert_allclose(corrected, plain - offsets[:, None] - text_offsets[None, :], rtol=0, atol=1e-5)
    image_index, text_index = np.array([0, 3, 7, 3]), np.array([1, 0, 39, 22])
    np.testing.assert_allclose(rescore_pairs(tuned, split, "glove50", image_index, text_index),
                               np.asarray(corrected)[image_index, text_index], rtol=0, atol=1e-5)
    np.testing.assert_allclose(tuned.score_pairs(split.regions, split.objects, split.words("glove50"), np.asarray(split.lengths),
                                                 image_index, text_index).numpy(),
                               np.asarray(corrected)[image_index, text_index], rtol=0, atol=1e-5)
    assert main(args) == 2 and "pass --force" in capsys.readouterr().err  # not replaced silently
    # a bank chosen for other weights is refused, naming the file
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in torch.load(bssan / "weights.pt").items()}, bssan / "weights.pt")
    with pytest.raises(Exception, match=r"hub_bank.npz: chosen for weights"):
        load_checkpoint(bssan)
