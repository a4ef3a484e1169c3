"""torch module -> ONNX file for each graph of engine/graphs.py, with its declared I/O asserted.

    from export.onnx_export import export_graph, check_graph_io
    export_graph(module, "w2r_pair", dims, Path("graphs/w2r_pair.fp32.onnx"), "fp32")

Uses the legacy TorchScript exporter (dynamo=False) at opset 17: one native LSTM node for the
Bi-LSTM with dynamic batch and length, and the scripted W2R recurrence becomes one Loop node.
The dynamo exporter silently freezes the LSTM time axis from the second export in a process
(ARCHITECTURE.md, "Export facts"), so every written graph is re-read and its inputs, outputs,
dtypes and dims are compared with the declaration: a frozen dynamic axis is an error here,
not a wrong answer at run time.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.errors import ArtifactError
from engine.graphs import DYNAMIC_AXES, GRAPHS, GraphSpec

OPSET = 17  # what every graph of export/ uses; LSTM sequence_lens and Loop are stable since opset 11-13
EXPORTER = "torch.onnx.export, TorchScript-based (dynamo=False)"
# Sizes of the tracing inputs: all > 1 and different from each other, so that no dynamic axis
# is specialised to 1 (broadcast) or confused with another axis of the same size.
TRACE_SIZES = {"images": 3, "captions": 4, "pairs": 5}

_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64"}
# The legacy exporter has no shape inference for the packed sequences of the Bi-LSTM (O2W text
# graph) and says so from C++, one line per pack/unpack per export (a page for an fp32+fp16 export).
# Harmless here: every written graph's shapes are asserted against the declaration (check_graph_io)
# and its outputs against torch (export/validate.py). Only these lines are dropped.
SHAPE_INFERENCE_NOISE = ("The shape inference of prim::PackPadded type is missing",
                         "The shape inference of prim::PadPacked type is missing")


@contextlib.contextmanager
def drop_native_warnings(needles: tuple[str, ...] = SHAPE_INFERENCE_NOISE):
    """Capture what C++ code writes to file descriptor 2 during the block; write back every line
    that contains none of `needles`. (These warnings bypass Python's `warnings` and sys.stderr.)"""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(True)
                    if not any(needle in line for needle in needles)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def example_inputs(spec: GraphSpec, dims: dict[str, int], precision: str, sizes: dict[str, int] | None = None,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs that satisfy `spec`: floats N(0, 1), lengths in [1, words] with one equal to
    words, pair indices inside their rows. `sizes` sets the dynamic axes (default TRACE_SIZES, words = max_words)."""
    rng = np.random.default_rng(seed)
    sizes = {**TRACE_SIZES, "words": dims["max_words"], **(sizes or {})}
    feeds = {}
    for tensor in spec.inputs:
        shape = tuple(sizes[d] if d in DYNAMIC_AXES else d if isinstance(d, int) else dims[d] for d in tensor.dims)
        dtype = tensor.numpy_dtype(precision)
        if tensor.name == "lengths":
            lengths = rng.integers(1, sizes["words"] + 1, size=shape)
            lengths[rng.integers(shape[0])] = sizes["words"]
            feeds[tensor.name] = lengths.astype(dtype)
        elif tensor.name == "pairs":
            feeds[tensor.name] = np.stack([rng.integers(sizes["images"], size=shape[0]),
                                           rng.integers(sizes["captions"], size=shape[0])], axis=1).astype(dtype)
        else:
            feeds[tensor.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _dims_of(value_info) -> list[str | int]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else "?"
            for d in value_info.type.tensor_type.shape.dim]


def check_graph_io(path: Path, spec: GraphSpec, dims: dict[str, int], precision: str) -> None:
    """The ONNX file's inputs and outputs are exactly the declaration's: names in order, dtypes,
    every dynamic axis a symbolic dim with the declared name, every static dim its size."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    actual = {"inputs": [v for v in model.graph.input if v.name not in initializers], "outputs": list(model.graph.output)}
    for kind, declared in (("inputs", spec.inputs), ("outputs", spec.outputs)):
        names = [v.name for v in actual[kind]]
        if names != [t.name for t in declared]:
            raise ArtifactError(f"{path}: {kind} {names}; expected {[t.name for t in declared]} (engine/graphs.py)")
        for value, tensor in zip(actual[kind], declared):
            dtype = _ONNX_DTYPES.get(value.type.tensor_type.elem_type, str(value.type.tensor_type.elem_type))
            want_dtype = str(tensor.numpy_dtype(precision))
            if dtype != want_dtype:
                raise ArtifactError(f"{path}: {tensor.name} has dtype {dtype}; expected {want_dtype}")
            got, want = _dims_of(value), list(tensor.shape(dims))
            if got != want:
                raise ArtifactError(f"{path}: {tensor.name} has dims {got}; expected {want} (a frozen dynamic axis?)")


def export_graph(module: nn.Module, name: str, dims: dict[str, int], path: Path, precision: str) -> Path:
    """Trace `module` on example inputs, write `path` atomically (tmp + rename), check its I/O."""
    spec = GRAPHS[name]
    feeds = example_inputs(spec, dims, precision)
    args = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if hasattr(module, "onnx_model"):  # written node by node (export/graphs.py W2RGrid), not traced
            import onnx

            model = module.onnx_model(OPSET)
            _declare_io(model, spec, dims, precision)
            onnx.checker.check_model(model)
            onnx.save(model, str(tmp))
        else:
            with warnings.catch_warnings(), torch.no_grad(), drop_native_warnings():
                # TracerWarnings about Python ints from tensors concern the shapes we declare dynamic,
                # and check_graph_io below asserts that they are.
                warnings.simplefilter("ignore")
                torch.onnx.export(module, args, str(tmp), dynamo=False, opset_version=OPSET,
                                  input_names=spec.input_names, output_names=spec.output_names,
                                  dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)
        _complete_declaration(tmp, spec, dims, precision)
        check_graph_io(tmp, spec, dims, precision)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _declare_io(model, spec: GraphSpec, dims: dict[str, int], precision: str) -> None:
    """Types and shapes of a hand-written graph's inputs and outputs, from the declaration (names match already)."""
    from onnx import helper

    codes = {v: k for k, v in _ONNX_DTYPES.items()}
    for values, declared in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
        by_name = {t.name: t for t in declared}
        typed = [helper.make_tensor_value_info(v.name, codes[str(by_name[v.name].numpy_dtype(precision))],
                                               list(by_name[v.name].shape(dims))) for v in values]
        del values[:]
        values.extend(typed)


def _complete_declaration(path: Path, spec: GraphSpec, dims: dict[str, int], precision: str) -> None:
    """Two things the tracer leaves out, written back from the declaration:
    - an input the module never reads (e.g. `objects` of a dual encoder with use_objects=False)
      is dropped: put it back as an unused graph input, so every graph has its declared inputs;
    - a static output size its shape inference could not follow gets an invented name
      ("Castimage_vectors_dim_1"): write the declared size. Declared dynamic names are never touched,
      so check_graph_io still catches a frozen dynamic axis."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    for value in list(model.graph.input) + list(model.graph.output):
        declared = next((t for t in (*spec.inputs, *spec.outputs) if t.name == value.name), None)
        if declared is None:
            continue
        for dim, want in zip(value.type.tensor_type.shape.dim, declared.shape(dims)):
            if isinstance(want, int) and dim.HasField("dim_param") and dim.dim_param not in DYNAMIC_AXES:
                dim.dim_value = want
    present = [v.name for v in model.graph.input]
    missing = [t for t in spec.inputs if t.name not in present]
    if not missing:
        onnx.save(model, str(path))
        return
    codes = {v: k for k, v in _ONNX_DTYPES.items()}
    by_name = {v.name: v for v in model.graph.input}
    for tensor in missing:
        by_name[tensor.name] = helper.make_tensor_value_info(tensor.name, codes[str(tensor.numpy_dtype(precision))],
                                                            list(tensor.shape(dims)))
    ordered = [by_name[t.name] for t in spec.inputs] + [v for v in model.graph.input if v.name not in {t.name for t in spec.inputs}]
    del model.graph.input[:]
    model.graph.input.extend(ordered)
    onnx.save(model, str(path))
