"""Is model A's ranking better than model B's, or is the gap noise? Paired bootstrap (engine.metrics.
paired_bootstrap) of rsum over the test images, from `engine.score --evaluate --top-k 10 --out X.jsonl` files.

    python results/flickr8k/compare.py full=ranked_full.jsonl w2r=ranked_w2r.jsonl o2w=ranked_o2w.jsonl --json out.json
    python results/flickr8k/compare.py a=scores_a.npy b=scores_b.npy --store STORE --split test   # training.evaluate --save-scores

Each consecutive pair (and the first against the last) is compared: rsum(A) - rsum(B), its 95% interval over
2,000 resamplings of the images, and the share of resamples where A is ahead. Ranks are read off each query's
top 10 (a rank past 10 counts as 11: R@1/5/10, hence rsum, are exact; medr/meanr are not computed). Truth comes
from Flickr8K's ids: caption "<image>#<k>" belongs to image "<image>"; every file must hold the same queries.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from engine.errors import InputError  # noqa: E402
from engine.metrics import RECALL_AT, paired_bootstrap  # noqa: E402

CAPTIONS_PER_IMAGE = 5
PAST_TOP = 11  # the rank given to a query whose truth is not in its top 10


def read_ranks(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """(image ids sorted, {"i2t": ranks [N_img], "t2i": ranks [N_img * 5] image-major}) from one ranked JSONL."""
    i2t, t2i = {}, {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            row = json.loads(line)
            if row.get("direction") not in ("i2t", "t2i") or not isinstance(row.get("ranked"), list):
                raise InputError(f"{path}:{number}: expected engine.score's ranked rows (direction, query, ranked), got {line[:80]!r}")
            if row["direction"] == "i2t":
                hits = [r for r, caption in enumerate(row["ranked"], 1) if caption.split("#")[0] == row["query"]]
                i2t[row["query"]] = hits[0] if hits else PAST_TOP
            else:
                image = row["query"].split("#")[0]
                t2i[row["query"]] = row["ranked"].index(image) + 1 if image in row["ranked"] else PAST_TOP
    images = sorted(i2t)
    captions = sorted(t2i, key=lambda c: (c.split("#")[0], c))
    if [c.split("#")[0] for c in captions] != [i for i in images for _ in range(CAPTIONS_PER_IMAGE)]:
        raise InputError(f"{path}: expected {CAPTIONS_PER_IMAGE} caption queries for each of the {len(images)} image queries")
    return images, {"i2t": np.array([i2t[i] for i in images]), "t2i": np.array([t2i[c] for c in captions])}


def read_score_matrix(path: Path, store: Path, split: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """The same from a score matrix [N_img, N_cap] (`training.evaluate --save-scores`, store order) and its store split:
    images sorted by name, each image's captions in store order; ranks capped at PAST_TOP as read_ranks caps them."""
    from engine.store import FeatureStore

    scores = np.load(path)
    features = FeatureStore(store).split(split)
    owner = np.asarray(features.caption_image)
    names = features.image_names
    if scores.shape != (len(names), len(owner)):
        raise InputError(f"{path}: score matrix {list(scores.shape)}, expected [{len(names)}, {len(owner)}] (the {split} split of {store})")
    order = sorted(range(len(names)), key=lambda i: names[i])
    captions = [c for i in order for c in np.flatnonzero(owner == i)]
    own = scores[owner, np.arange(len(owner))]  # [N_cap] each caption's score with its image
    t2i = 1 + (scores > own[None, :]).sum(axis=0)  # [N_cap] images above the caption's own
    best = np.full(len(names), -np.inf)
    np.maximum.at(best, owner, own)
    i2t = 1 + (scores > best[:, None]).sum(axis=1)  # [N_img] captions above the image's best own caption
    return [names[i] for i in order], {"i2t": np.minimum(i2t[order], PAST_TOP), "t2i": np.minimum(t2i[captions], PAST_TOP)}


def rsum(ranks: dict[str, np.ndarray]) -> float:
    return float(sum(100.0 * np.mean(ranks[d] <= k) for d in ("i2t", "t2i") for k in RECALL_AT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="NAME=ranked.jsonl, best first (the claimed order)")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="write the comparisons here")
    parser.add_argument("--store", type=Path, help="for NAME=scores.npy (training.evaluate --save-scores): its feature store")
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    named = [m.split("=", 1) for m in args.models]
    if len(named) < 2 or any(len(m) != 2 for m in named):
        parser.error("expected two or more NAME=FILE arguments")
    if any(path.endswith(".npy") for _, path in named) and args.store is None:
        parser.error("a NAME=scores.npy needs --store (the feature store the matrix was scored on)")
    loaded = {name: read_score_matrix(Path(path), args.store, args.split) if path.endswith(".npy") else read_ranks(Path(path))
              for name, path in named}
    images = {name: ids for name, (ids, _) in loaded.items()}
    if len({tuple(ids) for ids in images.values()}) != 1:
        raise InputError(f"{', '.join(images)}: expected the same image queries in every file")
    names = [name for name, _ in named]
    out = {"files": dict(named), "rsum": {n: rsum(loaded[n][1]) for n in names}, "comparisons": []}
    for a, b in [*zip(names, names[1:]), *([(names[0], names[-1])] if len(names) > 2 else [])]:
        result = paired_bootstrap(loaded[a][1], loaded[b][1], CAPTIONS_PER_IMAGE, samples=args.samples)
        out["comparisons"].append({"a": a, "b": b, **result})
        print(f"{a} - {b}: rsum {out['rsum'][a]:.2f} - {out['rsum'][b]:.2f} = {result['difference']:+.2f}, 95% interval "
              f"[{result['low']:+.2f}, {result['high']:+.2f}], {a} ahead in {100 * result['share_a_better']:.1f}% of resamples")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
