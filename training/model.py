"""The BSSAN model (W2R spatial + O2W semantic attention), factored into per-image, per-caption
and per-pair parts so that a gallery is encoded once and only the pair step runs per pair.

    from training.config import preset
    from training.model import BSSAN
    model = BSSAN(preset("demo")).eval()
    y, y_prime = model(regions, objects, words, lengths)        # aligned pairs, [N] each
    scores = model.score_matrix(regions, objects, words, lengths)  # [N_img, N_cap], MS = Y + lambda Y'

Layout: helpers, then MLP, W2R, O2W, then BSSAN, then `reference_scores` (the paper as written,
un-factored; the ground truth of the tests and the baseline of the benchmarks).

Factoring (see ../shared/docs/ARCHITECTURE.md, "The graphs"):
- W2R: t_k^T W r_j is computed as t_k . (R W^T)_j: the image side caches K = R W^T [D, E]
  (E < M in every preset, so this is cheaper per pair than caching T W [L, M] per caption).
  The LSTM's input projection W_ih [4H, M+E] is split into W_ih_u (acts on u_k) and W_ih_t
  (acts on t_k): the caption side caches X_t = T W_ih_t^T + b_ih + b_hh [L, 4H]; the image side
  caches G = R W_ih_u^T [D, 4H], so the pair gate input is a.G + X_t. The recurrence
  h W_hh^T is then run explicitly with nn.LSTM's own weights (gate order i, f, g, o), for
  max(lengths) steps, and h is read at each caption's last real word.
- O2W: the caption side caches S = BiLSTM(T) (directions averaged, packed by length); the image
  side caches O W' [P, H2] and the object part of the MLP's first Linear, O W1_o^T + b1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import InputError
from engine.hub import HubBank
from training.baseline import reverse_within_length
from training.config import AttentionForm, ModelConfig, NegativeAttention

Cache = dict[str, Tensor]
Negative = "bool | Tensor"  # True/False for every pair, or a bool tensor shaped like the pairs ([N] or [B_img, B_txt])

# ---------------------------------------------------------------------------------------------
# Helpers


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """[B, L] bool, True at real words."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]  # [B, L]


def check_lengths(lengths: Tensor, max_len: int) -> None:
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > max_len):
        raise InputError(f"lengths: expected caption lengths in [1, {max_len}], got [{int(lengths.min())}, {int(lengths.max())}]")


def attend(logits: Tensor, negative: Negative, uniform_negatives: bool, mask: Tensor | None = None) -> Tensor:
    """Softmax over the last axis (masked: real positions only); where `negative` holds and the
    uniform rule is on, the uniform distribution over the (real) positions instead (eq. 8).
    `negative` is a bool or a bool tensor of logits.shape[:-2]."""
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    if not uniform_negatives or negative is False:
        return weights
    if mask is None:
        uniform = torch.full_like(weights, 1.0 / logits.shape[-1])
    else:
        uniform = (mask / mask.sum(dim=-1, keepdim=True)).to(weights.dtype).expand_as(weights)
    if negative is True:
        return uniform
    return torch.where(negative[..., None, None], uniform, weights)


def lstm_recurrence(gate_inputs: Tensor, lengths: Tensor, weight_hh: Tensor, mean: bool = False,
                    every_step: bool = False) -> Tensor:
    """nn.LSTM's recurrence on precomputed gate inputs x_t W_ih^T + b_ih + b_hh.

    gate_inputs [N, L, 4H], lengths [N] -> hidden state at each sequence's last real step [N, H] (`mean`: the mean
    of its states over the real steps; `every_step`: every state [N, L, H], zeros after a sequence's last real step).
    Like a packed sequence, step t runs only on the sequences still going: rows are sorted by
    length (longest first), so step t works on the first n_t rows and a row's output is taken
    at its last real step; padding never costs a step.
    """
    n, _, four_h = gate_inputs.shape
    order = torch.argsort(lengths, descending=True, stable=True)  # [N]
    sorted_lengths = lengths[order]
    steps = int(sorted_lengths[0]) if n else 0
    active = (sorted_lengths[None, :] > torch.arange(steps + 1, device=lengths.device)[:, None]).sum(1).tolist()  # n_t
    inputs = gate_inputs[order, :steps].unbind(1)  # unbind, not [:, t]: its backward is one stack
    h = gate_inputs.new_zeros(n, four_h // 4)
    c = gate_inputs.new_zeros(n, four_h // 4)
    total = gate_inputs.new_zeros(n, four_h // 4) if mean else None  # running sum of each row's states
    finished = []  # hidden states (or their sums) of the rows whose last step is t, for t = 0, 1, ...
    states = []  # every_step: the states of step t, zero-padded to [N, H] (rows longest first)
    for t in range(steps):
        rows = active[t]
        gates = inputs[t][:rows] + h[:rows] @ weight_hh.t()  # [n_t, 4H]
        i, f, g, o = gates.chunk(4, dim=1)  # nn.LSTM's gate order
        c = torch.sigmoid(f) * c[:rows] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if every_step:
            states.append(nn.functional.pad(h, (0, 0, 0, n - rows)))
        if mean:
            total = total[:rows] + h
        finished.append((total if mean else h)[active[t + 1]:rows])
    if every_step:
        out = torch.stack(states, 1) if states else gate_inputs.new_zeros(n, 0, four_h // 4)  # [N, steps, H]
        out = nn.functional.pad(out, (0, 0, 0, gate_inputs.shape[1] - steps))  # [N, L, H]
        return out[torch.argsort(order)]
    out_sorted = torch.cat(finished[::-1]) if finished else gate_inputs.new_zeros(0, four_h // 4)  # longest first
    if mean:
        out_sorted = out_sorted / sorted_lengths[:, None].to(out_sorted.dtype)
    return out_sorted[torch.argsort(order)]


def add_attention_parameters(module: nn.Module, form: AttentionForm) -> None:
    """The scalar of an attention's logits: `attn_bias` b (the paper's tanh form, eq. 2 / 10) or
    `attn_log_temperature` (AttentionForm.SCALED: tau = exp(.) multiplies the raw scores; b would cancel)."""
    module.attention_form = form
    if form is AttentionForm.TANH:
        module.attn_bias = nn.Parameter(torch.zeros(()))
    else:
        module.attn_log_temperature = nn.Parameter(torch.zeros(()))


def attention_logits(module: nn.Module, scores: Tensor) -> Tensor:
    """tanh(scores + b), or tau * scores."""
    if module.attention_form is AttentionForm.TANH:
        return torch.tanh(scores + module.attn_bias)
    return scores * module.attn_log_temperature.exp()


class MLP(nn.Module):
    """Linear -> (BatchNorm1d -> tanh -> Linear)*: hidden layers Linear-BN-tanh, the last Linear
    gives the score. `first` is exposed so its input can be split between image and caption parts."""

    def __init__(self, in_dim: int, widths: tuple[int, ...]):
        super().__init__()
        self.first = nn.Linear(in_dim, widths[0])
        layers: list[nn.Module] = []
        for prev, width in zip(widths[:-1], widths[1:]):
            layers += [nn.BatchNorm1d(prev), nn.Tanh(), nn.Linear(prev, width)]
        self.rest = nn.Sequential(*layers)

    def continue_from_first(self, z: Tensor) -> Tensor:
        """Given the first Linear's output [..., widths[0]], the score [...]."""
        lead = z.shape[:-1]
        return self.rest(z.reshape(-1, z.shape[-1]))[:, 0].reshape(lead)  # BN sees every leading row

    def forward(self, x: Tensor) -> Tensor:
        return self.continue_from_first(self.first(x))


def _bilinear(rows: int, cols: int) -> nn.Parameter:
    # std 1/sqrt(rows*cols): x^T W y has unit variance for unit-variance x and y
    return nn.Parameter(torch.randn(rows, cols) / math.sqrt(rows * cols))


# ---------------------------------------------------------------------------------------------
# W2R: word-to-regions attention (spatial)


class W2R(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.region_dim = config.region_dim
        self.uniform_negatives = config.negative_attention is NegativeAttention.UNIFORM
        self.attn_weight = _bilinear(config.word_dim, config.region_dim)  # W: E x M
        add_attention_parameters(self, config.attention)                 # b: scalar (paper), or a temperature
        self.lstm = nn.LSTM(config.region_dim + config.word_dim, config.w2r_hidden, batch_first=True)  # input [u; t]
        self.mlp = MLP(config.w2r_hidden, config.w2r_mlp)
        self.state_dropout = 0.0  # training only (TrainConfig.state_dropout): dropout on h before the MLP
        self.readout = config.w2r_readout  # the MLP reads the last state (paper), the mean state, or every state (per_word)

    @property
    def pair_gathers_gates(self) -> bool:
        """score_pairs gathers G [D, 4H] per pair when that is no bigger than R [D, M]; else it
        gathers R and projects u with W_ih_u after the attention (ARCHITECTURE: memory of gathers)."""
        return 4 * self.lstm.hidden_size <= self.region_dim

    def _split_input_weight(self) -> tuple[Tensor, Tensor]:
        weight = self.lstm.weight_ih_l0  # [4H, M + E]
        return weight[:, : self.region_dim], weight[:, self.region_dim:]

    def encode_image(self, regions: Tensor, gates: bool = True) -> Cache:
        """regions [B_img, D, M] -> regions, regions_attn = R W^T [B_img, D, E],
        and (if gates) gates_regions = R W_ih_u^T [B_img, D, 4H]."""
        cache = {"regions": regions, "regions_attn": regions @ self.attn_weight.t()}
        if gates:
            cache["gates_regions"] = regions @ self._split_input_weight()[0].t()
        return cache

    def encode_text(self, words: Tensor, lengths: Tensor) -> Cache:
        """words [B_txt, L, E], lengths [B_txt] -> words, gates_words = T W_ih_t^T + b [B_txt, L, 4H], lengths."""
        bias = self.lstm.bias_ih_l0 + self.lstm.bias_hh_l0
        return {"words": words, "gates_words": words @ self._split_input_weight()[1].t() + bias, "lengths": lengths}

    def _finish(self, gates: Tensor, lengths: Tensor) -> Tensor:
        if self.readout == "per_word":  # the MLP scores each real word's state; Y is their mean (like O2W's eq. 14)
            states = lstm_recurrence(gates, lengths, self.lstm.weight_hh_l0, every_step=True)  # [N, L, H]
            real = torch.arange(states.shape[1], device=lengths.device)[None, :] < lengths[:, None]  # [N, L]
            per_word = states.new_zeros(real.shape)
            per_word[real] = self.mlp(nn.functional.dropout(states[real], self.state_dropout, self.training))
            return per_word.sum(1) / lengths.to(per_word.dtype)
        h = lstm_recurrence(gates, lengths, self.lstm.weight_hh_l0, mean=self.readout == "mean")  # [N, H]
        return self.mlp(nn.functional.dropout(h, self.state_dropout, self.training))

    def attention(self, image_cache: Cache, text_cache: Cache, image_index: Tensor, text_index: Tensor,
                  negative: Negative = False) -> Tensor:
        """Word-to-region weights a [N, L, D] of the listed pairs (eq. 1-2)."""
        keys = image_cache["regions_attn"][image_index]  # [N, D, E]
        words = text_cache["words"][text_index]  # [N, L, E]
        logits = attention_logits(self, words @ keys.transpose(1, 2))  # [N, L, D]
        return attend(logits, negative, self.uniform_negatives)

    def score_pairs(self, image_cache: Cache, text_cache: Cache, image_index: Tensor, text_index: Tensor,
                    negative: Negative = False) -> Tensor:
        """Y [N] of the pairs (image_index[n], text_index[n]). With G cached, pairs are taken image
        by image, so each image's pairs share one [k*L, D] x [D, 4H] product and G is never gathered."""
        if self.pair_gathers_gates and "gates_regions" in image_cache:
            order = torch.argsort(image_index, stable=True)  # [N] pairs grouped by image
            negative = negative[order] if isinstance(negative, Tensor) else negative
            image_index, text_index = image_index[order], text_index[order]
            attn = self.attention(image_cache, text_cache, image_index, text_index, negative)  # [N, L, D]
            gates_regions = image_cache["gates_regions"]  # [B_img, D, 4H]
            counts = torch.bincount(image_index, minlength=gates_regions.shape[0]).tolist()
            pieces = [a.reshape(-1, a.shape[-1]) @ g for a, g in zip(attn.split(counts), gates_regions) if a.shape[0]]
            n, max_len = attn.shape[:2]
            gate_u = torch.cat(pieces).reshape(n, max_len, -1) if pieces else attn.new_zeros(0, max_len, gates_regions.shape[2])  # [N, L, 4H]
            gates = gate_u + text_cache["gates_words"][text_index]  # [N, L, 4H]
            return self._finish(gates, text_cache["lengths"][text_index])[torch.argsort(order)]
        attn = self.attention(image_cache, text_cache, image_index, text_index, negative)  # [N, L, D]
        attended = attn @ image_cache["regions"][image_index]  # u_k: [N, L, M]
        gate_u = attended @ self._split_input_weight()[0].t()  # [N, L, 4H]
        gates = gate_u + text_cache["gates_words"][text_index]  # [N, L, 4H]
        return self._finish(gates, text_cache["lengths"][text_index])

    def score_grid(self, image_cache: Cache, text_cache: Cache, negative: Negative = False) -> Tensor:
        """Y [B_img, B_txt] of every image x caption of the caches; G is shared per image (no gather)."""
        words, lengths = text_cache["words"], text_cache["lengths"]
        logits = attention_logits(self, torch.einsum("ide,tle->itld", image_cache["regions_attn"], words))
        attn = attend(logits, negative, self.uniform_negatives)  # [B_img, B_txt, L, D]
        b_img, b_txt, max_len, regions = attn.shape
        flat = attn.reshape(b_img, b_txt * max_len, regions)  # [B_img, B_txt*L, D]
        if "gates_regions" in image_cache:
            gate_u = torch.bmm(flat, image_cache["gates_regions"])  # [B_img, B_txt*L, 4H]
        else:
            gate_u = torch.bmm(flat, image_cache["regions"]) @ self._split_input_weight()[0].t()
        gates = gate_u.reshape(b_img, b_txt, max_len, -1) + text_cache["gates_words"][None]  # [B_img, B_txt, L, 4H]
        y = self._finish(gates.reshape(b_img * b_txt, max_len, -1), lengths.repeat(b_img))  # [B_img*B_txt]
        return y.reshape(b_img, b_txt)


# ---------------------------------------------------------------------------------------------
# O2W: object-to-words attention (semantic)


class O2W(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.object_dim = config.object_dim
        self.uniform_negatives = config.negative_attention is NegativeAttention.UNIFORM
        self.bilstm = nn.LSTM(config.word_dim, config.o2w_hidden, batch_first=True, bidirectional=True)
        self.attn_weight = _bilinear(config.object_dim, config.o2w_hidden)  # W': Q x H2
        add_attention_parameters(self, config.attention)                    # b': scalar (paper), or a temperature
        self.mlp = MLP(config.object_dim + config.o2w_hidden, config.o2w_mlp)  # on [o_j; v_j]
        self.state_dropout = 0.0  # training only (TrainConfig.state_dropout): dropout on v_j before the MLP

    def encode_image(self, objects: Tensor) -> Cache:
        """objects [B_img, P, Q] -> objects_attn = O W' [B_img, P, H2], objects_mlp = O W1_o^T + b1 [B_img, P, h1]."""
        first = self.mlp.first
        return {"objects_attn": objects @ self.attn_weight,
                "objects_mlp": objects @ first.weight[:, : self.object_dim].t() + first.bias}

    def encode_text(self, words: Tensor, lengths: Tensor) -> Cache:
        """words [B_txt, L, E], lengths [B_txt] -> states S [B_txt, L, H2] (zero past the length), lengths.

        Equal to the Bi-LSTM on a packed sequence, without packing (whose CPU backward fills a zero
        gradient per step): the forward direction runs on the padded words (causal: padding after a
        caption's end never reaches its real steps); the backward direction runs forward over the
        words reversed within each caption's length and its outputs are reversed back."""
        lstm, hidden = self.bilstm, self.bilstm.hidden_size
        zeros = words.new_zeros(1, words.shape[0], hidden)

        def run(x: Tensor, suffix: str) -> Tensor:
            params = [getattr(lstm, f"{name}_l0{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            return torch.lstm(x, (zeros, zeros), params, True, 1, 0.0, self.training, False, True)[0]  # [B_txt, L, H2]

        forward = run(words, "")
        backward = reverse_within_length(run(reverse_within_length(words, lengths), "_reverse"), lengths)
        mask = length_mask(lengths, words.shape[1])[..., None]  # [B_txt, L, 1]
        return {"states": ((forward + backward) / 2) * mask, "lengths": lengths}  # [B_txt, L, H2]

    def attention(self, image_cache: Cache, text_cache: Cache, image_index: Tensor, text_index: Tensor,
                  negative: Negative = False) -> Tensor:
        """Object-to-word weights b [N, P, L] of the listed pairs (eq. 9), zero at padding."""
        keys = image_cache["objects_attn"][image_index]  # [N, P, H2]
        states = text_cache["states"][text_index]  # [N, L, H2]
        mask = length_mask(text_cache["lengths"][text_index], states.shape[1])[:, None, :]  # [N, 1, L]
        logits = attention_logits(self, keys @ states.transpose(1, 2))  # [N, P, L]
        return attend(logits, negative, self.uniform_negatives, mask)

    def score_pairs(self, image_cache: Cache, text_cache: Cache, image_index: Tensor, text_index: Tensor,
                    negative: Negative = False) -> Tensor:
        """Y' [N] of the pairs (image_index[n], text_index[n])."""
        attn = self.attention(image_cache, text_cache, image_index, text_index, negative)  # [N, P, L]
        attended = attn @ text_cache["states"][text_index]  # v_j: [N, P, H2]
        attended = nn.functional.dropout(attended, self.state_dropout, self.training)
        first = self.mlp.first
        z = image_cache["objects_mlp"][image_index] + attended @ first.weight[:, self.object_dim:].t()  # [N, P, h1]
        return self.mlp.continue_from_first(z).mean(dim=1)  # mean over objects (eq. 14)

    def score_grid(self, image_cache: Cache, text_cache: Cache, negative: Negative = False) -> Tensor:
        """Y' [B_img, B_txt]. O2W is ~1% of the work, so the grid simply lists every pair."""
        b_img, b_txt = image_cache["objects_attn"].shape[0], text_cache["states"].shape[0]
        device = text_cache["states"].device
        image_index = torch.arange(b_img, device=device).repeat_interleave(b_txt)  # [B_img*B_txt]
        text_index = torch.arange(b_txt, device=device).repeat(b_img)
        if isinstance(negative, Tensor):
            negative = negative.reshape(-1)
        return self.score_pairs(image_cache, text_cache, image_index, text_index, negative).reshape(b_img, b_txt)


# ---------------------------------------------------------------------------------------------
# BSSAN: both branches, MS = Y + lambda Y'


class BSSAN(nn.Module):
    """The two branches of the config's variant (an unused branch is not built: None) and the
    combined score. Branches are injectable (`w2r=`, `o2w=`) with the config's as default.

    Caches are dicts {"w2r": W2R cache, "o2w": O2W cache} holding only the built branches.
    Scoring helpers accept torch tensors or numpy arrays (memory maps: only blocks are read) and
    follow the model's dtype and device. They do not switch train/eval mode: call .eval() first.
    """

    def __init__(self, config: ModelConfig, w2r: W2R | None = None, o2w: O2W | None = None):
        super().__init__()
        self.config = config
        self.score_weights: tuple[float, float] | None = None  # (w_Y, w_Y') of eq. 19 chosen on dev after training
                                                               # (training.checkpoint SCORE_WEIGHTS); None: the config's
        self.hub: HubBank | None = None  # the image hub correction chosen on dev (engine/hub.py; training.checkpoint
                                         # HUB_BANK): MS' = MS - beta r(i) in score_matrix / score_pairs; None: none
        self.w2r = (w2r or W2R(config)) if config.uses_w2r else None
        self.o2w = (o2w or O2W(config)) if config.uses_o2w else None
        if config.input_scaling:  # per-channel 1/RMS of the train split (set_input_scales); ones until set
            self.register_buffer("region_scale", torch.ones(config.region_dim))
            self.register_buffer("object_scale", torch.ones(config.object_dim))
            self.register_buffer("word_scale", torch.ones(config.word_dim))

    # -- input scales (ModelConfig.input_scaling)
    def set_input_scales(self, scales: dict) -> None:
        """Take {"regions": [M], "objects": [Q], "words": [E]} (training.data.input_scales)."""
        if not self.config.input_scaling:
            return
        for key, buffer in (("regions", self.region_scale), ("objects", self.object_scale), ("words", self.word_scale)):
            value = torch.as_tensor(np.asarray(scales[key]), dtype=buffer.dtype)
            if value.shape != buffer.shape:
                raise InputError(f"input scales {key}: expected shape {list(buffer.shape)}, got {list(value.shape)}")
            buffer.copy_(value)

    def scale_inputs(self, regions: Tensor | None, objects: Tensor | None, words: Tensor | None):
        """The inputs times their per-channel scales (unchanged without input_scaling)."""
        if not self.config.input_scaling:
            return regions, objects, words
        return (None if regions is None else regions * self.region_scale,
                None if objects is None else objects * self.object_scale,
                None if words is None else words * self.word_scale)

    @torch.no_grad()
    def folded(self) -> "BSSAN":
        """An equal model whose input scales and attention temperatures are folded into its weights (the
        scales multiply the columns of every weight that reads an input; tau multiplies W / W'), with
        scales of one and the temperature's log 0: what export turns into ONNX graphs, so the graphs
        need no extra ops. Exact up to float rounding."""
        import copy

        if self.config.w2r_regions != "grid" and self.config.input_scaling:  # W2R's weights read regions AND objects
            raise InputError(f"w2r_regions {self.config.w2r_regions!r}: W2R reads inputs of two scales; only 'grid' folds")
        folded = copy.deepcopy(self)
        c = self.config
        if c.input_scaling:
            s_r, s_o, s_w = self.region_scale, self.object_scale, self.word_scale
            if folded.w2r is not None:
                w2r = folded.w2r
                w2r.attn_weight.mul_(s_w[:, None] * s_r[None, :])  # W: E x M
                w2r.lstm.weight_ih_l0[:, : c.region_dim].mul_(s_r[None, :])  # acts on u = a (R s)
                w2r.lstm.weight_ih_l0[:, c.region_dim:].mul_(s_w[None, :])
            if folded.o2w is not None:
                o2w = folded.o2w
                o2w.attn_weight.mul_(s_o[:, None])  # W': Q x H2
                o2w.mlp.first.weight[:, : c.object_dim].mul_(s_o[None, :])
                o2w.bilstm.weight_ih_l0.mul_(s_w[None, :])
                o2w.bilstm.weight_ih_l0_reverse.mul_(s_w[None, :])
            for buffer in (folded.region_scale, folded.object_scale, folded.word_scale):
                buffer.fill_(1.0)
        if c.attention is AttentionForm.SCALED:
            for branch in (folded.w2r, folded.o2w):
                if branch is not None:
                    branch.attn_weight.mul_(branch.attn_log_temperature.exp())
                    branch.attn_log_temperature.zero_()
        return folded

    # -- inputs
    def _tensor(self, array, dtype: torch.dtype | None = None) -> Tensor:
        param = next(self.parameters())
        return torch.as_tensor(np.asarray(array) if not isinstance(array, Tensor) else array,
                               dtype=dtype or param.dtype, device=param.device)

    def _check(self, name: str, tensor: Tensor, tail: tuple[int, ...]) -> None:
        if tensor.dim() != len(tail) + 1 or tuple(tensor.shape[1:]) != tail:
            raise InputError(f"{name}: expected shape [N, {', '.join(map(str, tail))}], got {list(tensor.shape)}")

    # -- factored parts
    def encode_images(self, regions, objects, gates: bool = True) -> dict[str, Cache]:
        """regions [B_img, D, M], objects [B_img, P, Q] -> per-image caches (see W2R/O2W.encode_image)."""
        c = self.config
        cache = {}
        if self.needs_objects:
            objects = self._tensor(objects)
            self._check("objects", objects, (c.object_count, c.object_dim))
            objects = self.scale_inputs(None, objects, None)[1]
        if self.w2r is not None:
            regions = self._tensor(regions)
            self._check("regions", regions, (c.region_count, c.region_dim))
            regions = self.scale_inputs(regions, None, None)[0]
            if c.w2r_regions == "grid+objects":  # W2R attends over the cells and the boxes: [B_img, D + P, M]
                regions = torch.cat([regions, objects], dim=1)
            cache["w2r"] = self.w2r.encode_image(regions, gates)
        if self.o2w is not None:
            cache["o2w"] = self.o2w.encode_image(objects)
        return cache

    @property
    def w2r_region_count(self) -> int:
        """How many regions W2R attends over: D, or D + P with w2r_regions='grid+objects'."""
        c = self.config
        return c.region_count + (c.object_count if c.w2r_regions == "grid+objects" else 0)

    @property
    def needs_objects(self) -> bool:
        """Whether encode_images reads the objects: O2W does, and W2R with w2r_regions='grid+objects'."""
        return self.o2w is not None or (self.w2r is not None and self.config.w2r_regions == "grid+objects")

    def encode_texts(self, words, lengths) -> dict[str, Cache]:
        """words [B_txt, L <= max_words, E], lengths [B_txt] -> per-caption caches."""
        words, lengths = self._tensor(words), self._tensor(lengths, torch.long)
        if words.dim() != 3 or words.shape[2] != self.config.word_dim or words.shape[1] > self.config.max_words:
            raise InputError(f"words: expected shape [N, L <= {self.config.max_words}, {self.config.word_dim}], got {list(words.shape)}")
        if lengths.shape != words.shape[:1]:
            raise InputError(f"lengths: expected shape [{words.shape[0]}] (one per caption), got {list(lengths.shape)}")
        check_lengths(lengths, words.shape[1])
        words = self.scale_inputs(None, None, words)[2]
        cache = {}
        if self.w2r is not None:
            cache["w2r"] = self.w2r.encode_text(words, lengths)
        if self.o2w is not None:
            cache["o2w"] = self.o2w.encode_text(words, lengths)
        return cache

    def score_cached(self, image_cache: dict[str, Cache], text_cache: dict[str, Cache], image_index: Tensor,
                     text_index: Tensor, negative: Negative = False) -> tuple[Tensor, Tensor]:
        """(Y [N], Y' [N]) of the pairs (image_index[n], text_index[n]); an unbuilt branch gives zeros."""
        zeros = torch.zeros(image_index.shape[0], dtype=next(self.parameters()).dtype, device=image_index.device)
        y = self.w2r.score_pairs(image_cache["w2r"], text_cache["w2r"], image_index, text_index, negative) if self.w2r else zeros
        yp = self.o2w.score_pairs(image_cache["o2w"], text_cache["o2w"], image_index, text_index, negative) if self.o2w else zeros
        return y, yp

    def score_grid_cached(self, image_cache: dict[str, Cache], text_cache: dict[str, Cache],
                          negative: Negative = False) -> tuple[Tensor, Tensor]:
        """(Y, Y') [B_img, B_txt] of every image x caption of the caches."""
        y = self.w2r.score_grid(image_cache["w2r"], text_cache["w2r"], negative) if self.w2r else None
        yp = self.o2w.score_grid(image_cache["o2w"], text_cache["o2w"], negative) if self.o2w else None
        return (y if y is not None else torch.zeros_like(yp)), (yp if yp is not None else torch.zeros_like(y))

    @property
    def scoring_weights(self) -> tuple[float, float]:
        """(w_Y, w_Y') of MS = w_Y Y + w_Y' Y' (eq. 19) at scoring time: the dev-chosen score_weights when set,
        else the config's branch_weights (1, lambda), which also weigh the two losses in training."""
        return self.score_weights if self.score_weights is not None else self.config.branch_weights

    def combine(self, y: Tensor, y_prime: Tensor) -> Tensor:
        """MS = w_Y Y + w_Y' Y' (eq. 19: w_Y = 1, w_Y' = lambda unless score_weights were chosen on dev); a
        single-branch variant returns its branch's score."""
        w_y, w_yp = self.scoring_weights
        return w_y * y + w_yp * y_prime

    # -- training
    def forward(self, regions, objects, words, lengths, negative: Negative = False) -> tuple[Tensor, Tensor]:
        """Aligned pairs (row n of the images with caption n) -> (Y [N], Y' [N]). No G is built:
        with one caption per image, gathering R and projecting u is the cheaper route."""
        image_cache = self.encode_images(regions, objects, gates=False)
        text_cache = self.encode_texts(words, lengths)
        index = torch.arange(text_cache[next(iter(text_cache))]["lengths"].shape[0], device=next(self.parameters()).device)
        return self.score_cached(image_cache, text_cache, index, index, negative)

    def forward_pairs(self, regions, objects, words, lengths, image_index, text_index,
                      negative: Negative = False) -> tuple[Tensor, Tensor]:
        """Training on listed pairs of a batch -> (Y [N], Y' [N]), in ONE pass: each image is encoded
        once, and positives and negatives share one BatchNorm batch (two separate forward calls
        would normalise them with different batch statistics). E.g. image_index = [0..B, 0..B],
        text_index = [0..B, B..2B] (words = positives then sampled negative captions),
        negative = [False]*B + [True]*B. G is built only when that is cheaper than projecting
        u per pair (pairs x L > images x D) and a G gather is no bigger than an R gather."""
        device = next(self.parameters()).device
        image_index, text_index = self._tensor(image_index, torch.long), self._tensor(text_index, torch.long)
        n_images, max_len = len(regions if self.w2r else objects), words.shape[1]
        gates = (self.w2r is not None and self.w2r.pair_gathers_gates
                 and len(image_index) * max_len > n_images * self.w2r_region_count)
        image_cache = self.encode_images(regions, objects, gates=gates)
        text_cache = self.encode_texts(words, lengths)
        if isinstance(negative, Tensor):
            negative = negative.to(device)
        return self.score_cached(image_cache, text_cache, image_index, text_index, negative)

    def forward_grid(self, regions, objects, words, lengths, image_ids=None) -> tuple[Tensor, Tensor]:
        """Every image x every caption of a batch -> (Y, Y') [B, B], for hardest-in-batch negatives.
        Pairs whose image_ids differ (default: off-diagonal) are negatives for the attention rule.
        Costs B^2 pair steps instead of 2B."""
        image_cache = self.encode_images(regions, objects, gates=True)
        text_cache = self.encode_texts(words, lengths)
        n = next(iter(text_cache.values()))["lengths"].shape[0]
        ids = self._tensor(image_ids, torch.long) if image_ids is not None else torch.arange(n, device=next(self.parameters()).device)
        return self.score_grid_cached(image_cache, text_cache, negative=ids[:, None] != ids[None, :])

    # -- evaluation
    @torch.no_grad()
    def score_matrix(self, regions, objects, words, lengths, image_block: int = 16, caption_block: int = 256,
                     progress: bool = False, hub: bool = True) -> Tensor:
        """MS [N_img, N_cap] of every image x caption (test attention: softmax), in blocks (see _grid_blocks);
        minus each image's hub offset when the model has a hub bank (hub=False: the uncorrected MS)."""
        out = torch.empty(len(regions if self.w2r else objects), len(lengths), dtype=next(self.parameters()).dtype)
        for rows, cols, y, yp in self._grid_blocks(regions, objects, words, lengths, image_block, caption_block, progress):
            out[rows, cols] = self.combine(y, yp).cpu()
        if hub and self.hub is not None:
            out -= self.hub_offsets(regions, objects, image_block).to(out.dtype)[:, None]
            if self.hub.has_images:
                out -= self.hub_text_offsets(words, lengths, caption_block).to(out.dtype)[None, :]
        return out

    @torch.no_grad()
    def hub_text_offsets(self, words, lengths, caption_block: int = 256) -> Tensor:
        """gamma * s(c) [N_cap] of each caption (engine/hub.py: s = mean of the text_k highest MS over the hub bank's
        images); zeros without a caption side."""
        if self.hub is None or not self.hub.has_images:
            return torch.zeros(len(lengths))
        bank = self.score_matrix(self.hub.regions.astype(np.float32), self.hub.objects.astype(np.float32), words, lengths,
                                 caption_block=caption_block, hub=False)
        return torch.from_numpy(self.hub.text_offsets(bank.float().numpy()))

    @torch.no_grad()
    def hub_offsets(self, regions, objects, image_block: int = 16) -> Tensor:
        """beta * r(i) [N_img] of each image (engine/hub.py: r = mean of the k highest MS over the hub bank's
        captions); zeros without a hub bank."""
        n_img = len(regions if self.w2r else objects)
        if self.hub is None:
            return torch.zeros(n_img)
        bank = self.score_matrix(regions, objects, self.hub.padded(), self.hub.lengths, image_block, hub=False)
        return torch.from_numpy(self.hub.offsets(bank.float().numpy()))

    @torch.no_grad()
    def branch_matrices(self, regions, objects, words, lengths, image_block: int = 16,
                        caption_block: int = 256) -> tuple[Tensor, Tensor]:
        """(Y, Y') [N_img, N_cap] of every image x caption, before eq. 19 combines them (an unbuilt branch: zeros)."""
        shape = (len(regions if self.w2r else objects), len(lengths))
        y_all, yp_all = (torch.zeros(shape, dtype=next(self.parameters()).dtype) for _ in range(2))
        for rows, cols, y, yp in self._grid_blocks(regions, objects, words, lengths, image_block, caption_block, False):
            y_all[rows, cols], yp_all[rows, cols] = y.cpu(), yp.cpu()
        return y_all, yp_all

    def _grid_blocks(self, regions, objects, words, lengths, image_block: int, caption_block: int, progress: bool):
        """(image rows, caption columns, Y, Y') of every block of image_block images x caption_block captions.

        Memory is bounded by the blocks: per block the W2R gate inputs are
        image_block * caption_block * L * 4H floats. Captions are processed sorted by length so a
        block runs only as many LSTM steps as its longest caption needs.
        """
        n_img, n_cap = len(regions if self.w2r else objects), len(lengths)
        lengths_np = np.asarray(lengths.cpu() if isinstance(lengths, Tensor) else lengths)
        order = np.argsort(lengths_np, kind="stable")
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=n_img * n_cap, unit="pair", unit_scale=True, desc="scoring")
        for i in range(0, n_img, image_block):
            rows = slice(i, min(i + image_block, n_img))
            image_cache = self.encode_images(regions[rows] if self.w2r else None, objects[rows] if self.needs_objects else None)
            for j in range(0, n_cap, caption_block):
                cols = np.sort(order[j:j + caption_block])  # sorted: memory maps read forward
                max_len = int(lengths_np[cols].max())
                text_cache = self.encode_texts(np.asarray(words[cols])[:, :max_len] if not isinstance(words, Tensor)
                                               else words[torch.as_tensor(cols)][:, :max_len], lengths_np[cols])
                yield rows, torch.as_tensor(cols), *self.score_grid_cached(image_cache, text_cache)
                if bar is not None:
                    bar.update((rows.stop - rows.start) * len(cols))
        if bar is not None:
            bar.close()

    def _pair_caches(self, regions, objects, words, lengths, image_index, text_index):
        """Encode only the referenced images and captions; return caches and remapped indices."""
        image_index, text_index = np.asarray(image_index), np.asarray(text_index)
        images, image_pos = np.unique(image_index, return_inverse=True)
        texts, text_pos = np.unique(text_index, return_inverse=True)
        image_cache = self.encode_images(regions[images] if self.w2r else None, objects[images] if self.needs_objects else None,
                                         gates=self.w2r is not None and self.w2r.pair_gathers_gates)
        lengths_np = np.asarray(lengths.cpu() if isinstance(lengths, Tensor) else lengths)
        text_cache = self.encode_texts(words[torch.as_tensor(texts)] if isinstance(words, Tensor) else np.asarray(words[texts]),
                                       lengths_np[texts])
        device = next(self.parameters()).device
        return image_cache, text_cache, torch.as_tensor(image_pos, device=device), torch.as_tensor(text_pos, device=device)

    @torch.no_grad()
    def score_pairs(self, regions, objects, words, lengths, image_index, text_index, pair_block: int = 1024) -> Tensor:
        """MS [N] of an explicit list of (image_index[n], text_index[n]) pairs (test attention),
        `pair_block` pairs at a time."""
        image_cache, text_cache, image_pos, text_pos = self._pair_caches(regions, objects, words, lengths, image_index, text_index)
        scores = [self.combine(*self.score_cached(image_cache, text_cache, image_pos[s:s + pair_block], text_pos[s:s + pair_block]))
                  for s in range(0, len(image_pos), pair_block)]
        out = torch.cat(scores) if scores else torch.empty(0)
        if self.hub is not None and len(out):  # each listed image's (and caption's) offset: only the referenced ones
            images = np.unique(np.asarray(image_index))
            offsets = self.hub_offsets(regions[images] if self.w2r else None, objects[images] if self.needs_objects else None)
            out = out - offsets.to(out.dtype)[image_pos.cpu()].to(out.device)
            if self.hub.has_images:
                texts = np.unique(np.asarray(text_index))
                lengths_np = np.asarray(lengths.cpu() if isinstance(lengths, Tensor) else lengths)
                text_words = words[torch.as_tensor(texts)] if isinstance(words, Tensor) else np.asarray(words[texts])
                offsets = self.hub_text_offsets(text_words, lengths_np[texts])
                out = out - offsets.to(out.dtype)[text_pos.cpu()].to(out.device)
        return out

    @torch.no_grad()
    def attention_weights(self, regions, objects, words, lengths, image_index, text_index) -> dict[str, Tensor]:
        """Test-time attention of the listed pairs: "word_to_region" [N, L, D] (W2R, D + P regions with grid+objects; rows of padding
        words are zero) and "object_to_word" [N, P, L] (O2W; zero at padding), for built branches."""
        image_cache, text_cache, image_pos, text_pos = self._pair_caches(regions, objects, words, lengths, image_index, text_index)
        out = {}
        if self.w2r is not None:
            attn = self.w2r.attention(image_cache["w2r"], text_cache["w2r"], image_pos, text_pos)  # [N, L, D]
            real = length_mask(text_cache["w2r"]["lengths"][text_pos], attn.shape[1])  # [N, L]
            out["word_to_region"] = attn * real[..., None]
        if self.o2w is not None:
            out["object_to_word"] = self.o2w.attention(image_cache["o2w"], text_cache["o2w"], image_pos, text_pos)
        return out


# ---------------------------------------------------------------------------------------------
# The paper as written (un-factored): ground truth for tests, baseline for benchmarks


def reference_scores(model: BSSAN, regions: Tensor, objects: Tensor, words: Tensor, lengths: Tensor,
                     negative: Negative = False) -> tuple[Tensor, Tensor]:
    """(Y [N], Y' [N]) of aligned pairs computed as the paper writes it, with the model's weights:
    per pair, words padded to max_words, c_k = [u_k; t_k] through nn.LSTM for all max_words steps
    (read at the last real word), and the Bi-LSTM run on each caption's real words only (captions
    of one length batched together). No caches, no split weights, no packing."""
    n = words.shape[0]
    lengths = lengths.long()
    regions, objects, words = model.scale_inputs(regions, objects, words)
    words = F.pad(words, (0, 0, 0, model.config.max_words - words.shape[1]))  # [N, max_words, E]
    y = yp = torch.zeros(n, dtype=words.dtype, device=words.device)
    if model.w2r is not None:
        w2r = model.w2r
        logits = attention_logits(w2r, torch.einsum("nle,em,ndm->nld", words, w2r.attn_weight, regions))
        attn = attend(logits, negative, w2r.uniform_negatives)  # [N, L, D]
        out, _ = w2r.lstm(torch.cat([attn @ regions, words], dim=-1))  # [N, L, H]
        y = w2r.mlp(out[torch.arange(n), lengths - 1])
    if model.o2w is not None:
        o2w = model.o2w
        yp = torch.zeros(n, dtype=words.dtype, device=words.device)
        hidden = o2w.bilstm.hidden_size
        for length in torch.unique(lengths).tolist():
            idx = (lengths == length).nonzero()[:, 0]
            out, _ = o2w.bilstm(words[idx, :length])  # [n, length, 2*H2]
            states = (out[..., :hidden] + out[..., hidden:]) / 2
            logits = attention_logits(o2w, torch.einsum("npq,qh,nlh->npl", objects[idx], o2w.attn_weight, states))
            neg = negative[idx] if isinstance(negative, Tensor) else negative
            attn = attend(logits, neg, o2w.uniform_negatives)  # [n, P, length]
            yp[idx] = o2w.mlp(torch.cat([objects[idx], attn @ states], dim=-1)).mean(dim=1)
    return y, yp
