"""Session 6's rows, one JSON each, in collect.py's form (metrics, the evaluation's command / wall time / peak RSS,
the scored model's training record), from the evaluation files in RUNS/EVALS.

    python results/flickr8k/s6/annotate.py --runs /work/runs --evals eval-s6
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collect import write_rows  # noqa: E402

HERE = Path(__file__).resolve().parent
ROWS = ("test_product_k20", "test_product_k100", "test_alone_k20", "test_alone_k100", "test_alone_all", "test_engine_fp32_k20",
        "test_engine_fp16_k20", "test_engine_int8_k20", "test_engine_fp32_k100", "tune_fusion", "share0_tune_hub",
        "share0_tune_score_weights", "ft25_tune_hub", "ft25_tune_score_weights", "ftb50_tune_hub", "ftb50_tune_score_weights",
        "ftb50_tune_fusion", "ftb50_alone_all", *(f"br6_{b}_{k}" for b in ("w2r", "o2w")
                                                  for k in ("tune_hub", "tune", "fused", "alone", "alone_all")))
SOURCE = {"test_alone_all": "share0_alone_all"}  # row -> its evaluation's name in the evals folder
RUN_OF = {"br6_w2r": "s6-share0-w2r", "br6_o2w": "s6-share0-o2w", "ft25": "s6-ft25", "ftb50": "s6-ftb50"}  # else s6-share0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--evals", default="eval-s6")
    args = parser.parse_args()
    rows = [(row, SOURCE.get(row, row), next((run for prefix, run in RUN_OF.items() if row.startswith(prefix)), "s6-share0"))
            for row in ROWS]
    print(f"wrote {write_rows(HERE, args.runs, args.runs / args.evals, rows)} rows to {HERE}")


if __name__ == "__main__":
    main()
