"""Session 13's rows, one JSON each, in collect.py's form (metrics, the evaluation's command / wall time / peak RSS,
the scored model's training record), from the evaluation files in RUNS/EVALS.

    python results/flickr8k/s13/annotate.py --runs /work/runs --evals eval-s13
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collect import annotate_branches  # noqa: E402

HERE = Path(__file__).resolve().parent
# pw_w2r: W2R alone with w2r_readout=per_word (its MLP scores each real word's LSTM state, Y their mean), preset widths;
# pw_full: the full model with that W2R and O2W at the preset (Bi-LSTM 64, MLP 64-32-1), session 6's recipe otherwise;
# s13_o2w: O2W alone at the preset, the same recipe, retrained on this session's store (the comparison's third row)
RUN_OF = {"pw_w2r": "perword-w2r", "pw_full": "perword-full", "s13_o2w": "s13-o2w"}
KINDS = {"pw": ("tune_hub", "tune", "fused_k20", "alone_all"), "s13": ("tune_hub", "tune", "fused_k20", "alone_all")}


if __name__ == "__main__":
    annotate_branches(HERE, RUN_OF, KINDS, "eval-s13")
