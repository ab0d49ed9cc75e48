#!/usr/bin/env bash
# Real-MNIST progress figures: DVP-VAE and the Ladder VAE trained for the same wall-clock budget, then test -ELBO
# and IS-NLL of the EMA weights, and the curves. Usage:
#   bash benchmarks/mnist_budget.sh DATA_ROOT [MINUTES=30] [OUT=benchmarks/results/mnist_budget] [extra keys...]
# Each model trains in its own process with 1 thread, both at once (2 cores), so each gets MINUTES CPU-minutes.
# Extra keys go to both dvp-train runs and replace the script's own (e.g. train.precision=fp32 on a CPU without
# bf16 instructions); RUNS (default runs/mnist_budget) holds the run dirs. A quick check: a DATA_ROOT whose
# mnist.npz has 500 training images, MINUTES=0.01, data.val_size=250 (one step, one epoch end, so best.pt and
# one validation point exist), train.precision=fp32 train.compile=false.
set -euo pipefail
root=${1:?give the directory holding mnist.npz, e.g. ../shared/data}
minutes=${2:-30}
out=${3:-benchmarks/results/mnist_budget}
shift $(( $# < 3 ? $# : 3 ))
runs=${RUNS:-runs/mnist_budget}
mkdir -p "$out"
given=" ${*%%=*} "   # the extra keys' names: the script's own setting of a key given there is left out
keys=()
for kv in train.precision=bf16 train.channels_last=true train.compile=true train.num_threads=1 \
    train.final_eval=false wandb.mode=offline; do
  [[ $given == *" ${kv%%=*} "* ]] || keys+=("$kv")
done
for m in dvp_vae ladder; do
  dvp-train experiment=mnist/$m data.root="$root" run_dir="$runs/$m" train.max_minutes="$minutes" \
    "${keys[@]}" "$@" > "$out/train_$m.log" 2>&1 &
done
wait
for m in dvp_vae ladder; do   # test -ELBO on all 10,000 test images, IS-NLL (K=100) on the first 1,000
  dvp-eval run_dir="$runs/$m" eval.precision=fp32 eval.is_samples=1 eval.is_chunk=1 eval.batch_size=500 \
    out="$out/${m}_elbo_10k.json"
  dvp-eval run_dir="$runs/$m" eval.precision=fp32 eval.is_samples=100 eval.is_chunk=50 eval.batch_size=20 \
    eval.max_images=1000 out="$out/${m}_isnll_k100_1k.json"
done
python -m dvp.cli.curves "$out/val_nelbo.png" DVP-VAE="$runs/dvp_vae" Ladder="$runs/ladder"
