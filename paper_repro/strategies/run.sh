#!/usr/bin/env bash
# Small Fashion-MNIST experiments for the three strategies, each next to its baseline: ResNet-8 trained alone
# with cross-entropy under the same budget, which is generation 0 of the born-again run (same data, epochs,
# optimiser and schedule as every other run). CPU-sized: a class-balanced subset of 2000 training images,
# 1000 test images, ResNet-8 students, 3 epochs, batch 64; the ResNet-20 teacher gets 5 epochs. Seeds 0 and 1.
#   bash paper_repro/strategies/run.sh [runs/strategies]   (then: PYTHONPATH=. python paper_repro/strategies/summarize.py)
# A larger budget, the three strategies only:
#   LIMIT=6000 EPOCHS=5 VARIANTS=0 bash paper_repro/strategies/run.sh runs/strategies_6k
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/strategies}
PY=${PY:-/work/main/.venv/bin/python}
mkdir -p "$OUT/logs"
COMMON=(data.limit=${LIMIT:-2000} data.test_limit=1000 data.batch_size=64 epochs=${EPOCHS:-3})

run() {  # run NAME featkd-args... : skipped when NAME already finished
  local name=$1; shift
  if [ -e "$OUT/$name.done" ]; then echo "skip $name"; return; fi
  echo "$(date -u +%T) start $name: featkd $*"
  timeout 1500 "$PY" -m featkd.cli "$@" > "$OUT/logs/$name.log" 2>&1
  touch "$OUT/$name.done"
  echo "$(date -u +%T) done $name"
}

run teacher_resnet20 train --config fmnist_teacher_wrn16_2 --run-dir "$OUT/teacher_resnet20" "${COMMON[@]}" \
    model.name=resnet20 seed=0 epochs=${TEACHER_EPOCHS:-5}
for seed in 0 1; do
  run ban_s$seed born-again --config born_again --run-dir "$OUT/ban_s$seed" "${COMMON[@]}" \
      model.name=resnet8 born_again.generations=2 seed=$seed
  run dml_s$seed dml --config dml --run-dir "$OUT/dml_s$seed" "${COMMON[@]}" \
      'dml.peers=[{name: resnet8}, {name: resnet8}]' seed=$seed
  run adv_s$seed adversarial --config adversarial --run-dir "$OUT/adv_s$seed" "${COMMON[@]}" \
      student.name=resnet8 teacher.checkpoint="$OUT/teacher_resnet20/last.pt" seed=$seed
done
[ "${VARIANTS:-1}" = 1 ] || exit 0
# variants: born-again generations that also see the labels; the least-squares GAN objective; the adversarial
# student with cross-entropy on the labels as well
for seed in 0 1; do
  run ban_ce_s$seed born-again --config born_again --run-dir "$OUT/ban_ce_s$seed" "${COMMON[@]}" \
      model.name=resnet8 born_again.generations=2 ce_weight=1.0 seed=$seed
  run adv_lsgan_s$seed adversarial --config adversarial --run-dir "$OUT/adv_lsgan_s$seed" "${COMMON[@]}" \
      student.name=resnet8 teacher.checkpoint="$OUT/teacher_resnet20/last.pt" adversarial.objective=lsgan seed=$seed
  run adv_ce_s$seed adversarial --config adversarial --run-dir "$OUT/adv_ce_s$seed" "${COMMON[@]}" \
      student.name=resnet8 teacher.checkpoint="$OUT/teacher_resnet20/last.pt" ce_weight=1.0 seed=$seed
done
