"""Configuration of the BSSAN model and its training: plain dataclasses, named presets, strict overrides.

    from training.config import preset, replace_strict, ModelConfig, TrainConfig
    cfg = replace_strict(preset("flickr8k"), variant="w2r")     # unknown keys / wrong types -> InputError
    cfg = with_input_sizes(cfg, input_sizes_of_split(store.split("train"), "glove50"), explicit=set())
    json.dumps(cfg.to_dict())                                   # enums become their string values

Every size of the model is a field here; no module hard-codes one. Where the paper is silent
the default says why beside it (see ../shared/docs/BSSAN-spec.md, "Where the paper is silent").
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Iterable, TypeVar, get_type_hints

from engine.errors import InputError
from engine.text import MAX_WORDS


class Variant(str, enum.Enum):
    """Which branches are trained and scored (the paper's ablations)."""

    FULL = "full"      # W2R + O2W, MS = Y + lambda Y', with L_reg
    W2R = "w2r"        # spatial branch only (O2W not built)
    O2W = "o2w"        # semantic branch only (W2R not built)
    NO_REG = "no_reg"  # both branches, delta forced to 0


class NegativeAttention(str, enum.Enum):
    """Attention used for NEGATIVE pairs during training (eq. 8). Test pairs always use softmax."""

    UNIFORM = "uniform"  # the paper's rule: a = 1/D (W2R), b = 1/len (O2W)
    SOFTMAX = "softmax"  # same attention as positives and as test time


class AttentionForm(str, enum.Enum):
    """How attention logits are formed (eq. 2 / 10)."""

    TANH = "tanh"      # the paper: softmax(tanh(x + b)); over 49 regions no weight can exceed 0.133 (uniform 0.020)
    SCALED = "scaled"  # softmax(tau * x) with a learnable temperature tau (b drops out of a softmax): can focus


class Reduction(str, enum.Enum):
    """How hinge terms over a batch are reduced."""

    SUM = "sum"    # eq. 7 / 17 as written: a sum over the positives of the batch
    MEAN = "mean"  # batch-size independent; makes lr not depend on batch_size


# The input sizes of the named feature settings: ONE table, used by ModelConfig's and DualEncoderConfig's
# defaults and presets (a feature store then fixes them: with_input_sizes).
PAPER_INPUTS = dict(region_count=196,  # D: 14x14 grid of VGG-19 conv5_4
                    region_dim=512,    # M
                    object_count=10,   # P: top-10 detector proposals
                    object_dim=4096,   # Q: fc7 of the detector's box head
                    word_dim=300,      # E: GloVe 300d
                    max_words=MAX_WORDS)  # L: captions longer than 30 tokens are truncated (paper; engine.text)
FLICKR8K_INPUTS = dict(region_count=49, region_dim=1280,  # EfficientNet-Lite0 last map at 224 px: 7x7 x 1280
                       object_count=10, object_dim=1280,  # 10 detector boxes, RoIAlign on that same map, pooled
                       word_dim=50, max_words=MAX_WORDS)  # GloVe 6B 50d (a minilm store gives 384)
DEMO_INPUTS = dict(region_count=9, region_dim=16, object_count=4, object_dim=16, word_dim=12, max_words=8)  # tests/conftest.py


@dataclass
class InputSizes:
    """The six input sizes every model config starts with (a feature store fixes them: with_input_sizes)."""

    region_count: int = PAPER_INPUTS["region_count"]
    region_dim: int = PAPER_INPUTS["region_dim"]
    object_count: int = PAPER_INPUTS["object_count"]
    object_dim: int = PAPER_INPUTS["object_dim"]
    word_dim: int = PAPER_INPUTS["word_dim"]
    max_words: int = PAPER_INPUTS["max_words"]


@dataclass
class ModelConfig(InputSizes):
    # --- W2R (spatial) ---
    w2r_hidden: int = 1024                     # LSTM hidden size H (paper)
    w2r_mlp: tuple[int, ...] = (1024, 512, 128, 1)  # Table I, each number one Linear's output width
    # --- O2W (semantic) ---
    o2w_hidden: int = 512                      # Bi-LSTM hidden per direction; directions averaged
    o2w_mlp: tuple[int, ...] = (512, 256, 64, 1)    # Table I, on [o_j; v_j] of width Q + o2w_hidden
    o2w_weight: float = 0.6    # lambda of eq. 18 and 19 (paper)
    # --- variants and the training-only attention rule ---
    variant: Variant = Variant.FULL
    negative_attention: NegativeAttention = NegativeAttention.UNIFORM  # paper's eq. 8
    reg_weight: float = 0.01   # delta of eq. 18 (paper); forced to 0 by variant no_reg
    # --- beyond the paper (issue 10); the defaults keep old checkpoints' meaning, presets switch them on ---
    input_scaling: bool = False  # multiply regions, objects and words by per-channel 1/RMS of the train split
                                 # (buffers saved with the weights; folded into the first linear maps at export)
    attention: AttentionForm = AttentionForm.TANH
    w2r_readout: str = "last"  # what W2R's MLP reads: "last", the LSTM state at the caption's last real word (paper),
                               # "mean", the mean of its states over the real words, or "per_word", each real word's
                               # state, Y being the mean of those scores (as O2W's Y' is over objects); the last two
                               # are training and torch evaluation only: export, the ONNX graphs and the kernels
                               # implement "last"
    w2r_regions: str = "grid"  # what W2R attends over: "grid", the D cells of the feature map (paper), or "grid+objects",
                               # those cells and the P detector boxes (D + P regions; needs region_dim == object_dim;
                               # training and torch evaluation only, like w2r_readout="mean")

    def __post_init__(self) -> None:
        _coerce_enums(self)
        if self.w2r_readout not in ("last", "mean", "per_word"):
            raise InputError(f"ModelConfig.w2r_readout: expected 'last', 'mean' or 'per_word', got {self.w2r_readout!r}")
        if self.w2r_regions not in ("grid", "grid+objects"):
            raise InputError(f"ModelConfig.w2r_regions: expected 'grid' or 'grid+objects', got {self.w2r_regions!r}")
        if self.w2r_regions == "grid+objects" and self.region_dim != self.object_dim:
            raise InputError(f"ModelConfig.w2r_regions 'grid+objects': expected region_dim == object_dim, "
                             f"got {self.region_dim} and {self.object_dim}")
        for name in ("region_count", "region_dim", "object_count", "object_dim", "word_dim",
                     "max_words", "w2r_hidden", "o2w_hidden"):
            if getattr(self, name) < 1:
                raise InputError(f"ModelConfig.{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("w2r_mlp", "o2w_mlp"):
            widths = getattr(self, name)
            if not widths or widths[-1] != 1 or min(widths) < 1:
                raise InputError(f"ModelConfig.{name}: expected positive layer widths ending in 1, got {list(widths)}")
        if self.o2w_weight < 0 or self.reg_weight < 0:
            raise InputError(f"ModelConfig: expected o2w_weight >= 0 and reg_weight >= 0, "
                             f"got {self.o2w_weight} and {self.reg_weight}")

    @property
    def uses_w2r(self) -> bool:
        return self.variant is not Variant.O2W

    @property
    def uses_o2w(self) -> bool:
        return self.variant is not Variant.W2R

    @property
    def branch_weights(self) -> tuple[float, float]:
        """(weight of Y / L1, weight of Y' / L2). Full: (1, lambda) per eq. 18-19. A single-branch
        variant weighs its branch 1 (our reading: the ablation trains that branch's loss alone)."""
        if self.variant is Variant.W2R:
            return 1.0, 0.0
        if self.variant is Variant.O2W:
            return 0.0, 1.0
        return 1.0, self.o2w_weight

    @property
    def effective_reg_weight(self) -> float:
        return 0.0 if self.variant is Variant.NO_REG else self.reg_weight

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


class LossKind(str, enum.Enum):
    """How BSSAN's scores of a positive and its negatives become a loss (image-grouped batches)."""

    HINGE = "hinge"        # eq. 7 / 17: max(0, margin - Y(pos) + Y(neg)) per negative (the paper's)
    LISTWISE = "listwise"  # softmax cross-entropy of the positive against its negatives of one kind (captions of
                           # other images; other images), per branch: a re-ranker trained on groups of the first
                           # stage's candidates (localized contrastive estimation, Gao et al. 2021)
    GRID = "grid"          # every image x every caption of an image-grouped batch is scored; per branch, softmax
                           # cross-entropy of each positive against ALL the batch's other images (text -> image) and
                           # all their captions (image -> text), InfoNCE-style. With a first stage and
                           # mined_fraction > 0 (its value is not used) a share neighbour_share of the batch seeds
                           # bring their first-stage neighbours (hard in-batch negatives; 0: random batches);
                           # with a first stage, near-duplicates are masked out (mining_guard). ~8x the pairs of a
                           # sampled step, scored as one grid at about the same CPU: teaches BSSAN to rank every
                           # candidate, not only to separate a positive from one sampled negative


class Optimizer(str, enum.Enum):
    SGD = "sgd"      # the paper's: SGD with momentum
    ADAMW = "adamw"  # the default recipe: per-parameter step sizes, so the LSTM, the attention and the MLPs all move


class Schedule(str, enum.Enum):
    CONSTANT = "constant"  # lr throughout (the paper's)
    STEP = "step"          # lr *= lr_decay every lr_decay_every epochs
    COSINE = "cosine"      # cosine from lr to lr * min_lr_ratio over the run (after warm-up)


@dataclass
class TrainConfig:
    """The default is a recipe that trains (issue 10): AdamW, mean-reduced hinges, linear warm-up then
    cosine decay, the clip a safety net. Measured on models/reference's old recipe (SGD lr 0.01, summed
    hinges, clip 2): the global gradient norm was ~300-410, so every step was clipped to ~0.5% of the
    gradient and the LSTMs barely moved (weights correlate 0.998-0.999 with their initial values after
    4 epochs). `paper_recipe()` keeps the paper's settings reachable (--recipe paper)."""

    margin: float = 0.2        # M of eq. 7/17: paper silent; 0.2 is the usual value for hinge ranking
                               # on cosine-free scores (VSE++); choose on the dev split and record it
    optimizer: Optimizer = Optimizer.ADAMW
    lr: float = 5e-4           # AdamW peak lr (after warm-up); the paper's SGD uses 0.01
    momentum: float = 0.9      # SGD only (paper)
    weight_decay: float = 0.0  # AdamW's decoupled decay; the model's own L_reg (delta, eq. 18) is the paper's regulariser
    warmup_epochs: float = 0.3  # linear warm-up of the lr from 0 over this share of an epoch's batches (Adam's early
                                # moments are noisy); ~70 batches of 128 captions on Flickr8K
    schedule: Schedule = Schedule.COSINE
    min_lr_ratio: float = 0.05  # cosine ends at lr * this
    batch_size: int = 128      # paper silent; 128 positives keep 2-core steps under a second at flickr8k sizes
    batch_images: int = 0      # > 0: BSSAN batches of this many images, each with ALL its captions as positives
                               # (training.data.ImageBatches), so W2R's G = R W_ih_u^T is built once per image for
                               # its ~3 x captions_per_image pairs; batch_size then applies to the dual encoder only
    epochs: int = 15           # paper silent
    seed: int = 0
    negative_images: bool = False    # also hinge against one sampled unmatched image per caption (beyond the paper)
    hardest_negatives: bool = False  # use the hardest in-batch negatives instead of sampled ones (beyond the paper)
    hardest_from_epoch: int = 0      # with hardest_negatives: sum over in-batch negatives before this epoch (0-based),
                                     # hardest from it on (VSE++: the max-violation loss is unstable on a cold model)
    word_set: str = "glove50"        # which words_<set>.npy of the feature store to read
    reduction: Reduction = Reduction.MEAN  # the paper sums eq. 7 over the batch; a mean keeps lr independent of batch size
    grad_clip: float = 20.0    # max global grad norm; 0 disables. A safety net against one bad batch. Measured on
                               # Flickr8K (flickr8k preset, minilm): median norm before clipping 0.11 (dual encoder)
                               # and ~6 (BSSAN, whose 1280-d scaled regions feed W_ih directly): a clip of 5 acted on
                               # 72% of BSSAN's steps, 20 on few (the share is logged per epoch)
    lr_decay_every: int = 0    # schedule=step: lr *= lr_decay every this many epochs
    lr_decay: float = 0.1
    dev_images: int = 0        # per-epoch model selection on the first N dev images and their captions; 0 = all.
                               # BSSAN is selected through the product's protocol (engine.ranking: first-stage top
                               # dev_k re-ranked, fusion tuned), so the whole 1K dev split costs ~1-2 min, not 75
    dev_k: int = 20            # BSSAN: K of the dev protocol (the first stage's top K per query are re-scored)
    # --- negatives like those it will re-rank (BSSAN; needs first_stage) ---
    first_stage: str = ""      # a dual-encoder checkpoint directory: mining source, and the first stage of the dev protocol
    first_stage_store: str = ""  # the first stage's own feature store when it reads another extractor's features than
                                 # BSSAN (same images, captions and splits; e.g. BSSAN on a 14x14 grid, the dual
                                 # encoder on its 7x7 store); "" = the training store
    mined_fraction: float = 0.0  # share of the sampled negatives (captions, and images with negative_images) drawn
                                 # from the first stage's top mining_k of the anchor instead of uniformly
    mining_k: int = 30         # mined negatives come from the first stage's top mining_k (of other images)
    residual_weight: float = 0.0  # > 0 (needs first_stage): add a second hinge on Y + w * s_first (and Y' + w * s_first),
                                  # s_first the frozen first stage's cosine of the pair: BSSAN then also learns what
                                  # the first stage gets wrong (the product fuses the two); the plain hinge keeps BSSAN
                                  # a ranker on its own
    mining_guard: float = 0.9  # false-negative guard: drop a mined caption whose first-stage text vector has cosine
                               # > this with one of the anchor image's own captions (Flickr8K has near-duplicate
                               # captions), and a mined image whose image vector has cosine > this with the anchor's
    negatives_per_kind: int = 1  # image-grouped batches: negatives of each kind per positive (captions of other images;
                                 # with negative_images, other images of the batch); distinct within a positive's list
    loss: LossKind = LossKind.HINGE  # listwise: cross-entropy over the positive and its negatives_per_kind negatives
    list_temperature: float = 0.1  # listwise and grid: logits = score / this
    dev_exhaustive_images: int = 0  # > 0 (BSSAN with a first stage): each epoch also scores BSSAN alone on EVERY pair of
                                    # the first N dev images (N x 5N pairs; 200 -> ~20-30 s on 2 cores), the view the
                                    # K-shortlist protocol hides: a re-ranker can be good at K=20 and poor over all pairs
    init_from: str = ""        # a BSSAN checkpoint directory whose weights (and input scales) start the run
                               # (fine-tuning with another loss); its model config must equal this run's
    neighbour_share: float = 1.0  # loss=grid with mining: the share of an epoch's batch seeds followed by their first-stage
                                  # neighbours (groups of training.mining.NEIGHBOUR_GROUP); the other seeds come alone, so
                                  # lower shares put more random images (easy negatives, the bulk of an exhaustive
                                  # ranking) beside the near scenes. 1: every seed (the session-4 recipe)
    input_dropout: float = 0.0  # image-grouped BSSAN batches: dropout on the region, object and word features of each
                                # training step (a regulariser: W2R alone overfits, loss 8.4 -> 1.35 while dev peaks at
                                # epoch 4); off at evaluation and in every exported graph
    lstm_forget_bias: float = 0.0  # BSSAN: initial forget-gate bias of every LSTM (W2R's, O2W's Bi-LSTM both ways; nn.LSTM
                                   # initialises it like the other gates, ~U(-1/sqrt(H), 1/sqrt(H)) twice); 1 is the usual
                                   # remedy for early forgetting (Jozefowicz et al. 2015). Initialisation only
    state_dropout: float = 0.0  # BSSAN: dropout on each branch's matching state in training, where the inputs stay whole
                                # (W2R: the LSTM's last state h before its MLP; O2W: each attended v_j before the MLP on
                                # [o_j; v_j]); off at evaluation and in every exported graph

    def __post_init__(self) -> None:
        _coerce_enums(self)  # TrainConfig(loss="grid") means LossKind.GRID (code compares with `is`)
        if self.margin < 0 or self.lr <= 0 or not 0 <= self.momentum < 1 or self.grad_clip < 0:
            raise InputError(f"TrainConfig: expected margin >= 0, lr > 0, 0 <= momentum < 1, grad_clip >= 0; "
                             f"got {self.margin}, {self.lr}, {self.momentum}, {self.grad_clip}")
        if self.lr_decay_every < 0 or not 0 < self.lr_decay <= 1 or self.dev_images < 0:
            raise InputError(f"TrainConfig: expected lr_decay_every >= 0, 0 < lr_decay <= 1, dev_images >= 0; "
                             f"got {self.lr_decay_every}, {self.lr_decay}, {self.dev_images}")
        if self.batch_images < 0 or self.batch_images == 1:
            raise InputError(f"TrainConfig: expected batch_images 0 (pair batches) or >= 2, got {self.batch_images}")
        if self.batch_size < 2 or self.epochs < 1:
            raise InputError(f"TrainConfig: expected batch_size >= 2 and epochs >= 1, got {self.batch_size} and {self.epochs}")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or not 0 < self.min_lr_ratio <= 1 or self.hardest_from_epoch < 0:
            raise InputError(f"TrainConfig: expected weight_decay >= 0, warmup_epochs >= 0, 0 < min_lr_ratio <= 1, "
                             f"hardest_from_epoch >= 0; got {self.weight_decay}, {self.warmup_epochs}, "
                             f"{self.min_lr_ratio}, {self.hardest_from_epoch}")
        if not 0 <= self.mined_fraction <= 1 or self.mining_k < 1 or not -1 <= self.mining_guard <= 1 or self.dev_k < 1:
            raise InputError(f"TrainConfig: expected 0 <= mined_fraction <= 1, mining_k >= 1, -1 <= mining_guard <= 1, "
                             f"dev_k >= 1; got {self.mined_fraction}, {self.mining_k}, {self.mining_guard}, {self.dev_k}")
        if self.lr_decay_every and self.schedule is Schedule.COSINE:
            raise InputError(f"TrainConfig.lr_decay_every {self.lr_decay_every}: a step decay goes with schedule=step "
                             f"(or constant), got schedule=cosine")
        if self.residual_weight < 0 or (self.residual_weight > 0 and not self.first_stage):
            raise InputError(f"TrainConfig.residual_weight {self.residual_weight}: expected >= 0, and a first_stage when > 0")
        if self.negatives_per_kind < 1 or self.list_temperature <= 0:
            raise InputError(f"TrainConfig: expected negatives_per_kind >= 1 and list_temperature > 0, "
                             f"got {self.negatives_per_kind} and {self.list_temperature}")
        if self.dev_exhaustive_images < 0:
            raise InputError(f"TrainConfig.dev_exhaustive_images: expected >= 0, got {self.dev_exhaustive_images}")
        if not 0 <= self.neighbour_share <= 1:
            raise InputError(f"TrainConfig.neighbour_share: expected 0 <= share <= 1, got {self.neighbour_share}")
        if not 0 <= self.state_dropout < 1:
            raise InputError(f"TrainConfig.state_dropout: expected 0 <= p < 1; got {self.state_dropout}")
        if not 0 <= self.input_dropout < 1 or (self.input_dropout > 0 and self.batch_images == 0):
            raise InputError(f"TrainConfig.input_dropout: expected 0 <= p < 1, and image-grouped batches (batch_images "
                             f">= 2) when p > 0; got p={self.input_dropout}, batch_images={self.batch_images}")
        if self.loss is LossKind.GRID and (self.batch_images == 0 or self.hardest_negatives or self.negatives_per_kind > 1
                                           or self.residual_weight > 0):
            raise InputError(f"TrainConfig: loss=grid scores every pair of an image-grouped batch; expected batch_images >= 2, "
                             f"hardest_negatives false, negatives_per_kind 1 and residual_weight 0, got batch_images="
                             f"{self.batch_images}, hardest_negatives={self.hardest_negatives}, negatives_per_kind="
                             f"{self.negatives_per_kind}, residual_weight={self.residual_weight}")
        if (self.loss is LossKind.LISTWISE or self.negatives_per_kind > 1) and (self.batch_images == 0 or self.hardest_negatives):
            raise InputError(f"TrainConfig: loss={self.loss.value} with negatives_per_kind={self.negatives_per_kind} "
                             f"needs image-grouped batches of sampled negatives; expected batch_images >= 2 and hardest_negatives false, "
                             f"got batch_images={self.batch_images}, hardest_negatives={self.hardest_negatives}")
        if self.mined_fraction > 0 and not self.first_stage:
            raise InputError(f"TrainConfig.mined_fraction {self.mined_fraction}: mining needs first_stage "
                             f"(a dual-encoder checkpoint directory); got none")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


def paper_recipe() -> TrainConfig:
    """The paper's optimisation (SGD lr 0.01, momentum 0.9, eq. 7 summed over the batch, constant lr) with
    the old global clip of 2 (as VSE++). Kept reachable (--recipe paper) and measured against the default."""
    return TrainConfig(optimizer=Optimizer.SGD, lr=0.01, momentum=0.9, reduction=Reduction.SUM, grad_clip=2.0,
                       warmup_epochs=0.0, schedule=Schedule.CONSTANT)


RECIPES = {"default": TrainConfig, "paper": paper_recipe}


def recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise InputError(f"recipe {name!r}: expected one of {sorted(RECIPES)}")
    return RECIPES[name]()


# ---------------------------------------------------------------------------------------------
# Presets


def _paper() -> ModelConfig:
    return ModelConfig()  # the dataclass defaults ARE the paper's sizes


def _flickr8k() -> ModelConfig:
    return ModelConfig(
        **FLICKR8K_INPUTS,
        # Hidden sizes for 2-core CPU training on ~30,000 positive pairs per epoch. Measured (CPU, 1 thread,
        # machine loaded, image-grouped batches of 25 images, synthetic store of these shapes): W2R H=256 ->
        # 31 positive pairs/s, H=128 -> 64 (2.1x: the recurrence is 4*L*H^2 per pair and G = R W_ih_u^T is
        # D*M*4H per image); O2W H2=128 -> 60-67, H2=64 -> 108-118 (1.75x: its Bi-LSTM runs on every
        # caption, positives and negatives). 2 threads: 12 pairs/s (spin-waits on 2 shared cores). At the
        # chosen sizes an epoch is ~5-8 min instead of 16-19. The MLPs keep Table I's depth.
        w2r_hidden=128, w2r_mlp=(128, 64, 1),
        o2w_hidden=64, o2w_mlp=(64, 32, 1),
        # Issue 10's recipe: inputs on a common scale, attention that can focus, softmax attention for
        # negatives (the paper's uniform rule trains to chance here, results/flickr8k/README.md), and delta
        # rescaled for mean-reduced hinges: 0.01 over a sum of ~100 positives is ~1e-4 per mean.
        negative_attention=NegativeAttention.SOFTMAX, input_scaling=True, attention=AttentionForm.SCALED,
        reg_weight=1e-4,
    )


def _demo() -> ModelConfig:
    # Tiny, for tests and smoke runs; matches tests/conftest.py build_store's default sizes.
    return ModelConfig(**DEMO_INPUTS, w2r_hidden=8, w2r_mlp=(8, 1), o2w_hidden=6, o2w_mlp=(6, 1))


def _flickr8k_paper() -> ModelConfig:
    # The flickr8k sizes with the paper's model as written: tanh attention, raw inputs, uniform negative attention, delta 0.01.
    return ModelConfig(**FLICKR8K_INPUTS, w2r_hidden=128, w2r_mlp=(128, 64, 1), o2w_hidden=64, o2w_mlp=(64, 32, 1))


PRESETS = {"paper": _paper, "flickr8k": _flickr8k, "flickr8k-paper": _flickr8k_paper, "demo": _demo}


def preset(name: str) -> ModelConfig:
    """A fresh ModelConfig of a named preset: paper, flickr8k or demo."""
    if name not in PRESETS:
        raise InputError(f"model preset {name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


# ---------------------------------------------------------------------------------------------
# Strict overrides and JSON

C = TypeVar("C")
INPUT_SIZE_FIELDS = ("region_count", "region_dim", "object_count", "object_dim", "word_dim", "max_words")


def _coerce(cls: type, name: str, hint: Any, value: Any) -> Any:
    """Check one value against a field's type; accept the JSON forms (enum strings, lists for tuples)."""
    where = f"{cls.__name__}.{name}"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise InputError(f"{where}: expected one of {[m.value for m in hint]}, got {value!r}") from None
    if hint is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected a bool, got {type(value).__name__} {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: expected an int, got {type(value).__name__} {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: expected a float, got {type(value).__name__} {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise InputError(f"{where}: expected a str, got {type(value).__name__} {value!r}")
        return value
    if getattr(hint, "__origin__", None) is tuple:  # tuple[int, ...]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise InputError(f"{where}: expected a list of ints, got {value!r}")
        return tuple(value)
    raise AssertionError(f"{where}: unhandled field type {hint}")  # internal: a new field type needs a rule


def _coerce_enums(config: Any) -> None:
    """Turn enum fields given as their string values into the enum members (InputError naming the field)."""
    hints = get_type_hints(type(config))
    for f in dataclasses.fields(config):
        hint, value = hints[f.name], getattr(config, f.name)
        if isinstance(hint, type) and issubclass(hint, enum.Enum) and not isinstance(value, hint):
            setattr(config, f.name, _coerce(type(config), f.name, hint, value))


def _from_dict(cls: type[C], data: dict[str, Any]) -> C:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise InputError(f"{cls.__name__}: unknown key(s) {unknown}; expected some of {names}")
    return cls(**{k: _coerce(cls, k, hints[k], v) for k, v in data.items()})


def _to_dict(config: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = value.value if isinstance(value, enum.Enum) else list(value) if isinstance(value, tuple) else value
    return out


def replace_strict(config: C, **overrides: Any) -> C:
    """A copy of a ModelConfig/TrainConfig with `overrides` applied, type-checked like from_dict."""
    merged = _to_dict(config)
    merged.update(overrides)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(config)})
    if unknown:
        raise InputError(f"{type(config).__name__}: unknown key(s) {unknown}; expected some of {sorted(merged)}")
    return _from_dict(type(config), merged)


def input_sizes_of_split(split: Any, word_set: str) -> dict[str, int]:
    """Input sizes {region_count, region_dim, object_count, object_dim, word_dim, max_words} of a
    feature-store split (engine.store.SplitFeatures), read from array shapes (no data is read)."""
    regions, objects, words = split.regions.shape, split.objects.shape, split.words(word_set).shape
    return {"region_count": int(regions[1]), "region_dim": int(regions[2]),
            "object_count": int(objects[1]), "object_dim": int(objects[2]),
            "word_dim": int(words[2]), "max_words": int(words[1])}


def with_input_sizes(config: ModelConfig, sizes: dict[str, int], explicit: Iterable[str] = (),
                     source: str = "feature store") -> ModelConfig:
    """Take the input sizes from a feature store.

    `sizes` maps INPUT_SIZE_FIELDS to the store's values. A field the user set explicitly
    (named in `explicit`, e.g. the keys of their --set overrides) must agree with the store,
    else InputError; every other size is silently taken from the store, because a preset's
    sizes are only a default for the features it was designed for.
    """
    unknown = sorted(set(sizes) - set(INPUT_SIZE_FIELDS))
    if unknown:
        raise InputError(f"with_input_sizes: unknown size(s) {unknown}; expected some of {list(INPUT_SIZE_FIELDS)}")
    for name in sorted(set(explicit) & set(sizes)):
        if getattr(config, name) != sizes[name]:
            raise InputError(f"ModelConfig.{name}: set to {getattr(config, name)}, but the {source} has {sizes[name]}")
    return replace_strict(config, **sizes)
