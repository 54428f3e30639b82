#!/usr/bin/env bash
# small_af2 trained from scratch on one GPU on the prepared openfold_af2_testdata chains until the mean
# lDDT-Ca of the training chains (EMA weights, whole chains, 3 recycles) reaches TARGET (default 0.8).
#
#   scripts/train_small_af2_gpu.sh [KERNELS] [SECONDS]
#
# KERNELS: reference | auto (default auto: the Triton kernels where they support the shapes).
# SECONDS: stop (SIGTERM) after this long; run again to resume from the newest checkpoint in RUN.
# Env: RUN (default runs/small_af2-gpu), DATA (default cache/openfold_testdata, from
#   foldforge prepare --mmcif-dir ../shared/data/openfold_af2_testdata/mmcifs
#     --msa-dir ../shared/data/openfold_af2_testdata/alignments_per_chain
#     --template-mmcif-dir ../shared/data/openfold_af2_testdata/mmcifs --out cache/openfold_testdata),
#   TARGET (0.8), MAX_STEPS (20000), BATCH (samples per step of a new run; default: the preset's),
#   EVAL_EVERY (steps between evaluations of a new run, default 200).
set -euo pipefail
KERNELS=${1:-auto}
SECONDS_LIMIT=${2:-0}
RUN=${RUN:-runs/small_af2-gpu}
DATA=${DATA:-cache/openfold_testdata}
TARGET=${TARGET:-0.8}
MAX_STEPS=${MAX_STEPS:-20000}
EVAL_EVERY=${EVAL_EVERY:-200}
kernel_sets=()
for op in attention layer_norm triangle_mult outer_product_mean transition gated_output dropout; do
    kernel_sets+=("model.kernels.$op=$KERNELS")
done
args=(--max-steps "$MAX_STEPS" --target-lddt "$TARGET" --no-progress)
if [ -f "$RUN/config.json" ]; then
    args+=(--out "$RUN" --resume)
else
    args+=(--preset small_af2 --data "$DATA" --out "$RUN" --set train.eval_train_chains=-1
           train.target_split=train train.eval_every="$EVAL_EVERY" train.checkpoint_every=100 "${kernel_sets[@]}")
    if [ -n "${BATCH:-}" ]; then
        args+=(train.batch_size="$BATCH")
    fi
fi
if [ "$SECONDS_LIMIT" -gt 0 ]; then
    exec timeout --signal=TERM "$SECONDS_LIMIT" python3 -m foldforge train "${args[@]}"
fi
exec python3 -m foldforge train "${args[@]}"
