"""RunLogger (metrics file, resume, console, image grids, real wandb in offline mode) and the curve plots."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import save_image

from dvp.core.paths import replace_atomically
from dvp.train.curves import compare_curves, plot_curves
from dvp.train.logger import RunLogger, read_metrics, save_grid


@pytest.fixture(autouse=True)
def _wandb_home(tmp_path_factory, monkeypatch):
    """Keep wandb's own cache and settings out of the home directory."""
    home = tmp_path_factory.mktemp("wandb_home")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_lines_and_console(tmp_path, capsys):
    log = RunLogger(tmp_path, {}, total_steps=10, wandb_mode="disabled")
    log.log_train(3, {"loss": torch.tensor(0.4521), "nelbo": 245.13}, images_per_s=512.34)
    log.log_eval(5, 1, "val", {"loss": 0.41, "nelbo": 240.0})
    log.log_train(6, {"loss": float("nan"), "nelbo": float("inf"), "grad_norm": -math.inf}, images_per_s=1.0)
    log.close()

    train, val, bad = lines(tmp_path)
    assert train["split"] == "train" and train["step"] == 3 and "epoch" not in train
    assert train["loss"] == pytest.approx(0.4521) and isinstance(train["loss"], float)
    assert train["images_per_s"] == pytest.approx(512.34) and train["time"] > 0
    assert val == {"split": "val", "step": 5, "epoch": 1, "loss": 0.41, "nelbo": 240.0, "time": val["time"]}
    assert bad["loss"] is None and bad["nelbo"] is None and bad["grad_norm"] is None  # strict JSON: null
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_id.txt").exists()

    err = capsys.readouterr().err  # stderr is not a TTY under pytest: plain lines
    assert "step 3/10 loss 0.452 bpd nelbo 245.1 img/s 512.3" in err
    assert "[val] epoch 1 step 5 loss 0.410 bpd nelbo 240.0" in err
    assert "eta 0:" in err


def test_resume_truncates_metrics(tmp_path):
    log = RunLogger(tmp_path, {}, total_steps=None, wandb_mode="disabled")
    for step in range(1, 8):
        log.log_train(step, {"loss": 1.0 / step}, images_per_s=1.0)
    log.log_eval(4, 1, "val", {"loss": 0.3})
    log.log_eval(7, 2, "val", {"loss": 0.2})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"split": "train", "st')  # a line cut short by a crash

    log = RunLogger(tmp_path, {}, total_steps=None, wandb_mode="disabled", start_step=4)
    log.log_train(5, {"loss": 0.9}, images_per_s=1.0)
    log.close()
    records = lines(tmp_path)
    assert [(r["split"], r["step"]) for r in records] == [
        ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("val", 4), ("train", 5)]
    assert records[-1]["loss"] == 0.9
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_disabled_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    log = RunLogger(run_dir, {"a": 1}, total_steps=10, enabled=False, wandb_mode="offline", start_step=2,
                    log_checkpoints=True)
    log.log_train(3, {"loss": 0.5}, images_per_s=1.0)
    log.log_eval(3, 1, "val", {"loss": 0.5})
    assert log.log_images(3, "samples", torch.zeros(4, 1, 8, 8)) is None
    log.log_summary({"params": 10})
    log.log_checkpoint(tmp_path / "missing.pt", ["latest"])
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_image_grid(tmp_path):
    """Grids are upscaled by the smallest integer factor that makes them >= 512 px wide."""
    log = RunLogger(tmp_path, {}, total_steps=None, wandb_mode="disabled")
    images = torch.linspace(-1, 1, 16 * 64).reshape(16, 1, 8, 8)
    path = log.log_images(12, "samples", images, nrow=4)
    assert path == tmp_path / "images" / "samples_step0000012.png"
    with Image.open(path) as im:
        assert im.size == (13 * (4 * 8 + 5 * 2),) * 2  # 42 px -> x13 = 546 px
        assert im.getextrema()[0] == (0, 255)  # [-1, 1] mapped onto the full range
    default = log.log_images(13, "recon", torch.zeros(5, 3, 8, 8))  # nrow = ceil(sqrt(5)) = 3
    with Image.open(default) as im:
        assert im.size == (16 * (3 * 8 + 4 * 2), 16 * (2 * 8 + 3 * 2))  # 32 x 22 px -> x16 = 512 x 352
    log.close()
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [default.name, path.name]


def test_save_grid_is_a_nearest_neighbour_upscaling(tmp_path):
    images = torch.rand(7, 1, 8, 8) * 2.4 - 1.2  # out of range values are clamped
    save_image((images.clamp(-1, 1) + 1) / 2, tmp_path / "plain.png", nrow=3, padding=2)
    assert save_grid(images, tmp_path / "same.png", nrow=3, min_width=32) == tmp_path / "same.png"
    save_grid(images, tmp_path / "big.png", nrow=3, min_width=100)  # 32 px -> x4 = 128 px
    save_grid(images, tmp_path / "default.png")  # nrow = ceil(sqrt(7)) = 3, 32 px -> x16 = 512 px
    plain, same, big, default = (np.asarray(Image.open(tmp_path / f"{name}.png"))
                                 for name in ("plain", "same", "big", "default"))
    assert plain.shape == same.shape == (32, 32, 3) and (same == plain).all()
    assert big.shape == (128, 128, 3) and (big == plain.repeat(4, 0).repeat(4, 1)).all()
    assert default.shape == (512, 512, 3) and (default == plain.repeat(16, 0).repeat(16, 1)).all()
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_replace_atomically_keeps_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "best.eval.json"
    path.write_text('{"nll": 1.0}')

    def interrupted(tmp):
        tmp.write_text('{"nll": 2.')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_atomically(path, interrupted)
    assert path.read_text() == '{"nll": 1.0}' and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    replace_atomically(path, lambda tmp: tmp.write_text('{"nll": 2.0}'))
    assert path.read_text() == '{"nll": 2.0}' and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_wandb_offline_run_and_resume(tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"weights")
    log = RunLogger(tmp_path, {"model": {"layers": 2}}, total_steps=4, wandb_mode="offline",
                    log_checkpoints=True)
    log.log_train(1, {"loss": 0.5, "nelbo": 300.0}, images_per_s=10.0)
    log.log_eval(2, 1, "val", {"loss": 0.4, "nelbo": float("nan")})
    log.log_images(2, "samples", torch.zeros(4, 1, 8, 8))
    log.log_summary({"params": 1234})
    log.log_checkpoint(ckpt, ["latest", "step-2"])
    log.close()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert run_id
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 1

    log = RunLogger(tmp_path, {"model": {"layers": 2}}, total_steps=4, wandb_mode="offline", start_step=2)
    log.log_train(3, {"loss": 0.45}, images_per_s=10.0)
    log.close()
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert "wandb failed" not in capsys.readouterr().err


def test_wandb_failure_does_not_stop_training(tmp_path, capsys):
    """An invalid project name makes the real wandb.init raise (UsageError); logging goes on without wandb."""
    log = RunLogger(tmp_path, {}, total_steps=3, wandb_mode="offline", project="bad/project",
                    log_checkpoints=True)
    log.log_train(1, {"loss": 0.5}, images_per_s=1.0)
    log.log_eval(1, 1, "val", {"loss": 0.5})
    with Image.open(log.log_images(1, "samples", torch.zeros(1, 1, 8, 8))) as im:   # the grid, written whole
        assert im.size == (512, 512)                    # one 8 px image (no padding), x64 to reach 512 px
        assert im.convert("L").getextrema() == (128, 128)   # 0 in [-1, 1] is mid-grey everywhere
    log.log_summary({"params": 1})
    log.log_checkpoint(tmp_path / "ckpt.pt", ["latest"])
    log.close()
    err = capsys.readouterr().err
    assert err.count("wandb failed") == 1
    assert "UsageError" in err and "logging continues without wandb" in err
    assert [r["split"] for r in lines(tmp_path)] == ["train", "val"]
    assert not (tmp_path / "wandb").exists()


def test_plot_and_compare_curves(tmp_path):
    runs = {}
    for name, scale in (("dvp", 1.0), ("ladder", 1.1)):
        log = RunLogger(tmp_path / name, {}, total_steps=None, wandb_mode="disabled")
        for step in range(1, 41):
            log.log_train(step, {"loss": scale * (1 + 1 / step), "nelbo": 300.0 / step}, images_per_s=1.0)
            if step % 10 == 0:
                log.log_eval(step, step // 10, "val", {"loss": scale * (1 + 1.2 / step), "nelbo": 310.0 / step})
        log.close()
        runs[name] = tmp_path / name / "metrics.jsonl"

    out = plot_curves(runs["dvp"], tmp_path / "plots" / "curves.png", title="dvp")
    compared = compare_curves(runs, tmp_path / "compare.png")
    for path in (out, compared):
        assert path.stat().st_size > 5000
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200

    train_only = tmp_path / "train_only.jsonl"  # no val records, no nelbo: one panel, no failure
    train_only.write_text("".join(json.dumps({"split": "train", "step": s, "loss": 1.0 / s}) + "\n"
                                  for s in range(1, 5)))
    with Image.open(plot_curves(train_only, tmp_path / "train_only.png")) as im:
        assert im.size[0] < Image.open(out).size[0]
    assert len(read_metrics(train_only)) == 4
    with pytest.raises(ValueError, match="no run has val 'missing'"):
        compare_curves(runs, tmp_path / "none.png", key="missing")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=str(empty)):
        plot_curves(empty, tmp_path / "empty.png")
    with pytest.raises(ValueError, match=str(empty)):
        compare_curves({"dvp": runs["dvp"], "empty": empty}, tmp_path / "empty.png")
