#!/usr/bin/env bash
# Set up refseg and run its main job with the shipped default model:
#   1. generate a small SynthRef natural split (the benchmark refseg is measured on),
#   2. segment one test image from an expression -> out/quickstart/overlay.png + mask.png,
#   3. evaluate the default model on the generated test split -> a metrics table + JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -c constraints.txt -e .
RS=.venv/bin/refseg
OUT=out/quickstart
DATA=data/synthref-natural-tiny-s7
[ -f "$DATA/synthref.json" ] || $RS make-data --domain natural --preset tiny --seed 7 --out "$DATA"
$RS stats "$DATA"
read -r IMG TEXT < <(.venv/bin/python -c "
from refseg.data import load_refer
d = load_refer('$DATA'); s = d.samples('test')[0]
print(d.images_dir / d.images[s.image_id]['file_name'], s.text)")
echo "image: $IMG   expression: \"$TEXT\""
$RS predict --model lts-synthref --image "$IMG" --text "$TEXT" --out "$OUT/overlay.png" --mask-out "$OUT/mask.png"
$RS eval --checkpoint lts-synthref --data "$DATA" --split test --out "$OUT/eval-test.json" --save-vis 8 --vis-dir "$OUT/vis"
echo "overlay: $OUT/overlay.png   mask: $OUT/mask.png   metrics: $OUT/eval-test.json"
