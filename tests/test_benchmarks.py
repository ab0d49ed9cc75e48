"""Every script in benchmarks/ runs end to end on its quick check: `pytest -m slow tests/test_benchmarks.py`.

QUICK holds, per script, the smallest arguments that still go through its whole code path (every part, its JSON
and its table): seconds to a few minutes on 2 CPU cores. Each test runs its script in a subprocess in the test's
own folder, every output there (benchmarks/results/ is checked to be left untouched), then checks the JSON the
table is printed from and the table's lines on stdout. A script that needs MNIST gets, as its DATA_ROOT, a copy of
the first images of the real file (skipped when it is absent), sized so that one training step reaches every stage
of the script. `test_quick_covers_every_benchmark` (not slow) fails when a benchmark has no quick check.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"
TIMEOUT_S = 600

Outputs = dict[str, Any]
"""The parsed JSON files of a run, by their path relative to the test's folder."""


@dataclass(frozen=True)
class Quick:
    """One script's quick check. In `argv` and `env`, {tmp} is the test's folder and {data} the folder holding the
    small mnist.npz."""
    argv: tuple[str, ...]
    outputs: tuple[str, ...]                  # JSON files the run writes, relative to {tmp}
    check: Callable[[Outputs], None]          # asserts on their contents: what the table is built from
    lines: tuple[str, ...]                    # regular expressions, each matching a whole line of stdout
    env: dict[str, str] = field(default_factory=dict)
    mnist: tuple[int, int] | None = None      # (training, test) images of the real MNIST copied into {data}
    setup: Callable[[Path, Path], None] | None = None   # makes the run's inputs: setup(tmp, data)


def _finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _train_checkpoint(tmp: Path, data: Path) -> None:
    """A one-step MNIST DVP-VAE (num_ch 8) whose last.pt bf16_gradients.py reads."""
    cmd = [sys.executable, "-m", "dvp.train", "experiment=mnist/dvp_vae", f"data.root={data}",
           f"run_dir={tmp / 'run'}", "train.max_steps=1", "train.final_eval=false", "train.num_threads=1",
           "model.num_ch=8", "wandb.mode=disabled"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=TIMEOUT_S,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _check_bf16_gradients(out: Outputs) -> None:
    r = out["bf16_gradients.json"]
    assert r["step"] == 1 and r["batch"] == 250 and r["zero_stage"] == 0
    assert {"head", "encoder.stem", "layers.prior", "layers.posterior"} <= set(r["cosine"])
    assert set(r["relative_error"]) == set(r["cosine"])
    for group, cos in r["cosine"].items():
        assert set(cos) == {"bf16", "deepspeed_bf16", "other_noise", "other_batch"}, group
        assert all(_finite(c) and -1.0001 <= c <= 1.0001 for c in cos.values()), (group, cos)
        assert cos["bf16"] > 0.9 and cos["deepspeed_bf16"] > 0.9, (group, cos)   # the same batch and noise
        assert set(r["relative_error"][group]) == {"bf16", "deepspeed_bf16"}
        assert _finite(*r["relative_error"][group].values())


def _check_distributed(out: Outputs) -> None:
    r = out["distributed.json"]
    assert r["failures"] == []
    zero = {c["name"]: c for c in r["zero"]}
    assert set(zero) == {"zero0_fp32", "zero3_fp32"}
    for c in zero.values():
        assert c["returncode"] == 0 and len(c["ranks"]) == 2 and _finite(c["s_per_step"], c["images_per_s"])
        for rank in c["ranks"]:
            mem = rank["memory"]
            assert _finite(rank["peak_rss_mib"], rank["rss_base_mib"], *(mem[k] for k in (
                "params_bytes", "master_bytes", "grads_bytes", "grads_at_step_bytes", "grads_alloc_bytes",
                "optim_bytes", "ema_bytes")))
    # ZeRO-3 partitions the parameters (ZeRO-0 keeps them whole); equal steps on equal batches: equal losses
    assert zero["zero3_fp32"]["ranks"][0]["memory"]["params_bytes"] < zero["zero0_fp32"]["theory"]["params_bytes"]
    assert math.isclose(zero["zero0_fp32"]["loss_last"], zero["zero3_fp32"]["loss_last"], rel_tol=1e-4)
    assert {run["arm"] for run in r["runs"]} == {"scaling_2proc_x1thread", "scaling_1proc_x2threads",
                                                 "overhead_deepspeed_1proc_x1", "overhead_torch_1proc_x1"}
    assert _finite(r["comparisons"]["scaling"]["ratio"], r["comparisons"]["overhead"]["overhead_pct"])
    assert r["eval"]["nll_rel_diff"] < 1e-4          # 1 and 2 ranks: the same IS-NLL up to summation order


def _check_is_vs_exact(out: Outputs) -> None:
    r = out["is_vs_exact.json"]
    assert r["k"] == 200
    assert [row["model"] for row in r["rows"]] == ["ladder, 1 latent(s)", "ladder, 2 latent(s)",
                                                    "vampprior, 1 latent(s)"]
    for row in r["rows"]:
        assert all(len(row[k]) == 4 and _finite(*row[k]) for k in ("exact", "is_nll", "analytic_kl", "nelbo"))
        for exact, is_nll, nelbo in zip(row["exact"], row["is_nll"], row["nelbo"]):
            assert nelbo > exact - 0.05, row         # the ELBO bounds log p(x), up to its Monte Carlo noise
            assert abs(is_nll - exact) < 0.25, row   # K=200 on a 1x2x2 image is close to exact


def _check_eval(result: dict[str, Any], weights: str, checkpoint: str, is_samples: int) -> None:
    """One dvp-eval JSON of a quick run: the 5 test images of the small mnist.npz."""
    assert result["weights"] == weights and result["checkpoint"].endswith(checkpoint)
    assert result["images"] == 5 and result["is_samples"] == is_samples and result["is_weight"] == "iwae"
    assert _finite(result["nll"], result["elbo_nelbo"], result["bpd"], result["elbo_kl_z"], result["elbo_kl_u"])
    if is_samples > 1:
        assert result["nll"] < result["elbo_nelbo"]   # K=100 tightens the bound on an untrained model by far


def _check_mnist_budget(out: Outputs) -> None:
    for model in ("dvp_vae", "ladder"):
        _check_eval(out[f"out/{model}_elbo_10k.json"], "ema", "best.pt", 1)
        _check_eval(out[f"out/{model}_isnll_k100_1k.json"], "ema", "best.pt", 100)


def _check_quality_330(out: Outputs) -> None:
    _check_eval(out["out/dvp_vae_raw_elbo_2k.json"], "raw", "last.pt", 1)
    _check_eval(out["out/dvp_vae_raw_isnll_k100_200.json"], "raw", "last.pt", 100)


def _check_quality_330_seeds(out: Outputs) -> None:
    variants = out["out/summary.json"]["variants"]
    assert set(variants) == {"fp32", "bf16"}
    for name, v in variants.items():
        run = out[f"out/{name}_seed1/dvp_vae_raw_isnll_k100_200.json"]
        assert set(v["seeds"]) == {"1"} and v["seeds"]["1"]["isnll"] == run["nll"]
        assert v["stats"]["nelbo"]["mean"] == v["seeds"]["1"]["nelbo"] and v["stats"]["nelbo"]["sd"] is None
    # the same seed, step and data: only the variant's keys (precision, compile) can tell the two apart
    assert variants["fp32"]["seeds"]["1"]["nelbo"] != variants["bf16"]["seeds"]["1"]["nelbo"]


SEED_RUNS = {"fp32_seed1": (100.0, 90.0), "fp32_seed2": (102.0, 94.0), "bf16_seed1": (101.0, 91.0),
             "bf16_seed2": (103.0, None)}
"""(test -ELBO, IS-NLL) of the stand-in runs summarise_quality.py reads; None: the IS-NLL file is missing (a run
that did not finish), so that seed is left out."""


def _write_seed_runs(tmp: Path, data: Path) -> None:
    """OUT/<variant>_seed<s>/ of quality_330_seeds.sh with stand-in dvp-eval results (quality_330_seeds.sh's own
    quick check runs the real ones through summarise_quality.py)."""
    for name, (nelbo, isnll) in SEED_RUNS.items():
        folder = tmp / "out" / name
        folder.mkdir(parents=True)
        elbo = {"elbo_nelbo": nelbo, "elbo_recon": nelbo - 30, "elbo_kl_z": 20.0, "elbo_kl_u": 10.0}
        (folder / "dvp_vae_raw_elbo_2k.json").write_text(json.dumps(elbo))
        if isnll is not None:
            (folder / "dvp_vae_raw_isnll_k100_200.json").write_text(json.dumps({"nll": isnll}))


def _check_summarise_quality(out: Outputs) -> None:
    r = out["out/summary.json"]
    assert r["authors"] == {"nelbo": 122.6, "isnll": 104.0}
    fp32, bf16 = r["variants"]["fp32"], r["variants"]["bf16"]
    assert set(fp32["seeds"]) == {"1", "2"} and set(bf16["seeds"]) == {"1"}
    assert fp32["stats"]["nelbo"]["mean"] == 101.0 and math.isclose(fp32["stats"]["nelbo"]["sd"], math.sqrt(2))
    assert fp32["stats"]["isnll"]["mean"] == 92.0 and math.isclose(fp32["stats"]["isnll"]["sd"], math.sqrt(8))
    assert fp32["stats"]["recon"]["mean"] == 71.0
    assert bf16["stats"]["isnll"] == {"mean": 91.0, "sd": None}


def _check_sweep_asha_vs_grid(out: Outputs) -> None:
    r = out["sweep_asha_vs_grid.json"]
    assert r["asha"]["returncode"] == 0 and r["grid"]["returncode"] == 0, (r["asha"]["log_tail"],
                                                                          r["grid"]["log_tail"])
    s = r["summary"]
    assert s["trials"] == 2 and len(r["asha"]["trials"]) == 2
    assert s["epochs_grid"] == 2 and 1 <= s["epochs_asha"] <= 2        # one epoch per trial
    assert s["steps_grid"] == sum(t["steps"] for t in r["grid"]["trials"].values()) > 0
    assert not any(t["stopped_early"] for t in r["grid"]["trials"].values())   # the grid runs every trial out
    assert _finite(s["best_asha"], s["best_grid"], s["wall_s_asha"], s["wall_s_grid"], s["compute_saved"])
    assert s["best_grid"] == min(t["best"] for t in r["grid"]["trials"].values())


def _check_train_throughput(out: Outputs) -> None:
    r = out["train_throughput.json"]
    assert r["batch_size"] == 25
    assert 1e8 < r["flops_per_image"] < 1e10        # ~0.7 GFLOP for the MNIST DVP-VAE
    assert r["matmul_size"] == 256 and _finite(*r["matmul_peak_tflops"].values())
    results = {row["setting"]: row for row in r["results"]}
    assert list(results) == ["fp32_eager", "bf16"]
    for row in results.values():
        assert len(row["nelbo_steps"]) == 2 and _finite(*row["nelbo_steps"])
        assert _finite(*(row[k] for k in ("s_per_step", "images_per_s", "speedup", "gflops", "frac_fp32_peak",
                                          "frac_bf16_peak",
                                          "conv_share", "ceiling_speedup", "peak_rss_mib", "nelbo_final",
                                          "dnelbo_rel")))
        assert math.isclose(row["gflops"], r["flops_per_image"] * row["images_per_s"] / 1e9)
    assert results["fp32_eager"]["speedup"] == 1.0 and results["fp32_eager"]["dnelbo_rel"] == 0.0
    assert abs(results["bf16"]["dnelbo_rel"]) < 0.05   # equal init, batches and noise: the same -ELBO nearly
    assert r["device"] and all(row["device"] == "cpu" for row in results.values())   # the device measured


def _check_gpu_check(out: Outputs) -> None:
    r = out["gpu_check.json"]
    assert r["quick"] is True and r["cuda"] is False and r["torch"] and r["deepspeed"] and r["python"]
    sections = r["sections"]
    assert list(sections) == ["throughput", "resume", "zero", "fp16_overflow", "is_nll", "tf32", "gpu_tests"]
    assert all(s["ok"] and _finite(s["wall_s"]) for s in sections.values()), sections
    f = {name: s["figures"] for name, s in sections.items()}
    assert set(f["throughput"]["settings"]) == {"fp32_eager", "bf16"}
    assert _finite(f["throughput"]["matmul_peak_tflops"]["bf16"])
    assert f["resume"]["relative_l2"] == 0.0                    # CPU: the resumed run is bitwise the same
    assert {k: v["steps"] for k, v in f["zero"].items()} == {"zero3": 2}     # quick: ZeRO-2 is fp16_overflow's
    assert 1 <= f["fp16_overflow"]["skipped_steps"] < f["fp16_overflow"]["steps"]
    assert f["is_nll"]["k"] == 10 and f["is_nll"]["nll"] < f["is_nll"]["nelbo"]
    assert f["tf32"]["difference"] == 0.0                      # CPU: TF32 flags act on CUDA only
    assert f["gpu_tests"] == {"skipped": "no GPU: the gpu mark needs one"}


def _check_zero_across_hosts(out: Outputs) -> None:
    r = out["zero_across_hosts.json"]
    assert r["link"] == {"rate": "1000mbit", "latency": "5ms"} and r["steps"] == [2, 4] and r["params"] > 10_000
    rows = {row["stage"]: row for row in r["rows"]}
    assert set(rows) == {0, 3}
    for row in rows.values():
        assert _finite(row["bytes_per_step"], row["step_s"]) and row["step_s"] > 0
        assert all(a < b for a, b in zip(*row["sent"])), row["sent"]        # more steps, more bytes, both hosts
    # ZeRO 0 sends its gradients' all-reduce (2P (N-1)/N floats) and little else; ZeRO 3 more than ZeRO 0
    assert 0.9 < rows[0]["ratio_to_theory"] < 1.3, rows[0]
    assert rows[3]["bytes_vs_stage0"] > 1.2, rows[3]

def _train_latent_runs(tmp: Path, data: Path) -> None:
    """latent_usage.py's train step: one step (one epoch of the 250 training images) of each curve run."""
    cmd = [sys.executable, str(BENCHMARKS / "latent_usage.py"), "--runs", str(tmp / "runs"), "train", "dvp_vae",
           "ladder", "--data-root", str(data), "--steps", "1", "--set", "data.val_size=250",
           "train.precision=fp32", "train.compile=false", "model.num_ch=8"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=TIMEOUT_S,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _check_latent_usage(out: Outputs) -> None:
    r = out["out/latent_usage.json"]
    assert set(r["curves"]) == {"dvp_vae", "ladder"} and r["common_step"] == 1
    assert r["crossing_step"] in (None, 1)
    for name, s in r["at_common_step"].items():
        assert s["step"] == 1 and len(s["kl"]) == len(s["au_layers"]) == 8, (name, s)
        assert all(k >= 0 for k in s["kl"]) and 0 <= s["au_1e-3"] <= 1 and s["au"] <= s["au_1e-3"], (name, s)
        assert _finite(s["nelbo"], s["kl_u"]) and s["nelbo"] > sum(s["kl"]), (name, s)
    assert r["at_common_step"]["ladder"]["kl_u"] == 0 and r["at_common_step"]["dvp_vae"]["kl_u"] != 0

QUICK: dict[str, Quick] = {
    "bf16_gradients.py": Quick(
        argv=("{tmp}/run/checkpoints/last.pt", "--data-root", "{data}", "--threads", "1",
              "--out", "{tmp}/bf16_gradients.json"),
        outputs=("bf16_gradients.json",), check=_check_bf16_gradients,
        lines=(r"group\s+bf16\s+ds_bf16\s+other_noise\s+other_batch\s+bf16 rel err\s+ds rel err",
               r"head(\s+-?\d\.\d{4}){6}", r"wrote .*/bf16_gradients\.json"),
        mnist=(5500, 5), setup=_train_checkpoint),       # 500 training images: the script's two batches of 250
    "distributed.py": Quick(
        argv=("--stages", "0", "3", "--precisions", "fp32", "--steps", "2", "--warmup", "1", "--repeats", "1",
              "--eval-samples", "5", "--eval-images", "20", "--eval-train-steps", "2", "--overhead-threads", "1",
              "--case-timeout", "300", "--out", "{tmp}/distributed.json"),
        outputs=("distributed.json",), check=_check_distributed,
        lines=(r"case\s+\| s/step \| img/s \|.*", r"zero0_fp32 +\|.*", r"zero3_fp32 +\|.*",
               r"scaling_1proc_x2threads_r0 +\| +TorchEngine +\|.*", r"scaling: 2 procs x 1 thread .*",
               r"overhead: DeepSpeed engine in 1 process .*", r"eval: 1 rank .* speedup .*",
               r"wrote .*/distributed\.json \(\d+ s\)")),
    "is_vs_exact.py": Quick(
        argv=("--k", "200", "--out", "{tmp}/is_vs_exact.json"),
        outputs=("is_vs_exact.json",), check=_check_is_vs_exact,
        lines=(r"ladder, 1 latent\(s\)\s+exact(\s+\d+\.\d{4}){4}",
               r"vampprior, 1 latent\(s\)\s*nelbo(\s+\d+\.\d{4}){4}", r".*/is_vs_exact\.json")),
    "latent_usage.py": Quick(
        argv=("--runs", "{tmp}/runs", "report", "--out", "{tmp}/out"),
        outputs=("out/latent_usage.json",), check=_check_latent_usage,
        lines=(r"run\s+step\s+-ELBO\s+KL\(u\)\s+AU\s+AU\.001\s+KL per layer",
               r"dvp_vae\s+1(\s+\d+\.\d+){4}(\s+\d+\.\d{3}){8}", r"ladder\s+1(\s+\d+\.\d+){4}(\s+\d+\.\d{3}){8}",
               r"curves to dvp_vae 1 steps, ladder 1 steps; .*", r"wrote .*/out/latent_usage\.json and .*\.png"),
        mnist=(500, 5), setup=_train_latent_runs),     # 250 training images: one step is one epoch, one val record
    "mnist_budget.sh": Quick(
        argv=("{data}", "0.01", "{tmp}/out", "data.val_size=250", "train.precision=fp32", "train.compile=false"),
        env={"RUNS": "{tmp}/runs"},
        outputs=tuple(f"out/{m}_{e}.json" for m in ("dvp_vae", "ladder") for e in ("elbo_10k", "isnll_k100_1k")),
        check=_check_mnist_budget,
        lines=(r"test NLL \(nats\)\s+\d+\.\d+", r"results: .*/out/ladder_isnll_k100_1k\.json",
               r".*/out/val_nelbo\.png"),
        mnist=(500, 5)),                # 250 training images: one step is one epoch, so best.pt and a val point
    "quality_330.sh": Quick(           # eager: a cold torch.compile of the MNIST model alone takes minutes here
        argv=("{data}", "dvp_vae", "{tmp}/out", "train.compile=false"),
        env={"STEPS": "1", "RUNS": "{tmp}/runs"},
        outputs=("out/dvp_vae_raw_elbo_2k.json", "out/dvp_vae_raw_isnll_k100_200.json"),
        check=_check_quality_330,
        lines=(r"stopped at step 1: train\.max_steps=1 reached .*", r"test NLL \(nats\)\s+\d+\.\d+",
               r"results: .*/out/dvp_vae_raw_isnll_k100_200\.json"),
        mnist=(5500, 5)),               # 500 training images: 2 steps per epoch, so no validation pass
    "quality_330_seeds.sh": Quick(
        argv=("{data}", "{tmp}/out", "1"),
        env={"STEPS": "1", "RUNS": "{tmp}/runs", "COMPILE": "false"},
        outputs=("out/summary.json", "out/fp32_seed1/dvp_vae_raw_isnll_k100_200.json",
                 "out/bf16_seed1/dvp_vae_raw_isnll_k100_200.json"),
        check=_check_quality_330_seeds,
        lines=(r"done: fp32 seed 1", r"done: bf16 seed 1", r"variant\s+seeds\s+-ELBO mean\s+sd\s+IS-NLL mean.*",
               r"fp32\s+1\s+\d+\.\d\d\s+-\s+\d+\.\d\d\s+-\s+s1: \d+\.\d/\d+\.\d",
               r"wrote .*/out/summary\.json"),
        mnist=(5500, 5)),
    "summarise_quality.py": Quick(
        argv=("{tmp}/out",),
        outputs=("out/summary.json",), check=_check_summarise_quality,
        lines=(r"variant\s+seeds\s+-ELBO mean\s+sd\s+IS-NLL mean\s+sd\s+per seed",
               r"fp32\s+2\s+101\.00\s+1\.41\s+92\.00\s+2\.83\s+s1: 100\.0/90\.0, s2: 102\.0/94\.0",
               r"bf16\s+1\s+101\.00\s+-\s+91\.00\s+-\s+s1: 101\.0/91\.0",
               r"authors' code, one run: -ELBO 122\.6, IS-NLL 104\.0", r"wrote .*/out/summary\.json"),
        setup=_write_seed_runs),
    "sweep_asha_vs_grid.py": Quick(
        argv=("--sweep", "digits_smoke", "--out", "{tmp}/sweep_asha_vs_grid.json", "--set", "train.max_epochs=1",
              "train.lr_epochs=1", "resources.workers=1", "report=false", "wandb.mode=disabled"),
        outputs=("sweep_asha_vs_grid.json",), check=_check_sweep_asha_vs_grid,
        lines=(r"\s+ASHA\s+grid", r"wall time \(s\)\s+\d+\s+\d+", r"optimizer steps\s+\d+\s+\d+",
               r"best val/nelbo\s+\d+\.\d{3}\s+\d+\.\d{3}", r"2 trials, \d stopped early by ASHA; .*",
               r"wrote .*/sweep_asha_vs_grid\.json")),
    "gpu_check.py": Quick(
        argv=("--quick", "--data-root", "{data}", "--work", "{tmp}/work", "--out", "{tmp}/gpu_check.json"),
        outputs=("gpu_check.json",), check=_check_gpu_check,
        lines=(r"resume\s+ok\s+[\d.]+ s  4 steps, relative L2 0\.00e\+00 \(tol 0\)",
               r"total \d+ s; wrote .*/gpu_check\.json"),
        mnist=(5500, 5)),               # 100 training images (val_size 5400): 4 steps per epoch
    "train_throughput.py": Quick(
        argv=("--steps", "1", "--warmup", "1", "--settings", "fp32_eager", "bf16", "--threads", "1",
              "--matmul-size", "256", "--batch", "25", "--out", "{tmp}/train_throughput.json"),
        outputs=("train_throughput.json",), check=_check_train_throughput,
        lines=(r"setting\s+\| s/step \| img/s \| speedup \|.*", r"fp32_eager \|.*\|\s+1\.00x \|.*\|\s+\+0\.00%",
               r"bf16\s+\|.*\|\s+[-+]\d+\.\d\d%", r"\s+\d\.\d{3} GFLOP per image per training step; .*",
               r"wrote .*/train_throughput\.json")),
    "zero_across_hosts.py": Quick(            # root: two hosts made of network namespaces (tests/helpers/netns.py)
        argv=("--stages", "0", "3", "--steps", "2", "4", "--rate", "1000mbit",
              "--out", "{tmp}/zero_across_hosts.json"),
        outputs=("zero_across_hosts.json",), check=_check_zero_across_hosts,
        lines=(r"ZeRO\s+MB sent\s+theory MB\s+/theory\s+vs ZeRO 0\s+s/step",
               r"\s+0(\s+\d+\.\d{3}){2}\s+\d\.\d\d\s+1\.00x\s+\d+\.\d{3}",
               r"\s+3(\s+\d+\.\d{3}){2}\s+\d\.\d\d\s+\d\.\d\dx\s+\d+\.\d{3}",
               r"wrote .*/zero_across_hosts\.json")),
}


def _small_mnist(folder: Path, n_train: int, n_test: int) -> None:
    """folder/mnist.npz: the first n_train training and n_test test images of the real MNIST."""
    folder.mkdir()
    with np.load(MNIST) as f:
        np.savez(folder / "mnist.npz", x_train=f["x_train"][:n_train], x_test=f["x_test"][:n_test])


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_quick_covers_every_benchmark() -> None:
    """A benchmark added without a quick check (or a quick check of a removed one) fails here."""
    assert set(QUICK) == {p.name for p in BENCHMARKS.iterdir() if p.suffix in (".py", ".sh")}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(QUICK))
def test_benchmark_quick_check(name: str, tmp_path: Path) -> None:
    quick = QUICK[name]
    data = tmp_path / "data"
    if quick.mnist is not None:
        if not MNIST.is_file():
            pytest.skip(f"{name} needs the real MNIST: {MNIST} is absent")
        _small_mnist(data, *quick.mnist)
    if quick.setup is not None:
        quick.setup(tmp_path, data)
    fill = {"tmp": str(tmp_path), "data": str(data)}
    script = BENCHMARKS / name
    cmd = ["bash" if script.suffix == ".sh" else sys.executable, str(script),
           *(a.format(**fill) for a in quick.argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",   # dvp-train, dvp-eval
           **{k: str(tmp_path / "wandb") for k in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
                                                     "WANDB_DATA_DIR")},
           **{k: v.format(**fill) for k, v in quick.env.items()}}
    (tmp_path / "wandb").mkdir()
    results_before = _files(BENCHMARKS / "results")
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=TIMEOUT_S)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    assert _files(BENCHMARKS / "results") == results_before, "the quick check wrote into benchmarks/results/"
    outputs = {}
    for rel in quick.outputs:
        path = tmp_path / rel
        assert path.is_file(), f"{name} did not write {rel}"
        outputs[rel] = json.loads(path.read_text())
    quick.check(outputs)
    stdout_lines = res.stdout.splitlines()
    for pattern in quick.lines:
        assert any(re.fullmatch(pattern, line.rstrip()) for line in stdout_lines), \
            f"no stdout line matches {pattern!r}:\n{res.stdout[-4000:]}"
