"""Session 12's rows, one JSON each, in collect.py's form (metrics, the evaluation's command / wall time / peak RSS,
the scored model's training record), from the evaluation files in RUNS/EVALS.

    python results/flickr8k/s12/annotate.py --runs /work/runs --evals eval-s12
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collect import annotate_branches, write_rows  # noqa: E402

HERE = Path(__file__).resolve().parent
# go_w2r: W2R (preset widths) attending over the 49 grid cells and the 10 detector boxes (w2r_regions=grid+objects);
# o128_full: the full model with O2W at twice the preset width (Bi-LSTM 128, MLP 128-64-1), W2R at the preset (128)
RUN_OF = {"go_w2r": "w2r-go", "o128_full": "full-o128"}
# the exported artifacts through engine.score --evaluate (its metrics: the last line of EVALS/<row>.txt): the new
# reference (o128_full) and session 6's, on this session's store (session 6's run is not on this machine: its rows
# carry no training record; models/reference's card in git history has it)
ENGINE_ROWS = {"newref": ("full-o128", ("engine_fp32_k20", "engine_fp16_k20", "engine_int8_k20", "engine_fp32_k100",
                                        "engine_alone_all")),
               "oldref": ("s6-share0", ("fused_k20", "alone_all"))}
KINDS = {"go": ("tune_hub", "tune", "fused_k20", "alone_all"),
         "o128": ("tune_sw", "tune_hub", "tune", "fused_k20", "fused_k100", "alone_all")}


def engine_rows(runs: Path, evals: Path) -> None:
    rows = []
    for prefix, (run, kinds) in ENGINE_ROWS.items():
        for kind in kinds:
            text = evals / f"{prefix}_{kind}.txt"
            if text.is_file():
                (evals / f"{prefix}_{kind}.json").write_text(text.read_text().strip().splitlines()[-1] + "\n")
                rows.append((f"{prefix}_{kind}", f"{prefix}_{kind}", run))
    print(f"wrote {write_rows(HERE, runs, evals, rows)} engine rows to {HERE}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--evals", default="eval-s12")
    args = parser.parse_args()
    annotate_branches(HERE, RUN_OF, KINDS, args.evals, ["--runs", str(args.runs), "--evals", args.evals])
    engine_rows(args.runs, args.runs / args.evals)
