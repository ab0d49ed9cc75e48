#!/usr/bin/env bash
# Quality at equal steps against the authors' code: 330 steps of the paper's MNIST recipe (batch 250, Adamax 1e-2
# with its 2-epoch warm-up, clip 5), then the RAW weights' test -ELBO on 2,000 test images and IS-NLL with K=100
# on 200 (the authors' code reaches 122.6 and 104.0 nats there). Usage:
#   bash benchmarks/quality_330.sh DATA_ROOT [MODEL=dvp_vae] [OUT=benchmarks/results/quality_330] [extra keys...]
# Extra dvp-train keys replace the script's own (e.g. train.precision=fp32). Environment: RUNS (default runs) holds
# the run dir; STEPS (default 330) the training steps, e.g. STEPS=1 with a small mnist.npz for a quick check.
set -euo pipefail
root=${1:?give the directory holding mnist.npz}
model=${2:-dvp_vae}
out=${3:-benchmarks/results/quality_330}
shift $(( $# < 3 ? $# : 3 ))
run=${RUNS:-runs}/$(basename "$out")/$model   # one run dir per OUT: an existing one would be resumed
mkdir -p "$out"
given=" ${*%%=*} "   # the extra keys' names: the script's own setting of a key given there is left out
keys=()
for kv in train.max_steps="${STEPS:-330}" train.final_eval=false train.precision=bf16 train.channels_last=true \
    train.compile=true wandb.mode=disabled; do
  [[ $given == *" ${kv%%=*} "* ]] || keys+=("$kv")
done
dvp-train experiment=mnist/$model data.root="$root" run_dir="$run" "${keys[@]}" "$@" 2>&1 | tee "$out/train_$model.log"
dvp-eval run_dir="$run" checkpoint=last eval.weights=raw eval.precision=fp32 eval.is_samples=1 eval.is_chunk=1 \
  eval.batch_size=500 eval.max_images=2000 out="$out/${model}_raw_elbo_2k.json"
dvp-eval run_dir="$run" checkpoint=last eval.weights=raw eval.precision=fp32 eval.is_samples=100 eval.is_chunk=100 \
  eval.batch_size=10 eval.max_images=200 out="$out/${model}_raw_isnll_k100_200.json"
