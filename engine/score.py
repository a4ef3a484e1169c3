"""The ranking command: a gallery of images x captions through an artifact, top-k per query.

    python -m engine.score --model ARTIFACT --images DIR|LIST|STORE [--split test]
        (--captions FILE | --query TEXT [--query TEXT ...]) [--direction i2t|t2i|both] [--top-k 10]
        [--shortlist-k K] [--backend auto|onnxruntime-cpu|onnxruntime-cuda|tensorrt|torch]
        [--precision fp32|fp16|int8] [--batch-size PAIRS] [--threads N] [--memory-budget-mb MB]
        [--out results.jsonl|results.tsv] [--evaluate] [--ray [ADDRESS] [--ray-workers N]]   # --ray: docs/ray.md
    python -m engine.score --demo            # six photos shipped by scikit-image, captions from engine/demo.py
    python -m engine.score --model ARTIFACT --images flickr8k/split_test.txt --image-root flickr8k/images \
        --captions flickr8k/captions.txt --evaluate   # the Flickr8K test split from the image files

Inputs. --images: a folder (its image files, sorted by name; ids = file names), a text file
(one image path a line, relative to --image-root or the file's folder; ids = the lines), or a feature store
(its --split: ids = image names; its captions are used when no --captions/--query is given).
--captions: one caption a line (ids FILE:LINE), or Flickr8K's token format `image#n<TAB>caption`
(ids image#n; captions of images outside the gallery are dropped, with a note). --query: t2i.
A folder's hidden files (`.x.jpg`, macOS `._x.jpg` sidecars) are skipped with a note; a broken symbolic
link is an image that cannot be read (an error naming it); a list naming one image twice is refused.

Output (--out): one line per query, i2t queries (images) first, then t2i queries (captions):
    .jsonl  {"direction", "query", "text" (t2i), "ranked": [ids], "scores": [float32 as text], "texts" (i2t)}
    .tsv    direction <TAB> query <TAB> id_1 <TAB> score_1 <TAB> id_2 <TAB> score_2 ...
            (one line per query whatever the ids hold: backslash, tab, newline and carriage return
            inside a field are written as \\, \t, \n and \r)
Without --out the rankings are printed for people; with --evaluate (captions carrying image
ids, the same number per image) the metrics JSON (engine.metrics, plus the shortlist's recall
in shortlist mode) goes to stdout.

Resumable (engine/journal.py): with --out, the caches and the scores are journaled in
`.<out name>.partial/` beside it, in fixed units; after kill -9 the same command continues from
the first unfinished unit and ends with byte-identical output. The result is written to a temp
file, fsynced and renamed over --out: a previous result is replaced whole or not at all. One command
per --out at a time (a second is refused); a run that ends in an error removes its journal.

Bad input (missing or corrupt image, empty or word-less caption line, non-UTF-8 text, bad
--top-k, unknown backend, an artifact of another format version, an --out that cannot be
written, a --memory-budget-mb too small for the gallery, ...) prints one line naming the file,
line or value, what was expected and what was got, and exits 2; numbers and --out are checked
before any work. Ctrl-C: "interrupted; rerun the same command to continue", exit 130.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.backends import Backend
from engine.cache import CaptionCache, ImageCache
from engine.data import FLICKR_LINE, IMAGE_SUFFIXES, _read_text
from engine.cli import ArgumentParser, check_output_file, command, positive_float, positive_int
from engine.data import image_files
from engine.errors import BssanError, CaptionError, DataError, ImageError, InputError
from engine.files import write_text_atomic
from engine.graphs import PRECISIONS
from engine.journal import JOURNAL_VERSION, UNIT_IMAGES, UNIT_SHORTLIST_IMAGES, Journal, output_lock, score_exhaustive, score_shortlists
from engine.metrics import format_metrics
from engine.ranking import first_stage_recall, two_stage_metrics
from engine.runtime import DEFAULT_MEMORY_BUDGET_MB, DEFAULT_PAIRS_PER_CALL, PATHS, Scorer, pair_keys, rank_rows
from engine.store import MANIFEST_NAME, STORE_FORMAT, FeatureStore
from engine.text import tokenize

DEFAULT_TOP_K = 10


# ---------------------------------------------------------------------------------------------
# Inputs


def _is_store(folder: Path) -> bool:
    """A feature store: manifest.json whose "format" is the store's (parsed, not searched for as text)."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == STORE_FORMAT


def read_images(arg: Path, split: str, root: Path | None = None) -> tuple[object, list[str], str]:
    """(image paths or a store split, ids, content digest) of --images DIR|LIST|STORE; a LIST's lines
    are relative to `root` (default: the list file's folder)."""
    if _is_store(arg):
        store = FeatureStore(arg)
        features = store.split(split)
        digest = json.dumps({"store": str(arg.resolve()), "split": store.manifest["splits"][split]}, sort_keys=True)
        return features, features.image_names, hashlib.sha256(digest.encode()).hexdigest()
    if arg.is_dir():
        paths, hidden = image_files(arg)
        if hidden:
            print(f"note: {arg}: skipped {hidden} hidden files with an image suffix (e.g. macOS ._ sidecars)", file=sys.stderr)
        if not paths:
            raise ImageError(f"{arg}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); expected a folder of images")
        ids = [p.name for p in paths]
    elif arg.is_file():
        lines = _read_text(arg, "image list")
        while lines and not lines[-1].strip():
            lines.pop()
        paths, ids, first_line = [], [], {}
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                raise DataError(f"{arg.name} line {number}: empty line; expected one image path per line")
            if line.strip() in first_line:
                raise DataError(f"{arg.name} line {number}: {line.strip()!r} is listed again (first at line "
                                f"{first_line[line.strip()]}); expected each image once")
            first_line[line.strip()] = number
            path = (arg.parent if root is None else root) / line.strip()
            if not path.is_file():
                raise ImageError(f"{arg.name} line {number}: image {str(path)!r} not found; expected an existing image file")
            paths.append(path)
            ids.append(line.strip())
        if not paths:
            raise DataError(f"{arg}: no image paths; expected one image path per line")
    else:
        raise ImageError(f"--images {arg}: not found; expected an image folder, a list file or a feature store")
    digest = hashlib.sha256()
    for image_id, path in zip(ids, paths):
        if not path.is_file():
            raise ImageError(f"{path}: broken symbolic link (to {os.readlink(path)!r}); expected an image file")
        digest.update(f"{image_id}\t{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return paths, ids, digest.hexdigest()


def read_captions(path: Path, gallery: list[str] | None) -> tuple[list[str], list[str], list[str], list[str]]:
    """(texts, ids, image ids, where) of a captions file, one per line or Flickr8K token format;
    where: "FILE line N" of each caption, for errors found later (e.g. too many word pieces)."""
    lines = _read_text(path, "captions file")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"{path}: no captions; expected one caption per line")
    token_format = FLICKR_LINE.match(lines[0]) is not None
    texts, ids, image_ids, wheres = [], [], [], []
    for number, line in enumerate(lines, start=1):
        where = f"{path.name} line {number}"
        if token_format:
            match = FLICKR_LINE.match(line)
            if match is None:
                raise DataError(f"{where}: {line[:60]!r}; expected `image#n<TAB>caption` like line 1")
            text, caption_id, image_id = match["caption"].strip(), f"{match['image']}#{match['n']}", match["image"]
        else:
            text, caption_id, image_id = line.strip(), f"{path.name}:{number}", ""
        if not text:
            raise DataError(f"{where}: empty caption; expected at least one word")
        if not tokenize(text):
            raise DataError(f"{where}: no word in {text[:60]!r}; expected at least one word")
        texts.append(text)
        ids.append(caption_id)
        image_ids.append(image_id)
        wheres.append(where)
    if token_format and gallery is not None:
        keep = set(gallery)
        chosen = [i for i, image in enumerate(image_ids) if image in keep]
        if not chosen:
            raise DataError(f"{path}: no caption names an image of the gallery; expected captions of the --images")
        if len(chosen) < len(texts):
            print(f"note: {path.name}: kept {len(chosen)} of {len(texts)} captions, those of the {len(gallery)} gallery images", file=sys.stderr)
        texts, ids, image_ids, wheres = ([values[i] for i in chosen] for values in (texts, ids, image_ids, wheres))
    return texts, ids, image_ids, wheres


# ---------------------------------------------------------------------------------------------
# Evaluation and output


def evaluation_order(image_ids: list[str], caption_image_ids: list[str], caption_ids: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """(caption permutation grouping captions image by image, owner image of each caption, captions per image)."""
    index = {image: i for i, image in enumerate(image_ids)}
    for caption, image in zip(caption_ids, caption_image_ids):
        if image not in index:
            raise DataError(f"--evaluate: caption {caption} names image {image!r}, which is not in the gallery; "
                            f"expected captions that carry gallery image ids (Flickr8K token format or a store)")
    owner = np.array([index[image] for image in caption_image_ids], dtype=np.int64)
    counts = np.bincount(owner, minlength=len(image_ids))
    if counts.min() != counts.max():
        raise DataError(f"--evaluate: image {image_ids[int(np.argmin(counts))]} has {counts.min()} captions, "
                        f"image {image_ids[int(np.argmax(counts))]} has {counts.max()}; expected the same number per image")
    return np.argsort(owner, kind="stable"), owner, int(counts[0])


def evaluate(scorer: Scorer, images: ImageCache, captions: CaptionCache, order: np.ndarray, per: int,
             shortlist_k: int | None, bssan_of: tuple[np.ndarray, np.ndarray] | np.ndarray) -> dict:
    """Metrics of what was ranked, through THE protocol (engine.ranking.two_stage_metrics): captions
    reordered image by image (`order`); BSSAN scores from the run (`bssan_of`: the exhaustive MS matrix,
    or (pairs [U, 2] sorted by image then caption row, MS [U]) of the re-ranked candidates; a pair the run
    did not score is scored here)."""
    first = scorer.first_stage(images, captions, np.arange(len(images)), order) if scorer.has_shortlist and (
        scorer.fuses or shortlist_k is not None) else None  # [N_img, N_cap] in evaluation order

    def rescore(image_index: np.ndarray, text_index: np.ndarray) -> np.ndarray:
        caption_rows = order[text_index]
        if isinstance(bssan_of, np.ndarray):
            return bssan_of[image_index, caption_rows]
        pairs, scored = bssan_of
        keys, wanted = pair_keys(pairs, len(captions)), pair_keys(np.stack([image_index, caption_rows], axis=1), len(captions))
        at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        values = np.where(keys[at] == wanted, scored[at].astype(np.float64), np.nan)
        missing = np.isnan(values)
        if missing.any():  # e.g. the direction not asked for, or a near-tie the shortlist broke the other way
            values[missing] = scorer.score_pairs(images, captions, np.stack([image_index[missing], caption_rows[missing]], axis=1),
                                                 fuse=False)
        return values

    metrics = two_stage_metrics(first, rescore, shortlist_k, per, scorer.fusion, shape=(len(images), len(captions)))
    if shortlist_k is not None:
        recall = first_stage_recall(first, shortlist_k, per)
        metrics["shortlist"] = {"i2t_recall": recall["i2t"], "t2i_recall": recall["t2i"], "k": shortlist_k}
    return metrics


def _number(value: float) -> str:
    return str(np.float32(value))  # shortest text that reads back as the same float32


TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def tsv_field(value) -> str:
    """A field that cannot break a TSV line (ids are file names: any character but / and NUL)."""
    return str(value).translate(TSV_ESCAPES)


def format_results(fmt: str, results: list[dict]) -> str:
    lines = []
    for r in results:
        if fmt == ".tsv":
            clean = [tsv_field(x) for x in (r["direction"], r["query"])]
            pairs = [f"{tsv_field(i)}\t{_number(s)}" for i, s in zip(r["ranked"], r["scores"])]
            lines.append("\t".join(clean + pairs))
        else:
            record = {k: v for k, v in r.items() if k != "scores"}
            text = json.dumps(record, ensure_ascii=False)
            lines.append(text[:-1] + ', "scores": [' + ", ".join(_number(s) for s in r["scores"]) + "]}")
    return "".join(line + "\n" for line in lines)


def check_k(name: str, value: int | None, sizes: list[int]) -> None:
    if value is not None and not 1 <= value <= max(sizes):
        raise InputError(f"{name} {value}: expected 1..{max(sizes)} (the most items any query ranks here)")


# ---------------------------------------------------------------------------------------------
# The command


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m engine.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="artifact directory (python -m export)")
    parser.add_argument("--images", type=Path, help="image folder, image list file, or feature store")
    parser.add_argument("--image-root", type=Path, help="folder the lines of an --images LIST are relative to (default: the list's)")
    parser.add_argument("--split", default="test", help="split of a feature store given as --images")
    parser.add_argument("--captions", type=Path, help="one caption a line, or Flickr8K token format")
    parser.add_argument("--query", action="append", help="a caption to search images with (repeatable)")
    parser.add_argument("--direction", choices=("i2t", "t2i", "both"), help="default: t2i with --query, else i2t")
    parser.add_argument("--top-k", type=int, help=f"results per query (default {DEFAULT_TOP_K}, capped at the items ranked)")
    parser.add_argument("--shortlist-k", type=int, help="re-rank only the dot-product top K per query (needs shortlist graphs)")
    parser.add_argument("--backend", choices=[b.value for b in Backend], default=Backend.AUTO.value)
    parser.add_argument("--checkpoint", type=Path, help="--backend torch: the BSSAN checkpoint the artifact was exported "
                        "from (the artifact records its weights' sha256, not its path)")
    parser.add_argument("--shortlist-checkpoint", type=Path, help="--backend torch: the dual-encoder checkpoint of the shortlist graphs")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_PAIRS_PER_CALL, help="pairs per pair-graph call")
    parser.add_argument("--path", choices=PATHS, default="auto", help="what scores a one-image block: the grid graphs, the "
                        "pair graphs, or the fused W2R kernel (python -m engine.kernels build); auto: the fastest that "
                        "python -m benchmarks.run recorded for this machine, else grid")
    parser.add_argument("--threads", type=positive_int, help="intra-op threads (default: the backend's)")
    parser.add_argument("--memory-budget-mb", type=positive_float, default=DEFAULT_MEMORY_BUDGET_MB)
    parser.add_argument("--out", type=Path, help="results .jsonl or .tsv (written atomically; resumable)")
    parser.add_argument("--evaluate", action="store_true", help="print retrieval metrics (captions must carry image ids)")
    parser.add_argument("--no-fusion", action="store_true", help="score BSSAN alone, ignoring the artifact's fusion weights "
                        "(manifest \"fusion\": first-stage cosine and BSSAN fused into the product score)")
    parser.add_argument("--demo", action="store_true", help="the embedded gallery (engine/demo.py) and reference model")
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", help="encode and score on a Ray cluster "
                        "(HOST:PORT of its head, 'auto'; no ADDRESS: a local instance); same output bytes (docs/ray.md)")
    parser.add_argument("--ray-workers", type=positive_int, help="--ray: Scorer actors (default: as many as fit, "
                        "--threads CPUs each, default 1)")
    parser.add_argument("--image-shards", type=Path, metavar="DIR", help="keep the gallery's image caches in DIR as "
                        "memory-mapped shards (encoded once: a rerun, or a later run on the same gallery, keeps finished "
                        "shards) and rank shard by shard: memory bounded whatever the gallery's size, same output (docs/ray.md)")
    parser.add_argument("--shard-size", type=positive_int, metavar="IMAGES", help="--image-shards: images per shard, "
                        "a multiple of 1024 (default 2048)")
    return parser


@dataclass
class Inputs:
    images: object  # image paths, or a store split (SplitFeatures)
    image_ids: list[str]
    image_digest: str
    texts: list[str] | None  # None: the store split's own captions
    caption_ids: list[str] | None
    caption_wheres: list[str] | None  # where each caption came from ("FILE line N", "--query N"), for errors
    caption_images: list[str]  # the image id each caption describes ("" when unknown)
    caption_digest: str

    def caption_words(self, max_words: int) -> tuple[int, int]:
        """(words in all captions, words of the longest) as the caption caches will hold them (tokenized, at most
        `max_words` each): what the memory budget is checked against before encoding (strings are cheap to tokenize)."""
        if self.texts is None:
            lengths = np.minimum(np.asarray(self.images.lengths, dtype=np.int64), max_words)
        else:
            lengths = np.asarray([max(len(tokenize(text, max_words)), 1) for text in self.texts], dtype=np.int64)
        return (int(lengths.sum()), int(lengths.max())) if len(lengths) else (0, 1)


def read_inputs(args: argparse.Namespace) -> Inputs:
    """Images and captions of the command line (or the demo's), checked before any model is loaded."""
    if args.captions is not None and args.query:
        raise InputError("--captions and --query: got both; expected one source of captions")
    if args.demo:
        from engine.demo import demo_gallery

        paths, texts, owners = demo_gallery()
        images, image_ids, image_digest = paths, [p.name for p in paths], "demo:" + ",".join(p.name for p in paths)
        texts, caption_ids, caption_images = texts, [f"{image}#{owners[:k].count(image)}" for k, image in enumerate(owners)], owners
        wheres = [f"demo caption {k + 1}" for k in range(len(texts))]
    else:
        if args.images is None:
            raise InputError("--images: missing; expected an image folder, an image list file or a feature store")
        images, image_ids, image_digest = read_images(args.images, args.split, args.image_root)
        texts = caption_ids = caption_images = wheres = None
    if args.query:
        texts, caption_ids, caption_images = list(args.query), [f"query:{i + 1}" for i in range(len(args.query))], [""] * len(args.query)
        wheres = [f"--query {i + 1}" for i in range(len(args.query))]
        for text in texts:
            if not tokenize(text):
                raise InputError(f"--query {text!r}: no word; expected at least one word")
    elif args.captions is not None:
        texts, caption_ids, caption_images, wheres = read_captions(args.captions, image_ids)
    elif texts is None and isinstance(images, list):
        raise InputError("--captions FILE or --query TEXT: missing; expected captions to rank (or a feature store as --images)")
    if texts is None:  # a store's own captions: its image of each caption
        names = images.image_names
        caption_images = [names[i] for i in np.asarray(images.caption_image).tolist()]
        wheres = [f"{args.images} split {args.split} caption {k + 1}" for k in range(len(caption_images))]
    digest = hashlib.sha256(json.dumps([texts, caption_ids, caption_images, image_digest]).encode()).hexdigest()
    return Inputs(images, image_ids, image_digest, texts, caption_ids, wheres, caption_images, digest)


def check_options(args: argparse.Namespace, inputs: Inputs, directions: list[str]) -> dict[str, int]:
    """Numbers and files of the options (the parser checked each number's range); returns the items each direction ranks."""
    n_captions = len(inputs.texts) if inputs.texts is not None else inputs.images.num_captions
    sizes = {"i2t": n_captions, "t2i": len(inputs.image_ids)}
    check_k("--top-k", args.top_k, list(sizes.values()))
    check_k("--shortlist-k", args.shortlist_k, list(sizes.values()))
    for d in directions:
        if args.shortlist_k is not None and args.shortlist_k < min(args.top_k or DEFAULT_TOP_K, sizes[d]):
            raise InputError(f"--shortlist-k {args.shortlist_k}: expected at least --top-k {args.top_k or DEFAULT_TOP_K}")
    return sizes


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.demo:
        from engine.demo import demo_artifact

        args.model = demo_artifact(args.model)
        args.direction = args.direction or "both"
    if args.model is None:
        raise InputError("--model: missing; expected an artifact directory (or --demo)")
    if args.ray is not None:  # before any work: Ray installed, the address reachable
        from engine.distributed import check_ray

        check_ray(args.ray)
    if args.image_shards is not None or args.shard_size is not None:  # before any work (engine/distributed/sharded.py)
        from engine.distributed.sharded import check_shard_options

        check_shard_options(args)
    if args.out is not None:  # before any work: a result that cannot be written is known now
        if args.out.suffix not in (".jsonl", ".tsv"):
            raise InputError(f"--out {args.out}: expected a file name ending in .jsonl or .tsv")
        check_output_file(args.out)
    with output_lock(args.out):
        return score(args, start)


def score(args: argparse.Namespace, start: float) -> int:
    """The command's work, holding the --out lock."""
    inputs = read_inputs(args)
    directions = ["i2t", "t2i"] if args.direction == "both" else [args.direction or ("t2i" if args.query else "i2t")]
    sizes = check_options(args, inputs, directions)
    order = per = None
    if args.evaluate:  # before any work: captions must name gallery images, the same number each
        order, owner, per = evaluation_order(inputs.image_ids, inputs.caption_images,
                                             inputs.caption_ids or [str(i) for i in range(sizes["i2t"])])

    torch_options = ({"checkpoint": args.checkpoint, "shortlist_checkpoint": args.shortlist_checkpoint}
                     if args.backend == Backend.TORCH.value else {})
    with Scorer.load(args.model, args.backend, args.precision, args.threads, args.memory_budget_mb, args.batch_size,
                     fusion=not args.no_fusion, path=args.path, **torch_options) as scorer:
        print(f"backend: {scorer.runner.backend.value} ({scorer.runner.reason}), precision {args.precision}, "
              f"fusion {scorer.fusion.to_dict()}", file=sys.stderr)
        if args.shortlist_k is not None:
            scorer.require_shortlist()
        n_captions = sizes["i2t"]
        if args.image_shards is not None:  # what the sharded mode holds at once: a shard or unit of images, a tile
            from engine.distributed.sharded import check_sharded_budget

            check_sharded_budget(args, scorer, sizes, inputs)
        else:
            total, longest = inputs.caption_words(scorer.dims["max_words"])
            scorer.check_budget(len(inputs.image_ids), n_captions, n_captions * len(inputs.image_ids) * 4 if args.shortlist_k is None else 0,
                                words=longest, total_words=total)
        key = {"version": JOURNAL_VERSION, "artifact": scorer.fingerprint, "backend": scorer.runner.backend.value,
               "precision": args.precision, "threads": args.threads, "batch_size": args.batch_size,
               "memory_budget_mb": args.memory_budget_mb, "shortlist_k": args.shortlist_k, "directions": directions,
               "units": [UNIT_IMAGES, UNIT_SHORTLIST_IMAGES], "images": inputs.image_digest, "captions": inputs.caption_digest,
               "fusion": scorer.fusion.to_dict(), "path": scorer.path}
        if args.image_shards is not None:
            key["image_shards"] = True  # its own journal arrays (engine/distributed/sharded.py)
        journal = Journal(args.out, key)
        try:
            return score_with_journal(args, start, scorer, inputs, sizes, directions, journal, order, per)
        except BssanError:
            journal.remove()  # a run that ends in a user error cannot be resumed: rerunning needs other input
            raise


def score_with_journal(args: argparse.Namespace, start: float, scorer: Scorer, inputs: Inputs, sizes: dict[str, int],
                       directions: list[str], journal: Journal, order: np.ndarray | None, per: int | None) -> int:
    """Encode (or load from the journal), score in journaled units, write the output."""
    if args.image_shards is not None:  # the gallery as memory-mapped shards, ranked shard by shard: the same bytes
        from engine.distributed.sharded import score_sharded

        return score_sharded(args, scorer, inputs, sizes, directions, journal)
    pool = ray_pool(args) if args.ray is not None else None  # --ray: encoding and scoring units on Ray workers
    images = journal.cache("images", ImageCache, lambda: scorer.encode_images(inputs.images, inputs.image_ids, progress=True)
                           if pool is None else pool.encode_images(inputs.images, inputs.image_ids, scorer.fingerprint,
                                                                   scorer.cache_precision), scorer.fingerprint)
    captions = journal.cache("captions", CaptionCache, lambda: encode_captions(scorer, inputs), scorer.fingerprint)
    if pool is not None:
        pool.use_caches(images, captions)
    ranked, scores = {}, {}
    if args.shortlist_k is None:
        bssan = score_exhaustive(scorer, images, captions, journal, pool)  # MS [N_img, N_cap]
        matrix = (scorer.fusion.apply(scorer.first_stage(images, captions, np.arange(len(images)), np.arange(len(captions))), bssan)
                  if scorer.fuses else bssan)
        for d in directions:
            ranked[d], scores[d] = rank_rows(matrix if d == "i2t" else matrix.T, min(args.top_k or DEFAULT_TOP_K, sizes[d]))
    else:  # both directions' candidates scored once, image by image (engine/journal.py)
        pairs, pair_bssan, rankings = score_shortlists(scorer, images, captions, {d: min(args.shortlist_k, sizes[d]) for d in directions},
                                                       journal, pool)
        for d in directions:
            ranked[d], scores[d] = rankings[d].indices, rankings[d].scores
        bssan = (pairs, pair_bssan)
    results = [record for d in directions
               for record in query_records(d, images, captions, ranked[d], scores[d], min(args.top_k or DEFAULT_TOP_K, sizes[d]))]
    metrics = evaluate(scorer, images, captions, order, per, args.shortlist_k, bssan) if args.evaluate else None
    if args.out is not None:
        write_text_atomic(args.out, format_results(args.out.suffix, results))
        journal.remove()
        print(f"{args.out}: {len(results)} queries", file=sys.stderr)
    elif not args.evaluate:
        print_results(results)
    if metrics is not None:
        print(format_metrics(metrics) if "rsum" in metrics else json.dumps(metrics), file=sys.stderr)
        print(json.dumps({**metrics, "mode": "exhaustive" if args.shortlist_k is None else "shortlist",
                          "images": len(images), "captions": len(captions), "captions_per_image": per,
                          "backend": scorer.runner.backend.value, "precision": args.precision,
                          "seconds": round(time.perf_counter() - start, 1)}))
    return 0


def ray_pool(args: argparse.Namespace):
    """engine.distributed's pool of Scorers loaded as this command loads its own (--ray)."""
    from engine.distributed.score import ScorePool

    load = {"artifact_dir": args.model, "backend": args.backend, "precision": args.precision, "threads": args.threads,
            "memory_budget_mb": args.memory_budget_mb, "batch_size": args.batch_size, "fusion": not args.no_fusion}
    if args.backend == Backend.TORCH.value:
        load.update(checkpoint=args.checkpoint, shortlist_checkpoint=args.shortlist_checkpoint)
    return ScorePool(args.ray, args.ray_workers, load)


def encode_captions(scorer: Scorer, inputs: Inputs) -> CaptionCache:
    """The captions through the scorer; an error about one caption names its file and line."""
    try:
        return scorer.encode_captions(inputs.images if inputs.texts is None else inputs.texts, inputs.caption_ids,
                                      inputs.caption_images, progress=True)
    except CaptionError as exc:
        if inputs.caption_wheres is None or exc.index is None or not 0 <= exc.index < len(inputs.caption_wheres):
            raise
        raise CaptionError(f"{inputs.caption_wheres[exc.index]}: {exc.reason}") from None


def query_records(direction: str, images: ImageCache, captions: CaptionCache, ranked: np.ndarray, scores: np.ndarray,
                  k: int) -> list[dict]:
    """One output record per query of a direction: its id (and text), the top-k ids (and texts) and scores."""
    query_ids, other_ids = (images.ids, captions.ids) if direction == "i2t" else (captions.ids, images.ids)
    records = []
    for q in range(len(query_ids)):
        record = {"direction": direction, "query": query_ids[q]}
        if direction == "t2i":
            record["text"] = captions.texts[q]
        record["ranked"] = [other_ids[i] for i in ranked[q, :k]]
        if direction == "i2t":
            record["texts"] = [captions.texts[i] for i in ranked[q, :k]]
        record["scores"] = scores[q, :k].tolist()
        records.append(record)
    return records


def print_results(results: list[dict]) -> None:
    for r in results:
        print(f"{r['direction']} {r['query']}" + (f"  {r['text']!r}" if "text" in r else ""))
        for rank, (item, value) in enumerate(zip(r.get("texts", r["ranked"]), r["scores"]), start=1):
            print(f"  {rank:2d}. {value:8.4f}  {item}")


@command(interrupted="interrupted; rerun the same command to continue")
def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
