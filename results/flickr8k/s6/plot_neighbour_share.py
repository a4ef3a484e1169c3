"""Dev curves of session 6's recipe runs (neighbour_share, and the branches on random batches) -> PNG + JSON.

    python results/flickr8k/s6/plot_neighbour_share.py --runs /work/runs --out results/flickr8k/s6
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collect import training_record  # noqa: E402

RUNS = {  # run directory -> label
    "s4-grid": "full, neighbour groups (share 1; session 4 reference, 8-epoch cosine)",
    "s6-share30": "full, share 0.3 (stopped after 3 epochs)",
    "s6-share0": "full, random batches (share 0): the new reference",
    "s6-share0-w2r": "W2R only, random batches",
    "s6-share0-o2w": "O2W only, random batches",
}
METRICS = (("rsum", "BSSAN alone, K=20 (whole dev)"), ("fused_rsum", "fused product, K=20 (whole dev)"),
           ("exhaustive_rsum", "BSSAN alone, every pair of 200 dev images"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    curves = {name: training_record(args.runs / name).get("dev") for name in RUNS}
    curves = {name: dev for name, dev in curves.items() if dev}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for ax, (key, title) in zip(axes, METRICS):
        for name, c in curves.items():
            ax.plot([e["epoch"] for e in c], [e[key] for e in c], marker="o", label=RUNS[name])
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
