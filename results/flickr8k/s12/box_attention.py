"""How much of W2R's attention goes to the detector boxes in a w2r_regions='grid+objects' model: per real word of
each of the first N dev images' first caption, the attention mass on the P boxes (after the D grid cells).

    python results/flickr8k/s12/box_attention.py --checkpoint /work/runs/w2r-go/best --store /work/stores/flickr8k
"""
import argparse
import json

import numpy as np
import torch

from engine.store import FeatureStore
from training.checkpoint import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.checkpoint)
    model, config = ckpt.model.eval(), ckpt.model_config
    split = FeatureStore(args.store).split("dev")
    images = np.arange(args.images)
    captions = images * split.captions_per_image()
    lengths = np.asarray(split.lengths)
    weights = model.attention_weights(split.regions, split.objects, split.words(ckpt.train_config.word_set), lengths,
                                      images, captions)["word_to_region"]  # [N, L, D + P]
    words = int(lengths[captions].sum())  # padding words' rows are zero (attention_weights): sums run over real words
    out = {"checkpoint": args.checkpoint, "dev_images": args.images, "real_words": words,
           "box_mass": float(weights[..., config.region_count:].sum() / words),
           "box_mass_uniform": config.object_count / (config.region_count + config.object_count),
           "max_weight": float(weights.max(-1).values.sum() / words)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
