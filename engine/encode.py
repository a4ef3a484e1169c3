"""Encoding a gallery once: image files, feature arrays or a store split -> ImageCache; caption
strings, word arrays or a store split -> CaptionCache (engine/cache.py). The Scorer (engine/runtime.py)
is an Encoder; use it, not this class, directly.

Image files go through the feature pipeline the model was trained on (`image_pipeline`: the
backbone, detector and RoIAlign graphs recorded in the artifact's preprocessing section) and
caption strings through THE tokenizer and the model's word features (engine/text.py). Both are
rounded through float16, as the feature store holds them, so a gallery of files scores exactly
like the same images read from a store. Captions are encoded sorted by length (little padding per
batch); arrays are filled in place, so the peak is the cache being built plus one batch.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.artifact import Artifact
from engine.backends import Runner
from engine.cache import WORD_ARRAYS, CaptionCache, ImageCache, artifact_fingerprint
from engine.errors import AssetError, InputError
from engine.graphs import FLOAT_DTYPE, GRAPHS
from engine.store import SplitFeatures

IMAGE_BATCH = 64  # images per image-graph call
CAPTION_BATCH = 256  # captions per text-graph call: 2,000 captions in 15.1 s vs 20.2 s at 64 (flickr8k preset, the
# recurrent text graphs run [batch, H] steps; 2 loaded cores)
IMAGE_INPUTS = {"w2r": ("regions",), "o2w": ("objects",), "shortlist": ("regions", "objects")}


def image_pipeline(artifact: Artifact, threads: int | None = None, backend: str = "onnxruntime-cpu"):
    """engine.features.Extractor set up as the model's training features were made (the feature
    store's extractor record in manifest["preprocessing"]): same backbone graph (checked by sha256),
    RoIAlign graph, detector, boxes per image. The graphs come from ARTIFACT/assets when the export
    copied them, else from build/assets (python -m export.backbones --out build/assets)."""
    from engine.detect import DEFAULT_MIN_SCORE
    from engine.features import DEFAULT_BOXES, ExtractConfig, Extractor, rerunnable_extractor
    from engine.text import DEFAULT_ASSETS_DIR
    from engine.assets import check_same_graph
    from engine.vision import read_asset_manifest

    info = artifact.manifest.get("preprocessing") or {}
    extractor = info.get("extractor", info) or {}
    backbone, detector = rerunnable_extractor(extractor, artifact.root, "score a feature store instead")
    stem = Path(backbone["graph"]).stem
    candidates = [artifact.root / "assets", DEFAULT_ASSETS_DIR]
    folder = next((d for d in candidates if (d / f"{stem}.json").is_file() and (d / "roi_align.json").is_file()), None)
    if folder is None:
        raise AssetError(f"backbone {stem}: {stem}.json and roi_align.json not found in {' or '.join(map(str, candidates))}; "
                         f"build them with: python -m export.backbones --out {DEFAULT_ASSETS_DIR}")
    check_same_graph(backbone, folder / backbone["graph"], read_asset_manifest(folder / f"{stem}.json", "region-backbone"),
                     "the backbone the model was trained with")
    config = ExtractConfig(images=Path(), captions=Path(), out=Path(), assets=folder, backbone=stem, word_features=(),
                           boxes_per_image=int(extractor.get("boxes_per_image", DEFAULT_BOXES)),
                           min_score=float(detector.get("min_score", DEFAULT_MIN_SCORE)), threads=threads or 2,
                           backend=backend)
    return Extractor(config)


class Encoder:
    """An artifact's image and text graphs on a runner: everything that runs once per item."""

    def __init__(self, artifact: Artifact, runner: Runner):
        self.artifact, self.runner = artifact, runner
        self.fingerprint = artifact_fingerprint(artifact)
        self.dims = artifact.dims
        # The encoders' float dtype: image/text graphs run at fp32 in an int8 run (engine/backends/).
        self.cache_precision = "fp16" if runner.precision == "fp16" else "fp32"
        self._extractor = self._word_features = None
        # Image files: the detector (an OpenCV DNN net) keeps state between setInput and forward, so
        # encoding files is serialised; everything else here is re-entrant (engine/runtime.py).
        self._pipeline_lock = threading.Lock()

    def _graphs(self, stage: str) -> list[str]:
        return [n for n, g in GRAPHS.items() if g.stage == stage and self.runner.has_graph(n)]

    def encode_image_features(self, regions: np.ndarray, objects: np.ndarray, ids: list[str] | None = None,
                              progress: bool = False, hub: bool = True) -> ImageCache:
        """regions [N, D, M] and objects [N, P, Q] (any float dtype; memory maps are read in batches) -> ImageCache
        (with each image's hub offset when the model has a hub bank and hub=True: engine/hub.py)."""
        n = len(regions)
        if len(objects) != n:
            raise InputError(f"objects: {len(objects)} rows, expected {n} (one per image, as regions)")
        ids = [str(i) for i in range(n)] if ids is None else list(ids)
        if len(ids) != n:
            raise InputError(f"image ids: {len(ids)}, expected {n} (one per image)")
        arrays: dict[str, np.ndarray] = {}  # filled in place: the peak is the cache plus one batch
        for start in tqdm(range(0, n, IMAGE_BATCH), desc="images", unit="batch", disable=not progress):
            block = {"regions": regions[start:start + IMAGE_BATCH], "objects": objects[start:start + IMAGE_BATCH]}
            for name in self._graphs("image"):
                dtype = self.runner.float_dtype(name)
                feeds = {k: np.ascontiguousarray(block[k], dtype=dtype) for k in IMAGE_INPUTS[GRAPHS[name].branch]}
                for output, array in self.runner.infer(name, feeds).items():
                    if output not in arrays:
                        arrays[output] = np.empty((n,) + array.shape[1:], dtype=array.dtype)
                    arrays[output][start:start + len(array)] = array
        cache = ImageCache(ids, arrays, self.fingerprint, self.cache_precision)
        return self._add_hub_offsets(cache) if hub else cache

    def _add_hub_offsets(self, cache: ImageCache) -> ImageCache:
        """The Scorer adds each image's hub offset (engine/hub.py) when the model has a hub bank; nothing here."""
        return cache

    def _add_text_hub_offsets(self, cache: CaptionCache) -> CaptionCache:
        """The Scorer adds each caption's hub offset when the model's hub bank has a caption side; nothing here."""
        return cache

    def encode_images(self, images, ids: list[str] | None = None, progress: bool = False) -> ImageCache:
        """Paths of image files (through the backbone, detector and RoIAlign graphs the model was
        trained with), a feature-store split (SplitFeatures), or a (regions, objects) pair of arrays."""
        if isinstance(images, SplitFeatures):
            return self.encode_image_features(images.regions, images.objects, ids or images.image_names, progress)
        if isinstance(images, tuple) and len(images) == 2 and all(isinstance(a, np.ndarray) for a in images):
            return self.encode_image_features(images[0], images[1], ids, progress)
        paths = [Path(p) for p in images]
        regions, objects = self.image_features(paths, progress)
        return self.encode_image_features(regions, objects, ids or [p.name for p in paths], progress=False)

    def image_features(self, paths: list[Path], progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Image files -> (regions [N, D, M], objects [N, P, Q]) with the model's feature pipeline
        (engine.features.Extractor), rounded through float16 as the feature store holds them, so a
        gallery of files scores exactly like the same images read from a store. A file that cannot
        be decoded is an ImageError naming it."""
        regions, objects = [], []
        with self._pipeline_lock:
            if self._extractor is None:
                self._extractor = image_pipeline(self.artifact, self.runner.threads, self.runner.backend.value)
            batch = self._extractor.config.batch_size
            for start in tqdm(range(0, len(paths), batch), desc="image files", unit="batch", disable=not progress):
                r, o, _, _, bad = self._extractor.images(paths[start:start + batch])
                if bad:
                    raise InputError(next(iter(bad.values())))
                regions.append(r.astype(np.float16))
                objects.append(o.astype(np.float16))
        if not regions:
            raise InputError("images: no image given; expected at least one")
        return np.concatenate(regions), np.concatenate(objects)

    def encode_word_features(self, words: np.ndarray, lengths: np.ndarray, ids: list[str] | None = None,
                             texts: list[str] | None = None, image_ids: list[str] | None = None,
                             progress: bool = False, hub: bool = True) -> CaptionCache:
        """words [N, L, E] (zero past each length) and lengths [N] -> CaptionCache (ragged word arrays; with each
        caption's hub offset when the model's hub bank has a caption side and hub=True: engine/hub.py)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        n = len(lengths)
        if len(words) != n:
            raise InputError(f"words: {len(words)} rows, expected {n} (one per caption, as lengths)")
        if n and (lengths.min() < 1 or lengths.max() > min(words.shape[1], self.dims["max_words"])):
            raise InputError(f"lengths: expected caption lengths in [1, {min(words.shape[1], self.dims['max_words'])}], "
                             f"got [{lengths.min()}, {lengths.max()}]")
        ids = [str(i) for i in range(n)] if ids is None else list(ids)
        texts = [""] * n if texts is None else list(texts)
        image_ids = [""] * n if image_ids is None else list(image_ids)
        offsets = np.concatenate([[0], np.cumsum(lengths)])  # caption i owns word rows offsets[i]..offsets[i+1]
        order = np.argsort(lengths, kind="stable")  # encode by length: little padding per batch
        arrays: dict[str, np.ndarray] = {}  # filled in place: the peak is the cache plus one batch per worker
        arrays_lock = threading.Lock()

        def encode_block(start: int) -> None:
            rows = np.sort(order[start:start + CAPTION_BATCH])  # sorted: memory maps read forward
            block_lengths = lengths[rows]
            width = int(block_lengths.max())
            real = np.arange(width)[None, :] < block_lengths[:, None]  # [B_txt, L]
            word_rows = (offsets[rows][:, None] + np.arange(width)[None, :])[real]  # destination of each real word
            block_words = np.asarray(words[rows][:, :width], dtype=np.float32)
            outputs = {"words": block_words.astype(FLOAT_DTYPE[self.cache_precision])}
            for name in self._graphs("text"):
                feeds = {"words": block_words.astype(self.runner.float_dtype(name)), "lengths": block_lengths}
                outputs.update(self.runner.infer(name, {k: feeds[k] for k in GRAPHS[name].input_names}))
            for output, array in outputs.items():
                ragged = output in WORD_ARRAYS
                with arrays_lock:
                    if output not in arrays:
                        arrays[output] = np.empty((int(offsets[-1]) if ragged else n,) + array.shape[2 if ragged else 1:],
                                                  dtype=array.dtype)
                if ragged:  # each block writes its own rows
                    arrays[output][word_rows] = array[real]
                else:
                    arrays[output][rows] = array

        starts = range(0, n, CAPTION_BATCH)
        workers = min(max(1, int(getattr(self.runner, "text_concurrent_calls", 1))), len(starts))
        with tqdm(total=len(starts), desc="captions", unit="batch", disable=not progress) as bar:
            if workers <= 1:
                for start in starts:
                    encode_block(start)
                    bar.update(1)
            else:  # one-thread text sessions (engine.backends.onnxruntime): blocks side by side, same bytes
                with ThreadPoolExecutor(workers, thread_name_prefix="bssan-text") as pool:
                    for _ in pool.map(encode_block, starts):
                        bar.update(1)
        cache = CaptionCache(ids, texts, image_ids, lengths, arrays, self.fingerprint, self.cache_precision)
        return self._add_text_hub_offsets(cache) if hub else cache

    def encode_captions(self, captions, ids: list[str] | None = None, image_ids: list[str] | None = None,
                        progress: bool = False) -> CaptionCache:
        """Caption strings (THE tokenizer + the model's word features), a feature-store split
        (SplitFeatures: its word set, ids `image#k`), or a (words, lengths) pair of arrays."""
        word_set = self.artifact.manifest.get("word_features", {}).get("name", "glove50")
        if isinstance(captions, SplitFeatures):
            names, owner = captions.image_names, np.asarray(captions.caption_image)
            seen: dict[int, int] = {}
            split_ids = []
            for image in owner.tolist():
                split_ids.append(f"{names[image]}#{seen.get(image, 0)}")
                seen[image] = seen.get(image, 0) + 1
            return self.encode_word_features(captions.words(word_set), captions.lengths, ids or split_ids, captions.captions,
                                             image_ids or [names[i] for i in owner.tolist()], progress)
        if isinstance(captions, tuple) and len(captions) == 2 and all(isinstance(a, np.ndarray) for a in captions):
            return self.encode_word_features(captions[0], captions[1], ids, image_ids=image_ids, progress=progress)
        from engine.text import load_word_features

        texts = list(captions)
        with self._pipeline_lock:  # loaded once (GloVe's vocabulary index takes seconds to build)
            if self._word_features is None:
                self._word_features = load_word_features(word_set, self.artifact.root / "assets", backend=self.runner.backend.value,
                                                         spinning=self.runner.spinning)
        batch = self._word_features.encode(texts, self.dims["max_words"])
        words = batch.vectors.astype(np.float16).astype(np.float32)  # as the feature store holds them
        return self.encode_word_features(words, batch.lengths, ids, texts, image_ids, progress)
