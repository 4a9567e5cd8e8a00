#!/bin/bash
# Semi-supervised vs supervised-only on the half-resolution LA data, same seed and iteration budget, then the
# predictive net, the auxiliary net and the ensemble of each run evaluated on the validation split.
#
#   python bundle/scripts/prepare_la.py convert --data_root ../shared/data/la_half --output_dir /data/la_half_nii \
#     --num_labelled 8 --num_validation 16 --spacing 1.25
#   bash benchmarks/la_half_ssl_vs_sup.sh /data/la_half_nii /tmp/la_half_runs 1500 [extra bundle overrides...]
#
# Both trainings run at the same time (one GPU holds both; on a CPU set OMP_NUM_THREADS). Each run validates six
# times (every ITERS/6 iterations) and keeps the best ensemble in <out>/<run>/models/model.pt; the evaluations
# write CSVs to <out>/<run>/eval_{0505,10,01}/ (deploy weights [0.5,0.5] ensemble, [1,0] predictive, [0,1]
# auxiliary) and the summary lines to <out>/summary.txt.
set -u
DATA=${1:?dataset dir (prepare_la.py convert output)}; OUTR=${2:?output dir}; ITERS=${3:-1500}; shift 3 || true
CFG="['bundle/configs/train.yaml','bundle/configs/la.yaml','bundle/configs/la_half.yaml']"
ECFG="['bundle/configs/train.yaml','bundle/configs/la.yaml','bundle/configs/la_half.yaml','bundle/configs/evaluate.yaml']"
mkdir -p "$OUTR"
train() {
  local n=$1; shift
  python -m monai.bundle run training --config_file "$CFG" --dataset_dir "$DATA" --bundle_root "$OUTR/$n" \
    --max_iterations "$ITERS" --val_interval $((ITERS / 6)) "$@" > "$OUTR/train_$n.log" 2>&1
  echo "train $n exit $? after ${SECONDS}s" >> "$OUTR/train_$n.log"
}
train ssl "$@" &
train sup --supervised_only True "$@" &
wait
for n in ssl sup; do
  for w in "[0.5,0.5]" "[1,0]" "[0,1]"; do
    tag=$(echo "$w" | tr -d '[],.')
    python -m monai.bundle run evaluating --config_file "$ECFG" --dataset_dir "$DATA" --bundle_root "$OUTR/$n" \
      --output_dir "$OUTR/$n/eval_$tag" --deploy_weights "$w" "$@" > "$OUTR/$n/eval_$tag.log" 2>&1
  done
done
{
  for n in ssl sup; do
    echo "== $n: validation during training"; grep -a "Metrics --" "$OUTR/train_$n.log"
    for tag in 0505 10 01; do
      for m in val_mean_dice val_jaccard val_hd95 val_asd; do
        f="$OUTR/$n/eval_$tag/${m}_summary.csv"
        [ -f "$f" ] && echo "$n deploy=$tag $m $(grep '^mean' "$f")"
      done
    done
  done
} | tee "$OUTR/summary.txt"
