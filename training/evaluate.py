"""Retrieval evaluation: of a saved score matrix, or of a checkpoint on a feature-store split.

    python -m training.evaluate --scores S.npy --captions-per-image 5 [--folds 5] --json OUT.json
    python -m training.evaluate --checkpoint RUN/best --store STORE --split test [--json OUT.json]
        [--save-scores S.npy] [--batch-images N --batch-captions N] [--threads N] [--force]
    python -m training.evaluate --checkpoint RUN/best --store STORE --split test \
        --shortlist DUAL_ENCODER_RUN/best --shortlist-k 100 --json OUT.json

A score matrix is [N_images, N_captions]: row i is image i and its captions are
cpi*i .. cpi*i+cpi-1 (cpi = captions per image). For a checkpoint the matrix is computed
exhaustively (every image x every caption) in blocks of images x captions, so memory is
bounded by the blocks, with a progress bar; captions per image come from the store, and a
split whose captions are not grouped image by image is refused. Both model kinds (bssan,
dual_encoder) work. The metrics (engine.metrics.retrieval_metrics) are printed on one line
and, with --json, written as {"i2t": {r1, r5, r10, medr, meanr}, "t2i": {...}, "rsum"}
(the checkpoint form adds "split", "checkpoint", "store", "images", "captions", "seconds").

Two-stage protocol (--shortlist DUAL --shortlist-k K): the product's ranking, engine.ranking (the one
protocol of the project): per direction, each query's top-K items by the dual encoder are re-ranked by
the fused score and placed above the rest, which keep the dual encoder's order. The fusion is the one
tuned on dev (the checkpoint's fusion.json, when it was tuned with this dual encoder), or BSSAN alone with
--no-fusion or without a record; --shortlist-k all re-ranks every pair (exhaustive, fused). The JSON's
"protocol" gives K, the fusion and the first stage's recall@K (the ceiling of R@K' for K' > K).

Outputs are written atomically (temp file + rename). An existing --json or --save-scores file
is never replaced unless --force: a finished evaluation is a result someone may be quoting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from engine.cli import ArgumentParser, command, positive_int
from engine.errors import InputError, StoreError
from engine.files import atomic_path, file_sha256, write_json_atomic
from engine.metrics import format_metrics, retrieval_metrics
from engine.ranking import BSSAN_ALONE, FIRST_STAGE_ALONE, Fusion, candidate_pairs, tune_fusion, two_stage_metrics
from engine.store import FeatureStore, SplitFeatures


def captions_per_image_of(split: SplitFeatures) -> int:
    """The split's captions per image; StoreError if captions are not grouped image by image."""
    per = split.captions_per_image()
    if per is None:
        raise StoreError(f"{split.root / split.name / 'caption_image.npy'}: captions are not grouped image by image "
                         f"(caption j must belong to image j // captions_per_image); expected a grouped split to evaluate")
    return per


def score_split(model: nn.Module, split: SplitFeatures, word_set: str, images: int = 0, image_block: int | None = None,
                caption_block: int | None = None, progress: bool = False) -> np.ndarray:
    """Scores [N_img, N_img * cpi] of a model (BSSAN or DualEncoder, in eval mode) on a split:
    every image x every caption; `images` > 0 keeps the first `images` images and their captions."""
    per = captions_per_image_of(split)
    n_img = split.num_images if images <= 0 else min(images, split.num_images)
    n_cap = n_img * per
    blocks = {k: v for k, v in (("image_block", image_block), ("caption_block", caption_block)) if v}
    scores = model.score_matrix(split.regions[:n_img], split.objects[:n_img], split.words(word_set)[:n_cap],
                                np.asarray(split.lengths[:n_cap]), progress=progress, **blocks)
    scores = scores.numpy()
    if not np.isfinite(scores).all():
        row, col = np.argwhere(~np.isfinite(scores))[0].tolist()
        raise StoreError(f"{split.root / split.name}: non-finite score for image {row} x caption {col}; "
                         f"expected finite features (check regions/objects/words_{word_set} rows)")
    return scores


def flush_denormals() -> None:
    """Flush denormal floats to zero for the rest of this process (torch.set_flush_denormal; numpy's float mode too):
    the command-line entry points call it, library callers decide for themselves. A trained model's focused attention
    (softmax weights of 1e-30 and less) makes denormals, which x86 CPUs handle ~100x slower. Measured on the
    grid-trained reference (a training step of 25 images x ~125 captions, 1 thread): 1.31 -> 1.07 s; the engine does
    the same through ONNX Runtime (engine.backends.onnxruntime.open_session)."""
    torch.set_flush_denormal(True)


def own_scores_metrics(scores: np.ndarray, captions_per_image: int, bssan: bool) -> dict:
    """Metrics of a model's own score matrix over every pair (no first stage, no fusion), through engine.ranking.
    The protocol record says whose scores ranked: BSSAN alone for a BSSAN matrix, the first stage for a dual's."""
    metrics = two_stage_metrics(scores, None, None, captions_per_image, FIRST_STAGE_ALONE)  # ranks the matrix itself
    metrics["protocol"]["fusion"] = (BSSAN_ALONE if bssan else FIRST_STAGE_ALONE).to_dict()
    return metrics


def _refuse_existing(path: Path, force: bool) -> None:
    if Path(path).exists() and not force:
        raise InputError(f"{path}: exists; expected a new file (pass --force to replace it)")


def write_json(path: Path, payload: dict, force: bool) -> None:
    _refuse_existing(path, force)
    write_json_atomic(path, payload)


def save_scores(path: Path, scores: np.ndarray, force: bool) -> None:
    _refuse_existing(path, force)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # a handle: np.save would append .npy to the temp name
        np.save(handle, scores)


def load_scores(path: Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing; expected a .npy score matrix [N_images, N_captions]")
    try:
        scores = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc})") from exc
    if scores.ndim != 2 or not np.issubdtype(scores.dtype, np.floating):
        raise InputError(f"{path}: expected a 2-D float matrix [N_images, N_captions], got {scores.dtype} of shape {list(scores.shape)}")
    return scores


def evaluate_checkpoint(checkpoint: str | os.PathLike, store: str | os.PathLike, split: str = "test",
                        image_block: int | None = None, caption_block: int | None = None,
                        progress: bool = True) -> tuple[dict, np.ndarray]:
    """(metrics with run details, scores [N_img, N_cap]) of a checkpoint on a store split."""
    from training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    features = FeatureStore(store).split(split)
    word_set = ckpt.train_config.word_set
    per = captions_per_image_of(features)
    start = time.perf_counter()
    scores = score_split(ckpt.model, features, word_set, image_block=image_block, caption_block=caption_block, progress=progress)
    seconds = time.perf_counter() - start
    metrics = own_scores_metrics(scores, per, bssan=ckpt.kind.value == "bssan")  # every pair scored by the model itself
    metrics.update(split=split, checkpoint=str(Path(checkpoint).resolve()), store=str(Path(store).resolve()),
                   kind=ckpt.kind.value, word_set=word_set, images=int(scores.shape[0]), captions=int(scores.shape[1]),
                   captions_per_image=per, seconds=round(seconds, 3))
    return metrics, scores


@torch.no_grad()
def rescore_pairs(model: nn.Module, split: SplitFeatures, word_set: str, image_index: np.ndarray, text_index: np.ndarray,
                  pair_block: int = 2048, progress: bool = False, desc: str = "re-scoring") -> np.ndarray:
    """BSSAN scores [N] of the listed (image, caption) pairs of a split (test attention).

    Every image and every caption is encoded ONCE (caches for a 1K / 5K split: ~1 GB), then the
    pair step runs on blocks of pairs taken in order of caption length, each block's caption
    caches trimmed to its longest caption, so padding costs no attention or recurrence work."""
    lengths = np.asarray(split.lengths)
    image_cache = model.encode_images(np.asarray(split.regions) if model.w2r else None,
                                      np.asarray(split.objects) if model.needs_objects else None,
                                      gates=model.w2r is not None and model.w2r.pair_gathers_gates)
    text_cache = model.encode_texts(np.asarray(split.words(word_set)), lengths)
    offsets = None  # the hub correction (engine/hub.py), when the model has one: beta r(i) of each image, gamma s(c) of each caption
    if getattr(model, "hub", None) is not None:
        offsets = model.hub_offsets(np.asarray(split.regions) if model.w2r else None,
                                    np.asarray(split.objects) if model.needs_objects else None).numpy()
        text_offsets = model.hub_text_offsets(np.asarray(split.words(word_set)), lengths).numpy()
    order = np.lexsort((image_index, lengths[text_index]))  # by caption length, then image
    out = np.empty(len(order), dtype=np.float32)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(order), unit="pair", unit_scale=True, desc=desc)
    for start in range(0, len(order), pair_block):
        rows = order[start:start + pair_block]
        longest = int(lengths[text_index[rows]].max())
        trimmed = {branch: {name: value[:, :longest] if value.dim() >= 2 else value for name, value in cache.items()}
                   for branch, cache in text_cache.items()}  # [N_txt, L_block, ...]
        y, y_prime = model.score_cached(image_cache, trimmed, torch.as_tensor(image_index[rows]), torch.as_tensor(text_index[rows]))
        out[rows] = model.combine(y, y_prime).numpy()
        if offsets is not None:
            out[rows] -= offsets[image_index[rows]] + text_offsets[text_index[rows]]
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    return out


FUSION_GRID = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)  # bssan weights tried, in units of std(first)/std(bssan)


def tune_two_stage(model: nn.Module, split: SplitFeatures, word_set: str, first: np.ndarray, k: int, progress: bool = False
                   ) -> tuple[dict, dict]:
    """(metrics of BSSAN alone re-ranking the top k, fusion record) on a split, both through engine.ranking:
    BSSAN scores the candidates once; the bssan weight (first stage weight 1) is the best of FUSION_GRID
    (scaled to the two scores' spreads) and 0 (the first stage alone) by the split's rsum at K."""
    per = captions_per_image_of(split)
    image_index, text_index = candidate_pairs(first, k)
    bssan = rescore_pairs(model, split, word_set, image_index, text_index, progress=progress, desc=f"{split.name} re-scoring")
    table = np.full(first.shape, np.nan, dtype=np.float32)
    table[image_index, text_index] = bssan
    rescore = lambda i, t: table[i, t]  # noqa: E731 (only candidates are asked)
    alone = two_stage_metrics(first, rescore, k, per, BSSAN_ALONE)
    unit = float(first[image_index, text_index].std() / max(float(bssan.std()), 1e-12))
    best, rows = tune_fusion(first, (image_index, text_index, bssan), k, per, tuple(unit * w for w in FUSION_GRID))
    fused = two_stage_metrics(first, rescore, k, per, best)
    record = {**best.to_dict(), "rsum": fused["rsum"], "k": k, "tuned_on": f"{split.name} ({first.shape[0]} images)",
              "grid": rows, "fused": fused, "first_stage_alone": rows[0]["rsum"], "bssan_alone_at_k": alone["rsum"]}
    return alone, record


def fusion_of(checkpoint: str | os.PathLike, first_stage_sha256: str) -> Fusion | None:
    """The fusion recorded beside a BSSAN checkpoint if it was tuned with this first stage (same weights
    hash); None otherwise."""
    from training.checkpoint import read_fusion

    recorded = read_fusion(checkpoint)
    return recorded[0] if recorded is not None and recorded[1] == first_stage_sha256 else None


def evaluate_two_stage(checkpoint: str | os.PathLike, shortlist: str | os.PathLike, store: str | os.PathLike,
                       k: int | None, split: str = "test", fusion: Fusion | str = "recorded", pair_block: int = 2048,
                       progress: bool = True) -> dict:
    """Metrics (engine.ranking's protocol) of BSSAN `checkpoint` behind the dual-encoder first stage
    `shortlist` on a store split: each query's first-stage top-k re-ranked by the fused score (k None:
    every pair). fusion "recorded": the checkpoint's fusion.json if it was tuned with this first stage,
    else BSSAN alone; or a Fusion (BSSAN_ALONE to measure BSSAN by itself)."""
    from training.checkpoint import ModelKind, first_stage_sha256, load_checkpoint

    ckpt, first_ckpt = load_checkpoint(checkpoint), load_checkpoint(shortlist)
    if first_ckpt.kind is not ModelKind.DUAL_ENCODER:
        raise InputError(f"--shortlist {shortlist}: expected a dual_encoder checkpoint, got {first_ckpt.kind.value}")
    first_sha = first_stage_sha256(shortlist)
    if fusion == "recorded":
        fusion = fusion_of(checkpoint, first_sha) or BSSAN_ALONE
    features = FeatureStore(store).split(split)
    per = captions_per_image_of(features)
    start = time.perf_counter()
    first = score_split(first_ckpt.model, features, first_ckpt.train_config.word_set)  # [N_img, N_cap]
    rescored = {"pairs": 0}

    def rescore(image_index: np.ndarray, text_index: np.ndarray) -> np.ndarray:
        rescored["pairs"] = len(image_index)
        scores = rescore_pairs(ckpt.model, features, ckpt.train_config.word_set, image_index, text_index, pair_block,
                               progress, desc=f"re-scoring {'every pair' if k is None else f'top-{k}'}")
        if not np.isfinite(scores).all():
            raise StoreError(f"{features.root / features.name}: non-finite re-scored pair; expected finite features")
        return scores

    metrics = two_stage_metrics(first, rescore if fusion.uses_bssan else None, k, per, fusion)
    metrics.update(split=split, checkpoint=str(Path(checkpoint).resolve()), store=str(Path(store).resolve()),
                   kind=ckpt.kind.value, word_set=ckpt.train_config.word_set, images=int(first.shape[0]),
                   captions=int(first.shape[1]), captions_per_image=per, seconds=round(time.perf_counter() - start, 3),
                   shortlist=str(Path(shortlist).resolve()), shortlist_sha256=first_sha,
                   shortlist_word_set=first_ckpt.train_config.word_set, rescored_pairs=rescored["pairs"])
    return metrics


def tune_fusion_for(checkpoint: str | os.PathLike, shortlist: str | os.PathLike, store: str | os.PathLike, k: int | None,
                    split: str, force: bool, progress: bool = True) -> dict:
    """Tune the fusion of BSSAN `checkpoint` with the first stage `shortlist` on a split (dev) and write
    CHECKPOINT/fusion.json; returns the fused metrics with the record."""
    from training.checkpoint import ModelKind, first_stage_sha256, load_checkpoint

    from training.checkpoint import FUSION

    path = Path(checkpoint) / FUSION
    if path.exists() and not force:
        raise InputError(f"{path}: exists; expected a new file (pass --force to replace it)")
    if k is None:
        raise InputError("--tune-fusion: expected a number for --shortlist-k (the product's K), got all")
    ckpt, first_ckpt = load_checkpoint(checkpoint), load_checkpoint(shortlist)
    if first_ckpt.kind is not ModelKind.DUAL_ENCODER:
        raise InputError(f"--shortlist {shortlist}: expected a dual_encoder checkpoint, got {first_ckpt.kind.value}")
    features = FeatureStore(store).split(split)
    first = score_split(first_ckpt.model, features, first_ckpt.train_config.word_set)
    _, record = tune_two_stage(ckpt.model, features, ckpt.train_config.word_set, first, k, progress)
    record.update(first_stage=str(Path(shortlist).resolve()), first_stage_sha256=first_stage_sha256(shortlist))
    write_json(path, record, force=True)
    return {**record["fused"], "fusion_record": str(path)}


SCORE_WEIGHT_RATIOS = (0.0, 0.6, 1.0, 1.5, 2.4, 4.0, 6.0, 10.0, None)  # w_Y' / w_Y candidates (0.6: the paper's
                                                                     # lambda; None: O2W alone)


def branch_scores(model: nn.Module, split: SplitFeatures, word_set: str, images: int) -> tuple[np.ndarray, np.ndarray]:
    """(Y, Y') [N, N * cpi] of every pair of the first `images` images of a split and their captions (test attention)."""
    n_img = min(images, split.num_images)
    n_cap = n_img * captions_per_image_of(split)
    y, yp = model.branch_matrices(split.regions[:n_img], split.objects[:n_img], split.words(word_set)[:n_cap],
                                  np.asarray(split.lengths[:n_cap]))
    return y.numpy(), yp.numpy()


def tune_score_weights(checkpoint: str | os.PathLike, store: str | os.PathLike, split: str, images: int,
                       force: bool) -> dict:
    """Choose eq. 19's branch weights (w_Y, w_Y') = (1, r), r in SCORE_WEIGHT_RATIOS ((0, 1) for O2W alone), by BSSAN
    alone's rsum over every pair of the first `images` images of `split` (use dev); write CHECKPOINT/score_weights.json.
    The record changes MS, so a fusion record tuned before it is removed (rerun --tune-fusion)."""
    from training.checkpoint import FUSION, SCORE_WEIGHTS, WEIGHTS, ModelKind, load_checkpoint

    path = Path(checkpoint) / SCORE_WEIGHTS
    _refuse_existing(path, force)
    ckpt = load_checkpoint(checkpoint)
    if ckpt.kind is not ModelKind.BSSAN or not (ckpt.model_config.uses_w2r and ckpt.model_config.uses_o2w):
        raise InputError(f"--tune-score-weights {checkpoint}: expected a BSSAN checkpoint with both branches (full, no_reg), "
                         f"got {ckpt.kind.value} {getattr(ckpt.model_config, 'variant', None)}")
    features = FeatureStore(store).split(split)
    per = captions_per_image_of(features)
    y, yp = branch_scores(ckpt.model, features, ckpt.train_config.word_set, images)
    candidates = {}
    for ratio in SCORE_WEIGHT_RATIOS:
        weights = (0.0, 1.0) if ratio is None else (1.0, ratio)
        candidates[ratio] = (weights, own_scores_metrics(weights[0] * y + weights[1] * yp, per, bssan=True))
    best = max(candidates, key=lambda r: (candidates[r][1]["rsum"], r == 0.6))  # ties: the paper's lambda
    (w_y, w_yp), metrics = candidates[best]
    rsum = metrics["rsum"]
    record = {"w2r": w_y, "o2w": w_yp, "weights_sha256": file_sha256(Path(checkpoint) / WEIGHTS), "split": split,
              "images": int(y.shape[0]), "rsum": rsum,
              "candidates": [{"w2r": w[0], "o2w": w[1], "rsum": m["rsum"]} for w, m in candidates.values()]}
    write_json(path, record, force=True)
    stale = Path(checkpoint) / FUSION
    if stale.exists():
        stale.unlink()
        print(f"removed {stale}: tuned for the previous branch weights (rerun --tune-fusion)", file=sys.stderr)
    return {**metrics, "score_weights": record, "score_weights_record": str(path)}


HUB_KS = (4, 8, 16, 32)  # k of the hub correction tried (the mean of an image's k highest scores over the bank)
HUB_BETAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # beta tried; 0 = no correction
HUB_TEXT_KS = (2, 4, 8)  # the caption side's text_k tried (over the bank images)
HUB_GAMMAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # gamma tried; 0 = no caption side


def tune_hub(checkpoint: str | os.PathLike, store: str | os.PathLike, split: str, images: int, bank_size: int,
             force: bool, seed: int = 0, bank_images: int = 0) -> dict:
    """Choose the hub correction (engine/hub.py) by BSSAN alone over every pair of the first `images` images of
    `split` (use dev): a seeded bank of `bank_size` train captions, k in HUB_KS and beta in HUB_BETAS (0: none) by the
    text-to-image recall sum (the only direction r(i) reorders); with `bank_images` > 0 also a seeded bank of train
    images, text_k in HUB_TEXT_KS and gamma in HUB_GAMMAS by the image-to-text sum. Writes CHECKPOINT/hub_bank.npz
    when the best beta is > 0 (else removes a stale one); the correction changes MS, so a fusion record tuned before
    it is removed (rerun --tune-fusion)."""
    from engine.hub import HubBank, top_k_mean
    from training.checkpoint import FUSION, HUB_BANK, WEIGHTS, ModelKind, load_checkpoint

    path = Path(checkpoint) / HUB_BANK
    _refuse_existing(path, force)
    ckpt = load_checkpoint(checkpoint)
    if ckpt.kind is not ModelKind.BSSAN:
        raise InputError(f"--tune-hub {checkpoint}: expected a BSSAN checkpoint, got {ckpt.kind.value}")
    model = ckpt.model
    model.hub = None  # tune from the uncorrected MS
    store_ = FeatureStore(store)
    features, train = store_.split(split), store_.split("train")
    word_set = ckpt.train_config.word_set
    per = captions_per_image_of(features)
    n_img = min(images, features.num_images)
    n_cap = n_img * per
    rows = np.sort(np.random.default_rng(seed).choice(len(train.lengths), min(bank_size, len(train.lengths)), replace=False))
    lengths = np.asarray(train.lengths)[rows]
    words = np.asarray(train.words(word_set)[rows])[:, :int(lengths.max())]
    scores = model.score_matrix(features.regions[:n_img], features.objects[:n_img], features.words(word_set)[:n_cap],
                                np.asarray(features.lengths[:n_cap])).float().numpy()
    bank_scores = model.score_matrix(features.regions[:n_img], features.objects[:n_img], words, lengths).float().numpy()
    recall = lambda m, d: m[d]["r1"] + m[d]["r5"] + m[d]["r10"]  # noqa: E731
    candidates = []
    for k in HUB_KS:
        if k > len(rows):
            continue
        level = top_k_mean(bank_scores, k, axis=1)  # r(i)
        for beta in HUB_BETAS:
            metrics = own_scores_metrics(scores - beta * level[:, None], per, bssan=True)
            candidates.append({"k": k, "beta": beta, "t2i": recall(metrics, "t2i"), "offsets": beta * level})
    best = max(candidates, key=lambda c: (round(c["t2i"], 6), -c["beta"], -c["k"]))  # ties: the smaller correction
    corrected = scores - best["offsets"][:, None]
    image_bank, text_candidates, text_best = None, [], {"text_k": 0, "gamma": 0.0}
    if bank_images > 0 and best["beta"] > 0:  # the caption side, on top of the image side
        image_rows = np.sort(np.random.default_rng(seed + 1).choice(train.num_images, min(bank_images, train.num_images),
                                                                    replace=False))
        image_bank = (np.asarray(train.regions[image_rows], np.float16), np.asarray(train.objects[image_rows], np.float16))
        text_scores = model.score_matrix(image_bank[0].astype(np.float32), image_bank[1].astype(np.float32),
                                         features.words(word_set)[:n_cap], np.asarray(features.lengths[:n_cap])).float().numpy()
        for text_k in HUB_TEXT_KS:
            if text_k > len(image_rows):
                continue
            level = top_k_mean(text_scores, text_k, axis=0)  # s(c)
            for gamma in HUB_GAMMAS:
                metrics = own_scores_metrics(corrected - gamma * level[None, :], per, bssan=True)
                text_candidates.append({"text_k": text_k, "gamma": gamma, "i2t": recall(metrics, "i2t"), "offsets": gamma * level})
        text_best = max(text_candidates, key=lambda c: (round(c["i2t"], 6), -c["gamma"], -c["text_k"]))
        corrected = corrected - text_best["offsets"][None, :]
    final = own_scores_metrics(corrected, per, bssan=True)
    without = {"rsum": own_scores_metrics(scores, per, bssan=True)["rsum"]}
    record = {"weights_sha256": file_sha256(Path(checkpoint) / WEIGHTS), "score_weights": list(model.scoring_weights),
              "split": split, "images": n_img, "bank": {"split": "train", "captions": len(rows), "seed": seed,
                                                         "word_set": word_set, "rows": rows.tolist()},
              "k": best["k"], "beta": best["beta"], "rsum": final["rsum"], "rsum_without": without["rsum"],
              "candidates": [{k: c[k] for k in ("k", "beta", "t2i")} for c in candidates]}
    if image_bank is not None:
        record.update(bank_images={"split": "train", "images": len(image_rows), "seed": seed + 1, "rows": image_rows.tolist()},
                      text_k=text_best["text_k"], gamma=text_best["gamma"],
                      text_candidates=[{k: c[k] for k in ("text_k", "gamma", "i2t")} for c in text_candidates])
    if best["beta"] > 0:
        side = {} if image_bank is None or text_best["gamma"] == 0 else dict(
            regions=image_bank[0], objects=image_bank[1], text_k=text_best["text_k"], gamma=text_best["gamma"])
        HubBank.from_padded(words, lengths, best["k"], best["beta"], record, **side).save(path)
    elif path.exists():
        path.unlink()
    stale = Path(checkpoint) / FUSION
    if stale.exists():
        stale.unlink()
        print(f"removed {stale}: tuned before the hub correction (rerun --tune-fusion)", file=sys.stderr)
    return {**final, "hub": record, "hub_record": str(path) if best["beta"] > 0 else None}


def _k(text: str) -> int | None:
    return None if text == "all" else positive_int(text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--scores", type=Path, help="a saved score matrix .npy [N_images, N_captions]")
    source.add_argument("--checkpoint", type=Path, help="a checkpoint directory (training.train's RUN/best)")
    parser.add_argument("--captions-per-image", type=positive_int, help="with --scores: captions per image (required)")
    parser.add_argument("--folds", type=positive_int, default=1, help="average over this many equal folds of images (COCO 5-fold 1K: 5)")
    parser.add_argument("--store", type=Path, help="with --checkpoint: the feature store")
    parser.add_argument("--split", default="test", help="with --checkpoint: the store split (default test)")
    parser.add_argument("--json", type=Path, help="write the metrics here (atomically)")
    parser.add_argument("--save-scores", type=Path, help="with --checkpoint: also save the score matrix .npy here")
    parser.add_argument("--batch-images", type=positive_int, help="images per scoring block (default: the model's)")
    parser.add_argument("--batch-captions", type=positive_int, help="captions per scoring block (default: the model's)")
    parser.add_argument("--shortlist", type=Path, help="with --checkpoint: a dual-encoder checkpoint whose top-K pairs the model re-scores")
    parser.add_argument("--shortlist-k", type=_k, default=100, help="with --shortlist: K per query, or 'all' (default 100)")
    parser.add_argument("--tune-fusion", action="store_true",
                        help="with --shortlist: tune the fusion weight on --split (use dev) at --shortlist-k and write "
                             "CHECKPOINT/fusion.json (replacing one needs --force)")
    parser.add_argument("--tune-score-weights", type=positive_int, metavar="IMAGES",
                        help="choose eq. 19's branch weights by BSSAN alone over every pair of the first IMAGES images of "
                             "--split (use dev) and write CHECKPOINT/score_weights.json (replacing one needs --force)")
    parser.add_argument("--tune-hub", type=positive_int, metavar="IMAGES",
                        help="choose the image hub correction (engine/hub.py) by BSSAN alone over every pair of the first "
                             "IMAGES images of --split (use dev) and write CHECKPOINT/hub_bank.npz (replacing one needs --force)")
    parser.add_argument("--hub-bank", type=positive_int, default=256,
                        help="with --tune-hub: train captions in the bank (default 256; each image is scored against them once)")
    parser.add_argument("--hub-bank-images", type=int, default=0, metavar="N",
                        help="with --tune-hub: also a bank of N train images for the caption side (default 0: none; their "
                             "features are stored in hub_bank.npz, ~150 KB each at the flickr8k sizes)")
    parser.add_argument("--no-fusion", action="store_true",
                        help="with --shortlist: rank by BSSAN alone (default: the fusion tuned on dev, fusion.json)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--force", action="store_true", help="replace existing --json / --save-scores files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.scores is not None:
        if args.captions_per_image is None:
            parser.error("--scores needs --captions-per-image")
        for name in ("store", "save_scores", "batch_images", "batch_captions"):
            if getattr(args, name) is not None:
                parser.error(f"--{name.replace('_', '-')} goes with --checkpoint, not --scores")
    else:
        if args.store is None:
            parser.error("--checkpoint needs --store")
        if args.captions_per_image is not None:
            parser.error("--captions-per-image comes from the store with --checkpoint; drop it")
    if args.shortlist is not None and args.scores is not None:
        parser.error("--shortlist goes with --checkpoint, not --scores")
    return args


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    flush_denormals()
    for path in (args.json, args.save_scores):  # refuse before minutes of scoring, not after
        if path is not None and path.exists() and not args.force:
            raise InputError(f"{path}: exists; expected a new file (pass --force to replace it)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.scores is not None:
        scores = load_scores(args.scores)
        metrics = retrieval_metrics(scores, captions_per_image=args.captions_per_image, folds=args.folds)
    else:
        if args.tune_hub is not None:
            metrics = tune_hub(args.checkpoint, args.store, args.split, args.tune_hub, args.hub_bank, args.force,
                               bank_images=args.hub_bank_images)
            scores = None
        elif args.tune_score_weights is not None:
            metrics = tune_score_weights(args.checkpoint, args.store, args.split, args.tune_score_weights, args.force)
            scores = None
        elif args.shortlist is not None and args.tune_fusion:
            metrics = tune_fusion_for(args.checkpoint, args.shortlist, args.store, args.shortlist_k, args.split,
                                      args.force, progress=not args.no_progress)
            scores = None
        elif args.shortlist is not None:
            if args.save_scores is not None:
                raise InputError("--save-scores goes with exhaustive scoring (no --shortlist); the two-stage protocol "
                                 "ranks per direction, not one matrix")
            metrics = evaluate_two_stage(args.checkpoint, args.shortlist, args.store, args.shortlist_k, args.split,
                                         BSSAN_ALONE if args.no_fusion else "recorded", progress=not args.no_progress)
            scores = None
        else:
            metrics, scores = evaluate_checkpoint(args.checkpoint, args.store, args.split, args.batch_images,
                                                  args.batch_captions, progress=not args.no_progress)
        if args.folds > 1 and scores is not None:
            metrics.update(retrieval_metrics(scores, captions_per_image=metrics["captions_per_image"], folds=args.folds),
                           folds=args.folds)
        if args.save_scores is not None:
            save_scores(args.save_scores, scores, args.force)
    print(format_metrics(metrics))
    if args.json is not None:
        write_json(args.json, metrics, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
