#!/usr/bin/env bash
# Quality at equal steps across seeds: each variant trained 330 steps of the paper's MNIST recipe per seed
# (quality_330.sh, 1 thread per run, two runs at a time), then summarised by summarise_quality.py (mean and
# standard deviation over seeds of the raw weights' test -ELBO on 2,000 images and IS-NLL, K=100, on 200). Usage:
#   bash benchmarks/quality_330_seeds.sh DATA_ROOT [OUT=benchmarks/results/quality_330_seeds] [SEEDS="1 2"]
# Variants: fp32 (eager) and bf16 (bf16 autocast + channels_last + compile, the fast path). With
# ALLCONV_TREE=DIR, a checkout of commit 3f688bf (every convolution in bf16, before `blocks.Float32Conv2d`;
# `git worktree add DIR 3f688bf`), the variant bf16_allconv runs that code on the fast path too.
# About 20 min per fp32 run and 13 per bf16 run, so ~45 min for two seeds of three variants on 2 cores.
# RUNS and STEPS (default 330) pass on to quality_330.sh; COMPILE=false runs the bf16 variants eager. A quick check
# is STEPS=1, SEEDS="1", COMPILE=false and a DATA_ROOT whose mnist.npz has 5,500 training images (5,000 of them
# validation) and a few test images.
set -euo pipefail
root=$(realpath "${1:?give the directory holding mnist.npz}")
out=${2:-benchmarks/results/quality_330_seeds}
seeds=${3:-1 2}
here=$(dirname "$0")
variants="fp32 bf16${ALLCONV_TREE:+ bf16_allconv}"
run_one() {   # run_one VARIANT SEED
  local keys="train.precision=bf16 train.channels_last=true train.compile=${COMPILE:-true}"
  [ "$1" = fp32 ] && keys="train.precision=fp32 train.channels_last=false train.compile=false"
  if [ "$1" = bf16_allconv ]; then export PYTHONPATH=$ALLCONV_TREE; fi
  # shellcheck disable=SC2086
  bash "$here/quality_330.sh" "$root" dvp_vae "$out/$1_seed$2" train.seed="$2" train.num_threads=1 $keys \
    > "$out/$1_seed$2.log" 2>&1 && echo "done: $1 seed $2"
}
export -f run_one
export root out here ALLCONV_TREE COMPILE
mkdir -p "$out"
for s in $seeds; do for v in $variants; do echo "$v $s"; done; done | xargs -P 2 -L 1 bash -c 'run_one "$0" "$1"'
python "$here/summarise_quality.py" "$out"
