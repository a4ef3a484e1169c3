"""Dev curves of training runs side by side (BSSAN alone at K=20, the fused product at K=20, BSSAN alone over
every pair of the trainer's exhaustive dev images) -> one PNG and the curves as JSON.

    python results/flickr8k/plot_curves.py --runs /work/runs --out results/flickr8k/s7/dev_curves_dropout.png \
        --title "..." s6-share0="full, no dropout" s7-drop="full, input_dropout 0.2" ...

Each RUN=LABEL names a run directory under --runs (its per-epoch record is read by collect.training_record);
runs without a record yet are left out. `--earlier FILE.json:RUN=LABEL` adds a curve an earlier session saved (the
JSON this script writes), for runs whose directories are gone (dashed).
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collect import training_record  # noqa: E402

METRICS = (("rsum", "BSSAN alone, K=20 (whole dev)"), ("fused_rsum", "fused product, K=20 (whole dev)"),
           ("exhaustive_rsum", "BSSAN alone, every pair of the exhaustive dev images"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_labels", nargs="+", metavar="RUN=LABEL")
    parser.add_argument("--runs", type=Path, required=True, help="the folder holding the run directories")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write (the JSON goes beside it)")
    parser.add_argument("--title", default="Flickr8K dev per epoch")
    parser.add_argument("--earlier", action="append", default=[], metavar="FILE.json:RUN=LABEL",
                        help="a curve from an earlier session's saved JSON (repeatable)")
    args = parser.parse_args(argv)
    labels = dict(item.split("=", 1) for item in args.runs_labels if "=" in item)
    if len(labels) != len(args.runs_labels):
        parser.error("expected RUN=LABEL arguments")
    curves = {name: training_record(args.runs / name).get("dev") for name in labels}
    curves = {name: dev for name, dev in curves.items() if dev}
    earlier = set()
    for item in args.earlier:
        path, _, run_label = item.rpartition(":")
        run, _, label = run_label.partition("=")
        saved = json.loads(Path(path).read_text()) if path and Path(path).is_file() else {}
        if not label or run not in saved:
            parser.error(f"--earlier {item}: expected FILE.json:RUN=LABEL with RUN one of the file's curves")
        curves[run], labels[run] = saved[run], label
        earlier.add(run)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for ax, (key, title) in zip(axes, METRICS):
        for name, dev in curves.items():
            ax.plot([e["epoch"] for e in dev], [e[key] for e in dev], marker="o", label=labels[name],
                    linestyle="--" if name in earlier else "-")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("rsum")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(args.title)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    args.out.with_suffix(".json").write_text(json.dumps(curves, indent=1) + "\n")
    print(f"wrote {args.out} ({', '.join(curves)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
