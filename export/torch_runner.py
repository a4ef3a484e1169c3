"""The torch reference backend: the checkpoint an artifact was exported from, run as the very torch
modules the exporter traces (export/graphs.py), behind the engine's Runner surface.

It lives with the exporter, not in engine/ (the engine never imports torch, training or export):
the engine finds it through the entry point `torch` of the group `bssan_engine.backends`
(pyproject.toml), so `Scorer.load(ARTIFACT, backend="torch", checkpoint=DIR)` and
`open_runner(artifact, "torch", checkpoint=DIR)` work where the train extra is installed.

The artifact records its checkpoints by the sha256 of their weights file (manifest
model.checkpoint / model.shortlist_checkpoint), not by a path on the exporting machine: pass the
directories, and a checkpoint whose weights differ from the recorded ones is refused.

    from export.torch_runner import TorchRunner
    with TorchRunner(load_artifact(path), checkpoint="runs/full/best", shortlist_checkpoint="runs/dual/best") as runner: ...
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.backends.base import INSTALL, Backend, Runner
from engine.errors import ArtifactError, BackendUnavailableError
from engine.files import file_sha256
from engine.graphs import GRAPHS


def checkpoint_record(directory: str | Path) -> dict:
    """What an artifact records of a checkpoint: the sha256 of its weights file and its folder name (and of a
    first stage's hubness correction, with its betas, when the checkpoint has one: training.hubness; the
    branch weights of eq. 19 chosen on dev, when a BSSAN checkpoint has them: SCORE_WEIGHTS; the sha256 of its
    hub bank and fusion record when it has them), so quickstart.sh re-exports when any of them changed."""
    from training.checkpoint import FUSION, HUB_BANK, HUBNESS, SCORE_WEIGHTS, WEIGHTS, read_score_weights

    directory = Path(directory)
    record = {"weights_sha256": file_sha256(directory / WEIGHTS), "name": directory.resolve().name}
    if (directory / SCORE_WEIGHTS).is_file():
        record["score_weights"] = list(read_score_weights(directory))
    for key, name in (("hub_bank_sha256", HUB_BANK), ("fusion_sha256", FUSION)):  # what else the export reads from it
        if (directory / name).is_file():
            record[key] = file_sha256(directory / name)
    if (directory / HUBNESS).is_file():
        from training.hubness import HubnessCorrection
        record.update(hubness_sha256=file_sha256(directory / HUBNESS), hubness=HubnessCorrection.load(directory / HUBNESS).record())
    return record


def _checkpoint_dir(given, recorded: dict | None, legacy_path: str | None, what: str) -> Path:
    """The checkpoint directory to load: `given`, else the path an older manifest recorded; its
    weights must hash to the recorded sha256."""
    from training.checkpoint import WEIGHTS

    source = Path(given) if given is not None else Path(legacy_path) if legacy_path else None
    sha = (recorded or {}).get("weights_sha256")
    if source is None or not source.is_dir():
        raise BackendUnavailableError(f"torch backend: {what} {str(source) if source else None!r} not found; expected the "
                                      f"checkpoint directory the artifact was exported from (weights sha256 {str(sha)[:12]}; "
                                      f"pass {'checkpoint' if what == 'checkpoint' else 'shortlist_checkpoint'}=DIR)")
    if sha and (source / WEIGHTS).is_file() and file_sha256(source / WEIGHTS) != sha:
        raise ArtifactError(f"{source / WEIGHTS}: sha256 differs from the {what} the artifact was exported from "
                            f"({sha[:12]}); expected the same checkpoint")
    return source


class TorchRunner(Runner):
    """The checkpoint the artifact came from (`checkpoint=`), as the torch modules the exporter
    traces. fp32 or fp16; CPU, or CUDA when torch sees a GPU and `device="cuda"`.
    `threads` sets torch's intra-op threads, which is process-wide in torch."""

    backend = Backend.TORCH

    def __init__(self, artifact, precision: str = "fp32", threads: int | None = None,
                 checkpoint: str | Path | None = None, shortlist_checkpoint: str | Path | None = None, device: str = "cpu"):
        if precision == "int8":
            raise BackendUnavailableError("torch backend: precision int8 is ONNX Runtime dynamic quantization; "
                                          "expected fp32 or fp16 (or --backend onnxruntime-cpu for int8)")
        super().__init__(artifact, precision, threads)
        try:
            import torch

            from export.graphs import build_graph_modules
            from training.checkpoint import load_checkpoint
        except ImportError as exc:
            raise BackendUnavailableError(f"torch backend: {exc}; {INSTALL[Backend.TORCH]}") from None
        if threads is not None:
            torch.set_num_threads(threads)
        model_info = artifact.manifest["model"]
        source = _checkpoint_dir(checkpoint, model_info.get("checkpoint"), model_info.get("source"), "checkpoint")
        model = load_checkpoint(source).model
        shortlist = None
        if any(GRAPHS[n].branch == "shortlist" for n in self.precisions):
            shortlist_source = _checkpoint_dir(shortlist_checkpoint, model_info.get("shortlist_checkpoint"),
                                               model_info.get("shortlist_source"), "shortlist checkpoint")
            shortlist = load_checkpoint(shortlist_source).model
        self.torch, self.device = torch, torch.device(device)
        dtype = torch.float16 if precision == "fp16" else torch.float32
        modules = build_graph_modules(model, dtype, recurrence_fp32=True, shortlist=shortlist)
        self.modules = {name: module.to(self.device) for name, module in modules.items() if name in self.precisions}
        missing = sorted(set(self.precisions) - set(self.modules))
        if missing:
            raise ArtifactError(f"{source}: the checkpoint builds no module for graph(s) {missing} of {artifact.root}")

    def close(self) -> None:
        self.modules = {}
        super().close()

    def _infer(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, spec = self.torch, GRAPHS[name]
        with torch.no_grad():
            args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in spec.input_names]
            out = self.modules[name](*args)
        out = out if isinstance(out, tuple) else (out,)
        return {t.name: o.cpu().numpy().astype(t.numpy_dtype(self.precisions[name]), copy=False) for t, o in zip(spec.outputs, out)}
