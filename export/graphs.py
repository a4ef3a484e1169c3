"""torch modules, one per ONNX graph of engine/graphs.py, built from a trained model's factored parts.

    from export.graphs import build_graph_modules
    modules = build_graph_modules(model)                   # {"w2r_image": nn.Module, ...} fp32
    modules = build_graph_modules(model, torch.float16, recurrence_fp32=True)   # an fp16 variant
    modules["w2r_pair"](regions_attn, regions_values, words, gates_words, lengths, pairs)  # -> scores [N]

Each module's forward takes exactly the inputs of its GraphSpec, in order, and returns its
outputs in order. The weights are copied out of the model at construction (eval-mode
BatchNorm folded into the Linear before it), so a module is a frozen function of its inputs:
the exporter traces it and the validator compares it against the model it came from.

Precision: `dtype` is the dtype of every FLOAT tensor (engine/graphs.py); `recurrence_fp32`
keeps the recurrent part (W2R's LSTM recurrence, O2W's Bi-LSTM) in float32 inside an fp16
graph, with casts at its edges. `scores` and the shortlist vectors are float32 in every variant.

The W2R recurrence is a TorchScript function: the legacy exporter turns its loop into one
ONNX Loop node whose trip count is max(lengths of the pairs), so the words axis stays
dynamic and a bucket of short captions runs only as many steps as its longest caption.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from engine.errors import InputError
from training.config import AttentionForm
from training.model import BSSAN, MLP


def _script(function):
    """torch.jit.script without its deprecation warning: the legacy ONNX exporter needs TorchScript
    to turn a data-dependent loop into an ONNX Loop (tracing would unroll it to a fixed length)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(function)


@_script
def lstm_recurrence(gates: Tensor, lengths: Tensor, weight_hh_t: Tensor) -> Tensor:
    """training.model.lstm_recurrence, scripted: gates [N, L, 4H], lengths [N], W_hh^T [H, 4H]
    -> h at each sequence's last real step [N, H]; max(lengths) steps."""
    n = gates.shape[0]
    hidden = weight_hh_t.shape[0]
    steps = gates.transpose(0, 1).contiguous()  # [L, N, 4H]: each step reads one contiguous block
    h = torch.zeros([n, hidden], dtype=gates.dtype, device=gates.device)
    c = torch.zeros([n, hidden], dtype=gates.dtype, device=gates.device)
    out = torch.zeros([n, hidden], dtype=gates.dtype, device=gates.device)
    last = lengths - 1
    for t in range(int(lengths.max())):
        step = steps[t] + h @ weight_hh_t  # [N, 4H]
        i, f, g, o = step.chunk(4, dim=1)  # nn.LSTM's gate order
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        out = torch.where((last == t).unsqueeze(1), h, out)
    return out


@_script
def attend_values(attn: Tensor, values: Tensor, image: Tensor) -> Tensor:
    """attn [N, L, D] of pairs whose image rows are `image` [N], values [B_img, D, V] -> [N, L, V].
    With one image row (a grid block or an image-to-text re-rank) every pair shares it: one GEMM
    [N*L, D] x [D, V], nothing gathered. Otherwise each pair gathers its image's values (D x V)
    and runs a batched product (a text-to-image re-rank: 1 caption x k images)."""
    if values.shape[0] == 1:
        n, length, regions = attn.shape[0], attn.shape[1], attn.shape[2]
        return (attn.reshape(n * length, regions) @ values[0]).reshape(n, length, values.shape[2])  # [N, L, V]
    return attn @ values[image]  # [N, L, D] x [N, D, V]


@_script
def attend_projected(attn: Tensor, regions: Tensor, image: Tensor, projection: Tensor) -> Tensor:
    """attend_values when the image cache holds R, not G (W2R's regions mode): -> [N, L, 4H].
    One image row: G = R W_ih_u^T is made once per call (D*M*4H, shared by every pair), then one
    GEMM. Several rows: u = a R per pair (gathering R, 8x smaller than G at the paper's sizes),
    then u W_ih_u^T."""
    if regions.shape[0] == 1:
        n, length, count = attn.shape[0], attn.shape[1], attn.shape[2]
        gates = regions[0] @ projection  # [D, 4H]
        return (attn.reshape(n * length, count) @ gates).reshape(n, length, gates.shape[1])  # [N, L, 4H]
    return (attn @ regions[image]) @ projection  # [N, L, M] x [M, 4H]


def attention_bounded(model: BSSAN) -> bool:
    """True for the paper's softmax(tanh(x + b)); False for the scaled form softmax(tau x), whose tau the
    model's folded() has already moved into W / W' (the graph then computes softmax(x + 0))."""
    return model.config.attention is AttentionForm.TANH


def attention_bias(branch: nn.Module) -> Tensor:
    """The scalar added to the attention scores: b of the tanh form; 0 for the scaled form (a constant
    cancels in the softmax; kept as the same initializer so every graph has one shape)."""
    bias = getattr(branch, "attn_bias", None)
    return bias if bias is not None else torch.zeros(())


def _buffer(module: nn.Module, name: str, value: Tensor, dtype: torch.dtype) -> None:
    module.register_buffer(name, value.detach().clone().to(dtype))


def fold_mlp(mlp: MLP) -> list[tuple[Tensor, Tensor]]:
    """(weight, bias) of each Linear of an eval-mode MLP with the BatchNorm after it folded in:
    BN(W x + b) = s (W x + b - mean) + beta, s = gamma / sqrt(var + eps)."""
    linears = [mlp.first] + [m for m in mlp.rest if isinstance(m, nn.Linear)]
    norms = [m for m in mlp.rest if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == len(linears) - 1, "MLP layout: first Linear, then (BatchNorm1d, Tanh, Linear)*"
    folded = []
    for k, linear in enumerate(linears):
        weight, bias = linear.weight.detach().double(), linear.bias.detach().double()
        if k < len(norms):
            bn = norms[k]
            scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
            weight, bias = scale[:, None] * weight, scale * (bias - bn.running_mean.double()) + bn.bias.detach().double()
        folded.append((weight.float(), bias.float()))
    return folded


class FoldedMLP(nn.Module):
    """Linear -> (tanh -> Linear)*, BatchNorm folded; `continue_from_first` takes the first layer's output."""

    def __init__(self, layers: list[tuple[Tensor, Tensor]], dtype: torch.dtype):
        super().__init__()
        self.depth = len(layers)
        for k, (weight, bias) in enumerate(layers):
            # held input-major: the traced graphs' initializers keep these names (mlp.weight_t1, mlp.bias1, ...), which
            # the O2W kernel reads from o2w_grid (engine/kernels); a transposed-at-trace copy would be named onnx::MatMul_N
            _buffer(self, f"weight_t{k}", weight.t().contiguous(), dtype)
            _buffer(self, f"bias{k}", bias, dtype)

    def layer(self, k: int) -> tuple[Tensor, Tensor]:
        """(W^T [in, out], b [out]) of layer k: y = x W^T + b."""
        return getattr(self, f"weight_t{k}"), getattr(self, f"bias{k}")

    def continue_from_first(self, z: Tensor) -> Tensor:
        for k in range(1, self.depth):
            weight_t, bias = self.layer(k)
            z = torch.tanh(z) @ weight_t + bias
        return z[..., 0]

    def forward(self, x: Tensor) -> Tensor:
        weight_t, bias = self.layer(0)
        return self.continue_from_first(x @ weight_t + bias)


# ---------------------------------------------------------------------------------------------
# W2R


class W2RImage(nn.Module):
    """regions -> regions_attn = R W^T, regions_values = G = R W_ih_u^T (gathers_gates) or R."""

    def __init__(self, model: BSSAN, dtype: torch.dtype):
        super().__init__()
        w2r = model.w2r
        self.gathers_gates = w2r.pair_gathers_gates
        _buffer(self, "attn_weight_t", w2r.attn_weight.t(), dtype)  # [M, E]
        _buffer(self, "input_weight_u_t", w2r._split_input_weight()[0].t(), dtype)  # [M, 4H]

    def forward(self, regions: Tensor) -> tuple[Tensor, Tensor]:
        values = regions @ self.input_weight_u_t if self.gathers_gates else regions * 1  # * 1: an output is never an input
        return regions @ self.attn_weight_t, values


class W2RText(nn.Module):
    """words -> gates_words = T W_ih_t^T + b_ih + b_hh."""

    def __init__(self, model: BSSAN, dtype: torch.dtype):
        super().__init__()
        w2r = model.w2r
        _buffer(self, "input_weight_t_t", w2r._split_input_weight()[1].t(), dtype)  # [E, 4H]
        _buffer(self, "bias", w2r.lstm.bias_ih_l0 + w2r.lstm.bias_hh_l0, dtype)

    def forward(self, words: Tensor) -> Tensor:
        return words @ self.input_weight_t_t + self.bias


class W2RPair(nn.Module):
    """Image-cache rows, caption-cache rows, pairs [N, 2] -> Y [N]."""

    def __init__(self, model: BSSAN, dtype: torch.dtype, recurrence_fp32: bool):
        super().__init__()
        w2r = model.w2r
        self.gathers_gates = w2r.pair_gathers_gates
        self.recurrence_dtype = torch.float32 if recurrence_fp32 else dtype
        self.bounded = attention_bounded(model)
        _buffer(self, "attn_bias", attention_bias(w2r), dtype)
        _buffer(self, "input_weight_u_t", w2r._split_input_weight()[0].t(), dtype)  # [M, 4H]
        _buffer(self, "weight_hh_t", w2r.lstm.weight_hh_l0.t(), self.recurrence_dtype)  # [H, 4H]
        self.mlp = FoldedMLP(fold_mlp(w2r.mlp), dtype)

    def forward(self, regions_attn: Tensor, regions_values: Tensor, words: Tensor, gates_words: Tensor,
                lengths: Tensor, pairs: Tensor) -> Tensor:
        image, text = pairs[:, 0], pairs[:, 1]  # [N] each; [:, k] not split/squeeze (ONNX If nodes)
        keys = regions_attn[image]  # [N, D, E]
        logits = words[text] @ keys.transpose(1, 2) + self.attn_bias  # [N, L, D]
        attn = torch.softmax(torch.tanh(logits) if self.bounded else logits, dim=-1)
        if self.gathers_gates:
            gate_u = attend_values(attn, regions_values, image)  # [N, L, 4H]
        else:
            gate_u = attend_projected(attn, regions_values, image, self.input_weight_u_t)  # [N, L, 4H]
        gates = (gate_u + gates_words[text]).to(self.recurrence_dtype)  # [N, L, 4H]
        h = lstm_recurrence(gates, lengths[text], self.weight_hh_t)  # [N, H]
        return self.mlp(h.to(self.attn_bias.dtype)).float()


# ---------------------------------------------------------------------------------------------
# O2W


class O2WImage(nn.Module):
    """objects -> objects_attn = O W', objects_mlp = O W1_o^T + b1 (BatchNorm folded)."""

    def __init__(self, model: BSSAN, dtype: torch.dtype):
        super().__init__()
        o2w = model.o2w
        weight, bias = fold_mlp(o2w.mlp)[0]
        _buffer(self, "attn_weight", o2w.attn_weight, dtype)  # [Q, H2]
        _buffer(self, "first_object_t", weight[:, : o2w.object_dim].t(), dtype)  # [Q, h1]
        _buffer(self, "first_bias", bias, dtype)

    def forward(self, objects: Tensor) -> tuple[Tensor, Tensor]:
        return objects @ self.attn_weight, objects @ self.first_object_t + self.first_bias


class O2WText(nn.Module):
    """words, lengths -> states = BiLSTM(T) (packed by length, directions averaged)."""

    def __init__(self, model: BSSAN, dtype: torch.dtype, recurrence_fp32: bool):
        super().__init__()
        self.dtype = dtype
        self.recurrence_dtype = torch.float32 if recurrence_fp32 else dtype
        self.bilstm = copy.deepcopy(model.o2w.bilstm).to(self.recurrence_dtype).eval()

    def forward(self, words: Tensor, lengths: Tensor) -> Tensor:
        packed = pack_padded_sequence(words.to(self.recurrence_dtype), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.bilstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=words.shape[1])  # [B_txt, L, 2*H2]
        hidden = self.bilstm.hidden_size
        return ((out[..., :hidden] + out[..., hidden:]) / 2).to(self.dtype)  # [B_txt, L, H2]


class O2WPair(nn.Module):
    """Image-cache rows, caption-cache rows, pairs [N, 2] -> Y' [N]."""

    def __init__(self, model: BSSAN, dtype: torch.dtype):
        super().__init__()
        o2w = model.o2w
        layers = fold_mlp(o2w.mlp)
        self.bounded = attention_bounded(model)
        _buffer(self, "attn_bias", attention_bias(o2w), dtype)
        _buffer(self, "first_states_t", layers[0][0][:, o2w.object_dim:].t(), dtype)  # [H2, h1]
        self.mlp = FoldedMLP(layers, dtype)

    def forward(self, objects_attn: Tensor, objects_mlp: Tensor, states: Tensor, lengths: Tensor, pairs: Tensor) -> Tensor:
        image, text = pairs[:, 0], pairs[:, 1]
        pair_states = states[text]  # [N, L, H2]
        real = torch.arange(states.shape[1], device=states.device)[None, :] < lengths[text][:, None]  # [N, L]
        logits = objects_attn[image] @ pair_states.transpose(1, 2) + self.attn_bias  # [N, P, L]
        logits = torch.tanh(logits) if self.bounded else logits
        attn = torch.softmax(logits.masked_fill(~real[:, None, :], float("-inf")), dim=-1)  # [N, P, L]
        z = objects_mlp[image] + (attn @ pair_states) @ self.first_states_t  # [N, P, h1]
        return self.mlp.continue_from_first(z).mean(dim=1).float()  # mean over the P objects (eq. 14)


# ---------------------------------------------------------------------------------------------
# Grid graphs: one image row x many caption rows, nothing gathered (engine/graphs.py "w2r_grid", "o2w_grid")


class W2RGrid(nn.Module):
    """w2r_grid: the one-image case of W2RPair (pairs (0, r) for every caption row r), as torch for parity and the
    torch backend. Its ONNX graph is written by `onnx_model` (not traced): the attention of word t runs inside
    the recurrence step, and the step is ONE Gemm [a_t, h] x [G; W_hh^T] + gates_words[:, t], so the graph holds
    no [captions, words, 4H] intermediate, no Gather of cache rows and no If; h of every step is a Loop scan
    output and each caption's last one is gathered once at the end."""

    def __init__(self, pair: W2RPair):
        super().__init__()
        self.pair = pair

    def forward(self, regions_attn: Tensor, regions_values: Tensor, words: Tensor, gates_words: Tensor,
                lengths: Tensor) -> Tensor:
        n = words.shape[0]
        pairs = torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n)], dim=1)
        return self.pair(regions_attn, regions_values, words, gates_words, lengths, pairs)

    def onnx_model(self, opset: int):
        """The graph as an onnx.ModelProto (fp32), inputs and outputs as engine/graphs.py declares them."""
        from onnx import TensorProto, helper, numpy_helper

        pair = self.pair
        if pair.attn_bias.dtype != torch.float32 or pair.recurrence_dtype != torch.float32:
            raise ValueError("w2r_grid is written at fp32 only (engine.graphs.GRID_PRECISIONS)")
        hidden = pair.weight_hh_t.shape[0]
        inits: list = []

        def const(name: str, value) -> str:
            inits.append(numpy_helper.from_array(np.asarray(value), name))
            return name

        def node(op: str, inputs: list[str], output: str, **attrs) -> str:
            nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
            return output

        nodes: list = []
        axis0 = const("axis0", np.array([0], np.int64))
        keys_t = node("Transpose", [node("Squeeze", ["regions_attn", axis0], "keys")], "keys_t", perm=[1, 0])  # [E, D]
        values = node("Squeeze", ["regions_values", axis0], "values")  # [D, V]
        if not pair.gathers_gates:  # regions mode: G = R W_ih_u^T once per call (shared by every pair)
            values = node("MatMul", [values, const("input_weight_u_t", pair.input_weight_u_t.numpy())], "gates_regions")
        step_weight = node("Concat", [values, const("weight_hh_t", pair.weight_hh_t.numpy())], "step_weight", axis=0)  # [D+H, 4H]
        one = const("one", np.array(1, np.int64))
        steps = node("ReduceMax", ["lengths"], "steps", keepdims=0)
        count = node("Gather", [node("Shape", ["words"], "words_shape"), axis0], "count", axis=0)  # [1]
        h0 = node("ConstantOfShape", [node("Concat", [count, const("hidden", np.array([hidden], np.int64))], "state_shape",
                                            axis=0)], "h0", value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
        body: list = []

        def step(op: str, inputs: list[str], outputs: list[str] | str, **attrs):
            outputs = [outputs] if isinstance(outputs, str) else outputs
            body.append(helper.make_node(op, inputs, outputs, name=f"step_{outputs[0]}", **attrs))
            return outputs[0] if len(outputs) == 1 else outputs

        logits = step("MatMul", [step("Gather", ["words", "t"], "word_t", axis=1), keys_t], "logits_t")  # [N, D]
        bias = float(pair.attn_bias)
        if bias != 0.0 or pair.bounded:
            logits = step("Add", [logits, const("attn_bias", pair.attn_bias.numpy())], "biased_t")
        if pair.bounded:
            logits = step("Tanh", [logits], "bounded_t")
        attn = step("Softmax", [logits], "attn_t", axis=-1)  # [N, D]
        gates = step("Gemm", [step("Concat", [attn, "h_in"], "attn_h", axis=1), step_weight,
                              step("Gather", ["gates_words", "t"], "gates_words_t", axis=1)], "gates_t")  # [N, 4H]
        i, f, g, o = step("Split", [gates], ["gate_i", "gate_f", "gate_g", "gate_o"], axis=1)  # nn.LSTM's gate order
        c = step("Add", [step("Mul", [step("Sigmoid", [f], "sig_f"), "c_in"], "fc"),
                         step("Mul", [step("Sigmoid", [i], "sig_i"), step("Tanh", [g], "tanh_g")], "ig")], "c_out")
        step("Mul", [step("Sigmoid", [o], "sig_o"), step("Tanh", [c], "tanh_c")], "h_out")
        step("Identity", ["cond_in"], "cond_out")
        step("Identity", ["h_out"], "h_scan")
        value = lambda name, dtype: helper.make_tensor_value_info(name, dtype, None)  # noqa: E731
        loop_body = helper.make_graph(
            body, "w2r_step", [helper.make_tensor_value_info("t", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                               value("h_in", TensorProto.FLOAT), value("c_in", TensorProto.FLOAT)],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), value("h_out", TensorProto.FLOAT), value("c_out", TensorProto.FLOAT),
             value("h_scan", TensorProto.FLOAT)])
        nodes.append(helper.make_node("Loop", [steps, "", h0, h0], ["h_last", "c_last", "h_all"], name="recurrence", body=loop_body))
        # h of each caption's last real step: row (length - 1) * N + n of h_all [steps * N, H]
        n = node("Squeeze", [count, axis0], "n")
        rows = node("Add", [node("Mul", [node("Sub", ["lengths", one], "last"), n], "last_block"),
                            node("Range", [const("start", np.array(0, np.int64)), n, one], "caption_rows")], "last_rows")
        h = node("Gather", [node("Reshape", ["h_all", const("flat_h", np.array([-1, hidden], np.int64))], "h_flat"), rows],
                 "h", axis=0)  # [N, H]
        for k in range(pair.mlp.depth):
            weight_t, bias_k = pair.mlp.layer(k)
            if k:
                h = node("Tanh", [h], f"mlp_tanh{k}")
            h = node("Gemm", [h, const(f"mlp_weight{k}", weight_t.contiguous().numpy()), const(f"mlp_bias{k}", bias_k.numpy())],
                     f"mlp{k}")
        node("Reshape", [h, const("flat", np.array([-1], np.int64))], "scores")
        f32 = TensorProto.FLOAT
        graph = helper.make_graph(nodes, "w2r_grid", [
            helper.make_tensor_value_info("regions_attn", f32, None), helper.make_tensor_value_info("regions_values", f32, None),
            helper.make_tensor_value_info("words", f32, None), helper.make_tensor_value_info("gates_words", f32, None),
            helper.make_tensor_value_info("lengths", TensorProto.INT64, None)],
            [helper.make_tensor_value_info("scores", f32, None)], initializer=inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


class O2WGrid(nn.Module):
    """o2w_grid: the one-image case of O2WPair without gathers (traced: no loop). The logits are one GEMM
    [N*L, H2] x [H2, P]; padding words are masked out of the softmax over words."""

    def __init__(self, pair: O2WPair):
        super().__init__()
        self.pair = pair

    def forward(self, objects_attn: Tensor, objects_mlp: Tensor, states: Tensor, lengths: Tensor) -> Tensor:
        pair = self.pair
        n, length, hidden = states.shape
        logits = (states.reshape(n * length, hidden) @ objects_attn[0].t()).reshape(n, length, -1).transpose(1, 2)  # [N, P, L]
        logits = logits + pair.attn_bias
        logits = torch.tanh(logits) if pair.bounded else logits
        real = torch.arange(length, device=states.device)[None, :] < lengths[:, None]  # [N, L]
        attn = torch.softmax(logits.masked_fill(~real[:, None, :], float("-inf")), dim=-1)  # [N, P, L]
        z = objects_mlp[0] + (attn @ states) @ pair.first_states_t  # [N, P, h1]
        return pair.mlp.continue_from_first(z).mean(dim=1).float()


# ---------------------------------------------------------------------------------------------
# Shortlist (the dual-encoder baseline: training/baseline.py)


class ShortlistImage(nn.Module):
    def __init__(self, baseline: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.encoder = copy.deepcopy(baseline).to(dtype).eval()

    def forward(self, regions: Tensor, objects: Tensor) -> Tensor:
        vectors = self.encoder.encode_images(regions, objects).float()
        # a first-stage hubness correction (training.hubness) folds into the vectors, in fp32: [K] -> [K + 2]
        return vectors if self.encoder.hubness is None else self.encoder.hubness.images(vectors)


class ShortlistText(nn.Module):
    def __init__(self, baseline: nn.Module, dtype: torch.dtype, recurrence_fp32: bool):
        super().__init__()
        self.dtype = dtype
        self.recurrence_dtype = torch.float32 if recurrence_fp32 else dtype
        self.encoder = copy.deepcopy(baseline).to(self.recurrence_dtype).eval()

    def forward(self, words: Tensor, lengths: Tensor) -> Tensor:
        vectors = self.encoder.encode_texts(words.to(self.recurrence_dtype), lengths).float()
        return vectors if self.encoder.hubness is None else self.encoder.hubness.texts(vectors)


def build_graph_modules(model: BSSAN, dtype: torch.dtype = torch.float32, recurrence_fp32: bool = True,
                        shortlist: nn.Module | None = None, grid: bool = True) -> dict[str, nn.Module]:
    """{graph name: eval-mode module} for the model's branches (and the shortlist encoders of a
    DualEncoder `shortlist`), ready to trace. `recurrence_fp32` only matters when dtype is float16.
    `grid`: also the grid graphs' modules (w2r_grid, o2w_grid; fp32 only: engine.graphs.GRID_PRECISIONS)."""
    if model.config.w2r_readout != "last":
        raise InputError(f"w2r_readout {model.config.w2r_readout!r}: the graphs and the kernels implement the paper's "
                         f"'last' readout only; evaluate this model with training.evaluate")
    if model.config.w2r_regions != "grid":
        raise InputError(f"w2r_regions {model.config.w2r_regions!r}: the graphs and the kernels implement the paper's "
                         f"'grid' regions only; evaluate this model with training.evaluate")
    modules: dict[str, nn.Module] = {}
    model = model.folded()  # input scales and attention temperatures moved into the weights: no extra graph ops
    with torch.no_grad():
        if model.w2r is not None:
            modules["w2r_image"] = W2RImage(model, dtype)
            modules["w2r_text"] = W2RText(model, dtype)
            modules["w2r_pair"] = W2RPair(model, dtype, recurrence_fp32)
            if grid and dtype == torch.float32:
                modules["w2r_grid"] = W2RGrid(modules["w2r_pair"])
        if model.o2w is not None:
            modules["o2w_image"] = O2WImage(model, dtype)
            modules["o2w_text"] = O2WText(model, dtype, recurrence_fp32)
            modules["o2w_pair"] = O2WPair(model, dtype)
            if grid and dtype == torch.float32:
                modules["o2w_grid"] = O2WGrid(modules["o2w_pair"])
        if shortlist is not None:
            modules["shortlist_image"] = ShortlistImage(shortlist, dtype)
            modules["shortlist_text"] = ShortlistText(shortlist, dtype, recurrence_fp32)
    return {name: module.eval() for name, module in modules.items()}


def graph_dims(model: BSSAN, shortlist: nn.Module | None = None) -> dict[str, int]:
    """manifest["dims"]: the static sizes of engine.graphs.STATIC_DIMS for this model."""
    c = model.config
    dims = {"region_count": c.region_count, "region_dim": c.region_dim, "object_count": c.object_count,
            "object_dim": c.object_dim, "word_dim": c.word_dim, "max_words": c.max_words}
    if model.w2r is not None:
        dims["w2r_gates"] = 4 * c.w2r_hidden
        dims["w2r_values"] = 4 * c.w2r_hidden if model.w2r.pair_gathers_gates else c.region_dim
    if model.o2w is not None:
        dims["o2w_hidden"] = c.o2w_hidden
        dims["o2w_first"] = c.o2w_mlp[0]
    if shortlist is not None:
        dims["shortlist_dim"] = shortlist.config.embed_dim + (2 if getattr(shortlist, "hubness", None) is not None else 0)
    return dims
