"""Collect the Flickr8K test evaluations into results/flickr8k/<row>.json, table.md and dev_curves.png.

    python results/flickr8k/collect.py --runs /work/runs --out results/flickr8k

Every figure comes from engine.ranking's protocol (python -m training.evaluate or engine.score --evaluate
wrote it to RUNS/eval/<row>.json, timed by GNU time into RUNS/eval/<row>.time). Per row the JSON holds the
metrics, the exact evaluation command, the training command and epochs of the model it scored, training
wall time (sum of the epochs' training and dev time) and peak RSS, and the evaluation's wall time and peak
RSS. A row whose evaluation file is missing is listed as not evaluated, never filled in.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# (row, label, key of the training record of the model it scores or None, note)
ROWS = [
    ("test_dual", "first stage alone: dual encoder (max pooling), exhaustive (no correction)", "dual", ""),
    ("test_dual_hub", "first stage alone with its hubness correction (the product's first stage), exhaustive", "dual",
     "training.hubness: betas tuned on dev"),
    ("test_alone_all", "BSSAN alone, exhaustive (every pair, no fusion; with its hub correction)", "bssan",
     "engine, ONNX Runtime CPU fp32"),
    ("test_alone_k100", "BSSAN alone re-ranking the corrected first stage's top-100 (no fusion)", "bssan", ""),
    ("test_product_k20", "**product: top-20 re-ranked, fused (engine.score's default)**", "bssan", "fusion tuned on dev"),
    ("test_product_k100", "product: top-100 re-ranked, fused", "bssan", "fusion tuned on dev"),
    ("test_engine_fp32_k20", "product K=20 through engine.score, fp32", "bssan", "engine, ONNX Runtime CPU"),
    ("test_engine_fp16_k20", "product K=20 through engine.score, fp16 graphs", "bssan", "engine, ONNX Runtime CPU"),
    ("test_engine_int8_k20", "product K=20 through engine.score, int8 recurrence", "bssan", "engine, ONNX Runtime CPU"),
    ("nohub_test_product_k20", "the same BSSAN without the hub correction (session 4's reference): product K=20", "bssan",
     "fusion tuned on dev"),
    ("nohub_test_product_k100", "the same, without the hub correction: product K=100", "bssan", ""),
    ("nohub_test_alone_k100", "the same, without the hub correction: BSSAN alone re-ranking the top-100", "bssan", ""),
    ("nohub_test_alone_all", "the same, without the hub correction: BSSAN alone, exhaustive", "bssan",
     "engine, ONNX Runtime CPU fp32"),
    ("pw_test_product_k20", "the same BSSAN with the paper's branch weights (1, 0.6): product K=20", "bssan",
     "fusion re-tuned on dev"),
    ("pw_test_product_k100", "the same, paper's branch weights: product K=100", "bssan", ""),
    ("pw_test_alone_k100", "the same, paper's branch weights: BSSAN alone re-ranking the top-100", "bssan", ""),
    ("pw_test_alone_all", "the same, paper's branch weights: BSSAN alone, exhaustive", "bssan", "engine, ONNX Runtime CPU fp32"),
    ("prev_test_product_k20", "previous reference (hinge recipe, same first stage): product K=20", "prev-bssan",
     "2026-11-30 session 3"),
    ("prev_test_alone_k100", "previous reference: BSSAN alone re-ranking the top-100", "prev-bssan", "2026-11-30 session 3"),
    ("prev_test_alone_all", "previous reference: BSSAN alone, exhaustive", "prev-bssan", "2026-11-30 session 3"),
]
BRANCHES = [("full", "s4-grid"), ("w2r", "s4-grid-w2r"), ("o2w", "s4-grid-o2w")]  # (variant, run directory) of the grid recipe
ABLATIONS = ["full", "w2r", "o2w", "no_reg", "uniform", "no_mining", "tanh", "no_scaling", "paper_recipe"]
ABLATION_NAMES = {"full": "full (the recipe)", "w2r": "W2R only", "o2w": "O2W only", "no_reg": "full, no L_reg",
                  "uniform": "full, the paper's uniform attention for negatives", "no_mining": "full, random negatives only",
                  "tanh": "full, the paper's tanh-bounded attention", "no_scaling": "full, raw (unscaled) inputs",
                  "paper_recipe": "full, the paper's SGD recipe (lr 0.01, summed hinges, clip 2)"}


def gnu_time(path: Path) -> dict:
    """{"wall_seconds", "peak_rss_mb", "command"} from a `/usr/bin/time -v -o` file, {} if absent."""
    if not path.is_file():
        return {}
    text = path.read_text()
    out = {}
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if rss:
        out["peak_rss_mb"] = round(int(rss.group(1)) / 1024, 1)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if wall:
        seconds = 0.0
        for part in wall.group(1).split(":"):
            seconds = seconds * 60 + float(part)
        out["wall_seconds"] = round(seconds, 1)
    command = re.search(r"Command being timed: \"(.*)\"", text)
    if command:
        out["command"] = command.group(1)
    return out


def training_record(run: Path) -> dict:
    """Training facts of a run directory: command, configs, epochs, best epoch, wall time, peak RSS, dev curve."""
    if not (run / "run.json").is_file():
        return {}
    last = run / "last" / "metrics.json"
    metrics = json.loads(last.read_text()) if last.is_file() else {}
    history = metrics.get("dev", [])
    provenance = json.loads((run / "best" / "provenance.json").read_text()) if (run / "best" / "provenance.json").is_file() else {}
    config = json.loads((run / "run.json").read_text())
    seconds = sum(h.get("epoch_seconds") or (h["pairs"] / h["train_pairs_per_second"]) + h["dev_seconds"] for h in history)
    hwm = [h["peak_rss_mb"] for h in history if "peak_rss_mb" in h]
    return {"run": str(run), "command": " ".join(provenance.get("command") or []), "model": config["model"],
            "train": config["train"], "epochs": len(history), "best_epoch": metrics.get("best_epoch"),
            "wall_seconds": round(seconds, 1), "peak_rss_mb": max(hwm) if hwm else None,
            "dev": [{k: h.get(k) for k in ("epoch", "loss", "grad_norm_median", "clipped_share")}
                    | {"rsum": h["dev"]["rsum"], "fused_rsum": (h.get("fusion") or {}).get("rsum"),
                       "exhaustive_rsum": ((h.get("fusion") or {}).get("exhaustive") or {}).get("rsum")} for h in history]}


def fmt_row(label: str, metrics: dict | None, note: str = "") -> str:
    if metrics is None:
        return f"| {label} | not evaluated | | | | | | | | | | | {note} |"
    i2t, t2i = metrics["i2t"], metrics["t2i"]
    cells = [f"{i2t[k]:.1f}" for k in ("r1", "r5", "r10")] + [f"{i2t['medr']:.0f}", f"{i2t['meanr']:.1f}"]
    cells += [f"{t2i[k]:.1f}" for k in ("r1", "r5", "r10")] + [f"{t2i['medr']:.0f}", f"{t2i['meanr']:.1f}"]
    return f"| {label} | " + " | ".join(cells) + f" | {metrics['rsum']:.1f} | {note} |"


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def plot_dev_curves(runs: dict[str, dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))
    for index, (name, record) in enumerate(runs.items()):
        dev = record.get("dev") or []
        if not dev:
            continue
        epochs = [d["epoch"] for d in dev]
        axes[0].plot(epochs, [d["rsum"] for d in dev], marker="o", label=name, color=plt.cm.tab20(index % 20))
        if any(d["fused_rsum"] for d in dev):
            axes[1].plot(epochs, [d["fused_rsum"] for d in dev], marker="o", label=name, color=plt.cm.tab20(index % 20))
        if any(d.get("exhaustive_rsum") for d in dev):
            axes[2].plot(epochs, [d.get("exhaustive_rsum") for d in dev], marker="o", label=name, color=plt.cm.tab20(index % 20))
    axes[0].set(xlabel="epoch", ylabel="dev rsum", title="dev rsum: dual encoder exhaustive; BSSAN alone re-ranking top-20")
    axes[1].set(xlabel="epoch", ylabel="dev rsum", title="dev rsum of the product (top-20, fusion tuned per epoch)")
    axes[2].set(xlabel="epoch", ylabel="dev rsum (200 images x 1,000 captions)",
                title="BSSAN alone over every pair of the first 200 dev images")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def write_row(out: Path, evals: Path, row: str, metrics: dict, training: dict, label: str | None = None,
              source: str | None = None) -> None:
    """OUT/<row>.json: the evaluation's metrics, its GNU time record (EVALS/<source or row>.time) and the scored
    model's training record."""
    payload = {"row": row, "metrics": metrics, "evaluation": gnu_time(evals / f"{source or row}.time"), "training": training}
    if label is not None:
        payload["label"] = label
    (out / f"{row}.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_rows(out: Path, runs: Path, evals: Path, rows: list[tuple[str, str, str]]) -> int:
    """A session's rows: write_row for each (row, source, run) whose evaluation EVALS/<source>.json exists, with the
    training record of RUNS/<run>. Returns how many were written."""
    written = 0
    for row, source, run in rows:
        if (evals / f"{source}.json").is_file():
            metrics = json.loads((evals / f"{source}.json").read_text())
            write_row(out, evals, row, metrics, training_record(runs / run), source=source if source != row else None)
            written += 1
    return written


def annotate_branches(here: Path, run_of: dict[str, str], kinds: dict[str, tuple[str, ...]], evals: str,
                      argv: list[str] | None = None) -> None:
    """A session's annotate.py: rows PREFIX_KIND for each branch evaluation PREFIX in `run_of` (-> its training run)
    and each KIND of kinds[PREFIX without its last _part], from RUNS/EVALS into HERE."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--evals", default=evals)
    args = parser.parse_args(argv)
    rows = [(f"{prefix}_{kind}", f"{prefix}_{kind}", run) for prefix, run in run_of.items()
            for kind in kinds[prefix.rsplit("_", 1)[0]]]
    print(f"wrote {write_rows(here, args.runs, args.runs / args.evals, rows)} rows to {here}")


def branch_rows(args, prefix: str, label: str) -> list[str]:
    """Table lines (and one JSON each) of the branch rows PREFIX_{full,w2r,o2w}_{alone,fused,exh}."""
    runs, evals, lines = args.runs, args.runs / args.evals, []
    for name, run in BRANCHES:
        for kind, suffix in (("alone", "BSSAN alone at K=20"), ("fused", "fused at K=20 (fusion tuned on dev)"),
                             ("exh", "BSSAN alone, exhaustive")):
            row = f"{prefix}_{name}_{kind}"
            metrics = load(evals / f"{row}.json")
            if metrics is not None:
                write_row(args.out, evals, row, metrics, training_record(runs / run))
            lines.append(fmt_row(f"{ABLATION_NAMES[name]}{label}: {suffix}", metrics))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("/work/runs"))
    parser.add_argument("--out", type=Path, default=Path("results/flickr8k"))
    parser.add_argument("--bssan-run", default="s4-grid", help="run directory name of the reference BSSAN")
    parser.add_argument("--prev-bssan-run", default="bssan-std", help="run directory name of the previous reference BSSAN")
    parser.add_argument("--alt-run", default="bssan-big", help="run directory name of the wider BSSAN behind the same first stage")
    parser.add_argument("--dual-run", default="dual-max", help="run directory name of the reference first stage")
    parser.add_argument("--evals", default="eval", help="folder (under --runs) of the evaluation JSON and GNU time files")
    args = parser.parse_args(argv)
    runs, evals = args.runs, args.runs / args.evals
    trainings = {"dual": training_record(runs / args.dual_run), "bssan": training_record(runs / args.bssan_run),
                 "bssan-alt": training_record(runs / args.alt_run), "prev-dual": training_record(runs / "dual"),
                 "prev-bssan": training_record(runs / args.prev_bssan_run)}
    header = ("| model | i2t R@1 | R@5 | R@10 | medr | meanr | t2i R@1 | R@5 | R@10 | medr | meanr | rsum | notes |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    for row, label, model, note in ROWS:
        metrics = load(evals / f"{row}.json")
        if metrics is not None:
            write_row(args.out, evals, row, metrics, trainings.get(model) or {}, label)
        lines.append(fmt_row(label, metrics, note))
    lines.append("| *branches under the reference's recipe and budget (loss=grid, 8 epochs each, the same first stage with its "
                 "correction; full with the paper's branch weights (1, 0.6))* | | | | | | | | | | | | |")
    lines += branch_rows(args, "abl4", "")
    lines.append("| *the same branch models with their own hub correction (session 5: --tune-hub 1000 --hub-bank 512 "
                 "--hub-bank-images 64 on dev; full: the reference's, --tune-hub 300 --hub-bank 256 --hub-bank-images 32)* "
                 "| | | | | | | | | | | | |")
    lines += branch_rows(args, "hub5", " + hub correction")
    lines.append("| *ablations of the previous (hinge) recipe, 3 epochs each, first stage: the dual encoder after 1 epoch (dev 235.4); "
                 "K = 20 (sessions 2-3)* | | | | | | | | | | | | |")
    for name in ABLATIONS:
        run = runs / f"abl-{name}"
        for kind, suffix in (("alone", "BSSAN alone at K=20"), ("fused", "fused at K=20")):
            metrics = load(evals / f"abl_{name}_{kind}.json")
            if metrics is not None:
                write_row(args.out, evals, f"abl_{name}_{kind}", metrics, training_record(run))
            lines.append(fmt_row(f"{ABLATION_NAMES[name]}: {suffix}", metrics))
    (args.out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    curves = {"dual encoder, max pooling (reference first stage)": trainings["dual"],
              "BSSAN reference (loss=grid)": trainings["bssan"],
              "W2R only (loss=grid)": training_record(runs / "s4-grid-w2r"), "O2W only (loss=grid)": training_record(runs / "s4-grid-o2w"),
              "previous reference BSSAN (hinge)": trainings["prev-bssan"], "BSSAN W2R 256 / O2W 128 (hinge)": trainings["bssan-alt"]}
    plot_dev_curves({k: v for k, v in curves.items() if v}, args.out / "dev_curves.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
