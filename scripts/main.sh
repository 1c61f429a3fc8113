#!/usr/bin/env bash
# The main job on built-in data, end to end on the CPU (18 minutes measured on 2 idle cores):
#   set up and build -> check every fused op against its reference -> write the synthetic COCO
#   dataset -> train D-FINE-N on it with the fused kernels -> COCO evaluation -> AP table and
#   training curve -> predictions drawn on a validation image.
# Everything lands in $OUT (default output/dfine_hgnetv2_n_synthetic).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CFG=configs/dfine/dfine_hgnetv2_n_synthetic.yml
OUT=${OUT:-output/dfine_hgnetv2_n_synthetic}
DATA=${DATA:-data/synthetic}

bash scripts/setup.sh
$PY -m dfine.ops.compare --quick
[ -f "$DATA/annotations/instances_val.json" ] || $PY -m dfine.data.synthetic --out "$DATA"
# jemalloc without decay: freed activations are reused, not faulted in again every step
JEMALLOC=$(ldconfig -p 2>/dev/null | awk '/libjemalloc.so.2 /{print $NF; exit}')
LD_PRELOAD=${JEMALLOC:+$JEMALLOC${LD_PRELOAD:+:$LD_PRELOAD}} MALLOC_CONF=${MALLOC_CONF:-dirty_decay_ms:-1,muzzy_decay_ms:-1} \
$PY train.py -c "$CFG" --output-dir "$OUT" \
    -u train_dataloader.dataset.img_folder="$DATA/train" \
       train_dataloader.dataset.ann_file="$DATA/annotations/instances_train.json" \
       val_dataloader.dataset.img_folder="$DATA/val" \
       val_dataloader.dataset.ann_file="$DATA/annotations/instances_val.json" \
       ${TRAIN_OVERRIDES:-}
$PY -m dfine report "$OUT" | tee "$OUT/ap_table.md"
IMAGE=$(ls "$DATA/val" | head -n 1)
$PY -m dfine predict -c "$CFG" -r "$OUT/best.pth" --input "$DATA/val/$IMAGE" --output "$OUT/predictions" --threshold 0.5
echo "AP table: $OUT/ap_table.md | curve: $OUT/curve.png | predictions: $OUT/predictions"
