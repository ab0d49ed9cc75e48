"""Test-set evaluation: precision independent of training, active units at two thresholds, IS-NLL cost and
progress on stderr, the atomic results JSON."""
from __future__ import annotations

import io
import json
import math

import pytest
import torch

from dvp.core.config import compose
from dvp.evaluate.progress import ImageProgress, is_nll_cost, progress_line
from dvp.evaluate.sharded import _is_nll_sum, evaluate_elbo, evaluate_test
from dvp.model.objectives import active_units
from dvp.train.loop import prepare

TINY = ["model.num_ch=16", "model.diffusion.T=5", "eval.is_samples=4", "eval.is_chunk=4",
        "eval.max_images=20", "wandb.mode=disabled"]


@pytest.fixture(scope="module")
def tiny():
    """The default digits DVP-VAE at num_ch=16 with T=5 diffusion steps (untrained), and its data."""
    return prepare(compose(TINY))


def test_eval_precision_does_not_depend_on_train_precision(tiny) -> None:
    data, model = tiny
    x = data.test[:16]

    def nelbo(*overrides: str) -> dict[str, float]:
        torch.manual_seed(0)
        return evaluate_elbo(model, x, compose(TINY + list(overrides)))

    fp32 = nelbo("train.precision=fp32")
    assert nelbo("train.precision=bf16") == fp32  # eval.precision=fp32 by default: bitwise the same
    assert nelbo("train.precision=bf16", "eval.precision=fp32") == fp32
    bf16 = nelbo("train.precision=fp32", "eval.precision=bf16")
    assert bf16["nelbo"] != fp32["nelbo"]
    assert bf16["nelbo"] == pytest.approx(fp32["nelbo"], rel=0.02)

    def is_nll(*overrides: str) -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            return _is_nll_sum(model, x[:4], compose(TINY + list(overrides)), None, 0, progress_period=60)

    assert is_nll("train.precision=bf16") == is_nll("train.precision=fp32") != is_nll("eval.precision=bf16")


def test_active_units_at_two_thresholds() -> None:
    """Two examples ±a per dimension have variance 2a² (unbiased): a = sqrt(v / 2) gives variance v."""
    def layer(variances: list[float], shape: tuple[int, ...]) -> torch.Tensor:
        a = torch.tensor(variances).div(2).sqrt().reshape(shape)
        return torch.stack([a, -a])

    mu_q = [layer([0.02, 0.005, 0.005, 0.0], (1, 2, 2)), layer([0.02, 0.0005], (2, 1, 1))]
    assert active_units(mu_q) == {"au/0": 1 / 4, "au/1": 1 / 2, "au": 2 / 6,
                                  "au_1e-3/0": 3 / 4, "au_1e-3/1": 1 / 2, "au_1e-3": 4 / 6}
    assert active_units(mu_q, thresholds=(0.01,)) == {"au/0": 1 / 4, "au/1": 1 / 2, "au": 2 / 6}


def test_cost_and_progress_lines() -> None:
    assert is_nll_cost(10000, 1000, 2.1) == (
        "IS-NLL: 10,000 test images x K=1,000 samples (10,000,000 forward passes), about 35 min at the rate "
        "of the ELBO pass (2.10 s)")
    assert "about 2.9 h" in is_nll_cost(10000, 5000, 2.1)
    assert "about 4 s" in is_nll_cost(20, 4, 1.0)
    assert progress_line("IS-NLL", 2000, 10000, 372.0, "nll 95.31") == (
        "IS-NLL 2,000/10,000 images, 20%, nll 95.31, elapsed 0:06:12, eta 0:24:48")


def test_progress_period_and_terminal_bar(capsys, monkeypatch) -> None:
    with ImageProgress(30, "IS-NLL", period=3600) as progress:  # long period: only the final line
        for _ in range(3):
            progress.update(10, "nll 1.00")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("IS-NLL 30/30 images, 100%, nll 1.00, elapsed 0:00:00")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with ImageProgress(30, "IS-NLL", period=0) as progress:  # a terminal: a tqdm bar counting images
        for _ in range(3):
            progress.update(10, "nll 1.00")
    text = terminal.getvalue()
    assert "30/30" in text and "img" in text and "nll 1.00" in text and "images," not in text

def test_evaluate_test_reports_cost_progress_and_writes_json_atomically(tiny, tmp_path, capsys) -> None:
    data, model = tiny
    cfg = compose(TINY + ["eval.batch_size=5"])
    out = tmp_path / "r.json"
    results = evaluate_test(model, data.test, cfg, tmp_path / "best.pt", out=out, progress_period=0)
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    cost = [line for line in err if line.startswith("IS-NLL: ")]
    assert len(cost) == 1
    assert cost[0].startswith("IS-NLL: 20 test images x K=4 samples (80 forward passes), about ")
    progress = [line for line in err if line.startswith("IS-NLL ") and " images, " in line]
    assert [line.split(",")[0] for line in progress] == [f"IS-NLL {n}/20 images" for n in (5, 10, 15, 20)]
    assert progress[-1].split(", ")[1] == "100%" and f"nll {results['nll']:.2f}" in progress[-1]
    assert err.index(cost[0]) < err.index(progress[0])

    assert json.loads(out.read_text()) == results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary file left behind
    assert results["images"] == 20 and math.isfinite(results["nll"])
    assert 0 <= results["elbo_au"] <= results["elbo_au_1e-3"] <= 1
    assert "active units (var > 0.01)" in captured.out and "active units (var > 0.001)" in captured.out
