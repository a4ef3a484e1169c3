"""Add the evaluation's wall time / peak RSS (GNU time files) and the scored model's training record to the
session-6 rows, as collect.py does for its table's rows.

    python results/flickr8k/s6/annotate.py --runs /work/runs --evals eval-s6
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collect import gnu_time, training_record  # noqa: E402

HERE = Path(__file__).resolve().parent
TIME_OF = {"test_alone_all": "share0_alone_all"}  # row -> its evaluation's name in the evals folder
RUN_OF = {"br6_w2r": "s6-share0-w2r", "br6_o2w": "s6-share0-o2w", "ft25": "s6-ft25", "ftb50": "s6-ftb50"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--evals", default="eval-s6")
    args = parser.parse_args()
    for path in sorted(HERE.glob("*.json")):
        if path.name.startswith("dev_curves"):
            continue
        row = json.loads(path.read_text())
        name = path.stem
        timing = gnu_time(args.runs / args.evals / f"{TIME_OF.get(name, name)}.time")
        if timing:
            row["evaluation"] = timing
        run = next((run for prefix, run in RUN_OF.items() if name.startswith(prefix)), "s6-share0")
        row["trained"] = training_record(args.runs / run)
        path.write_text(json.dumps(row, indent=2, sort_keys=True) + "\n")
    print(f"annotated {HERE}")


if __name__ == "__main__":
    main()
