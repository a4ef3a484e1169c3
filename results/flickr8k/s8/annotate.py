"""Session 8's rows, one JSON each, in collect.py's form (metrics, the evaluation's command / wall time / peak RSS,
the scored model's training record), from the evaluation files in RUNS/EVALS.

    python results/flickr8k/s8/annotate.py --runs /work/runs --evals eval-s8
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collect import annotate_branches  # noqa: E402

HERE = Path(__file__).resolve().parent
RUN_OF = {"br8_wd05-w2r": "s8-wd05-w2r",  # W2R with AdamW weight decay 0.05 (session 6's recipe otherwise)
          "g14_o2w": "s8-g14-o2w", "g14_w2r": "s8-g14-w2r"}  # the 14x14 grid store, BSSAN alone exhaustive, no hub
KINDS = {"br8": ("tune_hub", "tune", "fused", "alone", "alone_all", "fused_k20"), "g14": ("alone_all",)}


if __name__ == "__main__":
    annotate_branches(HERE, RUN_OF, KINDS, "eval-s8")
