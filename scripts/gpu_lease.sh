#!/usr/bin/env bash
# The prepared device run of issue 12, in two calls of one lease (the device tool's `run`, with
# carry ["gpu_pack"]; build the pack first: python -m training.gpu_run pack --data ../shared/data).
#
#   bash scripts/gpu_lease.sh call1     # ~6.7 min: fold A (from the bundled weights) and fold B (from scratch)
#   bash scripts/gpu_lease.sh call2     # ~5 min, on the still-warm machine: fold B continued from call 1
#   SMOKE=1 OUT=/tmp/o bash scripts/gpu_lease.sh call1   # the same flow on this CPU in a minute
#   bash scripts/gpu_lease.sh rule DIR  # afterwards, here on the CPU (~5 min a fold): each fold's
#                                       # patient rule, fitted on its own training backgrounds
#
# Everything either call starts from is in a fresh checkout or made by call 1 on the device
# (gpu_run refuses a missing start before it trains). Each call copies what the held-out
# evaluation needs into $OUT: OUT/<fold>/{wsnet-3class.safetensors,metrics.json,config.json},
# gpu_run.json and the log's tail.
set -uo pipefail
cd "$(dirname "$0")/.."

FOLD_A="holdout=cap001+LIDC-IDRI-0003+Lung_Dx-A0001"
FOLD_B="holdout=P001+normal001+LIDC-IDRI-0001"
# Training backgrounds of each fold: the pack's seven real lungs less the fold's held-out three.
TRAINED_A="P001,normal001,LIDC-IDRI-0001,totalseg-example"
TRAINED_B="cap001,LIDC-IDRI-0003,Lung_Dx-A0001,totalseg-example"
if [ "${1:-}" = rule ]; then
    # the fetched weights are read-only: each fold's copy with its fitted rule goes to runs/rule-<fold>
    dir=${2:?usage: bash scripts/gpu_lease.sh rule DIR}
    for fold in foldA foldB; do
        [ -f "$dir/$fold/wsnet-3class.safetensors" ] || continue
        if [ $fold = foldA ]; then trained=$TRAINED_A; held=${FOLD_A#holdout=}; else trained=$TRAINED_B; held=${FOLD_B#holdout=}; fi
        mkdir -p "runs/rule-$fold"
        python -m training.patient_rule "$dir/$fold/wsnet-3class.safetensors" --backgrounds gpu_pack/backgrounds \
            --patients "$trained" --check-patients "${held//+/,}" --out "runs/rule-$fold/wsnet-3class.safetensors" \
            --overwrite || exit $?
    done
    exit 0
fi
: "${OUT:?set OUT to the folder that comes back}"

# The 2.3.0/2.4 folds called a tumour and nodules pneumonia (docs/heldout/gpu_folds_2.4.md): more
# distractor nodules and masses in every class.
MIX="distractors=0.6,masses=0.6"
if [ -n "${SMOKE:-}" ]; then data=(--smoke); else data=(--pack gpu_pack); fi
# call 2 starts from call 1's fold B, left in this folder on the warm machine
base=${GPU_WORK:-/tmp}

case "${1:-}" in
call1)
    work=$base/g
    folds=(--wsnet-fold "name=foldA,minutes=2.5,init=wsnet-3class,$FOLD_A,version=2.5.0-gpu,$MIX"
           --wsnet-fold "name=foldB,minutes=3.25,init=none,$FOLD_B,version=2.5.0-gpu-foldB,$MIX")
    limit=440 ;;
call2)
    work=$base/g2
    folds=(--wsnet-fold "name=foldB,minutes=3.5,init=$base/g/foldB/wsnet-3class.safetensors,$FOLD_B,version=2.5.1-gpu-foldB,$MIX")
    limit=290 ;;
*)
    echo "usage: bash scripts/gpu_lease.sh call1|call2|rule DIR" >&2
    exit 2 ;;
esac

timeout "$limit" python -m training.gpu_run train "${data[@]}" --out "$work" --steps "" "${folds[@]}" \
    > "$work.log" 2>&1
rc=$?
for fold_dir in "$work"/fold*/; do
    fold=$(basename "$fold_dir")
    mkdir -p "$OUT/$fold"
    cp "$fold_dir"/wsnet-3class.safetensors "$fold_dir"/wsnet/{metrics.json,config.json} "$OUT/$fold/" 2>/dev/null
done
cp "$work/gpu_run.json" "$OUT/" 2>/dev/null
tail -c 20000 "$work.log" > "$OUT/gpu_run.log.tail"
grep -E "trained wsnet|detect|Error|error" "$work.log" | tail -20
echo "gpu_run exit $rc"
exit "$rc"
