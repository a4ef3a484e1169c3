"""Model checkpoints as directories: save, load, and the trainer's resume state.

    from training.checkpoint import save_checkpoint, load_checkpoint
    save_checkpoint(run / "best", model, train_config, store=FeatureStore(path), metrics={...})
    ckpt = load_checkpoint(run / "best")         # ckpt.model is in eval mode, fp32
    ckpt.kind, ckpt.model_config, ckpt.word_features["name"], ckpt.metrics["best_epoch"]
    copy_checkpoint(run / "best", "models/bssan-flickr8k", fp16=True)   # a reference model for the repo

A checkpoint directory holds:

    weights.pt           state_dict (torch.load(weights_only=True)); fp32, or fp16 with fp16=True
                         (loaded back as fp32), so a reference model fits in the repo
    config.json          {"format", "version", "kind": "bssan" | "dual_encoder",
                          "model": the model's config dict, "train": TrainConfig.to_dict()}
    word_features.json   {"name": word set, "description": its describe() as the store recorded it,
                          "splits": OOV counts per split}: which word vectors the model expects
    store.json           the store manifest's extractor section (backbones, preprocessing, grid),
                         its path and its splits' records
    metrics.json         dev metrics per epoch, best epoch, test metrics when evaluated
    provenance.json      git commit, dirty flag, command line, date, library versions
    train_state.pt       only in a trainer's resume checkpoint: optimizer, RNG states, position

Writes are atomic: everything goes to a sibling temp directory that is then renamed into
place; replacing an existing checkpoint renames it to `.<name>.old` first and deletes it after,
and a crash between the two renames is undone on the next save or load; the temp directory
of a save killed half-way is deleted by the next save. An existing directory
is replaced only if it is a checkpoint of the same kind and configs (the trainer updating
RUN_DIR/best) or `overwrite=True`; anything else is an ArtifactError.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.errors import ArtifactError, InputError
from engine.assets import add_fingerprints
from engine.files import file_sha256, package_versions, replace_directory, settle_directory, write_json_atomic
from engine.text import DEFAULT_ASSETS_DIR
from training.config import ModelConfig, TrainConfig

CHECKPOINT_FORMAT = "bssan-checkpoint"
CHECKPOINT_VERSION = 1
WEIGHTS, CONFIG, WORD_FEATURES, STORE, METRICS, PROVENANCE, TRAIN_STATE = (
    "weights.pt", "config.json", "word_features.json", "store.json", "metrics.json", "provenance.json", "train_state.pt")
REQUIRED = (WEIGHTS, CONFIG, WORD_FEATURES, STORE, METRICS, PROVENANCE)
REPO_ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "numpy", "onnxruntime", "bssan-engine")


class ModelKind(str, enum.Enum):
    BSSAN = "bssan"
    DUAL_ENCODER = "dual_encoder"


@dataclass
class Checkpoint:
    path: Path
    model: nn.Module  # eval mode, fp32, CPU
    kind: ModelKind
    model_config: Any  # ModelConfig (bssan) or DualEncoderConfig (dual_encoder)
    train_config: TrainConfig
    word_features: dict
    store_info: dict
    metrics: dict
    provenance: dict


# ---------------------------------------------------------------------------------------------
# Helpers


def kind_of(model: nn.Module) -> ModelKind:
    from training.model import BSSAN

    if isinstance(model, BSSAN):
        return ModelKind.BSSAN
    from training.baseline import DualEncoder

    if isinstance(model, DualEncoder):
        return ModelKind.DUAL_ENCODER
    raise InputError(f"model: expected a BSSAN or DualEncoder, got {type(model).__name__}")


def build_model(kind: ModelKind | str, model_config: dict) -> tuple[nn.Module, Any]:
    """A fresh model of `kind` from its config dict (strictly parsed)."""
    kind = ModelKind(kind)
    if kind is ModelKind.BSSAN:
        from training.model import BSSAN

        config = ModelConfig.from_dict(model_config)
        return BSSAN(config), config
    from training.baseline import DualEncoder, DualEncoderConfig

    config = DualEncoderConfig.from_dict(model_config)
    return DualEncoder(config), config


def _find_entry(tree: Any, name: str) -> Any:
    """The first value under key `name` (or dict whose "name" is `name`) in a nested manifest."""
    if isinstance(tree, dict):
        if name in tree:
            return tree[name]
        if tree.get("name") == name:
            return tree
        for value in tree.values():
            found = _find_entry(value, name)
            if found is not None:
                return found
    elif isinstance(tree, list):
        for value in tree:
            found = _find_entry(value, name)
            if found is not None:
                return found
    return None


def store_description(store: Any, word_set: str) -> tuple[dict, dict]:
    """(store.json, word_features.json) payloads from an engine.store.FeatureStore (or None).

    The word set's description is the `features` record that engine.features writes per split
    (manifest splits.<split>.word_sets.<name>: describe() of the word-feature set, OOV counts),
    taken from the train split; a store without one (older or synthetic) falls back to an entry
    of that name in the extractor section, else null."""
    if store is None:
        return {"extractor": None, "root": None, "splits": {}}, {"name": word_set, "description": None, "splits": {}}
    manifest = store.manifest
    extractor, splits = manifest.get("extractor"), manifest.get("splits", {})
    per_split = {name: spec["word_sets"][word_set] for name, spec in splits.items()
                 if isinstance(spec.get("word_sets"), dict) and word_set in spec["word_sets"]}
    first = per_split.get("train") or next(iter(per_split.values()), None)
    description = first.get("features") if isinstance(first, dict) else _find_entry(extractor, word_set)
    oov = {name: {k: entry[k] for k in ("oov_words", "words", "oov_rate") if k in entry} for name, entry in per_split.items()}
    return ({"extractor": extractor, "root": str(Path(store.root).resolve()), "splits": splits},
            {"name": word_set, "description": description, "splits": oov})


def provenance(command: list[str] | None = None) -> dict:
    """Git commit and dirty flag of the repo, the command line, date and library versions."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    versions = package_versions(LIBRARIES)
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "command": list(sys.argv if command is None else command),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "libraries": versions,
    }


def _write_json(path: Path, payload: Any) -> None:
    write_json_atomic(path, payload)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; expected a checkpoint file (written by training.train)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt JSON ({exc})") from exc


def _remove_stale_temps(directory: Path) -> None:
    """Delete temp dirs of earlier saves to `directory` whose process is gone (killed mid-save)."""
    for tmp in directory.parent.glob(f".{directory.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _same_checkpoint(directory: Path, config: dict) -> bool:
    try:
        existing = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return all(existing.get(k) == config[k] for k in ("kind", "model", "train"))


def _fp32(state: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# Save


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, train_config: TrainConfig, *,
                    store: Any = None, metrics: dict | None = None, fp16: bool = False,
                    train_state: dict | None = None, command: list[str] | None = None,
                    overwrite: bool = False) -> Path:
    """Write `model` as a checkpoint directory (atomically) and return its path.

    store: the engine.store.FeatureStore it was trained on (extractor and word-set records);
    metrics: the metrics.json payload; fp16: store weights as float16 (loaded back as fp32);
    train_state: the trainer's resume state (tensors, numbers, strings only), as train_state.pt;
    command: the command line for provenance.json (default sys.argv).
    """
    directory = Path(directory)
    kind = kind_of(model)
    config = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": kind.value,
              "model": model.config.to_dict(), "train": train_config.to_dict()}
    settle_directory(directory)
    if directory.exists() and not overwrite:
        if not directory.is_dir() or not _same_checkpoint(directory, config):
            raise ArtifactError(f"{directory}: exists and is not a checkpoint of the same kind and config; "
                                f"expected a new directory (or overwrite=True)")
    store_json, word_json = store_description(store, train_config.word_set)
    store_json["extractor"] = add_fingerprints(store_json["extractor"], [DEFAULT_ASSETS_DIR])  # engine/assets.py
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, tmp / WEIGHTS)
    _write_json(tmp / CONFIG, config)
    _write_json(tmp / WORD_FEATURES, word_json)
    _write_json(tmp / STORE, store_json)
    _write_json(tmp / METRICS, metrics or {})
    _write_json(tmp / PROVENANCE, provenance(command) | {"weights_dtype": "float16" if fp16 else "float32"})
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE)
    replace_directory(tmp, directory)  # fsynced first: the data reaches the disk before the rename publishes it
    return directory


def update_metrics(directory: str | os.PathLike, metrics: dict) -> None:
    """Merge `metrics` into a checkpoint's metrics.json (e.g. test metrics), atomically."""
    path = Path(directory) / METRICS
    merged = _read_json(path) | metrics
    write_json_atomic(path, merged)


def copy_checkpoint(source: str | os.PathLike, destination: str | os.PathLike, fp16: bool = False) -> Path:
    """Copy a checkpoint (e.g. RUN/best to models/<name>) without its resume state, optionally
    with fp16 weights. Its records are kept as they are (provenance keeps the training command)
    plus provenance "copied_from" and "weights_dtype"; `destination` must not exist."""
    source, destination = Path(source), Path(destination)
    ckpt = load_checkpoint(source)  # validates everything before anything is written
    if destination.exists():
        raise ArtifactError(f"{destination}: exists; expected a new directory to copy {source} into")
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(f".{destination.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = ckpt.model.state_dict()
    torch.save({k: v.half() if fp16 and v.is_floating_point() else v for k, v in state.items()}, tmp / WEIGHTS)
    for name in (CONFIG, WORD_FEATURES, METRICS):
        shutil.copyfile(source / name, tmp / name)
    if (source / HUBNESS).is_file():
        shutil.copyfile(source / HUBNESS, tmp / HUBNESS)
    # the features' graphs by sha256 and fingerprint: a published model must be usable where the graphs'
    # bytes differ (engine/assets.py); filled in from this machine's assets when the record predates them
    _write_json(tmp / STORE, ckpt.store_info | {"extractor": add_fingerprints((ckpt.store_info or {}).get("extractor"),
                                                                              [DEFAULT_ASSETS_DIR])})
    _write_json(tmp / PROVENANCE, ckpt.provenance | {"copied_from": str(source.resolve()),
                                                     "weights_dtype": "float16" if fp16 else "float32"})
    replace_directory(tmp, destination)
    return destination


# ---------------------------------------------------------------------------------------------
# Load


def load_weights(path: Path, model: nn.Module) -> None:
    """Load weights.pt into `model`; every missing, unexpected or mis-shaped key is an error."""
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; expected the checkpoint's weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises assorted types (RuntimeError, UnpicklingError, EOFError) for a bad file
        raise ArtifactError(f"{path}: corrupt weights file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(state, dict):
        raise ArtifactError(f"{path}: expected a state_dict, got {type(state).__name__}")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArtifactError(f"{path}: state_dict keys do not match the config's model; missing {missing}, unexpected {unexpected}")
    wrong = [f"{k} {list(state[k].shape)} != {list(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise ArtifactError(f"{path}: state_dict shapes do not match the config's model: {', '.join(wrong)}")
    model.load_state_dict(_fp32(state), strict=True)


def load_train_state(directory: str | os.PathLike) -> dict | None:
    """The trainer's resume state of a checkpoint, or None if it has none."""
    path = Path(directory) / TRAIN_STATE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # see load_weights
        raise ArtifactError(f"{path}: corrupt resume state ({type(exc).__name__})") from exc


HUBNESS = "hubness.npz"  # beside a dual-encoder checkpoint: its first-stage hubness correction (training.hubness)
def first_stage_sha256(directory: str | os.PathLike) -> str:
    """What a fusion record binds to: the first stage's weights.pt sha256, or, with a hubness correction
    beside them (HUBNESS), the sha256 of "<weights sha>:<hubness sha>" (the correction changes its scores)."""
    directory = Path(directory)
    weights = file_sha256(directory / WEIGHTS)
    if not (directory / HUBNESS).is_file():
        return weights
    return hashlib.sha256(f"{weights}:{file_sha256(directory / HUBNESS)}".encode()).hexdigest()


SCORE_WEIGHTS = "score_weights.json"  # beside a BSSAN checkpoint: eq. 19's branch weights chosen on dev (training.evaluate
                                      # --tune-score-weights), bound to the sha256 of its weights.pt
HUB_BANK = "hub_bank.npz"  # beside a BSSAN checkpoint: the image hub correction chosen on dev (engine/hub.py;
                           # training.evaluate --tune-hub), bound to its weights.pt and branch weights
FUSION = "fusion.json"  # beside a BSSAN checkpoint: the fusion tuned on dev with a first stage (training.evaluate --tune-fusion)


def read_fusion(directory: str | os.PathLike):
    """(Fusion, first_stage_sha256) of DIRECTORY/fusion.json, or None without one. The record binds the
    BSSAN model to the first stage it was tuned with (sha256 of that dual encoder's weights file)."""
    from engine.ranking import Fusion

    path = Path(directory) / FUSION
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({str(exc).splitlines()[0]}); expected a fusion record") from None
    fusion = Fusion.from_dict(record, where=str(path))
    want = record.get("first_stage_sha256")
    if not isinstance(want, str):
        raise InputError(f"{path}: first_stage_sha256: expected the sha256 of the dual encoder's {WEIGHTS}, got {want!r}")
    return fusion, want


def read_score_weights(directory: str | os.PathLike) -> tuple[float, float]:
    """(w_Y, w_Y') of DIRECTORY/score_weights.json; ArtifactError naming the file when it is malformed or was chosen
    for other weights than DIRECTORY/weights.pt."""
    path = Path(directory) / SCORE_WEIGHTS
    record = _read_json(path)
    values = [record.get(k) if isinstance(record, dict) else None for k in ("w2r", "o2w")]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values) or not sum(values) > 0:
        raise ArtifactError(f"{path}: expected numbers w2r >= 0 and o2w >= 0, not both 0, got {values}")
    want = file_sha256(Path(directory) / WEIGHTS)
    if record.get("weights_sha256") != want:
        raise ArtifactError(f"{path}: chosen for weights {str(record.get('weights_sha256'))[:12]}..., but weights.pt is "
                            f"{want[:12]}...; expected a record of these weights (rerun --tune-score-weights)")
    return float(values[0]), float(values[1])


def read_hub_bank(directory: str | os.PathLike, score_weights: tuple[float, float]):
    """The HubBank of DIRECTORY/hub_bank.npz; ArtifactError naming the file when it is malformed or was chosen for
    other weights (weights.pt) or other branch weights (eq. 19) than the checkpoint has now."""
    from engine.hub import HubBank

    path = Path(directory) / HUB_BANK
    bank = HubBank.load(path)
    want = file_sha256(Path(directory) / WEIGHTS)
    if bank.record.get("weights_sha256") != want:
        raise ArtifactError(f"{path}: chosen for weights {str(bank.record.get('weights_sha256'))[:12]}..., but weights.pt is "
                            f"{want[:12]}...; expected a record of these weights (rerun training.evaluate --tune-hub)")
    chosen = bank.record.get("score_weights")
    if chosen is None or not np.allclose(chosen, score_weights):
        raise ArtifactError(f"{path}: chosen for branch weights {chosen}, the checkpoint scores with {list(score_weights)}; "
                            f"expected the same (rerun training.evaluate --tune-hub after --tune-score-weights)")
    return bank


def load_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint directory; one-line ArtifactError naming the file if anything is off."""
    directory = Path(directory)
    settle_directory(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such checkpoint directory; expected one written by training.train")
    config = _read_json(directory / CONFIG)
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise ArtifactError(f"{directory / CONFIG}: expected format {CHECKPOINT_FORMAT!r}, got {config.get('format') if isinstance(config, dict) else config!r}")
    if not isinstance(config.get("version"), int) or config["version"] > CHECKPOINT_VERSION:
        raise ArtifactError(f"{directory / CONFIG}: checkpoint version {config.get('version')!r} is newer than this code reads ({CHECKPOINT_VERSION})")
    try:
        kind = ModelKind(config.get("kind"))
    except ValueError:
        raise ArtifactError(f"{directory / CONFIG}: kind {config.get('kind')!r}; expected one of {[k.value for k in ModelKind]}") from None
    try:
        model, model_config = build_model(kind, config.get("model", {}))
        train_config = TrainConfig.from_dict(config.get("train", {}))
    except InputError as exc:
        raise ArtifactError(f"{directory / CONFIG}: {exc}") from exc
    load_weights(directory / WEIGHTS, model)
    if kind is ModelKind.BSSAN and (directory / SCORE_WEIGHTS).is_file():  # eq. 19's weights chosen on dev
        model.score_weights = read_score_weights(directory)
    if kind is ModelKind.BSSAN and (directory / HUB_BANK).is_file():  # the image hub correction chosen on dev
        model.hub = read_hub_bank(directory, model.scoring_weights)
    if kind is ModelKind.DUAL_ENCODER and (directory / HUBNESS).is_file():  # the first stage's hubness correction
        from training.hubness import HubnessCorrection
        model.attach_hubness(HubnessCorrection.load(directory / HUBNESS))
    return Checkpoint(path=directory, model=model.eval(), kind=kind, model_config=model_config, train_config=train_config,
                      word_features=_read_json(directory / WORD_FEATURES), store_info=_read_json(directory / STORE),
                      metrics=_read_json(directory / METRICS), provenance=_read_json(directory / PROVENANCE))
