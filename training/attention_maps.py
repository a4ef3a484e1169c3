"""Attention pictures of one image and one caption, from a BSSAN checkpoint: W2R word-to-region
heat maps over the photo (the paper's Fig. 7) and O2W object-to-word weight charts (Fig. 8).

    python -m training.attention_maps --checkpoint models/reference --image photo.jpg \\
        --caption "a dog runs through the grass" --out attention/ [--assets build/assets] [--force]

writes, into OUT (created if needed; an existing file is never replaced without --force, and
then atomically):
    w2r_words.png     one panel per word (the word is its title): the photo with that word's
                      attention over the region grid, upsampled to the photo and overlaid
    o2w_objects.png   one row per detected object: the photo with its box, and a bar chart of
                      its attention over the caption's words
    attention.json    the caption's words, the raw weights (word_to_region [words, D] with rows
                      summing to 1 over the D regions; object_to_word [P, words] summing to 1
                      over the real words), the boxes and their labels, and the model's score
A variant without a branch (w2r only, o2w only) writes only the other picture and says so.

The image goes through the model's own feature pipeline (engine.features.Extractor with the
backbone, RoIAlign graph and detector recorded in the checkpoint's store.json; graphs from
`python -m export.backbones --out build/assets`), the caption through its word-feature set
(engine.text; MiniLM needs `python -m export.text --out build/assets`). Features are rounded
through float16 as the feature store holds them. Preprocessing stretches the photo to a square,
so region (row, col) of the grid covers the same fraction of the photo in each axis, whatever
its aspect: that is how the heat map is laid over it. Tests and other callers with features in
hand use `attention_pictures` (no ONNX assets needed).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from engine.cli import ArgumentParser, command, positive_int
from engine.errors import ArtifactError, AssetError, ImageError, InputError
from engine.files import write_bytes_atomic
from engine.text import DEFAULT_ASSETS_DIR, WordFeatureSet, load_word_features, tokenize
from training.model import BSSAN

W2R_PICTURE, O2W_PICTURE, WEIGHTS_JSON = "w2r_words.png", "o2w_objects.png", "attention.json"
OUTPUTS = (W2R_PICTURE, O2W_PICTURE, WEIGHTS_JSON)
DISPLAY_SIDE = 220  # px: the photo is drawn at most this big per panel; the model saw it at its own size
PANEL_INCHES = 2.2  # one W2R panel; at DPI it is DISPLAY_SIDE px, so the photo is not resampled twice
W2R_COLUMNS = 6  # panels per row: a 30-word caption fits in 6 rows
DPI = 100
HEAT_ALPHA = 0.55  # enough heat to read, enough photo to see what is under it
COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
# describe() keys that identify a word-feature set's content (paths and versions may differ between machines)
WORD_SET_CONTENT_KEYS = ("name", "dim", "sha256", "index_sha256", "tokenizer_sha256")


@dataclass
class ImageFeatures:
    """One image as the model reads it, and what the pictures draw on it."""

    image: Image.Image  # RGB, as loaded
    regions: np.ndarray  # [D, M]
    objects: np.ndarray  # [P, Q]
    boxes: np.ndarray  # [P, 4] x1, y1, x2, y2 in [0, 1] of the image
    objects_real: int  # the first objects_real boxes were detected; the rest are padding boxes
    grid: tuple[int, int]  # (rows, cols) of the region grid, D = rows * cols, regions row-major
    labels: list[str] = field(default_factory=list)  # per detected box, e.g. "dog 0.91" ("" unknown)


@dataclass
class PairAttention:
    """Test-time attention and score of one (image, caption) pair; weights cover the real words only."""

    words: list[str]
    score: float  # MS = Y + lambda Y' (eq. 19); an unbuilt branch contributes nothing
    branch_scores: dict[str, float]  # {"w2r": Y, "o2w": Y'} of the built branches
    word_to_region: np.ndarray | None  # [words, D]; None without a W2R branch
    object_to_word: np.ndarray | None  # [P, words]; None without an O2W branch


@dataclass
class Written:
    paths: list[Path]
    notes: list[str]  # what was not drawn and why
    attention: PairAttention


# ---------------------------------------------------------------------------------------------
# Helpers


def check_outputs(out: Path, force: bool) -> None:
    """Refuse before any work if an output exists (unless force), so nothing is half replaced."""
    for name in OUTPUTS:
        if (out / name).exists() and not force:
            raise InputError(f"{out / name}: exists; expected a new file (pass --force to replace it)")


def thumbnail(image: Image.Image) -> Image.Image:
    scale = DISPLAY_SIDE / max(image.size)
    if scale >= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)


def upsample(weights: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A [rows, cols] grid of weights -> [H, W], size = (W, H): bicubic (bilinear draws diamonds
    on a 7x7 grid), pixel centres aligned, clipped at 0 (bicubic undershoots next to a peak)."""
    smooth = Image.fromarray(weights.astype(np.float32)).resize(size, Image.Resampling.BICUBIC)
    return np.clip(np.asarray(smooth), 0.0, None)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    """The figure as a 256-colour PNG (octree: 30 ms where median cut takes seconds): heat maps and
    charts lose nothing visible, and a page of photo panels is ~4x smaller than 24-bit (1.1 MB ->
    0.29 MB for 13 words), so docs pictures can be committed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    _pyplot().close(fig)
    picture = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    out = io.BytesIO()
    picture.save(out, format="PNG", optimize=True)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# The weights


@torch.no_grad()
def pair_attention(model: BSSAN, regions: np.ndarray, objects: np.ndarray, word_vectors: np.ndarray, words: list[str]) -> PairAttention:
    """Weights and score of one pair. word_vectors [L, E] may be padded past len(words) (zeros):
    padding never gets weight (W2R rows are dropped, O2W masks it), so the result is the same."""
    length = len(words)
    if model.config.w2r_regions != "grid":
        raise InputError(f"w2r_regions {model.config.w2r_regions!r}: the attention pictures draw W2R's weights on the "
                         f"{model.config.region_count} grid cells only")
    if not 1 <= length <= min(len(word_vectors), model.config.max_words):
        raise InputError(f"words: {length} words for {len(word_vectors)} word vectors; expected 1..{model.config.max_words} words, "
                         f"at most one per vector")
    regions, objects = np.asarray(regions, np.float32)[None], np.asarray(objects, np.float32)[None]  # [1, D, M], [1, P, Q]
    vectors, lengths, index = np.asarray(word_vectors, np.float32)[None], np.array([length]), np.zeros(1, np.int64)  # [1, L, E]
    weights = model.attention_weights(regions, objects, vectors, lengths, index, index)
    image_cache = model.encode_images(regions if model.w2r else None, objects if model.needs_objects else None)
    text_cache = model.encode_texts(vectors, lengths)
    y, y_prime = model.score_cached(image_cache, text_cache, torch.as_tensor(index), torch.as_tensor(index))
    branch_scores = {name: float(value[0]) for name, value, built in (("w2r", y, model.w2r), ("o2w", y_prime, model.o2w)) if built}
    w2r, o2w = weights.get("word_to_region"), weights.get("object_to_word")
    return PairAttention(
        words=list(words), score=float(model.combine(y, y_prime)[0]), branch_scores=branch_scores,
        word_to_region=None if w2r is None else w2r[0, :length].cpu().numpy(),  # [L, D] -> [words, D]
        object_to_word=None if o2w is None else o2w[0, :, :length].cpu().numpy(),  # [P, L] -> [P, words]
    )


# ---------------------------------------------------------------------------------------------
# The pictures


def draw_word_to_region(image: Image.Image, caption: str, words: list[str], weights: np.ndarray, grid: tuple[int, int]):
    """Fig. 7: the photo, then one panel per word with its attention over the grid laid on the photo."""
    plt = _pyplot()
    photo = thumbnail(image)
    panels = 1 + len(words)
    cols = min(panels, W2R_COLUMNS)
    rows = math.ceil(panels / cols)
    panel_height = PANEL_INCHES * photo.height / photo.width + 0.3  # + the title line
    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL_INCHES, rows * panel_height + 0.5), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(photo)
    axes[0, 0].set_title("photo", fontsize=10)
    uniform = 1.0 / weights.shape[1]
    for k, (word, row) in enumerate(zip(words, weights)):
        ax = axes.flat[k + 1]
        heat = upsample(row.reshape(grid), photo.size)  # [rows, cols] -> [H, W]
        ax.imshow(photo)
        ax.imshow(heat, cmap="jet", alpha=HEAT_ALPHA, vmin=0.0, vmax=max(float(row.max()), 1e-12))
        ax.set_title(word, fontsize=11, fontweight="bold")
        ax.text(0.98, 0.03, f"peak {row.max():.2f}", transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                color="white", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
    fig.suptitle(f"{caption}\nW2R: each word's attention over the {grid[0]}x{grid[1]} region grid "
                 f"(colour from 0 to that word's peak; uniform would be {uniform:.3f} everywhere)", fontsize=9)
    return fig


def box_label(j: int, features: ImageFeatures) -> str:
    if j < features.objects_real:
        label = features.labels[j] if j < len(features.labels) else ""
        return f"object {j + 1}: {label}" if label else f"object {j + 1}"
    x1, y1, x2, y2 = features.boxes[j]
    return f"padding box {j + 1}: " + ("whole photo" if (x1, y1, x2, y2) == (0, 0, 1, 1) else "grid cell")


def draw_object_to_word(features: ImageFeatures, caption: str, words: list[str], weights: np.ndarray):
    """Fig. 8: per detected object, the photo with its box and a bar chart of its weights over the words.
    With no detection at all, the padding boxes (what the model attended from) are shown instead."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    photo = thumbnail(features.image)
    shown = list(range(features.objects_real)) or list(range(len(features.boxes)))
    row_inches = max(1.9, 2.4 * photo.height / photo.width)
    fig = plt.figure(figsize=(3.0 + max(4.5, 0.32 * len(words)), row_inches * len(shown) + 0.7), layout="constrained")
    grid = fig.add_gridspec(len(shown), 2, width_ratios=(2.4, max(4.5, 0.32 * len(words))))
    top = max(float(weights[shown].max()), 1.0 / len(words)) * 1.12  # one scale: objects compare at a glance
    for row, j in enumerate(shown):
        colour = COLOURS[j % len(COLOURS)]
        ax = fig.add_subplot(grid[row, 0])
        ax.imshow(photo)
        x1, y1, x2, y2 = features.boxes[j] * np.array([photo.width, photo.height] * 2)
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2.5))
        ax.set_title(box_label(j, features), fontsize=9, color=colour)
        ax.axis("off")
        bars = fig.add_subplot(grid[row, 1])
        bars.bar(np.arange(len(words)), weights[j], color=colour)
        bars.axhline(1.0 / len(words), color="gray", linestyle="--", linewidth=0.8)
        bars.set_xticks(np.arange(len(words)), words, rotation=55, ha="right", fontsize=8)
        bars.set_ylim(0, top)
        bars.set_ylabel("weight", fontsize=8)
        bars.tick_params(axis="y", labelsize=7)
        bars.margins(x=0.01)
    hidden = len(features.boxes) - len(shown)
    note = f"\n{hidden} padding boxes not shown (their weights are in {WEIGHTS_JSON})" if hidden else (
        "\nnothing detected: the padding boxes are shown" if not features.objects_real else "")
    fig.suptitle(f"{caption}\nO2W: each object's attention over the caption's words (dashed: uniform 1/{len(words)}){note}", fontsize=9)
    return fig


def attention_pictures(model: BSSAN, features: ImageFeatures, caption: str, words: list[str], word_vectors: np.ndarray,
                       out: str | os.PathLike, force: bool = False, record: dict | None = None,
                       notes: Sequence[str] = ()) -> Written:
    """Weights, pictures and JSON of one pair from features in hand. `record` adds fields to the JSON
    (e.g. the checkpoint and image paths), `notes` lines to its notes. Refuses existing outputs unless force."""
    out = Path(out)
    check_outputs(out, force)
    if features.grid[0] * features.grid[1] != len(features.regions):
        raise InputError(f"grid {features.grid}: {features.grid[0] * features.grid[1]} cells for {len(features.regions)} regions; expected equal")
    attention = pair_attention(model, features.regions, features.objects, word_vectors, words)
    out.mkdir(parents=True, exist_ok=True)
    paths, notes = [], list(notes)
    variant = model.config.variant.value
    if attention.word_to_region is not None:
        write_bytes_atomic(out / W2R_PICTURE, png_bytes(draw_word_to_region(features.image, caption, words, attention.word_to_region, features.grid)))
        paths.append(out / W2R_PICTURE)
    else:
        notes.append(f"no {W2R_PICTURE}: this model (variant {variant}) has no W2R branch")
    if attention.object_to_word is not None:
        write_bytes_atomic(out / O2W_PICTURE, png_bytes(draw_object_to_word(features, caption, words, attention.object_to_word)))
        paths.append(out / O2W_PICTURE)
    else:
        notes.append(f"no {O2W_PICTURE}: this model (variant {variant}) has no O2W branch")
    payload = {
        **(record or {}), "caption": caption, "words": words, "variant": variant,
        "score": attention.score, "branch_scores": attention.branch_scores,
        "score_note": "MS = Y + lambda Y' (eq. 19), test-time softmax attention; compare scores of one model only",
        "grid": list(features.grid),
        "word_to_region": None if attention.word_to_region is None else attention.word_to_region.tolist(),
        "object_to_word": None if attention.object_to_word is None else attention.object_to_word.tolist(),
        "boxes": np.asarray(features.boxes, np.float64).round(6).tolist(), "objects_real": int(features.objects_real),
        "box_labels": [box_label(j, features) for j in range(len(features.boxes))], "notes": notes,
    }
    write_bytes_atomic(out / WEIGHTS_JSON, (json.dumps(payload, indent=1) + "\n").encode())
    paths.append(out / WEIGHTS_JSON)
    return Written(paths, notes, attention)


# ---------------------------------------------------------------------------------------------
# From an image file and a caption, with the checkpoint's own feature pipeline


def check_word_features(word_set: WordFeatureSet, recorded: dict, word_dim: int, where: Path) -> None:
    """The loaded word-feature set must be the one the model was trained on (content keys) and of its width."""
    if word_set.dim != word_dim:
        raise AssetError(f"{where}: word features {word_set.name!r} have {word_set.dim} dims; the model expects {word_dim}")
    trained = recorded.get("description") or {}
    loaded = word_set.describe()
    for key in WORD_SET_CONTENT_KEYS:
        if key in trained and key in loaded and trained[key] != loaded[key]:
            raise AssetError(f"{where}: word features {recorded.get('name')!r} {key} {str(loaded[key])[:16]} differ from the "
                             f"model's training features ({str(trained[key])[:16]}); expected the same word-vector set")


def image_extractor(store_info: dict, model: BSSAN, assets: Path, where: Path, threads: int):
    """engine.features.Extractor set up as the model's training features were made (like
    engine.runtime.image_pipeline, for a checkpoint): checked against the model's sizes and the
    assets' backbone record before any graph is opened."""
    from engine.features import DEFAULT_BOXES, ExtractConfig, Extractor, rerunnable_extractor
    from engine.detect import DEFAULT_MIN_SCORE

    extractor = store_info.get("extractor") or {}
    backbone, detector = rerunnable_extractor(extractor, where, "train the model on such a store")
    c, grid = model.config, int(backbone.get("grid", 0))
    boxes = int(extractor.get("boxes_per_image", DEFAULT_BOXES))
    got = (grid * grid, int(backbone.get("channels", 0)), boxes)
    if got != (c.region_count, c.region_dim, c.object_count) or (model.o2w is not None and c.object_dim != got[1]):
        raise ArtifactError(f"{where}: store.json records a {grid}x{grid} grid of {got[1]} channels and {boxes} boxes, but the "
                            f"model reads {c.region_count} regions of {c.region_dim} and {c.object_count} objects of {c.object_dim}")
    stem = Path(backbone["graph"]).stem
    manifest_path = assets / f"{stem}.json"
    if not manifest_path.is_file() or not (assets / "roi_align.json").is_file():
        raise AssetError(f"{assets}: {stem}.json or roi_align.json not found; build them with: python -m export.backbones --out {assets}")
    try:
        built = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AssetError(f"{manifest_path}: corrupt JSON ({exc}); rebuild with: python -m export.backbones --out {assets}") from exc
    if int(built.get("grid", 0)) != grid:
        raise AssetError(f"{manifest_path}: grid {built.get('grid')}; the model was trained on grid {grid} "
                         f"(re-export the backbones it used)")
    from engine.assets import check_same_graph  # same sha256, or the same outputs on the fingerprint probe

    check_same_graph(backbone, assets / str(built.get("graph", backbone["graph"])), built, "the backbone the model was trained with")
    return Extractor(ExtractConfig(images=Path(), captions=Path(), out=Path(), assets=assets, backbone=stem, word_features=(),
                                   boxes_per_image=boxes, min_score=float(detector.get("min_score", DEFAULT_MIN_SCORE)), threads=threads))


def image_features(extractor, path: Path) -> ImageFeatures:
    """One image file through the extractor (regions, objects, boxes rounded through float16 as in
    a feature store), plus the detector's class and score of each detected box for the labels."""
    from engine.detect import COCO_LABELS
    from engine.vision import load_image

    regions, objects, boxes, real, bad = extractor.images([path])
    if bad:
        raise ImageError(bad[0])
    image = load_image(path)
    found = extractor.detector.detect([np.asarray(image)])[0]  # same image, same boxes: here for their classes
    labels, unused = [], np.ones(len(found.boxes), bool)
    for box in boxes[0, : int(real[0])]:  # SSD may return one box twice with two classes: each detection labels one box
        match = np.flatnonzero(unused & np.all(np.abs(found.boxes - box) < 1e-6, axis=1))
        cls = int(found.classes[match[0]]) if match.size else -1
        unused[match[:1]] = False
        labels.append(f"{COCO_LABELS[cls]} {found.scores[match[0]]:.2f}" if 0 < cls < len(COCO_LABELS) and COCO_LABELS[cls] else "")
    grid = extractor.backbone.grid
    return ImageFeatures(image=image, regions=regions[0].astype(np.float16).astype(np.float32),
                         objects=objects[0].astype(np.float16).astype(np.float32), boxes=boxes[0],
                         objects_real=int(real[0]), grid=(grid, grid), labels=labels)


@dataclass
class AttentionMapsConfig:
    checkpoint: Path
    image: Path
    caption: str
    out: Path
    assets: Path = DEFAULT_ASSETS_DIR
    force: bool = False
    threads: int = 2  # this machine's cores; ONNX Runtime, OpenCV and torch use them


def attention_maps(config: AttentionMapsConfig, word_set: WordFeatureSet | None = None) -> Written:
    """The command: checks that need nothing loaded first, then checkpoint, word features, image.
    `word_set` may be given preloaded (it is still checked against the checkpoint)."""
    from training.checkpoint import ModelKind, load_checkpoint

    if not tokenize(config.caption):
        raise InputError(f"caption {config.caption[:60]!r}: no word left after tokenizing; expected at least one word")
    if not config.image.is_file():
        raise ImageError(f"{config.image}: image file not found")
    check_outputs(config.out, config.force)
    ckpt = load_checkpoint(config.checkpoint)
    if ckpt.kind is not ModelKind.BSSAN:
        raise ArtifactError(f"{config.checkpoint}: a {ckpt.kind.value} checkpoint has no attention; expected a BSSAN checkpoint")
    model, where = ckpt.model, config.checkpoint / "store.json"
    extractor = image_extractor(ckpt.store_info, model, Path(config.assets), where, config.threads)  # fails fast, before words
    word_set = word_set or load_word_features(ckpt.word_features["name"], config.assets)
    check_word_features(word_set, ckpt.word_features, model.config.word_dim, config.checkpoint / "word_features.json")
    words = tokenize(config.caption, model.config.max_words)
    batch = word_set.encode([config.caption], model.config.max_words)
    vectors = batch.vectors[0].astype(np.float16).astype(np.float32)  # [L, E], as a feature store holds them
    features = image_features(extractor, config.image)
    record = {"checkpoint": str(config.checkpoint), "image": str(config.image), "word_features": word_set.name,
              "oov_words": batch.oov}
    notes = [f"caption truncated to the model's first {len(words)} words"] if len(tokenize(config.caption, 10**6)) > len(words) else []
    return attention_pictures(model, features, config.caption, words, vectors, config.out, config.force, record, notes)


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m training.attention_maps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a BSSAN checkpoint directory (e.g. models/reference)")
    parser.add_argument("--image", type=Path, required=True, help="any image file (JPEG, PNG, ...)")
    parser.add_argument("--caption", required=True, help="the caption text")
    parser.add_argument("--out", type=Path, required=True, help=f"folder for {', '.join(OUTPUTS)}")
    parser.add_argument("--assets", type=Path, default=DEFAULT_ASSETS_DIR, help="graphs of python -m export.backbones / export.text")
    parser.add_argument("--force", action="store_true", help="replace existing outputs (atomically)")
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    written = attention_maps(AttentionMapsConfig(args.checkpoint, args.image, args.caption, args.out, args.assets, args.force, args.threads))
    scores = ", ".join(f"{name} {value:.4f}" for name, value in written.attention.branch_scores.items())
    print(f"score {written.attention.score:.4f} ({scores}) for {len(written.attention.words)} words")
    for note in written.notes:
        print(f"note: {note}")
    for path in written.paths:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
