"""Checkpoint -> artifact directory: ONNX graphs per precision, validation, manifest, TensorRT plans.

    from export.pipeline import ExportOptions, export_artifact
    export_artifact(ExportOptions(model_dir=Path("runs/f8k/best"), out=Path("artifacts/f8k"), precisions=("fp32", "int8")))
    python -m export MODEL_DIR --out ARTIFACT_DIR [--precision fp32 fp16 int8] [--shortlist DIR] [--tensorrt auto|off|on]

Steps (a tqdm bar counts them): load the checkpoint(s) -> fp32 graphs, checked against the
declaration (export/onnx_export.py) and against the torch model (export/validate.py, tolerance
PARITY_TOLERANCE, else ArtifactError) -> fp16 graphs, the recurrence kept in fp32 or not per
graph by measurement (export/precision.py) -> int8 pair graphs (dynamic quantization of the
recurrence) with their score error -> feature-backbone assets copied in -> manifest.json with
every file's sha256 -> TensorRT plans (export/tensorrt.py) when asked for or available.
Everything is written into a sibling temp directory that replaces --out in one rename; an
existing --out is replaced only if it is an artifact (manifest.json of format bssan-artifact).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from engine.artifact import ARTIFACT_FORMAT, MANIFEST_NAME, TENSORRT_DIR, file_entry, load_artifact
from engine.assets import add_fingerprints
from engine.errors import ArtifactError, BackendUnavailableError, InputError
from engine.files import package_versions, remove_dead_temps, replace_directory
from engine.manifest import ArtifactManifest, ModelRecord
from engine.ranking import BSSAN_ALONE, Fusion
from engine.graphs import GRAPHS, PRECISIONS, graph_file
from engine.text import DEFAULT_ASSETS_DIR
from export.graphs import build_graph_modules, graph_dims
from export.onnx_export import EXPORTER, OPSET, export_graph
from export.torch_runner import checkpoint_record
from export.precision import DEFAULT_INT8_SCOPE, FP16_RECURRENCE_SLACK, compare_scores, quantize_pair_graph
from export.validate import (
    PARITY_TOLERANCE, onnx_pipeline, open_session, pipeline_parity, random_features, shuffled_grid, torch_threads, validate_bssan,
)

RECURRENT_GRAPHS = {"w2r_pair": "pipeline.w2r", "o2w_text": "pipeline.o2w", "shortlist_text": "shortlist.text_vectors"}
INT8_CHECK_CAPTIONS = 64  # captions of the random 1-image grid on which int8 scores are compared with fp32
LIBRARIES = ("torch", "onnx", "onnxruntime", "numpy", "bssan-engine")


@dataclass
class ExportOptions:
    model_dir: Path
    out: Path
    precisions: tuple[str, ...] = ("fp32",)
    shortlist_dir: Path | None = None
    tensorrt: str = "auto"  # auto | off | on
    assets_dir: Path | None = DEFAULT_ASSETS_DIR  # feature backbones to copy in, when present
    store: Path | None = None  # feature store for the real-feature parity case (default: the checkpoint's)
    int8_scope: str = DEFAULT_INT8_SCOPE
    progress: bool = True


def _versions() -> dict:
    return {"python": platform.python_version(), **package_versions(LIBRARIES)}


def _load_models(options: ExportOptions):
    from training.checkpoint import ModelKind, load_checkpoint

    checkpoint = load_checkpoint(options.model_dir)
    if checkpoint.kind is not ModelKind.BSSAN:
        raise ArtifactError(f"{options.model_dir}: a {checkpoint.kind.value} checkpoint; expected a BSSAN checkpoint "
                            f"(a dual encoder is exported with --shortlist DIR)")
    shortlist = None
    if options.shortlist_dir is not None:
        shortlist_ckpt = load_checkpoint(options.shortlist_dir)
        if shortlist_ckpt.kind is not ModelKind.DUAL_ENCODER:
            raise ArtifactError(f"{options.shortlist_dir}: a {shortlist_ckpt.kind.value} checkpoint; expected a dual_encoder for --shortlist")
        shortlist = shortlist_ckpt.model
        for name in ("region_count", "region_dim", "object_count", "object_dim", "word_dim"):
            mine, theirs = getattr(checkpoint.model_config, name), getattr(shortlist_ckpt.model_config, name)
            if mine != theirs:
                raise InputError(f"{options.shortlist_dir}: shortlist {name} {theirs}, but the BSSAN model has {mine}; "
                                 f"expected both trained on the same features")
    return checkpoint, shortlist


def read_fusion(model_dir: Path, shortlist_dir: Path | None) -> Fusion:
    """The fusion weights of MODEL_DIR/fusion.json (written when fusion was tuned against a dual encoder):
    {"first_stage_weight", "bssan_weight", "first_stage_sha256": sha256 of that dual encoder's weights file}.
    It binds the BSSAN model to THAT first stage: export needs --shortlist with the same weights.
    No fusion.json: BSSAN alone (0, 1)."""
    from training.checkpoint import FUSION, first_stage_sha256, read_fusion as read_fusion_record

    path = Path(model_dir) / FUSION
    try:
        recorded = read_fusion_record(model_dir)
    except InputError as exc:
        raise ArtifactError(str(exc)) from None
    if recorded is None:
        return BSSAN_ALONE
    fusion, want = recorded
    if shortlist_dir is None:
        raise ArtifactError(f"{path}: fusion weights tuned with a first stage ({want[:12]}); expected --shortlist "
                            f"with that dual-encoder checkpoint")
    got = first_stage_sha256(shortlist_dir)
    if got != want:
        raise ArtifactError(f"{path}: first_stage_sha256 {want[:12]} differs from --shortlist {shortlist_dir} ({got[:12]}); "
                            f"expected the dual encoder the fusion was tuned with")
    return fusion


def attention_record(model, shortlist=None) -> tuple[dict[str, float], str]:
    """({"w2r": b, "o2w": b'}, form) exactly as the pair graphs hold them (engine/attention.py reads these)."""
    modules = build_graph_modules(model, torch.float32, True, shortlist)
    pair = {b: modules[f"{b}_pair"] for b in ("w2r", "o2w") if f"{b}_pair" in modules}
    biases = {b: float(m.attn_bias.reshape(-1)[0]) for b, m in pair.items()}
    bounded = {getattr(m, "bounded", True) for m in pair.values()}
    return biases, "tanh" if bounded != {False} else "scaled"


def _store_case(options: ExportOptions, checkpoint) -> dict | None:
    root = options.store or (checkpoint.store_info or {}).get("root")
    if root and (Path(root) / "manifest.json").is_file() and (Path(root) / "test").is_dir():
        return {"root": str(root), "word_set": checkpoint.train_config.word_set}
    return None


def _export_precision(model, shortlist, dims, graphs_dir: Path, precision: str, recurrence_fp32: bool,
                      store: dict | None, tolerance: float | None) -> tuple[dict, dict]:
    dtype = torch.float16 if precision == "fp16" else torch.float32
    modules = build_graph_modules(model, dtype, recurrence_fp32, shortlist)
    paths = {name: export_graph(module, name, dims, graphs_dir / Path(graph_file(name, precision)).name, precision)
             for name, module in modules.items()}
    report = validate_bssan(model, modules, paths, dims, precision, tolerance, store, shortlist)
    return paths, report


def _choose_fp16(model, shortlist, dims, work: Path, store: dict | None) -> tuple[dict, dict]:
    """Export fp16 with the recurrence in fp32 and in fp16; per recurrent graph keep the fp16
    recurrence only if its error is within FP16_RECURRENCE_SLACK x the fp32-recurrence one."""
    mixed_paths, mixed = _export_precision(model, shortlist, dims, work / "fp16-recurrence-fp32", "fp16", True, store, None)
    pure_paths, pure = _export_precision(model, shortlist, dims, work / "fp16-recurrence-fp16", "fp16", False, store, None)
    chosen, decisions = dict(mixed_paths), {}
    for name, figure in RECURRENT_GRAPHS.items():
        if name not in mixed_paths:
            continue
        err_mixed, err_pure = mixed["worst"][figure], pure["worst"][figure]
        keep_fp16 = err_pure <= FP16_RECURRENCE_SLACK * max(err_mixed, 1e-7)
        chosen[name] = pure_paths[name] if keep_fp16 else mixed_paths[name]
        decisions[name] = {"recurrence": "fp16" if keep_fp16 else "fp32", "max_abs_diff_recurrence_fp32": err_mixed,
                           "max_abs_diff_recurrence_fp16": err_pure, "figure": figure}
    return chosen, {"decisions": decisions, "recurrence_fp32": mixed, "recurrence_fp16": pure}


def _int8(model, dims, fp32_paths: dict, graphs_dir: Path, scope: str) -> tuple[dict, dict]:
    """Quantize every pair graph that has weights in `scope`; score error vs fp32 on random features."""
    paths, report = {}, {"scope": scope, "graphs": {}}
    for name in [n for n in fp32_paths if GRAPHS[n].stage == "pair"]:
        target = graphs_dir / Path(graph_file(name, "int8")).name
        nodes = quantize_pair_graph(fp32_paths[name], target, scope)
        report["graphs"][name] = {"quantized_nodes": nodes}
        if nodes:
            paths[name] = target
    if paths:
        sessions = {n: open_session(p) for n, p in fp32_paths.items()}
        int8_sessions = {**sessions, **{n: open_session(p) for n, p in paths.items()}}
        features = random_features(model, 1, INT8_CHECK_CAPTIONS, dims["max_words"], seed=1)
        report["pipeline_vs_reference"] = pipeline_parity(model, int8_sessions, features, seed=1)
        pairs = shuffled_grid(1, INT8_CHECK_CAPTIONS, seed=1)
        reference = onnx_pipeline(sessions, *features, pairs)
        quantized = onnx_pipeline(int8_sessions, *features, pairs)
        for name in paths:
            branch = GRAPHS[name].branch
            report["graphs"][name].update(compare_scores(reference[branch][None], quantized[branch][None]))
    return paths, report


def _copy_assets(assets_dir: Path | None, target: Path) -> dict:
    """Copy each `<stem>.json` asset manifest of export.backbones / export.text and its graph."""
    assets = {}
    if assets_dir is None or not Path(assets_dir).is_dir():
        return assets
    for manifest_path in sorted(Path(assets_dir).glob("*.json")):
        try:
            info = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        graph = manifest_path.parent / str(info.get("graph", manifest_path.stem + ".onnx"))
        if not isinstance(info, dict) or not graph.is_file():
            continue
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(graph, target / graph.name)
        shutil.copy2(manifest_path, target / manifest_path.name)
        assets[manifest_path.stem] = {"graph": f"assets/{graph.name}", "manifest": f"assets/{manifest_path.name}",
                                      "kind": info.get("kind")}
    return assets


def _is_artifact(directory: Path) -> bool:
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == ARTIFACT_FORMAT


def _check_out(out: Path) -> None:
    """An existing --out must be an artifact directory (replaced) or empty; anything else is the user's."""
    if out.exists() and (not out.is_dir() or (not _is_artifact(out) and any(out.iterdir()))):
        raise ArtifactError(f"{out}: exists and is not an artifact directory; expected a new or artifact directory for --out")


def _publish(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` in one rename (engine.files.replace_directory)."""
    _check_out(out)
    replace_directory(tmp, out)


def export_artifact(options: ExportOptions) -> dict:
    """Write the artifact directory; returns its manifest. Raises ArtifactError/InputError/BackendUnavailableError."""
    with torch_threads():  # tracing and parity models are small: 1 thread (restored after)
        return _export_artifact(options)


def _export_artifact(options: ExportOptions) -> dict:
    unknown = sorted(set(options.precisions) - set(PRECISIONS))
    if unknown or "fp32" not in options.precisions:
        raise InputError(f"--precision {list(options.precisions)}: expected fp32 plus any of {list(PRECISIONS[1:])}")
    if options.tensorrt not in ("auto", "off", "on"):
        raise InputError(f"--tensorrt {options.tensorrt!r}: expected auto, off or on")
    out = Path(options.out)
    _check_out(out)
    if options.tensorrt == "on":  # fail before minutes of export, not after
        from export.tensorrt import tensorrt_available

        available, reason = tensorrt_available()
        if not available:
            raise BackendUnavailableError(f"--tensorrt on: {reason}; install bssan-engine[trt] on a CUDA host, or use --tensorrt auto|off")
    steps = ["load", "fp32", *[p for p in ("fp16", "int8") if p in options.precisions], "manifest", "tensorrt"]
    bar = tqdm(total=len(steps), desc="export", unit="step", disable=not options.progress)
    checkpoint, shortlist = _load_models(options)
    fusion = read_fusion(options.model_dir, options.shortlist_dir)  # fails before minutes of export, not after
    model = checkpoint.model.float().eval()
    dims = graph_dims(model, shortlist)
    store = _store_case(options, checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(out)  # the work folder of an export killed mid-way (hundreds of MB)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    graphs_dir = tmp / "graphs"
    try:
        bar.update(1)
        bar.set_postfix_str("fp32 graphs + parity")
        fp32_paths, fp32_report = _export_precision(model, shortlist, dims, graphs_dir, "fp32", True, store, PARITY_TOLERANCE)
        variants = {name: {"fp32": path} for name, path in fp32_paths.items()}
        validation = {"fp32": fp32_report}
        bar.update(1)
        if "fp16" in options.precisions:
            bar.set_postfix_str("fp16 graphs, both recurrence choices")
            chosen, fp16_report = _choose_fp16(model, shortlist, dims, tmp / "work", store)
            for name, path in chosen.items():
                final = graphs_dir / Path(graph_file(name, "fp16")).name
                shutil.copy2(path, final)
                variants[name]["fp16"] = final
            validation["fp16"] = fp16_report
            shutil.rmtree(tmp / "work")
            bar.update(1)
        if "int8" in options.precisions:
            bar.set_postfix_str("int8 pair graphs")
            int8_paths, validation["int8"] = _int8(model, dims, fp32_paths, graphs_dir, options.int8_scope)
            for name, path in int8_paths.items():
                variants[name]["int8"] = path
            bar.update(1)
        bar.set_postfix_str("manifest")
        assets = _copy_assets(options.assets_dir, tmp / "assets")
        hub = None
        if model.hub is not None:  # the image hub correction chosen on dev (engine/hub.py), as the checkpoint has it
            from engine.hub import HUB_BANK

            shutil.copyfile(Path(options.model_dir) / HUB_BANK, tmp / HUB_BANK)
            hub = {"file": HUB_BANK, "k": model.hub.k, "beta": model.hub.beta, "captions": len(model.hub)}
        (tmp / "validation.json").write_text(json.dumps(validation, indent=2) + "\n", encoding="utf-8")
        files = {str(p.relative_to(tmp)): file_entry(p) for p in sorted(tmp.rglob("*"))
                 if p.is_file() and p.name != MANIFEST_NAME and TENSORRT_DIR not in p.relative_to(tmp).parts}
        w_y, w_yp = model.scoring_weights
        biases, form = attention_record(model, shortlist)
        manifest = ArtifactManifest(
            created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            model=ModelRecord(
                config=model.config.to_dict(), score_weights={"w2r": w_y, "o2w": w_yp}, attention_biases=biases,
                attention_form=form, hub=hub, checkpoint=checkpoint_record(options.model_dir),
                shortlist_checkpoint=checkpoint_record(options.shortlist_dir) if options.shortlist_dir else None,
                shortlist_config=shortlist.config.to_dict() if shortlist is not None else None,
                metrics=checkpoint.metrics, provenance=checkpoint.provenance),
            dims=dims,
            w2r_values=("gates" if model.w2r.pair_gathers_gates else "regions") if model.w2r is not None else None,
            precisions=tuple(p for p in PRECISIONS if p in options.precisions),
            graphs={name: {prec: {"file": str(path.relative_to(tmp))} for prec, path in per.items()}
                    for name, per in variants.items()},
            parity_max_abs_diff={prec: report.get("worst") for prec, report in
                                 (("fp32", fp32_report), ("fp16", validation.get("fp16", {}).get("recurrence_fp32", {})))
                                 if report},
            fp16_recurrence={n: d["recurrence"] for n, d in validation.get("fp16", {}).get("decisions", {}).items()},
            int8_scope=options.int8_scope if "int8" in options.precisions else None,
            files=files,
            fusion=fusion,
            preprocessing=add_fingerprints((checkpoint.store_info or {}).get("extractor"),
                                           [Path(options.assets_dir)] if options.assets_dir else []),
            word_features=checkpoint.word_features,
            assets=assets,
            exporter={"opset": OPSET, "exporter": EXPORTER, "parity_tolerance": PARITY_TOLERANCE, "versions": _versions()},
            tensorrt={"status": "not built"},
        ).sealed()  # manifest_sha256: a later hand edit is refused at load
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        load_artifact(tmp)  # what the engine will do: hashes, versions, ONNX structure
        bar.update(1)
        bar.set_postfix_str("tensorrt")
        manifest["tensorrt"] = _tensorrt(tmp, options.tensorrt)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        bar.update(1)
        _publish(tmp, out)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _tensorrt(root: Path, mode: str) -> dict:
    """Build TensorRT plans into root/tensorrt when asked (on) or possible (auto)."""
    from export.tensorrt import build_artifact_engines, tensorrt_available

    if mode == "off":
        return {"status": "off"}
    available, reason = tensorrt_available()
    if not available:
        if mode == "on":
            raise BackendUnavailableError(f"--tensorrt on: {reason}; install bssan-engine[trt] on a CUDA host, or use --tensorrt auto|off")
        return {"status": f"skipped: {reason}"}
    return {"status": "built", **build_artifact_engines(load_artifact(root))}
