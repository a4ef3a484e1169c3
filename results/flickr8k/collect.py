"""Collect the Flickr8K runs into results/flickr8k/<setting>_<variant>.json and the README table.

    python results/flickr8k/collect.py --runs runs --out results/flickr8k

Reads, per run NAME (= <setting>_<variant>): runs/NAME/best (metrics.json: dev per epoch, best
epoch; provenance.json: the exact training command), runs/NAME/run.json (configs),
runs/NAME.time and runs/eval/NAME.time (GNU time -v: wall time and peak RSS of training and of
the test evaluation), runs/eval/NAME.json (test metrics from python -m training.evaluate).
Rows whose test evaluation is missing are listed as not evaluated, never filled in.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

SETTINGS = {"paper-offline": "GloVe-50 words (glove50)", "plus": "MiniLM-L6 token vectors (minilm)"}
VARIANTS = ["full", "w2r", "o2w", "no_reg", "softmax", "softmax_long", "negimg", "dual_encoder"]
VARIANT_NAMES = {"full": "BSSAN full, paper's uniform negative attention", "w2r": "W2R only (softmax negatives)",
                 "o2w": "O2W only (softmax negatives)", "no_reg": "full, no L_reg (softmax negatives)",
                 "softmax": "BSSAN full, softmax negative attention",
                 "softmax_long": "BSSAN full, softmax negative attention, more epochs (2 + resumed)",
                 "negimg": "BSSAN full, softmax negatives + negative images, 4 epochs (the reference model)", "dual_encoder": "dual encoder (VSE-style)"}
PUBLISHED = [  # other papers' results on other features (their own CNN features), Flickr8K test 1K images
    ("FV GMM+HGLMM (Klein et al., 2015)", (31.0, 59.3, 73.7), (21.2, 50.0, 64.8)),
    ("m-CNN ensemble (Ma et al., 2015)", (24.8, 53.7, 67.1), (20.3, 47.6, 61.7)),
    ("DVSA (Karpathy & Fei-Fei, 2015)", (16.5, 40.6, 54.2), (11.8, 32.1, 44.7)),
]


def gnu_time(path: Path) -> dict:
    """{"wall_seconds", "peak_rss_mb"} from a `/usr/bin/time -v -o` file, {} if absent."""
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
    return out


def collect(runs: Path, name: str) -> dict | None:
    run = runs / name
    if not (run / "best" / "metrics.json").is_file():
        return None
    metrics = json.loads((run / "best" / "metrics.json").read_text())
    last = run / "last" / "metrics.json"  # every epoch run (best/ holds the history up to the best epoch)
    history = json.loads(last.read_text())["dev"] if last.is_file() else metrics["dev"]
    provenance = json.loads((run / "best" / "provenance.json").read_text())
    config = json.loads((run / "run.json").read_text())
    train_seconds = sum(h["pairs"] / h["train_pairs_per_second"] + h["dev_seconds"] for h in history)
    setting, variant = name.split("_", 1)
    row = {"setting": setting, "variant": variant, "word_set": config["train"]["word_set"], "kind": config["kind"],
           "model": config["model"], "train": config["train"], "epochs": len(history), "best_epoch": metrics["best_epoch"],
           "train_command": " ".join(provenance.get("command") or []),
           "train_compute_seconds": round(train_seconds, 1),
           "train_pairs_per_second": [h["train_pairs_per_second"] for h in history],
           "train_process": gnu_time(runs / f"{name}.time"),
           "dev": {"images": history[-1]["dev_images"], "best": metrics.get("best_dev"),
                   "per_epoch": [{"epoch": h["epoch"], "loss": h["loss"], "rsum": h["dev"]["rsum"]} for h in history]}}
    test_path = runs / "eval" / f"{name}.json"
    if test_path.is_file():
        row["test"] = json.loads(test_path.read_text())
        row["test_process"] = gnu_time(runs / "eval" / f"{name}.time")
        command = re.search(r"Command being timed: \"(.*)\"", (runs / "eval" / f"{name}.time").read_text()) \
            if (runs / "eval" / f"{name}.time").is_file() else None
        row["test_command"] = command.group(1) if command else None
    exhaustive = runs / "eval" / f"{name}.exhaustive.json"
    if exhaustive.is_file():
        row["test_exhaustive"] = json.loads(exhaustive.read_text())
        row["test_exhaustive_process"] = gnu_time(runs / "eval" / f"{name}.exhaustive.time")
    return row


def fmt_row(label: str, i2t: dict, t2i: dict, rsum: float, note: str = "") -> str:
    cells = [f"{i2t[k]:.1f}" for k in ("r1", "r5", "r10")] + [f"{i2t['medr']:.0f}", f"{i2t['meanr']:.1f}"]
    cells += [f"{t2i[k]:.1f}" for k in ("r1", "r5", "r10")] + [f"{t2i['medr']:.0f}", f"{t2i['meanr']:.1f}"]
    return f"| {label} | " + " | ".join(cells) + f" | {rsum:.1f} | {note} |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=Path("results/flickr8k"))
    args = parser.parse_args(argv)
    rows = []
    for setting in SETTINGS:
        for variant in VARIANTS:
            row = collect(args.runs, f"{setting}_{variant}")
            if row is None:
                continue
            rows.append(row)
            path = args.out / f"{setting}_{variant}.json"
            path.write_text(json.dumps(row, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    header = ("| model | i2t R@1 | R@5 | R@10 | medr | meanr | t2i R@1 | R@5 | R@10 | medr | meanr | rsum | notes |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    for row in rows:
        label = f"{row['setting']}: {VARIANT_NAMES[row['variant']]}"
        note = "" if row["variant"] == "dual_encoder" else "shortlist protocol K=100"
        if row["setting"] == "plus":
            note += ("; " if note else "") + "MiniLM's training captions include Flickr30K and COCO, which overlap Flickr8K's"
        if "test" in row:
            t = row["test"]
            lines.append(fmt_row(label, t["i2t"], t["t2i"], t["rsum"], note))
        else:
            lines.append(f"| {label} | not evaluated on test | | | | | | | | | | | |")
        if "test_exhaustive" in row:
            t = row["test_exhaustive"]
            lines.append(fmt_row(label + " (exhaustive 1K x 5K)", t["i2t"], t["t2i"], t["rsum"], note.replace("shortlist protocol K=100", "exhaustive")))
    lines.append("| *other papers, other features:* | | | | | | | | | | | | |")
    for label, i2t, t2i in PUBLISHED:
        lines.append(f"| {label} | {i2t[0]} | {i2t[1]} | {i2t[2]} | | | {t2i[0]} | {t2i[1]} | {t2i[2]} | | | "
                     f"{sum(i2t) + sum(t2i):.1f} | published, their own features |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    costs = ["| row | epochs (best) | training: wall s (process) | train + dev compute s | positive pairs/s per epoch | "
             "training peak RSS MB | test eval s | test eval peak RSS MB | dev rsum (images) | shortlist recall i2t / t2i |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        test, proc, eproc = row.get("test", {}), row["train_process"], row.get("test_process", {})
        recall = test.get("shortlist_recall")
        costs.append(f"| {row['setting']}_{row['variant']} | {row['epochs']} ({row['best_epoch']}) | {proc.get('wall_seconds', '')} | "
                     f"{row['train_compute_seconds']} | {', '.join(str(p) for p in row['train_pairs_per_second'])} | "
                     f"{proc.get('peak_rss_mb', '')} | {test.get('seconds', '')} | {eproc.get('peak_rss_mb', '')} | "
                     f"{round(row['dev']['best']['rsum'], 1) if row['dev']['best'] else ''} ({row['dev']['images']}) | "
                     f"{'%.1f / %.1f' % (recall['i2t'], recall['t2i']) if recall else 'exhaustive' if test else ''} |")
    (args.out / "costs.md").write_text("\n".join(costs) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
