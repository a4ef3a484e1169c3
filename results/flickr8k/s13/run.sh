#!/usr/bin/env bash
# run.sh NAME EPOCHS THREADS [--set ...]
NAME=$1; E=$2; T=$3; shift 3
cd /work/snap
exec /work/main/.venv/bin/python -m training.train --store /work/stores/flickr8k --out /work/runs/$NAME --preset flickr8k --word-set minilm --set batch_images=25 --set first_stage=/work/main/models/reference-shortlist --set mined_fraction=0.5 --set loss=grid --set neighbour_share=0 --set dev_exhaustive_images=200 --epochs $E --threads $T --no-progress "$@" >> /work/runs/$NAME.log 2>&1
