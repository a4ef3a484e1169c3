"""Session 9's rows, one JSON each, in collect.py's form (metrics, the evaluation's command / wall time / peak RSS,
the scored model's training record), from the evaluation files in RUNS/EVALS.

    python results/flickr8k/s9/annotate.py --runs /work/runs --evals eval-s9
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collect import annotate_branches  # noqa: E402

HERE = Path(__file__).resolve().parent
RUN_OF = {"sd3_w2r": "s9-sd3-w2r", "sd3_o2w": "s9-sd3-o2w",  # state_dropout=0.3 (session 6's recipe otherwise)
          "fb1_w2r": "s9-fb1-w2r", "fb1_o2w": "s9-fb1-o2w",  # lstm_forget_bias=1.0
          "mean_w2r": "s9-mean-w2r", "plain_o2w": "s9-plain-o2w"}  # w2r_readout=mean; O2W on the plain recipe
KINDS = {"sd3": ("tune_hub", "tune", "fused_k20", "alone_all"), "fb1": ("tune_hub", "tune", "fused_k20", "alone_all"),
         "mean": ("tune_hub", "tune", "fused_k20", "alone_all"), "plain": ("tune_hub", "tune", "fused_k20", "alone_all")}


if __name__ == "__main__":
    annotate_branches(HERE, RUN_OF, KINDS, "eval-s9")
