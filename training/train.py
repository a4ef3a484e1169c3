"""Train BSSAN (or the dual-encoder baseline) on a feature store; resumable; keeps the best by dev rsum.

    python -m training.train --store STORE --out RUN_DIR [--preset flickr8k] [--model-kind bssan|dual_encoder]
        [--word-set glove50] [--set key=value ...] [--epochs N] [--seed S] [--threads N]

`--set` takes any ModelConfig / DualEncoderConfig field (variant=w2r, w2r_hidden=128) or
TrainConfig field (margin=0.1, negative_images=true, lr_decay_every=5); values are JSON
(true, 0.1, [256,1]) or plain strings; unknown keys and wrong types are errors. Input sizes
come from the store (a --set size that disagrees with it is an error).

RUN_DIR holds run.json (the run's configs), best/ (checkpoint with the best dev rsum so far),
last/ (checkpoint + train_state.pt: optimizer, torch RNG, epoch, batch position, history) and
curves.png (loss and dev rsum per epoch, drawn when the run ends). last/ is saved atomically
every --save-every seconds (and every --save-every-batches batches if given) and after each
epoch. Rerunning the same command after a crash or kill -9 continues from last/; since each
batch and its negatives are a pure function of (seed, epoch, batch), the result equals an
uninterrupted run bit for bit (same --threads). A RUN_DIR holding a run of a different config is refused; only --epochs may change.

Each epoch ends with dev R@K (engine.metrics) from the model's exhaustive score matrix over
the first `dev_images` dev images and their captions (TrainConfig default 200: exhaustive
1000 x 5000 BSSAN scoring is ~75 min on 2 CPU cores; --set dev_images=0 for the whole split).
Those per-epoch figures select the model; they are not the 1K protocol. Evaluate the best
checkpoint on the full split with python -m training.evaluate.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace as dataclass_replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from engine.cli import ArgumentParser, command, nonnegative_float, nonnegative_int, positive_float, positive_int
from engine.errors import DivergenceError, InputError
from engine.metrics import format_metrics
from engine.files import atomic_path, write_json_atomic
from engine.store import FeatureStore
from training.baseline import DUAL_ENCODER_PRESETS, DualEncoder, dual_encoder_loss, dual_encoder_preset
from training.checkpoint import (FUSION, WEIGHTS, ModelKind, build_model, load_train_state, load_weights, save_checkpoint)
from training.config import (PRESETS, RECIPES, LossKind, Optimizer, Schedule, TrainConfig, input_sizes_of_split, preset, recipe,
                             replace_strict, with_input_sizes)
from training.data import Batch, GroupedBatch, ImageBatches, PairBatches, input_scales
from training.evaluate import captions_per_image_of, flush_denormals, own_scores_metrics, score_split, tune_two_stage
from training.loss import LossTerms, bssan_grid_loss, bssan_listwise_loss, bssan_loss, hardest_in_batch
from training.model import BSSAN

RUN_CONFIG = "run.json"
INITIAL_WEIGHTS = "initial_weights.pt"  # the weights before the first step (parameter_movement)
RESUMABLE_CHANGES = ("epochs", "dev_exhaustive_images")  # train fields a rerun may change: they do not alter the epochs already run


class SimulatedKill(Exception):
    """--stop-after-batches: stop like kill -9 (nothing saved since the last periodic save)."""


@dataclass
class Position:
    """Where a run is and what it has seen: the non-tensor part of train_state.pt."""

    epoch: int = 0
    batch: int = 0              # next batch of `epoch` to run
    loss_sum: float = 0.0       # sum of batch losses so far in `epoch`
    pairs_seen: int = 0         # positive pairs so far in `epoch`
    best_rsum: float = -math.inf
    best_epoch: int = -1
    history: list = field(default_factory=list)  # one dict per finished epoch


# ---------------------------------------------------------------------------------------------
# One step of each model kind


def bssan_step(model: BSSAN, batch: Batch, config: TrainConfig, epoch: int = 0) -> torch.Tensor:
    """Paper loss (eq. 18) of one batch. Sampled negatives go through the model in ONE call with
    the positives, so BatchNorm's batch statistics cover positive and negative pairs alike
    (separate calls would normalise each set to the same mean score and erase the margin)."""
    if config.hardest_negatives:
        grid = model.forward_grid(batch.regions, batch.objects, batch.words, batch.lengths, batch.image_ids)
        same_image = batch.image_ids[:, None] == batch.image_ids[None, :]  # [B, B]
        positive, negatives = hardest_in_batch(grid, same_image, config.negative_images)
        return bssan_loss(model, positive, negatives, config.margin, config.reduction).total
    n = len(batch)
    regions, objects = [batch.regions, batch.regions], [batch.objects, batch.objects]
    captions = [(batch.words, batch.lengths), (batch.negative_words, batch.negative_lengths)]
    if config.negative_images:
        regions.append(batch.negative_regions)
        objects.append(batch.negative_objects)
        captions.append((batch.words, batch.lengths))
    max_len = max(words.shape[1] for words, _ in captions)
    words = torch.cat([nn.functional.pad(w, (0, 0, 0, max_len - w.shape[1])) for w, _ in captions])  # [K*B, L, E]
    lengths = torch.cat([length for _, length in captions])
    negative = torch.arange(len(captions) * n) >= n  # [K*B]: the first B pairs are the positives
    y, y_prime = model(torch.cat(regions), torch.cat(objects), words, lengths, negative=negative)
    groups = [(y[k * n:(k + 1) * n], y_prime[k * n:(k + 1) * n]) for k in range(len(captions))]
    return bssan_loss(model, groups[0], groups[1:], config.margin, config.reduction).total


def dropped_inputs(batch: GroupedBatch, config: TrainConfig) -> GroupedBatch:
    """The batch with TrainConfig.input_dropout applied to its regions, objects and words (padding stays zero)."""
    if config.input_dropout == 0:
        return batch
    drop = lambda x: nn.functional.dropout(x, config.input_dropout, training=True)  # noqa: E731
    return dataclass_replace(batch, regions=drop(batch.regions), objects=drop(batch.objects), words=drop(batch.words))


def bssan_grouped_step(model: BSSAN, batch: GroupedBatch, config: TrainConfig, epoch: int = 0) -> torch.Tensor:
    """Paper loss (eq. 18) of an image-grouped batch (training.data.ImageBatches): every pair in
    ONE forward_pairs call, so each image is encoded once and one BatchNorm batch covers all pairs."""
    batch = dropped_inputs(batch, config)
    n = len(batch)
    y, y_prime = model.forward_pairs(batch.regions, batch.objects, batch.words, batch.lengths,
                                     batch.pair_image, batch.pair_text, negative=batch.negative)
    groups = [(y[k * n:(k + 1) * n], y_prime[k * n:(k + 1) * n]) for k in range(batch.kinds)]

    def loss_of(scores: list) -> LossTerms:
        if config.loss is LossKind.LISTWISE:  # one softmax over the caption negatives, one over the image negatives
            split = 1 + batch.caption_kinds
            return bssan_listwise_loss(model, scores[0], scores[1:split], scores[split:], config.list_temperature,
                                       config.reduction)
        return bssan_loss(model, scores[0], scores[1:], config.margin, config.reduction)

    loss = loss_of(groups).total
    if config.residual_weight > 0:  # the product's view: the same pairs with the frozen first stage added
        shift = config.residual_weight * batch.first_stage  # [N_pair]
        fused = [(g[0] + shift[k * n:(k + 1) * n], g[1] + shift[k * n:(k + 1) * n]) for k, g in enumerate(groups)]
        terms = loss_of(fused)
        loss = loss + terms.total - model.config.effective_reg_weight * terms.reg  # L_reg counted once
    return loss


def bssan_grid_step(model: BSSAN, batch: GroupedBatch, config: TrainConfig, epoch: int = 0) -> torch.Tensor:
    """loss=grid: every image x every caption of an image-grouped batch (training.data.ImageBatches(grid=True)) in
    one grid call (each image and each caption encoded once; one BatchNorm batch), InfoNCE both ways per branch."""
    batch = dropped_inputs(batch, config)
    own = batch.pair_image[:len(batch)]  # [N_cap] batch row of each caption's image
    image_cache = model.encode_images(batch.regions, batch.objects, gates=True)
    text_cache = model.encode_texts(batch.words, batch.lengths)
    negative = torch.arange(len(batch.image_ids))[:, None] != own[None, :]  # [B_img, N_cap]: the uniform rule's pairs
    grid = model.score_grid_cached(image_cache, text_cache, negative=negative)
    return bssan_grid_loss(model, grid, own, batch.ignore, config.list_temperature, config.reduction).total


def dual_encoder_step(model: DualEncoder, batch: Batch, config: TrainConfig, epoch: int = 0) -> torch.Tensor:
    """VSE hinge on the in-batch grid (training.baseline.dual_encoder_loss); the hardest negative only
    (VSE++) from epoch config.hardest_from_epoch on, the sum over negatives before."""
    grid = model(batch.regions, batch.objects, batch.words, batch.lengths)  # [B, B]
    same_image = batch.image_ids[:, None] == batch.image_ids[None, :]
    hardest = config.hardest_negatives and epoch >= config.hardest_from_epoch
    return dual_encoder_loss(grid, same_image, config.margin, hardest, config.negative_images, config.reduction)


STEPS = {ModelKind.BSSAN: bssan_step, ModelKind.DUAL_ENCODER: dual_encoder_step}


# ---------------------------------------------------------------------------------------------
# Run directory


def check_run_dir(out: Path, run_config: dict) -> None:
    """Write RUN_DIR/run.json, or check that an existing one describes the same run."""
    path = out / RUN_CONFIG
    if not path.is_file():
        if out.exists() and any(out.iterdir()):
            raise InputError(f"{out}: exists, is not empty and has no {RUN_CONFIG}; expected a new or a training.train run directory")
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, run_config)
        return
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: corrupt JSON ({exc}); expected a training.train run config") from exc
    diffs = []
    train_defaults = TrainConfig().to_dict()  # a run.json older than a train field ran with its default
    for section in ("kind", "store", "model", "train"):
        old, new = existing.get(section), run_config[section]
        if isinstance(new, dict) and isinstance(old, dict):
            if section == "train":
                old = {**{k: v for k, v in train_defaults.items() if k not in old}, **old}
            diffs += [f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                      if old.get(k) != new.get(k) and not (section == "train" and k in RESUMABLE_CHANGES)]
        elif old != new:
            diffs.append(f"{section}: {old!r} -> {new!r}")
    if diffs:
        raise InputError(f"{path}: this run directory holds a run with a different config ({'; '.join(diffs)}); "
                         f"expected the same command, or a new --out")
    if existing["train"].get("epochs") != run_config["train"]["epochs"]:
        write_json_atomic(path, run_config)


def plot_curves(out: Path, history: list[dict]) -> None:
    """RUN_DIR/curves.png: training loss, dev rsum (and, for BSSAN behind a first stage, the fused product and
    the first stage alone at the same K), and the gradient norm before clipping with the clip, per epoch."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [h["epoch"] for h in history]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.4))
    left.plot(epochs, [h["loss"] for h in history], marker="o")
    left.set(xlabel="epoch", ylabel="mean batch loss", title="training loss")
    fused = [h.get("fusion") for h in history]
    if all(f is not None for f in fused):
        k = fused[0]["k"]
        middle.plot(epochs, [f["rsum"] for f in fused], marker="o", color="tab:green", label=f"product (top-{k} fused)")
        middle.plot(epochs, [h["dev"]["rsum"] for h in history], marker="o", color="tab:orange", label=f"BSSAN alone re-ranking top-{k}")
        middle.plot(epochs, [f["first_stage_alone"] for f in fused], ls="--", color="gray", label="first stage alone")
        middle.legend(fontsize=7)
    else:
        middle.plot(epochs, [h["dev"]["rsum"] for h in history], marker="o", color="tab:green")
    middle.set(xlabel="epoch", ylabel="rsum", title=f"dev rsum ({history[-1]['dev_images'] or 'all'} images)")
    if all("grad_norm_median" in h for h in history):
        right.plot(epochs, [h["grad_norm_median"] for h in history], marker="o", label="median")
        right.plot(epochs, [h["grad_norm_max"] for h in history], marker=".", label="max")
        right.set_yscale("log")
        right.legend(fontsize=7)
    right.set(xlabel="epoch", ylabel="global grad norm (before clip)", title="gradient norm")
    fig.tight_layout()
    with atomic_path(out / "curves.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Training


def learning_rate(config: TrainConfig, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """The lr of batch `step` of `epoch`: linear warm-up over the first warmup_steps batches of the run,
    then the schedule (constant, step decay per epoch, or cosine to lr * min_lr_ratio at the run's end)."""
    done = epoch * steps_per_epoch + step  # batches before this one
    warmup_steps = math.ceil(config.warmup_epochs * steps_per_epoch)
    warm = min(1.0, (done + 1) / warmup_steps) if warmup_steps else 1.0
    if config.schedule is Schedule.STEP or (config.schedule is Schedule.CONSTANT and config.lr_decay_every):
        decays = epoch // config.lr_decay_every if config.lr_decay_every else 0
        return warm * config.lr * config.lr_decay ** decays
    if config.schedule is Schedule.CONSTANT:
        return warm * config.lr
    total = max(config.epochs * steps_per_epoch - warmup_steps, 1)
    progress = min(max(done - warmup_steps, 0) / total, 1.0)
    floor = config.lr * config.min_lr_ratio
    return warm * (floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer is Optimizer.SGD:
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (ru_maxrss, KiB on Linux)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class GradientLog:
    """Per-epoch statistics of the global gradient norm BEFORE clipping and the share of clipped steps
    (a clip that acts on every step is the step size, not a safety net)."""

    def __init__(self, clip: float, norms: list | None = None):
        self.clip, self.norms = clip, list(norms or [])

    def add(self, norm: float) -> None:
        self.norms.append(float(norm))

    def summary(self) -> dict:
        if not self.norms:
            return {}
        norms = torch.tensor(self.norms, dtype=torch.float64)
        clipped = float((norms > self.clip).double().mean()) if self.clip > 0 else 0.0
        return {"grad_norm_mean": round(float(norms.mean()), 4), "grad_norm_median": round(float(norms.median()), 4),
                "grad_norm_max": round(float(norms.max()), 4), "clipped_share": round(clipped, 4)}


def parameter_movement(model: nn.Module, initial: dict[str, torch.Tensor]) -> dict[str, dict]:
    """How far each parameter moved from its initial value: the L2 change ||w - w0||, relative to ||w0||
    (None for a tensor that started at zero, e.g. a bias), and the correlation of w with w0 (1.0: it did
    not train; None for a scalar or a constant tensor)."""
    out = {}
    for name, param in model.named_parameters():
        w, w0 = param.detach().double().flatten(), initial[name].double().flatten()
        change, norm0 = float((w - w0).norm()), float(w0.norm())
        corr = (float(torch.corrcoef(torch.stack([w, w0]))[0, 1])
                if w.numel() > 1 and float(w0.std()) > 0 and float(w.std()) > 0 else None)
        out[name] = {"absolute_change": round(change, 6), "relative_change": round(change / norm0, 4) if norm0 > 0 else None,
                     "correlation": None if corr is None else round(corr, 4), "numel": int(w.numel())}
    return out


def dev_evaluation(model: nn.Module, dev_split, config: TrainConfig, images: int, first_stage, progress: bool
                   ) -> tuple[dict, float, dict | None]:
    """(dev metrics, selection rsum, fusion record or None) of a model in eval mode, through engine.ranking.

    - dual encoder, or BSSAN without a first stage: exhaustive scores of the first `images` dev images
      (0 = all) and their captions (BSSAN exhaustive over 1K x 5K costs over an hour on 2 cores).
    - BSSAN with a first stage: the product's protocol on the whole split: the first stage's top dev_k
      per query re-scored by BSSAN, fused with a weight tuned on this split (FUSION_GRID, weight 0 =
      the first stage alone included); selection by the fused rsum + 0.1 x BSSAN alone's rsum at K.
      The record keeps BSSAN alone at K and the first stage alone beside it."""
    per = captions_per_image_of(dev_split)
    if first_stage is None:
        scores = score_split(model, dev_split, config.word_set, images=images, progress=progress)
        dev = own_scores_metrics(scores, per, bssan=isinstance(model, BSSAN))
        return dev, dev["rsum"], None
    first = first_stage.scores(dev_split)  # [N_img, N_cap]
    alone, record = tune_two_stage(model, dev_split, config.word_set, first, config.dev_k, progress)
    record.update(first_stage=str(first_stage.directory), first_stage_sha256=first_stage.weights_sha256)
    if config.dev_exhaustive_images > 0:  # BSSAN alone over every pair of the first N dev images (not in the selection)
        scores = score_split(model, dev_split, config.word_set, images=config.dev_exhaustive_images, progress=progress)
        record["exhaustive"] = {**own_scores_metrics(scores, per, bssan=True), "images": scores.shape[0]}
    # the fused dev rsum moves by ~1 between late epochs (the weight is re-tuned each time), so BSSAN alone counts a
    # tenth: measured on Flickr8K, the fused rsum was flat (245.5-246.6) from epoch 5 to 12 while BSSAN alone rose 202 -> 211
    return alone, record["rsum"] + 0.1 * alone["rsum"], record


def start_from(model: nn.Module, model_config: Any, directory: str) -> None:
    """Load a checkpoint's weights into a fresh model of the same config (TrainConfig.init_from)."""
    from training.checkpoint import load_checkpoint

    source = load_checkpoint(directory)
    if source.model_config.to_dict() != model_config.to_dict():
        differ = sorted(k for k, v in model_config.to_dict().items() if source.model_config.to_dict().get(k) != v)
        raise InputError(f"TrainConfig.init_from {directory}: its model config differs from this run's in {differ}; "
                         f"expected the same model")
    model.load_state_dict(source.model.state_dict())


def train(store_path: str | os.PathLike, out: str | os.PathLike, kind: ModelKind, model_config: Any,
          train_config: TrainConfig, save_every: float = 60.0, save_every_batches: int = 0,
          stop_after_batches: int = 0, progress: bool = True, plot: bool = True, command: list[str] | None = None,
          wait_for_dev: float = 0.0) -> dict:
    """Train (or resume) a run; returns the last metrics.json payload. See the module docstring.
    wait_for_dev > 0: a store whose dev split is still being extracted is accepted; each epoch's
    end waits up to that many seconds for the dev split to appear in the manifest."""
    out, kind = Path(out), ModelKind(kind)
    store = FeatureStore(store_path)
    store.split("train")
    if not (wait_for_dev > 0 and "dev" not in store.splits):
        captions_per_image_of(store.split("dev"))  # refuse an ungrouped dev split before training, not after an epoch
    run_config = {"kind": kind.value, "store": str(Path(store_path).resolve()), "model": model_config.to_dict(),
                  "train": train_config.to_dict()}
    check_run_dir(out, run_config)
    lock = open(out / ".lock", "w")  # held until this process ends: one trainer per RUN_DIR
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InputError(f"{out}: another training.train is running in this run directory; expected one at a time") from None
    try:
        check_run_dir(out, run_config)  # again under the lock: a concurrent start may have written run.json
        return _train(store, out, kind, model_config, train_config, save_every, save_every_batches, stop_after_batches,
                      progress, plot, command, wait_for_dev)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def set_forget_bias(model: nn.Module, value: float) -> None:
    """Every nn.LSTM of the model starts with forget-gate bias `value` (b_ih's forget slice; b_hh's forget slice 0)."""
    with torch.no_grad():
        for lstm in (m for m in model.modules() if isinstance(m, nn.LSTM)):
            hidden = lstm.hidden_size
            for name, bias in lstm.named_parameters():
                if name.startswith("bias_"):  # nn.LSTM's gate order i, f, g, o
                    bias[hidden:2 * hidden] = value if name.startswith("bias_ih") else 0.0


def _train(store: FeatureStore, out: Path, kind: ModelKind, model_config: Any, train_config: TrainConfig, save_every: float,
           save_every_batches: int, stop_after_batches: int, progress: bool, plot: bool, command: list[str] | None,
           wait_for_dev: float = 0.0) -> dict:
    from tqdm import tqdm

    train_split = store.split("train")
    torch.manual_seed(train_config.seed)
    model, _ = build_model(kind, model_config.to_dict())
    first_stage = None
    if kind is ModelKind.BSSAN and train_config.first_stage:
        from training.mining import FirstStage
        own = FeatureStore(train_config.first_stage_store) if train_config.first_stage_store else None
        first_stage = FirstStage.load(train_config.first_stage, store, out, inputs=own)
    if kind is ModelKind.BSSAN and hasattr(model, "set_input_scales"):
        model.set_input_scales(input_scales(train_split, train_config.word_set))  # before the initial copy: part of w0
    for branch in (getattr(model, "w2r", None), getattr(model, "o2w", None)):
        if branch is not None:
            branch.state_dropout = train_config.state_dropout  # training mode only; not part of the weights
    if kind is ModelKind.BSSAN and train_config.lstm_forget_bias:
        set_forget_bias(model, train_config.lstm_forget_bias)  # before the initial copy: part of w0
    if train_config.init_from:
        start_from(model, model_config, train_config.init_from)  # weights and input scales of an earlier run
    initial_path = out / INITIAL_WEIGHTS
    if not initial_path.is_file():  # the weights before the first step, for parameter_movement at the end
        with atomic_path(initial_path) as tmp:
            torch.save(model.state_dict(), tmp)
    optimizer = build_optimizer(model, train_config)
    pos = Position()
    state = load_train_state(out / "last") if (out / "last").is_dir() else None
    if state is not None:
        load_weights(out / "last" / WEIGHTS, model)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        pos = Position(**state["position"])
        print(f"resuming {out}: {pos.epoch} epoch(s) done, next batch {pos.batch} of epoch {pos.epoch + 1}", file=sys.stderr)

    grouped = kind is ModelKind.BSSAN and train_config.batch_images > 0 and not train_config.hardest_negatives
    if grouped:
        mining = first_stage.mining(train_config) if first_stage is not None else None
        grid = train_config.loss is LossKind.GRID
        batches = ImageBatches(train_split, train_config.word_set, train_config.batch_images, train_config.seed,
                               negative_images=train_config.negative_images and not grid, mining=mining,
                               negatives_per_kind=train_config.negatives_per_kind, grid=grid)
    else:
        batches = PairBatches(train_split, train_config.word_set, train_config.batch_size, train_config.seed,
                              negative_captions=kind is ModelKind.BSSAN and not train_config.hardest_negatives,
                              negative_images=kind is ModelKind.BSSAN and train_config.negative_images
                              and not train_config.hardest_negatives)
    step = (bssan_grid_step if train_config.loss is LossKind.GRID else bssan_grouped_step) if grouped else STEPS[kind]
    metrics = {"dev": pos.history, "best_epoch": pos.best_epoch}
    gradients = GradientLog(train_config.grad_clip, (state or {}).get("grad_norms"))

    def dev_split_of_store():
        deadline = time.monotonic() + wait_for_dev
        while wait_for_dev > 0 and "dev" not in FeatureStore(store.root).splits and time.monotonic() < deadline:
            time.sleep(min(20.0, max(deadline - time.monotonic(), 0.0)))  # the store's extraction is still running
        dev_split = FeatureStore(store.root).split("dev")
        captions_per_image_of(dev_split)
        metrics["dev_images"] = min(train_config.dev_images or dev_split.num_images, dev_split.num_images)
        return dev_split

    if "dev" in store.splits:
        dev_split_of_store()

    def sync_metrics() -> None:
        metrics.update(dev=pos.history, best_epoch=pos.best_epoch)
        if pos.best_epoch > 0:
            metrics["best_dev"] = pos.history[pos.best_epoch - 1]["dev"]

    def save_last() -> None:
        sync_metrics()
        train_state = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                       "position": dict(vars(pos)), "grad_norms": list(gradients.norms)}
        save_checkpoint(out / "last", model, train_config, store=store, metrics=metrics, train_state=train_state,
                        command=command, overwrite=True)

    ran, last_save = 0, time.monotonic()
    for epoch in range(pos.epoch, train_config.epochs):
        order = batches.order(epoch)
        model.train()
        epoch_start, pairs_before = time.perf_counter(), pos.pairs_seen
        bar = tqdm(total=batches.num_pairs, initial=pos.pairs_seen,
                   unit="pair", unit_scale=True, desc=f"epoch {epoch + 1}/{train_config.epochs}", disable=not progress)
        for index in range(pos.batch, batches.num_batches):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(train_config, epoch, index, batches.num_batches)
            batch = batches.batch(epoch, index, order)
            loss = step(model, batch, train_config, epoch=epoch)
            if not torch.isfinite(loss):
                raise DivergenceError(f"training diverged at epoch {epoch + 1} batch {index}: loss {loss.item()}; "
                                      f"expected a finite loss (lower lr={train_config.lr} or grad_clip={train_config.grad_clip})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # the norm BEFORE clipping is logged; max_norm inf measures without clipping
            norm = nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip if train_config.grad_clip > 0 else math.inf)
            gradients.add(float(norm))
            optimizer.step()
            pos.batch, pos.loss_sum, pos.pairs_seen = index + 1, pos.loss_sum + loss.item(), pos.pairs_seen + len(batch)
            bar.update(len(batch))
            bar.set_postfix(loss=f"{pos.loss_sum / pos.batch:.4f}", lr=f"{optimizer.param_groups[0]['lr']:g}")
            ran += 1
            if stop_after_batches and ran >= stop_after_batches:
                bar.close()
                raise SimulatedKill(f"stopped after {ran} batches (--stop-after-batches), as if killed")
            if (save_every_batches and ran % save_every_batches == 0) or time.monotonic() - last_save >= save_every:
                save_last()
                last_save = time.monotonic()
        bar.close()
        pairs_per_second = (pos.pairs_seen - pairs_before) / max(time.perf_counter() - epoch_start, 1e-9)

        model.eval()
        dev_split = dev_split_of_store()
        start = time.perf_counter()
        dev, selection, fusion_record = dev_evaluation(model, dev_split, train_config, metrics["dev_images"], first_stage, progress)
        epoch_norms = GradientLog(train_config.grad_clip, gradients.norms[-max(pos.batch, 1):]).summary()
        record = {"epoch": epoch + 1, "loss": pos.loss_sum / max(pos.batch, 1), "pairs": pos.pairs_seen,
                  "lr": optimizer.param_groups[0]["lr"], "train_pairs_per_second": round(pairs_per_second, 1),
                  "dev": dev, "dev_images": metrics["dev_images"], "dev_seconds": round(time.perf_counter() - start, 3),
                  "selection_rsum": selection, "epoch_seconds": round(time.perf_counter() - epoch_start, 1),
                  "peak_rss_mb": peak_rss_mb(), **epoch_norms}
        if fusion_record is not None:
            record["fusion"] = fusion_record
        pos.history = pos.history + [record]
        print(f"epoch {epoch + 1}: loss {record['loss']:.4f} | grad norm median {epoch_norms.get('grad_norm_median')} "
              f"clipped {epoch_norms.get('clipped_share')} | dev {format_metrics(dev)}"
              + (f" | fused rsum {fusion_record['rsum']:.1f} (bssan_weight {fusion_record['bssan_weight']:.3g})" if fusion_record else "")
              + (f" | exhaustive {fusion_record['exhaustive']['images']} images rsum {fusion_record['exhaustive']['rsum']:.1f}"
                 if fusion_record and "exhaustive" in fusion_record else ""),
              file=sys.stderr)
        if selection > pos.best_rsum:
            pos.best_rsum, pos.best_epoch = selection, epoch + 1
            sync_metrics()
            save_checkpoint(out / "best", model, train_config, store=store, metrics=metrics, command=command, overwrite=True)
            if fusion_record is not None:
                write_json_atomic(out / "best" / FUSION, fusion_record)
        pos.epoch, pos.batch, pos.loss_sum, pos.pairs_seen = epoch + 1, 0, 0.0, 0
        save_last()
        last_save = time.monotonic()
    sync_metrics()
    if pos.epoch >= train_config.epochs and initial_path.is_file():
        movement = parameter_movement(model, torch.load(initial_path, weights_only=True))
        metrics["parameter_movement"] = movement
        write_json_atomic(out / "movement.json", movement)
    if plot and pos.history:
        plot_curves(out, pos.history)
    return metrics


# ---------------------------------------------------------------------------------------------
# Command line


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """["key=value", ...] -> {key: JSON value or the raw string}."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set {item!r}: expected key=value")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def configs_from_args(args: argparse.Namespace) -> tuple[Any, TrainConfig]:
    """(model config, TrainConfig) from --preset, --set, --epochs, --seed, --word-set and the store's input sizes."""
    kind = ModelKind(args.model_kind)
    model_config = preset(args.preset) if kind is ModelKind.BSSAN else dual_encoder_preset(args.preset)
    overrides = parse_set(args.set)
    model_fields, train_fields = set(model_config.to_dict()), set(TrainConfig().to_dict())
    unknown = sorted(set(overrides) - model_fields - train_fields)
    if unknown:
        raise InputError(f"--set: unknown key(s) {unknown}; expected fields of {type(model_config).__name__} "
                         f"{sorted(model_fields)} or TrainConfig {sorted(train_fields)}")
    train_overrides = {k: v for k, v in overrides.items() if k in train_fields}
    for name in ("epochs", "seed", "word_set"):
        if getattr(args, name) is not None:
            train_overrides[name] = getattr(args, name)
    train_config = replace_strict(recipe(args.recipe), **train_overrides)
    model_overrides = {k: v for k, v in overrides.items() if k in model_fields}
    model_config = replace_strict(model_config, **model_overrides)
    split = FeatureStore(args.store).split("train")
    if train_config.word_set not in split.word_sets:
        raise InputError(f"--word-set {train_config.word_set!r}: the store's train split has {split.word_sets}")
    sizes = input_sizes_of_split(split, train_config.word_set)
    return with_input_sizes(model_config, sizes, explicit=model_overrides, source=f"feature store {args.store}"), train_config


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="feature store directory (python -m engine.features)")
    parser.add_argument("--out", type=Path, required=True, help="run directory: best/, last/, run.json, curves.png")
    parser.add_argument("--model-kind", choices=[k.value for k in ModelKind], default=ModelKind.BSSAN.value)
    parser.add_argument("--preset", choices=sorted(set(PRESETS) | set(DUAL_ENCODER_PRESETS)), default="flickr8k",
                        help="named model sizes (input sizes are then taken from the store)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="default",
                        help="optimisation recipe: default (AdamW, mean hinges, warm-up + cosine) or paper (SGD 0.01, summed hinges)")
    parser.add_argument("--word-set", help="words_<set>.npy of the store to read (default: TrainConfig's glove50)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model or train config field")
    parser.add_argument("--epochs", type=positive_int, help="number of epochs (may change between resumes)")
    parser.add_argument("--seed", type=nonnegative_int, help="seed of initialisation, shuffling and negatives")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (resume with the same number for bit-equal results)")
    parser.add_argument("--save-every", type=positive_float, default=60.0, metavar="SECONDS", help="save last/ at least this often")
    parser.add_argument("--save-every-batches", type=nonnegative_int, default=0, metavar="N", help="also save last/ every N batches")
    parser.add_argument("--stop-after-batches", type=nonnegative_int, default=0, metavar="N",
                        help="debug: stop after N batches as if killed (exit code 3), to test resuming")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--wait-for-dev", type=nonnegative_float, default=0.0, metavar="SECONDS",
                        help="start while the store's dev split is still being extracted; wait up to this long for it at each epoch's end")
    return parser.parse_args(argv)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    flush_denormals()
    command = [sys.executable, "-m", "training.train", *(sys.argv[1:] if argv is None else argv)]
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        model_config, train_config = configs_from_args(args)
        metrics = train(args.store, args.out, ModelKind(args.model_kind), model_config, train_config,
                        save_every=args.save_every, save_every_batches=args.save_every_batches,
                        stop_after_batches=args.stop_after_batches, progress=not args.no_progress, command=command,
                        wait_for_dev=args.wait_for_dev)
    except SimulatedKill as exc:
        print(str(exc), file=sys.stderr)
        return 3
    best = metrics["dev"][metrics["best_epoch"] - 1]["dev"] if metrics["best_epoch"] > 0 else None
    if best is not None:
        print(f"best epoch {metrics['best_epoch']}: dev {format_metrics(best)} -> {args.out / 'best'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
