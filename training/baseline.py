"""The dual-encoder baseline (VSE-style) on BSSAN's features, and the engine's shortlist stage.

    from training.baseline import DualEncoder, dual_encoder_preset
    model = DualEncoder(dual_encoder_preset("demo")).eval()
    images = model.encode_images(regions, objects)   # [B_img, K], unit vectors
    texts = model.encode_texts(words, lengths)       # [B_txt, K], unit vectors
    scores = images @ texts.T                        # cosine similarities
    python -m training.train --store STORE --out RUN --model-kind dual_encoder --preset flickr8k

Image (image_pool=mean): mean of the R regions and mean of the P objects, concatenated, one Linear
to K, L2-normalised. Caption (text_pool=last): a GRU over the fixed word vectors read at each
caption's true length (bidirectional: the two final states concatenated), one Linear to K,
L2-normalised.
Max pooling (image_pool=max, text_pool=max, word_residual; VSE-infinity's finding, the flickr8k
preset's choice since 2026-11-30): every region and object is embedded on its own (Linear + a
2-layer MLP residual) and the image vector is the per-dimension max over them; every word's
[forward; backward] GRU state is projected (plus its own word vector, linearly projected) and the
caption vector is the max over its real words. Measured on Flickr8K dev (6 epochs, same recipe):
see results/flickr8k/README.md.
The score of a pair is the dot product of its two unit vectors, so a gallery is encoded once
and ranking is one matrix product: the shortlist stage before BSSAN re-ranks the top-k.

Export-ready: encode_images / encode_texts have no Python-side branching on data. The GRU runs
over the padded words (nn.GRU exports to one ONNX GRU node) and each direction's state is read
at the last real word with a gather: the backward direction runs a second forward GRU over the
words reversed within each caption's length, which equals a packed sequence exactly (causal
recurrence: padding after the last real word never reaches it). Export with the legacy
exporter (dynamo=False), see ../shared/docs/ARCHITECTURE.md.

Loss (VSE / VSE++): hinge on the in-batch grid of dot products, summed over every negative
(hardest_negatives=False) or on the hardest negative only (True); caption negatives per image,
plus image negatives per caption when negative_images=True (VSE's symmetric loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import InputError
from training.config import DEMO_INPUTS, FLICKR8K_INPUTS, InputSizes, Reduction, _from_dict, _to_dict


@dataclass
class DualEncoderConfig(InputSizes):  # region_count ... max_words: training.config.InputSizes
    # --- encoders ---
    embed_dim: int = 1024      # K: VSE++'s joint space size
    text_hidden: int = 1024    # GRU hidden per direction (VSE++)
    bidirectional: bool = True  # captions read both ways; the two final states concatenated
    use_objects: bool = True   # also pool the P object features into the image vector
    # --- pooling (beyond VSE++; VSE-infinity's finding that a per-feature embedding + max pooling beats a mean) ---
    image_pool: str = "mean"   # mean: mean of regions (and objects), one Linear | max: every region and object
    #                            embedded (Linear + a 2-layer MLP residual), the max over them per dimension
    text_pool: str = "last"    # last: the GRU states at the last real word | max: every word's [forward; backward]
    #                            state projected, the max over the caption's real words
    word_residual: bool = False  # text_pool=max: each word's own vector, linearly projected, added before the max

    def __post_init__(self) -> None:
        for name in ("region_count", "region_dim", "object_count", "object_dim", "word_dim", "max_words",
                     "embed_dim", "text_hidden"):
            if getattr(self, name) < 1:
                raise InputError(f"DualEncoderConfig.{name}: expected a positive integer, got {getattr(self, name)}")
        for name, allowed in (("image_pool", ("mean", "max")), ("text_pool", ("last", "max"))):
            if getattr(self, name) not in allowed:
                raise InputError(f"DualEncoderConfig.{name}: expected one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.word_residual and self.text_pool != "max":
            raise InputError("DualEncoderConfig.word_residual: needs text_pool='max', got text_pool="
                             f"{self.text_pool!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DualEncoderConfig":
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


def _flickr8k() -> DualEncoderConfig:
    # Input sizes of the offline features (EfficientNet-Lite0 7x7x1280, 10 objects x 1280, GloVe 50).
    # K = 512 and GRU 512: an epoch of ~30,000 captions costs ~3 x 30k x 2 x 3L(E+H)H ~ 2 TFLOP,
    # seconds on 2 cores, and 1.6 M GRU weights per direction is as many as BSSAN's LSTM at H=256.
    # Max pooling on both sides: Flickr8K dev 287.0 vs 282.9 for the means / last states (6 epochs, same recipe),
    # and with the hubness correction (training.hubness) test 297.3 vs 280.4.
    return DualEncoderConfig(**FLICKR8K_INPUTS, embed_dim=512, text_hidden=512,
                             image_pool="max", text_pool="max", word_residual=True)


def _demo() -> DualEncoderConfig:
    # Tiny, for tests; matches tests/conftest.py build_store's default sizes.
    return DualEncoderConfig(**DEMO_INPUTS, embed_dim=8, text_hidden=8)


DUAL_ENCODER_PRESETS = {"paper": DualEncoderConfig, "flickr8k": _flickr8k, "demo": _demo}


def dual_encoder_preset(name: str) -> DualEncoderConfig:
    """A fresh DualEncoderConfig of a named preset: paper (VSE++ sizes on the paper's inputs), flickr8k or demo."""
    if name not in DUAL_ENCODER_PRESETS:
        raise InputError(f"dual-encoder preset {name!r}: expected one of {sorted(DUAL_ENCODER_PRESETS)}")
    return DUAL_ENCODER_PRESETS[name]()


def last_real_step(outputs: Tensor, lengths: Tensor) -> Tensor:
    """outputs [B, L, H], lengths [B] -> the output at each sequence's last real step [B, H]."""
    index = (lengths - 1).clamp(min=0)[:, None, None].expand(-1, 1, outputs.shape[2])  # [B, 1, H]
    return outputs.gather(1, index)[:, 0]  # [:, 0] not squeeze: squeeze on a dynamic dim exports as an If


def reverse_within_length(words: Tensor, lengths: Tensor) -> Tensor:
    """words [B, L, E] with each caption's first `length` rows reversed; padding rows stay in place."""
    steps = torch.arange(words.shape[1], device=words.device)[None, :]  # [1, L]
    last = (lengths - 1)[:, None]  # [B, 1]
    index = torch.where(steps <= last, last - steps, steps)  # [B, L]
    return words.gather(1, index[:, :, None].expand(-1, -1, words.shape[2]))  # [B, L, E]


def masked_max(features: Tensor, lengths: Tensor) -> Tensor:
    """features [B, L, K], lengths [B] (>= 1) -> the max over each sequence's first `length` rows [B, K]."""
    real = torch.arange(features.shape[1], device=features.device)[None, :] < lengths[:, None]  # [B, L]
    return features.masked_fill(~real[:, :, None], float("-inf")).max(dim=1).values


class FeatureEmbedding(nn.Module):
    """One feature vector [.., D] -> [.., K]: a Linear plus a 2-layer MLP (hidden K/2) residual (VSE-infinity)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, max(out_dim // 2, 1)), nn.ReLU(), nn.Linear(max(out_dim // 2, 1), out_dim))

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features) + self.mlp(features)


class DualEncoder(nn.Module):
    """Image and caption encoders into one K-dim unit sphere; score = dot product."""

    def __init__(self, config: DualEncoderConfig):
        super().__init__()
        self.config = config
        if config.image_pool == "mean":
            image_dim = config.region_dim + (config.object_dim if config.use_objects else 0)
            self.image_proj = nn.Linear(image_dim, config.embed_dim)
        else:
            self.region_embed = FeatureEmbedding(config.region_dim, config.embed_dim)
            self.object_embed = FeatureEmbedding(config.object_dim, config.embed_dim) if config.use_objects else None
        self.word_proj = nn.Linear(config.word_dim, config.embed_dim) if config.word_residual else None
        self.forward_gru = nn.GRU(config.word_dim, config.text_hidden, batch_first=True)
        self.backward_gru = nn.GRU(config.word_dim, config.text_hidden, batch_first=True) if config.bidirectional else None
        directions = 2 if config.bidirectional else 1
        self.text_proj = nn.Linear(directions * config.text_hidden, config.embed_dim)
        self.hubness = None  # training.hubness.HubnessCorrection (attach_hubness): not a submodule, not in weights.pt

    def attach_hubness(self, correction) -> None:
        """Apply a first-stage hubness correction (training.hubness) in score_matrix and the shortlist vectors;
        kept out of the state dict (it lives in CHECKPOINT/hubness.npz beside weights.pt). None removes it."""
        object.__setattr__(self, "hubness", correction)

    def shortlist_images(self, regions: Tensor, objects: Tensor) -> Tensor:
        """The first stage's image vectors: unit vectors [B, K], or [B, K + 2] with a hubness correction."""
        vectors = self.encode_images(regions, objects)
        return vectors if self.hubness is None else self.hubness.images(vectors)

    def shortlist_texts(self, words: Tensor, lengths: Tensor) -> Tensor:
        """The first stage's caption vectors: unit vectors [B, K], or [B, K + 2] with a hubness correction."""
        vectors = self.encode_texts(words, lengths)
        return vectors if self.hubness is None else self.hubness.texts(vectors)

    # -- the two export graphs (shortlist_image / shortlist_text): tensors in, tensors out
    def encode_images(self, regions: Tensor, objects: Tensor) -> Tensor:
        """regions [B_img, R, M], objects [B_img, P, Q] -> unit vectors [B_img, K]."""
        if self.config.image_pool == "max":
            pooled = self.region_embed(regions).amax(dim=1)  # [B_img, K]
            if self.object_embed is not None:
                pooled = torch.maximum(pooled, self.object_embed(objects).amax(dim=1))  # max over the R + P features
            return F.normalize(pooled, dim=1)
        pooled = regions.mean(dim=1)  # [B_img, M]
        if self.config.use_objects:
            pooled = torch.cat([pooled, objects.mean(dim=1)], dim=1)  # [B_img, M + Q]
        return F.normalize(self.image_proj(pooled), dim=1)

    def encode_texts(self, words: Tensor, lengths: Tensor) -> Tensor:
        """words [B_txt, L, E], lengths [B_txt] (>= 1) -> unit vectors [B_txt, K]."""
        lengths = lengths.long()
        if self.config.text_pool == "max":
            states = self.forward_gru(words)[0]  # [B_txt, L, H]
            if self.backward_gru is not None:  # back in word order (reverse_within_length is its own inverse)
                backward = reverse_within_length(self.backward_gru(reverse_within_length(words, lengths))[0], lengths)
                states = torch.cat([states, backward], dim=2)  # [B_txt, L, 2H]
            per_word = self.text_proj(states)  # [B_txt, L, K]
            if self.word_proj is not None:
                per_word = per_word + self.word_proj(words)
            return F.normalize(masked_max(per_word, lengths), dim=1)
        state = last_real_step(self.forward_gru(words)[0], lengths)  # [B_txt, H]
        if self.backward_gru is not None:
            backward = last_real_step(self.backward_gru(reverse_within_length(words, lengths))[0], lengths)  # [B_txt, H]
            state = torch.cat([state, backward], dim=1)  # [B_txt, 2H]
        return F.normalize(self.text_proj(state), dim=1)

    # -- checked entry points (numpy or torch in; the model's dtype and device)
    def _tensor(self, array, dtype: torch.dtype | None = None) -> Tensor:
        param = next(self.parameters())
        return torch.as_tensor(np.asarray(array) if not isinstance(array, Tensor) else array,
                               dtype=dtype or param.dtype, device=param.device)

    def embed_images(self, regions, objects) -> Tensor:
        c = self.config
        regions, objects = self._tensor(regions), self._tensor(objects)
        for name, tensor, tail in (("regions", regions, (c.region_count, c.region_dim)),
                                   ("objects", objects, (c.object_count, c.object_dim))):
            if tensor.dim() != 3 or tuple(tensor.shape[1:]) != tail:
                raise InputError(f"{name}: expected shape [N, {tail[0]}, {tail[1]}], got {list(tensor.shape)}")
        return self.encode_images(regions, objects)

    def embed_texts(self, words, lengths) -> Tensor:
        words, lengths = self._tensor(words), self._tensor(lengths, torch.long)
        if words.dim() != 3 or words.shape[2] != self.config.word_dim or words.shape[1] > self.config.max_words:
            raise InputError(f"words: expected shape [N, L <= {self.config.max_words}, {self.config.word_dim}], got {list(words.shape)}")
        if lengths.shape != words.shape[:1]:
            raise InputError(f"lengths: expected shape [{words.shape[0]}] (one per caption), got {list(lengths.shape)}")
        if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > words.shape[1]):
            raise InputError(f"lengths: expected caption lengths in [1, {words.shape[1]}], got [{int(lengths.min())}, {int(lengths.max())}]")
        return self.encode_texts(words, lengths)

    def forward(self, regions, objects, words, lengths) -> Tensor:
        """The in-batch grid of dot products [B_img, B_txt] (row i image i, column j caption j)."""
        return self.embed_images(regions, objects) @ self.embed_texts(words, lengths).t()

    @torch.no_grad()
    def score_matrix(self, regions, objects, words, lengths, image_block: int = 256, caption_block: int = 1024,
                     progress: bool = False) -> Tensor:
        """Scores [N_img, N_cap] of every image x caption: both sides encoded once, in blocks, then one product
        (the first stage's score: hubness-corrected when a correction is attached)."""
        lengths_np = np.asarray(lengths.cpu() if isinstance(lengths, Tensor) else lengths)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(regions) + len(lengths_np), unit="item", desc="encoding")
        images, texts = [], []
        for i in range(0, len(regions), image_block):
            images.append(self.embed_images(np.asarray(regions[i:i + image_block]), np.asarray(objects[i:i + image_block])))
            bar is not None and bar.update(len(images[-1]))
        for j in range(0, len(lengths_np), caption_block):
            block = lengths_np[j:j + caption_block]
            texts.append(self.embed_texts(np.asarray(words[j:j + caption_block])[:, : int(block.max())], block))
            bar is not None and bar.update(len(block))
        if bar is not None:
            bar.close()
        images, texts = torch.cat(images), torch.cat(texts)
        if self.hubness is not None:
            images, texts = self.hubness.images(images), self.hubness.texts(texts)
        return (images @ texts.t()).cpu()  # [N_img, N_cap]


def dual_encoder_loss(grid: Tensor, same_image: Tensor, margin: float, hardest: bool = False,
                      negative_images: bool = False, reduction: Reduction = Reduction.SUM) -> Tensor:
    """VSE hinge loss on a batch grid [B, B] (diagonal = positives; same_image [B, B] marks pairs
    that are never negatives). Caption negatives per image (rows); image negatives per caption
    (columns) if negative_images. hardest: VSE++'s max-violation instead of the sum."""
    positive = grid.diagonal()  # [B]
    directions = [(positive[:, None] - grid, 1)]  # caption negatives of each image, reduced along the row
    if negative_images:
        directions.append((positive[None, :] - grid, 0))  # image negatives of each caption, along the column
    total = grid.new_zeros(())
    negatives = (~same_image).sum().clamp_min(1)
    for gap, dim in directions:
        terms = torch.relu(margin - gap).masked_fill(same_image, 0.0)  # [B, B]
        if hardest:
            per_anchor = terms.max(dim=dim).values  # [B]
            total = total + (per_anchor.sum() if reduction is Reduction.SUM else per_anchor.mean())
        else:  # SUM: VSE's sum over negatives and anchors; MEAN: the mean hinge over every (anchor, negative) pair
            total = total + (terms.sum() if reduction is Reduction.SUM else terms.sum() / negatives)
    return total
