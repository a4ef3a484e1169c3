"""A RANDOM-WEIGHT BSSAN checkpoint, clearly labelled, for building artifacts before a trained model exists.

    python -m benchmarks.random_model OUT_DIR [--preset demo] [--max-words 30] [--seed 0]

The CMake build (CMakeLists.txt) uses it when models/reference is absent, so that the export,
the TensorRT step and the parity tests can run end to end on a CPU-only machine. The checkpoint's
metrics.json says {"weights": "random", ...}: its scores mean nothing. BatchNorm running statistics
are randomised too, so a wrong BatchNorm fold in the export would show in the parity check.
An existing OUT_DIR is replaced only if it is a random-weight checkpoint of the same config.
"""

from __future__ import annotations

import sys
from pathlib import Path

from engine.cli import ArgumentParser, command, nonnegative_int, positive_int

RANDOM_LABEL = {"weights": "random", "note": "benchmarks.random_model: NOT a trained model; scores are meaningless"}


def write_random_model(out: Path, preset_name: str = "demo", max_words: int = 30, seed: int = 0) -> Path:
    import torch

    from training.checkpoint import save_checkpoint
    from training.config import TrainConfig, preset, replace_strict
    from training.model import BSSAN

    torch.manual_seed(seed)
    model = BSSAN(replace_strict(preset(preset_name), max_words=max_words)).eval()
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return save_checkpoint(out, model, TrainConfig(), metrics={**RANDOM_LABEL, "preset": preset_name, "seed": seed},
                           command=sys.argv)


@command
def main(argv: list[str] | None = None) -> int:

    parser = ArgumentParser(prog="python -m benchmarks.random_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, metavar="OUT_DIR")
    parser.add_argument("--preset", choices=("demo", "flickr8k", "paper"), default="demo")
    parser.add_argument("--max-words", type=positive_int, default=30, help="30 as the paper; the demo preset's own is 8")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    args = parser.parse_args(argv)
    path = write_random_model(args.out, args.preset, args.max_words, args.seed)
    print(f"{path}: RANDOM-WEIGHT {args.preset} BSSAN checkpoint (seed {args.seed}); not a trained model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
