"""Dev curves of session 6's recipe runs (neighbour_share, and the branches on random batches) -> PNG + JSON.

    python results/flickr8k/s6/plot_neighbour_share.py --runs /work/runs --out results/flickr8k/s6
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RUNS = {  # run directory -> label
    "s4-grid": "full, neighbour groups (share 1; session 4 reference, 8-epoch cosine)",
    "s6-share30": "full, share 0.3 (stopped after 3 epochs)",
    "s6-share0": "full, random batches (share 0): the new reference",
    "s6-share0-w2r": "W2R only, random batches",
    "s6-share0-o2w": "O2W only, random batches",
}
METRICS = (("dev", "BSSAN alone, K=20 (whole dev)"), ("fused", "fused product, K=20 (whole dev)"),
           ("exhaustive", "BSSAN alone, every pair of 200 dev images"))


def curve(run: Path) -> dict:
    history = json.loads((run / "last" / "metrics.json").read_text())["dev"]
    return {"epoch": [e["epoch"] for e in history], "dev": [e["dev"]["rsum"] for e in history],
            "fused": [e["fusion"]["rsum"] for e in history], "exhaustive": [e["fusion"]["exhaustive"]["rsum"] for e in history]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    curves = {name: curve(args.runs / name) for name in RUNS if (args.runs / name / "last" / "metrics.json").is_file()}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for ax, (key, title) in zip(axes, METRICS):
        for name, c in curves.items():
            ax.plot(c["epoch"], c[key], marker="o", label=RUNS[name])
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("rsum")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Flickr8K dev per epoch: loss=grid with neighbour-grouped vs random batches (session 6)")
    fig.tight_layout()
    fig.savefig(args.out / "dev_curves_neighbour_share.png", dpi=110)
    (args.out / "dev_curves_neighbour_share.json").write_text(json.dumps(curves, indent=1) + "\n")
    print(f"wrote {args.out / 'dev_curves_neighbour_share.png'}")


if __name__ == "__main__":
    main()
