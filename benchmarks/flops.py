"""FLOPs per pair of BSSAN, counted from the config, stage by stage (no torch: numbers only).

    from benchmarks.flops import reference_pair_flops, factored_pair_flops, total_flops
    stages = factored_pair_flops(preset("paper"), length=30, values="regions")
    total_flops(stages) / 1e6          # MFLOP per pair of the pair graphs (caches amortised apart)

A multiply-add is 2 FLOPs; a GEMM [m, k] x [k, n] is 2mkn. Elementwise work (tanh, exp, the
LSTM cell's gates) is counted 1 FLOP per element per operation and kept apart (`other`), since
it runs on vector units, not at GEMM peak. Symbols: D regions, M region dim, E word dim,
P objects, Q object dim, H W2R hidden, H2 O2W hidden, L words run, h1 = o2w_mlp[0].

The paper as written (training.model.reference_scores), per pair, W2R padded to Lp = max_words:

    w2r.attention_logits  2 Lp E M + 2 Lp M D        (T W first, then . R^T: einsum left to right) + tanh Lp D
    w2r.softmax           4 Lp D                     (max, exp, sum, divide)
    w2r.attend            2 Lp D M                   u_k = sum_j a_kj r_j
    w2r.input_projection  2 Lp (M+E) 4H              [u_k; t_k] W_ih^T inside nn.LSTM
    w2r.recurrence        2 Lp H 4H + 13 Lp H        h W_hh^T per step + the cell
    w2r.mlp               2 sum(in*out) + 3 per hidden unit (BatchNorm, tanh)
    o2w.bilstm            2 directions x L (2 E 4H2 + 2 H2 4H2 + 13 H2)   on the real words, per pair
    o2w.attention_logits  2 P Q H2 + 2 P H2 L        (O W' first, then . S^T) + tanh P L
    o2w.softmax           4 P L
    o2w.attend            2 P L H2                   v_j = sum_k b_jk s_k
    o2w.mlp               P x (2 sum(in*out) + 3 per hidden unit), in = Q + H2; then the mean over P

The factored pair graphs (export/graphs.py W2RPair/O2WPair; training.model score_grid), per pair,
L = the bucket's longest caption; image and caption caches are counted apart (cache_flops):

    w2r.attention_logits  2 L D E + tanh L D         words . (R W^T)_j, R W^T cached per image
    w2r.softmax           4 L D
    w2r.attend            2 L D 4H  (values = G = R W_ih_u^T, cached)   or   2 L D M  (values = R)
    w2r.input_projection  0         (values = G)                        or   2 L M 4H (u W_ih_u^T)
                          + 4H L adding the cached T W_ih_t^T + b
    w2r.recurrence        2 L H 4H + 13 L H
    w2r.mlp               2 sum(in*out) + 1 per hidden unit (BatchNorm folded into the Linear)
    o2w.attention_logits  2 P L H2 + tanh P L        (O W' cached per image, S cached per caption)
    o2w.softmax           4 P L
    o2w.attend            2 P L H2
    o2w.mlp               P x (2 H2 h1 + h1 + 2 sum(in*out of the later layers) + 1 per hidden unit)
                          (O W1_o^T + b1 cached per image)
"""

from __future__ import annotations

from dataclasses import dataclass

LSTM_CELL_OPS = 13  # per hidden unit per step: 3 sigmoid, 2 tanh, 4 gate adds... (elementwise, counted apart)
SOFTMAX_OPS = 4  # per element: max, exp, sum, divide
VALUES = ("gates", "regions")


@dataclass(frozen=True)
class StageFlops:
    matmul: float  # 2 * multiply-adds of GEMMs
    other: float = 0.0  # elementwise
    weight: bool = False  # the GEMM has a constant weight operand (what int8 dynamic quantization can take)

    @property
    def total(self) -> float:
        return self.matmul + self.other


def _mlp(widths: tuple[int, ...], in_dim: int, batchnorm: bool, skip_first: bool = False) -> StageFlops:
    dims = (in_dim, *widths)
    layers = list(zip(dims[:-1], dims[1:]))
    matmul = sum(2 * a * b for a, b in (layers[1:] if skip_first else layers))
    per_hidden = 3 if batchnorm else 1  # (BN scale+shift) + tanh, or tanh alone when BN is folded
    other = sum(per_hidden * b for _, b in layers[:-1]) + (widths[0] if skip_first else 0)
    return StageFlops(matmul, other, weight=True)


def _cell(steps: int, hidden: int) -> float:
    return LSTM_CELL_OPS * steps * hidden


def reference_pair_flops(config, length: int) -> dict[str, StageFlops]:
    """Per pair of training.model.reference_scores: W2R on max_words steps, O2W on `length` real words."""
    c, lp, n = config, config.max_words, length
    d, m, e, h = c.region_count, c.region_dim, c.word_dim, c.w2r_hidden
    p, q, h2 = c.object_count, c.object_dim, c.o2w_hidden
    stages: dict[str, StageFlops] = {}
    if c.uses_w2r:
        stages["w2r.attention_logits"] = StageFlops(2 * lp * e * m + 2 * lp * m * d, lp * d)
        stages["w2r.softmax"] = StageFlops(0, SOFTMAX_OPS * lp * d)
        stages["w2r.attend"] = StageFlops(2 * lp * d * m)
        stages["w2r.input_projection"] = StageFlops(2 * lp * (m + e) * 4 * h, 4 * h * lp, weight=True)
        stages["w2r.recurrence"] = StageFlops(2 * lp * h * 4 * h, _cell(lp, h), weight=True)
        stages["w2r.mlp"] = _mlp(c.w2r_mlp, h, batchnorm=True)
    if c.uses_o2w:
        stages["o2w.bilstm"] = StageFlops(2 * n * (2 * e * 4 * h2 + 2 * h2 * 4 * h2), 2 * _cell(n, h2), weight=True)
        stages["o2w.attention_logits"] = StageFlops(2 * p * q * h2 + 2 * p * h2 * n, p * n)
        stages["o2w.softmax"] = StageFlops(0, SOFTMAX_OPS * p * n)
        stages["o2w.attend"] = StageFlops(2 * p * n * h2)
        mlp = _mlp(c.o2w_mlp, q + h2, batchnorm=True)
        stages["o2w.mlp"] = StageFlops(p * mlp.matmul, p * mlp.other + p, weight=True)
    return stages


def factored_pair_flops(config, length: int, values: str) -> dict[str, StageFlops]:
    """Per pair of the factored pair step at `length` steps; `values` "gates" (a.G) or "regions" (a.R, then W_ih_u)."""
    if values not in VALUES:
        raise ValueError(f"values={values!r}: expected one of {VALUES}")
    c, n = config, length
    d, m, e, h = c.region_count, c.region_dim, c.word_dim, c.w2r_hidden
    p, h2 = c.object_count, c.o2w_hidden
    stages: dict[str, StageFlops] = {}
    if c.uses_w2r:
        stages["w2r.attention_logits"] = StageFlops(2 * n * d * e, n * d)
        stages["w2r.softmax"] = StageFlops(0, SOFTMAX_OPS * n * d)
        stages["w2r.attend"] = StageFlops(2 * n * d * (4 * h if values == "gates" else m))
        stages["w2r.input_projection"] = StageFlops(0 if values == "gates" else 2 * n * m * 4 * h, 4 * h * n,
                                                    weight=values == "regions")
        stages["w2r.recurrence"] = StageFlops(2 * n * h * 4 * h, _cell(n, h), weight=True)
        stages["w2r.mlp"] = _mlp(c.w2r_mlp, h, batchnorm=False)
    if c.uses_o2w:
        stages["o2w.attention_logits"] = StageFlops(2 * p * n * h2, p * n)
        stages["o2w.softmax"] = StageFlops(0, SOFTMAX_OPS * p * n)
        stages["o2w.attend"] = StageFlops(2 * p * n * h2)
        first = StageFlops(2 * h2 * c.o2w_mlp[0])
        rest = _mlp(c.o2w_mlp, h2, batchnorm=False, skip_first=True)
        stages["o2w.mlp"] = StageFlops(p * (first.matmul + rest.matmul), p * rest.other + p, weight=True)
    return stages


def image_cache_flops(config, values: str) -> float:
    """Per image: R W^T (+ G = R W_ih_u^T when values are gates), O W' and O W1_o^T."""
    c = config
    flops = 0.0
    if c.uses_w2r:
        flops += 2 * c.region_count * c.region_dim * c.word_dim
        flops += 2 * c.region_count * c.region_dim * 4 * c.w2r_hidden if values == "gates" else 0
    if c.uses_o2w:
        flops += 2 * c.object_count * c.object_dim * (c.o2w_hidden + c.o2w_mlp[0])
    return flops


def caption_cache_flops(config, length: int) -> float:
    """Per caption of `length` words: T W_ih_t^T (W2R) and the Bi-LSTM states (O2W)."""
    c = config
    flops = 0.0
    if c.uses_w2r:
        flops += 2 * length * c.word_dim * 4 * c.w2r_hidden
    if c.uses_o2w:
        flops += reference_pair_flops(c, length)["o2w.bilstm"].total
    return flops


def total_flops(stages: dict[str, StageFlops]) -> float:
    return float(sum(s.total for s in stages.values()))


def matmul_flops(stages: dict[str, StageFlops]) -> float:
    return float(sum(s.matmul for s in stages.values()))


def ideal_seconds(stages: dict[str, StageFlops], peaks: dict[str, float], precision_of: dict[str, str],
                  default: str = "fp32") -> float:
    """Seconds per pair if every stage's GEMMs ran at the measured peak (FLOP/s) of its precision
    and its elementwise work at the fp32 peak: the roofline-style floor of a mixed-precision scorer.
    `precision_of` maps a stage name to "fp32" | "bf16" | "int8"; unnamed stages use `default`."""
    seconds = 0.0
    for name, stage in stages.items():
        seconds += stage.matmul / peaks[precision_of.get(name, default)] + stage.other / peaks["fp32"]
    return seconds


def flops_by_precision(stages: dict[str, StageFlops], precision_of: dict[str, str], default: str = "fp32") -> dict[str, float]:
    """{"fp32": GEMM FLOPs, "int8": ..., "other": elementwise FLOPs}: what ideal_seconds needs, kept in a
    report so the fraction of peak can be recomputed against peaks measured later (peak_fraction)."""
    split: dict[str, float] = {"other": 0.0}
    for name, stage in stages.items():
        precision = precision_of.get(name, default)
        split[precision] = split.get(precision, 0.0) + stage.matmul
        split["other"] += stage.other
    return split


def peak_fraction(split: dict[str, float], peaks: dict[str, float], seconds: float) -> float:
    """Fraction of the roofline floor: (sum of FLOPs / peak of their precision; elementwise at fp32) / seconds."""
    ideal = sum(flops / peaks["fp32" if precision == "other" else precision] for precision, flops in split.items())
    return ideal / seconds
