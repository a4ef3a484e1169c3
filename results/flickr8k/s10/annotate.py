"""Session 10/11's rows, one JSON each, in collect.py's form (metrics, the evaluation's command / wall time / peak RSS,
the scored model's training record), from the evaluation files in RUNS/EVALS.

    python results/flickr8k/s10/annotate.py --runs /work/runs --evals eval-s10
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collect import annotate_branches  # noqa: E402

HERE = Path(__file__).resolve().parent
# both branches at twice the preset widths (W2R LSTM 256, MLP 256-128-1; O2W Bi-LSTM 128, MLP 128-64-1), the
# session-6 recipe otherwise; "full" is both together
RUN_OF = {"w2x_w2r": "w256-w2r", "w2x_o2w": "w128-o2w", "w2x_full": "w256-full"}
KINDS = {"w2x": ("tune_hub", "tune", "fused_k20", "alone_all")}


if __name__ == "__main__":
    annotate_branches(HERE, RUN_OF, KINDS, "eval-s10")
