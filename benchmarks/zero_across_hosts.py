"""DeepSpeed ZeRO stages across two hosts joined by a slow link: bytes each host sends per training step and the
step time, against ZeRO's communication volume. Root: the hosts are network namespaces (tests/helpers/netns.py).

    sudo python benchmarks/zero_across_hosts.py                      # stages 0-3, 100 Mbit/s, ~6 min on 2 cores
    sudo python benchmarks/zero_across_hosts.py --stages 0 3 --steps 3 6 --rate 1000mbit   # a quick check

Per stage: two torchrun runs of `dvp.train` (one rank per host, rendezvous at node0, the bundled digits,
train.log_every=1) of --steps S1 and S2 steps, each on fresh hosts whose eth0 is shaped by `tc qdisc ... tbf rate
R burst B latency L` (netem, which adds delay, is not in every kernel; tbf caps the rate and queues for at most
L). Bytes per step = (tx bytes of node0's + node1's eth0 after S2 steps - after S1) / (S2 - S1) / 2 hosts: start-up
(rendezvous, the initial broadcast, DeepSpeed's set-up) cancels. Step time = median gap between consecutive train
records of the S2 run (from step 2 on). Theory for N = 2 ranks and P float32 parameters, per rank and step:
ZeRO 0-2 all-reduce or reduce-scatter + all-gather the gradients, 2P (N-1)/N x 4 bytes; ZeRO 3 also all-gathers
the parameters once more in the backward, 3P (N-1)/N x 4 bytes (1.5x). Writes --out (JSON) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
MODEL = ["experiment=digits/dvp_vae", "model.num_ch=16", "train.batch_size=64", "train.log_every=1",
         "train.final_eval=false", "train.ckpt_every=0", "wandb.mode=disabled", "train.max_epochs=100"]


def tx_bytes(hosts: Any, i: int) -> int:
    """Bytes host i's eth0 has sent: /proc/net/dev, which shows the reader's network namespace (/sys/class/net
    shows the namespace /sys was mounted in)."""
    out = hosts.run(i, ["cat", "/proc/net/dev"])
    fields = next(line.split(":", 1)[1].split() for line in out.stdout.splitlines() if line.strip().startswith("eth0:"))
    return int(fields[8])                              # receive: 8 columns, then transmit bytes


def shape(hosts: Any, i: int, rate: str, latency: str) -> None:
    out = hosts.run(i, ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "64kb",
                        "latency", latency])
    if out.returncode != 0:
        raise SystemExit(f"tc tbf on {hosts.names[i]}: {out.stderr.strip()}")


def run(stage: int, steps: int, rate: str, latency: str, base: Path) -> dict[str, Any]:
    """One 2-host torchrun of `steps` steps at ZeRO `stage`; bytes sent by the hosts and the step times."""
    from helpers.netns import Hosts
    run_dir = base / f"z{stage}-{steps}"
    with Hosts(base, 2) as hosts:
        for i in range(2):
            shape(hosts, i, rate, latency)
        before = [tx_bytes(hosts, i) for i in range(2)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        procs = [hosts.popen(i, [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                                 str(i), "--nproc_per_node", "1", "--rdzv-endpoint", "node0:29500", "-m",
                                 "dvp.train", *MODEL, f"train.max_steps={steps}", f"dist.zero_stage={stage}",
                                 f"run_dir={run_dir}"], base / f"z{stage}-{steps}-{i}.log", env=env, cwd=ROOT)
                 for i in range(2)]
        for p in procs:
            p.wait(timeout=900)
        sent = [tx_bytes(hosts, i) - before[i] for i in range(2)]
    if any(p.returncode for p in procs):
        log = (base / f"z{stage}-{steps}-0.log").read_text(errors="replace")[-2000:]
        raise SystemExit(f"ZeRO {stage}, {steps} steps failed:\n{log}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in records if r.get("split") == "train"]
    return {"sent": sent, "gaps": [b - a for a, b in zip(times[1:], times[2:])]}


def parameters() -> int:
    from dvp.core.config import compose
    from dvp.data.catalog import DATASETS
    from dvp.model.vae import build_model, parameter_counts
    cfg = compose(MODEL)
    return int(parameter_counts(build_model(cfg, DATASETS[cfg.data.name]))["total"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, nargs=2, default=[5, 15], metavar=("S1", "S2"))
    parser.add_argument("--rate", default="100mbit", help="tbf rate of each host's eth0")
    parser.add_argument("--latency", default="5ms", help="tbf latency (the longest a packet queues)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/zero_across_hosts.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("zero_across_hosts.py makes hosts of network namespaces: run it as root")
    if args.steps[1] <= args.steps[0]:
        raise SystemExit(f"--steps {args.steps}: S2 must exceed S1")
    p = parameters()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dvpz-", dir="/tmp") as tmp:
        for stage in args.stages:
            start = time.monotonic()
            short, long = (run(stage, s, args.rate, args.latency, Path(tmp)) for s in args.steps)
            per_step = (sum(long["sent"]) - sum(short["sent"])) / (args.steps[1] - args.steps[0]) / 2
            theory = (3 if stage == 3 else 2) * p * 4 * (2 - 1) / 2
            rows.append({"stage": stage, "bytes_per_step": per_step, "theory_bytes_per_step": theory,
                         "ratio_to_theory": per_step / theory, "step_s": statistics.median(long["gaps"]),
                         "wall_s": time.monotonic() - start, "sent": [short["sent"], long["sent"]]})
    zero0 = next((r for r in rows if r["stage"] == 0), None)
    for r in rows:
        r["bytes_vs_stage0"] = r["bytes_per_step"] / zero0["bytes_per_step"] if zero0 else None
    info = Path("/proc/cpuinfo").read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
               platform.machine())
    result = {"machine": {"cpu": cpu, "cores": os.cpu_count()},
              "link": {"rate": args.rate, "latency": args.latency}, "steps": args.steps, "params": p,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"2 hosts ({cpu}, {os.cpu_count()} cores), tbf {args.rate} / {args.latency}, {p:,} float32 parameters;"
          " per host and step:")
    print(f"{'ZeRO':>4} {'MB sent':>9} {'theory MB':>10} {'/theory':>8} {'vs ZeRO 0':>9} {'s/step':>8}")
    for r in rows:
        vs = f"{r['bytes_vs_stage0']:.2f}x" if r["bytes_vs_stage0"] else "-"
        print(f"{r['stage']:>4} {r['bytes_per_step'] / 1e6:>9.3f} {r['theory_bytes_per_step'] / 1e6:>10.3f} "
              f"{r['ratio_to_theory']:>8.2f} {vs:>9} {r['step_s']:>8.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
