"""The single-machine trainer end to end: run dir, resume == uninterrupted, checkpoint safety, skipping, CLIs."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dvp.core.config import compose
from dvp.core.errors import CheckpointError, TrainingStopped
from dvp.model.vae import build_model
from dvp.parallel.context import init
from dvp.parallel.launch import detect
from dvp.train.checkpoint import load_checkpoint, save_checkpoint
from dvp.train.engine_torch import TorchEngine
from dvp.train.loop import lr_at, prepare, train

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"
SMALL = ["train.batch_size=64", "train.ckpt_every=0", "train.final_eval=false", "wandb.mode=disabled",
         "train.log_every=5"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_DIR": str(cwd), "WANDB_CONFIG_DIR": str(cwd / ".wandb"),
           "WANDB_CACHE_DIR": str(cwd / ".wandb"), "WANDB_DATA_DIR": str(cwd / ".wandb")}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The no-argument `dvp-train` path, shortened: DVP-VAE on digits, one epoch, a tiny final evaluation."""
    cwd = tmp_path_factory.mktemp("cli")
    res = _cli("dvp.train", "train.max_epochs=1", "eval.is_samples=8", "eval.is_chunk=8", "eval.max_images=40",
               "wandb.mode=offline", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = Path(res.stdout.strip().splitlines()[-1].removeprefix("run_dir="))
    return run_dir if run_dir.is_absolute() else cwd / run_dir


def test_default_train_writes_a_complete_run_dir(digits_run: Path) -> None:
    assert digits_run.parts[-3:-1] == ("runs", "default")
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/best.pt", "checkpoints/last.pt",
                 "checkpoints/best.eval.json"):
        assert (digits_run / name).is_file(), name
    records = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(train_losses) == 2 and train_losses[-1] < train_losses[0]          # 20 steps, a line per 10
    assert [r["split"] for r in records].count("val") == 1
    pngs = sorted((digits_run / "images").glob("*.png"))
    assert {p.name.split("_step")[0] for p in pngs} == {"samples", "reconstructions"}
    assert Image.open(pngs[-1]).size == ((8 * 8 + 9 * 2) * 7,) * 2     # 64 samples, 8 x 8 grid (82 px) upscaled x7
    results = json.loads((digits_run / "checkpoints" / "best.eval.json").read_text())
    assert results["images"] == 40 and results["is_samples"] == 8
    assert 0 < results["nll"] <= results["elbo_nelbo"] + 5          # IS-NLL (K=8) tighter than the ELBO
    assert list((digits_run / "wandb").glob("offline-run-*"))


def test_eval_and_sample_clis_read_the_run(digits_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    res = _cli("dvp.sample", f"run_dir={digits_run}", "n=16", "temperature=0.8", f"out={out}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert Image.open(out).size == ((4 * 8 + 5 * 2) * 13,) * 2          # 42 px grid upscaled x13
    res = _cli("dvp.evaluate", f"run_dir={digits_run}", "checkpoint=last", "eval.is_samples=4", "eval.is_chunk=4",
               "eval.max_images=20", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "test NLL (nats)" in res.stdout
    assert json.loads((digits_run / "checkpoints" / "last.eval.json").read_text())["images"] == 20
    bad = _cli("dvp.evaluate", f"run_dir={digits_run}", "model.num_ch=3", cwd=tmp_path)
    assert bad.returncode == 2 and "model.num_ch" in bad.stderr and "Traceback" not in bad.stderr


def test_lr_schedule_warms_up_linearly_then_follows_the_cosine() -> None:
    t = compose(["train.lr=0.01", "train.lr_min=0.0", "train.warmup_epochs=2", "train.lr_epochs=10"]).train
    assert [lr_at(e, t) for e in (0, 1)] == [0.005, 0.01]
    assert lr_at(5, t) == pytest.approx(0.005) and lr_at(10, t) == pytest.approx(0.0)


def _state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["engine"]


def test_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path: Path) -> None:
    common = SMALL + ["train.max_epochs=3"]
    full = train(compose(common + ["train.max_steps=30", f"run_dir={tmp_path / 'full'}"]))
    part = tmp_path / "part"
    train(compose(common + ["train.max_steps=13", f"run_dir={part}"]))       # stops mid-epoch 0
    assert load_checkpoint(part / "checkpoints" / "last.pt")["loop"]["step"] == 13
    over = common + ["train.max_steps=30", f"run_dir={part}"]
    train(compose(over), over)                                                # resumes across an epoch boundary
    a, b = _state(full), _state(part)
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["optimizer"]["step"] == b["optimizer"]["step"] == 30
    for name, sa in a["optimizer"]["tensors"].items():
        assert all(torch.equal(sa[k], b["optimizer"]["tensors"][name][k]) for k in sa), name
    assert load_checkpoint(part / "checkpoints" / "last.pt")["loop"]["step"] == 30


def test_resume_refuses_a_different_model(tmp_path: Path) -> None:
    train(compose(SMALL + ["train.max_steps=2", f"run_dir={tmp_path}"]))
    over = SMALL + [f"run_dir={tmp_path}", "model.num_ch=16"]
    with pytest.raises(Exception, match="cannot change model"):
        train(compose(over), over)


def _tiny_state() -> dict:
    cfg = compose(["model.num_ch=16"])
    weights = build_model(cfg, (1, 8, 8)).state_dict()
    return {"config": {}, "image_shape": [1, 8, 8], "engine": {"model": weights, "ema": weights}}


def test_truncated_checkpoint_is_a_clear_error_and_a_failed_save_keeps_the_old_one(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, _tiny_state())
    good = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="cut.pt.*truncated"):
        load_checkpoint(cut)

    def crash(obj, f, *args, **kwargs):   # a crash part-way through writing (e.g. disk full, killed)
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, _tiny_state())
    monkeypatch.undo()
    assert path.read_bytes() == good and load_checkpoint(path)["format"] == "dvp-checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.pt", "last.pt"]    # no temp file left behind


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"format": "dvp-checkpoint", "version": 1, "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a dvp checkpoint"):
        load_checkpoint(foreign)


def test_a_nan_step_is_skipped_counted_and_never_applied() -> None:
    cfg = compose(SMALL)
    data, model = prepare(cfg)
    engine = TorchEngine(model, cfg, data.shape, init(detect({})))
    x = data.train[:64]
    engine.step(x, 0)
    before, ema_before = engine.full_weights("raw"), engine.full_weights("ema")
    moments = engine.full_optimizer()
    x_nan = x.clone()
    x_nan[0, 0, 0, 0] = math.nan
    stats = engine.step(x_nan, 1)
    assert stats["skipped"] == 1 and stats["skipped_total"] == 1 and stats["nonfinite_loss"] == 1
    assert stats["nonfinite_grad"] == 1
    assert all(torch.equal(before[k], v) for k, v in engine.full_weights("raw").items())
    assert all(torch.equal(ema_before[k], v) for k, v in engine.full_weights("ema").items())
    after = engine.full_optimizer()
    assert after["step"] == moments["step"] == 1
    assert all(torch.equal(moments["tensors"][n][k], v[k]) for n, v in after["tensors"].items()
               for k in ("exp_avg", "exp_inf"))
    stats = engine.step(x, 2)
    assert stats["skipped"] == 0 and engine.consecutive_skips == 0 and engine.skipped_total == 1


def test_the_torch_engine_has_no_native_checkpoint(tmp_path: Path) -> None:
    """Engine.save_native / load_native are no-ops for the torch engine: it writes nothing, last.pt names no
    native checkpoint, and loading one changes no weight."""
    cfg = compose(SMALL)
    data, model = prepare(cfg)
    engine = TorchEngine(model, cfg, data.shape, init(detect({})))
    assert engine.save_native(tmp_path / "deepspeed", "step0", {}) is False
    assert not (tmp_path / "deepspeed").exists()
    before = engine.full_weights("raw")
    engine.load_native(tmp_path / "deepspeed", "step0")
    assert all(torch.equal(before[k], v) for k, v in engine.full_weights("raw").items())
    run = tmp_path / "run"
    train(compose(SMALL + ["train.max_steps=2", f"run_dir={run}"]))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["native"] is None
    assert not (run / "checkpoints" / "deepspeed").exists()


def test_a_long_run_of_skipped_steps_stops_with_advice(tmp_path: Path) -> None:
    cfg = compose(SMALL + ["train.grad_skip=1e-9", "train.max_skips=3", f"run_dir={tmp_path}"])
    with pytest.raises(TrainingStopped, match="3 consecutive steps skipped.*train.lr"):
        train(cfg)
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


@pytest.mark.skipif(not MNIST.is_file(), reason=f"real MNIST not found at {MNIST} (../shared/data/mnist.npz)")
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_short_training_on_real_mnist_lowers_the_test_nelbo(tmp_path: Path, precision: str) -> None:
    """bf16 is `slow`: on a CPU without native bf16 convolutions (some of CI's machines) they are emulated, 5x
    slower than fp32. 20 steps of 50 images bring the -ELBO of 500 test images from ~3,000 nats at init to ~10% of
    it (fp32 and bf16 alike): the assertion's factor 2 leaves a wide margin."""
    from dvp.evaluate.sharded import evaluate_elbo
    over = ["experiment=mnist/dvp_vae", f"data.root={MNIST.parent}", "train.batch_size=50", "train.max_steps=20",
            "train.warmup_epochs=0", "train.ema=0.0", f"train.precision={precision}",
            f"run_dir={tmp_path}"] + SMALL[1:]
    cfg = compose(over)
    data, model = prepare(cfg)
    torch.manual_seed(0)
    start = evaluate_elbo(model, data.test[:500], cfg)["nelbo"]
    train(cfg)
    trained = build_model(cfg, data.shape)
    trained.load_state_dict(load_checkpoint(tmp_path / "checkpoints" / "last.pt")["engine"]["ema"])
    torch.manual_seed(0)
    end = evaluate_elbo(trained, data.test[:500], cfg)["nelbo"]
    assert end < 0.5 * start, (start, end)


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_decay_is_warmed_up_or_the_papers_constant(warmup: bool) -> None:
    cfg = compose(SMALL + ["train.ema=0.999", f"train.ema_warmup={str(warmup).lower()}"])
    data, model = prepare(cfg)
    engine = TorchEngine(model, cfg, data.shape, init(detect({})))
    before = engine.full_weights("ema")
    engine.step(data.train[:64], 0)
    decay = min(0.999, 2 / 11) if warmup else 0.999                 # n = 1 applied step
    after, weights = engine.full_weights("ema"), engine.full_weights("raw")
    for name, _ in model.named_parameters():
        expected = decay * before[name] + (1 - decay) * weights[name]
        assert torch.allclose(after[name], expected, atol=1e-7), name
