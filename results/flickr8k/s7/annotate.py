"""Session 7's rows, one JSON each, in collect.py's form (metrics, the evaluation's command / wall time / peak RSS,
the scored model's training record), from the evaluation files in RUNS/EVALS.

    python results/flickr8k/s7/annotate.py --runs /work/runs --evals eval-s7
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collect import annotate_branches  # noqa: E402

HERE = Path(__file__).resolve().parent
RUN_OF = {"br7_drop-w2r": "s7-drop-w2r", "br7_drop-o2w": "s7-drop-o2w",  # input_dropout 0.2, random batches
          "br7_seed1-w2r": "s7-seed1-w2r", "br7_seed1-o2w": "s7-seed1-o2w",  # session 6's recipe, seed 1
          "s6_br6_w2r": "s6-share0-w2r", "s6_br6_o2w": "s6-share0-o2w"}  # session 6's branches, fused K=20 through the engine
KINDS = {"br7": ("tune_hub", "tune", "fused", "alone", "alone_all", "fused_k20"), "s6_br6": ("fused_k20",)}


if __name__ == "__main__":
    annotate_branches(HERE, RUN_OF, KINDS, "eval-s7")
