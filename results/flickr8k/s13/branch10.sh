#!/usr/bin/env bash
# branch10.sh NAME RUN [THREADS [THREADS_ALONE]]: hub + fusion on dev, test fused K=20, test alone exhaustive (scores saved)
set -e
NAME=$1; RUN=$2; T=${3:-1}; TA=${4:-$T}
E=/work/runs/eval-s13; mkdir -p $E
C=$E/ck_$NAME
[ -d $C ] || cp -r /work/runs/$RUN/best $C
PY=/work/main/.venv/bin/python; S=/work/stores/flickr8k; SL=/work/main/models/reference-shortlist
cd /work/snap
echo "[$(date +%T)] $NAME hub" ; /usr/bin/time -v -o $E/${NAME}_tune_hub.time $PY -m training.evaluate --checkpoint $C --store $S --split dev --tune-hub 300 --hub-bank 256 --hub-bank-images 32 --json $E/${NAME}_tune_hub.json --force --no-progress --threads $T
echo "[$(date +%T)] $NAME fusion"; /usr/bin/time -v -o $E/${NAME}_tune.time $PY -m training.evaluate --checkpoint $C --store $S --split dev --shortlist $SL --shortlist-k 20 --tune-fusion --json $E/${NAME}_tune.json --force --no-progress --threads $T
echo "[$(date +%T)] $NAME test fused"; /usr/bin/time -v -o $E/${NAME}_fused_k20.time $PY -m training.evaluate --checkpoint $C --store $S --split test --shortlist $SL --shortlist-k 20 --json $E/${NAME}_fused_k20.json --force --no-progress --threads $T
echo "[$(date +%T)] $NAME test alone"; /usr/bin/time -v -o $E/${NAME}_alone_all.time $PY -m training.evaluate --checkpoint $C --store $S --split test --no-fusion --save-scores $E/${NAME}_exh.npy --json $E/${NAME}_alone_all.json --force --no-progress --threads $TA
echo "[$(date +%T)] $NAME done"
